"""TCGA lower-grade glioma FLAIR abnormality segmentation (Buda et al. 2019), Kaggle ``kaggle_3m``.

Layout: ``root/<case>/<case>_<n>.tif|png`` with the radiologist's mask in ``<case>_<n>_mask.*``.
Images have 3 channels (pre-contrast T1, FLAIR, post-contrast T1). The case folder
``TCGA_CS_4941_19960909`` belongs to patient ``TCGA_CS_4941``; splits are patient-wise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pellucid.data.base import PellucidDataset, brain_mri
from pellucid.data.splits import DEFAULT_FRACTIONS, check_split, group_split
from pellucid.data.transforms import check_resize, resize_image, resize_mask
from pellucid.errors import DataError
from pellucid.io.files import read_image_2d, read_mask_2d

_SLICE = re.compile(r"^(?P<case>.+)_(?P<n>\d+)\.(?:tif|tiff|png)$", re.IGNORECASE)


class LGGSegmentation(PellucidDataset):
    """LGG MRI slices with binary FLAIR-abnormality masks; label ``Abnormality`` = mask not empty."""

    class_names = ("Abnormality",)
    mask_names = ("Abnormality",)
    channel_names = ("T1-pre", "FLAIR", "T1-post")
    intended_use = brain_mri(3)
    training_data = "real"
    multilabel = True
    spatial_dims = 2

    def __init__(self, root: str | Path, split: str = "all", size: int | None = None,
                 seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 task: str = "segmentation", resize: str = "bilinear") -> None:
        self.root = Path(root)
        self.resize = check_resize(resize)
        if not self.root.is_dir():
            raise DataError(self.root, "LGG folder not found")
        check_split(split)
        self.size, self.task = size, task
        records = []
        for case_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for img in sorted(case_dir.iterdir()):
                m = _SLICE.match(img.name)
                if not m or img.stem.endswith("_mask"):
                    continue
                masks = [img.with_name(f"{img.stem}_mask{s}") for s in (".tif", ".tiff", ".png")]
                mask = next((p for p in masks if p.is_file()), None)
                if mask is None:
                    raise DataError(img, f"no mask file {img.stem}_mask.tif/.png beside the image")
                records.append({"image": img, "mask": mask, "case": case_dir.name,
                                "slice": int(m.group("n")),
                                "patient": "_".join(case_dir.name.split("_")[:3])})
        if not records:
            raise DataError(self.root, "no <case>/<case>_<n>.tif|png slices found (kaggle_3m layout)")
        records.sort(key=lambda r: (r["case"], r["slice"]))
        if split != "all":
            parts = group_split([r["patient"] for r in records], fractions, seed)
            records = [records[i] for i in parts[split]]
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = torch.from_numpy(read_image_2d(rec["image"], channels=3))
        mask = torch.from_numpy(read_mask_2d(rec["mask"])).float()[None]
        if mask.shape[1:] != image.shape[1:]:
            raise DataError(rec["mask"], f"mask shape {tuple(mask.shape[1:])} differs from image "
                                         f"{rec['image'].name} shape {tuple(image.shape[1:])}")
        if self.size is not None:
            image = resize_image(image, (self.size, self.size), self.resize)
            mask = resize_mask(mask, (self.size, self.size))
        return {"image": image, "mask": mask, "label": mask.flatten(1).amax(1),
                "case_id": f"{rec['case']}_{rec['slice']}", "patient_id": rec["patient"],
                "spacing": (1.0, 1.0)}
