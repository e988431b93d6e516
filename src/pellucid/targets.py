"""Targets: what to explain. A target turns the model output into one scalar per sample.

Every explainer and metric talks to the model only through a target, which is why classification
and segmentation share all code. A target is *bound* once on the unperturbed output: defaults such
as "the predicted class" or "the predicted region" are fixed there, so perturbed inputs (Score-CAM,
occlusion, deletion curves) are scored against the same class and region.

- :class:`ClassTarget`: a class logit, or its probability (softmax, or sigmoid for multi-label),
  for per-sample class indices; default = the predicted (arg-max) class.
- :class:`SegmentationTarget`: the sum of class-k logits (or probabilities) over a region: a given
  mask, the model's predicted region of class k, or the whole image (Seg-Grad-CAM, Vinogradova et
  al. 2020). 2D and 3D alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pellucid.errors import ConfigError

KINDS = ("logit", "probability")


def _activate(output: torch.Tensor, kind: str, activation: str) -> torch.Tensor:
    if kind == "logit":
        return output
    return torch.sigmoid(output) if activation == "sigmoid" else torch.softmax(output, dim=1)


def _class_indices(classes: int | Sequence[int] | torch.Tensor, batch: int, num: int,
                   device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(classes, dtype=torch.long, device=device).flatten()
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.numel() != batch:
        raise ConfigError(f"target classes: got {idx.numel()} class indices for a batch of {batch}")
    bad = idx[(idx < 0) | (idx >= num)]
    if bad.numel():
        raise ConfigError(f"target class index {int(bad[0])} is out of range for a model with "
                          f"{num} outputs (valid: 0..{num - 1})")
    return idx.clone()


class Target(ABC):
    """Base: ``bind(output)`` fixes defaults on the clean output and returns a bound target."""

    @abstractmethod
    def bind(self, output: torch.Tensor) -> BoundTarget:
        """Fix every per-sample choice on the unperturbed ``output``."""


class BoundTarget(ABC):
    """A target with every per-sample choice fixed; ``score(output, rows)`` gives one scalar per
    row of ``output``, where ``rows[i]`` is the sample that row ``i`` was derived from."""

    classes: torch.Tensor

    @abstractmethod
    def score(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One score per row of ``output`` (N,)."""

    @abstractmethod
    def describe(self) -> dict:
        """A JSON-able description."""

    @abstractmethod
    def take(self, rows: torch.Tensor) -> BoundTarget:
        """The target of the samples ``rows`` (e.g. one row per perturbed copy of a sample)."""


@dataclass
class ClassTarget(Target):
    """Score = logit (or probability) of ``classes`` (one index, or one per sample; default the
    arg-max class of each sample)."""

    classes: int | Sequence[int] | torch.Tensor | None = None
    kind: str = "logit"
    activation: str = "softmax"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"target kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ("softmax", "sigmoid"):
            raise ConfigError(f"target activation must be 'softmax' or 'sigmoid', got "
                              f"{self.activation!r}")

    def bind(self, output: torch.Tensor) -> BoundClassTarget:
        if output.ndim != 2:
            raise ConfigError(f"ClassTarget needs a (batch, classes) output, the model gave shape "
                              f"{tuple(output.shape)}; use SegmentationTarget for dense outputs")
        classes = output.argmax(1) if self.classes is None else self.classes
        idx = _class_indices(classes, output.shape[0], output.shape[1], output.device)
        return BoundClassTarget(idx, self.kind, self.activation)


@dataclass
class BoundClassTarget(BoundTarget):
    classes: torch.Tensor
    kind: str
    activation: str

    def score(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        cls = self.classes if rows is None else self.classes[rows]
        values = _activate(output, self.kind, self.activation)
        return values.gather(1, cls[:, None].to(values.device))[:, 0]

    def take(self, rows: torch.Tensor) -> BoundClassTarget:
        return BoundClassTarget(self.classes[rows.to(self.classes.device)], self.kind, self.activation)

    def describe(self) -> dict:
        return {"type": "class", "classes": self.classes.tolist(), "kind": self.kind,
                "activation": self.activation}


@dataclass
class SegmentationTarget(Target):
    """Score = sum over a region of class-``class_index`` logits (or probabilities).

    ``region``: a mask tensor (B, *spatial) or (*spatial) (any non-zero voxel counts, weights
    are taken as given), ``"predicted"`` (where the model predicts class k: sigmoid > 0.5, or
    arg-max = k for softmax), or ``"all"`` (the whole image).
    """

    class_index: int | Sequence[int] | torch.Tensor = 0
    region: torch.Tensor | str = "predicted"
    kind: str = "logit"
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"target kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.region, str) and self.region not in ("predicted", "all"):
            raise ConfigError(f"segmentation region must be a mask, 'predicted' or 'all', got "
                              f"{self.region!r}")

    def bind(self, output: torch.Tensor) -> BoundSegmentationTarget:
        if output.ndim < 3:
            raise ConfigError(f"SegmentationTarget needs a dense (batch, classes, *spatial) output; "
                              f"the model gave shape {tuple(output.shape)}")
        b, k = output.shape[:2]
        idx = _class_indices(self.class_index, b, k, output.device)
        spatial = tuple(output.shape[2:])
        if isinstance(self.region, str):
            if self.region == "all":
                region = torch.ones((b, *spatial), device=output.device)
            else:
                sel = idx.view(b, 1, *([1] * len(spatial))).expand(b, 1, *spatial)
                if self.activation == "softmax" and k > 1:
                    region = (output.argmax(1, keepdim=True) == sel).float()[:, 0]
                else:
                    region = (output.detach().gather(1, sel) > 0).float()[:, 0]
        else:
            region = torch.as_tensor(self.region, device=output.device).float()
            if region.shape == spatial:
                region = region.expand(b, *spatial)
            if tuple(region.shape) == (b, 1, *spatial):
                region = region[:, 0]
            if tuple(region.shape) != (b, *spatial):
                raise ConfigError(f"segmentation region mask has shape {tuple(region.shape)}; "
                                  f"expected {spatial} or {(b, *spatial)} to match the output")
        return BoundSegmentationTarget(idx, region.detach(), self.kind, self.activation)


@dataclass
class BoundSegmentationTarget(BoundTarget):
    classes: torch.Tensor
    region: torch.Tensor
    kind: str
    activation: str

    def score(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        cls = self.classes if rows is None else self.classes[rows]
        region = self.region if rows is None else self.region[rows]
        values = _activate(output, self.kind, self.activation)
        n, spatial = values.shape[0], values.shape[2:]
        sel = cls.view(n, 1, *([1] * len(spatial))).expand(n, 1, *spatial).to(values.device)
        return (values.gather(1, sel)[:, 0] * region.to(values)).flatten(1).sum(1)

    def take(self, rows: torch.Tensor) -> BoundSegmentationTarget:
        rows = rows.to(self.classes.device)
        return BoundSegmentationTarget(self.classes[rows], self.region[rows.to(self.region.device)],
                                       self.kind, self.activation)

    def describe(self) -> dict:
        return {"type": "segmentation", "classes": self.classes.tolist(), "kind": self.kind,
                "region_voxels": self.region.flatten(1).sum(1).tolist()}


def default_target(output: torch.Tensor, activation: str | None = None) -> Target:
    """Predicted class for (B, K) outputs; predicted region of the first class for dense outputs."""
    if output.ndim == 2:
        return ClassTarget(activation=activation or "softmax")
    return SegmentationTarget(0, "predicted", activation=activation or "sigmoid")


def as_target(target: Target | int | Sequence[int] | torch.Tensor | None, output: torch.Tensor,
              activation: str | None = None) -> BoundTarget:
    """Accept a Target, class indices (int/list/tensor) or None, and bind it on ``output``."""
    if isinstance(target, BoundTarget):
        return target
    if target is None:
        target = default_target(output, activation)
    elif not isinstance(target, Target):
        target = (ClassTarget(target, activation=activation or "softmax") if output.ndim == 2
                  else SegmentationTarget(target, activation=activation or "sigmoid"))
    return target.bind(output)
