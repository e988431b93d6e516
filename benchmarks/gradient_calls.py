"""One gradient call against the peer, at batch 1 and at the grid's batch size.

The items where pellucid does exactly the peer's work (saliency and integrated gradients against
Captum, LRP against zennit) on the four networks of ``benchmarks/vs_peers.py``'s full grid (its
trained phantom models, reused from --models), each at one input per call and at the grid's
batch. Both sides run in one process, alternating (median of 9 pairs after 2 warm-up pairs, so
pellucid's gradient copy, built on its second call at a shape, is in use as it is for any user who
explains more than once). Prints seconds per call, the speed-up, and the largest difference
relative to the peer's largest value.

    .venv/bin/python benchmarks/gradient_calls.py    # about 3 minutes here
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table
from vs_peers import cases, grid, peer_explain, trained

import pellucid
from pellucid.runtime import configure_threads
from pellucid.targets import ClassTarget, SegmentationTarget

warnings.filterwarnings("ignore")
COLUMNS = ["model", "item", "batch", "pellucid ms", "peer ms", "speed-up", "rel diff",
           "pellucid ran"]
ITEMS = {"saliency": {}, "integratedgradients": {"steps": 32}, "lrp": {}}


def median_pair(ours, peer, pairs: int = 9) -> tuple[float, float, object, object]:
    for _ in range(2):
        a, b = ours(), peer()
    t_ours, t_peer = [], []
    for _ in range(pairs):
        start = time.perf_counter()
        a = ours()
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        b = peer()
        t_peer.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_peer), a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path,
                        default=Path(tempfile.gettempdir()) / "pellucid-vs-peers")
    args = parser.parse_args()
    configure_threads()
    rows = []
    for task in grid(quick=False):
        loaded, _ = trained(task, args.models)
        model = loaded.module.eval()
        x, y, _ = cases(task, loaded)
        seg = loaded.card.task == "segmentation"
        layer = model.get_submodule(loaded.card.default_layer)
        for method, opts in ITEMS.items():
            if method == "lrp" and task.name != "resnet18":
                continue  # the grid's LRP item: the ResNet-18 (zennit's ResNet canonizer)
            for n in sorted({1, len(x)}):
                xs, ys = x[:n], y[:n]
                with torch.no_grad():
                    region = (torch.sigmoid(model(xs)[:, 0]) > 0.5) if seg else None
                target = SegmentationTarget(0, "predicted") if seg else ClassTarget(ys, kind="logit")
                t_ours, t_peer, ours, peer = median_pair(
                    partial(pellucid.explain, loaded, xs, method, target=target, **opts),
                    partial(peer_explain, method, opts, loaded, layer, xs, ys, region, None))
                peer = peer.detach()
                diff = float((ours.raw - peer).abs().max() / peer.abs().max().clamp_min(1e-12))
                rows.append(dict(zip(COLUMNS, [
                    task.name, method, n, f"{t_ours * 1e3:.1f}", f"{t_peer * 1e3:.1f}",
                    f"{t_peer / t_ours:.2f}x", f"{diff:.1e}",
                    ours.extras.get("gradient_copy", "the model itself")], strict=True)))
                print(" | ".join(map(str, rows[-1].values())), flush=True)
    print()
    print(table(rows, COLUMNS))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")


if __name__ == "__main__":
    main()
