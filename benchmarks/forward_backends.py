"""The forward pass that bounds every perturbation method: which backend is fastest here?

For each trained model of the vs_peers grid, a batch of 16 inputs runs forward-only (inference
mode) through: the eager module, pellucid's optimised copy (TorchScript traced, frozen and
``optimize_for_inference``: what Score-CAM, occlusion, KernelSHAP and the metrics use on a CPU),
and ``torch.compile`` (inductor; compiled once before timing). Prints milliseconds per batch
(median of alternating runs), the compile time and the largest difference from the eager output.

    .venv/bin/python benchmarks/forward_backends.py          # about 2 minutes here
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

from pellucid.explainers.accelerate import inference_forward
from pellucid.runtime import configure_threads

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/pellucid-vs-peers"))
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    configure_threads()
    rows = []
    for task in grid(quick=False):
        loaded, _ = trained(task, args.models)
        model = loaded.module.eval()
        x, _, _ = cases(task, loaded)
        batch = x.repeat((16 + len(x) - 1) // len(x), *([1] * (x.ndim - 1)))[:16]
        backends = {"eager": model, "pellucid optimised copy": inference_forward(model, batch[:1])}
        start = time.perf_counter()
        compiled = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            reference = model(batch)
            compiled(batch)
        compile_s = time.perf_counter() - start
        backends["torch.compile (inductor)"] = compiled
        times: dict[str, list[float]] = {name: [] for name in backends}
        with torch.inference_mode():
            for fn in backends.values():
                fn(batch)
            for _ in range(args.repeat):
                for name, fn in backends.items():
                    t = time.perf_counter()
                    fn(batch)
                    times[name].append(time.perf_counter() - t)
            eager = statistics.median(times["eager"])
            for name, fn in backends.items():
                diff = float((fn(batch) - reference).abs().max())
                ms = statistics.median(times[name])
                rows.append({"model": task.name, "input": str(tuple(batch.shape)), "backend": name,
                             "ms per batch": f"{ms * 1e3:.1f}", "vs eager": f"{eager / ms:.2f}x",
                             "compile s": f"{compile_s:.0f}" if "compile" in name else "",
                             "max |diff|": f"{diff:.1e}"})
        print(f"{task.name} done", flush=True)
    print(table(rows, ["model", "input", "backend", "ms per batch", "vs eager", "compile s",
                       "max |diff|"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
