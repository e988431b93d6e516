"""Canonizers: temporary rewrites that make a network's structure explicit for LRP (Montavon et al.
2019; zennit's canonizer idea). A residual addition ``a + b`` becomes a :class:`zennit.layer.Sum`
module so relevance is split between the branches in proportion to their contributions (the Norm
rule) instead of being copied into both; BatchNorm directly after a convolution is merged into it,
exactly (zennit's merge leaves x / sqrt(1 + eps) behind; see :func:`exact_merge_batch_norm`).

- torchvision ResNet: zennit's ``ResNetCanonizer`` (Sum modules for the residuals, sequential
  BatchNorm merging).
- MONAI ResNet (``ResNetBlock``, ``ResNetBottleneck``): BatchNorm merging + Sum for the residual.
- MONAI DenseNet-121: BatchNorm merging where a convolution precedes it; the pre-activation
  BatchNorms (BN-ReLU-Conv) stay and pass relevance unchanged (the ``Pass`` rule, zennit's default
  for BatchNorm); concatenations need no rewrite, autograd routes each channel's relevance back.
- MONAI U-Net: Sum for ``ResidualUnit``'s ``conv(x) + residual(x)``; skip concatenations and
  transposed convolutions need no rewrite; instance normalisation passes relevance unchanged.

Every canonizer is undone by ``remove()``; :func:`canonized` also restores a parameter snapshot and
the instance attributes if a rewrite fails half-way, so the model is never left mutated.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from zennit.canonizers import (
    AttributeCanonizer,
    CompositeCanonizer,
    MergeBatchNorm,
    SequentialMergeBatchNorm,
)
from zennit.layer import Sum


def _monai_resnet_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MONAI ResNetBlock/ResNetBottleneck forward with the residual addition as a Sum module."""
    out = self.act(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if hasattr(self, "conv3"):
        out = self.bn3(self.conv3(self.act(out)))
    residual = x if self.downsample is None else self.downsample(x)
    return self.act(self.pellucid_sum(torch.stack([residual, out], dim=-1)))


def _residual_unit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MONAI ResidualUnit forward with ``conv(x) + residual(x)`` as a Sum module."""
    return self.pellucid_sum(torch.stack([self.conv(x), self.residual(x)], dim=-1))


def exact_merge_batch_norm(modules, batch_norm) -> None:
    """zennit's merge of a BatchNorm into the preceding layers, made exact: zennit leaves the
    BatchNorm computing x / sqrt(1 + eps) instead of x (a 5e-6 shrink per layer, ~1e-4 over a
    ResNet-18); its running variance is set to 1 - eps so that the identity is exact. zennit's
    ``remove`` restores the saved statistics as before."""
    MergeBatchNorm.merge_batch_norm(modules, batch_norm)
    batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)


class ExactSequentialMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's SequentialMergeBatchNorm with :func:`exact_merge_batch_norm`."""

    merge_batch_norm = staticmethod(exact_merge_batch_norm)


class AdjacentMergeBatchNorm(MergeBatchNorm):
    """Merge a BatchNorm into the convolution or linear layer registered right before it *in the same
    parent module*, when their channel counts match. (zennit's SequentialMergeBatchNorm pairs
    consecutive leaves across modules, which on a DenseNet pairs a dense layer's last convolution
    with the next layer's BatchNorm over the concatenated channels, and fails.)"""

    merge_batch_norm = staticmethod(exact_merge_batch_norm)

    def apply(self, root_module: nn.Module) -> list:
        instances = []
        for parent in root_module.modules():
            children = list(parent.children())
            for first, second in itertools.pairwise(children):
                if isinstance(first, self.linear_type) and isinstance(second, self.batch_norm_type) \
                        and first.weight.shape[0] == second.num_features:
                    instance = self.copy()
                    instance.register((first,), second)
                    instances.append(instance)
        return instances


class SumCanonizer(AttributeCanonizer):
    """Give modules of ``types`` a ``forward`` that routes their residual addition through a Sum."""

    def __init__(self, types: tuple[type, ...], forward) -> None:
        self.types, self.forward_fn = types, forward
        super().__init__(self._attributes)

    def _attributes(self, name: str, module: nn.Module) -> dict | None:
        if isinstance(module, self.types):
            return {"forward": self.forward_fn.__get__(module), "pellucid_sum": Sum()}
        return None

    def copy(self) -> SumCanonizer:
        return SumCanonizer(self.types, self.forward_fn)


def canonizers_for(model: nn.Module) -> list:
    """The canonizers for a zoo network (or any model containing these building blocks)."""
    from monai.networks.blocks import ResidualUnit
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    modules = list(model.modules())
    types = {type(m) for m in modules}
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency
        BasicBlock = Bottleneck = ()
    if types & {BasicBlock, Bottleneck}:  # zennit's ResNetCanonizer with the exact merge
        from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

        return [CompositeCanonizer((ExactSequentialMergeBatchNorm(), ResNetBottleneckCanonizer(),
                                    ResNetBasicBlockCanonizer()))]
    out: list = [AdjacentMergeBatchNorm()]
    if types & {ResNetBlock, ResNetBottleneck}:
        out.append(SumCanonizer((ResNetBlock, ResNetBottleneck), _monai_resnet_forward))
    if ResidualUnit in types:
        out.append(SumCanonizer((ResidualUnit,), _residual_unit_forward))
    return [CompositeCanonizer(out)]


@contextmanager
def canonized(model: nn.Module, composite) -> Iterator[nn.Module]:
    """Register ``composite`` (its canonizers and rule hooks) on ``model``; on exit, also after an
    error half-way through registering, remove everything and check nothing was left changed."""
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = {m: set(m.__dict__) for m in model.modules()}
    try:
        composite.register(model)
        yield model
    finally:
        composite.remove()
        for module, keys in attrs.items():
            for extra in set(module.__dict__) - keys:
                delattr(module, extra)
        current = model.state_dict()
        if any(not torch.equal(current[k], v) for k, v in params.items()):
            with torch.no_grad():
                for k, v in params.items():
                    current[k].copy_(v)
