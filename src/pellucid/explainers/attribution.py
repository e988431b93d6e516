"""Shared machinery of input-space attribution methods (gradient, relevance, perturbation,
counterfactual): one clean forward to bind the target, per-channel attributions (B, C, *spatial)
kept as ``Explanation.raw``, and a channel reduction to the (B, 1, *spatial) map."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pellucid.errors import ConfigError
from pellucid.explainers.base import Explainer, Explanation, ModelRunner
from pellucid.targets import BoundTarget, Target

REDUCTIONS = ("sum", "abs_sum", "max_abs")


def reduce_channels(attr: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C, *spatial) -> (B, 1, *spatial): signed sum, sum of absolute values, or max |a|."""
    if attr.shape[1] == 1 and how in REDUCTIONS:  # one channel: nothing to reduce over
        return attr.clone() if how == "sum" else attr.abs()
    if how == "sum":
        return attr.sum(1, keepdim=True)
    if how == "abs_sum":
        return attr.abs().sum(1, keepdim=True)
    if how == "max_abs":
        return attr.abs().amax(1, keepdim=True)
    raise ConfigError(f"channel_reduce must be one of {REDUCTIONS}, got {how!r}")


@dataclass
class InputAttribution(Explainer):
    """Base of methods whose attributions live in input space (not registered)."""

    channel_reduce: str = "sum"
    family: ClassVar[str] = "gradient"
    needs_layer: ClassVar[bool] = False
    channel_maps: ClassVar[bool] = True
    default_reduce: ClassVar[str] = "sum"

    @abstractmethod
    def attribute(self, runner: ModelRunner, model: nn.Module, inputs: torch.Tensor,
                  bound: BoundTarget, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-channel attributions (B, C, *spatial) and extras."""

    def clean_forward(self, runner: ModelRunner, inputs: torch.Tensor) -> torch.Tensor:
        """The unperturbed output, which binds the target (no gradient)."""
        with torch.no_grad():
            return runner.forward(inputs)

    def _explain(self, runner: ModelRunner, model: nn.Module, inputs: torch.Tensor,
                 target: Target | BoundTarget | None, layer: str | None,
                 handles: list) -> Explanation:
        if self.channel_reduce not in REDUCTIONS:
            raise ConfigError(f"channel_reduce must be one of {REDUCTIONS}, got "
                              f"{self.channel_reduce!r}")
        output = self.clean_forward(runner, inputs)
        bound = self.bind(target, output)
        attr, extras = self.attribute(runner, model, inputs, bound, output)
        attr = attr.detach()
        return Explanation(reduce_channels(attr, self.channel_reduce), self.name, bound, None,
                           raw=attr, output=output, extras=extras)


def rows_for(inputs: torch.Tensor) -> torch.Tensor:
    return torch.arange(inputs.shape[0], device=inputs.device)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur over the spatial dims of (B, C, *spatial), reflect-padded."""
    if sigma <= 0:
        return x
    k = kernel_size or (2 * round(3 * sigma) + 1)
    k = min(k, 2 * (min(x.shape[2:]) // 2) - 1) if min(x.shape[2:]) > 2 else 1
    if k < 2:
        return x
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    w = torch.exp(-(t**2) / (2 * sigma**2))
    w = w / w.sum()
    out = x
    c, nd = x.shape[1], x.ndim - 2
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[nd]
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k
        weight = w.view(1, 1, *shape).repeat(c, 1, *([1] * nd))
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = k // 2
        out = conv(torch.nn.functional.pad(out, pad, mode="reflect"), weight, groups=c)
    return out
