"""Explaining files end to end: read, normalise, predict, explain with several methods, and write
overlay PNGs, raw maps at the source resolution (.npy for 2D, .nii.gz with the source affine for
3D), a cases x methods grid and ``summary.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import pellucid
from pellucid import viz
from pellucid.data.inputs import load_input
from pellucid.errors import ConfigError
from pellucid.explainers.base import upsample
from pellucid.models.store import LoadedModel
from pellucid.targets import ClassTarget, SegmentationTarget, Target


def resolve_target(loaded: LoadedModel, target: str | None, region: str = "predicted") -> Target | None:
    """A CLI target (class name or index) as a Target for this model's task."""
    card = loaded.card
    names = card.class_names if card else []
    index = None
    if target is not None:
        if target in names:
            index = names.index(target)
        elif target.lstrip("-").isdigit():
            index = int(target)
        else:
            raise ConfigError(f"unknown target {target!r}; classes: {', '.join(names) or 'indices'}")
    activation = card.activation if card else None
    if card is not None and card.task == "segmentation":
        return SegmentationTarget(index or 0, region, activation=activation or "sigmoid")
    if index is None:
        return ClassTarget(activation=activation or "softmax")
    return ClassTarget(index, activation=activation or "softmax")


def describe_prediction(loaded: LoadedModel, output: torch.Tensor, explained: int) -> str:
    card = loaded.card
    names = card.class_names if card else [str(i) for i in range(output.shape[1])]
    if output.ndim > 2:
        voxels = int((output[0, explained] > 0).sum())
        return f"{names[explained]}: {voxels} voxels predicted"
    probs = torch.sigmoid(output[0]) if card and card.activation == "sigmoid" else \
        torch.softmax(output[0], 0)
    top = int(probs.argmax())
    text = f"{names[top]} p={float(probs[top]):.2f}"
    if explained != top:
        text += f"; explaining {names[explained]} p={float(probs[explained]):.2f}"
    return text


def explain_files(loaded: LoadedModel, inputs: Sequence[Path], methods: Sequence[str], out: Path,
                  target: str | None = None, layer: str | None = None,
                  region: str = "predicted") -> list[dict]:
    if not methods:
        raise ConfigError("give at least one method")
    for m in methods:
        pellucid.explainers.create(m)  # unknown names fail before any work
    card = loaded.card
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, images, grid_maps = [], [], {m: [] for m in methods}
    for path in inputs:
        if card is not None:
            item = load_input(path, card.in_channels, card.input_size, card.spatial_dims)
        else:
            item = load_input(path, 1, None, 2)
        x = item.image[None]
        x = card.normalize(x) if card else x
        tgt = resolve_target(loaded, target, region)
        row = {"input": str(path), "files": [], "methods": {}}
        for m in methods:
            exp = pellucid.explain(loaded, x, m, target=tgt, layer=layer)
            explained = int(exp.target.classes[0])
            row["prediction"] = describe_prediction(loaded, exp.output, explained)
            att = upsample(exp.attributions, tuple(item.original.shape[1:]), "linear")[0]
            stem = f"{item.name}_{m}"
            if item.affine is not None and att.ndim == 4:
                import nibabel as nib

                nib.save(nib.Nifti1Image(att[0].cpu().numpy().astype(np.float32), item.affine),
                         str(out / f"{stem}.nii.gz"))
                row["files"].append(f"{stem}.nii.gz")
            else:
                np.save(out / f"{stem}.npy", att[0].cpu().numpy().astype(np.float32))
                row["files"].append(f"{stem}.npy")
            fig = viz.overlay(item.original, att, title=f"{m} | {row['prediction']}")
            viz.save(fig, out / f"{stem}.png")
            row["files"].append(f"{stem}.png")
            row["methods"][m] = {"layer": exp.layer, "cost": exp.cost.as_dict(),
                                 "target": exp.target.describe()}
            grid_maps[m].append(att)
        images.append(item.original)
        summary.append(row)
    if len(inputs) > 1 or len(methods) > 1:
        viz.save(viz.grid(images, grid_maps, [Path(p).name for p in inputs]), out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
