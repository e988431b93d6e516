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
- :class:`SegmentationErrorTarget`: the same over the false-positive or false-negative region of
  the prediction against ground truth (SESV-style error explanation).
- :class:`RegressionTarget`: a regression output (e.g. overall survival), or its deviation from a
  reference value.
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
    # checked where the indices are (Python or CPU): no GPU round trip for the usual targets
    idx = torch.as_tensor(classes, dtype=torch.long).flatten()
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.numel() != batch:
        raise ConfigError(f"target classes: got {idx.numel()} class indices for a batch of {batch}")
    if idx.numel() and bool((idx.min() < 0) | (idx.max() >= num)):
        bad = idx[(idx < 0) | (idx >= num)]
        raise ConfigError(f"target class index {int(bad[0])} is out of range for a model with "
                          f"{num} outputs (valid: 0..{num - 1})")
    return idx.to(device=device, copy=True)


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


@dataclass
class RegressionTarget(Target):
    """Score = output ``index`` of a regression model (e.g. predicted survival), or its deviation
    from ``reference`` (output - reference), so explanations answer "why this much more than the
    reference"."""

    index: int = 0
    reference: float | None = None

    def bind(self, output: torch.Tensor) -> BoundRegressionTarget:
        if output.ndim not in (1, 2):
            raise ConfigError(f"RegressionTarget needs a (batch,) or (batch, outputs) output, the "
                              f"model gave shape {tuple(output.shape)}")
        width = 1 if output.ndim == 1 else output.shape[1]
        if not 0 <= self.index < width:
            raise ConfigError(f"regression output index {self.index} is out of range for "
                              f"{width} outputs")
        b = output.shape[0]
        return BoundRegressionTarget(torch.full((b,), self.index, dtype=torch.long,
                                                device=output.device),
                                     float(self.reference or 0.0))


@dataclass
class BoundRegressionTarget(BoundTarget):
    classes: torch.Tensor  # the output index, per sample
    reference: float = 0.0
    kind: str = "logit"

    def score(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        values = output[:, None] if output.ndim == 1 else output
        idx = self.classes if rows is None else self.classes[rows]
        return values.gather(1, idx[:, None].to(values.device))[:, 0] - self.reference

    def take(self, rows: torch.Tensor) -> BoundRegressionTarget:
        return BoundRegressionTarget(self.classes[rows.to(self.classes.device)], self.reference)

    def describe(self) -> dict:
        return {"type": "regression", "index": self.classes.tolist(), "reference": self.reference}


@dataclass
class SegmentationErrorTarget(Target):
    """The model's errors against ground truth: ``kind="fp"`` scores the class-k logits summed over
    the false-positive region (predicted but not true: "why did it mark this?"), ``"fn"`` over the
    false-negative region (true but missed: "what argued against it here?"). ``truth`` is
    (B, *spatial) or (*spatial); the prediction is sigmoid > 0.5 (or arg-max for softmax)."""

    truth: torch.Tensor
    class_index: int = 0
    kind: str = "fp"
    activation: str = "sigmoid"

    def bind(self, output: torch.Tensor) -> BoundSegmentationTarget:
        if self.kind not in ("fp", "fn"):
            raise ConfigError(f"segmentation error kind must be 'fp' or 'fn', got {self.kind!r}")
        predicted = SegmentationTarget(self.class_index, "predicted", activation=self.activation)
        bound = predicted.bind(output)
        truth = torch.as_tensor(self.truth, device=output.device) > 0
        spatial = tuple(output.shape[2:])
        if truth.shape == spatial:
            truth = truth.expand(output.shape[0], *spatial)
        if tuple(truth.shape) != (output.shape[0], *spatial):
            raise ConfigError(f"truth mask has shape {tuple(truth.shape)}; expected {spatial} or "
                              f"{(output.shape[0], *spatial)}")
        pred = bound.region > 0
        region = (pred & ~truth) if self.kind == "fp" else (~pred & truth)
        return BoundSegmentationTarget(bound.classes, region.float(), "logit", self.activation)


def default_target(output: torch.Tensor, activation: str | None = None) -> Target:
    """Predicted class for (B, K) outputs; predicted region of the first class for dense outputs;
    the first output of a regression model (``activation="identity"``)."""
    if activation == "identity" and output.ndim <= 2:
        return RegressionTarget(0)
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
    elif not isinstance(target, Target) and activation == "identity" and output.ndim <= 2:
        target = RegressionTarget(int(torch.as_tensor(target).flatten()[0]))
    elif not isinstance(target, Target):
        target = (ClassTarget(target, activation=activation or "softmax") if output.ndim == 2
                  else SegmentationTarget(target, activation=activation or "sigmoid"))
    return target.bind(output)
