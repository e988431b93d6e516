"""High-resolution CAMs for segmentation and small findings: one CAM method run at several layers
(deep and shallow, encoder or decoder) and fused at input resolution.

Each layer's map is min-max scaled; maps of the shallower layers are first passed through
tanh(gamma * M / max M), gamma = 2, which damps their noisy low values (LayerCAM's hierarchical
fusion, Jiang et al. 2021, IEEE TIP); the maps are then combined by element-wise ``max``
(LayerCAM), ``mean`` or ``product`` (RefineCAM), and the result is min-max scaled again. Deep
layers give the class evidence, shallow layers the resolution. The default layers are the card's CAM
layer and the last layers of the next finer resolutions below the input's (layer4, layer3, layer2 of
a ResNet); for a U-Net, whose default layer is already the finest decoder stage below full resolution,
the decoder stage and the encoder stage at the same resolution. ``layers`` names any others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pellucid.errors import ConfigError
from pellucid.explainers.base import (
    Explainer,
    Explanation,
    ModelRunner,
    candidate_layers,
    default_layer,
    minmax,
)
from pellucid.explainers.registry import create, register
from pellucid.targets import BoundTarget, Target


def default_layers(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """The default CAM layer, then for each of the next ``count - 1`` finer resolutions (still
    below the input's) the last layer in execution order that has it: the earlier stages of a
    classifier. A U-Net's default layer is already its finest decoder stage, so there the second
    layer is the encoder stage at that resolution (the skip connection's features: the finest
    detail the network computes): the last layer of the first run of layers at that size."""
    deepest = default_layer(model, example)
    found = [f for f in candidate_layers(model, example) if f["layout"] == "channels_first"]
    shapes = {f["name"]: tuple(f["grid"]) for f in found}
    size = tuple(example.shape[2:])
    last_of: dict[tuple[int, ...], str] = {}
    for f in found:
        shape = shapes[f["name"]]
        finer = all(a > b for a, b in zip(shape, shapes[deepest], strict=True))
        if finer and all(a < b for a, b in zip(shape, size, strict=True)):
            last_of[shape] = f["name"]
    finer_sizes = sorted(last_of, key=lambda s: s[0])
    layers = [deepest] + [last_of[s] for s in finer_sizes[: count - 1]]
    if len(layers) == 1:
        encoder = None
        for f in found:
            if shapes[f["name"]] != shapes[deepest]:
                if encoder is not None:
                    break
                continue
            encoder = f["name"]
        related = encoder is None or deepest.startswith(encoder + ".") or \
            encoder.startswith(deepest + ".") or encoder == deepest
        if not related:
            layers.append(encoder)
    return layers


FUSIONS = ("max", "mean", "product")


@register
@dataclass
class FusedCAM(Explainer):
    """Fused CAM: one CAM method at several layers, fused at input resolution (LayerCAM-style);
    ``base_options`` go to the base method (e.g. ``{"upsample": "bspline"}``)."""

    base: str = "layercam"
    layers: tuple[str, ...] | None = None
    fuse: str = "max"
    gamma: float = 2.0
    base_options: dict | None = None
    name: ClassVar[str] = "fusedcam"
    family: ClassVar[str] = "cam"
    needs_layer: ClassVar[bool] = False

    def _explain(self, runner: ModelRunner, model: nn.Module, inputs: torch.Tensor,
                 target: Target | BoundTarget | None, layer: str | None,
                 handles: list) -> Explanation:
        if self.fuse not in FUSIONS:
            raise ConfigError(f"{self.name}: fuse must be one of {FUSIONS}, got {self.fuse!r}")
        method = create(self.base, **(self.base_options or {}))
        if method.family != "cam" or not method.needs_layer:
            raise ConfigError(f"{self.name}: base must be a layer CAM method, got {self.base!r}")
        layers = list(self.layers) if self.layers else default_layers(model, inputs[:1].detach())
        maps, bound, output, shapes = [], target, None, []
        for i, name in enumerate(layers):  # deepest first: its bound target is reused below
            exp = method.explain(model, inputs, target=bound, layer=name,
                                 activation=getattr(self, "_activation", None))
            bound, output = exp.target, exp.output if output is None else output
            if exp.raw is not None:
                shapes.append(tuple(exp.raw.shape[-(inputs.ndim - 2):]))
            runner.cost.forward_passes += exp.cost.forward_passes
            runner.cost.forward_samples += exp.cost.forward_samples
            runner.cost.backward_passes += exp.cost.backward_passes
            m = minmax(exp.attributions)
            if i > 0 and self.gamma > 0:  # shallower layers: damp the noisy low values
                m = torch.tanh(self.gamma * m / m.flatten(1).amax(1).clamp_min(1e-12).view(
                    -1, *([1] * (m.ndim - 1))))
            maps.append(m)
        stack = torch.stack(maps)
        fused = stack.amax(0) if self.fuse == "max" else stack.mean(0) if self.fuse == "mean" \
            else stack.prod(0)
        per_layer = stack[:, :, 0].transpose(0, 1)  # (B, layers, *spatial)
        return Explanation(minmax(fused), self.name, bound, ",".join(layers), raw=per_layer,
                           output=output, extras={"layers": layers, "map_shapes": shapes})


@register
@dataclass
class RefineCAM(FusedCAM):
    """RefineCAM (pytorch-grad-cam 1.5.7, arXiv 2605.14641): the product of one CAM method's
    min-max scaled maps at several layers, min-max scaled; a shallow layer's detail survives only
    where the deep layers agree, which denoises it. Grad-CAM++ by default, the layers as
    ``fusedcam``'s, no damping. (The peer's loop that means to rescale each layer's map to [0, 1]
    rebinds its loop variable and changes nothing; the maps it multiplies are already min-max
    scaled, so its output is this product.)"""

    base: str = "gradcampp"
    fuse: str = "product"
    gamma: float = 0.0
    name: ClassVar[str] = "refinecam"
