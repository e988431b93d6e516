"""Generic readers for a user's own data: a folder per class, or a CSV listing the images.

CSV columns: ``path`` (relative to the CSV's folder or absolute) and ``label`` (class name;
several separated by ``|`` for multi-label; empty or ``none`` for no finding); optionally
``mask`` (path of a mask image) and a box as ``x0,y0,x1,y1`` or ``x,y,w,h`` (pixels of the
file as stored). Several rows with the same path add several boxes to one image.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from pellucid.data.base import PellucidDataset
from pellucid.data.splits import DEFAULT_FRACTIONS, check_split, group_split
from pellucid.data.transforms import resize_image, resize_mask
from pellucid.errors import DataError
from pellucid.io.files import IMAGE_SUFFIXES, read_image_2d, read_mask_2d

NO_LABEL = {"", "none", "no finding"}


class _ImageListDataset(PellucidDataset):
    spatial_dims = 2

    def _finish(self, records: list[dict], split: str, seed: int, fractions: Sequence[float],
                size: int | None, channels: int | None) -> None:
        check_split(split)
        if split != "all":
            parts = group_split([r["group"] for r in records], fractions, seed)
            records = [records[i] for i in parts[split]]
        self.records, self.size = records, size
        if channels is None and records:
            channels = read_image_2d(records[0]["path"]).shape[0]
        self.channels = channels or 1
        self.channel_names = tuple(f"channel{c}" for c in range(self.channels))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = torch.from_numpy(read_image_2d(rec["path"], channels=self.channels))
        h, w = image.shape[1:]
        sample = {"image": image, "label": rec["label"].clone(), "case_id": rec["case_id"],
                  "spacing": (1.0, 1.0)}
        if rec.get("mask") is not None:
            mask = torch.from_numpy(read_mask_2d(rec["mask"])).float()[None]
            if mask.shape[1:] != image.shape[1:]:
                raise DataError(rec["mask"], f"mask shape {tuple(mask.shape[1:])} differs from image "
                                             f"{Path(rec['path']).name} shape {(h, w)}")
            sample["mask"] = mask
        if rec.get("boxes"):
            sample["boxes"] = torch.tensor([b for _, b in rec["boxes"]], dtype=torch.float32)
            sample["box_labels"] = torch.tensor([c for c, _ in rec["boxes"]], dtype=torch.long)
        if self.size is not None:
            size = (self.size, self.size)
            sample["image"] = resize_image(image, size)
            if "mask" in sample:
                sample["mask"] = resize_mask(sample["mask"], size)
            if "boxes" in sample:
                scale = torch.tensor([self.size / w, self.size / h] * 2)
                sample["boxes"] = sample["boxes"] * scale
        return sample


class FolderDataset(_ImageListDataset):
    """``root/<class name>/<image>``: one class per folder, single-label (softmax) classification."""

    multilabel = False

    def __init__(self, root: str | Path, split: str = "all", size: int | None = None,
                 channels: int | None = None, seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(root, "image folder not found")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise DataError(root, f"expected one sub-folder per class (at least 2), found {classes}")
        self.class_names = tuple(classes)
        records = []
        for c, name in enumerate(classes):
            for p in sorted((root / name).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    label = torch.zeros(len(classes))
                    label[c] = 1.0
                    records.append({"path": p, "label": label, "case_id": f"{name}/{p.name}",
                                    "group": str(p)})
        if not records:
            raise DataError(root, "no images found in the class folders")
        self._finish(records, split, seed, fractions, size, channels)


class CSVDataset(_ImageListDataset):
    """Images listed in a CSV with labels and optional masks/boxes; multi-label when any row has
    ``|`` or when ``multilabel=True``. ``group`` column (e.g. patient) keeps splits patient-wise."""

    def __init__(self, csv_path: str | Path, class_names: Sequence[str] | None = None,
                 split: str = "all", size: int | None = None, channels: int | None = None,
                 seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 multilabel: bool | None = None) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(csv_path, "CSV file not found")
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
        for col in ("path", "label"):
            if col not in header:
                raise DataError(csv_path, f"missing column {col!r}; found {header}")
        box_cols = next((cols for cols in (("x0", "y0", "x1", "y1"), ("x", "y", "w", "h"))
                         if all(c in header for c in cols)), None)
        names = [[n.strip() for n in r["label"].split("|") if n.strip().lower() not in NO_LABEL]
                 for r in rows]
        if class_names is None:
            class_names = sorted({n for ns in names for n in ns})
        self.class_names = tuple(class_names)
        if not self.class_names:
            raise DataError(csv_path, "no class labels found in column 'label'")
        self.multilabel = bool(multilabel) if multilabel is not None else any(
            len(ns) != 1 for ns in names)
        by_path: dict[str, dict] = {}
        for line, (row, ns) in enumerate(zip(rows, names, strict=True), start=2):
            unknown = [n for n in ns if n not in self.class_names]
            if unknown:
                raise DataError(csv_path, f"line {line}: unknown label {unknown[0]!r}; expected one "
                                          f"of {', '.join(self.class_names)}")
            path = Path(row["path"])
            path = path if path.is_absolute() else csv_path.parent / path
            if not path.is_file():
                raise DataError(csv_path, f"line {line}: image {row['path']!r} not found")
            rec = by_path.get(str(path))
            if rec is None:
                label = torch.zeros(len(self.class_names))
                for n in ns:
                    label[self.class_names.index(n)] = 1.0
                mask = row.get("mask") or None
                rec = {"path": path, "label": label, "case_id": row["path"], "boxes": [],
                       "mask": (csv_path.parent / mask) if mask and not Path(mask).is_absolute()
                       else (Path(mask) if mask else None),
                       "group": row.get("group") or row["path"]}
                by_path[str(path)] = rec
            if box_cols and all(row.get(c) for c in box_cols):
                try:
                    a, b, c, d = (float(row[c]) for c in box_cols)
                except ValueError:
                    raise DataError(csv_path, f"line {line}: box values are not numbers") from None
                box = [a, b, c, d] if box_cols[2] == "x1" else [a, b, a + c, b + d]
                if len(ns) != 1:
                    raise DataError(csv_path, f"line {line}: a row with a box needs exactly one label")
                rec["boxes"].append((self.class_names.index(ns[0]), box))
        self.mask_names = ("mask",) if any(r["mask"] for r in by_path.values()) else ()
        self._finish(list(by_path.values()), split, seed, fractions, size, channels)
