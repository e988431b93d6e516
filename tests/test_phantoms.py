"""Phantoms: reproducible from (seed, index), labels exactly when lesions are drawn, nested regions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pellucid.data import BrainPhantom, ChestPhantom, open_dataset
from pellucid.data.phantoms import CHEST_FINDINGS


def test_chest_phantom_is_reproducible_and_seed_dependent():
    a, b, c = ChestPhantom(4, 64, seed=5), ChestPhantom(4, 64, seed=5), ChestPhantom(4, 64, seed=6)
    assert torch.equal(a[2]["image"], b[2]["image"])
    assert not torch.equal(a[2]["image"], c[2]["image"])


def test_chest_findings_present_exactly_when_their_lesion_is_drawn():
    ds = ChestPhantom(200, 96, seed=1)
    counts = np.zeros(3)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (1, 96, 96) and s["mask"].shape == (3, 96, 96)
        present = s["mask"].flatten(1).amax(1)
        assert torch.equal(present, s["label"])
        counts += s["label"].numpy()
    assert (counts > 50).all() and (counts < 110).all()  # each finding ~40 %
    assert CHEST_FINDINGS == ("Cardiomegaly", "Nodule", "Consolidation")


def test_chest_lesions_change_the_image_where_their_mask_is():
    """Re-drawing the same sample without noise: the lesion pixels are brighter than their
    surroundings (the truth is in the image, not only in the label)."""
    ds = ChestPhantom(60, 128, seed=2, noise=0.0)
    for i in range(len(ds)):
        s = ds[i]
        for k in (1, 2):  # nodule, consolidation: brighter than the lung around them
            m = s["mask"][k] > 0
            if m.any():
                ring = torch.from_numpy(
                    __import__("scipy").ndimage.binary_dilation(m.numpy(), iterations=3)) & ~m
                assert s["image"][0][m].mean() > s["image"][0][ring].mean() + 0.05


def test_cardiomegaly_means_a_larger_heart():
    ds = ChestPhantom(120, 96, seed=3)
    enlarged, normal = [], []
    for i in range(len(ds)):
        s = ds[i]
        width = None
        if s["label"][0]:
            width = (s["mask"][0].amax(0) > 0).sum().item()
            enlarged.append(width)
    assert min(enlarged) > 0.55 * 0.63 * 96  # CTR >= 0.58 of a thorax ~0.63 of the width
    del normal


@pytest.mark.parametrize("dims,size", [(2, 64), (3, 32)])
def test_brain_phantom_regions_nest_and_have_channel_contrast(dims, size):
    ds = BrainPhantom(40, size, seed=4, spatial_dims=dims)
    tumours = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (4, *(size,) * dims)
        wt, tc, et = (s["mask"][k] > 0 for k in range(3))
        assert not (tc & ~wt).any() and not (et & ~tc).any()
        assert s["label"].item() == float(wt.any())
        if wt.any():
            tumours += 1
            t1ce, flair = s["image"][1], s["image"][3]
            edema = wt & ~tc
            assert t1ce[et].mean() > t1ce[edema].mean()  # enhancing rim bright on T1ce
            assert flair[edema].mean() > flair[s["image"][0] != 0].mean()  # oedema FLAIR-bright
    assert 20 < tumours < 40
    if dims == 3:
        assert s["affine"].shape == (4, 4)


def test_phantom_splits_do_not_overlap():
    train = open_dataset("phantom-chest", split="train", n=8, size=32)
    test = open_dataset("phantom-chest", split="test", n=8, size=32)
    assert all(not torch.equal(train[i]["image"], test[i]["image"]) for i in range(8))
