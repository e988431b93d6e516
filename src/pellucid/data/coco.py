"""COCO JSON (``images``, ``categories``, ``annotations``): an image's labels are the categories
of its annotations; each ``bbox`` ([x, y, width, height], pixels) is a box of its category; polygon
``segmentation`` is rasterised into one mask channel per category (pixel centres inside the
polygon, by PIL). Run-length (``iscrowd``) segmentation is refused with the annotation's id. The
image files are found under ``images`` (default: the JSON's folder) by ``file_name``. Splits as
in the CSV reader: ``split_files`` or drawn 70/10/20 (by image)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pellucid.data.folders import _ImageListDataset, _split_lists
from pellucid.data.splits import DEFAULT_FRACTIONS, check_split
from pellucid.errors import DataError


class COCODataset(_ImageListDataset):
    """Images and their boxes (and polygons) from a COCO JSON file."""

    def __init__(self, json_path: str | Path, images: str | Path | None = None, split: str = "all",
                 size: int | None = None, channels: int | None = None, seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 class_names: Sequence[str] | None = None, multilabel: bool | None = None,
                 split_files: dict | None = None, resize: str = "bilinear") -> None:
        json_path = Path(json_path)
        if not json_path.is_file():
            raise DataError(json_path, "COCO JSON file not found")
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(json_path, f"not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                  for k in ("images", "categories", "annotations")):
            raise DataError(json_path, "expected a COCO object with lists 'images', 'categories' and "
                                       "'annotations'")
        folder = Path(images) if images is not None else json_path.parent
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        self.class_names = tuple(class_names or [categories[k] for k in sorted(categories)])
        unknown = sorted(set(categories.values()) - set(self.class_names))
        if unknown:
            raise DataError(json_path, f"categories {unknown} are not in class_names")
        index = {name: k for k, name in enumerate(self.class_names)}
        records: dict[int, dict] = {}
        for img in data["images"]:
            path = folder / str(img["file_name"])
            if not path.is_file():
                raise DataError(json_path, f"image {img['file_name']!r} not found under {folder}")
            records[int(img["id"])] = {"path": path, "label": torch.zeros(len(self.class_names)),
                                       "case_id": str(img["file_name"]), "boxes": [], "polygons": [],
                                       "group": str(img["file_name"]), "mask": None}
        for ann in data["annotations"]:
            rec = records.get(int(ann.get("image_id", -1)))
            if rec is None:
                raise DataError(json_path, f"annotation {ann.get('id')}: unknown image_id "
                                           f"{ann.get('image_id')!r}")
            k = index[categories[int(ann["category_id"])]]
            rec["label"][k] = 1.0
            if ann.get("bbox"):
                x, y, w, h = (float(v) for v in ann["bbox"])
                rec["boxes"].append((k, [x, y, x + w, y + h]))
            segmentation = ann.get("segmentation")
            if segmentation:
                if not isinstance(segmentation, list) or ann.get("iscrowd"):
                    raise DataError(json_path, f"annotation {ann.get('id')}: run-length "
                                               f"segmentation is not read; give polygons")
                rec["polygons"] += [(k, [float(v) for v in poly]) for poly in segmentation]
                rec["mask"] = rec["path"]  # masks come from the polygons
        out = list(records.values())
        self.multilabel = bool(multilabel) if multilabel is not None else any(
            int(r["label"].sum()) != 1 for r in out)
        self.mask_names = self.class_names if any(r["polygons"] for r in out) else ()
        if split_files:
            given = _split_lists(json_path, split_files)
            check_split(split)
            out = [r for r in out if split == "all" or given.get(r["case_id"]) == split]
            split = "all"
        self._finish(out, split, seed, fractions, size, channels, resize)

    def _mask(self, rec: dict) -> torch.Tensor:
        from PIL import Image, ImageDraw

        from pellucid.io.files import read_image_2d

        h, w = read_image_2d(rec["path"]).shape[1:]
        masks = []
        for k in range(len(self.class_names)):
            canvas = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(canvas)
            for cls, poly in rec["polygons"]:
                if cls == k and len(poly) >= 6:
                    draw.polygon(poly, fill=1, outline=1)
            masks.append(np.asarray(canvas, dtype=np.float32))
        return torch.from_numpy(np.stack(masks))
