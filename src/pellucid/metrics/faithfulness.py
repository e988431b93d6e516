"""Faithfulness metrics: does removing what the map calls important change the model's score?

- ``deletion`` / ``insertion`` (RISE protocol, Petsiuk et al. 2018): pixels are ordered by
  decreasing attribution and changed ``step`` at a time, or in ``steps`` equal steps (all
  channels of a pixel together).
  Deletion replaces them with ``baseline`` (zero in the model's input space); insertion starts from a
  blurred copy (Gaussian, kernel 11, sigma 5) and restores them. The curve s_0..s_N is the target
  score (the class probability by default) after each step, and
  AUC = (sum_k s_k - s_0 / 2 - s_N / 2) / N. Lower deletion and higher insertion are better.
- ``average_drop`` / ``increase_in_confidence`` (Chattopadhay et al. 2018): the input times the
  per-sample min-max normalised map gives E; with Y the score on the input and O on E,
  drop = 100 max(0, Y - O) / Y and increase = 100 [Y < O] per sample (their means are the paper's
  Average Drop % and Increase in Confidence %).

Perturbed inputs of all samples and steps run in large batches through the optimised inference copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.explainers.accelerate import AutoBatch, inference_forward
from pellucid.explainers.attribution import gaussian_blur
from pellucid.explainers.base import model_guard
from pellucid.metrics.base import Context, Metric, MetricResult, register
from pellucid.targets import BoundClassTarget, BoundSegmentationTarget


def scoring_target(ctx: Context, probability: bool):
    """The explanation's bound target, as a probability when asked: the class probability, or for
    segmentation the region's summed class probabilities (the expected number of its voxels the
    model assigns to the class)."""
    target = ctx.target
    if target is None:
        raise ConfigError("faithfulness metrics need the explanation's target (pass target=)")
    if probability and target.kind == "logit":
        if isinstance(target, BoundClassTarget):
            return BoundClassTarget(target.classes, "probability", target.activation)
        if isinstance(target, BoundSegmentationTarget):  # the region's summed probabilities
            return BoundSegmentationTarget(target.classes, target.region, "probability",
                                           target.activation)
    return target


def run_batches(model, inputs_fn, n: int, example: torch.Tensor, target, rows_fn) -> torch.Tensor:
    """Scores of ``n`` perturbed inputs built by ``inputs_fn(start, stop)``; the model is run in
    eval mode and left as it was found."""
    out = torch.empty(n, device=example.device)
    with model_guard(model), torch.inference_mode():
        fast = inference_forward(model, example[:1])
        for start, stop in AutoBatch(None, model, example).chunks(n):
            y = fast(inputs_fn(start, stop))
            out[start:stop] = target.score(y, rows_fn(start, stop)).float()
    return out


def trapezoid_auc(curve: torch.Tensor) -> torch.Tensor:
    """(sum s - s_0 / 2 - s_N / 2) / N per row of (B, N + 1) curves."""
    n = curve.shape[1] - 1
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def pixel_ranks(attributions: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """(B, N) position of every pixel in the order of decreasing (or increasing) attribution;
    ties keep pixel order (a stable sort)."""
    b = attributions.shape[0]
    a = attributions.reshape(b, -1).float()
    order = torch.argsort(-a if descending else a, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(a.shape[1], device=a.device).expand_as(order))
    return rank


def replaced_scores(ctx: Context, target, rank: torch.Tensor, start: torch.Tensor,
                    replacement: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, K) scores of inputs in which, for point k, the pixels with ``rank < counts[k]`` are taken
    from ``replacement`` and the rest from ``start`` (both (B, C, N), all channels of a pixel
    together). All B x K inputs run in large batches."""
    x = ctx.inputs
    b, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    counts = counts.to(x.device)
    pairs = torch.cartesian_prod(torch.arange(b), torch.arange(len(counts))).to(x.device)

    def build(lo: int, hi: int) -> torch.Tensor:
        rows, k = pairs[lo:hi, 0], pairs[lo:hi, 1]
        changed = (rank[rows] < counts[k][:, None])[:, None]
        return torch.where(changed, replacement[rows], start[rows]).reshape(len(rows), c, *spatial)

    scores = run_batches(ctx.model, build, len(pairs), x, target, lambda lo, hi: pairs[lo:hi, 0])
    return scores.reshape(b, len(counts))


def default_step(spatial: tuple[int, ...]) -> int:
    """sqrt(N) pixels a step in 2D (224 for 224 x 224, as the RISE demo), N / 256 in 3D."""
    n = math.prod(spatial)
    return max(1, round(math.sqrt(n)) if len(spatial) == 2 else n // 256)


def step_size(spatial: tuple[int, ...], step: int | None, steps: int | None, name: str) -> int:
    """Pixels per step: ``step`` as given, or N / ``steps`` rounded up, or the default."""
    if step is not None and steps is not None:
        raise ConfigError(f"{name}: give step or steps, not both")
    n = math.prod(spatial)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"{name}: steps must be at least 1, got {steps}")
        return math.ceil(n / steps)
    if step is not None and step < 1:
        raise ConfigError(f"{name}: step must be at least 1, got {step}")
    return step or default_step(spatial)


@dataclass
class _Curve(Metric):
    step: int | None = None
    steps: int | None = None
    probability: bool = True
    baseline: float = 0.0
    start: str = "blur"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})
    inserting: ClassVar[bool] = False

    def compute(self, ctx: Context) -> MetricResult:
        x = ctx.inputs
        b, c = x.shape[:2]
        spatial = tuple(x.shape[2:])
        hw = math.prod(spatial)
        step = step_size(spatial, self.step, self.steps, self.name)
        steps = math.ceil(hw / step)
        target = scoring_target(ctx, self.probability)
        flat = x.reshape(b, c, hw)
        if self.inserting:
            if self.start == "blur":
                start = gaussian_blur(x, 5.0, 11).reshape(b, c, hw)
            elif self.start == "zeros":
                start = torch.zeros_like(flat)
            else:
                raise ConfigError(f"insertion start must be 'blur' or 'zeros', got {self.start!r}")
            start, replacement = start, flat
        else:
            start, replacement = flat, torch.full_like(flat, self.baseline)
        counts = torch.arange(steps + 1) * step
        curves = replaced_scores(ctx, target, pixel_ranks(ctx.attributions), start, replacement,
                                 counts)
        return MetricResult(self.name, trapezoid_auc(curves), curves=curves,
                            extras={"step": step})


@register
@dataclass
class Deletion(_Curve):
    """Deletion AUC: the score as the most relevant pixels are removed first (lower is better)."""

    name: ClassVar[str] = "deletion"
    gallery_rank: ClassVar[int | None] = 10
    report_curve: ClassVar[str | None] = "fraction of pixels removed"
    higher_is_better: ClassVar[bool] = False


@register
@dataclass
class Insertion(_Curve):
    """Insertion AUC: the score as the most relevant pixels are restored first (higher is better)."""

    name: ClassVar[str] = "insertion"
    gallery_rank: ClassVar[int | None] = 11
    report_curve: ClassVar[str | None] = "fraction of pixels inserted"
    higher_is_better: ClassVar[bool] = True
    inserting: ClassVar[bool] = True


def _masked_scores(ctx: Context, probability: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores Y on the inputs and O on the inputs times the min-max map; computed once per
    evaluate() call for Average Drop and Increase in Confidence together."""
    return ctx.shared(("masked_scores", probability), lambda: _compute_masked_scores(ctx, probability))


def _compute_masked_scores(ctx: Context, probability: bool) -> tuple[torch.Tensor, torch.Tensor]:
    target = scoring_target(ctx, probability)
    b = ctx.inputs.shape[0]
    a = ctx.attributions.reshape(b, -1).float()
    lo, hi = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
    norm = ((a - lo) / (hi - lo).clamp_min(1e-12)).reshape(b, 1, *ctx.inputs.shape[2:])
    masked = ctx.inputs * norm
    rows = torch.arange(b, device=masked.device)
    scores = run_batches(ctx.model, lambda s, e: masked[s:e], b, ctx.inputs, target,
                         lambda s, e: rows[s:e])
    return clean_scores(ctx, probability), scores  # the clean forward is shared with other metrics


@register
@dataclass
class AverageDrop(Metric):
    """Average Drop %: 100 max(0, Y - O) / Y, O the score on the input times the map."""

    probability: bool = True
    name: ClassVar[str] = "average_drop"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def compute(self, ctx: Context) -> MetricResult:
        y, o = _masked_scores(ctx, self.probability)
        return MetricResult(self.name, 100 * (y - o).clamp_min(0) / y,
                            extras={"clean": y, "masked": o})


@register
@dataclass
class IncreaseInConfidence(Metric):
    """Increase in Confidence %: 100 if the score on the input times the map exceeds the clean one."""

    probability: bool = True
    name: ClassVar[str] = "increase_in_confidence"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def compute(self, ctx: Context) -> MetricResult:
        y, o = _masked_scores(ctx, self.probability)
        return MetricResult(self.name, 100 * (y < o).float())


def baseline_values(x: torch.Tensor, baseline: str | float) -> torch.Tensor:
    """(B, C, 1) replacement values: ``"black"`` = each sample's minimum (Quantus' "black"),
    ``"mean"`` = each sample's mean, or a number."""
    b, c = x.shape[:2]
    flat = x.reshape(b, -1)
    if baseline == "black":
        value = flat.amin(1)
    elif baseline == "mean":
        value = flat.mean(1)
    elif isinstance(baseline, int | float) and not isinstance(baseline, bool):
        value = torch.full((b,), float(baseline), device=x.device, dtype=x.dtype)
    else:
        raise ConfigError(f"baseline must be 'black', 'mean' or a number, got {baseline!r}")
    return value.view(b, 1, 1).expand(b, c, 1)


def clean_scores(ctx: Context, probability: bool) -> torch.Tensor:
    """Target scores on the unperturbed inputs, computed once per inputs, target and cache."""
    def compute() -> torch.Tensor:
        target = scoring_target(ctx, probability)
        rows = torch.arange(ctx.inputs.shape[0], device=ctx.inputs.device)
        return run_batches(ctx.model, lambda lo, hi: ctx.inputs[lo:hi], ctx.inputs.shape[0],
                           ctx.inputs, target, lambda lo, hi: rows[lo:hi])
    return ctx.shared(("clean", probability), compute, per_map=False)


@register
@dataclass
class PixelFlipping(Metric):
    """Pixel flipping: the score after each step of flipping the most (or least) relevant pixels.

    Bach et al. 2015. Step k replaces the k * ``features_in_step`` highest-ranked pixels (all
    channels) with ``baseline``; the curve holds the score after every step (s_1..s_K, no clean
    point) and the score is its trapezoid area with unit spacing, sum s - s_1/2 - s_K/2 (Quantus'
    ``PixelFlipping`` with ``return_auc_per_sample``). Most-relevant-first: lower is better.
    """

    features_in_step: int | None = None
    steps: int | None = None
    order: str = "morf"
    baseline: str | float = "black"
    probability: bool = True
    name: ClassVar[str] = "pixel_flipping"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = False  # with order="morf" (the default)
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def __post_init__(self) -> None:
        if self.order not in ("morf", "lerf"):
            raise ConfigError(f"pixel_flipping order must be 'morf' or 'lerf', got {self.order!r}")

    def is_higher_better(self) -> bool:
        """Removing the least relevant pixels first ("lerf") should keep the score: higher is better."""
        return self.order == "lerf"

    def compute(self, ctx: Context) -> MetricResult:
        x = ctx.inputs
        b, c = x.shape[:2]
        spatial = tuple(x.shape[2:])
        n = math.prod(spatial)
        step = step_size(spatial, self.features_in_step, self.steps, self.name)
        counts = torch.clamp(torch.arange(1, math.ceil(n / step) + 1) * step, max=n)
        flat = x.reshape(b, c, n)
        replacement = baseline_values(x, self.baseline).expand(b, c, n)
        rank = pixel_ranks(ctx.attributions, descending=self.order == "morf")
        curves = replaced_scores(ctx, scoring_target(ctx, self.probability), rank, flat,
                                 replacement, counts)
        auc = curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2
        return MetricResult(self.name, auc, curves=curves,
                            extras={"features_in_step": step})


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of (B, N) tensors (NaN where a row is constant)."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den, torch.full_like(den, float("nan"))).float()


SAMPLERS = ("quantus", "fast")


def random_subsets(n_features: int, size: int, runs: int, batch: int, seed: int,
                   sampler: str = "quantus") -> torch.Tensor:
    """(runs, batch, size) feature indices drawn without replacement.

    ``"quantus"``: the stream Quantus 0.6.0 consumes after ``np.random.seed(seed)``: per run, one
    legacy ``RandomState.choice`` per sample (a full permutation of all features each), then
    ``batch`` uniforms (Quantus fills its "uniform" baseline on every perturbation call whatever
    baseline is chosen), so equal seeds give Quantus' subsets. ``"fast"``: numpy's ``Generator``
    (PCG64) choice, which draws only ``size`` indices (Floyd's algorithm): the same distribution,
    other draws, ~50x less sampling time (which bounds this metric on a GPU).
    """
    import numpy as np

    if sampler not in SAMPLERS:
        raise ConfigError(f"faithfulness_correlation: sampler must be one of {SAMPLERS}, got "
                          f"{sampler!r}")
    if sampler == "fast":
        gen = np.random.default_rng(seed)
        flat = [gen.choice(n_features, size, replace=False, shuffle=False)
                for _ in range(runs * batch)]
        return torch.as_tensor(np.stack(flat)).reshape(runs, batch, size)
    rng = np.random.RandomState(seed)
    draws = []
    for _ in range(runs):
        draws.append(np.stack([rng.choice(n_features, size, replace=False) for _ in range(batch)]))
        rng.uniform(size=batch)
    return torch.as_tensor(np.stack(draws))


@register
@dataclass
class FaithfulnessCorrelation(Metric):
    """Faithfulness correlation: Pearson of attribution sums and score drops over random subsets.

    Bhatt et al. 2020: for ``nr_runs`` random subsets S of ``subset_size`` pixels,
    corr_S( sum_{i in S} a_i , f(x) - f(x with S set to the baseline) ). Logits by default (as
    Quantus); subsets drawn with a seeded numpy RandomState in Quantus' order (``sampler=
    "quantus"``, equal to Quantus for equal seeds) or with the much faster ``sampler="fast"``.
    """

    nr_runs: int = 100
    subset_size: int = 224
    baseline: str | float = "black"
    probability: bool = False
    seed: int = 42
    sampler: str = "quantus"
    name: ClassVar[str] = "faithfulness_correlation"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def compute(self, ctx: Context) -> MetricResult:
        b, n = ctx.inputs.shape[0], math.prod(ctx.inputs.shape[2:])
        if not 0 < self.subset_size < n:
            raise ConfigError(f"faithfulness_correlation: subset_size must be in 1..{n - 1}, "
                              f"got {self.subset_size}")
        key = ("faithfulness_correlation", self.nr_runs, self.subset_size, self.baseline,
               self.probability, self.seed, self.sampler)
        subsets, perturbed = ctx.shared(key, lambda: self._perturbed(ctx, n), per_map=False)
        drops = clean_scores(ctx, self.probability)[:, None] - perturbed
        a = ctx.attributions.reshape(b, n).double()
        sums = a.gather(1, subsets.permute(1, 0, 2).reshape(b, -1)).reshape(
            b, self.nr_runs, -1).sum(2)  # (B, nr_runs): sum_S a
        return MetricResult(self.name, pearson(sums, drops),
                            extras={"attribution_sums": sums, "score_drops": drops})

    def _perturbed(self, ctx: Context, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (nr_runs, B, subset_size) subsets and the (B, nr_runs) scores with each subset at
        the baseline: neither reads the map."""
        x = ctx.inputs
        b, c = x.shape[:2]
        subsets = random_subsets(n, self.subset_size, self.nr_runs, b, self.seed,
                                 self.sampler).to(x.device)
        flat = x.reshape(b, c, n)
        base = baseline_values(x, self.baseline)
        pairs = torch.cartesian_prod(torch.arange(self.nr_runs), torch.arange(b)).to(x.device)

        def build(lo: int, hi: int) -> torch.Tensor:
            runs, rows = pairs[lo:hi, 0], pairs[lo:hi, 1]
            out = flat[rows].clone()
            idx = subsets[runs, rows][:, None].expand(-1, c, -1)
            out.scatter_(2, idx, base[rows].expand(-1, -1, idx.shape[2]))
            return out.reshape(len(rows), c, *x.shape[2:])

        scores = run_batches(ctx.model, build, len(pairs), x, scoring_target(ctx, self.probability),
                             lambda lo, hi: pairs[lo:hi, 1])
        return subsets, scores.reshape(self.nr_runs, b).T


@register
@dataclass
class Infidelity(Metric):
    """Infidelity: E_I[(I . a - (f(x) - f(x - I)))^2] over Gaussian perturbations I.

    Yeh et al. 2019; I ~ N(0, ``noise_std``^2) per input element, the (pixel) map broadcast over
    channels, ``n_perturb_samples`` draws from a seeded generator. ``normalize`` rescales I . a by
    the least-squares beta first (as Captum's ``infidelity(normalize=True)``). Lower is better.
    """

    noise_std: float = 0.1
    n_perturb_samples: int = 32
    normalize: bool = False
    probability: bool = False
    seed: int = 0
    name: ClassVar[str] = "infidelity"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """(n_perturb_samples, B, C, *spatial) perturbations."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        shape = (self.n_perturb_samples, *x.shape)
        return (torch.randn(shape, generator=gen) * self.noise_std).to(x.device, x.dtype)

    def compute(self, ctx: Context) -> MetricResult:
        x = ctx.inputs
        b = x.shape[0]
        noise = self.noise(x)
        target = scoring_target(ctx, self.probability)
        pairs = torch.cartesian_prod(torch.arange(self.n_perturb_samples), torch.arange(b))
        pairs = pairs.to(x.device)
        key = ("infidelity", self.noise_std, self.n_perturb_samples, self.probability, self.seed)
        perturbed = ctx.shared(key, lambda: run_batches(
            ctx.model, lambda lo, hi: x[pairs[lo:hi, 1]] - noise[pairs[lo:hi, 0], pairs[lo:hi, 1]],
            len(pairs), x, target, lambda lo, hi: pairs[lo:hi, 1]), per_map=False)
        diffs = (clean_scores(ctx, self.probability)[None] - perturbed.reshape(-1, b)).double()
        a = ctx.attributions[None, :, None].double()  # broadcast over channels
        dots = (noise.double() * a).flatten(2).sum(2)  # (n, B)
        if self.normalize:
            beta = (dots * diffs).mean(0) / dots.square().mean(0).clamp_min(1e-30)
            dots = dots * beta
        return MetricResult(self.name, (dots - diffs).square().mean(0).float())
