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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import InputAttribution
from pellucid.explainers.canonizers import canonized, canonizers_for
from pellucid.explainers.registry import register
from pellucid.runtime import full_precision

COMPOSITES = ("epsilonplusflat", "epsilongammabox", "epsilonalpha2beta1")
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


@register
@dataclass
class LRP(InputAttribution):
    """Layer-wise relevance propagation with zennit composites and pellucid's canonizers."""

    composite: str = "epsilonplusflat"
    rules: dict[str, str] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    family: ClassVar[str] = "relevance"
    name: ClassVar[str] = "lrp"

    def attribute(self, runner, model, inputs, bound, output):
        if getattr(bound, "kind", "logit") != "logit":
            raise ConfigError("LRP explains logits; use a target with kind='logit'")
        composite = build_composite(self.composite, model, inputs, self.rules, self.low, self.high)
        with canonized(model, composite), torch.enable_grad(), full_precision():
            x = inputs.clone().requires_grad_(True)
            out = runner.forward(x)
            score = bound.score(out)
            (weight,) = torch.autograd.grad(score.sum(), out, retain_graph=True)
            start = (out * weight).detach()
            runner.cost.backward_passes += 1
            (relevance,) = torch.autograd.grad(out, x, grad_outputs=start)
        total = relevance.flatten(1).sum(1).detach()
        return relevance.detach(), {"relevance_sum": total, "explained_score": score.detach(),
                                    "conservation": (total / score.detach()).cpu()}
