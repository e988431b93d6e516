"""ONNX Runtime and OpenVINO sessions as forward functions on torch tensors (CPU, float32 in and
out). Both use the intra-op threads torch has now (:func:`pellucid.runtime.configure_threads`) and
one inter-op thread, so several workers on one machine do not oversubscribe its cores.

- ONNX Runtime: CPU execution provider, every graph optimisation; no bfloat16 CPU kernels on x86
  (``bf16`` is refused for it).
- OpenVINO: the CPU plugin with ``INFERENCE_PRECISION_HINT`` set explicitly (``f32``, or ``bf16``
  when asked for: the plugin would otherwise pick bf16 by itself on CPUs with AVX-512 BF16 or AMX
  and change the numbers silently), the latency hint (one stream), one inference request per
  thread; each result is copied out of the request's buffer before the next call reuses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pellucid.errors import ConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]
REDUCED = {"onnxruntime": (), "openvino": ("bf16",)}


def available(backend: str) -> bool:
    """Whether the runtime's Python package imports."""
    try:
        __import__({"onnxruntime": "onnxruntime", "openvino": "openvino"}[backend])
    except ImportError:
        return False
    return True


def supports(backend: str, precision: str) -> bool:
    return precision == "fp32" or precision in REDUCED.get(backend, ())


def _array(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def onnxruntime_forward(path: Path, precision: str = "fp32") -> Forward:
    import onnxruntime as ort

    if precision != "fp32":
        raise ConfigError(f"onnxruntime has no {precision} CPU kernels here; use --backend "
                          f"openvino or torch for {precision}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: _array(x)})[0]).to(x.device)
    return forward


_CORE = None


def openvino_forward(path: Path, precision: str = "fp32") -> Forward:
    import openvino as ov

    global _CORE
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"openvino runs fp32 or bf16 here, not {precision}")
    if _CORE is None:
        _CORE = ov.Core()
    if precision == "bf16" and "BF16" not in _CORE.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise ConfigError("this CPU has no bfloat16 support for openvino (no AVX-512 BF16 / AMX)")
    compiled = _CORE.compile_model(_CORE.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"})
    local = threading.local()

    def forward(x: torch.Tensor) -> torch.Tensor:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        request.infer({0: _array(x)})
        out = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        return torch.from_numpy(out).to(x.device)
    return forward


BUILDERS = {"onnxruntime": onnxruntime_forward, "openvino": openvino_forward}
