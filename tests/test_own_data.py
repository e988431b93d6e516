"""A user's model on a user's data, in the layouts people have (issue: "your own model on your own
data"): a COCO JSON with boxes and polygons, a CSV with label-image masks of three classes, and a
3D NIfTI set with label volumes; each model saved as a bare state dict, brought in with
``pellucid import-model``, and benchmarked from a YAML written beside the data with relative
paths. Every localisation metric has values, the multi-class masks do not crash, and the numbers
equal ``pellucid.evaluate`` on the same inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

NAMES = ["Cardiomegaly", "Nodule", "Consolidation"]


def _cli(folder: Path, *args: str) -> None:
    """``pellucid ARGS`` run in ``folder`` (a user's own factory module importable as ``tests``)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "pellucid.cli", *args], cwd=folder,
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, (args, done.stderr[-3000:])


def _chest_pngs(folder: Path, n: int) -> list[tuple[str, int, np.ndarray]]:
    from PIL import Image

    from pellucid.data import open_dataset

    folder.mkdir(parents=True)
    ds = open_dataset("phantom-chest", split="test", n=6 * n, size=64)
    out = []
    for i in range(len(ds)):
        s = ds[i]
        present = torch.nonzero(s["label"] > 0).flatten().tolist()
        if len(present) == 1:
            Image.fromarray((s["image"][0].numpy() * 255).astype(np.uint8)).save(folder / f"c{i}.png")
            out.append((f"c{i}.png", present[0], s["mask"][present[0]].numpy() > 0))
        if len(out) == n:
            break
    return out


def _state_dict(tmp_path: Path, arch: str, dims: int, outputs: int) -> Path:
    """A user's weights: a network trained elsewhere (random here), saved as a bare state dict."""
    from pellucid.models import build

    torch.manual_seed(0)
    module = build(arch, dims, 1, outputs, backend="torchvision" if dims == 2 and arch != "unet"
                   else None).module
    torch.save(module.state_dict(), tmp_path / f"{arch}{dims}d.pt")
    return tmp_path / f"{arch}{dims}d.pt"


def _bench(folder: Path, config: dict) -> pd.DataFrame:
    (folder / "bench.yaml").write_text(yaml.safe_dump(config))
    _cli(folder, "bench", "bench.yaml", "--out", "run", "--no-report")
    return pd.read_csv(folder / "run" / "results.csv")


def _check_against_evaluate(frame: pd.DataFrame, ds, model, method: str, metric: str,
                            target_index) -> None:
    import pellucid

    by_case = {ds[i]["case_id"]: ds[i] for i in range(len(ds))}
    rows = frame[(frame["metric"] == metric) & (frame["method"] == method)]
    assert len(rows) >= 3
    for row in rows.itertuples():
        sample = by_case[row.case_id]
        k = target_index(row.target)
        x = model.card.normalize(sample["image"][None].float())
        e = pellucid.explain(model, x, method, target=k)
        ref = pellucid.evaluate(model, x, e, metrics=[metric], masks=sample["mask"][k][None])
        assert row.value == pytest.approx(ref[metric].scores[0].item(), abs=1e-5), row


@pytest.mark.slow
def test_coco_and_label_masks_with_an_imported_classifier(tmp_path):
    from PIL import Image

    from pellucid.data import open_dataset
    from pellucid.models import load_model

    items = _chest_pngs(tmp_path / "images", 16)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}
    rows = ["image,finding,labels"]
    for j, (file, k, mask) in enumerate(items):
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        coco["images"].append({"id": j, "file_name": f"images/{file}", "width": 64, "height": 64})
        coco["annotations"].append({"id": j, "image_id": j, "category_id": k + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        Image.fromarray(np.where(mask, k + 1, 0).astype(np.uint8)).save(tmp_path / "images" /
                                                                         f"{file}.labels.png")
        rows.append(f"images/{file},{NAMES[k]},images/{file}.labels.png")
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    weights = _state_dict(tmp_path, "resnet18", 2, 3)
    _cli(tmp_path, "import-model", weights.name, "--out", "mine", "--arch", "resnet18", "--backend",
         "torchvision", "--task", "classification", "--classes", ",".join(NAMES), "--activation",
         "sigmoid", "--input-size", "64,64")
    metrics = ["pointing_game", "energy_pointing_game", "iou", "relevance_mass"]
    config = {"name": "own", "seed": 0, "batch_size": 4, "baselines": ["centre"],
              "datasets": {
                  "coco": {"reader": "coco", "root": "coco.json", "split": "all", "cases": 8,
                           "options": {"class_names": NAMES}},
                  "masks": {"reader": "csv", "root": "labels.csv", "split": "all", "cases": 8,
                            "options": {"class_names": NAMES, "mask_format": "label",
                                        "columns": {"path": "image", "label": "finding",
                                                    "mask": "labels"}}}},
              "models": {"mine": {"datasets": ["coco", "masks"], "path": "mine"}},
              "methods": ["gradcam"], "metrics": metrics}
    frame = _bench(tmp_path, config)
    for dataset in ("coco", "masks"):
        part = frame[frame["dataset"] == dataset]
        assert part["value"].notna().all(), part[part["value"].isna()][["metric", "reason"]]
        assert set(part["metric"]) == set(metrics)
    assert "Consolidation" in set(frame["target"]) or "Nodule" in set(frame["target"])
    model = load_model(tmp_path / "mine")
    for name, ds in (("coco", open_dataset("coco", root=tmp_path / "coco.json", class_names=NAMES)),
                     ("masks", open_dataset("csv", root=tmp_path / "labels.csv", class_names=NAMES,
                                            mask_format="label", columns={
                                                "path": "image", "label": "finding",
                                                "mask": "labels"}))):
        _check_against_evaluate(frame[frame["dataset"] == name], ds, model, "gradcam",
                                "energy_pointing_game", NAMES.index)


@pytest.mark.slow
def test_a_3d_nifti_set_with_an_imported_unet(tmp_path):
    import nibabel as nib

    from pellucid.data import open_dataset
    from pellucid.models import load_model

    (tmp_path / "vols").mkdir()
    ds = open_dataset("phantom-brain-3d", split="test", n=6, size=24, task="segmentation")
    rows = ["volume,finding,seg"]
    for i in range(len(ds)):
        s = ds[i]
        flair = s["image"][3].numpy()
        labels = np.zeros(flair.shape, np.uint8)
        labels[s["mask"][0].numpy() > 0] = 1  # the whole tumour, class 1 of the label volume
        nib.save(nib.Nifti1Image(flair, np.eye(4)), str(tmp_path / "vols" / f"v{i}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "vols" / f"v{i}_seg.nii.gz"))
        rows.append(f"vols/v{i}.nii.gz,WT,vols/v{i}_seg.nii.gz")
    (tmp_path / "volumes.csv").write_text("\n".join(rows) + "\n")
    weights = _state_dict(tmp_path, "unet", 3, 1)
    _cli(tmp_path, "import-model", weights.name, "--out", "unet", "--arch", "unet", "--task",
         "segmentation", "--classes", "WT", "--input-size", "24,24,24", "--channels", "1")
    options = {"class_names": ["WT"], "mask_format": "label",
               "columns": {"path": "volume", "label": "finding", "mask": "seg"}}
    config = {"name": "vol", "seed": 0, "batch_size": 2, "baselines": ["centre"],
              "datasets": {"vols": {"reader": "csv", "root": "volumes.csv", "split": "all",
                                    "cases": 4, "options": options}},
              "models": {"unet": {"datasets": ["vols"], "path": "unet", "region": "all"}},
              "methods": ["saliency"], "metrics": ["pointing_game", "energy_pointing_game"]}
    frame = _bench(tmp_path, config)
    assert frame["value"].notna().all(), frame[frame["value"].isna()][["metric", "reason"]]
    volumes = open_dataset("csv", root=tmp_path / "volumes.csv", **options)
    assert volumes.spatial_dims == 3 and volumes.task == "segmentation"
    model = load_model(tmp_path / "unet")
    assert model.card.activation == "sigmoid"  # one output: certain, not guessed

    import pellucid
    from pellucid.targets import SegmentationTarget

    by_case = {volumes[i]["case_id"]: volumes[i] for i in range(len(volumes))}
    rows = frame[(frame["metric"] == "energy_pointing_game") & (frame["method"] == "saliency")]
    assert len(rows) == 4
    for row in rows.itertuples():
        sample = by_case[row.case_id]
        x = model.card.normalize(sample["image"][None].float())
        target = SegmentationTarget(0, region="all")
        e = pellucid.explain(model, x, "saliency", target=target)
        ref = pellucid.evaluate(model, x, e, metrics=["energy_pointing_game"],
                                masks=sample["mask"][0][None])
        assert row.value == pytest.approx(ref["energy_pointing_game"].scores[0].item(), abs=1e-5)


@pytest.mark.slow
def test_a_bench_config_takes_a_factory_and_its_weights_beside_a_card(tmp_path):
    """``path: package.module:factory`` with ``weights:`` (relative to the YAML) and the card.json
    beside the weights: the run keeps it as a model folder and scores it like any other."""
    from tests.factories import tiny_resnet

    torch.manual_seed(0)
    torch.save(tiny_resnet().state_dict(), tmp_path / "w.pt")
    _cli(tmp_path, "import-model", "tests.factories:tiny_resnet", "--weights", "w.pt", "--out", "f",
         "--task", "classification", "--classes", "Cardiomegaly,Nodule", "--activation", "sigmoid",
         "--input-size", "64,64")
    (tmp_path / "weights").mkdir()
    (tmp_path / "f" / "model.safetensors").rename(tmp_path / "weights" / "model.safetensors")
    (tmp_path / "f" / "card.json").rename(tmp_path / "weights" / "card.json")
    config = {"name": "factory", "seed": 0, "batch_size": 4, "baselines": False,
              "datasets": {"chest": {"reader": "phantom-chest", "cases": 4, "options": {"size": 64}}},
              "models": {"f": {"datasets": ["chest"], "path": "tests.factories:tiny_resnet",
                               "weights": "weights/model.safetensors", "targets": [0, 1]}},
              "methods": ["gradcam"], "metrics": ["pointing_game"]}
    frame = _bench(tmp_path, config)
    assert len(frame) and frame["value"].notna().all()
    card = json.loads((tmp_path / "run" / "models" / "f" / "card.json").read_text())
    assert card["factory"] == "tests.factories:tiny_resnet"
