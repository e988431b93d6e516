"""Writing an explained case: per method a PNG overlay and the raw map at the source resolution
(``.nii.gz`` with the source affine for a volume, ``.npy`` otherwise); for DICOM input the DICOM
objects (a Secondary Capture overlay per method; a Parametric Map, a Segmentation of the map's top
half and a Comprehensive 3D SR from the first method's map). Returns the case's record, the one
format the CLI's ``summary.json``, the service's answer and the PACS command's summary are made from."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid import viz
from pellucid.errors import PellucidError
from pellucid.io.dicom_objects import ExplainedRegion, Finding, ReportedModel
from pellucid.models.card import ModelCard
from pellucid.pipeline.case import CaseResult, describe
from pellucid.pipeline.evidence import Evidence


def write_case(result: CaseResult, out: Path, stem: str = "", dicom: bool = False,
               model_name: str = "", model_digest: str = "", card: ModelCard | None = None,
               evidence: Evidence | None = None, weights_file: tuple[str, str] = ("", "")
               ) -> dict[str, Any]:
    """Write ``result`` into ``out`` with file names ``{stem}_{method}.*`` (``{method}.*`` without a
    stem). ``dicom``: also the DICOM objects when the input was DICOM, their UIDs derived from the
    source, ``model_digest`` (the weights), the method and its options, so that a re-run yields the
    same instances. Returns the record: prediction, explained class, classes, intended use, per
    method its files and cost, every file written, the DICOM objects and what was skipped, why.
    ``evidence`` (``--evidence RUN``): each method's benchmark scores on this model, in the record
    and in the SR. ``weights_file``: the name and SHA-256 of the weights file as stored (the SR,
    the SEG and the KOS name it; :func:`model_files`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    item = result.case.item
    prefix = f"{stem}_" if stem else ""
    title = describe(result.prediction, result.explained)
    note = result.case.intended_use.note()
    unlike = result.case.training_data.note()  # unlike the training data: no finding is stated
    notes = [n for n in (unlike, note) if n]  # why no finding is stated comes first
    found = [] if unlike else findings(card, result)
    summary = summary_text(found, list(result.maps))
    record: dict[str, Any] = {"prediction": result.prediction, "explained": result.explained,
                              "classes": result.classes, "findings": [asdict(f) for f in found],
                              "summary": f"{unlike}. {summary}" if unlike else summary,
                              "intended_use": result.case.intended_use.as_dict(),
                              "training_data": result.case.training_data.as_dict(), "methods": {},
                              "files": [], "dicom_objects": [], "skipped": []}
    if evidence is not None:
        record["evidence"] = {"run": evidence.run, "model": evidence.model,
                              "verified": evidence.verified,
                              "methods": {m: evidence.lines(m) for m in result.maps}}
    seeds, overlays = {}, {}
    context = content_context(card, result)
    for number, (method, att) in enumerate(result.maps.items()):
        exp = result.explanations[method]
        name = f"{prefix}{method}"
        heat = att[0].cpu().numpy().astype(np.float32)
        map_file = write_map(heat, item.affine, out, name)
        caption = f"{method} | {title}" + ("\nOUTSIDE INTENDED USE (override)" if note else "") \
            + ("\nINPUT UNLIKE THE TRAINING DATA: no finding" if unlike else "")
        viz.save(viz.overlay(item.original, att, title=caption), out / f"{name}.png")
        entry: dict[str, Any] = {
            "layer": exp.layer, "seconds": round(exp.cost.seconds, 4),
            "forward_passes": exp.cost.forward_passes, "backward_passes": exp.cost.backward_passes,
            "cost": exp.cost.as_dict(), "target": _jsonable(exp.target.describe()),
            "options": {k: v for k, v in exp.options.items()
                        if v is None or isinstance(v, (bool, int, float, str))},
            "overlay": f"{name}.png", "map": map_file, "empty": empty_map(heat),
            "max_location": [int(v) for v in np.unravel_index(int(heat.argmax()), heat.shape)]}
        if method in result.modality_share:
            entry["modality_share"] = result.modality_share[method]
        record["files"] += [map_file, f"{name}.png"]
        seeds[method] = _seed(item, "|".join(filter(None, (model_digest, weights_file[1]))), method,
                              entry, context)
        if dicom and item.datasets and heat.ndim == 2:
            if entry["empty"]:
                record["skipped"].append({"object": f"{method} secondary capture",
                                          "reason": f"the {method} map is empty (constant)"})
            else:
                try:
                    # the burnt-in caption carries the override and the training-data note too
                    burnt = title + (" | OUTSIDE INTENDED USE (override)" if note else "") + \
                        (" | UNLIKE THE TRAINING DATA: no finding" if unlike else "")
                    entry["dicom"], overlays[method] = _write_sc(item, heat, method, burnt, out, name,
                                                                 notes, 910 + number, seeds[method])
                    record["files"].append(entry["dicom"])
                except PellucidError as exc:
                    record["skipped"].append({"object": f"{method} secondary capture",
                                              "reason": str(exc)})
        record["methods"][method] = entry
    if dicom and item.datasets:
        first = next(iter(result.maps))
        heat = result.maps[first][0].cpu().numpy().astype(np.float32)
        name = card.name if card is not None and card.name else model_name  # the card's own name
        reported = ReportedModel(name, card.version if card is not None else "", model_digest,
                                 *weights_file)
        regions = None if unlike else {}  # unlike: no region said to be of anything
        if not unlike and len(item.datasets) == 1 and \
                int(getattr(item.datasets[0], "NumberOfFrames", 1) or 1) == 1:
            regions = {m: r for m, att in result.maps.items()
                       if (r := ExplainedRegion.of(att[0].cpu().numpy())) is not None}
        lines = {m: evidence.lines(m) for m in result.maps} if evidence is not None else None
        # unlike the training data: no finding, and no region said to be of a class either
        explained = None if unlike else result.explained.get("class")
        objects = _write_derived(item, heat, first, reported, found, record, out, prefix, notes,
                                 seeds[first], overlays, regions, explained, lines,
                                 sr_seed(seeds, lines, record["summary"]), result.case.segmentation)
        record["dicom_objects"] += objects
        record["files"] += objects
    if result.modality_importance is not None:
        record["modality_importance"] = result.modality_importance
    return record


def empty_map(heat: np.ndarray) -> bool:
    """A map that says nothing: constant (all zero included) or not finite."""
    return not bool(np.isfinite(heat).all()) or float(heat.max()) <= float(heat.min())


def _seed(item, model_digest: str, method: str, entry: dict, context: Any = None) -> str:
    """What the DICOM objects of a method derive their UIDs from: everything that changes their
    content (the sources, the weights, the method with its target, layer and options, the
    precision, pellucid's version, and ``context``: the card's reporting fields, the intended-use
    outcome and the training-data check, from :func:`content_context`). The same content gives
    the same UIDs (a re-run stores nothing new); other content, other UIDs."""
    from pellucid.runtime import precision_name
    from pellucid.version import __version__

    sources = [str(ds.SOPInstanceUID) for ds in item.datasets]
    return json.dumps([sources, model_digest, method, entry["target"], entry["layer"],
                       entry.get("options", {}), precision_name(), __version__, context],
                      sort_keys=True, default=str)


def content_context(card: ModelCard | None, result: CaseResult) -> dict[str, Any]:
    """The case-level content every DICOM object of a case depends on besides its method."""
    check = result.case.training_data
    return {"card": None if card is None else {
                "name": card.name, "version": card.version, "classes": card.class_names,
                "thresholds": card.thresholds, "activation": card.activation,
                "codes": {} if card.synthetic else card.finding_codes,
                "training_data": card.training_data,
                "training_inputs": card.training_inputs.get("sha256", "")},
            "intended_use": result.case.intended_use.note(),  # what the objects say of it
            "unlike_training_data": check.note(),
            # a fractional SEG is other content than a binary one (and the SR referencing it)
            **({"segmentation": "fractional"} if result.case.segmentation == "fractional" else {})}


def sr_seed(seeds: dict[str, str], lines: dict[str, list[str]] | None, summary: str) -> str:
    """The SR's UID seed: every method's seed (so another method list is another SR), the
    evidence lines it states (their content, not the run's folder) and its summary."""
    return json.dumps([sorted(seeds.items()), lines or {}, summary], sort_keys=True)


def write_map(heat: np.ndarray, affine: np.ndarray | None, out: Path, name: str) -> str:
    """A raw map: NIfTI with the source affine for a volume, ``.npy`` otherwise; the file name."""
    if affine is not None and heat.ndim == 3:
        import nibabel as nib

        nib.save(nib.Nifti1Image(heat, affine), str(out / f"{name}.nii.gz"))
        return f"{name}.nii.gz"
    np.save(out / f"{name}.npy", heat)
    return f"{name}.npy"


def _jsonable(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def _write_sc(item, heat: np.ndarray, method: str, title: str, out: Path, name: str,
              notes: list[str], series_number: int, seed: str) -> tuple[str, Any]:
    from pellucid.io import dicom_objects as objects

    rgb = objects.overlay_rgb(item.original[0].numpy(), heat, f"{method}: {title}")
    sc = objects.secondary_capture(item.datasets[0], rgb, series_number, notes=notes,
                                   uid_seed=seed + "|sc", method=method)
    file = f"{name}_overlay.dcm"
    sc.save_as(out / file)
    return file, sc


def findings(card: ModelCard | None, result: CaseResult) -> list[Finding]:
    """What the model said, class by class, judged only by its own operating points: a
    classification class is present when its probability reaches the card's threshold (chosen on
    validation); without thresholds a softmax model's arg-max class is present (its decision) and a
    sigmoid model's classes are neither present nor absent (no operating point to judge by); a
    segmentation class is present when any voxel is predicted; a regression output is a value."""
    names = list(result.classes)
    if card is None:  # no card: no task, activation or operating point to judge a finding by
        return [Finding(name, float(v), "value") for name, v in result.classes.items()]
    codes = {} if card.synthetic else card.finding_codes  # phantom classes are not clinical findings
    task = card.task
    out = []
    for k, name in enumerate(names):
        score, code = float(result.classes[name]), tuple(codes[name]) if name in codes else None
        if task == "regression":
            out.append(Finding(name, score, "value", code=code))
        elif task == "segmentation":
            out.append(Finding(name, score, "fraction", present=score > 0, code=code))
        elif len(card.thresholds) == len(names) and card.thresholds[k] is not None:
            threshold = float(card.thresholds[k])
            out.append(Finding(name, score, "probability", threshold, score >= threshold, code))
        elif len(card.thresholds) == len(names):  # this class has no operating point
            out.append(Finding(name, score, "probability", None, None, code))
        elif card.activation == "softmax":
            out.append(Finding(name, score, "probability", None, k == result.prediction["index"], code))
        else:
            out.append(Finding(name, score, "probability", None, None, code))
    return out


def summary_text(found: list[Finding], methods: list[str]) -> str:
    """The report's plain-text summary."""
    def score(f: Finding) -> str:
        label = {"probability": "p", "fraction": "fraction", "value": "value"}[f.kind]
        cut = "" if f.threshold is None else f" {'>=' if f.present else '<'} threshold {f.threshold:.2f}"
        where = f" in frame {f.frame}" if f.frame else ""
        return f"{f.name}{where} ({label} {f.score:.2f}{cut})"

    present = [score(f) for f in found if f.present]
    absent = [score(f) for f in found if f.present is False]
    undecided = [score(f) for f in found if f.present is None]
    parts = []
    if present or absent:
        parts.append(f"Present: {', '.join(present) or 'none'}. Absent: {', '.join(absent) or 'none'}.")
    if undecided:
        parts.append(f"Not judged (no operating threshold in the model card): {', '.join(undecided)}.")
    parts.append(f"Explanations: {', '.join(methods)}.")
    return " ".join(parts)


def _write_derived(item, heat: np.ndarray, method: str, model: ReportedModel, found: list[Finding],
                   record: dict, out: Path, prefix: str, notes: list[str], seed: str,
                   overlays: dict[str, Any], regions: dict[str, ExplainedRegion] | None,
                   explained: str | None, evidence: dict[str, list[str]] | None,
                   report_seed: str, kind: str = "binary") -> list[str]:
    """Parametric Map, Segmentation (``kind`` binary: the map >= half its range; fractional: the
    map scaled to [0, 1]) and SR of the first method's map. An empty (constant) map gives no PM
    and no SEG (they would store nothing as if it were a finding); the SR then says so."""
    from pellucid.io import dicom_objects as objects

    written, source = [], item.datasets
    frames = heat if heat.ndim == 3 else heat[None]
    pmap = seg = None
    if empty_map(frames):
        reason = f"the {method} map is empty (constant): no region to store"
        record["skipped"] += [{"object": "parametric map", "reason": reason},
                              {"object": "segmentation", "reason": reason}]
        notes = [*notes, f"The {method} explanation map is empty (constant); no Parametric Map or "
                         f"Segmentation was made."]
    else:
        lo, hi = float(frames.min()), float(frames.max())
        try:
            pmap = objects.parametric_map(source, frames, method, notes=notes,
                                          uid_seed=seed + "|pm")
            pmap.save_as(out / f"{prefix}parametric_map.dcm")
            written.append(f"{prefix}parametric_map.dcm")
        except PellucidError as exc:
            record["skipped"].append({"object": "parametric map", "reason": str(exc)})
        try:
            scaled = (frames - lo) / (hi - lo)  # fractional: the scaled map; binary: its upper half
            seg = objects.segmentation(source, scaled if kind == "fractional" else scaled >= 0.5,
                                       f"{method} region", kind=kind, notes=notes,
                                       uid_seed=seed + "|seg", model=model, finding=explained,
                                       method=method)
            seg.save_as(out / f"{prefix}segmentation.dcm")
            written.append(f"{prefix}segmentation.dcm")
        except PellucidError as exc:
            record["skipped"].append({"object": "segmentation", "reason": str(exc)})
    methods = {m: {"layer": e["layer"], "target": json.dumps(e["target"], default=str), **e["options"]}
               for m, e in record["methods"].items()}
    sr = objects.structured_report(source, model, found, methods, pmap, seg, overlays, notes=notes,
                                   summary=record["summary"], uid_seed=report_seed + "|sr",
                                   regions=regions, explained=explained, evidence=evidence)
    sr.save_as(out / f"{prefix}report_sr.dcm")
    written.append(f"{prefix}report_sr.dcm")
    # the images with findings, flagged (IHE AIR): the image; of a volume, the slice at the map's
    # peak (an empty map has none: then every slice, not one picked at random)
    key = list(source)
    if len(source) > 1 and len(source) == frames.shape[0] and not empty_map(frames):
        key = [source[int(np.unravel_index(int(frames.argmax()), frames.shape)[0])]]
    written += write_key_objects(key, model, found, [sr, seg, pmap], notes, record, out,
                                 prefix, report_seed + "|kos")
    return written


def write_key_objects(key_images: list[Any], model: ReportedModel, found: list[Finding],
                      derived: list[Any], notes: list[str], record: dict, out: Path, prefix: str,
                      seed: str) -> list[str]:
    """The Key Object Selection of the images with a present finding (and the objects made from
    them); none, said in ``record["skipped"]``, when the model stated no finding present."""
    from pellucid.io import dicom_objects as objects

    if not any(f.present for f in found):
        record["skipped"].append({"object": "key object selection",
                                  "reason": "no finding present: no image to flag"})
        return []
    try:
        kos = objects.key_object_selection(key_images, model, found,
                                           [o for o in derived if o is not None], notes,
                                           uid_seed=seed)
    except PellucidError as exc:
        record["skipped"].append({"object": "key object selection", "reason": str(exc)})
        return []
    kos.save_as(out / f"{prefix}key_objects.dcm")
    return [f"{prefix}key_objects.dcm"]
