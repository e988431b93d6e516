"""Dataset readers. ``open_dataset(name, ...)`` is the one entry point the CLI and configs use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pellucid.data.base import PellucidDataset, collate
from pellucid.data.brats import BraTS
from pellucid.data.chestxray14 import ChestXray14
from pellucid.data.coco import COCODataset
from pellucid.data.folders import CSVDataset, FolderDataset
from pellucid.data.lgg import LGGSegmentation
from pellucid.data.phantoms import BrainPhantom, ChestPhantom
from pellucid.errors import ConfigError

# phantom splits are disjoint because each split draws from its own seed offset
PHANTOM_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003, "all": 0}
PHANTOM_SPLIT_N = {"train": 512, "val": 128, "test": 128, "all": 512}

DATASETS = {
    "phantom-chest": "synthetic chest radiographs, 3 findings with exact masks (default)",
    "phantom-brain": "synthetic 4-channel brain MRI slices with WT/TC/ET masks",
    "phantom-brain-3d": "synthetic 4-channel brain MRI volumes with WT/TC/ET masks",
    "phantom-survival": "synthetic 4-channel brain MRI slices labelled with overall survival (months)",
    "chestxray14": "NIH ChestX-ray14, official layout (root = folder with Data_Entry_2017.csv)",
    "lgg": "TCGA LGG FLAIR abnormality, Kaggle kaggle_3m layout",
    "brats": "BraTS 2021/2023 (or BrainLesion *_bet) NIfTI case folders",
    "folder": "a folder per class",
    "csv": "a CSV with path,label[,mask][,group][,split][,box]: any column names (columns:), boxes "
           "as pixels, YOLO or fractions, masks binary or label images, a given split",
    "coco": "COCO JSON (root = the JSON file): boxes and polygon masks per category",
}


def open_dataset(name: str, root: str | Path | None = None, split: str = "all",
                 **options: Any) -> PellucidDataset:
    """Open a dataset by name; ``options`` go to the reader (size, seed, spatial_dims, ...)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if name.startswith("phantom"):
        seed = int(options.pop("seed", 0)) + PHANTOM_SPLIT_OFFSET.get(split, 0)
        n = int(options.pop("n", PHANTOM_SPLIT_N.get(split, 512)))
        if name == "phantom-chest":
            return ChestPhantom(n=n, seed=seed, **options)
        dims = 3 if name.endswith("3d") else 2
        options.setdefault("size", 48 if dims == 3 else 96)
        if name == "phantom-survival":
            options["task"] = "survival"
        return BrainPhantom(n=n, seed=seed, spatial_dims=dims, **options)
    if root is None:
        raise ConfigError(f"dataset {name!r} needs a root folder (--root)")
    readers = {"chestxray14": ChestXray14, "lgg": LGGSegmentation, "brats": BraTS,
               "folder": FolderDataset, "csv": CSVDataset, "coco": COCODataset}
    return readers[name](root, split=split, **options)


__all__ = [
    "DATASETS", "BraTS", "BrainPhantom", "COCODataset", "CSVDataset", "ChestPhantom", "ChestXray14",
    "FolderDataset", "LGGSegmentation", "PellucidDataset", "collate", "open_dataset",
]
