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
from pellucid.models.outputs import forward_tensor
from pellucid.models.performance import (
    classification_report,
    pick_thresholds,
    regression_report,
    segmentation_report,
)
from pellucid.models.training_inputs import describe_training_inputs
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
    # augmentation of each training batch (off by default): flips along the image's width (and
    # depth for volumes) with probability 0.5, rotations by up to ``rotate`` degrees (2D), and
    # intensity x (1 + u) + v with u, v uniform in [-intensity, intensity]; masks follow the image
    flip: bool = False
    rotate: float = 0.0
    intensity: float = 0.0
    # "balanced": each class weighted by its rarity in the training labels (multi-label: the
    # positive weight n_neg / n_pos per class; softmax: n / (K n_k)); "none": unweighted
    class_weights: str = "none"
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, Nesterov)
    schedule: str = "onecycle"  # onecycle | cosine | constant


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


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
CLASS_WEIGHTS = ("none", "balanced")


def class_weights(labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Per class: multi-label, the positive weight n_neg / n_pos (BCE's ``pos_weight``); softmax,
    n / (K n_k) (cross-entropy's ``weight``). A class without examples gets 1."""
    labels = labels.float()
    n, k = labels.shape
    if multilabel:
        pos = labels.sum(0)
        return torch.where(pos > 0, (n - pos) / pos.clamp_min(1), torch.ones(k))
    counts = torch.bincount(labels.argmax(1), minlength=k).float()
    return torch.where(counts > 0, n / (k * counts.clamp_min(1)), torch.ones(k))


def augment(images: torch.Tensor, masks: torch.Tensor | None, config: TrainConfig,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch with ``config``'s flips, rotations and intensity changes, drawn per sample from
    ``generator``; a mask gets the same flips and rotations (nearest), not the intensity change."""
    b = images.shape[0]
    spatial = images.ndim - 2
    if config.flip:
        for axis in ([images.ndim - 1] if spatial == 2 else [images.ndim - 1, 2]):
            chosen = torch.rand(b, generator=generator) < 0.5
            images = torch.where(chosen.view(-1, *[1] * (images.ndim - 1)), images.flip(axis), images)
            if masks is not None:
                masks = torch.where(chosen.view(-1, *[1] * (masks.ndim - 1)), masks.flip(axis), masks)
    if config.rotate > 0 and spatial == 2:
        angles = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(config.rotate)
        cos, sin = torch.cos(angles), torch.sin(angles)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1),
                             torch.stack([sin, cos, torch.zeros(b)], 1)], 1).to(images)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                               align_corners=False)
        if masks is not None:
            masks = F.grid_sample(masks.float(), grid.to(masks.device), mode="nearest",
                                  padding_mode="zeros", align_corners=False)
    if config.intensity > 0:
        shape = (b, *[1] * (images.ndim - 1))
        gain = 1 + (torch.rand(shape, generator=generator) * 2 - 1) * config.intensity
        shift = (torch.rand(shape, generator=generator) * 2 - 1) * config.intensity
        images = images * gain.to(images) + shift.to(images)
    return images, masks


def _loss(task: str, multilabel: bool, logits: torch.Tensor, batch: dict,
          scale: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
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
    w = weights.to(logits) if weights is not None else None
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=w)
    return F.cross_entropy(logits, target.argmax(1), weight=w)


@torch.no_grad()
def predict(module: nn.Module, card: ModelCard, ds: PellucidDataset, batch_size: int = 32,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs (probabilities or binary masks) and the truth (labels or masks) over ``ds``."""
    was_training = module.training
    module.eval()
    outs, truths = [], []
    try:
        for batch in _loader(ds, batch_size, shuffle=False):
            logits = forward_tensor(module, card.normalize(batch["image"].to(device))).float().cpu()
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
    for key, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                         ("class_weights", CLASS_WEIGHTS)):
        if getattr(config, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    if not 0 <= config.rotate <= 45 or not 0 <= config.intensity < 1:
        raise ConfigError(f"rotate must be 0 to 45 degrees and intensity in [0, 1), got "
                          f"{config.rotate}, {config.intensity}")
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
    sample = train_ds[0]
    built = build(config.arch, train_ds.spatial_dims, train_ds.in_channels, len(names),
                  backend=config.backend, input_size=tuple(sample["image"].shape[1:]))
    module = built.module.to(config.device)
    card = ModelCard(
        arch=config.arch, task=task, class_names=names, in_channels=train_ds.in_channels,
        spatial_dims=train_ds.spatial_dims, input_size=list(sample["image"].shape[1:]),
        activation="identity" if task == "regression" else
        "sigmoid" if task == "segmentation" or train_ds.multilabel else "softmax",
        backend=built.backend, channel_names=list(train_ds.channel_names),
        normalization=_channel_stats(train_ds, config.normalize_samples),
        default_layer=built.default_layer, pellucid_version=__version__,
        seed=config.seed, intended_use=dict(getattr(train_ds, "intended_use", {})),
        training_data=getattr(train_ds, "training_data", ""),
        # classes learnt from synthetic images are not findings in patients: no clinical codes
        finding_codes={} if getattr(train_ds, "training_data", "") == "synthetic" else
        {k: list(v) for k, v in getattr(train_ds, "finding_codes", {}).items() if k in names},
        training={"dataset": dataset_name or type(train_ds).__name__, "n_train": len(train_ds),
                  "n_val": len(val_ds) if val_ds is not None else 0, "epochs": config.epochs,
                  "batch_size": config.batch_size, "lr": config.lr, "max_steps": config.max_steps,
                  "optimizer": config.optimizer, "schedule": config.schedule,
                  "class_weights": config.class_weights, "flip": config.flip,
                  "rotate": config.rotate, "intensity": config.intensity},
    )
    loader = _loader(train_ds, config.batch_size, shuffle=True, generator=generator)
    steps = config.epochs * len(loader)
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(module.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                              weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1),
                                                    pct_start=0.15)
    elif config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    multilabel = card.activation == "sigmoid"
    weights = None
    if config.class_weights == "balanced" and task == "classification":
        labels = torch.stack([train_ds[i]["label"] for i in range(len(train_ds))])
        weights = class_weights(labels, multilabel)
        card.training["class_weight_values"] = [round(float(w), 4) for w in weights]
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
    augment_generator = torch.Generator().manual_seed(config.seed + 1)  # apart from the shuffling
    start = time.perf_counter()
    module.train()

    def batches():
        for _ in range(math.ceil(steps / max(len(loader), 1))):
            yield from loader

    for _, batch in track(zip(range(steps), batches(), strict=False), f"train {config.arch}",
                          total=steps, enabled=config.progress):
        images = batch["image"].to(config.device)
        if config.flip or config.rotate or config.intensity:
            masks = batch["mask"] if task == "segmentation" else None
            images, masks = augment(images, masks, config, augment_generator)
            if masks is not None:
                batch = {**batch, "mask": masks}
        logits = forward_tensor(module, card.normalize(images))
        loss = _loss(task, multilabel, logits, batch, scale, weights)
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
    if val_ds is not None:
        describe_training_inputs(module, card, val_ds, test_ds)
    else:
        card.training_inputs = {"not_described": "no validation images"}
    return TrainResult(module, card, losses, seconds)


def subset(ds: PellucidDataset, indices: int | Sequence[int]) -> PellucidDataset:
    """Samples of ``ds`` (the first ``indices`` of them, or those listed), keeping its declared
    task, classes and channels."""
    keep = range(min(indices, len(ds))) if isinstance(indices, int) else list(indices)
    sub = Subset(ds, keep)
    for attr in ("task", "class_names", "mask_names", "channel_names", "multilabel", "spatial_dims",
                 "intended_use", "finding_codes", "training_data"):
        setattr(sub, attr, getattr(ds, attr))
    sub.in_channels = ds.in_channels  # type: ignore[attr-defined]
    return sub  # type: ignore[return-value]
