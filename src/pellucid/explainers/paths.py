"""Integrated gradients along other paths than the straight line: Blur IG and Guided IG.

=========  ===========================================================================  ==============
method     attribution                                                                  source
=========  ===========================================================================  ==============
blurig     -sum_i (s_{i+1} - s_i) * dx_s/ds(s_i) * dy/dx(x_{s_i}), x_s the input        Xu 2020
           blurred by a Gaussian of width s, s from 0 to ``max_sigma``; dx_s/ds by a
           forward difference of ``grad_step``
guidedig   sum over the steps of (x_{k+1} - x_k) * dy/dx(x_k), the path from the        Kapishnikov
           baseline moving, at each step, the ``fraction`` of features with the          2021
           smallest |gradient| (each within ``max_dist`` of the straight line)
=========  ===========================================================================  ==============

Blur IG's blur is SciPy's ``gaussian_filter`` with zero padding (``mode="constant"``, kernel radius
``int(4 s + 0.5)``) over the spatial axes (three for a volume), never the channels, as PAIR's
``saliency`` package blurs an image (SciPy itself on the CPU; on a GPU the same passes in torch,
equal to SciPy's bit for bit, tested). Its path needs no baseline, and summation holds against
the fully blurred input: sum(attribution) ~= y(x) - y(x_{max_sigma}) (``extras["delta"]``). PAIR
scales a whole batch of path points by the last point's step width, which equals each point's own
when the widths are even (the default); with ``sqrt=True`` and ``batch_size`` > 1 it differs from
the paper's sum, which is followed here (``steps_batched_as_pair=True`` keeps PAIR's).

Guided IG follows PAIR's ``guided_ig_impl`` step for step, the path in float64 numpy (its sums and
equality tests as PAIR's: the path is a chain of threshold decisions, and a sum rounded in another
order flips some of them), gradients in the model's precision; each sample is on its own path while
the gradients of all samples at a step come from one forward and backward. That chain makes the map
sensitive to the last bit of the gradient: on the phantom ResNet-18 at 128 px, gradients of a batch of
8 (against one sample at a time) or PAIR's own float64 sums over an (H, W, C) array (against
(C, H, W)) move it by 1 to 2 % of its scale. Equal gradients give equal maps (tested to 1e-6).

Xu et al., "Attribution in scale and space", CVPR 2020; Kapishnikov et al., "Guided integrated
gradients: an adaptive path method for removing noise", CVPR 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import InputAttribution, rows_for
from pellucid.explainers.gradients import gradient_rows, make_baseline
from pellucid.explainers.registry import register


def scipy_gaussian(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma, mode="constant")`` over the spatial axes of
    (B, C, *spatial): a normalised kernel of radius ``int(truncate * sigma + 0.5)``, zeros beyond
    the edges; identity at ``sigma`` = 0. On the CPU it is SciPy's own (PAIR's blur, bit for bit);
    elsewhere :func:`torch_gaussian`, the same passes on the device."""
    if sigma <= 0:
        return x
    if x.device.type != "cpu":
        return torch_gaussian(x, sigma, truncate)
    from scipy import ndimage

    blurred = ndimage.gaussian_filter(x.detach().numpy(), [0, 0] + [float(sigma)] * (x.ndim - 2),
                                      mode="constant", truncate=truncate)
    return torch.from_numpy(blurred)


def torch_gaussian(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's zero-padded Gaussian blur in torch: one 1-D pass per spatial axis (a 1 x k, k x 1
    convolution, no transposed copies), each in float64 and stored in the input's precision
    between passes, as SciPy does (Blur IG's slope is a difference of two blurs, which magnifies
    their rounding)."""
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    nd = x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = x.reshape(-1, 1, *x.shape[2:])
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = len(kernel)
        padding = [0] * nd
        padding[axis] = radius
        out = conv(out.double(), kernel.view(1, 1, *shape), padding=tuple(padding)).to(x.dtype)
    return out.view_as(x)


@register
@dataclass
class BlurIG(InputAttribution):
    """Blur integrated gradients (Xu et al. 2020): the path from the input blurred with a
    Gaussian of width ``max_sigma`` (in pixels) to the input, ``steps`` widths evenly spaced
    (``sqrt=True``: evenly spaced in squared width), the derivative along the path by a forward
    difference of ``grad_step``; ``batch_size`` path points per forward+backward."""

    max_sigma: float = 50.0
    steps: int = 100
    grad_step: float = 0.01
    sqrt: bool = False
    batch_size: int | None = None
    steps_batched_as_pair: bool = False
    name: ClassVar[str] = "blurig"
    input_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.max_sigma > 0 or not self.grad_step > 0:
            raise ConfigError("blurig needs steps >= 1, max_sigma > 0 and grad_step > 0")

    def _sigmas(self) -> list[float]:
        n, top = self.steps, self.max_sigma
        if self.sqrt:
            return [math.sqrt(i * top / n) for i in range(n + 1)]
        return [i * top / n for i in range(n + 1)]

    def _chunk(self, runner, inputs, chunk: range, sigmas: list[float]):
        """The path points of ``chunk`` (the batch once per point), their slopes, and one forward
        of them with the graph kept."""
        points = [scipy_gaussian(inputs, sigmas[i]) for i in chunk]
        ahead = [scipy_gaussian(inputs, sigmas[i] + self.grad_step) for i in chunk]
        if inputs.device.type == "cpu":  # in NumPy, as PAIR (the same IEEE operations, the
            # same values; torch's element-wise operations ran slower than NumPy's on this CPU)
            slopes = [torch.from_numpy((a.numpy() - p.numpy()) / self.grad_step)
                      for a, p in zip(ahead, points, strict=True)]
        else:
            slopes = [(a - p) / self.grad_step for a, p in zip(ahead, points, strict=True)]
        x = torch.cat(points).requires_grad_(True)
        with torch.enable_grad():
            out = runner.forward(x)
        return x, out, slopes

    def clean_forward(self, runner, inputs):
        """The path's first chunk starts at width 0, the inputs themselves: its forward binds the
        target and is the one differentiated (no clean pass of its own)."""
        b = inputs.shape[0]
        sigmas = self._sigmas()
        per_call = self.batch_size or max(1, gradient_rows(None, runner.model, inputs) // b)
        chunk = range(0, min(per_call, self.steps))
        self._first = (sigmas, per_call, chunk, *self._chunk(runner, inputs, chunk, sigmas))
        return self._first[4][:b].detach()

    def attribute(self, runner, model, inputs, bound, output):
        (sigmas, per_call, first, x, out, slopes), self._first = self._first, None
        widths = [sigmas[i + 1] - sigmas[i] for i in range(self.steps)]
        b, rows = inputs.shape[0], rows_for(inputs)
        total = torch.zeros_like(inputs)
        chunk = first
        while True:
            with torch.enable_grad():
                scores = bound.score(out, rows.repeat(len(chunk)))
                (grad,) = runner.backward(scores.sum(), [x])
            for j, (i, slope) in enumerate(zip(chunk, slopes, strict=True)):
                width = widths[chunk[-1]] if self.steps_batched_as_pair else widths[i]
                total.addcmul_(slope, grad[j * b:(j + 1) * b], value=width)  # one pass
            if chunk.stop >= self.steps:
                break
            chunk = range(chunk.stop, min(chunk.stop + per_call, self.steps))
            x, out, slopes = self._chunk(runner, inputs, chunk, sigmas)
        attr = -total.detach()
        blurred = scipy_gaussian(inputs, self.max_sigma)
        end = bound.score(runner.fast_forward(blurred), rows)  # forward-only: the check's end
        delta = attr.flatten(1).sum(1) - (bound.score(output, rows).detach() - end)
        return attr, {"delta": delta, "baseline": blurred}


def _guided_step(x: np.ndarray, grad: np.ndarray, x_in: np.ndarray, x_base: np.ndarray,
                 step: int, steps: int, fraction: float, max_dist: float, l1_total: float,
                 eps: float = 1e-9) -> np.ndarray:
    """One Guided IG step of one sample, in float64 numpy (the path's sums and equalities as PAIR
    computes them: the path is a sequence of threshold decisions, and a sum rounded in another
    order can flip one); moves ``x`` in place towards ``x_in`` and returns the attribution it
    adds, sum over the moves of (x_new - x_old) * grad."""
    grad_actual, grad = grad, grad.copy()
    alpha = (step + 1.0) / steps
    a_min, a_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    diff = x_in - x_base
    x_min, x_max = x_base + diff * a_min, x_base + diff * a_max
    l1_target = l1_total * (1 - (step + 1) / steps)
    attr = np.zeros_like(x)
    nonzero = diff != 0
    gamma = math.inf
    while gamma > 1.0:
        x_old = x.copy()
        x_alpha = np.full_like(x, a_max)
        np.divide(x - x_base, diff, out=x_alpha, where=nonzero)
        behind = x_alpha < a_min
        x[behind] = x_min[behind]
        l1_current = np.abs(x - x_in).sum()
        if math.isclose(l1_target, l1_current, rel_tol=eps, abs_tol=eps):
            attr += (x - x_old) * grad_actual
            break
        grad[x == x_max] = np.inf
        magnitude = np.abs(grad)
        threshold = np.quantile(magnitude, fraction, method="lower")
        selected = (magnitude <= threshold) & (grad != np.inf)
        l1_s = (np.abs(x - x_max) * selected).sum()
        gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else math.inf
        if gamma > 1.0:
            x[selected] = x_max[selected]
        else:
            x[selected] = (x + (x_max - x) * gamma)[selected]
        attr += (x - x_old) * grad_actual
    return attr


@register
@dataclass
class GuidedIG(InputAttribution):
    """Guided integrated gradients (Kapishnikov et al. 2021): an adaptive path from ``baseline``
    (as integrated gradients) to the input that, at each of ``steps`` steps, moves the
    ``fraction`` of features with the smallest absolute gradient, never further than ``max_dist``
    (a fraction of the way) from the straight line; ``max_dist=0`` is integrated gradients with a
    left Riemann sum. One forward+backward of the whole batch per step."""

    steps: int = 200
    fraction: float = 0.25
    max_dist: float = 0.02
    baseline: str | float | torch.Tensor = "zeros"
    blur_sigma: float = 5.0
    background: torch.Tensor | None = None
    name: ClassVar[str] = "guidedig"
    input_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 < self.fraction <= 1 or not 0 <= self.max_dist <= 1:
            raise ConfigError("guidedig needs steps >= 1, 0 < fraction <= 1 and 0 <= max_dist <= 1")

    def attribute(self, runner, model, inputs, bound, output):
        base = make_baseline(self.baseline, inputs, self.blur_sigma, self.background)
        x_in = inputs.detach().double().cpu().numpy()
        x_base = base.detach().double().cpu().numpy()
        x = x_base.copy()
        l1_total = np.abs(x_in - x_base).reshape(len(x_in), -1).sum(1)
        attr = np.zeros_like(x_in)
        live = torch.as_tensor(l1_total > 0)  # a sample equal to its baseline: zero attribution
        rows = rows_for(inputs)
        for step in range(self.steps):
            if not live.any():
                break
            alive = live.nonzero()[:, 0].tolist()
            point = torch.from_numpy(x[alive]).to(inputs.dtype).to(inputs.device)
            point.requires_grad_(True)
            with torch.enable_grad():
                scores = bound.score(runner.forward(point), rows[alive])
                (grad,) = runner.backward(scores.sum(), [point])
            grad = grad.detach().double().cpu().numpy()
            for j, i in enumerate(alive):
                attr[i] += _guided_step(x[i], grad[j], x_in[i], x_base[i], step, self.steps,
                                        self.fraction, self.max_dist, float(l1_total[i]))
        attr = torch.from_numpy(attr).to(inputs)
        with torch.no_grad():
            start = bound.score(runner.forward(base), rows)
        delta = attr.flatten(1).sum(1) - (bound.score(output, rows).detach() - start)
        return attr, {"delta": delta, "baseline": base}
