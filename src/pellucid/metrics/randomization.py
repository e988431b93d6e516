"""Randomisation sanity checks: an explanation that does not change when the model's learned
parameters or the explained class change cannot be explaining the model.

- ``model_randomization``: cascading model-parameter randomisation (Adebayo et al. 2018). A copy of
  the model is re-initialised from the output towards the input, one step at a time (each module's
  own ``reset_parameters`` after ``torch.manual_seed(seed + 1)``, as Quantus' ``MPRT``); a step is
  one block (modules sharing the first ``depth`` parts of their dotted name, e.g. ``layer4.1``;
  ``depth="auto"``: the smallest depth giving at least five blocks) or
  one layer (``granularity="layer"``: Quantus' steps). After every step the explanation is re-run
  on the same inputs and target and compared with the original by Spearman (signed and absolute),
  SSIM and HOG similarity. The score is the ``similarity`` after the last step (lower is better).
  ``skip_layers=True`` (Quantus' ``MPRT(skip_layers=True)``) explains only after the last step:
  the same score (each module is reset from the same seed whatever the order), one explanation
  instead of one per step, and a curve of one point.
  Arun et al. 2021's *randomisation baseline* is the mean similarity of ``baseline_pairs`` random
  pairs of original maps of different images; a sample passes when its last-step similarity falls
  below it.
- ``efficient_mprt`` (eMPRT, Hedström et al. 2024): the relative rise of the map's discrete entropy
  (``bins`` equal-width bins of its values, natural log) when every module of the model is
  re-initialised, (H(a_random) - H(a)) / H(a), as Quantus' ``EfficientMPRT`` (its defaults:
  bottom-up order, all layers at once, no normalisation). Higher is better: a map of a random
  network should be noisier. A sample passes when its score is above 0; a constant original map
  (zero entropy) has no relative rise and is excluded (NaN), where Quantus reports inf.
- ``smooth_mprt`` (sMPRT, Hedström et al. 2024): cascading randomisation, layer by layer from the
  input up (Quantus' default order), of a *smoothed* explanation: the mean of the method's maps of
  ``samples`` noisy copies of the input (noise std ``noise`` x the sample's value range, drawn from
  numpy's ``RandomState(seed)`` in Quantus' order; the last copy noise-free), compared with the
  original map by Spearman's correlation of absolute values (Quantus' ``SmoothMPRT``: normalised
  and absolute maps). Smoothing removes the shattered-gradient noise that makes plain MPRT pass
  noisy methods. The score is the similarity after the last step (lower is better), the mean
  over the original and every step is ``extras["average"]`` (Quantus' ``return_average_correlation``).
  Quantus 0.6.0's ``SmoothMPRT`` smooths its own ``explain(method="Gradient")`` whatever
  ``explain_func`` it is given; here the evaluated method is smoothed, as the paper defines it
  (equal to Quantus where the method is that gradient, tested).
- ``random_logit`` (Sixt et al. 2020): the similarity between the map of the explained class and
  the map of a uniformly drawn other class (drawn as Quantus' ``RandomLogit`` draws it after
  seeding numpy with ``seed``). Lower is better.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pellucid.errors import ConfigError
from pellucid.metrics.base import Context, Metric, MetricResult, register
from pellucid.metrics.similarity import SIMILARITIES, pair_similarity, similarity
from pellucid.models.blackbox import is_forward_only
from pellucid.progress import track
from pellucid.targets import BoundClassTarget, BoundSegmentationTarget

AUTO_MIN_STEPS = 5
ORDERS = ("top_down", "bottom_up")


def randomization_steps(model: nn.Module, granularity: str, depth: int | str,
                        order: str = "top_down") -> list[tuple[str, list[str]]]:
    """Steps from the output down (``order="bottom_up"``: from the input up, Hedström et al.
    2023's recommendation and Quantus' order for eMPRT and sMPRT): (step name, names of the
    modules re-initialised in it).
    ``depth="auto"``: the smallest depth (1 to 8) that gives at least ``AUTO_MIN_STEPS`` blocks, so
    that a ResNet (``layer4``, ``layer3``, ...) and a nested MONAI U-Net (``model.1.submodule...``)
    both get a curve of several points."""
    if granularity not in ("block", "layer"):
        raise ConfigError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
    if depth == "auto":
        for d in range(1, 9):
            steps = randomization_steps(model, granularity, d, order)
            if len(steps) >= AUTO_MIN_STEPS:
                break
        return steps
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ConfigError(f"model_randomization: depth must be a positive integer or 'auto', "
                          f"got {depth!r}")
    names = [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")]
    if order == "top_down":
        names = names[::-1]
    if not names:
        raise ConfigError("the model has no module with reset_parameters() to randomise")
    steps: list[tuple[str, list[str]]] = []
    for name in names:
        key = name if granularity == "layer" else ".".join(name.split(".")[:depth]) or name
        if steps and steps[-1][0] == key:
            steps[-1][1].append(name)
        else:
            steps.append((key, [name]))
    return steps


def reset_as_on_cpu(module: torch.nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` after ``torch.manual_seed(seed)``, drawn on the CPU and copied
    to the module's device: the same seed gives the same random weights on any device."""
    torch.manual_seed(seed)
    first = next(iter(module.parameters(recurse=False)), None)
    if first is None or first.device.type == "cpu":
        module.reset_parameters()
        return
    cpu = copy.deepcopy(module).cpu()
    cpu.reset_parameters()
    own = module.state_dict()
    with torch.no_grad():
        for name, value in cpu.state_dict().items():
            own[name].copy_(value)


def throwaway_copy(model: nn.Module, metric: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A copy of ``model`` to re-initialise, and its modules by name; a black-box (forward-only)
    model is refused in one line naming ``metric``. The copy is marked throwaway: a bench run keeps
    it in torch (no export per copy)."""
    if is_forward_only(model):
        raise ConfigError(f"{metric} randomises the model's weights, which a black-box "
                          f"(forward-only) model does not expose")
    randomised = copy.deepcopy(model)
    randomised.pellucid_throwaway = True
    return randomised, dict(randomised.named_modules())


def randomization_baseline(maps: torch.Tensor, measure: str, pairs: int, seed: int) -> float:
    """Mean similarity of up to ``pairs`` random pairs of maps of different samples."""
    b = maps.shape[0]
    if b < 2:
        return float("nan")
    rng = np.random.RandomState(seed)
    all_pairs = [(i, j) for i in range(b) for j in range(b) if i < j]
    chosen = rng.permutation(len(all_pairs))[:pairs]
    i = torch.tensor([all_pairs[k][0] for k in chosen])
    j = torch.tensor([all_pairs[k][1] for k in chosen])
    values = pair_similarity(measure, maps, i, j)
    return float(np.nanmean(values.numpy())) if (~torch.isnan(values)).any() else float("nan")


@register
@dataclass
class ModelRandomization(Metric):
    """Cascading model-parameter randomisation: similarity of the map after randomising the model."""

    granularity: str = "block"
    depth: int | str = 2
    similarity: str = "ssim"
    measures: tuple[str, ...] = SIMILARITIES
    seed: int = 42
    baseline_pairs: int = 50
    progress: bool = True
    skip_layers: bool = False
    name: ClassVar[str] = "model_randomization"
    report_panel: ClassVar[str | None] = "randomization"
    category: ClassVar[str] = "randomization"
    role: ClassVar[str] = "sanity"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"model", "explainer"})

    def compute(self, ctx: Context) -> MetricResult:
        measures = tuple(dict.fromkeys((*self.measures, self.similarity)))
        for m in measures:
            if m not in SIMILARITIES:
                raise ConfigError(f"model_randomization: similarity must be one of {SIMILARITIES}, "
                                  f"got {m!r}")
        original = ctx.attributions
        randomised, modules = throwaway_copy(ctx.model, self.name)
        steps = randomization_steps(randomised, self.granularity, self.depth)
        table: dict[str, dict[str, torch.Tensor]] = {}
        for i, (step, names) in enumerate(track(steps, "cascading randomisation",
                                                enabled=self.progress)):
            for name in names:
                reset_as_on_cpu(modules[name], self.seed + 1)
            if self.skip_layers and i < len(steps) - 1:
                continue
            maps = ctx.explain_fn(randomised, ctx.inputs, ctx.target)
            table[step] = {m: similarity(m, original, maps) for m in measures}
        if self.skip_layers:
            steps = steps[-1:]
        last = table[steps[-1][0]][self.similarity]
        baseline = {m: randomization_baseline(original, m, self.baseline_pairs, self.seed)
                    for m in measures}
        passed = last < baseline[self.similarity]
        return MetricResult(self.name, last.float(),
                            curves=torch.stack([table[s][self.similarity] for s, _ in steps], 1).float(),
                            extras={"steps": [s for s, _ in steps], "table": table,
                                    "baseline": baseline, "passed": passed})

    def row_extra(self, result: MetricResult, i: int) -> dict[str, Any]:
        """Whether sample ``i`` passed (its final similarity below the baseline), the baselines and
        the randomised steps: what the report's randomisation panel draws."""
        return {"passed": bool(result.extras["passed"][i]),
                "baseline": {k: float(v) for k, v in result.extras["baseline"].items()},
                "steps": list(result.extras["steps"])}


@register
@dataclass
class RandomLogit(Metric):
    """Random logit test: similarity of the explained class's map and a random other class's map."""

    similarity: str = "ssim"
    seed: int = 42
    name: ClassVar[str] = "random_logit"
    category: ClassVar[str] = "randomization"
    role: ClassVar[str] = "sanity"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"model", "explainer"})

    def compute(self, ctx: Context) -> MetricResult:
        target = ctx.target
        if not isinstance(target, BoundClassTarget | BoundSegmentationTarget):
            raise ConfigError("random_logit needs a class or segmentation target")
        with torch.no_grad():
            k = ctx.model(ctx.inputs[:1]).shape[1]
        if k < 2:
            raise ConfigError("random_logit needs a model with at least two output classes")
        rng = np.random.RandomState(self.seed)
        pick = torch.as_tensor(rng.randint(0, k - 1, len(target.classes)), device=target.classes.device)
        others = pick + (pick >= target.classes).long()  # the pick-th of the other classes
        if isinstance(target, BoundClassTarget):
            other = BoundClassTarget(others, target.kind, target.activation)
        else:
            other = BoundSegmentationTarget(others, target.region, target.kind, target.activation)
        maps = ctx.explain_fn(ctx.model, ctx.inputs, other)
        return MetricResult(self.name, similarity(self.similarity, ctx.attributions, maps).float(),
                            extras={"other_classes": others})


def _entropy(maps: torch.Tensor, bins: int) -> torch.Tensor:
    """Discrete entropy (natural log) of each map's histogram of ``bins`` equal-width bins
    between its minimum and maximum (``numpy.histogram`` and ``scipy.stats.entropy``)."""
    from scipy.stats import entropy

    out = [entropy(np.histogram(m, bins=bins)[0]) for m in maps.flatten(1).double().cpu().numpy()]
    return torch.tensor(out, dtype=torch.float64)


def fully_randomised(model: nn.Module, seed: int, metric: str) -> nn.Module:
    """A copy of ``model`` with every module re-initialised (``reset_parameters`` after
    ``torch.manual_seed(seed + 1)``, Quantus' draw)."""
    randomised, modules = throwaway_copy(model, metric)
    for _, names in randomization_steps(randomised, "layer", 1, "bottom_up"):
        for name in names:
            reset_as_on_cpu(modules[name], seed + 1)
    return randomised


@register
@dataclass
class EfficientMPRT(Metric):
    """eMPRT: relative rise in the map's entropy when the whole model is randomised."""

    bins: int = 100
    seed: int = 42
    name: ClassVar[str] = "efficient_mprt"
    category: ClassVar[str] = "randomization"
    role: ClassVar[str] = "sanity"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"model", "explainer"})

    def compute(self, ctx: Context) -> MetricResult:
        if self.bins < 2:
            raise ConfigError(f"efficient_mprt: bins must be >= 2, got {self.bins}")
        before = _entropy(ctx.attributions, self.bins)
        maps = ctx.explain_fn(fully_randomised(ctx.model, self.seed, self.name), ctx.inputs,
                              ctx.target)
        after = _entropy(maps.detach(), self.bins)
        # a constant map has zero entropy: no relative rise is defined (Quantus divides by it and
        # reports inf, a "pass"); the sample is excluded
        score = torch.where(before > 0, (after - before) / before.clamp_min(1e-300), torch.nan)
        return MetricResult(self.name, score.float(),
                            extras={"entropy": before, "entropy_random": after,
                                    "passed": score > 0})

    def row_extra(self, result: MetricResult, i: int) -> dict[str, Any]:
        """Whether sample ``i`` passed (its map got more complex) and both entropies."""
        return {"passed": bool(result.extras["passed"][i]),
                "entropy": float(result.extras["entropy"][i]),
                "entropy_random": float(result.extras["entropy_random"][i])}


@register
@dataclass
class SmoothMPRT(Metric):
    """sMPRT: cascading randomisation, input layer first, of a noise-smoothed explanation."""

    samples: int = 50
    noise: float = 0.1
    order: str = "bottom_up"
    granularity: str = "layer"
    depth: int | str = 1
    seed: int = 42
    progress: bool = True
    name: ClassVar[str] = "smooth_mprt"
    category: ClassVar[str] = "randomization"
    role: ClassVar[str] = "sanity"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"model", "explainer"})

    def _smoothed(self, model: nn.Module, ctx: Context, rng: np.random.RandomState) -> torch.Tensor:
        x = ctx.inputs
        dims = tuple(range(1, x.ndim))
        xs = x.detach().double().cpu().numpy()
        std = self.noise * (xs.max(axis=dims, keepdims=True) - xs.min(axis=dims, keepdims=True))
        total = None
        for n in range(self.samples):
            eps = np.zeros_like(xs) if n == self.samples - 1 else rng.randn(*xs.shape) * std
            noisy = torch.from_numpy(xs + eps).to(x.dtype).to(x.device)
            maps = ctx.explain_fn(model, noisy, ctx.target).detach().double() / self.samples
            total = maps if total is None else total + maps
        return total

    def compute(self, ctx: Context) -> MetricResult:
        if self.samples < 1 or self.noise < 0:
            raise ConfigError("smooth_mprt needs samples >= 1 and noise >= 0")
        randomised, modules = throwaway_copy(ctx.model, self.name)
        rng = np.random.RandomState(self.seed)
        original = ctx.attributions
        start = similarity("spearman_abs", original, self._smoothed(ctx.model, ctx, rng))
        steps = randomization_steps(randomised, self.granularity, self.depth, self.order)
        curve = []
        for _, names in track(steps, "smooth MPRT", enabled=self.progress):
            for name in names:
                reset_as_on_cpu(modules[name], self.seed + 1)
            curve.append(similarity("spearman_abs", original,
                                    self._smoothed(randomised, ctx, rng)))
        curves = torch.stack(curve, 1)
        return MetricResult(self.name, curves[:, -1].float(), curves=curves.float(),
                            extras={"steps": [s for s, _ in steps], "original": start,
                                    "average": torch.cat([start[:, None], curves], 1).mean(1)})
