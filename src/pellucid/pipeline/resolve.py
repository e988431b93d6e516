"""What a user asks about a case (a class name or index, a region, a ground-truth mask, a reference
value) resolved against a model card into one :class:`pellucid.targets.Target`. This is the single
resolver behind the CLI, the REST service, the PACS command and the benchmark, so that the same
request means the same score everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pellucid.errors import ConfigError
from pellucid.models.card import ModelCard
from pellucid.targets import (
    ClassTarget,
    RegressionTarget,
    SegmentationErrorTarget,
    SegmentationTarget,
    Target,
)

REGIONS = ("predicted", "all", "fp", "fn")  # what a user may ask of one case
BENCH_REGIONS = ("predicted", "truth", "all", "fp", "fn")  # the benchmark also scores the truth


def class_index(card: ModelCard | None, target: str | int | None) -> int | None:
    """A class (or output) given by name or index, checked against the card; None: predicted."""
    if target is None:
        return None
    names = list(card.class_names) if card is not None else []
    if isinstance(target, str) and target in names:
        return names.index(target)
    text = str(target).strip()
    if not text.isdigit():
        raise ConfigError(f"unknown target {target!r}; classes: {', '.join(names) or 'give an index'}")
    index = int(text)
    if names and index >= len(names):
        raise ConfigError(f"target index {index} is out of range: the model has {len(names)} outputs "
                          f"({', '.join(names)})")
    return index


def card_target(card: ModelCard | None, classes: int | Sequence[int] | torch.Tensor | None = None,
                region: str = "predicted", truth: torch.Tensor | None = None,
                reference: float | None = None) -> Target | int | None:
    """The Target for a model card's task: the class logit (classification, with the card's
    activation), the output minus ``reference`` (regression), the segmentation logits summed over a
    region (``predicted`` | ``all`` | ``truth``), or over the segmentation's errors against ``truth``
    (``fp``: marked but not true, ``fn``: true but missed). ``classes`` None means the predicted class
    (or the first output / region). Without a card the task is unknown until the model's output is
    seen: the class index (or None) is returned for :func:`pellucid.targets.as_target` to bind, and
    anything that needs the task is refused."""
    if region not in BENCH_REGIONS:
        raise ConfigError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    if card is None:
        if region != "predicted" or reference is not None:
            raise ConfigError("a region or a reference needs a model card (a zoo folder) to know "
                              "the model's task")
        return None if classes is None else int(torch.as_tensor(classes).flatten()[0])
    if card.task == "regression":
        if region != "predicted":
            raise ConfigError(f"region {region!r} is for segmentation models; this model regresses")
        first = 0 if classes is None else int(torch.as_tensor(classes).flatten()[0])
        return RegressionTarget(first, reference)
    if reference is not None:
        raise ConfigError(f"a reference value is for regression models; this model's task is {card.task}")
    if card.task == "classification":
        if region != "predicted":
            raise ConfigError(f"region {region!r} is for segmentation models; this model classifies")
        return ClassTarget(classes, kind="logit", activation=card.activation)
    index = 0 if classes is None else classes
    if region in ("fp", "fn", "truth") and truth is None:
        raise ConfigError(f"region {region} needs the ground truth (--truth MASK)")
    if region in ("fp", "fn"):
        return SegmentationErrorTarget(truth, index, region, card.activation)
    return SegmentationTarget(index, truth if region == "truth" else region, kind="logit",
                              activation=card.activation)


def load_mask(path: str | Path, size: Sequence[int]) -> torch.Tensor:
    """A ground-truth mask file (NIfTI, PNG/TIFF, .npy) as booleans resized (nearest) to ``size``."""
    from pellucid.data.transforms import resize_mask
    from pellucid.io.files import is_nifti, read_mask_2d, read_nifti, read_npy

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--truth {path}: file not found")
    if is_nifti(path):
        data = read_nifti(path)[0]
    elif path.suffix.lower() == ".npy":
        data = read_npy(path)
    else:
        data = read_mask_2d(path)
    mask = torch.from_numpy(np.asarray(data) > 0)
    if mask.ndim != len(size):
        raise ConfigError(f"--truth {path}: a {mask.ndim}D mask for a {len(size)}D input")
    return resize_mask(mask[None].float(), list(size))[0] > 0.5
