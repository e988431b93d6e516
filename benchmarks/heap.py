"""The retained heap (pellucid.inference.heap) against the C library's own policy, in one process.

The grid's trained models of ``benchmarks/vs_peers.py`` (reused from --models), the heavy methods
with the grid's options, alternating: one call with freed blocks kept in the heap, one with
glibc's own thresholds (32 MiB / 64 MiB, its largest dynamic values). Prints the median seconds
of each and their ratio, and checks that the maps are equal.

    .venv/bin/python benchmarks/heap.py    # about 3 minutes here
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table
from vs_peers import cases, grid, trained

import pellucid
from pellucid.inference import heap
from pellucid.runtime import configure_threads
from pellucid.targets import ClassTarget, SegmentationTarget

warnings.filterwarnings("ignore")
METHODS = ("occlusion", "scorecam", "integratedgradients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path,
                        default=Path(tempfile.gettempdir()) / "pellucid-vs-peers")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    configure_threads()
    libc = heap._libc()
    if libc is None:
        sys.exit(f"nothing to compare: {heap.heap_policy()}")
    rows = []
    for task in grid(quick=False):
        if task.name not in ("resnet18", "unet-2d"):
            continue
        loaded, _ = trained(task, args.models)
        x, y, _ = cases(task, loaded)
        seg = loaded.card.task == "segmentation"
        target = SegmentationTarget(0, "predicted") if seg else ClassTarget(y, kind="logit")
        for method in METHODS:
            opts = task.methods.get(method, {})

            def call(opts=opts, method=method, loaded=loaded, x=x, target=target):
                return pellucid.explain(loaded, x, method, target=target, **opts)

            call(), call()
            kept, own = [], []
            for _ in range(args.pairs):
                heap._LIBC = libc
                start = time.perf_counter()
                a = call()
                kept.append(time.perf_counter() - start)
                heap._LIBC = None
                start = time.perf_counter()
                b = call()
                own.append(time.perf_counter() - start)
            heap._LIBC = libc
            same = torch.equal(a.attributions, b.attributions)
            rows.append({"model": task.name, "method": method,
                         "kept s": f"{statistics.median(kept):.3f}",
                         "glibc's own s": f"{statistics.median(own):.3f}",
                         "speed-up": f"{statistics.median(own) / statistics.median(kept):.2f}x",
                         "same maps": "yes" if same else "NO"})
            print(rows[-1], flush=True)
    print(table(rows, ["model", "method", "kept s", "glibc's own s", "speed-up", "same maps"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
