"""Is an input like the data the model was trained on? A description of the training inputs,
fitted when the model is trained, that every explanation checks its input against.

The description: the model's features at the card's default layer, averaged over space (or over
tokens), on the validation images; their mean mu and a probabilistic PCA of their covariance
(Tipping & Bishop 1999): the k leading directions u_i with variances lambda_i, and sigma^2, the
mean variance left in the other directions. An input's squared Mahalanobis distance in that
feature space (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks", NeurIPS):

    D^2(f) = sum_i ((f - mu) . u_i)^2 / lambda_i + (|f - mu|^2 - sum_i ((f - mu) . u_i)^2) / sigma^2

The threshold is the (1 - alpha) quantile of out-of-fold distances of the validation images (5
folds: each fold's distances under a fit to the other four), so that about alpha of the inputs
like the training data are flagged (false alarms); the rate measured on the held-out test images
is recorded beside it in the card. An input beyond the threshold is "unlike the training data":
its outputs say so and state no finding.

The statistics live in ``training_inputs.safetensors`` beside the weights (the card's
``training_inputs`` entry says how they were made); in memory they ride on the module as the
attribute ``pellucid_training_inputs``, which :func:`pellucid.models.save_model` writes and
:func:`pellucid.models.load_model` restores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FILE = "training_inputs.safetensors"
ATTRIBUTE = "pellucid_training_inputs"
FALSE_ALARM = 0.01  # the rate the threshold is set at
FOLDS = 5
MAX_COMPONENTS = 16


@dataclass
class TrainingInputs:
    """The fitted description: feature mean, leading directions and variances, the residual
    variance, the layer the features come from and the distance threshold."""

    mean: torch.Tensor  # (d,)
    components: torch.Tensor  # (k, d), orthonormal rows
    variances: torch.Tensor  # (k,)
    residual: float
    layer: str
    threshold: float

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance D (not squared) of each row of ``features`` (N, d)."""
        return _distance(features.double(), self.mean, self.components, self.variances,
                         self.residual)

    def save(self, path: Path) -> str:
        """Write the statistics; their file's SHA-256."""
        from safetensors.torch import save_file

        save_file({"mean": self.mean.contiguous(), "components": self.components.contiguous(),
                   "variances": self.variances.contiguous(),
                   "residual": torch.tensor([self.residual], dtype=torch.float64),
                   "threshold": torch.tensor([self.threshold], dtype=torch.float64)},
                  str(path), metadata={"layer": self.layer})
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: Path) -> TrainingInputs:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            layer = (f.metadata() or {}).get("layer", "")
        return cls(t["mean"], t["components"], t["variances"], float(t["residual"][0]), layer,
                   float(t["threshold"][0]))


@dataclass
class InputCheck:
    """The outcome for one input: its distance, the threshold, whether it is unlike the training
    data, or why it was not checked."""

    distance: float | None = None
    threshold: float | None = None
    false_alarm: float | None = None
    not_checked: str = ""

    @property
    def unlike(self) -> bool:
        return self.distance is not None and not self.distance <= self.threshold  # NaN: unlike

    def as_dict(self) -> dict[str, Any]:
        return {"distance": self.distance, "threshold": self.threshold,
                "false_alarm": self.false_alarm, "unlike_training_data": self.unlike,
                "not_checked": self.not_checked}

    def note(self) -> str | None:
        """The line every output of an input unlike the training data carries; None otherwise."""
        if not self.unlike:
            return None
        return (f"INPUT UNLIKE THE TRAINING DATA (feature distance {self.distance:.1f} > "
                f"{self.threshold:.1f}, the threshold at {self.false_alarm:.0%} false alarms): "
                f"no finding is stated")


def _distance(f: torch.Tensor, mean, components, variances, residual) -> torch.Tensor:
    centred = f - mean.double()
    proj = centred @ components.double().T
    inside = (proj**2 / variances.double()).sum(1)
    rest = ((centred**2).sum(1) - (proj**2).sum(1)).clamp_min(0) / residual
    return (inside + rest).sqrt()


def _fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mean, k leading directions and variances, residual variance of ``features`` (n, d)."""
    f = features.double()
    n, d = f.shape
    mean = f.mean(0)
    centred = f - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    eig = s**2 / max(n - 1, 1)
    k = max(1, min(MAX_COMPONENTS, n // 4, d - 1, int((eig > 0).sum())))
    total = float(eig.sum())
    floor = max(total, 1e-12) * 1e-6
    residual = max((total - float(eig[:k].sum())) / max(d - k, 1), floor)
    return mean, vh[:k], eig[:k].clamp_min(floor), residual


def pooled_features(module: nn.Module, layer: str, x: torch.Tensor,
                    batch_size: int = 16) -> torch.Tensor:
    """The ``layer`` output of ``module`` on ``x``, averaged over its spatial axes (B, C, *spatial)
    or its tokens (B, T, C): one row per input."""
    from pellucid.models.outputs import forward_tensor

    target = module.get_submodule(layer)
    store: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        out = out.detach().float()
        store.append(out.flatten(2).mean(2) if out.ndim >= 4 else
                     out.mean(1) if out.ndim == 3 else out.flatten(1))

    handle = target.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for lo in range(0, len(x), batch_size):
                forward_tensor(module, x[lo:lo + batch_size])
    finally:
        handle.remove()
    return torch.cat(store).cpu()


def fit(features: torch.Tensor, layer: str, false_alarm: float = FALSE_ALARM) -> TrainingInputs:
    """Fit the description on the pooled validation features (N, d), N >= 10."""
    n = len(features)
    if n < 10:
        raise ValueError(f"describing the training inputs needs at least 10 validation images, "
                         f"got {n}")
    folds = torch.arange(n) % FOLDS
    held = torch.empty(n, dtype=torch.float64)
    for k in range(FOLDS):
        rest = folds != k
        held[~rest] = _distance(features[~rest].double(), *_fit(features[rest]))
    threshold = float(np.quantile(held.numpy(), 1 - false_alarm, method="higher"))
    mean, components, variances, residual = _fit(features)
    return TrainingInputs(mean, components, variances, residual, layer, threshold)


def dataset_features(module: nn.Module, card, dataset, layer: str,
                     batch_size: int = 16) -> torch.Tensor:
    """Pooled ``layer`` features of every image of ``dataset``, normalised as ``card`` says."""
    from torch.utils.data import DataLoader

    from pellucid.data.base import collate

    device = next(module.parameters()).device
    rows = [pooled_features(module, layer, card.normalize(batch["image"].to(device)), batch_size)
            for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate)]
    return torch.cat(rows)


def describe_training_inputs(module: nn.Module, card, val_ds, test_ds=None,
                             false_alarm: float = FALSE_ALARM) -> TrainingInputs | None:
    """Fit the description of a trained model's inputs on its validation images, attach it to
    ``module`` and record it in ``card.training_inputs`` with the false-alarm rate measured on
    ``test_ds`` (held out). None, with the reason in the card, when the model names no feature
    layer or has fewer than 10 validation images."""
    layer = card.default_layer
    if not layer:
        card.training_inputs = {"not_described": "the model names no feature layer"}
        return None
    if len(val_ds) < 10:
        card.training_inputs = {"not_described": f"{len(val_ds)} validation images (at least 10 "
                                                 f"are needed)"}
        return None
    stats = fit(dataset_features(module, card, val_ds, layer), layer, false_alarm)
    entry: dict[str, Any] = {
        "method": "Mahalanobis distance of pooled features, probabilistic PCA "
                  f"({len(stats.variances)} components; Lee et al. 2018)",
        "layer": layer, "fitted_on": f"validation images (n={len(val_ds)})",
        "threshold": round(stats.threshold, 4), "false_alarm": false_alarm, "file": FILE}
    if test_ds is not None and len(test_ds):
        d = stats.distance(dataset_features(module, card, test_ds, layer))
        flagged = int((d > stats.threshold).sum())
        entry["held_out"] = {"n": len(test_ds), "flagged": flagged,
                             "false_alarm": round(flagged / len(test_ds), 4)}
    card.training_inputs = entry
    setattr(module, ATTRIBUTE, stats)
    return stats


def check_input(module: nn.Module, card, x: torch.Tensor) -> InputCheck:
    """Check one normalised input (1, C, *spatial) against the model's training inputs."""
    return check_inputs(module, card, x)[0]


def check_inputs(module: nn.Module, card, x: torch.Tensor) -> list[InputCheck]:
    """Check each normalised input of a batch (B, C, *spatial): one batched forward."""
    stats = getattr(module, ATTRIBUTE, None)
    if card is None:
        return [InputCheck(not_checked="no model card")] * x.shape[0]
    if stats is None:
        reason = (card.training_inputs or {}).get("not_described",
                                                  "the model card describes no training inputs")
        return [InputCheck(not_checked=reason)] * x.shape[0]
    rate = float(card.training_inputs.get("false_alarm", FALSE_ALARM))
    return [InputCheck(float(d), stats.threshold, rate)
            for d in stats.distance(pooled_features(module, stats.layer, x))]
