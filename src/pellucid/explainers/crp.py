"""Concept relevance propagation (Achtibat et al., "From attribution maps to human-understandable
explanations through concept relevance propagation", Nature Machine Intelligence 2023).

A concept is a set of channels of one layer. The conditional heatmap R(x | concept, y) is LRP of
the target's score (the same composites and canonizers as :mod:`lrp`) in two steps: the relevance
is propagated from the output to the layer's output; there every channel outside the concept is
set to zero; the rest is propagated from that layer to the input. Relevance that bypasses the
layer (a skip connection around it) is left out, as zennit-crp's default (``exclude_parallel``).
The concept's share of the layer's relevance, sum over the concept / sum over all channels, is in
``extras["concept_share"]``, each channel's relevance (zennit-crp's ``ChannelConcept.attribute``)
in ``extras["channel_relevance"]``; summed over every channel of a layer that all paths cross, the
conditional heatmaps give the plain LRP map (tested).

``concepts``: channel indices (one list for every sample, or one list per sample); by default the
``top`` channels of each sample with the largest relevance at the layer, recorded in
``extras["concepts"]``. ``layer``: any layer with channels first (default the CAM layer). Equal to
zennit-crp's ``CondAttribution`` with the same composite (tested within 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.explainers.base import attention_blocks
from pellucid.explainers.lrp import LRP
from pellucid.explainers.registry import register


def _concept_mask(relevance: torch.Tensor, concepts, top: int) -> tuple[torch.Tensor, list]:
    """(B, C, 1, ...) 0/1 channel mask and the chosen channels per sample."""
    b, c = relevance.shape[:2]
    if concepts is None:
        per_channel = relevance.flatten(2).sum(2)
        chosen = per_channel.topk(min(top, c), dim=1).indices.tolist()
    else:
        values = list(concepts)
        if values and all(isinstance(v, int) for v in values):
            chosen = [values] * b
        elif len(values) == b:
            chosen = [list(v) for v in values]
        else:
            raise ConfigError(f"crp: concepts must be channel indices or one list per sample "
                              f"({b}), got {concepts!r}")
        bad = sorted({k for row in chosen for k in row if not 0 <= int(k) < c})
        if bad or not all(chosen):
            raise ConfigError(f"crp: the layer has {c} channels; concepts {bad or 'empty'} "
                              f"are not among them")
    mask = torch.zeros(b, c, device=relevance.device, dtype=relevance.dtype)
    for i, row in enumerate(chosen):
        mask[i, row] = 1
    return mask.view(b, c, *([1] * (relevance.ndim - 2))), chosen


@register
@dataclass
class CRP(LRP):
    """Concept relevance propagation: LRP conditioned on a set of channels of one layer."""

    concepts: list | tuple | None = None
    top: int = 1
    name: ClassVar[str] = "crp"
    needs_layer: ClassVar[bool] = True

    def _explain(self, runner, model, inputs, target, layer, handles):
        if attention_blocks(model):
            raise ConfigError("crp conditions zennit's LRP composites on a layer's channels; a "
                              "transformer is explained by AttnLRP (lrp), which it does not cover")
        if self.top < 1:
            raise ConfigError(f"crp: top must be >= 1, got {self.top}")
        return super()._explain(runner, model, inputs, target, layer, handles)

    def before_forward(self, model, layer, handles) -> None:
        self._layer, self._seen = layer, {}
        module = model.get_submodule(layer)
        handles.append(module.register_forward_hook(
            lambda m, i, o: self._seen.__setitem__("out", o)))

    def propagate(self, runner, x, out, bound):
        feature, self._seen = self._seen.get("out"), None
        if not isinstance(feature, torch.Tensor) or feature.ndim < 2 or feature.shape[0] != x.shape[0]:
            raise ConfigError(f"crp: layer {self._layer} gives no (batch, channels, ...) tensor to "
                              f"condition on")
        score = bound.score(out)
        (weight,) = torch.autograd.grad(score.sum(), out, retain_graph=True)
        start = (out * weight).detach()
        (at_layer,) = torch.autograd.grad(out, feature, grad_outputs=start, retain_graph=True)
        mask, chosen = _concept_mask(at_layer.detach(), self.concepts, self.top)
        runner.cost.backward_passes += 1
        (relevance,) = torch.autograd.grad(feature, x, grad_outputs=at_layer * mask)
        layer_total = at_layer.flatten(1).sum(1).detach()
        share = (at_layer * mask).flatten(1).sum(1).detach() / layer_total
        return relevance, {"concepts": chosen, "layer": self._layer, "concept_share": share,
                           "explained_score": score.detach(),
                           "channel_relevance": at_layer.flatten(2).sum(2).detach()}
