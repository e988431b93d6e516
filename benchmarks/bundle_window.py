"""What explaining a MONAI bundle as its configuration runs it costs: a saliency map (one forward
and one backward) of a full volume through the bundle's own sliding-window inferer (Gaussian
blending, overlap 0.5, each window recomputed in the backward pass), against the same on one
window of the bare network. The bundle is made with MONAI's bundle tools here
(tests/monai_bundle.py, about ten seconds) unless --bundle is given.

    .venv/bin/python benchmarks/bundle_window.py                 # a 60 x 112 x 120 volume
    .venv/bin/python benchmarks/bundle_window.py --bundle BUNDLE_FOLDER --volume CASE.nii.gz
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # nnunet_window adds the repository

from nnunet_window import saliency_seconds
from tests.monai_bundle import make
from tests.nnunet_results import _write, sphere_case


def main() -> None:
    from monai.inferers.utils import dense_patch_slices

    from pellucid.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a MONAI bundle folder")
    parser.add_argument("--volume", type=Path, help="a NIfTI volume (default: a synthetic one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.bundle or make(Path(tmp))
        volume = args.volume
        if volume is None:
            image, _, _ = sphere_case(7, shape=(60, 112, 120))
            volume = Path(tmp) / "case.nii.gz"
            _write(image, volume)
        loaded = load_model(folder)
        x, _ = loaded.framework.read(volume)
        inferer = loaded.framework.bundle.inferer
        roi = tuple(int(v) for v in inferer.roi_size)
        interval = tuple(max(int(r * (1 - inferer.overlap)), 1) for r in roi)
        windows = len(dense_patch_slices(tuple(x.shape[2:]), roi, interval))
        window = x[(slice(None), slice(None), *[slice(0, r) for r in roi])]
        whole = saliency_seconds(loaded.module, x)
        one = saliency_seconds(loaded.module.network, window)
        print(f"{loaded.card.name}: grid {tuple(x.shape[2:])}, window {roi}, {windows} windows, "
              f"{args.threads} threads")
        print(f"saliency, full volume as the bundle predicts it: {whole:.2f} s")
        print(f"saliency, one window of the bare network:        {one:.3f} s")
        print(f"ratio {whole / one:.1f} (windows = {windows})")


if __name__ == "__main__":
    main()
