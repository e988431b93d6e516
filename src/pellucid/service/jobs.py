"""One explanation job of the REST service, as a worker process runs it: read the upload (within
the decode limits), explain it with each method, and write overlays, raw maps and, for DICOM input,
the DICOM objects into the job's folder. The PACS command runs the same function in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid.errors import ConfigError, ModelError, PellucidError
from pellucid.service.folders import ModelFolders


class ModelUnavailable(ModelError):
    """A served model whose files cannot be loaded (the operator's problem, not the request's)."""


class Models(ModelFolders):
    """The model folders under ``folder``, each loaded once on first use."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self._loaded: dict[str, Any] = {}

    def get(self, name: str):
        from pellucid.models import load_model

        if name not in self.names():
            raise ConfigError(f"unknown model {name!r}; available: {', '.join(self.names()) or 'none'}")
        if name not in self._loaded:
            try:
                self._loaded[name] = load_model(self.folder / name)
            except PellucidError as exc:
                raise ModelUnavailable(f"model {name!r} cannot be loaded ({exc})") from None
        return self._loaded[name]


def _probabilities(loaded, output: torch.Tensor) -> dict[str, float]:
    card = loaded.card
    names = card.class_names
    if output.ndim > 2:
        act = torch.sigmoid(output) if card.activation == "sigmoid" else torch.softmax(output, 1)
        return {n: float((act[0, k] > 0.5).float().mean()) for k, n in enumerate(names)}
    probs = torch.sigmoid(output[0]) if card.activation == "sigmoid" else torch.softmax(output[0], 0)
    return {n: float(p) for n, p in zip(names, probs, strict=True)}


def run_job(loaded, model_name: str, path: Path, methods: list[str], target: str | None,
            out: Path) -> dict[str, Any]:
    """Explain one input file with ``methods``; write overlays, maps and DICOM objects to ``out``."""
    import pellucid
    from pellucid import viz
    from pellucid.data.inputs import load_input
    from pellucid.explain_files import resolve_target
    from pellucid.explainers.base import upsample

    card = loaded.card
    item = load_input(path, card.in_channels, card.input_size, card.spatial_dims)
    x = card.normalize(item.image[None])
    tgt = resolve_target(loaded, target)
    result: dict[str, Any] = {"model": model_name, "methods": [], "files": [], "skipped": []}
    first_map = None
    for method in methods:
        exp = pellucid.explain(loaded, x, method, target=tgt)
        explained = int(exp.target.classes[0])
        if "classes" not in result:
            probs = _probabilities(loaded, exp.output)
            result["classes"] = probs
            name = card.class_names[explained]
            result["prediction"] = {"class": name, "index": explained, "probability": probs[name]}
        att = upsample(exp.attributions, tuple(item.original.shape[1:]), "linear")[0, 0]
        heat = att.cpu().numpy().astype(np.float32)
        first_map = heat if first_map is None else first_map
        stem = f"{method}"
        fig = viz.overlay(item.original, att[None], title=f"{method} | {result['prediction']['class']}"
                          f" p={result['prediction']['probability']:.2f}")
        viz.save(fig, out / f"{stem}.png")
        if item.affine is not None and heat.ndim == 3:  # a volume: NIfTI with the source affine
            import nibabel as nib

            nib.save(nib.Nifti1Image(heat, item.affine), str(out / f"{stem}.nii.gz"))
            map_name = f"{stem}.nii.gz"
        else:
            np.save(out / f"{stem}.npy", heat)
            map_name = f"{stem}.npy"
        entry = {"method": method, "seconds": round(exp.cost.seconds, 4),
                 "forward_passes": exp.cost.forward_passes, "backward_passes": exp.cost.backward_passes,
                 "layer": exp.layer, "overlay": f"{stem}.png", "map": map_name,
                 "max_location": [int(v) for v in np.unravel_index(int(heat.argmax()), heat.shape)]}
        if item.datasets and heat.ndim == 2:
            try:
                entry["dicom"] = _write_sc(item, heat, method, result["prediction"], out)
            except PellucidError as exc:
                result["skipped"].append({"object": f"{method} secondary capture", "reason": str(exc)})
        result["methods"].append(entry)
    if item.datasets and first_map is not None:
        result["files"] += _write_dicom(item, first_map, methods[0], model_name, result, out)
    return result


def _write_sc(item, heat: np.ndarray, method: str, prediction: dict, out: Path) -> str:
    from pellucid.io import dicom_objects as objects

    image = item.original[0].numpy()
    rgb = objects.overlay_rgb(image, heat, f"{method}: {prediction['class']} "
                                           f"p={prediction['probability']:.2f}")
    sc = objects.secondary_capture(item.datasets[0], rgb)
    name = f"{method}_overlay.dcm"
    sc.save_as(out / name)
    return name


def _write_dicom(item, heat: np.ndarray, method: str, model_name: str, result: dict,
                 out: Path) -> list[str]:
    from pellucid.io import dicom_objects as objects

    written, source = [], item.datasets
    frames = heat if heat.ndim == 3 else heat[None]
    lo, hi = float(frames.min()), float(frames.max())
    norm = (frames - lo) / (hi - lo) if hi > lo else np.zeros_like(frames)
    pmap = seg = None
    try:
        pmap = objects.parametric_map(source, frames, method)
        pmap.save_as(out / "parametric_map.dcm")
        written.append("parametric_map.dcm")
    except PellucidError as exc:
        result["skipped"].append({"object": "parametric map", "reason": str(exc)})
    try:
        seg = objects.segmentation(source, norm >= 0.5, f"{method} region")
        seg.save_as(out / "segmentation.dcm")
        written.append("segmentation.dcm")
    except PellucidError as exc:
        result["skipped"].append({"object": "segmentation", "reason": str(exc)})
    pred = result["prediction"]
    sr = objects.structured_report(source, model_name, "0", pred["class"], pred["probability"],
                                   method, pmap, seg)
    sr.save_as(out / "report_sr.dcm")
    written.append("report_sr.dcm")
    return written
