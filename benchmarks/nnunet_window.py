"""What explaining an nnU-Net model as nnU-Net runs it costs: a saliency map (one forward and one
backward) of a full volume through nnU-Net's sliding window (Gaussian weights, test-time mirroring
over three axes, float16 sums), against the same on one patch of the bare network. The results
folder is made by nnU-Net here (tests/nnunet_results.py, about a minute) unless --folder is given.

    .venv/bin/python benchmarks/nnunet_window.py                 # a 60 x 112 x 120 volume
    .venv/bin/python benchmarks/nnunet_window.py --folder RESULTS --no-mirroring
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.nnunet_results import DATASET, _write, make, sphere_case  # noqa: E402


def saliency_seconds(module, x: torch.Tensor, repeats: int = 2) -> float:
    """The best of ``repeats`` timings of one forward and one backward of channel 1's sum."""
    best = float("inf")
    for _ in range(repeats):
        x = x.detach().clone().requires_grad_(True)
        start = time.perf_counter()
        module(x)[0, 1].sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from pellucid.models.nnunet import NnUNetResults

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an nnU-Net results folder")
    parser.add_argument("--no-mirroring", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make(Path(tmp))
        results = NnUNetResults(folder, ["0"], mirroring=not args.no_mirroring)
        image, _, _ = sphere_case(7, shape=(60, 112, 120))
        _write(image, Path(tmp) / "case_0000.nii.gz")
        data = torch.from_numpy(results.preprocess([Path(tmp) / "case_0000.nii.gz"]).data)[None]
        module = results.module()
        patch = data[(slice(None), slice(None), *[slice(0, p) for p in module.patch_size])]
        net = module.folds[0]
        tiles = len(results.predictor._internal_get_sliding_window_slicers(tuple(data.shape[2:])))
        whole = saliency_seconds(module, data)
        one = saliency_seconds(net, patch)
        mirrors = 2 ** len(module.mirror_axes)
        print(f"{folder.name if args.folder else DATASET}: volume {tuple(data.shape[2:])}, patch "
              f"{module.patch_size}, {tiles} tiles x {mirrors} mirrorings, {args.threads} threads")
        print(f"saliency, full volume as nnU-Net predicts it: {whole:.2f} s")
        print(f"saliency, one patch of the bare network:       {one:.3f} s")
        print(f"ratio {whole / one:.1f} (tiles x mirrorings = {tiles * mirrors})")


if __name__ == "__main__":
    main()
