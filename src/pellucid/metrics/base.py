"""The metric registry and what every metric shares: the evaluation context (model, inputs,
explanation, target, ground truth) and the per-sample result (NaN = sample excluded)."""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pellucid.registry import Registry

CATEGORIES = ("faithfulness", "localization", "robustness", "randomization", "complexity", "cost")
# what a metric's numbers are for in a benchmark's answer (bench/stats.py):
# - quality: faithfulness and localisation; compared with the trivial baselines (a verdict) and
#   across methods (the ranking and the recommendation);
# - sanity: randomisation checks; pass or fail by their own criterion, never against a baseline
#   (a baseline does not depend on the model at all);
# - property: robustness, complexity, sparseness, cost; reported beside quality, never "beaten"
#   and never part of a quality ranking (a constant map is perfectly robust and costs nothing).
ROLES = ("quality", "sanity", "property")
# the role each category's metrics take (checked at registration: a metric declares its role)
CATEGORY_ROLES = {"faithfulness": "quality", "localization": "quality", "randomization": "sanity",
                  "robustness": "property", "complexity": "property", "cost": "property"}
# what a metric may need beyond the attributions: the model, ground-truth masks (or boxes turned
# into masks), the boxes themselves, a way to re-explain, the Explanation object, per-channel maps
NEEDS = {"model": "the model", "mask": "ground truth (masks= or boxes=)",
         "boxes": "ground-truth boxes (boxes=)", "explainer": "an explainer, it re-explains (pass an "
         "Explanation or explain_fn=)", "explanation": "the Explanation object, not a bare tensor",
         "channel_maps": "per-channel maps of a multi-channel input"}


@dataclass
class MetricResult:
    """Per-sample scores (B,), NaN where a sample is excluded (e.g. no ground truth)."""

    name: str
    scores: torch.Tensor
    curves: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the metric (set by evaluate)
    higher_is_better: bool | None = None  # the metric's direction (set by evaluate)

    def mean(self) -> float:
        valid = self.scores[~torch.isnan(self.scores)]
        return float(valid.mean()) if valid.numel() else float("nan")


# explain_fn(model, inputs, bound_target) -> attributions (N, *spatial): re-explains perturbed
# inputs (robustness) or a randomised model (randomisation) with the same method and options.
ExplainFn = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]


@dataclass
class Context:
    """What a metric may use. ``masks`` are (B, *spatial) booleans at input resolution; ``boxes``
    the per-sample (N, 4) x0, y0, x1, y1 boxes when given as boxes."""

    model: nn.Module | None
    inputs: torch.Tensor
    attributions: torch.Tensor  # (B, *spatial)
    target: Any
    masks: torch.Tensor | None = None
    boxes: list[torch.Tensor] | None = None
    explanation: Any = None
    explain_fn: ExplainFn | None = None
    cache: dict[Any, Any] = field(default_factory=dict)  # work shared between metrics and calls
    _checked: bool = field(default=False, init=False, repr=False)
    _map_digest: str | None = field(default=None, init=False, repr=False)

    def shared(self, key: tuple, compute: Callable[[], Any], per_map: bool = True) -> Any:
        """``compute()``, memoised in ``cache`` under ``key``. ``per_map=True``: work that reads the
        attributions, shared between the metrics of one map; ``per_map=False``: work that depends on
        the model, inputs and target only (the clean forward, faithfulness correlation's random
        subsets), shared by every map of the same cases evaluated with the same ``cache``. A cache
        filled for other inputs, target or model weights is emptied first, never reused."""
        if not self._checked:
            owner = digest(_weights_key(self.model), self.inputs, self.target)
            if self.cache.get(_OWNER) != owner:
                self.cache.clear()
                self.cache[_OWNER] = owner
            self._checked = True
        if per_map:
            if self._map_digest is None:
                self._map_digest = digest(self.attributions)
            key = (*key, self._map_digest)
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


_OWNER = "inputs, target and model the cache was filled for"


def _weights_key(model: nn.Module | None) -> tuple:
    if model is None:
        return ()
    return (id(model), *((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values()))


def _feed(h: Any, part: Any) -> None:
    if isinstance(part, torch.Tensor):
        t = part.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif dataclasses.is_dataclass(part) and not isinstance(part, type):
        h.update(type(part).__name__.encode())
        for f in dataclasses.fields(part):
            _feed(h, getattr(part, f.name))
    elif isinstance(part, (tuple, list)):
        h.update(b"(")
        for item in part:
            _feed(h, item)
        h.update(b")")
    else:
        h.update(repr(part).encode())


def digest(*parts: Any) -> str:
    """A content digest (BLAKE2b) of tensors (dtype, shape, bytes), dataclasses (their fields) and
    plain values (repr): equal for equal content whatever the objects' identity."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


class Metric(ABC):
    """Base class: declares its category, direction and needs ("model", "mask", "boxes",
    "explainer", "explanation", "channel_maps": per-channel maps of a multi-channel input)."""

    name: ClassVar[str]
    category: ClassVar[str]
    role: ClassVar[str]  # "quality", "sanity" or "property" (ROLES)
    higher_is_better: ClassVar[bool]
    needs: ClassVar[frozenset[str]] = frozenset()
    # how the benchmark report shows it: a mean-curve chart (the x-axis label) for metrics whose
    # results carry curves; the order in which metrics are tried to pick the best and worst cases of
    # the gallery (lower first; None: never); a dedicated panel ("randomization")
    report_curve: ClassVar[str | None] = None
    gallery_rank: ClassVar[int | None] = None
    report_panel: ClassVar[str | None] = None

    @abstractmethod
    def compute(self, ctx: Context) -> MetricResult:
        """Score every sample of the context."""

    def is_higher_better(self) -> bool:
        """The direction of this instance's scores: the class's, unless its options change it."""
        return type(self).higher_is_better

    def row_extra(self, result: MetricResult, i: int) -> dict[str, Any] | None:
        """What the benchmark keeps of sample ``i``'s result beyond its score (JSON-able), or None."""
        return None


def unmet_needs(metric: Metric | type[Metric], available: set[str]) -> list[str]:
    """The needs of ``metric`` not in ``available`` (the one place that reads ``needs``)."""
    return [n for n in sorted(metric.needs) if n not in available]


def _check(cls: type) -> None:
    if getattr(cls, "category", None) not in CATEGORIES:
        raise ValueError(f"{cls.__name__}: category must be one of {CATEGORIES}")
    role = getattr(cls, "role", None)
    if role not in ROLES:
        raise ValueError(f"{cls.__name__}: declare role, one of {ROLES}")
    if role != CATEGORY_ROLES[cls.category]:
        raise ValueError(f"{cls.__name__}: a {cls.category} metric has role "
                         f"{CATEGORY_ROLES[cls.category]!r}, not {role!r}")
    if cls.report_panel not in (None, "randomization"):
        raise ValueError(f"{cls.__name__}: report_panel must be None or 'randomization'")
    if not isinstance(getattr(cls, "higher_is_better", None), bool):
        raise ValueError(f"{cls.__name__}: declare higher_is_better (True or False)")
    unknown = set(getattr(cls, "needs", frozenset())) - set(NEEDS)
    if unknown:
        raise ValueError(f"{cls.__name__}: needs {sorted(unknown)} is not in {sorted(NEEDS)}")


REGISTRY: Registry = Registry("metric", _check)
register = REGISTRY.register


def available() -> list[dict[str, Any]]:
    """Every metric: name, category, direction, needs and a one-line summary."""
    return [{"name": n, "category": c.category, "role": c.role,
             "higher_is_better": c.higher_is_better,
             "needs": sorted(c.needs), "summary": (c.__doc__ or "").strip().splitlines()[0]}
            for n, c in REGISTRY.items()]


def create(name: str, **options: Any) -> Metric:
    """Instantiate metric ``name`` with ``options``; unknown names or options are errors."""
    return REGISTRY.create(name, **options)
