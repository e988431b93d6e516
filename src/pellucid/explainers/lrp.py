"""Layer-wise relevance propagation through zennit (Bach et al. 2015; Montavon et al. 2019).

Composites (rule per layer type, zennit's definitions):

- ``epsilonplusflat`` (default): first layer Flat, other convolutions z+ (ZPlus), dense layers
  epsilon (z + 1e-6 sign(z));
- ``epsilongammabox``: first layer z^B (box bounds ``low``/``high``, default the input's min/max),
  convolutions gamma (0.25), dense layers epsilon;
- ``epsilonalpha2beta1``: convolutions alpha=2 beta=1, dense layers epsilon;

all with Pass for activations and BatchNorm and Norm for sums and average pooling. ``rules`` maps
layer names to rules ("epsilon", "zplus", "alpha2beta1", "gamma", "flat", "pass") that override the
composite for those layers. Canonizers for every zoo network come from :mod:`canonizers`.

The starting relevance is the model output times the target's gradient with respect to it, i.e.
the explained logit (classification) or the class-k logits inside the region (segmentation), so
the input relevance sums to the explained score when no relevance is absorbed by biases.

Transformers (a model with attention blocks) get AttnLRP instead (Achtibat et al., ICML 2024), as
gradient x input through modified gradients: linear layers and convolutions the epsilon rule (eps ->
0, plain gradient x input); LayerNorm and InstanceNorm the identity rule on the normalisation (the
standard deviation held constant); element-wise activations (GELU, SiLU, ReLU, ...) the identity
rule (dR/dx = f(x)/x); softmax gradient x input (their softmax rule); the two products of
attention, q k^T and A v, the uniform rule (each factor half the relevance: the gradient reaching
q and k divided by 4, v by 2). ``attention="cp"`` holds the attention probabilities constant
instead (CP-LRP, Ali et al., ICML 2022). The attention must run through
``scaled_dot_product_attention`` (torchvision, timm, Hugging Face, MONAI's ``SABlock``, switched to
it for the call); an attention that computes its own softmax (Swin) is refused.

Speed, the same relevance: zennit computes each layer's rule by running the layer again inside
the backward pass and replaces the layer's input gradient with the result, so the layer's own
backward in the model's pass is computed only to be discarded; here a convolution or linear layer
under an active rule skips it (its backward returns zeros that the rule's hook replaces), and
layers with at most 8 channels on one side compute their input gradients as forward convolutions
(:func:`pellucid.inference.gradient_copy.few_channel_convolutions`). Measured on the grid's
ResNet-18 (``benchmarks/vs_peers.py``): LRP 1.32x zennit, CRP 1.30x zennit-crp, relevance equal.

Conservation: ``extras["conservation"]`` holds, per sample, the relevance sum over the explained
score. Biases, epsilon and BatchNorm shifts absorb some relevance in a trained network (0.4-0.8 on
pellucid's phantom ResNet-18), so it is reported, not forced; outside ``CONSERVATION_TOLERANCE``
(a quarter to four times the score, or of the other sign) the map no longer decomposes the score
and pellucid warns in one line naming the share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from pellucid.errors import ConfigError, ModelError
from pellucid.explainers.attention import capture_attention
from pellucid.explainers.attribution import REDUCTIONS, InputAttribution, reduce_channels
from pellucid.explainers.base import Explanation, attention_blocks
from pellucid.explainers.canonizers import canonized, canonizers_for
from pellucid.explainers.registry import register
from pellucid.inference.gradient_copy import few_channel_convolutions
from pellucid.progress import warn
from pellucid.runtime import full_precision

CONSERVATION_TOLERANCE = (0.25, 4.0)  # relevance sum / explained score outside this range: warned


def check_conservation(ratio: torch.Tensor, what: str = "lrp") -> None:
    """One warning when a sample's relevance sum / score lies outside ``CONSERVATION_TOLERANCE``
    (samples whose score is zero have no ratio and are left out)."""
    r = ratio.detach().float().cpu()
    r = r[torch.isfinite(r)]
    low, high = CONSERVATION_TOLERANCE
    bad = r[(r < low) | (r > high)]
    if len(bad):
        worst = float(bad[(bad - 1).abs().argmax()])
        warn(f"{what}: the relevance of {len(bad)} of {len(r)} sample(s) sums to {worst:.1%} of the "
             f"explained score (tolerance {low:.0%} to {high:.0%}): biases or the rules absorb or "
             f"create relevance here, so the map does not decompose the score")

COMPOSITES = ("epsilonplusflat", "epsilongammabox", "epsilonalpha2beta1")
ATTENTION_RULES = ("attnlrp", "cp")
# element-wise activations with f(0) = 0, so that f(x) / x stays bounded near 0
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Tanh, nn.Mish,
                nn.Hardswish)


class _Scale(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``factor`` (the uniform rule's split)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _IdentityRule(torch.autograd.Function):
    """y = f(x) exactly; the gradient is f(x) / x, so that x * grad passes the relevance on."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x.clone())  # an in-place activation must not overwrite x
        safe = torch.where(x.abs() > 1e-12, x, torch.full_like(x, 1e-12))
        ctx.save_for_backward(y / safe)
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class _NormRule(torch.autograd.Function):
    """y = norm(x) exactly; the gradient of (x - mean) / std * w with std held constant."""

    @staticmethod
    def forward(ctx, x, fn, dims, weight, eps):
        y = fn(x).clone()  # not a view: the next layer may work in place
        std = torch.sqrt(x.float().var(dims, unbiased=False, keepdim=True) + eps)
        ctx.dims = dims
        ctx.save_for_backward(std.to(x.dtype), weight if weight is not None else torch.ones(()))
        return y

    @staticmethod
    def backward(ctx, grad):
        std, weight = ctx.saved_tensors
        gw = grad * weight
        return (gw - gw.mean(ctx.dims, keepdim=True)) / std, None, None, None, None


def _norm_dims(module: nn.Module, ndim: int) -> tuple[int, ...] | None:
    if isinstance(module, nn.LayerNorm):
        return tuple(range(-len(module.normalized_shape), 0))
    if isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)) \
            and not module.track_running_stats:  # with running statistics it is affine: no rule
        return tuple(range(2, ndim))
    return None


@contextmanager
def attnlrp_rules(model: nn.Module, attention: str) -> Iterator[None]:
    """Inside, a backward pass of ``model`` computes AttnLRP (or CP-LRP) relevance / input: the
    rules of the module docstring, set on module instances and undone on exit."""
    if attention not in ATTENTION_RULES:
        raise ConfigError(f"attention must be one of {ATTENTION_RULES}, got {attention!r}")
    restore: list[tuple[object, str, object]] = []

    def swap(obj: object, attr: str, value: object) -> None:
        restore.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, value)

    for module in model.modules():
        if _norm_dims(module, 3) is not None:
            def norm(x, m=module, f=module.forward):
                weight = getattr(m, "weight", None)
                if weight is not None and not isinstance(m, nn.LayerNorm):
                    weight = weight.view(-1, *([1] * (x.ndim - 2)))  # per channel
                return _NormRule.apply(x, f, _norm_dims(m, x.ndim), weight, float(m.eps))
            swap(module, "forward", norm)
        elif isinstance(module, _ACTIVATIONS) or "gelu" in type(module).__name__.lower() \
                or type(module).__name__.endswith("Activation"):
            swap(module, "forward", lambda x, f=module.forward: _IdentityRule.apply(x, f))
        if hasattr(module, "fused_attn"):  # timm: its fused path is scaled_dot_product_attention
            swap(module, "fused_attn", True)
        if hasattr(module, "use_flash_attention") and getattr(module, "rel_positional_embedding",
                                                             None) is None:
            swap(module, "use_flash_attention", True)  # MONAI's SABlock, likewise

    def rules(q, k, v):
        if attention == "cp":
            return q.detach(), k.detach(), v
        return _Scale.apply(q, 0.25), _Scale.apply(k, 0.25), _Scale.apply(v, 0.5)

    try:
        with capture_attention(model, on_qkv=rules, explicit_softmax="refuse") as record:
            yield record
    finally:
        for obj, attr, old in reversed(restore):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


_MISSING = object()
RULES = ("epsilon", "zplus", "alpha2beta1", "gamma", "flat", "pass")


def _rule(name: str):
    from zennit import rules

    table = {"epsilon": lambda: rules.Epsilon(1e-6), "zplus": rules.ZPlus,
             "alpha2beta1": lambda: rules.AlphaBeta(2.0, 1.0), "gamma": lambda: rules.Gamma(0.25),
             "flat": rules.Flat, "pass": rules.Pass}
    if name not in table:
        raise ConfigError(f"unknown LRP rule {name!r}; rules: {', '.join(RULES)}")
    return table[name]()


def build_composite(name: str, model, inputs: torch.Tensor, rules: dict[str, str],
                    low: float | None, high: float | None):
    from zennit import composites
    from zennit import rules as zrules

    norms = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
             torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.Dropout2d,
             torch.nn.Dropout3d)
    layer_map = [(norms, zrules.Pass())]
    canon = canonizers_for(model)
    if name == "epsilonplusflat":
        base = composites.EpsilonPlusFlat(layer_map=layer_map, canonizers=canon)
    elif name == "epsilonalpha2beta1":
        base = composites.EpsilonAlpha2Beta1(layer_map=layer_map, canonizers=canon)
    elif name == "epsilongammabox":
        lo = float(inputs.min()) if low is None else low
        hi = float(inputs.max()) if high is None else high
        base = composites.EpsilonGammaBox(low=lo, high=hi, layer_map=layer_map, canonizers=canon)
    else:
        raise ConfigError(f"unknown LRP composite {name!r}; composites: {', '.join(COMPOSITES)}")
    if not rules:
        return base
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(set(rules) - names)
    if unknown:
        raise ConfigError(f"LRP rules name unknown layer(s) {', '.join(unknown)}")
    name_map = [((layer,), _rule(rule)) for layer, rule in rules.items()]
    return composites.MixedComposite([composites.NameMapComposite(name_map=name_map), base])


class _DiscardedBackward(torch.autograd.Function):
    """``y = f(x)`` with ``dL/dx = 0``: for a layer whose input gradient a zennit rule replaces
    whole (the rule's hook on the layer's input returns the relevance in its place), so the
    layer's own backward would be computed only to be thrown away."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.like = (x.shape, x.dtype, x.device)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.like
        return torch.zeros(shape, dtype=dtype, device=device), None


def _rule_replaces_gradient(module: nn.Module) -> bool:
    """Whether an active zennit rule (a BasicHook: epsilon, z+, flat, gamma, alpha-beta, z^B)
    is registered on ``module``, whose backward then returns the relevance in place of the input
    gradient."""
    from zennit.core import BasicHook

    return any(isinstance(getattr(h, "__self__", None), BasicHook) and h.__self__.active
               for h in module._forward_pre_hooks.values())


@contextmanager
def _no_discarded_backward(model: nn.Module) -> Iterator[int]:
    """Inside, a convolution or linear layer under an active zennit rule skips its own backward in
    the model's pass (``_DiscardedBackward``); the rule's recomputation of the layer, which runs
    inside the backward pass, keeps its gradient. Halves the convolution backwards of LRP and CRP.
    Yields how many layers."""
    if not hasattr(torch._C, "_current_graph_task_id"):  # no way to tell the two passes apart
        yield 0
        return
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    swapped = []
    for module in model.modules():
        if isinstance(module, layers) and _rule_replaces_gradient(module):
            previous = module.__dict__.get("forward")

            def forward(x, m=module, plain=module.forward):
                if torch._C._current_graph_task_id() == -1 and x.requires_grad and \
                        torch.is_grad_enabled() and _rule_replaces_gradient(m):
                    return _DiscardedBackward.apply(x, plain)
                return plain(x)
            module.forward = forward
            swapped.append((module, previous))
    try:
        yield len(swapped)
    finally:
        for module, previous in swapped:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextmanager
def _runs_once(model: nn.Module) -> Iterator[None]:
    """Refuse a model whose weighted layers run more than once in one forward pass (a sliding
    window, test-time mirroring, an ensemble, shared weights), at the second run: a rule's hook
    keeps one run's input, so the relevance of the others would come from the wrong one."""
    runs: Counter[str] = Counter()

    def count(name: str) -> None:
        runs[name] += 1
        if runs[name] > 1:
            raise ModelError(f"lrp: layer {name} runs more than once in one forward pass (a sliding "
                             f"window, test-time mirroring, an ensemble or shared weights): LRP's "
                             f"rules keep one run's input; use a gradient or perturbation method")

    handles = [module.register_forward_hook(lambda mod, inp, out, name=name: count(name))
               for name, module in model.named_modules()
               if name and not any(True for _ in module.children())
               and any(True for _ in module.parameters(recurse=False))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@register
@dataclass
class LRP(InputAttribution):
    """Layer-wise relevance propagation with zennit composites and pellucid's canonizers."""

    composite: str = "epsilonplusflat"
    attention: str = "attnlrp"
    rules: dict[str, str] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    family: ClassVar[str] = "relevance"
    name: ClassVar[str] = "lrp"

    def _explain(self, runner, model, inputs, target, layer, handles):
        """zennit's composites: one forward with the rules registered binds the target and is the
        one differentiated (no separate clean pass); transformers go through AttnLRP."""
        if attention_blocks(model):
            return super()._explain(runner, model, inputs, target, layer, handles)
        if self.channel_reduce not in REDUCTIONS:
            raise ConfigError(f"channel_reduce must be one of {REDUCTIONS}, got "
                              f"{self.channel_reduce!r}")
        composite = build_composite(self.composite, model, inputs, self.rules, self.low, self.high)
        with canonized(model, composite), torch.enable_grad(), full_precision(), \
                _runs_once(model), few_channel_convolutions(model), _no_discarded_backward(model):
            self.before_forward(model, layer, handles)
            x = inputs.clone().requires_grad_(True)
            out = runner.forward(x)
            bound = self.bind(target, out.detach())
            if getattr(bound, "kind", "logit") != "logit":
                raise ConfigError(f"{self.name} explains logits; use a target with kind='logit'")
            relevance, extras = self.propagate(runner, x, out, bound)
        relevance = relevance.detach()
        return Explanation(reduce_channels(relevance, self.channel_reduce), self.name, bound, None,
                           raw=relevance, output=out.detach(), extras=extras)

    def before_forward(self, model, layer, handles) -> None:
        """Hooks a subclass needs on the rule-modified forward (CRP: the conditioned layer)."""

    def propagate(self, runner, x, out, bound) -> tuple[torch.Tensor, dict]:
        """The input relevance of the target's score through the registered rules, and extras."""
        score = bound.score(out)
        (weight,) = torch.autograd.grad(score.sum(), out, retain_graph=True)
        start = (out * weight).detach()
        runner.cost.backward_passes += 1
        (relevance,) = torch.autograd.grad(out, x, grad_outputs=start)
        total = relevance.flatten(1).sum(1).detach()
        ratio = (total / score.detach()).cpu()
        check_conservation(ratio)
        return relevance, {"relevance_sum": total, "explained_score": score.detach(),
                           "conservation": ratio}

    def attribute(self, runner, model, inputs, bound, output):
        """Transformers (the composites run in ``_explain``)."""
        if getattr(bound, "kind", "logit") != "logit":
            raise ConfigError("LRP explains logits; use a target with kind='logit'")
        return self.transformer_relevance(runner, model, inputs, bound)

    def transformer_relevance(self, runner, model, inputs, bound):
        """AttnLRP / CP-LRP (module docstring): x * the rule-modified gradient of the score."""
        if self.rules:
            raise ConfigError("lrp: per-layer rules apply to zennit's composites, not to AttnLRP")
        with attnlrp_rules(model, self.attention) as record, torch.enable_grad(), full_precision():
            x = inputs.clone().requires_grad_(True)
            out = runner.forward(x)
            score = bound.score(out)
            if not record:
                raise ConfigError("lrp: the model's attention blocks computed no attention through "
                                  "scaled_dot_product_attention; AttnLRP cannot reach them")
            runner.cost.backward_passes += 1
            (grad,) = torch.autograd.grad(score.sum(), x)
        relevance = (x * grad).detach()
        total = relevance.flatten(1).sum(1)
        ratio = (total / score.detach()).cpu()
        check_conservation(ratio, f"lrp ({self.attention})")
        return relevance, {"relevance_sum": total, "explained_score": score.detach(),
                           "conservation": ratio,
                           "rules": f"AttnLRP ({self.attention})"}
