"""COCO JSON (``images``, ``categories``, ``annotations``): an image's labels are the categories
of its annotations; each ``bbox`` ([x, y, width, height], pixels) is a box of its category; polygon
``segmentation`` is rasterised into one mask channel per category (pixel centres inside the
polygon, by PIL). Run-length (``iscrowd``) segmentation is refused with the annotation's id. The
image files are found under ``images`` (default: the JSON's folder) by ``file_name``. Splits as
in the CSV reader: ``split_files`` or drawn 70/10/20 (by image)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pellucid.data.boxes import parsed_box
from pellucid.data.folders import _ImageListDataset, _split_lists
from pellucid.data.splits import DEFAULT_FRACTIONS, check_split
from pellucid.errors import DataError
from pellucid.io.files import is_file


def _load_json(path: Path):
    """The parsed JSON, refusing in one line text that is not JSON or not UTF-8, and JSON nested
    deeper than the parser's recursion allows (a 200,000-deep list)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read the JSON file ({type(exc).__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({str(exc)[:120]})") from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to read") from None


def _int(record, key: str, path: Path, where: str) -> int:
    """``record[key]`` as an integer id, or one DataError naming the row."""
    if not isinstance(record, dict):
        raise DataError(path, f"{where}: expected an object")
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise DataError(path, f"{where}: needs an integer '{key}', got {value!r}")
    return int(value)


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
        data = _load_json(json_path)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                  for k in ("images", "categories", "annotations")):
            raise DataError(json_path, "expected a COCO object with lists 'images', 'categories' and "
                                       "'annotations'")
        folder = Path(images) if images is not None else json_path.parent
        categories: dict[int, str] = {}
        for n, c in enumerate(data["categories"]):
            cid = _int(c, "id", json_path, f"categories[{n}]")
            if not isinstance(c.get("name"), str) or not c["name"]:
                raise DataError(json_path, f"categories[{n}] (id {cid}): needs a 'name'")
            if cid in categories:
                raise DataError(json_path, f"categories[{n}]: id {cid} is given twice")
            categories[cid] = c["name"]
        self.class_names = tuple(class_names or [categories[k] for k in sorted(categories)])
        unknown = sorted(set(categories.values()) - set(self.class_names))
        if unknown:
            raise DataError(json_path, f"categories {unknown} are not in class_names")
        index = {name: k for k, name in enumerate(self.class_names)}
        records: dict[int, dict] = {}
        for n, img in enumerate(data["images"]):
            iid = _int(img, "id", json_path, f"images[{n}]")
            if not isinstance(img.get("file_name"), str) or not img["file_name"]:
                raise DataError(json_path, f"images[{n}] (id {iid}): needs a 'file_name'")
            path = folder / img["file_name"]
            if not is_file(path):
                raise DataError(json_path, f"image {img['file_name'][:80]!r} not found under {folder}")
            records[iid] = {"path": path, "label": torch.zeros(len(self.class_names)),
                            "case_id": img["file_name"], "boxes": [], "polygons": [],
                            "group": img["file_name"], "mask": None, "box_rows": []}
        for n, ann in enumerate(data["annotations"]):
            where = f"annotation {ann.get('id', f'[{n}]') if isinstance(ann, dict) else f'[{n}]'}"
            rec = records.get(_int(ann, "image_id", json_path, where))
            if rec is None:
                raise DataError(json_path, f"{where}: unknown image_id {ann.get('image_id')!r}")
            cid = _int(ann, "category_id", json_path, where)
            if cid not in categories:
                raise DataError(json_path, f"{where}: unknown category_id {cid}")
            k = index[categories[cid]]
            rec["label"][k] = 1.0
            if ann.get("bbox") is not None:
                box = ann["bbox"]
                if not isinstance(box, list) or not all(isinstance(v, (int, float))
                                                        and not isinstance(v, bool) for v in box):
                    raise DataError(json_path, f"{where}: bbox must be [x, y, width, height] numbers")
                x, y, w, h = parsed_box([float(v) for v in box], "xywh", json_path, where)
                rec["boxes"].append((k, [x, y, x + w, y + h]))
                rec["box_rows"].append(f"{json_path.name} {where}")
            segmentation = ann.get("segmentation")
            if segmentation:
                if not isinstance(segmentation, list) or ann.get("iscrowd"):
                    raise DataError(json_path, f"{where}: run-length segmentation is not read; "
                                               f"give polygons")
                for poly in segmentation:
                    if not isinstance(poly, list) or len(poly) % 2 or not all(
                            isinstance(v, (int, float)) and not isinstance(v, bool)
                            and math.isfinite(v) for v in poly):
                        raise DataError(json_path, f"{where}: a polygon is a flat list of finite "
                                                   f"x, y numbers")
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
