"""A tiny nnU-Net v2 results folder made by nnU-Net itself, on the CPU, for the tests: a dataset of
synthetic 3D volumes (a bright sphere, the lesion, in noise; anisotropic spacing, so that nnU-Net
resamples) laid out as nnU-Net's raw format, planned and preprocessed by its own planner and
preprocessor (``3d_fullres``), and trained by its own trainer for a few iterations (the schedule
shortened; the network and everything inference uses are nnU-Net's). Folds 0 and 1 are trained, so
a fold and the ensemble can both be checked.

    python -m tests.nnunet_results OUT        # OUT/nnUNet_results/Dataset901_Sphere/...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

DATASET = "Dataset901_Sphere"
SPACING = (2.0, 1.0, 1.0)  # (z, y, x) in mm, as SimpleITK reports it reversed


def sphere_case(seed: int, shape=(24, 40, 40)) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """An image (z, y, x) with a bright sphere at a random centre, its label, and the centre."""
    rng = np.random.default_rng(seed)
    centre = tuple(int(rng.integers(6, s - 6)) for s in shape)
    z, y, x = np.indices(shape)
    # the radius in mm is 6: 3 voxels along z (2 mm), 6 in-plane
    inside = ((z - centre[0]) * SPACING[0]) ** 2 + ((y - centre[1]) * SPACING[1]) ** 2 + \
        ((x - centre[2]) * SPACING[2]) ** 2 <= 36
    image = 100 + 20 * rng.standard_normal(shape) + 300 * inside
    return image.astype(np.float32), inside.astype(np.uint8), centre


def _write(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(reversed(SPACING)))  # SimpleITK takes (x, y, z)
    img.SetOrigin((-20.0, 10.0, 5.0))
    sitk.WriteImage(img, str(path))


def make(out: Path, cases: int = 6, iterations: tuple[int, int] = (20, 2)) -> Path:
    """The results folder ``out/nnUNet_results/Dataset901_Sphere/nnUNetTrainer__nnUNetPlans__3d_fullres``."""
    raw, pre, res = out / "nnUNet_raw", out / "nnUNet_preprocessed", out / "nnUNet_results"
    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for k in range(cases):
        image, label, _ = sphere_case(k)
        _write(image, folder / "imagesTr" / f"sphere_{k:03d}_0000.nii.gz")
        _write(label, folder / "labelsTr" / f"sphere_{k:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res),
               nnUNet_compile="false")
    _run([sys.executable, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints "
                    "import plan_and_preprocess_entry; plan_and_preprocess_entry()",
                    "-d", "901", "-c", "3d_fullres", "-np", "1"],
                   env, "planning and preprocessing")
    # fold 0 learns the sphere; fold 1 is there for the ensemble (one process trains both)
    _run([sys.executable, "-m", "tests.nnunet_results", "--train", *map(str, iterations)],
         dict(env, nnUNet_n_proc_DA="0"), "training")  # no augmentation workers
    folder = res / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (res / DATASET / "Short__nnUNetPlans__3d_fullres").rename(folder)  # named as nnU-Net would
    return folder


def _run(cmd: list[str], env: dict, what: str) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"nnU-Net {what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def _train(fold: int, iterations: int) -> None:
    """nnU-Net's own trainer with its schedule shortened to ``iterations`` (one epoch); the
    checkpoint names nnUNetTrainer, whose network and inference settings these are."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class Short(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):  # nnU-Net reads this signature
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = iterations, 2
            self.num_epochs = 1

    torch.manual_seed(fold)
    folder = Path(nnUNet_preprocessed) / DATASET
    plans, dataset = load_json(str(folder / "nnUNetPlans.json")), load_json(str(folder / "dataset.json"))
    plans["continue_training"] = False  # what nnU-Net's run_training sets
    trainer = Short(plans, "3d_fullres", fold, dataset, device=torch.device("cpu"))
    trainer.run_training()
    out = Path(trainer.output_folder)
    for name in ("checkpoint_final.pth",):
        checkpoint = torch.load(out / name, map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = "nnUNetTrainer"
        torch.save(checkpoint, out / name)


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        for fold, count in enumerate(sys.argv[2:]):
            _train(fold, int(count))
    else:
        print(make(Path(sys.argv[1])))
