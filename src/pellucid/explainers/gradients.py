"""Gradient attributions on pellucid targets (any classification or segmentation target, 2D or
3D), checked against Captum. Per-channel results are kept in ``Explanation.raw``.

=====================  =========================================================  ==================
method                 attribution                                                source
=====================  =========================================================  ==================
saliency               |dy/dx| (map: max over channels)                           Simonyan 2014
inputxgradient         x * dy/dx                                                  Shrikumar 2016
integratedgradients    (x - x0) * integral_0^1 dy/dx(x0 + a (x - x0)) da          Sundararajan 2017
smoothgrad             mean_n |dy/dx(x + e_n)|, e_n ~ N(0, s^2); ``squared`` mean  Smilkov 2017
                       of squares (SmoothGrad-Squared, Hooker 2019)
gradientshap           E[(x - x0) * dy/dx(x0 + a (x - x0) + e)], x0 from a         Lundberg & Lee 2017;
                       background set, a ~ U(0, 1) (expected gradients)           Erion 2021
expectedgradients      the same without input noise e                              Erion 2021
=====================  =========================================================  ==================

Saliency and input x gradient run natively (one forward, one backward; equal to Captum's output,
tested), SmoothGrad, GradientSHAP and integrated gradients natively too (equal to Captum's IG;
noise drawn from a seeded CPU generator, so the same seed gives the same attributions on every
device).
Integrated gradients satisfies completeness:
sum(attributions) = y(x) - y(x0) up to the quadrature error, reported as ``extras["delta"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.explainers.accelerate import activation_bytes
from pellucid.explainers.attribution import (
    InputAttribution,
    gaussian_blur,
    rows_for,
)
from pellucid.explainers.base import ModelRunner
from pellucid.explainers.registry import register
from pellucid.runtime import memory_limit_bytes


class _OnePassGradient(InputAttribution):
    """Saliency and input x gradient need one forward and one backward: the clean forward that binds
    the target is kept differentiable and is the one differentiated (Captum would run a second
    forward)."""

    def clean_forward(self, runner: ModelRunner, inputs: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            self._leaf = inputs.clone().requires_grad_(True)
            self._graph = runner.forward(self._leaf)
        return self._graph.detach()

    def attribute(self, runner, model, inputs, bound, output):
        leaf, graph = self._leaf, self._graph
        self._leaf = self._graph = None  # the graph is not kept beyond this call
        with torch.enable_grad():
            (grad,) = runner.backward(bound.score(graph).sum(), [leaf])
        return self.from_gradient(inputs, grad.detach()), {}

@register
@dataclass
class Saliency(_OnePassGradient):
    """Saliency: the absolute input gradient of the target score (Simonyan et al. 2014)."""

    channel_reduce: str = "max_abs"
    name: ClassVar[str] = "saliency"
    input_gradients: ClassVar[bool] = True

    def from_gradient(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()


@register
@dataclass
class InputXGradient(_OnePassGradient):
    """Input x gradient (Shrikumar et al. 2016)."""

    name: ClassVar[str] = "inputxgradient"
    input_gradients: ClassVar[bool] = True

    def from_gradient(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return inputs * grad


def gradient_rows(batch_size: int | None, model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Rows per forward+backward for methods that expand the batch (IG steps, SmoothGrad samples):
    ``batch_size`` if given; on a GPU 128; on a CPU the power of two (8 to 64) whose activations
    come closest under 256 MiB (measured here: ResNet-18 at 128 px, 9 MiB a row, is fastest at 16
    rows, at 224 px, 29 MiB, at 8; a 2D U-Net at 5.5 MiB at 32), and under the memory limit
    (``pellucid.runtime.set_memory_limit``, counting activations twice for the backward; then
    as few as 1). Never fewer than the batch."""
    if batch_size is not None:
        rows = batch_size
    elif inputs.device.type != "cpu":
        rows = 128
    else:
        limit = memory_limit_bytes()
        budget = min(256 * 2**20, limit // 2) if limit else 256 * 2**20
        fits = max(budget // activation_bytes(model, inputs[:1]), 1)
        rows = max(1 if limit else 8, min(64, 2 ** int(math.log2(fits))))
    return max(rows, inputs.shape[0])


def make_baseline(kind: str | float | torch.Tensor, inputs: torch.Tensor, sigma: float,
                  background: torch.Tensor | None) -> torch.Tensor:
    """Baseline x0: ``"zeros"`` (zero in the model's input space), ``"blur"`` (Gaussian-blurred
    input), ``"mean"`` (mean of ``background``, e.g. dataset images), a number, or a tensor."""
    if isinstance(kind, torch.Tensor):
        base = kind.to(inputs)
        if base.shape[1:] != inputs.shape[1:] or base.shape[0] not in (1, inputs.shape[0]):
            raise ConfigError(f"baseline has shape {tuple(base.shape)}; expected (1 or "
                              f"{inputs.shape[0]}, {', '.join(map(str, inputs.shape[1:]))})")
        return base.expand_as(inputs)
    if isinstance(kind, (int, float)):
        return torch.full_like(inputs, float(kind))
    if kind == "zeros":
        return torch.zeros_like(inputs)
    if kind == "blur":
        return gaussian_blur(inputs, sigma)
    if kind == "mean":
        if background is None:
            raise ConfigError("baseline='mean' needs background= (images to average)")
        check_background(background, inputs)
        return background.to(inputs).mean(0, keepdim=True).expand_as(inputs)
    raise ConfigError(f"baseline must be 'zeros', 'blur', 'mean', a number or a tensor; got {kind!r}")


def check_background(background: torch.Tensor, inputs: torch.Tensor) -> None:
    if not isinstance(background, torch.Tensor) or background.ndim != inputs.ndim or \
            background.shape[1:] != inputs.shape[1:]:
        shape = tuple(background.shape) if isinstance(background, torch.Tensor) else background
        raise ConfigError(f"background has shape {shape}; expected (N, "
                          f"{', '.join(map(str, inputs.shape[1:]))}) like the inputs")


@register
@dataclass
class IntegratedGradients(InputAttribution):
    """Integrated gradients along the straight path from a baseline (Sundararajan et al. 2017):
    (x - x0) * sum_k w_k dy/dx(x0 + a_k (x - x0)), nodes a_k and weights w_k of ``quadrature`` (Captum's
    rules), path points batched ``batch_size`` rows per forward+backward; y(x0) for the
    completeness delta comes from the clean forward, which runs the baseline along."""

    steps: int = 64
    baseline: str | float | torch.Tensor = "zeros"
    blur_sigma: float = 5.0
    background: torch.Tensor | None = None
    quadrature: str = "gausslegendre"
    batch_size: int | None = None
    name: ClassVar[str] = "integratedgradients"
    input_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        from captum.attr._utils.approximation_methods import approximation_parameters

        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        try:
            approximation_parameters(self.quadrature)
        except ValueError:
            raise ConfigError(f"integratedgradients: unknown quadrature {self.quadrature!r}; use "
                              f"gausslegendre or riemann_left/right/middle/trapezoid") from None

    def clean_forward(self, runner, inputs):
        """The clean inputs and the baseline in one forward: y(x0) for the completeness delta
        costs no call of its own (small batches are slow per row on a CPU)."""
        base = make_baseline(self.baseline, inputs, self.blur_sigma, self.background)
        with torch.no_grad():
            both = runner.forward(torch.cat([inputs, base]))
        self._reference = (base, both[inputs.shape[0]:])
        return both[:inputs.shape[0]]

    def attribute(self, runner, model, inputs, bound, output):
        from captum.attr._utils.approximation_methods import approximation_parameters

        sizes_fn, alphas_fn = approximation_parameters(self.quadrature)  # checked at creation
        weights, alphas = sizes_fn(self.steps), alphas_fn(self.steps)
        (base, base_output), self._reference = self._reference, None
        b, diff = inputs.shape[0], inputs - base
        per_call = max(1, gradient_rows(self.batch_size, model, inputs) // b)
        rows, total = rows_for(inputs), torch.zeros_like(inputs)
        for start in range(0, self.steps, per_call):
            chunk = range(start, min(start + per_call, self.steps))
            x = torch.cat([base + alphas[k] * diff for k in chunk]).requires_grad_(True)
            with torch.enable_grad():
                scores = bound.score(runner.forward(x), rows.repeat(len(chunk)))
                (grad,) = runner.backward(scores.sum(), [x])
            for j, k in enumerate(chunk):
                total += weights[k] * grad[j * b:(j + 1) * b]
        attr = (total * diff).detach()
        base_score = bound.score(base_output, rows)
        delta = attr.flatten(1).sum(1) - (bound.score(output, rows).detach() - base_score)
        return attr, {"delta": delta, "baseline": base}


def sampled_gradients(runner, bound, inputs: torch.Tensor, samples: int, rows_per_call: int,
                      draw, combine) -> torch.Tensor:
    """Mean over ``samples`` of ``combine(grad, extra)``, where ``draw()`` gives one sample's
    (points, extra) for the whole batch and grad is the target's gradient at the points; as many
    samples per forward+backward as ``rows_per_call`` allows. Draws are made in sample order, so
    chunking never changes them."""
    per_call = max(1, rows_per_call // inputs.shape[0])
    rows = rows_for(inputs)
    total = torch.zeros_like(inputs)
    for start in range(0, samples, per_call):
        k = min(per_call, samples - start)
        drawn = [draw() for _ in range(k)]
        points = torch.cat([d[0] for d in drawn]).requires_grad_(True)
        with torch.enable_grad():
            out = runner.forward(points)
            (grad,) = runner.backward(bound.score(out, rows.repeat(k)).sum(), [points])
        for j, (_, extra) in enumerate(drawn):
            total += combine(grad[j * len(inputs):(j + 1) * len(inputs)].detach(), extra)
    return total / samples


@register
@dataclass
class SmoothGrad(InputAttribution):
    """SmoothGrad: saliency averaged over noisy copies, noise std = ``noise`` x (max - min) of the
    batch (Smilkov et al. 2017); ``squared=True`` averages squared gradients (Hooker et al. 2019).
    Noise comes from a CPU generator seeded with ``seed``: the same on every device."""

    samples: int = 25
    noise: float = 0.15
    squared: bool = False
    seed: int = 0
    batch_size: int | None = None
    channel_reduce: str = "max_abs"
    name: ClassVar[str] = "smoothgrad"
    input_gradients: ClassVar[bool] = True

    def attribute(self, runner, model, inputs, bound, output):
        if self.samples < 1 or self.noise < 0:
            raise ConfigError("smoothgrad needs samples >= 1 and noise >= 0")
        std = float(self.noise * (inputs.max() - inputs.min()))
        gen = torch.Generator(device="cpu").manual_seed(self.seed)

        def draw():
            eps = torch.randn(inputs.shape, generator=gen).to(inputs) * std
            return inputs + eps, None

        def combine(grad, _):
            return grad.square() if self.squared else grad.abs()

        attr = sampled_gradients(runner, bound, inputs, self.samples,
                                 gradient_rows(self.batch_size, model, inputs), draw, combine)
        return attr, {"noise_std": std}


@register
@dataclass
class GradientSHAP(InputAttribution):
    """GradientSHAP / expected gradients: gradients at random points between the input and
    baselines drawn from a background set (Lundberg & Lee 2017; Erion et al. 2021).

    Per sample and input: a baseline x0 drawn uniformly from ``background``, a ~ U(0, 1) and
    (if ``noise`` > 0) e ~ N(0, noise^2); attribution = mean of (x + e - x0) * dy/dx at
    x0 + a (x + e - x0) (Captum's GradientShap). Draws from a CPU generator seeded with ``seed``."""

    background: torch.Tensor | None = None
    samples: int = 32
    noise: float = 0.0
    seed: int = 0
    batch_size: int | None = None
    name: ClassVar[str] = "gradientshap"
    input_gradients: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset({"background"})

    def attribute(self, runner, model, inputs, bound, output):
        if self.background is None:
            raise ConfigError(f"{self.name} needs background= (N, C, *spatial) reference images")
        check_background(self.background, inputs)
        if self.samples < 1 or self.noise < 0:
            raise ConfigError(f"{self.name} needs samples >= 1 and noise >= 0")
        background = self.background.to(inputs)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        b, shape = inputs.shape[0], (-1, *([1] * (inputs.ndim - 1)))

        def draw():
            base = background[torch.randint(len(background), (b,), generator=gen).to(inputs.device)]
            alpha = torch.rand(b, generator=gen).to(inputs).view(shape)
            x = inputs
            if self.noise > 0:
                x = inputs + torch.randn(inputs.shape, generator=gen).to(inputs) * self.noise
            return base + alpha * (x - base), x - base

        attr = sampled_gradients(runner, bound, inputs, self.samples,
                                 gradient_rows(self.batch_size, model, inputs), draw,
                                 lambda grad, diff: grad * diff)
        return attr, {}


@register
@dataclass
class ExpectedGradients(GradientSHAP):
    """Expected gradients: integrated gradients averaged over baselines drawn from the data,
    E_{x0 ~ background, a ~ U(0, 1)}[(x - x0) * dy/dx(x0 + a (x - x0))], estimated with
    ``samples`` draws (Erion et al. 2021, "Improving performance of deep learning models with
    axiomatic attribution priors and expected gradients", Nature Machine Intelligence; ranked first
    of its methods by LATEC, Klein et al. 2024). GradientSHAP without input noise, the same draws
    (Captum's ``GradientShap`` with ``stdevs=0``)."""

    name: ClassVar[str] = "expectedgradients"

    def __post_init__(self) -> None:
        if self.noise != 0:
            raise ConfigError("expectedgradients draws no input noise (noise > 0 is gradientshap)")
