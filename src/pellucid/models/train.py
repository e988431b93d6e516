"""Training any zoo network on any pellucid dataset, deterministically for a given seed.

Classification uses binary cross-entropy on logits (multi-label, sigmoid) or cross-entropy
(single-label, softmax); segmentation uses Dice + binary cross-entropy per mask channel. Decision
thresholds are picked on the validation split (max F1 per class) and stored in the model card.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from pellucid.data.base import PellucidDataset, collate
from pellucid.errors import ConfigError
from pellucid.models.card import ModelCard
from pellucid.models.performance import (
    classification_report,
    pick_thresholds,
    regression_report,
    segmentation_report,
)
from pellucid.models.zoo import CLASSIFIERS, build
from pellucid.progress import track
from pellucid.runtime import configure_threads, seed_everything
from pellucid.version import __version__


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    backend: str | None = None
    max_steps: int | None = None
    device: str = "cpu"
    progress: bool = True
    normalize_samples: int = 256


@dataclass
class TrainResult:
    module: nn.Module
    card: ModelCard
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _loader(ds: PellucidDataset, batch_size: int, shuffle: bool,
            generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=generator, num_workers=0)


def _channel_stats(ds: PellucidDataset, n: int) -> dict[str, Any]:
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)
    images = torch.stack([ds[int(i)]["image"] for i in idx]).float()
    dims = [0, *range(2, images.ndim)]
    mean = images.mean(dims)
    std = images.std(dims).clamp_min(1e-6)
    return {"kind": "meanstd", "mean": mean.tolist(), "std": std.tolist()}


def _loss(task: str, multilabel: bool, logits: torch.Tensor, batch: dict,
          scale: float = 1.0) -> torch.Tensor:
    if task == "regression":  # mean squared error in units of the training labels' std
        return F.mse_loss(logits / scale, batch["label"].to(logits) / scale)
    if task == "segmentation":
        target = batch["mask"].to(logits)
        prob = torch.sigmoid(logits)
        dims = (0, *range(2, logits.ndim))  # batch Dice per channel: stable with empty masks
        inter = (prob * target).sum(dims)
        dice = 1 - (2 * inter + 1e-5) / (prob.sum(dims) + target.sum(dims) + 1e-5)
        return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)
    target = batch["label"].to(logits)
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target.argmax(1))


@torch.no_grad()
def predict(module: nn.Module, card: ModelCard, ds: PellucidDataset, batch_size: int = 32,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs (probabilities or binary masks) and the truth (labels or masks) over ``ds``."""
    was_training = module.training
    module.eval()
    outs, truths = [], []
    try:
        for batch in _loader(ds, batch_size, shuffle=False):
            logits = module(card.normalize(batch["image"].to(device))).float().cpu()
            if card.task == "segmentation":
                outs.append(torch.sigmoid(logits) > 0.5)
                truths.append(batch["mask"] > 0.5)
            elif card.task == "regression":
                outs.append(logits)
                truths.append(batch["label"].float())
            else:
                outs.append(torch.sigmoid(logits) if card.activation == "sigmoid"
                            else torch.softmax(logits, 1))
                truths.append(batch["label"])
    finally:
        module.train(was_training)
    return torch.cat(outs), torch.cat(truths)


def evaluate_model(module: nn.Module, card: ModelCard, ds: PellucidDataset,
                   thresholds: list[float] | None = None, batch_size: int = 32) -> dict:
    """The card's task report (classification, segmentation or regression) on ``ds``."""
    out, truth = predict(module, card, ds, batch_size)
    if card.task == "segmentation":
        return segmentation_report(out, truth, card.class_names)
    if card.task == "regression":
        return regression_report(out.numpy(), truth.numpy(), card.class_names)
    return classification_report(out.numpy(), truth.numpy(), card.class_names,
                                 thresholds or card.thresholds or None,
                                 multilabel=card.activation == "sigmoid")


def train(train_ds: PellucidDataset, config: TrainConfig, val_ds: PellucidDataset | None = None,
          test_ds: PellucidDataset | None = None, dataset_name: str = "") -> TrainResult:
    """Train ``config.arch`` on ``train_ds``; evaluate on ``val_ds``/``test_ds`` into the card."""
    configure_threads()
    generator = seed_everything(config.seed)
    if config.epochs < 1 or config.batch_size < 1 or config.lr <= 0:
        raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
    if len(train_ds) == 0:
        raise ConfigError("the training split is empty")
    task = "segmentation" if config.arch == "unet" else "classification"
    if train_ds.task == "regression":
        if config.arch == "unet":
            raise ConfigError("a regression dataset needs a classifier backbone (resnet18, ...), "
                              "not arch unet")
        task = "regression"
    if task == "segmentation" and not train_ds.mask_names:
        raise ConfigError(f"arch unet needs a dataset with masks; {type(train_ds).__name__} has none")
    if task != "segmentation" and config.arch not in CLASSIFIERS:
        raise ConfigError(f"unknown arch {config.arch!r}")
    names = list(train_ds.mask_names if task == "segmentation" else train_ds.class_names)
    built = build(config.arch, train_ds.spatial_dims, train_ds.in_channels, len(names),
                  backend=config.backend)
    module = built.module.to(config.device)
    sample = train_ds[0]
    card = ModelCard(
        arch=config.arch, task=task, class_names=names, in_channels=train_ds.in_channels,
        spatial_dims=train_ds.spatial_dims, input_size=list(sample["image"].shape[1:]),
        activation="identity" if task == "regression" else
        "sigmoid" if task == "segmentation" or train_ds.multilabel else "softmax",
        backend=built.backend, channel_names=list(train_ds.channel_names),
        normalization=_channel_stats(train_ds, config.normalize_samples),
        default_layer=built.default_layer, pellucid_version=__version__,
        seed=config.seed, intended_use=dict(getattr(train_ds, "intended_use", {})),
        finding_codes={k: list(v) for k, v in getattr(train_ds, "finding_codes", {}).items()
                       if k in names},
        training={"dataset": dataset_name or type(train_ds).__name__, "n_train": len(train_ds),
                  "n_val": len(val_ds) if val_ds is not None else 0, "epochs": config.epochs,
                  "batch_size": config.batch_size, "lr": config.lr, "max_steps": config.max_steps},
    )
    loader = _loader(train_ds, config.batch_size, shuffle=True, generator=generator)
    steps = config.epochs * len(loader)
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1),
                                                pct_start=0.15)
    multilabel = card.activation == "sigmoid"
    scale = 1.0
    if task == "regression":
        labels = torch.stack([train_ds[int(i)]["label"] for i in
                              np.linspace(0, len(train_ds) - 1, min(256, len(train_ds))).astype(int)])
        scale = float(labels.std().clamp_min(1e-6))
        card.training["label_scale"] = scale
        with torch.no_grad():  # start from the mean label: the head's bias
            head = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
            head.bias.fill_(float(labels.mean()))
    losses: list[float] = []
    start = time.perf_counter()
    module.train()

    def batches():
        for _ in range(math.ceil(steps / max(len(loader), 1))):
            yield from loader

    for _, batch in track(zip(range(steps), batches(), strict=False), f"train {config.arch}",
                          total=steps, enabled=config.progress):
        logits = module(card.normalize(batch["image"].to(config.device)))
        loss = _loss(task, multilabel, logits, batch, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    module.eval()
    seconds = time.perf_counter() - start
    card.training["steps"] = steps
    card.training["seconds"] = round(seconds, 1)
    if val_ds is not None and len(val_ds):
        if task == "classification" and multilabel:
            probs, labels = predict(module, card, val_ds, config.batch_size, config.device)
            card.thresholds = pick_thresholds(probs.numpy(), labels.numpy())
        card.metrics["val"] = evaluate_model(module, card, val_ds, batch_size=config.batch_size)
    if test_ds is not None and len(test_ds):
        card.metrics["test"] = evaluate_model(module, card, test_ds, batch_size=config.batch_size)
    return TrainResult(module, card, losses, seconds)


def subset(ds: PellucidDataset, indices: int | Sequence[int]) -> PellucidDataset:
    """Samples of ``ds`` (the first ``indices`` of them, or those listed), keeping its declared
    task, classes and channels."""
    keep = range(min(indices, len(ds))) if isinstance(indices, int) else list(indices)
    sub = Subset(ds, keep)
    for attr in ("task", "class_names", "mask_names", "channel_names", "multilabel", "spatial_dims",
                 "intended_use", "finding_codes"):
        setattr(sub, attr, getattr(ds, attr))
    sub.in_channels = ds.in_channels  # type: ignore[attr-defined]
    return sub  # type: ignore[return-value]
