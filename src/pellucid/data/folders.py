"""Generic readers for a user's own data: a folder per class, or a CSV listing the images.

CSV columns (any names, mapped with ``columns``): ``path`` (relative to the CSV's folder or
absolute) and ``label`` (class name; several separated by ``|`` for multi-label; empty or ``none``
for no finding); optionally ``mask`` (a mask image: binary, or a label image), ``group`` (e.g. the
patient), ``split`` and a box (``x0,y0,x1,y1`` or ``x,y,w,h`` by default; pixels, YOLO or
fractions with ``box_format``). Several rows with the same path add several boxes to one image.
COCO JSON: data/coco.py.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pellucid.data.base import PellucidDataset
from pellucid.data.boxes import clipped_boxes, parsed_box
from pellucid.data.splits import DEFAULT_FRACTIONS, check_split, group_split
from pellucid.data.transforms import RESIZE_METHODS, resize_image, resize_mask, zscore_nonzero
from pellucid.errors import DataError
from pellucid.io.files import (
    IMAGE_SUFFIXES,
    is_file,
    is_nifti,
    read_image_2d,
    read_mask_2d,
    read_nifti,
    read_npy,
    read_raster,
)

NO_LABEL = {"", "none", "no finding"}


class _ImageListDataset(PellucidDataset):
    spatial_dims = 2

    def _finish(self, records: list[dict], split: str, seed: int, fractions: Sequence[float],
                size: int | None, channels: int | None, resize: str = "bilinear") -> None:
        if resize not in RESIZE_METHODS:
            raise DataError(None, f"resize must be one of {', '.join(RESIZE_METHODS)}, got {resize!r}")
        self.resize = resize
        check_split(split)
        if split != "all":
            parts = group_split([r["group"] for r in records], fractions, seed)
            records = [records[i] for i in parts[split]]
        self.records, self.size = records, size
        if self.spatial_dims == 3:
            self.channels, self.channel_names = 1, ("channel0",)
            return
        if channels is None and records:
            channels = read_image_2d(records[0]["path"]).shape[0]
        self.channels = channels or 1
        self.channel_names = tuple(f"channel{c}" for c in range(self.channels))

    def __len__(self) -> int:
        return len(self.records)

    def _volume(self, rec: dict) -> dict:
        """A NIfTI volume (1, *shape), z-scored over its non-zero voxels (the readers' units for
        MRI), with its mask, resized to ``size`` on every side when given."""
        data, _, spacing = read_nifti(rec["path"])
        image = zscore_nonzero(torch.from_numpy(data)[None])
        sample = {"image": image, "label": rec["label"].clone(), "case_id": rec["case_id"],
                  "spacing": tuple(float(v) for v in spacing),
                  "path": str(rec["path"])}  # the file: a framework model reads it its own way
        if rec.get("mask") is not None:
            sample["mask_path"] = str(rec["mask"])
            mask = self._mask(rec)
            if mask.shape[1:] != image.shape[1:]:
                raise DataError(rec["mask"], f"mask shape {tuple(mask.shape[1:])} differs from the "
                                             f"image's {tuple(image.shape[1:])}")
            sample["mask"] = mask
        if self.size is not None:
            size = (self.size,) * 3
            sample["image"] = resize_image(sample["image"], size, self.resize)
            if "mask" in sample:
                sample["mask"] = resize_mask(sample["mask"], size)
        return sample

    def _mask(self, rec: dict) -> torch.Tensor:
        """(1, H, W): one binary mask for the image."""
        return torch.from_numpy(read_mask_2d(rec["mask"])).float()[None]

    def _boxes(self, rec: dict, h: int, w: int) -> torch.Tensor:
        return torch.tensor([b for _, b in rec["boxes"]], dtype=torch.float32)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        if self.spatial_dims == 3:
            return self._volume(rec)
        image = torch.from_numpy(read_image_2d(rec["path"], channels=self.channels))
        h, w = image.shape[1:]
        sample = {"image": image, "label": rec["label"].clone(), "case_id": rec["case_id"],
                  "spacing": (1.0, 1.0)}
        if rec.get("mask") is not None:
            mask = self._mask(rec)
            if mask.shape[1:] != image.shape[1:]:
                raise DataError(rec["mask"], f"mask shape {tuple(mask.shape[1:])} differs from image "
                                             f"{Path(rec['path']).name} shape {(h, w)}")
            sample["mask"] = mask
        if rec.get("boxes"):
            sample["boxes"] = clipped_boxes(self._boxes(rec, h, w), h, w, rec["path"],
                                            rec.get("box_rows", []))
            sample["box_labels"] = torch.tensor([c for c, _ in rec["boxes"]], dtype=torch.long)
        if self.size is not None:
            size = (self.size, self.size)
            sample["image"] = resize_image(image, size, self.resize)
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
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, resize: str = "bilinear") -> None:
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
        self._finish(records, split, seed, fractions, size, channels, resize)


SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}
BOX_FORMATS = ("xyxy", "xywh", "yolo", "fractions")
MASK_FORMATS = ("binary", "label", "channels")
COLUMN_KEYS = ("path", "label", "mask", "group", "split", "box")


class CSVDataset(_ImageListDataset):
    """Images listed in a CSV with labels and optional masks/boxes; multi-label when any row has
    ``|`` or when ``multilabel=True``. ``group`` column (e.g. patient) keeps splits patient-wise.

    - ``columns``: the CSV's own names for ``path``, ``label``, ``mask``, ``group``, ``split`` and
      ``box`` (a list of four column names), e.g. ``{"path": "filename", "label": "diagnosis",
      "box": ["cx", "cy", "bw", "bh"]}``.
    - A ``split`` column (train / val / test; also training, valid, validation, testing) or
      ``split_files`` ({"train": file, ...}, each listing the images' paths as in the CSV, one per
      line) give the split; otherwise it is drawn (70/10/20 by ``group``, seeded).
    - ``box_format``: ``xyxy`` (pixels, the default), ``xywh`` (pixels), ``yolo`` (centre x,
      centre y, width, height as fractions of the image) or ``fractions`` (x0, y0, x1, y1 as
      fractions), of the image as stored.
    - ``resize``: how images are resized to ``size`` (``bilinear``, ``pil_uint8`` as torchvision's
      ``Resize`` of 8-bit PIL images, ``nearest``, ``bicubic``): the model card's, in a benchmark.
    - ``mask_format``: ``binary`` (one mask per image: the lesion of its finding), ``label`` (a
      label image: value k + 1 marks class k of ``class_names``, 0 is background) or ``channels``
      (one channel per class: a ``.npy`` array (K, H, W), or an image with K colour channels);
      the last two give one mask channel per class.
    """

    def __init__(self, csv_path: str | Path, class_names: Sequence[str] | None = None,
                 split: str = "all", size: int | None = None, channels: int | None = None,
                 seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 multilabel: bool | None = None, columns: dict | None = None,
                 box_format: str = "xyxy", mask_format: str = "binary",
                 split_files: dict | None = None, resize: str = "bilinear") -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(csv_path, "CSV file not found")
        if box_format not in BOX_FORMATS:
            raise DataError(csv_path, f"box_format must be one of {', '.join(BOX_FORMATS)}, got "
                                      f"{box_format!r}")
        if mask_format not in MASK_FORMATS:
            raise DataError(csv_path, f"mask_format must be one of {', '.join(MASK_FORMATS)}, got "
                                      f"{mask_format!r}")
        unknown = sorted(set(columns or {}) - set(COLUMN_KEYS))
        if unknown:
            raise DataError(csv_path, f"columns: unknown key(s) {', '.join(unknown)}; known: "
                                      f"{', '.join(COLUMN_KEYS)}")
        try:
            with csv_path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = [h.strip() for h in reader.fieldnames or []]
                rows = [{k.strip(): (v or "").strip() for k, v in r.items()
                         if k and isinstance(v, (str, type(None)))} for r in reader]
        except UnicodeDecodeError as exc:
            raise DataError(csv_path, f"not UTF-8 text (byte {exc.start})") from None
        except csv.Error as exc:
            raise DataError(csv_path, f"not a readable CSV ({exc})") from None
        col = {k: k for k in COLUMN_KEYS if k != "box"} | dict(columns or {})
        for key in ("path", "label"):
            if col[key] not in header:
                raise DataError(csv_path, f"missing column {col[key]!r} ({key}); found {header}")
        for key in ("mask", "group", "split"):
            if key in (columns or {}) and col[key] not in header:
                raise DataError(csv_path, f"missing column {col[key]!r} ({key}); found {header}")
        if "box" in (columns or {}):
            box_cols = tuple(col["box"])
            if len(box_cols) != 4 or any(c not in header for c in box_cols):
                raise DataError(csv_path, f"columns.box: give four of the CSV's columns; found {header}")
        else:
            box_cols = next((cols for cols in (("x0", "y0", "x1", "y1"), ("x", "y", "w", "h"))
                             if all(c in header for c in cols)), None)
            if box_cols == ("x", "y", "w", "h") and box_format == "xyxy":
                box_format = "xywh"
        names = [[n.strip() for n in r[col["label"]].split("|") if n.strip().lower() not in NO_LABEL]
                 for r in rows]
        if class_names is None:
            class_names = sorted({n for ns in names for n in ns})
        self.class_names = tuple(class_names)
        if not self.class_names:
            raise DataError(csv_path, f"no class labels found in column {col['label']!r}")
        self.multilabel = bool(multilabel) if multilabel is not None else any(
            len(ns) != 1 for ns in names)
        self.box_format, self.mask_format = box_format, mask_format
        given = _split_lists(csv_path, split_files) if split_files else None
        by_path: dict[str, dict] = {}
        for line, (row, ns) in enumerate(zip(rows, names, strict=True), start=2):
            unknown = [n for n in ns if n not in self.class_names]
            if unknown:
                raise DataError(csv_path, f"line {line}: unknown label {unknown[0]!r}; expected one "
                                          f"of {', '.join(self.class_names)}")
            path = Path(row[col["path"]])
            path = path if path.is_absolute() else csv_path.parent / path
            if not is_file(path):
                raise DataError(csv_path, f"line {line}: image {row[col['path']][:80]!r} not found")
            rec = by_path.get(str(path))
            if rec is None:
                label = torch.zeros(len(self.class_names))
                for n in ns:
                    label[self.class_names.index(n)] = 1.0
                mask = row.get(col["mask"]) or None
                rec = {"path": path, "label": label, "case_id": row[col["path"]], "boxes": [],
                       "mask": (csv_path.parent / mask) if mask and not Path(mask).is_absolute()
                       else (Path(mask) if mask else None),
                       "group": row.get(col["group"]) or row[col["path"]],
                       "split": _split_of(csv_path, line, row[col["path"]],
                                          row.get(col["split"], ""), given)}
                by_path[str(path)] = rec
            if box_cols and all(row.get(c) for c in box_cols):
                try:
                    box = [float(row[c]) for c in box_cols]
                except ValueError:
                    raise DataError(csv_path, f"line {line}: box values are not numbers") from None
                if len(ns) != 1:
                    raise DataError(csv_path, f"line {line}: a row with a box needs exactly one label")
                rec["boxes"].append((self.class_names.index(ns[0]),
                                     parsed_box(box, box_format, csv_path, f"line {line}")))
                rec.setdefault("box_rows", []).append(f"{csv_path.name} line {line}")
        records = list(by_path.values())
        if records and all(is_nifti(r["path"]) for r in records):  # volumes: a 3D dataset
            self.spatial_dims = 3
            if mask_format != "label" or not any(r["mask"] for r in records):
                raise DataError(csv_path, "NIfTI volumes are segmentation data: give each a label "
                                          "image (mask column) and mask_format: label")
            self.task = "segmentation"
        elif any(is_nifti(r["path"]) for r in records):
            raise DataError(csv_path, "the CSV mixes NIfTI volumes and 2D images")
        if mask_format in ("label", "channels"):
            self.mask_names = self.class_names if any(r["mask"] for r in records) else ()
        else:
            self.mask_names = ("mask",) if any(r["mask"] for r in records) else ()
        if any(r["split"] for r in records):
            missing = [r["case_id"] for r in records if not r["split"]]
            if missing:
                raise DataError(csv_path, f"image {missing[0]!r} has no split while others do; give "
                                          f"every image one")
            check_split(split)
            records = [r for r in records if split == "all" or r["split"] == split]
            split = "all"  # the given split is used as it is, never drawn again
        self._finish(records, split, seed, fractions, size, channels, resize)

    def _boxes(self, rec: dict, h: int, w: int) -> torch.Tensor:
        """The record's boxes as pixels x0, y0, x1, y1 of the image as stored."""
        out = []
        for _, (a, b, c, d) in rec["boxes"]:
            if self.box_format == "xyxy":
                out.append([a, b, c, d])
            elif self.box_format == "xywh":
                out.append([a, b, a + c, b + d])
            elif self.box_format == "yolo":
                out.append([(a - c / 2) * w, (b - d / 2) * h, (a + c / 2) * w, (b + d / 2) * h])
            else:
                out.append([a * w, b * h, c * w, d * h])
        return torch.tensor(out, dtype=torch.float32)

    def _mask(self, rec: dict) -> torch.Tensor:
        if self.mask_format == "label":
            if self.spatial_dims == 3:
                labels = np.rint(read_nifti(rec["mask"])[0]).astype(np.int64)
            else:
                labels = read_raster(rec["mask"])
                labels = labels.max(axis=-1) if labels.ndim == 3 else labels
            values = set(np.unique(labels).tolist()) - set(range(len(self.class_names) + 1))
            if values:
                raise DataError(rec["mask"], f"label image holds values {sorted(values)[:5]}; "
                                             f"expected 0 (background) to {len(self.class_names)}")
            return torch.stack([torch.from_numpy(labels == k + 1)
                                for k in range(len(self.class_names))]).float()
        if self.mask_format == "channels":
            path = Path(rec["mask"])
            arr = read_npy(path) if path.suffix.lower() == ".npy" else np.moveaxis(read_raster(path), -1, 0)
            if arr.ndim != 3 or arr.shape[0] != len(self.class_names):
                raise DataError(path, f"a mask of one channel per class needs {len(self.class_names)} "
                                      f"channels ({', '.join(self.class_names)}); it has shape "
                                      f"{tuple(arr.shape)}")
            return torch.from_numpy(np.ascontiguousarray(arr > 0)).float()
        return super()._mask(rec)


def _split_lists(csv_path: Path, files: dict) -> dict[str, str]:
    """Image path (as the CSV names it) -> split, from one list file per split."""
    out: dict[str, str] = {}
    for name, file in files.items():
        if name not in ("train", "val", "test"):
            raise DataError(csv_path, f"split_files: unknown split {name!r}; give train, val, test")
        path = Path(file) if Path(file).is_absolute() else csv_path.parent / file
        if not path.is_file():
            raise DataError(path, "split list not found")
        for line in path.read_text().splitlines():
            if line.strip():
                out[line.strip()] = name
    return out


def _split_of(csv_path: Path, line: int, path: str, value: str, given: dict | None) -> str:
    if given is not None:
        return given.get(path, "")
    if not value:
        return ""
    if value.lower() not in SPLIT_NAMES:
        raise DataError(csv_path, f"line {line}: split {value!r}; expected train, val or test")
    return SPLIT_NAMES[value.lower()]
