"""Work units: one batch of (case, target) pairs explained by one method and scored by every
applicable metric. A unit is self-contained (tensors, model folder, options), so the local loop and
Ray tasks run the same function and give the same rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid.bench.cache import CacheError, load_explanation, save_explanation
from pellucid.bench.config import Entry
from pellucid.errors import PellucidError
from pellucid.metrics.base import unmet_needs
from pellucid.progress import warn

# model folder -> LoadedModel, per process: the last few only, so that a long-lived process (a Ray
# worker, a notebook running one benchmark after another) does not keep every model it ever ran,
# with the exports and sessions that hang off each
_MODELS: OrderedDict[str, Any] = OrderedDict()
_MODELS_KEPT = 4
_SHARED: OrderedDict[str, dict] = OrderedDict()  # metric work shared by the units of one case set


def release() -> None:
    """Forget the models and the shared metric work of a finished run: a process that runs one
    benchmark after another (a notebook, a test session, a Ray worker) keeps nothing of the last
    run (a test worker had grown to 15 GB)."""
    _MODELS.clear()
    _SHARED.clear()


def shared_metric_work(unit: Unit) -> dict:
    """The evaluate() cache of the unit's model and cases: units of different methods on the same
    cases share the clean forward and the map-independent perturbations (faithfulness correlation,
    infidelity); evaluate() empties it if the inputs or target differ after all. The last 8 case
    sets are kept (a few small tensors each)."""
    key = json.dumps([unit.model_folder, unit.dataset, unit.case_ids, unit.classes.tolist(),
                      unit.region, unit.sliding_window], sort_keys=True, default=str)
    if key in _SHARED:
        _SHARED.move_to_end(key)
    else:
        _SHARED[key] = {}
        while len(_SHARED) > 8:
            _SHARED.popitem(last=False)
    return _SHARED[key]


@dataclass
class Unit:
    key: str
    model: str
    model_folder: str
    dataset: str
    method: Entry
    metrics: list[Entry]
    x: torch.Tensor  # (N, C, *spatial), normalised for the model
    classes: torch.Tensor  # (N,) class or channel index explained
    target_names: list[str]
    case_ids: list[str]
    masks: torch.Tensor | None  # (N, *spatial) bool, or None when the dataset has none
    boxes: list[torch.Tensor] | None
    region: str = "predicted"
    truth_regions: torch.Tensor | None = None  # the lesion masks: region truth, fp, fn
    layer: str | None = None
    reference: float | None = None  # regression: explain output - reference
    sliding_window: dict[str, Any] | None = None
    seed: int = 0
    cache_dir: str | None = None
    supplies: dict[str, torch.Tensor] = field(default_factory=dict)  # what the method requires
    skipped: dict[str, str] = field(default_factory=dict)  # metric label -> reason


def _device() -> str:
    """A GPU when this process sees one (a Ray task given a GPU), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def with_window(loaded, sliding_window: dict[str, Any] | None):
    """The model wrapped for sliding-window inference when the task's spec asks for it."""
    from pellucid.models.sliding import windowed

    if not sliding_window:
        return loaded
    w = sliding_window
    return windowed(loaded, w["roi_size"], float(w.get("overlap", 0.25)), int(w.get("batch_size", 4)),
                    w.get("mode", "gaussian"))


def _load(folder: str, sliding_window: dict[str, Any] | None = None):
    from pellucid.models import load_model

    key = json.dumps([folder, sliding_window], sort_keys=True)
    if key in _MODELS:
        _MODELS.move_to_end(key)
    else:
        _MODELS[key] = with_window(load_model(folder, device=_device()), sliding_window)
        while len(_MODELS) > _MODELS_KEPT:
            _MODELS.popitem(last=False)
    return _MODELS[key]


def _to_device(unit: Unit) -> Unit:
    device = _device()
    if unit.x.device.type == device:
        return unit
    move: dict[str, Any] = {k: getattr(unit, k).to(device) for k in ("x", "classes", "masks",
                                                                     "truth_regions")
                            if getattr(unit, k) is not None}
    if unit.boxes is not None:
        move["boxes"] = [b.to(device) for b in unit.boxes]
    move["supplies"] = {k: v.to(device) for k, v in unit.supplies.items()}
    return dataclasses.replace(unit, **move)


def _target(unit: Unit, card):
    from pellucid.pipeline.resolve import card_target

    return card_target(card, unit.classes, unit.region, unit.truth_regions, unit.reference)


def _options(unit: Unit) -> dict[str, Any]:
    """The method's options, with what its class ``requires`` taken from the unit's supplies."""
    from pellucid.explainers.registry import REGISTRY

    options = dict(unit.method.options)
    options.pop("layer", None)  # a method's own layer (e.g. Grad-CAM at several depths)
    for need in REGISTRY.get(unit.method.name).requires:
        if need not in options:
            if need not in unit.supplies:
                raise PellucidError(f"{unit.method.name} requires {need!r}; the runner gives none")
            options[need] = unit.supplies[need]
    return options


def _cache_entry(unit: Unit) -> tuple[Path, str] | None:
    """The unit's cache file and the identity text it is stored under and checked against: what
    the explanation depends on (model, cases, targets, method and options, seed, region, layer,
    reference, sliding window, precision)."""
    if not unit.cache_dir:
        return None
    from pellucid.runtime import precision_name

    text = json.dumps([unit.model, unit.dataset, unit.case_ids, unit.classes.tolist(),
                       unit.method.name, unit.method.options, unit.seed, unit.region, unit.layer,
                       unit.reference, unit.sliding_window, precision_name()],
                      sort_keys=True, default=str)
    name = f"{hashlib.sha1(text.encode()).hexdigest()[:20]}.safetensors"
    return Path(unit.cache_dir) / name, text


def explain_unit(unit: Unit, loaded):
    """The unit's explanation, from the on-disk cache when it is there and verified (see
    :mod:`pellucid.bench.cache`: nothing in it is unpickled); a bad entry is moved aside, said in
    one line, and recomputed."""
    import pellucid

    entry = _cache_entry(unit)
    path, identity = entry if entry is not None else (None, "")
    if path is not None and path.is_file():
        try:
            return load_explanation(path, identity)
        except CacheError as exc:
            aside = path.with_name(path.name + ".bad")
            path.replace(aside)
            warn(f"cache entry {path.name} not used ({exc}); moved to {aside.name}, recomputing")
    layer = unit.method.options.get("layer", unit.layer)
    explanation = pellucid.explain(loaded, unit.x, unit.method.name, target=_target(unit, loaded.card),
                                   layer=layer, check_inputs=False, **_options(unit))
    explanation.output = None
    if path is not None:
        try:
            save_explanation(path, explanation, identity)
        except CacheError as exc:  # an extra that has no safe encoding: not cached
            warn(f"explanation of {unit.method.label} not cached ({exc})")
    return explanation


def _applicable(unit: Unit, metric: Entry) -> str | None:
    """None if the metric applies to this unit, else the reason it is skipped."""
    from pellucid.metrics.base import REGISTRY

    if metric.label in unit.skipped:
        return unit.skipped[metric.label]
    if metric.only_models and unit.model not in metric.only_models:
        return "skipped by the configuration (only_models)"
    if metric.only_methods and unit.method.label not in metric.only_methods:
        return "skipped by the configuration (only_methods)"
    if unit.method.label in metric.skip_methods:
        return "skipped by the configuration (skip_methods)"
    from pellucid.explainers.registry import REGISTRY as METHODS

    if REGISTRY.get(metric.name).role == "sanity" and METHODS.get(unit.method.name).family == "baseline":
        return "a trivial baseline does not depend on the model: no sanity check to pass"
    missing = unmet_needs(REGISTRY.get(metric.name), available_needs(unit))
    if not missing:
        return None
    if missing[0] == "boxes" and unit.boxes is not None:
        return "boxes are defined for 2D images"
    if missing[0] == "channel_maps" and unit.x.shape[1] < 2:
        return "needs a multi-channel (multi-modal) input"
    return NEED_REASONS[missing[0]]


NEED_REASONS = {"mask": "the dataset has no ground-truth masks",
                "boxes": "the dataset has no ground-truth boxes",
                "channel_maps": "needs per-modality maps; this method gives one map for all channels",
                "model": "the model is not available", "explainer": "the method cannot re-explain",
                "explanation": "the explanation is not available"}


def available_needs(unit: Unit) -> set[str]:
    """What the unit offers a metric (the vocabulary of ``pellucid.metrics.base.NEEDS``)."""
    from pellucid.explainers.registry import REGISTRY

    offered = {"model", "explainer", "explanation"}
    if unit.masks is not None:
        offered.add("mask")
    if unit.boxes is not None and unit.x.ndim == 4:
        offered.add("boxes")
    if unit.x.shape[1] > 1 and REGISTRY.get(unit.method.name).channel_maps:
        offered.add("channel_maps")
    return offered


def execute_unit(unit: Unit) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Explain the unit's cases once and score them with every applicable metric; rows of the tidy
    table and the maps (float16) for the report's gallery."""
    import pellucid

    seed = (unit.seed + zlib.crc32(unit.key.encode())) % 2**31
    from pellucid.runtime import seed_everything

    seed_everything(seed)
    loaded = _load(unit.model_folder, unit.sliding_window)
    unit = _to_device(unit)
    n = unit.x.shape[0]
    from pellucid.explainers.registry import REGISTRY

    base = {"dataset": unit.dataset, "model": unit.model, "method": unit.method.label,
            "family": REGISTRY.get(unit.method.name).family, "seed": unit.seed}
    explanation, failure = None, None
    try:
        explanation = explain_unit(unit, loaded)
    except PellucidError as exc:
        failure = f"explanation failed: {exc}"
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    if explanation is not None:
        todo = []
        for metric in unit.metrics:
            reason = _applicable(unit, metric)
            if reason:
                reasons[metric.label] = reason
            else:
                todo.append(metric)
        shared = shared_metric_work(unit)  # the clean forward and other map-independent work
        for metric in todo:  # one evaluate() per metric keeps a failing metric from hiding others
            try:
                out = pellucid.evaluate(loaded, unit.x, explanation,
                                        metrics=[(metric.name, metric.options)],
                                        masks=unit.masks, boxes=unit.boxes, cache=shared)
                results[metric.label] = out[metric.name]
            except PellucidError as exc:
                reasons[metric.label] = f"error: {exc}"
    cost = explanation.cost if explanation is not None else None
    stride = map_stride(explanation, unit.x) if explanation is not None else float("nan")
    conservation = [float("nan")] * n  # LRP: relevance sum / explained score per sample
    if explanation is not None and "conservation" in explanation.extras:
        conservation = [float(v) for v in torch.as_tensor(explanation.extras["conservation"])
                        .detach().float().cpu().reshape(-1)[:n].tolist()]
    from pellucid.metrics import create

    for metric in unit.metrics:
        proto = create(metric.name, **metric.options)
        r = results.get(metric.label)
        for i in range(n):
            row = dict(base, case_id=unit.case_ids[i], target=unit.target_names[i],
                       class_index=int(unit.classes[i]), metric=metric.label, metric_name=metric.name,
                       category=proto.category, higher_is_better=proto.is_higher_better(),
                       value=float("nan"), reason=failure or reasons.get(metric.label, ""),
                       explain_seconds=cost.seconds / n if cost else float("nan"),
                       forwards_per_case=cost.forward_samples / n if cost else float("nan"),
                       backward_passes=cost.backward_passes if cost else 0,
                       peak_memory_bytes=float(cost.peak_memory_bytes)
                       if cost and cost.peak_memory_bytes is not None else float("nan"),
                       work_ratio=cost.work_ratio if cost and cost.work_ratio is not None
                       else float("nan"),
                       metric_seconds=r.seconds / n if r is not None else float("nan"),
                       map_stride=stride, conservation=conservation[i], curve=None, extra="")
            if r is not None:
                value = float(r.scores[i])
                row["value"] = value
                if math.isnan(value) and not row["reason"]:
                    row["reason"] = "excluded (undefined here: no ground truth, or an empty map)"
                if r.curves is not None:
                    row["curve"] = [float(v) for v in r.curves[i].tolist()]
                extra = proto.row_extra(r, i)
                if extra:
                    row["extra"] = json.dumps(extra, default=float)
            rows.append(row)
    maps = {}
    if explanation is not None:
        a = explanation.attributions[:, 0].detach().float().cpu()
        if a.ndim == 4:  # 3D: the axial slice through the middle of the region of interest
            a = torch.stack([v[focus_slice(unit.masks[i] if unit.masks is not None else None, v.shape[0])]
                             for i, v in enumerate(a)])
        maps = {"attributions": a.numpy().astype(np.float16)}
        raw = explanation.raw
        if raw is not None and raw.ndim == unit.x.ndim and raw.shape[:2] == unit.x.shape[:2] \
                and unit.x.shape[1] > 1 and "channel_maps" in available_needs(unit):
            share = raw.detach().float().clamp_min(0).flatten(2).sum(2)
            share = share / share.sum(1, keepdim=True).clamp_min(1e-30)
            maps["channel_share"] = share.cpu().numpy().astype(np.float32)
    return rows, maps


def map_stride(explanation, x: torch.Tensor) -> float:
    """Input pixels per map pixel along the first spatial axis: the CAM layer's downsampling (the
    finest fused layer for fused CAMs), 1 for maps computed at input resolution."""
    shapes = explanation.extras.get("map_shapes")
    if shapes:
        return float(min(x.shape[2] / s[0] for s in shapes))
    raw = explanation.raw
    if explanation.layer and raw is not None and raw.ndim >= x.ndim - 1:
        return float(x.shape[2] / raw.shape[raw.ndim - (x.ndim - 2)])
    return 1.0


def focus_slice(mask: torch.Tensor | None, depth: int) -> int:
    """The axial slice a 3D case is shown at: the middle of its mask's extent, else the middle."""
    if mask is not None and mask.any():
        zs = torch.nonzero(mask.flatten(1).any(1)).flatten()
        return int(zs[len(zs) // 2])
    return depth // 2
