"""Bad input: one clear error naming the file and what is wrong; the CLI prints one line, exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pellucid.data import BraTS, ChestXray14, CSVDataset, LGGSegmentation
from pellucid.errors import DataError
from pellucid.io.files import read_image_2d


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as err:
        read_image_2d(bad)
    assert str(bad) in str(err.value) and "cannot read image" in str(err.value)


def _chest_copy(shared_data, tmp_path, n=3):
    root = tmp_path / "cxr"
    (root / "images").mkdir(parents=True)
    src = shared_data / "chestxray14-sample"
    lines = (src / "Data_Entry_2017.csv").read_text().splitlines()
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines[: n + 1]) + "\n")
    for line in lines[1: n + 1]:
        name = line.split(",")[0]
        shutil.copy(src / "images" / name, root / "images" / name)
    return root


def test_csv_missing_column_and_unknown_label(shared_data, tmp_path):
    root = _chest_copy(shared_data, tmp_path)
    csv_path = root / "Data_Entry_2017.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("Finding Labels", "Findings"))
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv: missing column\(s\) 'Finding Labels'"):
        ChestXray14(root)
    csv_path.write_text(text.replace("Cardiomegaly", "Cardiomegally", 1))
    with pytest.raises(DataError, match="line 2: unknown finding 'Cardiomegally'"):
        ChestXray14(root)


def test_generic_csv_errors(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a_mask.png")
    (tmp_path / "data.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(DataError, match="missing column 'path'"):
        CSVDataset(tmp_path / "data.csv")
    (tmp_path / "data.csv").write_text("path,label\na.png,pneumo\n")
    with pytest.raises(DataError, match="line 2: unknown label 'pneumo'"):
        CSVDataset(tmp_path / "data.csv", class_names=["nodule", "mass"])
    (tmp_path / "data.csv").write_text("path,label,mask\na.png,nodule,a_mask.png\n")
    ds = CSVDataset(tmp_path / "data.csv", class_names=["nodule", "mass"])
    with pytest.raises(DataError, match=r"a_mask.png: mask shape \(4, 4\) differs from image a.png"):
        ds[0]


def test_lgg_mask_shape_mismatch(shared_data, tmp_path):
    case = tmp_path / "TCGA_XX_0001_20000101"
    case.mkdir()
    src = next((shared_data / "lgg-mri-segmentation" / "TCGA_CS_6666_20011109").glob("*_10.png"))
    shutil.copy(src, case / "TCGA_XX_0001_20000101_1.png")
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(case / "TCGA_XX_0001_20000101_1_mask.png")
    with pytest.raises(DataError, match=r"_1_mask.png: mask shape \(100, 100\) differs"):
        LGGSegmentation(tmp_path)[0]


def test_brats_case_missing_a_modality(shared_data, tmp_path):
    case = tmp_path / "BraTS-GLI-00001-000"
    case.mkdir()
    src = shared_data / "brats-format-samples" / "BraTS-GLI-00001-000"
    for m in ("t1n", "t1c", "t2w"):
        (case / f"BraTS-GLI-00001-000-{m}.nii.gz").symlink_to(src / f"BraTS-GLI-00001-000-{m}.nii.gz")
    with pytest.raises(DataError, match="BraTS-GLI-00001-000: BraTS case is missing modality flair"):
        BraTS(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pellucid.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = _cli("train", "--data", "chestxray14", "--root", str(tmp_path / "nowhere"), "--out",
                str(tmp_path / "m"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]
    assert "Traceback" not in proc.stderr
    proc = _cli("train", "--data", "nope")
    assert proc.returncode == 2 and "unknown dataset 'nope'" in proc.stderr
