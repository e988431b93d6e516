"""``pellucid explain --input``: explain each file with each method into one folder: the case
outputs of :func:`pellucid.pipeline.write_case` named after each file, a cases x methods grid and
``summary.json`` (one record per file)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pellucid import viz
from pellucid.errors import ConfigError
from pellucid.pipeline.case import CaseOptions, explain_case, prepare_model, read_case
from pellucid.pipeline.evidence import load_options_evidence
from pellucid.pipeline.frames import multiframe_for_2d, read_frames, write_frames
from pellucid.pipeline.outputs import write_case


def explain_files(loaded, inputs: Sequence[Path], options: CaseOptions, out: Path,
                  dicom: bool = False, model_name: str = "") -> list[dict[str, Any]]:
    """Explain each of ``inputs``; returns the records also written to ``out/summary.json``.
    ``dicom``: for DICOM input also the DICOM objects (overlays, Parametric Map, Segmentation,
    SR), with the UIDs ``--pacs`` would give them; ``model_name`` names the model in them when
    its card does not."""
    options.check()
    if options.truth is not None and len(inputs) != 1:
        raise ConfigError("--truth goes with exactly one --input")
    evidence = load_options_evidence(loaded, options)
    loaded = prepare_model(loaded, options)
    digest = loaded.digest() if dicom else ""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, images, grid_maps = [], [], {m: [] for m in options.methods}
    for path in inputs:
        if multiframe_for_2d(loaded, Path(path)):  # each frame of a multi-frame image on its own
            results = [explain_case(loaded, case, options)
                       for case in read_frames(loaded, Path(path), options)]
            summary.append({"input": str(path), **write_frames(
                results, out, Path(path).stem, dicom, model_name, digest, loaded.card, evidence,
                loaded.stored())})
        else:
            results = [explain_case(loaded, read_case(loaded, Path(path), options), options)]
            summary.append({"input": str(path), **write_case(
                results[0], out, stem=results[0].case.item.name, dicom=dicom,
                model_name=model_name, model_digest=digest, card=loaded.card,
                evidence=evidence, weights_file=loaded.stored())})
        if dicom and not results[0].case.item.datasets:  # said, not silently left out
            summary[-1]["skipped"].append({"object": "DICOM objects",
                                           "reason": "--dicom: the input is not DICOM"})
        for result in results:
            images.append(result.case.item.original)
            for m, att in result.maps.items():
                grid_maps[m].append(att)
    if len(images) > 1 or len(options.methods) > 1:
        names = [r.get("input", "") for r in summary for _ in r.get("frames", [r])]
        names = [f"{Path(n).name} {k + 1}" if names.count(n) > 1 else Path(n).name
                 for k, n in enumerate(names)]
        viz.save(viz.grid(images, grid_maps, names), out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
