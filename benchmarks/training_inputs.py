"""How well the training-input check tells the demo models' own kind of image from patients' images:
its false-alarm rate on held-out phantoms (new seeds, never seen in training or calibration) and
its detection rate on the shared real images (ChestX-ray14 radiographs, the DICOM samples' CR, CT
and MR, BraTS MRI slices and volumes), each read as ``pellucid explain`` reads a file.

    .venv/bin/python benchmarks/training_inputs.py                 # demo_out/models (trained if absent)
    .venv/bin/python benchmarks/training_inputs.py --models DIR    # another `pellucid demo` output

The check itself (pellucid.models.training_inputs): the Mahalanobis distance of the model's pooled
features from those of its validation images, with the threshold at 1 % out-of-fold false alarms.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _distances(loaded, images) -> list[float]:
    from pellucid.models.training_inputs import check_input

    card = loaded.card
    return [check_input(loaded.module, card, card.normalize(x[None])).distance for x in images]


def _files(loaded, paths) -> list[torch.Tensor]:
    """Each readable file as the CLI reads it (channels, size, resize of the card)."""
    from pellucid.data.inputs import load_input
    from pellucid.errors import PellucidError

    card, out = loaded.card, []
    for p in paths:
        try:
            out.append(load_input(Path(p), card.in_channels, card.input_size, card.spatial_dims,
                                  card.resize).image)
        except PellucidError:  # a multi-frame file, a volume for a 2D model: not an image here
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo_out", help="a `pellucid demo` output folder")
    parser.add_argument("--phantoms", type=int, default=200, help="held-out phantoms per model")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    warnings.filterwarnings("ignore")
    from pellucid.bench.runner import prepare_model
    from pellucid.data import BraTS, open_dataset
    from pellucid.demo import demo_config
    from pellucid.paths import shared_data_dir
    from pellucid.pipeline.intended_use import NOT_IMAGES
    from pellucid.runtime import configure_threads

    configure_threads()
    data = shared_data_dir()
    config = demo_config()
    out = Path(args.models)
    rows = []
    for spec in config.models.values():
        loaded, _ = prepare_model(spec, out, config.seed)
        card = loaded.card
        t = dict(spec.train)
        options = dict(t.get("options", {}))
        held = open_dataset(t["reader"], split="test", n=args.phantoms, seed=12345, **options)
        sets = {"held-out phantoms (new seed)": [held[i]["image"] for i in range(len(held))]}
        if card.spatial_dims == 2 and card.in_channels == 1:
            pngs = sorted((data / "chestxray14-sample" / "images").glob("*.png"))
            sets["ChestX-ray14 radiographs (PNG)"] = _files(loaded, pngs)
            dicoms = sorted((data / "dicom-samples").rglob("*.dcm"))
            import pydicom

            by_modality: dict[str, list] = {}
            for p in dicoms:
                modality = str(pydicom.dcmread(p, stop_before_pixels=True).get("Modality", "?"))
                if modality not in NOT_IMAGES:  # a SEG is refused before any check
                    by_modality.setdefault(modality, []).append(p)
            for modality, paths in sorted(by_modality.items()):
                images = _files(loaded, paths)
                if images:
                    sets[f"DICOM samples, {modality}"] = images
        elif card.in_channels == 4:
            size = options.get("size")
            real = BraTS(data / "brats-format-samples", spatial_dims=card.spatial_dims, size=size,
                         **({"slices": "brain"} if card.spatial_dims == 2 else {}))
            sets[f"BraTS-format MRI ({'slices' if card.spatial_dims == 2 else 'volumes'})"] = [
                real[i]["image"] for i in range(len(real))]
        threshold = card.training_inputs["threshold"]
        for name, images in sets.items():
            d = torch.tensor(_distances(loaded, images), dtype=torch.float64)
            flagged = int((~(d <= threshold)).sum())
            rows.append((spec.name, name, len(d), flagged, flagged / max(len(d), 1),
                         float(d.median()), threshold))
            print(f"{spec.name:14s} {name:34s} n={len(d):4d} flagged {flagged:4d} "
                  f"({flagged / max(len(d), 1):6.1%})  median distance {float(d.median()):8.1f} "
                  f"(threshold {threshold:.1f})", flush=True)
    print("\n| model | images | n | flagged as unlike the training data | rate | median distance "
          "| threshold |")
    print("|---|---|---|---|---|---|---|")
    for model, name, n, flagged, rate, median, threshold in rows:
        print(f"| {model} | {name} | {n} | {flagged} | {rate:.1%} | {median:.1f} | {threshold:.1f} |")


if __name__ == "__main__":
    main()
