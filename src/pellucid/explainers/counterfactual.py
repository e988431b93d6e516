"""Counterfactual explanations (Wachter et al. 2017): the smallest change x' - x that moves the
target score across the decision threshold.

    minimise   lambda * hinge(s(x')) + |x' - x|_1      (x' - x optionally restricted to a region)

with ``hinge`` the distance of the score from the far side of the threshold plus a margin, and
lambda doubled every ``patience`` steps while the counterfactual is not yet valid (Wachter's
"maximise over lambda"). The smooth part takes Adam steps; the L1 part its proximal step, a soft
threshold of ``sparsity x lr`` per step, which zeroes pixels whose push is not consistent, so the
change concentrates where it matters. The threshold is taken from the bound target: a sigmoid class flips when
its logit changes sign; a softmax class when another class overtakes it; a segmentation region
when the mean logit over it changes sign. The attribution is x' - x. ``extras`` report validity
(did the decision change), the steps used, and proximity (L1 and L2 of the change).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import InputAttribution
from pellucid.explainers.registry import register
from pellucid.targets import BoundClassTarget, BoundSegmentationTarget


def _decision_margin(bound, output: torch.Tensor) -> torch.Tensor:
    """Signed margin per sample: positive while the original decision still holds."""
    if isinstance(bound, BoundSegmentationTarget):
        region = bound.region.to(output)
        logits = output.gather(1, bound.classes.view(-1, 1, *([1] * (output.ndim - 2))).expand(
            -1, 1, *output.shape[2:]))[:, 0]
        mean = (logits * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
        return mean
    if isinstance(bound, BoundClassTarget) and bound.activation == "sigmoid":
        return output.gather(1, bound.classes[:, None])[:, 0]
    cls = bound.classes[:, None]
    own = output.gather(1, cls)[:, 0]
    others = output.scatter(1, cls, float("-inf")).amax(1)
    return own - others


@register
@dataclass
class Counterfactual(InputAttribution):
    """Wachter counterfactual: minimal L1 change of the input that flips the decision."""

    steps: int = 300
    lr: float = 0.01
    lam: float = 1.0
    margin: float = 0.5
    sparsity: float = 0.5
    patience: int = 20
    region: torch.Tensor | None = None
    family: ClassVar[str] = "counterfactual"
    name: ClassVar[str] = "counterfactual"
    input_gradients: ClassVar[bool] = True

    def attribute(self, runner, model, inputs, bound, output):
        if self.steps < 1 or self.lr <= 0 or self.lam <= 0 or not 0 <= self.sparsity < 1:
            raise ConfigError("counterfactual needs steps >= 1, lr > 0, lam > 0 and "
                              "0 <= sparsity < 1")
        region = None
        if self.region is not None:
            region = self.region.to(inputs).float()
            while region.ndim < inputs.ndim:
                region = region.unsqueeze(1 if region.ndim == inputs.ndim - 1 else 0)
            try:
                torch.broadcast_shapes(region.shape, inputs.shape)
            except RuntimeError:
                raise ConfigError(f"counterfactual region has shape {tuple(self.region.shape)}; "
                                  f"it must broadcast to the inputs {tuple(inputs.shape)}") from None
        start_margin = _decision_margin(bound, output).detach()
        sign = torch.where(start_margin >= 0, 1.0, -1.0)  # push the margin to the other side
        delta = torch.zeros_like(inputs, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        lam = torch.full((inputs.shape[0],), float(self.lam), device=inputs.device)
        valid = torch.zeros(inputs.shape[0], dtype=torch.bool, device=inputs.device)
        best = torch.zeros_like(inputs)
        best_l1 = torch.full((inputs.shape[0],), float("inf"), device=inputs.device)
        used = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
        dims = tuple(range(1, inputs.ndim))
        for step in range(self.steps):
            change = delta if region is None else delta * region
            with torch.enable_grad():
                out = runner.forward(inputs + change)
                margin = _decision_margin(bound, out)
                hinge = torch.relu(sign * margin + self.margin)
                l1 = change.abs().mean(dims)
                loss = (lam * hinge).sum()
                opt.zero_grad()
                runner.cost.backward_passes += 1
                loss.backward()
            opt.step()
            with torch.no_grad():  # proximal step of the L1 term: soft threshold
                delta.copy_(torch.sign(delta) * (delta.abs() - self.sparsity * self.lr).clamp_min(0))
            flipped = (sign * margin.detach()) < 0
            better = flipped & (l1.detach() < best_l1)
            best[better] = change.detach()[better]
            best_l1 = torch.where(better, l1.detach(), best_l1)
            used = torch.where(flipped & ~valid, torch.full_like(used, step + 1), used)
            valid |= flipped
            if (step + 1) % self.patience == 0:
                lam = torch.where(valid, lam, lam * 2)
        if not bool(valid.all()):
            warnings.warn(f"counterfactual did not flip the decision for "
                          f"{int((~valid).sum())} of {len(valid)} samples in {self.steps} steps",
                          stacklevel=2)
        change = torch.where(valid.view(-1, *([1] * (inputs.ndim - 1))), best,
                             (delta if region is None else delta * region).detach())
        with torch.no_grad():
            final = _decision_margin(bound, runner.forward(inputs + change))
        extras = {"valid": valid.cpu(), "steps_to_flip": used.cpu(),
                  "l1": change.abs().mean(dims).cpu(), "l2": change.flatten(1).norm(dim=1).cpu(),
                  "margin_before": start_margin.cpu(), "margin_after": final.cpu(),
                  "counterfactual": (inputs + change).detach()}
        return change, extras
