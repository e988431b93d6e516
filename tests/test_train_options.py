"""Training as a researcher sets it up: class weights by hand, augmentation that moves masks with
their images, the optimiser and schedule options, and a CSV's given split used as given."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pellucid.errors import ConfigError
from pellucid.models.train import TrainConfig, _loss, augment, class_weights


def test_class_weights_by_hand():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    # multi-label: n_neg / n_pos per class; a class without positives gets 1
    assert class_weights(labels, True).tolist() == pytest.approx([1 / 3, 3.0, 1.0])
    single = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert class_weights(single, False).tolist() == pytest.approx([4 / 9, 4 / 3, 1.0])
    logits = torch.randn(4, 3)
    w = class_weights(labels, True)
    by_hand = -(w * labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)).mean()
    assert _loss("classification", True, logits, {"label": labels}, weights=w).item() == \
        pytest.approx(by_hand.item(), rel=1e-6)


def test_augmentation_moves_masks_with_images_and_is_seeded():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 32, 32)
    masks = (images > 0.7).float()
    config = TrainConfig(flip=True, rotate=15.0)
    out, moved = augment(images.clone(), masks.clone(), config, torch.Generator().manual_seed(3))
    again, _ = augment(images.clone(), masks.clone(), config, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and not torch.equal(out, images)
    # the same transformation of the mask as of the image: a binary image stays on its mask
    same, same_mask = augment(masks.clone(), masks.clone(), TrainConfig(flip=True),
                              torch.Generator().manual_seed(5))
    assert torch.equal(same, same_mask)
    bright, _ = augment(images, None, TrainConfig(intensity=0.1), torch.Generator().manual_seed(1))
    ratio = (bright - bright.mean((1, 2, 3), keepdim=True)).std() / images.std()
    assert 0.85 < float(ratio) < 1.15 and not torch.equal(bright, images)
    assert moved.shape == masks.shape and set(moved.unique().tolist()) <= {0.0, 1.0}


def test_optimiser_schedule_and_weights_train_and_are_recorded():
    from pellucid.data import open_dataset
    from pellucid.models import train

    ds = open_dataset("phantom-chest", split="train", n=64, size=32)
    result = train(ds, TrainConfig(epochs=1, batch_size=16, progress=False, optimizer="sgd",
                                   schedule="cosine", class_weights="balanced", flip=True,
                                   rotate=5.0, intensity=0.05))
    training = result.card.training
    assert (training["optimizer"], training["schedule"], training["class_weights"]) == \
        ("sgd", "cosine", "balanced")
    assert len(training["class_weight_values"]) == 3 and all(math.isfinite(v) for v in result.losses)
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, sgd"):
        train(ds, TrainConfig(epochs=1, optimizer="adam", progress=False))


def test_a_csv_split_column_is_trained_and_tested_as_given(tmp_path):
    import json

    from pellucid.cli import main
    from tests.test_tutorial import _user_data

    _user_data(tmp_path)
    main(["train", "--data", "csv", "--root", str(tmp_path / "my_data" / "labels.csv"), "--size", "32",
          "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "m"), "--csv-columns",
          json.dumps({"path": "file", "label": "finding", "group": "patient", "split": "split",
                      "box": ["x_center", "y_center", "width", "height"]}),
          "--csv-box-format", "yolo"])
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    rows = (tmp_path / "my_data" / "labels.csv").read_text().splitlines()[1:]
    given = {split: len({r.split(",")[0] for r in rows if r.split(",")[3] == split})
             for split in ("train", "val", "test")}
    assert card["training"]["n_train"] == given["train"] and card["training"]["n_val"] == given["val"]
    assert card["metrics"]["test"]["n"] == given["test"]
