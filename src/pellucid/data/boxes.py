"""Ground-truth boxes checked before they become ground truth.

A box is kept only when it can exist: four finite numbers; in ``yolo`` and ``fractions`` format
every value within [0, 1]; positive width and height (``x1 > x0``, ``y1 > y0`` once converted to
pixel corners). Against the image (known when it is read): a box partly outside is clipped to the
image (pixel corners ``[0, width] x [0, height]``, the rule COCO tools apply); a box entirely
outside, or one that clipping leaves without area, is refused. Each refusal is one
:class:`DataError` naming the file and the row (CSV line, COCO annotation id).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pellucid.errors import DataError


def parsed_box(values: list[float], fmt: str, source: Path, where: str) -> list[float]:
    """``values`` (as given in ``fmt``) checked for what needs no image: finite, fractions within
    [0, 1], positive sides."""
    if len(values) != 4:
        raise DataError(source, f"{where}: a box needs 4 numbers, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise DataError(source, f"{where}: box values must be finite, got {values}")
    if fmt in ("yolo", "fractions") and not all(0.0 <= v <= 1.0 for v in values):
        raise DataError(source, f"{where}: {fmt} box values are fractions of the image in [0, 1], "
                                f"got {values}")
    a, b, c, d = values
    sides = (c, d) if fmt in ("xywh", "yolo") else (c - a, d - b)
    if not all(s > 0 for s in sides):
        raise DataError(source, f"{where}: the box has a non-positive width or height ({fmt} "
                                f"{values})")
    return values


def clipped_boxes(boxes: torch.Tensor, height: int, width: int, source: Path,
                  wheres: list[str]) -> torch.Tensor:
    """(N, 4) pixel corners x0, y0, x1, y1 clipped to the image; a box with no area left inside
    the image is refused naming its row."""
    if boxes.numel() == 0:
        return boxes
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if bool(empty.any()):
        i = int(empty.nonzero()[0])
        box = [round(float(v), 2) for v in boxes[i]]
        raise DataError(source, f"{wheres[i] if i < len(wheres) else f'box {i}'}: the box {box} "
                                f"lies outside the {width} x {height} image")
    return clipped
