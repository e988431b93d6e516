"""A tiny MONAI bundle made with MONAI's own bundle tools, on the CPU, for the tests: the folder is
laid out by ``monai.bundle.init_bundle`` (configs/metadata.json, configs/inference.json,
models/model.pt), its inference configuration is the shape of the model zoo's segmentation bundles
(LoadImaged -> EnsureChannelFirstd -> Orientationd RAS -> Spacingd -> ScaleIntensityRanged;
a Gaussian ``SlidingWindowInferer``; softmax, ``Invertd`` back to the file and ``SaveImaged`` of the
probabilities), and the network (a MONAI UNet built from ``network_def``) is trained here for a few
hundred steps on the synthetic sphere volumes of tests/nnunet_results.py.

    python -m tests.monai_bundle OUT        # OUT/sphere_bundle
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.nnunet_results import _write, sphere_case

NAME = "sphere_bundle"
NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
           "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
PIXDIM = [1.5, 1.5, 2.0]


def inference_config() -> dict:
    """The bundle's inference.json (its keys as the model zoo's segmentation bundles use them)."""
    image = "image"
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "/nonexistent",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "network_def": NETWORK,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": image, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": image},
            {"_target_": "Orientationd", "keys": image, "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": image, "pixdim": PIXDIM, "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": image, "a_min": 0, "a_max": 500,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": image}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 16], "sw_batch_size": 2,
                    "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": image, "nearest_interp": False, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_postfix": "prob", "output_dtype": "$numpy.float32", "resample": False,
             "separate_folder": False, "print_log": False}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "@ckpt_path",
                      "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network", "inferer": "@inferer",
                      "postprocessing": "@postprocessing", "val_handlers": "@handlers"},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def metadata() -> dict:
    from monai.bundle.utils import DEFAULT_METADATA

    return {**DEFAULT_METADATA, "name": "Sphere lesion segmentation (test bundle)", "version": "0.1.0",
            "task": "Segmentation of a bright sphere in CT-like noise",
            "description": "A test bundle trained on synthetic volumes; not for clinical use",
            "intended_use": "tests only",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT",
                                     "num_channels": 1, "spatial_shape": ["16*n", "16*n", "16*n"],
                                     "dtype": "float32", "value_range": [0, 1],
                                     "is_patch_data": True, "channel_def": {"0": "CT"}}},
                "outputs": {"pred": {"type": "image", "format": "labels", "num_channels": 2,
                                     "spatial_shape": ["16*n", "16*n", "16*n"], "dtype": "float32",
                                     "value_range": [0, 1], "is_patch_data": True,
                                     "channel_def": {"0": "background", "1": "lesion"}}}}}


def make(out: Path, cases: int = 6, steps: int = 150) -> Path:
    """Write ``out/sphere_bundle`` (and its training volumes under ``out/train``)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import init_bundle
    from monai.transforms import (
        Compose,
        DivisiblePadd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    out.mkdir(parents=True, exist_ok=True)
    train = out / "train"
    train.mkdir(exist_ok=True)
    items = []
    for k in range(cases):
        image, label, _ = sphere_case(100 + k)
        _write(image, train / f"sphere_{k}.nii.gz")
        _write(label, train / f"sphere_{k}_label.nii.gz")
        items.append({"image": str(train / f"sphere_{k}.nii.gz"),
                      "label": str(train / f"sphere_{k}_label.nii.gz")})
    keys = ["image", "label"]
    prepare = Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys),
                       Orientationd(keys, axcodes="RAS"),
                       Spacingd(keys, pixdim=PIXDIM, mode=("bilinear", "nearest")),
                       ScaleIntensityRanged("image", a_min=0, a_max=500, b_min=0.0, b_max=1.0,
                                            clip=True), DivisiblePadd(keys, k=4)])
    data = [prepare(item) for item in items]
    x = torch.stack([d["image"].as_tensor() for d in data]).float()
    y = torch.stack([d["label"].as_tensor() for d in data])[:, 0].round().long()
    torch.manual_seed(0)
    parser = ConfigParser({"network_def": NETWORK})
    net = parser.get_parsed_content("network_def")
    optimiser = torch.optim.Adam(net.parameters(), 3e-3)
    weight = torch.tensor([1.0, 10.0])
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y, weight=weight)
        loss.backward()
        optimiser.step()
    folder = out / NAME
    init_bundle(folder, network=net.eval(), metadata_str=metadata(), inference_str=inference_config())
    return folder


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
