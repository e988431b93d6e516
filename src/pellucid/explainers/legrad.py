"""LeGrad: the sensitivity of each block's own class score to that block's attention (Bousselham
et al., "LeGrad: an explainability method for vision transformers via feature formation
sensitivity", 2024).

For every transformer block l: the block's tokens z_l are read out by the model's own final norm and
head, s_l = head(norm(pool(z_l))) (the target's score of those logits); the gradient of s_l with
respect to the block's attention probabilities A_l (B, heads, N, N) is clipped at zero and averaged
over heads and query tokens, giving one relevance per key token. The patch tokens' relevances
(prefix tokens dropped) are averaged over the blocks, reshaped to the patch grid and min-max
scaled; the map is that grid up-sampled to the input. Attention values are not multiplied in.

``pool="mean"`` averages the tokens (torchcam 0.5.0's ``LeGrad`` for torchvision's ViT, the
reference); ``pool="token"`` reads the class token, as torchvision's and timm's heads do.
``blocks``: the last k blocks (default all, as the paper). Supported: torchvision's
``VisionTransformer`` (``encoder.layers``, ``encoder.ln``, ``heads``), timm's (``blocks``,
``norm``, ``head``) and MONAI's ``ViT`` (``blocks``, ``norm``, ``classification_head``: pellucid's
zoo ViT); other models and segmentation targets are refused in one line: the method is defined
through a classifier's head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pellucid.errors import ConfigError
from pellucid.explainers.attention import _layers, capture_attention
from pellucid.explainers.base import Explainer, Explanation, ModelRunner, postprocess
from pellucid.explainers.layouts import detect_layout, patch_size
from pellucid.explainers.registry import register
from pellucid.targets import BoundSegmentationTarget, BoundTarget, Target

POOLS = ("mean", "token")


def vit_parts(model: nn.Module) -> tuple[list[nn.Module], nn.Module, nn.Module]:
    """(blocks, final norm, head) of a torchvision, timm or MONAI vision transformer."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers") and hasattr(encoder, "ln") and \
            hasattr(model, "heads"):
        return list(encoder.layers), encoder.ln, model.heads
    blocks, norm = getattr(model, "blocks", None), getattr(model, "norm", None)
    head = getattr(model, "head", None) or getattr(model, "classification_head", None)  # MONAI
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and norm is not None and head is not None:
        fc_norm = getattr(model, "fc_norm", None)
        if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
            raise ConfigError("legrad: this timm ViT pools before its fc_norm; its per-block readout "
                              "is not the final norm and head")
        return list(blocks), norm, head
    raise ConfigError("legrad reads each block through the model's final norm and head: supported "
                      "are torchvision's and timm's VisionTransformer; use chefer or a CAM")


@register
@dataclass
class LeGrad(Explainer):
    """LeGrad (Bousselham et al. 2024): mean over blocks of E_{heads, queries}[ReLU(ds_l/dA_l)],
    s_l the class score read from block l's tokens by the final norm and head."""

    blocks: int | None = None
    pool: str = "mean"
    grid: tuple[int, ...] | None = None
    prefix_tokens: int | None = None
    upsample: str = "linear"
    normalize: str = "minmax"
    name: ClassVar[str] = "legrad"
    family: ClassVar[str] = "attention"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(f"legrad: pool must be one of {POOLS}, got {self.pool!r}")
        if self.blocks is not None and self.blocks < 1:
            raise ConfigError(f"legrad: blocks must be >= 1, got {self.blocks}")

    def _explain(self, runner: ModelRunner, model: nn.Module, inputs: torch.Tensor,
                 target: Target | BoundTarget | None, layer: str | None,
                 handles: list) -> Explanation:
        blocks, norm, head = vit_parts(model)
        chosen = blocks[-self.blocks:] if self.blocks else blocks
        tokens: dict[int, torch.Tensor] = {}
        hooks = [b.register_forward_hook(lambda m, i, o, k=k: tokens.__setitem__(k, o))
                 for k, b in enumerate(blocks)]
        x = inputs.clone().requires_grad_(True)
        try:
            with torch.enable_grad(), capture_attention(model) as record:
                output = runner.forward(x)
                bound = self.bind(target, output)
                if isinstance(bound, BoundSegmentationTarget):
                    raise ConfigError("legrad is defined through a classifier's head; a "
                                      "segmentation target is refused (use chefer or a CAM)")
                layers = _layers(record, inputs.shape[0])
                if len(layers) != len(blocks):
                    raise ConfigError(f"legrad: {len(layers)} attention maps for {len(blocks)} "
                                      f"blocks; each block must attend once")
                n = layers[0].shape[-1]
                layout = detect_layout((inputs.shape[0], n, 1), tuple(inputs.shape[2:]), "tokens",
                                       self.grid, self.prefix_tokens, patch_size(model),
                                       "the attention")
                maps = []
                for k in range(len(blocks) - len(chosen), len(blocks)):
                    z = tokens[k]
                    pooled = z.mean(1) if self.pool == "mean" else z[:, 0]
                    score = bound.score(head(norm(pooled))).sum()
                    (grad,) = runner.backward(score, [layers[k]], retain_graph=True)
                    maps.append(grad.detach().clamp_min(0).mean((1, 2))[:, layout.prefix:])
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            raw = torch.stack(maps).mean(0).float().reshape(inputs.shape[0], 1, *layout.grid)
            lo = raw.flatten(1).amin(1).view(-1, 1, *([1] * len(layout.grid)))
            hi = (raw - lo).flatten(1).amax(1).view(-1, 1, *([1] * len(layout.grid)))
            raw = (raw - lo) / (hi + 1e-8)  # torchcam's normalisation of the grid
            out = postprocess(raw, tuple(inputs.shape[2:]), False, self.upsample, self.normalize)
        return Explanation(out, self.name, bound, None, raw, output=output.detach(),
                           extras={"layout": layout.describe(), "blocks": len(chosen)})
