"""Models pellucid can only run forward: a deployed ONNX file (run by ONNX Runtime) or any callable
from arrays to scores.

A :class:`BlackBoxModel` is an ``nn.Module`` whose ``forward`` converts the input tensor to a
float32 NumPy array, calls the model and returns its scores as a tensor, so every method that only
needs forwards (occlusion, RISE, LIME, KernelSHAP, exact Shapley, the baselines) and every metric
that only needs forwards (deletion/insertion, ROAD, Average Drop, faithfulness correlation, ...)
runs unchanged. It has no parameters, layers or gradients: gradient, CAM, attention and LRP methods
refuse it with the reason (``forward_only``). An ONNX model whose batch axis is fixed to 1 is run
one sample at a time.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pellucid.errors import DataError, ModelError


class BlackBoxModel(nn.Module):
    """``fn`` maps a float32 array (B, C, *spatial) to scores (B, K) or maps (B, K, *spatial)."""

    forward_only = True

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], name: str = "black box",
                 batch: int | None = None, digest: str | None = None) -> None:
        super().__init__()
        self.fn, self.name, self.batch = fn, name, batch
        # what identifies the model's weights (the ONNX file's SHA-256); a function's cannot be
        # known, so each wrapper gets its own and no cached result is ever taken for another's
        self.weights_sha256 = digest or uuid.uuid4().hex

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise ModelError(f"{self.name} runs outside PyTorch: no gradients flow through it")
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        step = self.batch or len(arr)
        try:
            parts = [np.asarray(self.fn(arr[i:i + step])) for i in range(0, len(arr), max(step, 1))]
            out = torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"the {self.name} cannot take input of shape {tuple(arr.shape)}: "
                             f"{first}") from None
        return out.to(x.device)

    def extra_repr(self) -> str:
        return self.name


def load_onnx(path: str | Path, output: str | int = 0, threads: int | None = None) -> BlackBoxModel:
    """An ONNX model run by ONNX Runtime on the CPU (``threads`` intra-op threads, by default
    torch's, as ``pellucid.runtime.configure_threads`` set them); ``output`` names or indexes the
    graph output to explain. A model whose input is not float32 is refused."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such ONNX file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()  # pellucid's setting
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise DataError(path, f"ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise DataError(path, f"the model has {len(inputs)} inputs; pellucid explains one image input")
    if inputs[0].type != "tensor(float)":
        raise DataError(path, f"its input {inputs[0].name!r} is {inputs[0].type}; pellucid feeds float32 "
                              f"images (export the model with a float32 input)")
    names = [o.name for o in outputs]
    if isinstance(output, int):
        if not -len(names) <= output < len(names):
            raise DataError(path, f"output={output}: the model has {len(names)} outputs ({', '.join(names)})")
        chosen = names[output]
    elif output in names:
        chosen = output
    else:
        raise DataError(path, f"output={output!r}: the model's outputs are {', '.join(names)}")
    first = inputs[0].shape[0]
    batch = first if isinstance(first, int) and first > 0 else None
    name_in = inputs[0].name

    def run(arr: np.ndarray) -> np.ndarray:
        return session.run([chosen], {name_in: arr})[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return BlackBoxModel(run, f"ONNX model {path.name}", batch, f"{digest}:{chosen}")


def is_forward_only(model: object) -> bool:
    return bool(getattr(model, "forward_only", False))
