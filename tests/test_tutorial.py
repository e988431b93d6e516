"""docs/tutorial.md, followed as written: its commands and its YAML are taken from the document and
run, in a temporary folder, on a dataset laid out as the tutorial describes (chest phantoms as PNG
files, a CSV with its own column names, YOLO boxes, a split column) and a ResNet-18 saved as a bare
state dict. The benchmark's localisation metrics have values (the boxes feed them), its numbers
equal ``pellucid.evaluate`` on the same inputs, and the evidence reaches the explanation."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Cardiomegaly", "Nodule", "Consolidation"]


def _blocks(kind: str, page: str = "tutorial.md") -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.S)


def _user_data(folder: Path) -> None:
    """my_data/images/*.png and my_data/labels.csv in the tutorial's layout."""
    from PIL import Image

    from pellucid.data import open_dataset

    images = folder / "my_data" / "images"
    images.mkdir(parents=True)
    ds = open_dataset("phantom-chest", split="test", n=90, size=64)
    rows = ["file,finding,patient,split,x_center,y_center,width,height"]
    for i in range(len(ds)):
        s = ds[i]
        name = f"images/case{i:03d}.png"
        Image.fromarray((s["image"][0].numpy() * 255).astype(np.uint8)).save(folder / "my_data" / name)
        split = ("train", "train", "val", "test", "test")[i % 5]
        present = torch.nonzero(s["label"] > 0).flatten().tolist()
        if not present:
            rows.append(f"{name},,P{i:03d},{split},,,,")
        for k in present:
            ys, xs = np.nonzero(s["mask"][k].numpy() > 0)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            rows.append(f"{name},{CLASSES[k]},P{i:03d},{split},{(x0 + x1) / 128:.6f},"
                        f"{(y0 + y1) / 128:.6f},{(x1 - x0) / 64:.6f},{(y1 - y0) / 64:.6f}")
    (folder / "my_data" / "labels.csv").write_text("\n".join(rows) + "\n")


def _user_model(folder: Path) -> None:
    """model.pt: the state dict of a ResNet-18 (one input channel, three sigmoid outputs)."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, train

    result = train(open_dataset("phantom-chest", split="train", n=256, size=64),
                   TrainConfig(arch="resnet18", epochs=2, batch_size=32, progress=False, seed=0))
    torch.save(result.module.state_dict(), folder / "model.pt")


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path):
    _user_data(tmp_path)
    _user_model(tmp_path)
    for block in _blocks("yaml"):
        name = block.splitlines()[0].lstrip("# ").strip()
        (tmp_path / name).write_text(block)
    commands = [line for block in _blocks("bash") for line in block.splitlines()
                if line.strip() and not line.startswith("#")]
    assert [c.split()[1] for c in commands] == ["import-model", "bench", "explain"]
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "pellucid"
        done = subprocess.run([sys.executable, "-m", "pellucid.cli", *args[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (command, done.stderr[-3000:])
    table = pd.read_csv(tmp_path / "my_run" / "results.csv")
    for metric in ("pointing_game", "energy_pointing_game", "iou"):
        rows = table[table["metric"] == metric]
        assert rows["value"].notna().mean() > 0.8, (metric, rows["reason"].unique())
    assert set(table["method"]) == {"gradcam", "gradcampp", "saliency", "random", "centre", "edges",
                                    "prior"}
    assert table[table["method"] == "prior"]["value"].notna().any()  # from the given train split
    html = (tmp_path / "my_run" / "report.html").read_text()
    assert "Against trivial baselines" in html and "(baseline)" in html
    _equals_evaluate(tmp_path, table)
    summary = json.loads((tmp_path / "my_explanations" / "summary.json").read_text())
    lines = summary[0]["evidence"]["methods"]["gradcam"]
    assert any("pointing_game mean" in line and "baseline" in line for line in lines)


def _equals_evaluate(folder: Path, table: pd.DataFrame) -> None:
    """Every energy pointing game value of the run equals pellucid.evaluate on the same image,
    class and boxes (read back through the same reader options)."""
    import yaml

    import pellucid
    from pellucid.data import open_dataset
    from pellucid.models import load_model

    spec = yaml.safe_load((folder / "my_bench.yaml").read_text())["datasets"]["mine"]
    ds = open_dataset("csv", root=folder / spec["root"], split="test", **spec["options"])
    model = load_model(folder / "my_model")
    by_case = {ds[i]["case_id"]: ds[i] for i in range(len(ds))}
    rows = table[(table["metric"] == "energy_pointing_game") & (table["method"] == "gradcam")]
    assert len(rows) >= 6
    for row in rows.itertuples():
        sample = by_case[row.case_id]
        k = CLASSES.index(row.target)
        x = model.card.normalize(sample["image"][None].float())
        explanation = pellucid.explain(model, x, "gradcam", target=k)
        ref = pellucid.evaluate(model, x, explanation, metrics=["energy_pointing_game"],
                                boxes=[sample["boxes"][sample["box_labels"] == k]])
        assert row.value == pytest.approx(ref["energy_pointing_game"].scores[0].item(), abs=1e-5)


@pytest.mark.slow
def test_the_demo_tutorial_runs(tmp_path, monkeypatch):
    """docs/tutorial-demo.md: `make demo` is `pellucid demo --out demo_out` once .venv exists; the
    test runs it with --quick (the same code on 4 cases per task, five methods, shorter training),
    then the page's explain command and its Python block as written."""
    from PIL import Image

    from pellucid.data import open_dataset

    commands = [line for block in _blocks("bash", "tutorial-demo.md") for line in block.splitlines()
                if line.strip() and not line.startswith("#")]
    assert commands[0] == "make demo"
    make = (ROOT / "Makefile").read_text()
    assert "$(VENV)/bin/pellucid demo --out demo_out" in make  # what `make demo` runs
    sample = open_dataset("phantom-chest", split="test", n=1, size=64)[0]
    Image.fromarray((sample["image"][0].numpy() * 255).astype(np.uint8)).save(tmp_path / "chest.png")
    from pellucid.cli import main

    assert all(shlex.split(c)[0] == "pellucid" for c in commands[1:])
    monkeypatch.chdir(tmp_path)  # the commands run in this process, where the page runs them
    for args in [["demo", "--out", "demo_out", "--quick"]] + \
            [shlex.split(c)[1:] for c in commands[1:]]:
        main(args)
    assert (tmp_path / "demo_out" / "report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "demo_out" / "cards").glob("*.md")) == [
        "brain-unet-3d__brain-3d.md", "brain-unet__brain.md", "chest-resnet18__chest.md"]
    assert {p.name for p in (tmp_path / "my_maps").glob("*.png")} and \
        (tmp_path / "my_maps" / "summary.json").is_file()
    code = _blocks("python", "tutorial-demo.md")[0]
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pointing, deletion = (float(v) for v in done.stdout.split())
    assert 0 <= pointing <= 1 and 0 <= deletion <= 1
