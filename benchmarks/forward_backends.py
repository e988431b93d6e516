"""The forward pass that bounds every perturbation method: which backend is fastest here?

For each trained model of the vs_peers grid (ResNet-18, DenseNet-121, 2D U-Net, 3D U-Net) and
batch size, forward-only inputs (inference mode) run through: the eager module, pellucid's torch
backend (the traced, frozen, ``optimize_for_inference`` copy), ONNX Runtime and OpenVINO on
pellucid's export (:mod:`pellucid.inference`), and, opt-in reduced precision, OpenVINO with bf16
inference and torch under bf16 autocast. Prints milliseconds per input (median of alternating
runs), the largest output difference from the eager module relative to its largest output, and
pellucid's verification verdict (a runtime that fails it is never used for that model; here the
instance-normalised U-Nets, whose all-zero input the runtimes get wrong by per cents).

    .venv/bin/python benchmarks/forward_backends.py             # about 3 minutes here
    .venv/bin/python benchmarks/forward_backends.py --compile   # and torch.compile (inductor)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table
from vs_peers import cases, grid, trained

from pellucid.inference import runtimes
from pellucid.inference.export import export_key, export_onnx
from pellucid.inference.select import BackendForward, verify
from pellucid.inference.torch_copy import torch_forward
from pellucid.runtime import configure_threads, set_precision

warnings.filterwarnings("ignore")


def backends(model, example, compile_too: bool) -> tuple[dict, dict]:
    """name -> forward function, and name -> pellucid's verdict on it."""
    fns = {"eager": model, "torch (optimised copy)": torch_forward(model, example)}
    verdicts = {"eager": "", "torch (optimised copy)": "reference"}
    path = export_onnx(model, example, export_key(model, example))
    for backend, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
        name = backend if precision == "fp32" else f"{backend} bf16"
        try:
            fn = BackendForward(backend, runtimes.BUILDERS[backend](path, precision))
        except Exception as exc:
            verdicts[name] = f"not available: {str(exc).splitlines()[0][:60]}"
            continue
        fns[name] = fn
        try:
            verify(model, example, fn, precision)
            verdicts[name] = "verified"
        except RuntimeError as exc:
            verdicts[name] = "refused: " + str(exc).split(" (allowed")[0].replace("its output ", "")

    def autocast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()
    fns["torch bf16 autocast"] = autocast
    verdicts["torch bf16 autocast"] = "opt-in (changes values)"
    if compile_too:
        compiled = torch.compile(model, dynamic=False)
        fns["torch.compile (inductor)"] = compiled
        verdicts["torch.compile (inductor)"] = "not used by pellucid"
    return fns, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/pellucid-vs-peers"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batches", default="1,8,16", help="batch sizes, comma-separated")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    args = parser.parse_args()
    configure_threads()
    set_precision(None)
    rows = []
    for task in grid(quick=False):
        loaded, _ = trained(task, args.models)
        model = loaded.module.eval()
        x, _, _ = cases(task, loaded)
        fns, verdicts = backends(model, x[:1], args.compile)
        for size in (int(b) for b in args.batches.split(",")):
            batch = x.repeat((size + len(x) - 1) // len(x), *([1] * (x.ndim - 1)))[:size]
            times: dict[str, list[float]] = {name: [] for name in fns}
            with torch.inference_mode():
                reference = model(batch)
                for fn in fns.values():
                    fn(batch)
                for _ in range(args.repeat):
                    for name, fn in fns.items():
                        t = time.perf_counter()
                        fn(batch)
                        times[name].append(time.perf_counter() - t)
                torch_ms = statistics.median(times["torch (optimised copy)"]) / size
                for name, fn in fns.items():
                    diff = float((fn(batch).float() - reference).abs().max() / reference.abs().max())
                    ms = statistics.median(times[name]) / size
                    rows.append({"model": task.name, "batch": str(size), "backend": name,
                                 "ms per input": f"{ms * 1e3:.2f}",
                                 "vs torch copy": f"{torch_ms / ms:.2f}x",
                                 "max rel |diff|": f"{diff:.1e}", "pellucid": verdicts[name]})
        print(f"{task.name} {tuple(x.shape[1:])} done", flush=True)
    print(table(rows, ["model", "batch", "backend", "ms per input", "vs torch copy",
                       "max rel |diff|", "pellucid"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
