"""Common shape of every pellucid dataset and the batch collation for it.

A sample is a dict:

- ``image``: float32 tensor (C, H, W) or (C, D, H, W)
- ``label``: float32 multi-hot tensor (K,) (classification datasets)
- ``mask``: float32 tensor (K_mask, *spatial), one channel per finding or region, when known
- ``boxes``: float32 tensor (N, 4) as (x0, y0, x1, y1) in pixels of the loaded image, with
  ``box_labels`` (N,) class indices, when the dataset has boxes
- ``case_id``: str; ``spacing``: tuple of floats; ``affine``: (4, 4) float64 tensor for volumes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

STACKED_KEYS = ("image", "label", "mask")
# intended uses the built-in readers declare for the models trained on them
CHEST_RADIOGRAPH = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"],
                    "photometric": ["MONOCHROME1", "MONOCHROME2"], "channels": [1]}

# SNOMED CT codes of the findings that DICOM's own code tables (PS3.16, as pydicom ships them) name,
# checked against them by tests/test_models.py; the others (atelectasis, infiltration, pneumonia,
# consolidation, emphysema, pleural thickening, hernia) stay in pellucid's scheme until a card
# maps them, since a wrong code in a hospital's records is worse than a private one
CHEST_FINDING_CODES: dict[str, list[str]] = {
    "Cardiomegaly": ["SCT", "287272002", "Cardiomegaly"],
    "Effusion": ["SCT", "60046008", "Pleural effusion"],
    "Mass": ["SCT", "4147007", "Mass"],
    "Nodule": ["SCT", "27925004", "Nodule"],
    "Pneumothorax": ["SCT", "36118008", "Pneumothorax"],
    "Edema": ["SCT", "19242006", "Pulmonary edema"],
    "Fibrosis": ["SCT", "112674009", "Fibrosis"],
}


def brain_mri(channels: int) -> dict[str, Any]:
    """Brain MRI with ``channels`` sequences stacked as channels."""
    return {"modalities": ["MR"], "body_parts": ["BRAIN", "HEAD"],
            "photometric": ["MONOCHROME2"], "channels": [channels]}


class PellucidDataset(Dataset):
    """Base class: declares task, classes, channels and mask names; subclasses load samples."""

    task: str = "classification"  # or "segmentation"
    class_names: tuple[str, ...] = ()
    mask_names: tuple[str, ...] = ()
    channel_names: tuple[str, ...] = ()
    multilabel: bool = True
    spatial_dims: int = 2
    # the inputs a model trained on this data is meant for (copied into its card; see
    # pellucid.models.card.INTENDED_USE_KEYS); empty: the data does not say
    intended_use: ClassVar[dict[str, Any]] = {}
    # standard codes of the classes (class -> [scheme, value, meaning]), copied into the card's
    # finding_codes for the SR; a class without one is coded in pellucid's own scheme
    finding_codes: ClassVar[dict[str, list[str]]] = {}
    # what the images are (copied into the card's training_data): "synthetic", "real" or ""
    # (the reader does not know, e.g. a user's folder)
    training_data: ClassVar[str] = ""

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": type(self).__name__,
            "task": self.task,
            "class_names": list(self.class_names),
            "mask_names": list(self.mask_names),
            "channel_names": list(self.channel_names),
            "spatial_dims": self.spatial_dims,
            "n": len(self),
        }


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors that share a shape (image, label, mask); keep the rest as lists, with None for
    a sample that lacks the key (an image without boxes among images with boxes)."""
    batch: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for s in samples for k in s))
    for key in keys:
        values = [s.get(key) for s in samples]
        if key in STACKED_KEYS and all(isinstance(v, torch.Tensor) for v in values) \
                and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
