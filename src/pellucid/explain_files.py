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
from pellucid.models.sliding import windowed
from pellucid.models.store import LoadedModel
from pellucid.targets import (
    ClassTarget,
    RegressionTarget,
    SegmentationErrorTarget,
    SegmentationTarget,
    Target,
)

REGIONS = ("predicted", "all", "fp", "fn")


def load_mask(path: str | Path, size: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A ground-truth mask file (NIfTI, PNG/TIFF, .npy) as booleans resized (nearest) to ``size``."""
    from pellucid.data.transforms import resize_mask
    from pellucid.io.files import is_nifti, read_mask_2d, read_nifti, read_npy

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--truth {path}: file not found")
    if is_nifti(path):
        data = read_nifti(path)[0]
    elif path.suffix.lower() == ".npy":
        data = read_npy(path)
    else:
        data = read_mask_2d(path)
    mask = torch.from_numpy(np.asarray(data) > 0)
    if mask.ndim != len(size):
        raise ConfigError(f"--truth {path}: a {mask.ndim}D mask for a {len(size)}D input")
    return resize_mask(mask[None].float(), list(size))[0] > 0.5


def resolve_target(loaded: LoadedModel, target: str | None, region: str = "predicted",
                   truth: torch.Tensor | None = None, reference: float | None = None) -> Target | None:
    """A CLI target (class name or index) as a Target for this model's task: the class (or
    regression output) itself, a segmentation region (predicted | all), or the segmentation's
    errors against ``truth`` (fp: marked but not true, fn: true but missed)."""
    if region not in REGIONS:
        raise ConfigError(f"--region must be one of {', '.join(REGIONS)}, got {region!r}")
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
    if card is not None and card.task == "regression":
        return RegressionTarget(index or 0, reference)
    if region in ("fp", "fn"):
        if truth is None:
            raise ConfigError(f"--region {region} needs --truth MASK (the ground truth)")
        return SegmentationErrorTarget(truth, index or 0, region, activation or "sigmoid")
    if card is not None and card.task == "segmentation":
        return SegmentationTarget(index or 0, region, activation=activation or "sigmoid")
    if index is None:
        return ClassTarget(activation=activation or "softmax")
    return ClassTarget(index, activation=activation or "softmax")


def describe_prediction(loaded: LoadedModel, output: torch.Tensor, explained: int) -> str:
    card = loaded.card
    names = card.class_names if card else [str(i) for i in range(output.shape[1])]
    if card is not None and card.task == "regression":
        return f"{names[explained]} = {float(output[0, explained]):.2f}"
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
                  region: str = "predicted", truth: Path | None = None,
                  reference: float | None = None, sliding_window: list[int] | None = None,
                  overlap: float = 0.25, modalities: bool = False) -> list[dict]:
    """Explain each input with each method. ``truth`` is the ground-truth mask for the fp/fn
    regions; ``sliding_window`` (a patch size) runs a segmentation network patch-wise on inputs
    kept at their own size; ``modalities`` adds exact per-channel Shapley values to the summary."""
    if not methods:
        raise ConfigError("give at least one method")
    for m in methods:
        pellucid.explainers.create(m)  # unknown names fail before any work
    if truth is not None and len(inputs) != 1:
        raise ConfigError("--truth goes with exactly one --input")
    if sliding_window is not None:
        loaded = windowed(loaded, sliding_window, overlap)
    card = loaded.card
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, images, grid_maps = [], [], {m: [] for m in methods}
    for path in inputs:
        if card is not None:
            size = None if sliding_window is not None else card.input_size
            item = load_input(path, card.in_channels, size, card.spatial_dims)
        else:
            item = load_input(path, 1, None, 2)
        x = item.image[None]
        x = card.normalize(x) if card else x
        mask = load_mask(truth, tuple(x.shape[2:])) if truth is not None else None
        tgt = resolve_target(loaded, target, region, mask, reference)
        row = {"input": str(path), "files": [], "methods": {}}
        if modalities:
            row["modality_importance"] = modality_summary(loaded, x, tgt)
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
                                 "target": _jsonable(exp.target.describe())}
            if modalities and exp.raw is not None and exp.raw.shape[:2] == x.shape[:2]:
                share = exp.raw.clamp_min(0).flatten(2).sum(2)[0]
                row["methods"][m]["modality_share"] = dict(zip(
                    _channel_names(loaded, x), (share / share.sum().clamp_min(1e-30)).tolist(),
                    strict=True))
            grid_maps[m].append(att)
        images.append(item.original)
        summary.append(row)
    if len(inputs) > 1 or len(methods) > 1:
        viz.save(viz.grid(images, grid_maps, [Path(p).name for p in inputs]), out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def _jsonable(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def _channel_names(loaded: LoadedModel, x: torch.Tensor) -> list[str]:
    names = list(loaded.card.channel_names) if loaded.card is not None else []
    return names if len(names) == x.shape[1] else [f"channel {i}" for i in range(x.shape[1])]


def modality_summary(loaded: LoadedModel, x: torch.Tensor, target: Target | None) -> dict:
    """Exact modality Shapley values of one input: {channel: phi}, with f(all) and f(none)."""
    from pellucid.explainers.modality import modality_shapley

    out = modality_shapley(loaded, x, target)
    return {"shapley": dict(zip(_channel_names(loaded, x), out["values"][0].tolist(), strict=True)),
            "f_all": float(out["full"][0]), "f_none": float(out["empty"][0])}

