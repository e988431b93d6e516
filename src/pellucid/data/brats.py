"""BraTS-style multi-modal brain MRI: 4-channel volumes (T1, T1ce, T2, FLAIR) with tumour regions.

Recognised file naming, one case per folder:

- BraTS 2021: ``BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz`` (labels 0/1/2/4)
- BraTS 2023: ``BraTS-GLI-00001-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (labels 0/1/2/3)
- BrainLesion skull-stripped: ``<case>_{t1,t1c,t2,fla}_bet.nii.gz`` (labels 0/1/2/4), with the
  label file named by ``label_file`` (e.g. ``pred_fusion_mav.nii.gz``) since these cases carry
  several algorithms' segmentations rather than one ``seg``.

Labels map to the BraTS evaluation regions: WT = NCR|ED|ET (whole tumour), TC = NCR|ET (tumour
core), ET (enhancing tumour), with ET = 4 in 2021 and 3 in 2023 labelling. Each channel is
z-scored over its non-zero (brain) voxels. ``spatial_dims=3`` yields whole volumes (optionally
resized); ``spatial_dims=2`` yields axial slices (last voxel axis).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pellucid.data.base import PellucidDataset, brain_mri
from pellucid.data.splits import DEFAULT_FRACTIONS, check_split, group_split
from pellucid.data.transforms import resize_affine, resize_image, resize_mask, zscore_nonzero
from pellucid.errors import ConfigError, DataError
from pellucid.io.files import read_nifti

MODALITIES = ("t1", "t1ce", "t2", "flair")
ALIASES = {
    "t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "fla": "flair", "seg": "seg",
}
NAMING_2023 = {"t1n", "t2w", "t2f"}
ET_LABEL = {"2021": 4, "2023": 3}
REGIONS = ("WT", "TC", "ET")
_TOKEN = re.compile(r"[_-](?P<token>[A-Za-z0-9]+?)(?:_bet)?\.nii(?:\.gz)?$", re.IGNORECASE)


def labels_to_regions(labels: np.ndarray, convention: str, path: Path | str) -> np.ndarray:
    """Map a BraTS label map to a (3, ...) float mask of WT, TC, ET."""
    et = ET_LABEL[convention]
    allowed = {0, 1, 2, et}
    found = set(np.unique(labels).astype(int).tolist())
    if not found <= allowed:
        raise DataError(path, f"unexpected label values {sorted(found - allowed)} for BraTS "
                              f"{convention} labelling (allowed {sorted(allowed)})")
    wt = labels > 0
    tc = (labels == 1) | (labels == et)
    return np.stack([wt, tc, labels == et]).astype(np.float32)


def _case_files(folder: Path, label_file: str | None) -> tuple[dict[str, Path], str]:
    files: dict[str, Path] = {}
    tokens = set()
    for p in sorted(folder.iterdir()):
        m = _TOKEN.search(p.name)
        if not m:
            continue
        token = m.group("token").lower()
        if token in ALIASES and not p.name.startswith("pred_"):
            tokens.add(token)
            files[ALIASES[token]] = p
    if label_file is not None:
        lp = folder / label_file
        if lp.is_file():
            files["seg"] = lp
        else:
            files.pop("seg", None)
    convention = "2023" if tokens & NAMING_2023 else "2021"
    return files, convention


class BraTS(PellucidDataset):
    """BraTS cases as 4-channel 3D volumes or 2D axial slices with WT/TC/ET masks."""

    task = "segmentation"
    class_names = ("Tumour",)
    mask_names = REGIONS
    channel_names = ("T1", "T1ce", "T2", "FLAIR")
    intended_use = brain_mri(4)
    training_data = "real"
    multilabel = True

    def __init__(self, root: str | Path, split: str = "all", spatial_dims: int = 3,
                 size: int | Sequence[int] | None = None, slices: str = "all",
                 label_file: str | None = None, seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, require_label: bool = False,
                 normalize: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "BraTS folder not found")
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if slices not in ("all", "brain", "tumour"):
            raise ConfigError(f"slices must be 'all', 'brain' or 'tumour', got {slices!r}")
        check_split(split)
        self.spatial_dims, self.size, self.normalize = spatial_dims, size, normalize
        folders = [self.root] if any(self.root.glob("*.nii*")) else sorted(
            p for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.nii*")))
        cases = []
        for folder in folders:
            files, convention = _case_files(folder, label_file)
            missing = [m for m in MODALITIES if m not in files]
            if missing:
                raise DataError(folder, f"BraTS case is missing modality {', '.join(missing)} "
                                        f"(found {', '.join(sorted(files)) or 'no NIfTI files'})")
            if require_label and "seg" not in files:
                raise DataError(folder, f"BraTS case has no segmentation "
                                        f"({label_file or '<case>-seg.nii.gz'})")
            cases.append({"case": folder.name, "files": files, "convention": convention})
        if not cases:
            raise DataError(self.root, "no BraTS case folders with NIfTI files found")
        if split != "all":
            parts = group_split([c["case"] for c in cases], fractions, seed)
            cases = [cases[i] for i in parts[split]]
        self.cases = cases
        self._cache: tuple[int, dict] | None = None
        self.items: list[tuple[int, int | None]] = []
        for ci in range(len(cases)):
            if spatial_dims == 3:
                self.items.append((ci, None))
                continue
            vol = self._load_case(ci)
            for k in range(vol["image"].shape[-1]):
                if slices == "brain" and not bool((vol["image"][..., k] != 0).any()):
                    continue
                if slices == "tumour" and ("mask" not in vol or not bool(vol["mask"][0, ..., k].any())):
                    continue
                self.items.append((ci, k))

    def _load_case(self, ci: int) -> dict:
        if self._cache is not None and self._cache[0] == ci:
            return self._cache[1]
        case = self.cases[ci]
        arrays, affine, spacing, shape = [], None, None, None
        for m in MODALITIES:
            data, aff, sp = read_nifti(case["files"][m])
            if shape is None:
                shape, affine, spacing = data.shape, aff, sp
            elif data.shape != shape:
                raise DataError(case["files"][m], f"volume shape {data.shape} differs from the "
                                                  f"case's {MODALITIES[0]} shape {shape}")
            arrays.append(data)
        image = torch.from_numpy(np.stack(arrays))
        if self.normalize:
            image = zscore_nonzero(image)
        out = {"image": image, "affine": torch.from_numpy(affine), "spacing": spacing}
        if "seg" in case["files"]:
            labels, _, _ = read_nifti(case["files"]["seg"])
            if labels.shape != shape:
                raise DataError(case["files"]["seg"], f"label shape {labels.shape} differs from "
                                                      f"the image shape {shape}")
            labels = np.rint(labels).astype(np.int16)
            out["mask"] = torch.from_numpy(labels_to_regions(labels, case["convention"],
                                                             case["files"]["seg"]))
            out["labels"] = torch.from_numpy(labels)
        self._cache = (ci, out)
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        ci, k = self.items[index]
        vol = self._load_case(ci)
        case = self.cases[ci]
        if k is None:
            sample = {key: vol[key] for key in ("image", "mask", "labels") if key in vol}
            sample["spacing"] = vol["spacing"]
            case_id = case["case"]
        else:
            sample = {key: vol[key][..., k] for key in ("image", "mask", "labels") if key in vol}
            sample["spacing"] = vol["spacing"][:2]
            sample["slice_index"] = k
            case_id = f"{case['case']}_z{k:03d}"
        sample["affine"] = vol["affine"]
        sample["case_id"] = case_id
        sample["label_convention"] = case["convention"]
        if self.size is not None:
            dims = self.spatial_dims
            size = (self.size,) * dims if isinstance(self.size, int) else tuple(self.size)
            old = sample["image"].shape[1:]
            sample["image"] = resize_image(sample["image"], size)
            if "mask" in sample:
                sample["mask"] = resize_mask(sample["mask"], size)
            sample.pop("labels", None)
            sample["spacing"] = tuple(s * o / n for s, o, n in zip(sample["spacing"], old, size,
                                                                    strict=True))
            if k is None:
                sample["affine"] = resize_affine(sample["affine"], old, size)
        if "mask" in sample:
            sample["label"] = sample["mask"][:1].flatten(1).amax(1)
        return sample
