"""A 2D model on a multi-frame image (an enhanced MR or CT, a cine): every frame is a case of its
own, read, checked and normalised as a single image would be, explained with every method; the
maps are stacked frame by frame, so that the Parametric Map and the Segmentation reference each
frame of the source, and the SR states what the model said of each frame (its groups reference
the frame they are about). Overlays (Secondary Capture) are per image and are not made: the
multi-frame's maps are in its Parametric Map."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pellucid.data.inputs import InputImage, _reader_units
from pellucid.data.transforms import resize_image
from pellucid.errors import DataError, PellucidError
from pellucid.io.reading import MedicalImage, read
from pellucid.pipeline.case import Case, CaseOptions, CaseResult
from pellucid.pipeline.intended_use import check_intended_use, check_training_data
from pellucid.pipeline.resolve import card_target, class_index


def multiframe_for_2d(loaded, path: Path) -> bool:
    """Whether ``path`` is one multi-frame DICOM instance and the model takes 2D images."""
    if loaded.card is None or loaded.card.spatial_dims != 2 or Path(path).is_dir() \
            or Path(path).suffix.lower() not in (".dcm", ".dicom"):
        return False
    import pydicom

    from pellucid.io.codestreams import check_deflated

    check_deflated(Path(path))
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:
        return False
    return int(getattr(ds, "NumberOfFrames", 1) or 1) > 1


def read_frames(loaded, path: Path, options: CaseOptions) -> list[Case]:
    """One case per frame of the multi-frame ``path`` for the 2D ``loaded`` model."""
    card = loaded.card
    source = read(path, spatial_dims=3)
    if source.kind != "dicom" or source.array.ndim != 4:
        raise DataError(path, "not a multi-frame DICOM image")
    _, dr, dc = source.spacing
    cases = []
    for k in range(source.array.shape[1]):
        frame = MedicalImage(source.array[:, k].clone(), (dr, dc), None, "dicom", source.path,
                             source.datasets)
        use = check_intended_use(card, frame, options.outside_intended_use)
        original = _reader_units(frame, card.in_channels, 2)
        if original.shape[0] != card.in_channels:
            original = original.repeat(card.in_channels, 1, 1)
        image = resize_image(original, card.input_size, card.resize) if card.input_size else original
        item = InputImage(frame, original.float(), image.float(), f"{Path(path).stem}_frame{k + 1:04d}")
        target = card_target(card, class_index(card, options.target), options.region, None,
                             options.reference)
        x = card.normalize(item.image[None])
        check = check_training_data(loaded, x, frame, use)
        cases.append(Case(item, x, target, use, check, options.segmentation))
    return cases


def write_frames(results: list[CaseResult], out: Path, stem: str, dicom: bool, model_name: str,
                 model_digest: str, card, evidence=None, weights_file: tuple[str, str] = ("", "")
                 ) -> dict[str, Any]:
    """Per frame the record :func:`write_case` writes (maps and overlays as PNG, no DICOM), then
    for DICOM the Parametric Map and Segmentation of the first method's stacked maps and one SR
    with every frame's findings. Returns {"frames": [records], "dicom_objects", "files",
    "skipped"}."""
    from pellucid.io import dicom_objects as objects
    from pellucid.pipeline.outputs import (
        _seed,
        content_context,
        empty_map,
        findings,
        sr_seed,
        summary_text,
        write_case,
        write_key_objects,
    )

    out = Path(out)
    records = [write_case(r, out, stem=r.case.item.name, card=card, evidence=evidence)
               for r in results]
    record: dict[str, Any] = {"frames": records, "files": [f for r in records for f in r["files"]],
                              "dicom_objects": [], "skipped": []}
    source = results[0].case.item.datasets
    if not dicom or not source:
        return record
    methods = list(results[0].maps)
    first = methods[0]
    stacked = np.stack([r.maps[first][0].cpu().numpy().astype(np.float32) for r in results])
    found = []
    unlike = []
    for number, r in enumerate(results, start=1):
        if r.case.training_data.unlike:  # no finding is stated for a frame unlike the training data
            unlike.append(number)
            continue
        found += [objects.Finding(**{**asdict(f), "frame": number}) for f in findings(card, r)]
    note = results[0].case.intended_use.note()
    notes = [note] if note else []
    if unlike:
        notes.append(f"INPUT UNLIKE THE TRAINING DATA in frame(s) {', '.join(map(str, unlike))}: "
                     f"no finding is stated for them")
    entry = {"target": {"frames": len(results)}, "layer": records[0]["methods"][first]["layer"]}
    context = [content_context(card, r) for r in results]
    digest = "|".join(filter(None, (model_digest, weights_file[1])))
    name = card.name if card is not None and card.name else model_name
    reported = objects.ReportedModel(name, card.version if card is not None else "", model_digest,
                                     *weights_file)
    explained = next((r.explained.get("class") for r in results
                      if not r.case.training_data.unlike), None)
    seeds = {m: _seed(results[0].case.item, digest, m,
                      {**entry, "options": records[0]["methods"][m]["options"]}, context) + "|frames"
             for m in methods}
    seed = seeds[first]
    pmap = seg = None
    if all(empty_map(m) for m in stacked):
        reason = f"the {first} maps of every frame are empty (constant)"
        record["skipped"] += [{"object": "parametric map", "reason": reason},
                              {"object": "segmentation", "reason": reason}]
        notes.append(f"The {first} explanation maps are empty (constant); no Parametric Map or "
                     f"Segmentation was made.")
    else:
        seg_kind = results[0].case.segmentation
        lo = stacked.min(axis=(1, 2), keepdims=True)
        span = np.maximum(stacked.max(axis=(1, 2), keepdims=True) - lo, 1e-30)
        for kind, build in (("parametric map", lambda: objects.parametric_map(
                                source, stacked, first, notes=notes, uid_seed=seed + "|pm")),
                            ("segmentation", lambda: objects.segmentation(
                                source, (stacked - lo) / span if seg_kind == "fractional"
                                else (stacked - lo) / span >= 0.5, f"{first} region", kind=seg_kind,
                                notes=notes,
                                uid_seed=seed + "|seg", model=reported, finding=explained,
                                method=first))):
            try:
                obj = build()
            except PellucidError as exc:
                record["skipped"].append({"object": kind, "reason": str(exc)})
                continue
            name = f"{stem}_{kind.replace(' ', '_')}.dcm"
            obj.save_as(out / name)
            record["dicom_objects"].append(name)
            pmap, seg = (obj, seg) if kind == "parametric map" else (pmap, obj)
    record["skipped"].append({"object": "secondary capture", "reason": "an overlay is one image; a "
                              "multi-frame image's maps are in its Parametric Map"})
    options = {m: {"layer": records[0]["methods"][m]["layer"],
                   "target": json.dumps(records[0]["methods"][m]["target"], default=str),
                   **records[0]["methods"][m]["options"]} for m in methods}
    lines = {m: evidence.lines(m) for m in methods} if evidence is not None else None
    sr = objects.structured_report(source, reported, found, options, pmap, seg, None, notes=notes,
                                   summary=f"{len(results)} frames, each explained on its own. "
                                           + summary_text(found, methods),
                                   uid_seed=sr_seed(seeds, lines, summary_text(found, methods))
                                   + "|sr", evidence=lines)
    sr.save_as(out / f"{stem}_report_sr.dcm")
    record["dicom_objects"].append(f"{stem}_report_sr.dcm")
    record["dicom_objects"] += write_key_objects(
        [source[0]], reported, found, [sr, seg, pmap], notes, record, out, f"{stem}_",
        sr_seed(seeds, lines, summary_text(found, methods)) + "|kos")
    record["files"] += record["dicom_objects"]
    return record
