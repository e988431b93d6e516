"""Explanations read from a transformer's attention: attention rollout and gradient-weighted
attention (Chefer et al.).

Both need the attention probabilities A_l (B, heads, N, N) of every self-attention layer l. They
are captured while the model runs, whatever computes them: ``scaled_dot_product_attention``
(torchvision's ``nn.MultiheadAttention``, timm and Hugging Face with fused attention) is replaced
for the call by the explicit softmax(q k^T / sqrt(d) + mask) v, and softmax calls over the last
axis inside an attention module (timm, Hugging Face eager, MONAI's ``SABlock``) are recorded. Only
global self-attention over one token sequence qualifies; windowed attention (Swin) is refused.

==================  =====================================================================  =============
method              relevance of the tokens                                               paper
==================  =====================================================================  =============
rollout             R = Â_L ... Â_1, Â_l = rownorm(0.5 fuse_h(A_l) + 0.5 I)              Abnar 2020
chefer              R = I; for l = 1..L: R <- R + E_h[(dy/dA_l * A_l)^+] R                Chefer 2021b
==================  =====================================================================  =============

The map is r^T R over the patch tokens, reshaped to the patch grid: r is the class token's row
when the model has prefix tokens and explains a class, the mean over the tokens otherwise (a
mean-pooled classifier), and for a segmentation target the target region averaged onto the grid
(the tokens whose outputs make the score). ``fuse_h`` is the mean over heads (or ``max``/``min``,
Abnar & Zuidema's variants). Attention rollout is class-agnostic; the gradient-weighted rule is the
"generic attention-model explainability" rule of Chefer, Gur & Wolf (ICCV 2021), the gradient x
attention relevance update that replaces the LRP relevances of their CVPR 2021 method.
"""

from __future__ import annotations

import math
import threading
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.errors import ConfigError, ModelError
from pellucid.explainers.base import (
    Explainer,
    Explanation,
    ModelRunner,
    _is_attention,
    postprocess,
)
from pellucid.explainers.layouts import detect_layout, patch_size
from pellucid.explainers.registry import register
from pellucid.targets import BoundSegmentationTarget, BoundTarget, Target

FUSIONS = ("mean", "max", "min")


_CAPTURE = threading.Lock()  # one capture at a time; other threads keep the original functions


def _explicit_sdpa(record: list[torch.Tensor], softmax, original, owner: int, on_qkv=None):
    """``scaled_dot_product_attention`` written out, recording the probabilities; dropout is not
    applied (pellucid explains the model in eval mode). ``on_qkv`` may rewrite q, k, v first (the
    LRP rules of :mod:`pellucid.explainers.lrp`). Calls from other threads than ``owner`` go to
    ``original``."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        if threading.get_ident() != owner:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if on_qkv is not None:
            query, key, value = on_qkv(query, key, value)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        logits = query @ key.transpose(-2, -1) * scale
        if is_causal:
            n, m = logits.shape[-2:]
            causal = torch.ones(n, m, dtype=torch.bool, device=logits.device).tril()
            logits = logits.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        probs = softmax(logits, dim=-1)
        record.append(probs)
        return probs @ value
    return sdpa


@contextmanager
def capture_attention(model: nn.Module, on_qkv=None,
                      explicit_softmax: str = "record") -> Iterator[list[torch.Tensor]]:
    """While inside, every attention probability tensor the model computes is appended, in call
    order, to the yielded list (kept in the autograd graph). ``on_qkv`` rewrites the query, key and
    value of every ``scaled_dot_product_attention``; ``explicit_softmax="refuse"`` raises when an
    attention module computes its own softmax instead (then ``on_qkv`` cannot reach it). The
    functions are replaced for the calling thread only, and one capture runs at a time."""
    with _CAPTURE:
        yield from _capture(model, on_qkv, explicit_softmax)


def _capture(model: nn.Module, on_qkv, explicit_softmax: str) -> Iterator[list[torch.Tensor]]:
    owner = threading.get_ident()
    record: list[torch.Tensor] = []
    depth = [0]
    handles = []
    for name, module in model.named_modules():
        if name and _is_attention(name.rsplit(".", 1)[-1], module):
            handles.append(module.register_forward_pre_hook(
                lambda mod, inp: depth.__setitem__(0, depth[0] + 1)))
            handles.append(module.register_forward_hook(
                lambda mod, inp, out: depth.__setitem__(0, depth[0] - 1)))
    originals = {"F.sdpa": F.scaled_dot_product_attention, "F.softmax": F.softmax,
                 "torch.softmax": torch.softmax, "Tensor.softmax": torch.Tensor.softmax}

    def recording(fn):
        def softmax(x, *args, **kwargs):
            out = fn(x, *args, **kwargs)
            if threading.get_ident() != owner:
                return out
            dim = kwargs.get("dim", args[0] if args else None)
            if depth[0] > 0 and dim in (-1, x.ndim - 1) and out.ndim >= 3:
                if explicit_softmax == "refuse":
                    raise ConfigError("an attention layer computes its own softmax (windowed "
                                      "attention, as in Swin, or an eager implementation), which "
                                      "AttnLRP's rules cannot reach; use a CAM, integrated gradients or "
                                      "occlusion (chefer and rollout too for a ViT with eager "
                                      "attention; they refuse Swin's windows)")
                record.append(out)
            return out
        return softmax

    F.scaled_dot_product_attention = _explicit_sdpa(record, originals["torch.softmax"],
                                                     originals["F.sdpa"], owner, on_qkv)
    F.softmax = recording(originals["F.softmax"])
    torch.softmax = recording(originals["torch.softmax"])
    torch.Tensor.softmax = recording(originals["Tensor.softmax"])
    try:
        yield record
    finally:
        F.scaled_dot_product_attention = originals["F.sdpa"]
        F.softmax = originals["F.softmax"]
        torch.softmax = originals["torch.softmax"]
        torch.Tensor.softmax = originals["Tensor.softmax"]
        for h in handles:
            h.remove()


def _layers(record: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """The captured probabilities as (B, heads, N, N), checked to be one global self-attention
    over one token sequence."""
    if not record:
        raise ModelError("no attention probabilities were computed: the model has no self-attention "
                         "layer pellucid can read (a CNN?)")
    layers = []
    for probs in record:
        if probs.ndim == 3:  # (B * heads, N, N)
            probs = probs.reshape(batch, -1, *probs.shape[-2:])
        if probs.ndim != 4 or probs.shape[0] != batch or probs.shape[-1] != probs.shape[-2]:
            raise ConfigError(f"attention maps of shape {tuple(probs.shape)} are not global "
                              f"self-attention over one token sequence per sample (windowed "
                              f"attention, as in Swin, or cross-attention); use a CAM or a "
                              f"gradient method")
        layers.append(probs)
    if len({p.shape[-1] for p in layers}) != 1:
        raise ConfigError(f"the token count changes between attention layers "
                          f"({sorted({p.shape[-1] for p in layers})}); rollout needs one sequence")
    return layers


def _fuse(a: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return a.mean(1)
    return a.amax(1) if how == "max" else a.amin(1)


@dataclass
class _AttentionMethod(Explainer):
    """Shared: capture, readout row, grid and post-processing (not registered)."""

    grid: tuple[int, ...] | None = None
    prefix_tokens: int | None = None
    upsample: str = "linear"
    normalize: str = "minmax"

    family: ClassVar[str] = "attention"
    needs_gradient: ClassVar[bool] = False

    @abstractmethod
    def relevance(self, layers: list[torch.Tensor], grads: list[torch.Tensor] | None) -> torch.Tensor:
        """(B, N, N) token-to-token relevance."""

    def _explain(self, runner: ModelRunner, model: nn.Module, inputs: torch.Tensor,
                 target: Target | BoundTarget | None, layer: str | None,
                 handles: list) -> Explanation:
        x = inputs.clone().requires_grad_(True)  # grad mode: no fused fast path hides the weights
        with torch.enable_grad(), capture_attention(model) as record:
            output = runner.forward(x)
            bound = self.bind(target, output)
            layers = _layers(record, inputs.shape[0])
            grads = None
            if self.needs_gradient:
                grads = list(runner.backward(bound.score(output).sum(), layers))
        layers = [a.detach().float() for a in layers]
        grads = [g.detach().float() for g in grads] if grads is not None else None
        n = layers[0].shape[-1]
        layout = detect_layout((inputs.shape[0], n, 1), tuple(inputs.shape[2:]), "tokens", self.grid,
                               self.prefix_tokens, patch_size(model), "the attention")
        with torch.no_grad():
            rel = self.relevance(layers, grads)  # (B, N, N)
            row = self.readout(bound, output.detach(), layout.prefix, layout.grid, n)
            tokens = (row[:, None, :] @ rel)[:, 0, layout.prefix:]
            raw = tokens.reshape(inputs.shape[0], 1, *layout.grid)
            maps = postprocess(raw, tuple(inputs.shape[2:]), False, self.upsample, self.normalize)
        return Explanation(maps, self.name, bound, None, raw, output=output.detach(),
                           extras={"layout": layout.describe(), "attention_layers": len(layers)})

    @staticmethod
    def readout(bound: BoundTarget, output: torch.Tensor, prefix: int, grid: tuple[int, ...],
                n: int) -> torch.Tensor:
        """(B, N) weights of the tokens whose outputs make the score (module docstring)."""
        b = output.shape[0]
        row = torch.zeros(b, n, device=output.device)
        if isinstance(bound, BoundSegmentationTarget):
            region = bound.region.float()[:, None]
            pooled = F.adaptive_avg_pool3d(region, grid) if len(grid) == 3 else \
                F.adaptive_avg_pool2d(region, grid)
            weights = pooled.flatten(1)
            empty = weights.sum(1) <= 0
            weights[empty] = 1.0
            row[:, prefix:] = weights / weights.sum(1, keepdim=True)
        elif prefix > 0:
            row[:, 0] = 1.0
        else:
            row[:] = 1.0 / n
        return row


@register
@dataclass
class AttentionRollout(_AttentionMethod):
    """Attention rollout: the product of head-fused attention plus identity over the layers
    (Abnar & Zuidema 2020); class-agnostic."""

    head_fusion: str = "mean"
    name: ClassVar[str] = "rollout"

    def __post_init__(self) -> None:
        if self.head_fusion not in FUSIONS:
            raise ConfigError(f"head_fusion must be one of {FUSIONS}, got {self.head_fusion!r}")

    def relevance(self, layers, grads):
        n = layers[0].shape[-1]
        eye = torch.eye(n, device=layers[0].device)
        rel = eye.expand(layers[0].shape[0], n, n)
        for a in layers:
            a = 0.5 * _fuse(a, self.head_fusion) + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            rel = a @ rel
        return rel


@register
@dataclass
class AttentionGradient(_AttentionMethod):
    """Gradient-weighted attention: R <- R + E_h[(grad * A)^+] R over the layers (Chefer, Gur &
    Wolf 2021, generic attention-model explainability)."""

    name: ClassVar[str] = "chefer"
    needs_gradient: ClassVar[bool] = True

    def relevance(self, layers, grads):
        n = layers[0].shape[-1]
        rel = torch.eye(n, device=layers[0].device).expand(layers[0].shape[0], n, n)
        for a, g in zip(layers, grads, strict=True):
            rel = rel + (g * a).clamp_min(0).mean(1) @ rel
        return rel
