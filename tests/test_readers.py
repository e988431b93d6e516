"""Every reader loads every file of its folder in the shared data, aligned with its truth."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pellucid.data import BraTS, ChestXray14, LGGSegmentation, collate
from pellucid.data.brats import REGIONS
from pellucid.data.chestxray14 import FINDINGS, boxes_to_masks
from pellucid.errors import DataError
from pellucid.io.files import read_image_2d


def test_chestxray14_loads_every_image_with_labels(shared_data):
    root = shared_data / "chestxray14-sample"
    ds = ChestXray14(root)
    with (root / "Data_Entry_2017.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(ds) == len(rows) == len(list((root / "images").glob("*.png")))
    by_name = {r["Image Index"]: r["Finding Labels"] for r in rows}
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (1, 256, 256)
        assert float(s["image"].min()) >= 0.0 and float(s["image"].max()) <= 1.0
        names = {FINDINGS[k] for k in torch.nonzero(s["label"]).flatten().tolist()}
        expected = set(by_name[s["case_id"]].split("|")) - {"No Finding"}
        assert names == expected


def test_chestxray14_boxes_scaled_to_loaded_size_and_on_the_same_anatomy(shared_data):
    """Boxes are given in the 1024 px frame; the 256 px image and the 1024 px original must show the
    same pixels inside each scaled box."""
    root = shared_data / "chestxray14-sample"
    ds = ChestXray14(root)
    with_boxes = [i for i, r in enumerate(ds.records) if r["name"] in ds.boxes]
    n_boxes = sum(len(v) for v in ds.boxes.values())
    assert len(with_boxes) == len(list((root / "images_1024").glob("*.png"))) == 12
    assert n_boxes == 12  # the sample's BBox_List holds 12 rows (the data README says 13)
    for i in with_boxes:
        s = ds[i]
        big = torch.from_numpy(read_image_2d(root / "images_1024" / s["case_id"], channels=1))
        assert big.shape[-1] == 1024
        for box, label in zip(s["boxes"], s["box_labels"], strict=True):
            x0, y0, x1, y1 = box.tolist()
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            assert FINDINGS[int(label)] in {FINDINGS[k] for k in torch.nonzero(s["label"]).flatten()}
            # crop the same box from both resolutions; compare after bringing the big one down
            small = s["image"][0, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
            crop = big[:, int(y0 * 4):int(np.ceil(y1) * 4), int(x0 * 4):int(np.ceil(x1) * 4)]
            down = F.interpolate(crop[None], size=small.shape, mode="area")[0, 0]
            corr = np.corrcoef(small.flatten().numpy(), down.flatten().numpy())[0, 1]
            assert corr > 0.95, (s["case_id"], corr)
    # a box mask lies where the box is
    s = ds[with_boxes[0]]
    masks = boxes_to_masks(s["boxes"], s["box_labels"], len(FINDINGS), (256, 256))
    k = int(s["box_labels"][0])
    ys, xs = torch.nonzero(masks[k], as_tuple=True)
    x0, y0, x1, y1 = s["boxes"][0].tolist()
    assert xs.min() >= np.floor(x0) and xs.max() <= np.ceil(x1)
    assert ys.min() >= np.floor(y0) and ys.max() <= np.ceil(y1)


def test_chestxray14_patient_wise_split_is_seeded_and_disjoint(shared_data):
    root = shared_data / "chestxray14-sample"
    parts = {s: ChestXray14(root, split=s, seed=3) for s in ("train", "val", "test")}
    patients = {s: {r["patient"] for r in ds.records} for s, ds in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(d) for d in parts.values()) == len(ChestXray14(root))
    again = ChestXray14(root, split="test", seed=3)
    assert [r["name"] for r in again.records] == [r["name"] for r in parts["test"].records]
    assert 0.15 < len(parts["test"]) / 621 < 0.25


def test_lgg_loads_every_slice_with_its_mask(shared_data):
    root = shared_data / "lgg-mri-segmentation"
    ds = LGGSegmentation(root)
    images = [p for p in root.rglob("*.png") if not p.stem.endswith("_mask")]
    assert len(ds) == len(images) == 620
    positives, brighter = 0, 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 256, 256) and s["mask"].shape == (1, 256, 256)
        assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
        if s["mask"].any():
            positives += 1
            inside = s["mask"][0] > 0
            brain = s["image"].amax(0) > 0.05
            # the abnormality lies on the brain, and is bright on FLAIR (channel 1)
            assert (inside & brain).sum() >= 0.95 * inside.sum()
            flair = s["image"][1]
            brighter += bool(flair[inside].mean() > flair[brain & ~inside].mean())
    assert positives > 100
    # FLAIR abnormality masks sit on FLAIR-bright tissue in (nearly) every slice
    assert brighter / positives > 0.9


def test_lgg_split_is_patient_wise(shared_data):
    root = shared_data / "lgg-mri-segmentation"
    parts = {s: {r["patient"] for r in LGGSegmentation(root, split=s).records}
             for s in ("train", "val", "test")}
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["val"])
    assert len(parts["train"] | parts["val"] | parts["test"]) == 16


def test_brats_2023_case_loads_four_modalities_with_affine(shared_data):
    ds = BraTS(shared_data / "brats-format-samples")
    assert len(ds) == 2
    cases = {c["case"]: c for c in ds.cases}
    assert cases["BraTS-GLI-00001-000"]["convention"] == "2023"
    assert cases["TCGA-DU-7294"]["convention"] == "2021"
    s = ds[[c["case"] for c in ds.cases].index("BraTS-GLI-00001-000")]
    assert s["image"].shape == (4, 240, 240, 155)
    assert s["affine"].shape == (4, 4) and "mask" not in s
    brain = s["image"][0] != 0
    for c in range(4):  # z-scored over the brain
        vals = s["image"][c][s["image"][c] != 0]
        assert abs(float(vals.mean())) < 1e-3 and abs(float(vals.std()) - 1) < 1e-2
    assert brain.float().mean() > 0.05


@pytest.mark.parametrize("label_file", [
    "pred_fusion_mav.nii.gz", "pred_fusion_simple.nii.gz", "pred_segmentation_hnfnetv1-20.nii.gz",
    "pred_segmentation_isen-20.nii.gz", "pred_segmentation_sanet0-20.nii.gz",
    "pred_segmentation_scan-20.nii.gz", "pred_segmentation_yixinmpl-20.nii.gz"])
def test_brats_brainlesion_case_with_each_label_file(shared_data, label_file):
    ds = BraTS(shared_data / "brats-format-samples" / "TCGA-DU-7294", label_file=label_file)
    s = ds[0]
    assert s["mask"].shape == (3, *s["image"].shape[1:])
    wt, tc, et = (s["mask"][i] > 0 for i in range(3))
    assert (tc & ~wt).sum() == 0 and (et & ~tc).sum() == 0  # regions nest
    brain = s["image"][3] != 0
    assert wt.sum() > 1000 and (wt & brain).sum() >= 0.99 * wt.sum()
    flair = s["image"][3]
    assert flair[wt].mean() > flair[brain & ~wt].mean() + 0.5  # tumour is FLAIR-bright


def test_brats_axial_slices_and_resize(shared_data):
    root = shared_data / "brats-format-samples" / "TCGA-DU-7294"
    slices = BraTS(root, spatial_dims=2, slices="tumour", label_file="pred_fusion_mav.nii.gz", size=96)
    assert 0 < len(slices) < 155
    s = slices[len(slices) // 2]
    assert s["image"].shape == (4, 96, 96) and s["mask"].shape == (3, 96, 96)
    assert s["mask"][0].any() and s["label"].item() == 1.0
    vol = BraTS(root, spatial_dims=3, size=(64, 64, 48), label_file="pred_fusion_mav.nii.gz")[0]
    full = BraTS(root, spatial_dims=3, label_file="pred_fusion_mav.nii.gz")[0]
    assert vol["image"].shape == (4, 64, 64, 48)
    # the resized affine maps the volume's centre to the same world point
    def centre(affine, shape):
        c = torch.tensor([(n - 1) / 2 for n in shape] + [1.0], dtype=torch.float64)
        return (affine @ c)[:3]
    assert torch.allclose(centre(vol["affine"], (64, 64, 48)),
                          centre(full["affine"], full["image"].shape[1:]), atol=1e-6)
    batch = collate([slices[0], slices[1]])
    assert batch["image"].shape == (2, 4, 96, 96) and len(batch["case_id"]) == 2


def test_brats_2021_naming_and_labels(tmp_path):
    import nibabel as nib

    case = tmp_path / "BraTS2021_00000"
    case.mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for m in ("flair", "t1", "t1ce", "t2"):
        nib.save(nib.Nifti1Image(rng.random((8, 8, 4)).astype(np.float32) + 1, affine),
                 case / f"BraTS2021_00000_{m}.nii.gz")
    seg = np.zeros((8, 8, 4), np.int16)
    seg[2:6, 2:6, 1:3] = 2
    seg[3:5, 3:5, 1:3] = 4
    seg[3, 3, 1] = 1
    nib.save(nib.Nifti1Image(seg, affine), case / "BraTS2021_00000_seg.nii.gz")
    s = BraTS(tmp_path)[0]
    assert s["label_convention"] == "2021"
    assert [int(s["mask"][i].sum()) for i in range(3)] == [32, 8, 7]
    assert REGIONS == ("WT", "TC", "ET")


def _phantom_pngs(folder, n=12):
    """Chest phantoms as PNG files with their class masks; (file name, label index, mask) each."""
    from PIL import Image

    from pellucid.data import open_dataset

    folder.mkdir(parents=True, exist_ok=True)
    ds = open_dataset("phantom-chest", split="test", n=6 * n, size=64)
    out = []
    for i in range(len(ds)):
        s = ds[i]
        present = torch.nonzero(s["label"] > 0).flatten().tolist()
        if len(present) == 1:
            Image.fromarray((s["image"][0].numpy() * 255).astype(np.uint8)).save(folder / f"img{i}.png")
            out.append((f"img{i}.png", present[0], s["mask"][present[0]].numpy() > 0))
        if len(out) == n:
            return out, ds.class_names
    return out, ds.class_names


def test_csv_with_its_own_columns_split_yolo_boxes_and_label_masks(tmp_path):
    from PIL import Image

    from pellucid.data import open_dataset

    items, names = _phantom_pngs(tmp_path)
    rows = ["filename,diagnosis,patient,fold,seg,cx,cy,bw,bh"]
    expected = {}
    for j, (file, k, mask) in enumerate(items):
        label = np.where(mask, k + 1, 0).astype(np.uint8)
        Image.fromarray(label).save(tmp_path / f"{file}.label.png")
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        expected[file] = [x0, y0, x1, y1]
        fold = ("train", "validation", "test")[j % 3]
        rows.append(f"{file},{names[k]},p{j},{fold},{file}.label.png,{(x0 + x1) / 128},"
                    f"{(y0 + y1) / 128},{(x1 - x0) / 64},{(y1 - y0) / 64}")
    (tmp_path / "my.csv").write_text("\n".join(rows) + "\n")
    options = {"columns": {"path": "filename", "label": "diagnosis", "group": "patient",
                           "split": "fold", "mask": "seg", "box": ["cx", "cy", "bw", "bh"]},
               "box_format": "yolo", "mask_format": "label", "class_names": list(names)}
    test = open_dataset("csv", root=tmp_path / "my.csv", split="test", **options)
    assert sorted(test.records[i]["case_id"] for i in range(len(test))) == \
        sorted(f for j, (f, _, _) in enumerate(items) if j % 3 == 2)  # the given split, as given
    assert len(open_dataset("csv", root=tmp_path / "my.csv", split="val", **options)) == \
        len([j for j in range(len(items)) if j % 3 == 1])
    assert test.mask_names == tuple(names)
    for i in range(len(test)):
        sample = test[i]
        file = sample["case_id"]
        k = next(k for f, k, _ in items if f == file)
        mask = next(m for f, _, m in items if f == file)
        assert sample["mask"].shape == (len(names), 64, 64)
        assert torch.equal(sample["mask"][k] > 0, torch.from_numpy(mask))
        assert sample["mask"].sum() == sample["mask"][k].sum()  # the other channels are empty
        torch.testing.assert_close(sample["boxes"][0], torch.tensor(expected[file], dtype=torch.float32))


def test_coco_json_boxes_and_polygons(tmp_path):
    import json

    from pellucid.data import open_dataset

    items, names = _phantom_pngs(tmp_path, n=4)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 10 + k, "name": n} for k, n in enumerate(names)]}
    for j, (file, k, mask) in enumerate(items):
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        coco["images"].append({"id": j, "file_name": file, "width": 64, "height": 64})
        coco["annotations"].append({"id": 100 + j, "image_id": j, "category_id": 10 + k,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = open_dataset("coco", root=tmp_path / "coco.json")
    assert ds.class_names == tuple(names) and len(ds) == len(items)
    for j in range(len(ds)):
        s = ds[j]
        file, k, mask = next(it for it in items if it[0] == s["case_id"])
        assert int(s["label"].argmax()) == k and s["label"].sum() == 1
        x0, y0, x1, y1 = s["boxes"][0].tolist()
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        box_mask = s["mask"][k] > 0  # the polygon of the box, rasterised
        assert box_mask[int(y0):int(y1), int(x0):int(x1)].all()
        assert box_mask.sum() <= (x1 - x0 + 1) * (y1 - y0 + 1)
    coco["annotations"][0]["segmentation"] = {"counts": "abc", "size": [64, 64]}
    coco["annotations"][0]["iscrowd"] = 1
    (tmp_path / "rle.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="annotation 100: run-length"):
        open_dataset("coco", root=tmp_path / "rle.json")


def test_csv_masks_with_one_channel_per_class(tmp_path):
    from pellucid.data import open_dataset

    items, names = _phantom_pngs(tmp_path, n=3)
    rows = ["path,label,mask"]
    for file, k, mask in items:
        stack = np.zeros((len(names), *mask.shape), np.float32)
        stack[k] = mask
        np.save(tmp_path / f"{file}.npy", stack)
        rows.append(f"{file},{names[k]},{file}.npy")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset("csv", root=tmp_path / "m.csv", mask_format="channels", class_names=list(names))
    assert ds.mask_names == tuple(names)
    for i in range(len(ds)):
        file, k, mask = next(it for it in items if it[0] == ds[i]["case_id"])
        assert torch.equal(ds[i]["mask"][k] > 0, torch.from_numpy(mask)) and ds[i]["mask"].sum() == mask.sum()
    np.save(tmp_path / f"{items[0][0]}.npy", np.zeros((2, 64, 64), np.float32))
    first = next(i for i in range(len(ds)) if ds.records[i]["case_id"] == items[0][0])
    with pytest.raises(DataError, match="needs 3 channels"):
        ds[first]
