"""The report's map galleries: each tile at the mosaic's own resolution (no resampling of the
maps), the ground truth outlined on the image tile, the method names and row titles drawn."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from pellucid.bench.report import _cell, _gallery, _grey


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_gallery_tiles_are_the_blended_maps_pixel_for_pixel():
    rng = np.random.default_rng(0)
    size, gap = 48, 4
    images = {"images": rng.random((2, 16, 16)).astype(np.float32),
              "masks": np.zeros((2, 16, 16), bool),
              "case_ids": np.array(["a", "b"]), "targets": np.array(["WT", "WT"])}
    images["masks"][0, 4:10, 4:10] = True
    heat = {"a|WT": rng.random((16, 16)), "b|WT": np.zeros((16, 16))}  # b: a constant map
    maps = {"gradcam": heat, "saliency": {"a|WT": -heat["a|WT"], "b|WT": heat["a|WT"]}}
    png = _decode(_gallery(maps, images, ["gradcam", "saliency"], [0, 1],
                           ["case a (WT)", "case b (WT)"], size=size))
    rows, cols = 2, 3
    # the labels take a strip above and a margin left of the mosaic; the mosaic ends flush
    height, width = png.shape[:2]
    top, left = height - rows * (size + gap), width - cols * (size + gap)
    assert top > 10 and left > 40  # room for the method names and the row titles
    assert (png[:top - 2, left:] < 128).any(), "no method name drawn above the tiles"
    assert (png[top:, :left - 2] < 128).any(), "no row title drawn left of the tiles"
    for r, case in enumerate(("a", "b")):
        grey = _grey(images["images"][r], size)
        for c, method in enumerate(("gradcam", "saliency")):
            want = np.clip(_cell(grey, maps[method][f"{case}|WT"], size), 0, 1) * 255 + 0.5
            y, x = top + r * (size + gap), left + (c + 1) * (size + gap)
            tile = png[y:y + size, x:x + size].astype(int)
            assert np.abs(tile - want.astype(np.uint8).astype(int)).max() <= 1, (case, method)
    # the image tile of case a: the lesion's outline in green, none on case b (no lesion)
    first = png[top:top + size, left:left + size].astype(int)
    green = (first[..., 1] > 200) & (first[..., 0] < 80) & (first[..., 2] < 80)
    assert green.sum() > 20
    second = png[top + size + gap:top + 2 * size + gap, left:left + size].astype(int)
    assert not ((second[..., 1] > 200) & (second[..., 0] < 80)).any()


def test_best_and_worst_come_from_the_first_metric_that_tells_the_cases_apart():
    """Every gallery case hits the pointing game: it has no best or worst case, so the gallery
    takes the next metric by rank (AUPRC); cases without a kept image are never picked."""
    import pandas as pd

    from pellucid.bench.report import _best_worst

    rows = []
    for case, auprc in (("a", 0.3), ("b", 0.9), ("c", 0.5), ("d", 0.99)):
        for metric, value in (("pointing_game", 1.0), ("auprc", auprc)):
            rows.append({"case_id": case, "target": "WT", "method": "gradcam", "metric_name": metric,
                         "value": value, "higher_is_better": True})
    frame = pd.DataFrame(rows)
    keys = ["a|WT", "b|WT", "c|WT"]  # d: no image kept, though its AUPRC is the highest
    idx, titles, metric = _best_worst(frame, "gradcam", keys)
    assert metric == "auprc" and idx == [1, 0]
    assert titles == ["best: auprc 0.90", "worst: auprc 0.30"]
    tied = frame[frame["metric_name"] == "pointing_game"]  # every metric tied: the first, as before
    idx, titles, metric = _best_worst(tied, "gradcam", keys)
    assert metric == "pointing_game" and len(idx) == 2
