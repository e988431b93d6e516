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
from pellucid.pipeline.outputs import write_case


def explain_files(loaded, inputs: Sequence[Path], options: CaseOptions, out: Path) -> list[dict[str, Any]]:
    """Explain each of ``inputs``; returns the records also written to ``out/summary.json``."""
    options.check()
    if options.truth is not None and len(inputs) != 1:
        raise ConfigError("--truth goes with exactly one --input")
    evidence = load_options_evidence(loaded, options)
    loaded = prepare_model(loaded, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, images, grid_maps = [], [], {m: [] for m in options.methods}
    for path in inputs:
        case = read_case(loaded, Path(path), options)
        result = explain_case(loaded, case, options)
        summary.append({"input": str(path), **write_case(result, out, stem=case.item.name, card=loaded.card,
                                                         evidence=evidence)})
        images.append(case.item.original)
        for m, att in result.maps.items():
            grid_maps[m].append(att)
    if len(inputs) > 1 or len(options.methods) > 1:
        viz.save(viz.grid(images, grid_maps, [Path(p).name for p in inputs]), out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
