"""DeepLIFT (the Rescale rule) and DeepLiftShap.

============  =======================================================================  ===============
method        attribution                                                              source
============  =======================================================================  ===============
deeplift      (x - x0) * m, m the input's multiplier: the chain rule with every         Shrikumar 2017
              non-linearity's derivative replaced by (f(z) - f(z0)) / (z - z0), z0 its
              input on the baseline x0 (f'(z) where |z - z0| < eps)
deepliftshap  the mean of DeepLIFT over baselines x0 drawn from a background set        Lundberg 2017
============  =======================================================================  ===============

The input and its baseline run as one doubled batch, so every non-linearity sees z and z0 together.
The Rescale rule is applied to the element-wise activations (ReLU, leaky ReLU, ELU, SELU, PReLU,
GELU, SiLU, Mish, softplus, sigmoid, tanh, ReLU6, hardtanh), whether modules or functions (calls
are intercepted for the pass, a ``TorchFunctionMode``, as guided backpropagation does), and to max
pooling (the change of each pooled maximum routed to the positions that won it in the input and
in the baseline, over the change of those inputs, as Captum routes it). Linear layers, batch norm
in eval mode and average pooling keep their gradients, which already are their multipliers. The
target score is computed inside the pass, so a sigmoid probability is rescaled too, and
summation-to-delta holds: sum(attribution) = y(x) - y(x0), reported as ``extras["delta"]``
(non-zero only where a step that is neither linear nor element-wise, such as softmax, attention or
instance/layer normalisation, sits between input and score).

Captum's ``DeepLift`` rescales only modules of its own list (ReLU, ELU, LeakyReLU, Sigmoid, Tanh,
Softplus, MaxPool, Softmax), each used once in the network: a functional ReLU (``torch.relu`` in a
forward), a PReLU or a GELU keeps its plain gradient there, and a module called twice (torchvision's
ResNet blocks reuse their ReLU) is refused. ``nonlinearities="captum"`` reproduces its choice of
modules (without the refusal); the default follows the paper. Where an activation module feeds a
max-pooling module directly (``nn.ReLU()`` then ``nn.MaxPool2d``, the usual CNN stem), Captum's
module hooks lose summation-to-delta (residuals of 0.03 to 0.13 on a logit of about 0.1, measured in
``tests/test_deeplift.py``) and its attributions differ from these; with one linear step between the
two modules, or none of the pair, the two are equal (measured difference 0.0). Max pooling routes by
accumulation, so overlapping windows (a ResNet's 3 x 3 / 2 stem) lose nothing.

Shrikumar et al., "Learning important features through propagating activation differences",
ICML 2017; Lundberg & Lee, "A unified approach to interpreting model predictions", NeurIPS 2017.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import InputAttribution, rows_for
from pellucid.explainers.gradients import check_background, gradient_rows, make_baseline
from pellucid.explainers.guided import mode_in_modules
from pellucid.explainers.registry import register

ELEMENTWISE = (
    F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_, torch.Tensor.relu_,
    F.leaky_relu, F.elu, F.selu, torch.selu, F.celu, F.prelu, torch.prelu, F.gelu, F.silu, F.mish,
    F.softplus, F.relu6, F.hardtanh, torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, torch.tanh,
    torch.Tensor.tanh, F.tanh,
)
MAX_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
CAPTUM_MODULES = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.MaxPool1d,
                  nn.MaxPool2d, nn.MaxPool3d)
NONLINEARITIES = ("all", "captum")


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.chunk(2)


class _Rescale(torch.autograd.Function):
    """f on the doubled batch [z; z0]; backward: g * (f(z) - f(z0)) / (z - z0) on both halves,
    g * f'(z) where |z - z0| < eps."""

    @staticmethod
    def forward(ctx, z, fn, eps):
        out = fn(z)
        ctx.fn, ctx.eps = fn, eps
        ctx.save_for_backward(z, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, out = ctx.saved_tensors
        (zi, zr), (oi, orf) = _halves(z), _halves(out)
        d_in, d_out = torch.cat([zi - zr] * 2), torch.cat([oi - orf] * 2)
        small = d_in.abs() < ctx.eps
        rescaled = grad * d_out / torch.where(small, 1.0, d_in)
        if not small.any():
            return rescaled, None, None
        with torch.enable_grad():  # f'(z) where z and z0 coincide
            leaf = z.detach().requires_grad_(True)
            (plain,) = torch.autograd.grad(ctx.fn(leaf), leaf, grad)
        return torch.where(small, plain, rescaled), None, None


class _RescaleMaxPool(torch.autograd.Function):
    """Max pooling on [z; z0]; backward: the gradient of the pooled difference, routed by the
    doubled batch's argmax positions, over the input difference (Captum's rule)."""

    @staticmethod
    def forward(ctx, z, dims, kwargs, eps):
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        out, indices = pool(z, **kwargs, return_indices=True)
        ctx.eps = eps
        ctx.save_for_backward(z, out, indices)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, out, indices = ctx.saved_tensors

        def up(g):  # accumulated: with overlapping windows one position wins several maxima
            flat = torch.zeros(*z.shape[:2], z[0, 0].numel(), dtype=g.dtype, device=g.device)
            return flat.scatter_add_(2, indices.flatten(2), g.flatten(2)).view_as(z)

        (zi, zr), (oi, orf) = _halves(z), _halves(out)
        top = torch.maximum(oi, orf)
        a, b = _halves(up(grad * torch.cat([top - orf, oi - top])))
        routed = torch.cat([a + b] * 2)
        d_in = torch.cat([zi - zr] * 2)
        small = d_in.abs() < ctx.eps
        return torch.where(small, up(grad), routed / torch.where(small, 1.0, d_in)), None, None, None


def _pool_kwargs(args: tuple, kwargs: dict) -> dict:
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    out = dict(zip(names, args[1:], strict=False))
    out.update({k: v for k, v in kwargs.items() if k in names})
    return out


class _RescaleMode(TorchFunctionMode):
    """Routes element-wise activations and max pooling of a doubled batch through the Rescale rule
    (``modules_only``: only those called inside a module of Captum's list); counts them."""

    def __init__(self, eps: float, modules_only: bool) -> None:
        super().__init__()
        self.eps, self.modules_only, self.inside, self.rescaled = eps, modules_only, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.modules_only and not self.inside:
            return func(*args, **kwargs)
        if func in ELEMENTWISE and isinstance(args[0], torch.Tensor):
            self.rescaled += 1
            rest = {k: v for k, v in kwargs.items() if k != "inplace"}
            extra = args[1:]
            if func in (F.relu_, torch.relu_, torch.Tensor.relu_):
                func = torch.relu
            elif func in (F.relu, F.leaky_relu, F.elu, F.selu, F.celu, F.relu6, F.hardtanh):
                extra = tuple(a for a in extra if not isinstance(a, bool))  # the inplace flag

            def fn(z, func=func, extra=extra, rest=rest):
                return func(z, *extra, **rest)
            return _Rescale.apply(args[0], fn, self.eps)
        if func in MAX_POOLS and not kwargs.get("return_indices") and \
                not (len(args) > 6 and args[6]):
            pool = _pool_kwargs(args, kwargs)
            if pool.get("dilation", 1) not in (1, (1,) * MAX_POOLS[func]) or pool.get("ceil_mode"):
                raise ConfigError("deeplift: max pooling with dilation or ceil_mode is not supported")
            self.rescaled += 1
            return _RescaleMaxPool.apply(args[0], MAX_POOLS[func], pool, self.eps)
        return func(*args, **kwargs)


def rescaled(model: nn.Module, eps: float, modules_only: bool):
    """Within the block, a forward pass of a doubled batch [inputs; baselines] is differentiated by
    DeepLIFT's Rescale rule; yields the mode (``.rescaled``: how many operations were)."""
    return mode_in_modules(_RescaleMode(eps, modules_only), model,
                           CAPTUM_MODULES if modules_only else None)


def deeplift_pairs(runner, model, inputs: torch.Tensor, baselines: torch.Tensor, bound, rows,
                   eps: float, nonlinearities: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(attributions, summation-to-delta residuals) of each row of ``inputs`` against the same row
    of ``baselines``, in one doubled forward and one backward."""
    n = inputs.shape[0]
    with torch.enable_grad(), rescaled(model, eps, nonlinearities == "captum") as mode:
        leaf = inputs.clone().requires_grad_(True)
        out = runner.forward(torch.cat([leaf, baselines]))
        scores = bound.score(out, torch.cat([rows, rows]))
        # both halves, as Captum: max pooling routes the baseline half's gradient into the input's
        (grad,) = runner.backward(scores.sum(), [leaf])
    if mode.rescaled == 0:
        raise ConfigError(f"{name}: the model runs no non-linearity DeepLIFT rescales; its "
                          f"attribution would be input x gradient under another name")
    attr = ((inputs - baselines) * grad).detach()
    delta = attr.flatten(1).sum(1) - (scores[:n] - scores[n:]).detach()
    return attr, delta


def _check(nonlinearities: str, eps: float) -> None:
    if nonlinearities not in NONLINEARITIES:
        raise ConfigError(f"nonlinearities must be one of {NONLINEARITIES}, got {nonlinearities!r}")
    if not eps > 0:
        raise ConfigError(f"eps must be > 0, got {eps}")


@register
@dataclass
class DeepLift(InputAttribution):
    """DeepLIFT with the Rescale rule against one baseline (Shrikumar et al. 2017):
    (x - x0) * m, the multipliers m back-propagated with (f(z) - f(z0)) / (z - z0) at each
    non-linearity; ``baseline`` as integrated gradients (``"zeros"``, ``"blur"``, ``"mean"``, a
    number or a tensor); ``nonlinearities="captum"`` rescales only Captum's modules."""

    baseline: str | float | torch.Tensor = "zeros"
    blur_sigma: float = 5.0
    background: torch.Tensor | None = None
    nonlinearities: str = "all"
    eps: float = 1e-10
    name: ClassVar[str] = "deeplift"

    def __post_init__(self) -> None:
        _check(self.nonlinearities, self.eps)

    def attribute(self, runner, model, inputs, bound, output):
        base = make_baseline(self.baseline, inputs, self.blur_sigma, self.background)
        attr, delta = deeplift_pairs(runner, model, inputs, base, bound, rows_for(inputs), self.eps,
                                     self.nonlinearities, self.name)
        return attr, {"delta": delta, "baseline": base}


@register
@dataclass
class DeepLiftShap(InputAttribution):
    """DeepLiftShap: DeepLIFT averaged over every baseline of ``background`` (or the first
    ``max_baselines`` of it), (1/K) sum_k (x - x0_k) * m_k (Lundberg & Lee 2017; Captum's
    ``DeepLiftShap``), ``batch_size`` rows per doubled forward."""

    background: torch.Tensor | None = None
    max_baselines: int = 16
    nonlinearities: str = "all"
    eps: float = 1e-10
    batch_size: int | None = None
    name: ClassVar[str] = "deepliftshap"
    requires: ClassVar[frozenset[str]] = frozenset({"background"})

    def __post_init__(self) -> None:
        _check(self.nonlinearities, self.eps)
        if self.max_baselines < 1:
            raise ConfigError(f"max_baselines must be >= 1, got {self.max_baselines}")

    def attribute(self, runner, model, inputs, bound, output):
        if self.background is None:
            raise ConfigError(f"{self.name} needs background= (N, C, *spatial) reference images")
        check_background(self.background, inputs)
        background = self.background[:self.max_baselines].to(inputs)
        b, k = inputs.shape[0], background.shape[0]
        rows = rows_for(inputs)
        per_call = max(1, gradient_rows(self.batch_size, model, inputs) // (2 * b))
        total = torch.zeros_like(inputs)
        deltas = torch.zeros(b, dtype=inputs.dtype, device=inputs.device)
        for start in range(0, k, per_call):
            chunk = range(start, min(start + per_call, k))
            x = inputs.repeat(len(chunk), *([1] * (inputs.ndim - 1)))
            base = torch.cat([background[j:j + 1].expand_as(inputs) for j in chunk])
            attr, delta = deeplift_pairs(runner, model, x, base, bound,
                                         rows.repeat(len(chunk)), self.eps, self.nonlinearities,
                                         self.name)
            total += attr.view(len(chunk), *inputs.shape).sum(0)
            deltas += delta.view(len(chunk), b).sum(0)
        return total / k, {"delta": deltas / k}
