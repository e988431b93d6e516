"""NIH ChestX-ray14 in its official layout (Wang et al., CVPR 2017).

``root`` holds ``Data_Entry_2017.csv`` (pipe-separated findings, "No Finding" = all zero),
optionally ``BBox_List_2017.csv`` (boxes in the original 1024 px frame), optionally the official
``train_val_list.txt`` / ``test_list.txt``, and the PNGs in ``images/`` (or ``images_*/images/``
as the download unpacks, or ``root`` itself). Without the official lists, a seeded patient-wise
split is made. Boxes are scaled to the loaded image size.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pellucid.data.base import CHEST_FINDING_CODES, CHEST_RADIOGRAPH, PellucidDataset
from pellucid.data.boxes import clipped_boxes, parsed_box
from pellucid.data.splits import DEFAULT_FRACTIONS, check_split, group_split
from pellucid.data.transforms import check_resize, resize_image
from pellucid.errors import DataError
from pellucid.io.files import read_image_2d

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
BOX_FRAME = 1024  # official boxes are given in the 1024 x 1024 images
# spellings used in BBox_List_2017.csv that differ from the label file
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
BOX_COLUMNS = ("Image Index", "Finding Label")


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(path, f"missing column(s) {', '.join(map(repr, missing))}; "
                                      f"found {header}")
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError:
        raise DataError(path, "not a text CSV file") from None


def _find_image_dirs(root: Path) -> list[Path]:
    dirs = [root / "images"] if (root / "images").is_dir() else []
    dirs += sorted(p for p in root.glob("images_*/images") if p.is_dir())
    dirs += sorted(p for p in root.glob("images_*") if p.is_dir() and not (p / "images").is_dir())
    return dirs or [root]


class ChestXray14(PellucidDataset):
    """ChestX-ray14 radiographs with 14 multi-label findings and, where given, NIH boxes."""

    task = "classification"
    class_names = FINDINGS
    mask_names = FINDINGS
    channel_names = ("X-ray",)
    intended_use = CHEST_RADIOGRAPH
    training_data = "real"
    finding_codes = CHEST_FINDING_CODES
    multilabel = True
    spatial_dims = 2

    def __init__(self, root: str | Path, split: str = "all", size: int | None = None,
                 seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 images_dir: str | Path | None = None, missing: str = "error",
                 box_masks: bool = False, resize: str = "bilinear") -> None:
        self.root = Path(root)
        self.resize = check_resize(resize)
        if not self.root.is_dir():
            raise DataError(self.root, "ChestX-ray14 folder not found")
        check_split(split)
        if missing not in ("error", "skip"):
            raise DataError(None, f"missing must be 'error' or 'skip', got {missing!r}")
        self.size, self.box_masks = size, box_masks
        entries = _read_csv(self.root / "Data_Entry_2017.csv", ENTRY_COLUMNS) \
            if (self.root / "Data_Entry_2017.csv").is_file() else None
        if entries is None:
            raise DataError(self.root / "Data_Entry_2017.csv", "file not found")
        dirs = [Path(images_dir)] if images_dir else _find_image_dirs(self.root)
        index = {}
        for d in dirs:
            for p in d.glob("*.png"):
                index.setdefault(p.name, p)

        csv_path = self.root / "Data_Entry_2017.csv"
        records = []
        for line, row in enumerate(entries, start=2):
            name = row["Image Index"]
            labels = np.zeros(len(FINDINGS), np.float32)
            for finding in row["Finding Labels"].split("|"):
                finding = finding.strip()
                if finding == NO_FINDING:
                    continue
                if finding not in FINDINGS:
                    raise DataError(csv_path, f"line {line}: unknown finding {finding!r}; "
                                              f"expected one of {', '.join(FINDINGS)} or {NO_FINDING!r}")
                labels[FINDINGS.index(finding)] = 1.0
            if name not in index:
                if missing == "skip":
                    continue
                raise DataError(csv_path, f"line {line}: image {name} not found under "
                                          f"{', '.join(map(str, dirs))} (pass missing='skip' to ignore)")
            records.append({"name": name, "path": index[name], "labels": labels,
                            "patient": row["Patient ID"], "geometry": _geometry(row)})

        self.boxes = self._read_boxes()
        self.records = self._select(records, split, seed, fractions)

    def _read_boxes(self) -> dict[str, list[tuple[int, list[float]]]]:
        path = self.root / "BBox_List_2017.csv"
        if not path.is_file():
            return {}
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        header = [h.strip() for h in rows[0]]
        missing = [c for c in BOX_COLUMNS if c not in header]
        if missing or len(header) < 6:
            raise DataError(path, f"missing column(s) {missing or ['Bbox [x,y,w,h]']}; found {header}")
        boxes: dict[str, list[tuple[int, list[float]]]] = {}
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            label = BOX_LABEL_ALIASES.get(row[1].strip(), row[1].strip())
            if label not in FINDINGS:
                raise DataError(path, f"line {line}: unknown finding {row[1]!r}")
            try:
                x, y, w, h = parsed_box([float(v) for v in row[2:6]], "xywh", path, f"line {line}")
            except ValueError:
                raise DataError(path, f"line {line}: box values {row[2:6]} are not numbers") from None
            boxes.setdefault(row[0].strip(), []).append((FINDINGS.index(label), [x, y, x + w, y + h]))
        return boxes

    def _select(self, records: list[dict], split: str, seed: int,
                fractions: Sequence[float]) -> list[dict]:
        if split == "all":
            return records
        lists = {s: self.root / f for s, f in (("trainval", "train_val_list.txt"),
                                               ("test", "test_list.txt"))}
        if all(p.is_file() for p in lists.values()):
            test_names = set(lists["test"].read_text().split())
            if split == "test":
                return [r for r in records if r["name"] in test_names]
            trainval = [r for r in records if r["name"] not in test_names]
            # the official lists have no validation split: take one patient-wise from train_val
            parts = group_split([r["patient"] for r in trainval], (0.875, 0.125, 0.0), seed)
            return [trainval[i] for i in parts["train" if split == "train" else "val"]]
        parts = group_split([r["patient"] for r in records], fractions, seed)
        return [records[i] for i in parts[split]]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = torch.from_numpy(read_image_2d(rec["path"], channels=1))
        if self.size is not None:
            image = resize_image(image, (self.size, self.size), self.resize)
        height, width = image.shape[-2:]
        sample = {"image": image, "label": torch.from_numpy(rec["labels"]),
                  "case_id": rec["name"], "patient_id": rec["patient"],
                  "spacing": _spacing(rec["geometry"], height, width)}
        if self.boxes:
            found = self.boxes.get(rec["name"], [])
            scale_x, scale_y = width / BOX_FRAME, height / BOX_FRAME
            boxes = torch.tensor([[b[0] * scale_x, b[1] * scale_y, b[2] * scale_x, b[3] * scale_y]
                                  for _, b in found], dtype=torch.float32).reshape(-1, 4)
            boxes = clipped_boxes(boxes, height, width, self.root / "BBox_List_2017.csv",
                                  [f"the box of {rec['name']} ({i + 1})" for i in range(len(found))])
            sample["boxes"] = boxes
            sample["box_labels"] = torch.tensor([c for c, _ in found], dtype=torch.long)
            if self.box_masks:
                sample["mask"] = boxes_to_masks(boxes, sample["box_labels"], len(FINDINGS),
                                                (height, width))
        return sample


def _geometry(row: dict[str, str]) -> tuple[float, float, float, float] | None:
    """(original width, height, spacing x, spacing y) from the entry's last four columns."""
    try:
        return (float(row["OriginalImage[Width"]), float(row["Height]"]),
                float(row["OriginalImagePixelSpacing[x"]), float(row["y]"]))
    except (KeyError, ValueError):
        return None


def _spacing(geometry: tuple[float, ...] | None, height: int, width: int) -> tuple[float, float]:
    """Pixel spacing (row, column) in mm of the loaded image: the original detector spacing scaled
    by original size / loaded size (the distributed PNGs are the originals resized)."""
    if geometry is None:
        return (1.0, 1.0)
    w0, h0, sx, sy = geometry
    return (sy * h0 / height, sx * w0 / width)


def boxes_to_masks(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   shape: tuple[int, int]) -> torch.Tensor:
    """Rasterise (x0, y0, x1, y1) boxes into a (num_classes, H, W) mask; a pixel is inside when its
    centre is."""
    masks = torch.zeros(num_classes, *shape)
    ys = torch.arange(shape[0]).float() + 0.5
    xs = torch.arange(shape[1]).float() + 0.5
    for (x0, y0, x1, y1), c in zip(boxes.tolist(), labels.tolist(), strict=True):
        inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
        masks[c] = torch.maximum(masks[c], inside.float())
    return masks
