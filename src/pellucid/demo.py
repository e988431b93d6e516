"""``make demo``: the main job on the embedded phantoms, start to end on a laptop CPU.

1. trains a ResNet-18 chest classifier and a 2D U-Net brain tumour segmenter on phantoms (or reuses
   them when ``out/models`` already holds them),
2. explains held-out cases with every registered method (GradientSHAP's background is a few
   training images),
3. writes a cases x methods grid per task with the true lesion outlined, per-case overlays and
   ``summary.json`` with model metrics and explanation costs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import pellucid
from pellucid import viz
from pellucid.data import open_dataset
from pellucid.explainers import available
from pellucid.models import ModelCard, TrainConfig, load_model, save_model, train
from pellucid.runtime import configure_threads
from pellucid.targets import ClassTarget, SegmentationTarget

console = Console()

TASKS = {
    "chest-resnet18": {"data": "phantom-chest", "arch": "resnet18", "opts": {"size": 128},
                       "n_train": 768, "epochs": 4, "batch": 32, "lr": 1e-3},
    "brain-unet": {"data": "phantom-brain", "arch": "unet", "opts": {"size": 64},
                   "n_train": 384, "epochs": 25, "batch": 16, "lr": 3e-3},
}


def _model(out: Path, name: str, spec: dict, quick: bool):
    folder = out / "models" / name
    if (folder / "card.json").is_file():
        console.print(f"[green]reusing[/] {folder}")
        return load_model(folder)
    n_train = spec["n_train"] // 3 if quick else spec["n_train"]
    epochs = max(2, spec["epochs"] // 3) if quick else spec["epochs"]
    opts = dict(spec["opts"])
    if spec["data"] == "phantom-brain":
        opts["task"] = "segmentation"
    train_ds = open_dataset(spec["data"], split="train", n=n_train, **opts)
    val_ds = open_dataset(spec["data"], split="val", n=64 if quick else 128, **opts)
    test_ds = open_dataset(spec["data"], split="test", n=64 if quick else 128, **opts)
    result = train(train_ds, TrainConfig(arch=spec["arch"], epochs=epochs, batch_size=spec["batch"],
                                         lr=spec["lr"]), val_ds, test_ds, dataset_name=spec["data"])
    save_model(folder, result.module, result.card)
    return load_model(folder)


def _cases(card: ModelCard, data: str, opts: dict, n: int) -> list[dict]:
    """The first ``n`` test cases that contain a lesion (so there is something to point at)."""
    opts = dict(opts)
    opts.setdefault("seed", 0)
    if data == "phantom-brain":
        opts["task"] = "segmentation"
    ds = open_dataset(data, split="test", n=256, **opts)
    cases = [s for s in (ds[i] for i in range(len(ds))) if s["label"].sum() > 0]
    return cases[:n]


def _explain_task(loaded, name: str, spec: dict, methods: list[str], out: Path, n_cases: int) -> dict:
    card = loaded.card
    cases = _cases(card, spec["data"], spec["opts"], n_cases)
    x = card.normalize(torch.stack([c["image"] for c in cases]))
    if card.task == "segmentation":
        target = SegmentationTarget(0, "predicted")  # whole tumour, where the model predicts it
        contours = [c["mask"][0].numpy() for c in cases]
    else:
        target = ClassTarget(activation=card.activation)
        with torch.no_grad():
            predicted = loaded.module(x).argmax(1)
        contours = [c["mask"][int(k)].numpy() for c, k in zip(cases, predicted, strict=True)]
    background = card.normalize(torch.stack([s["image"] for s in _cases(
        card, spec["data"], {**spec["opts"], "seed": 7}, 8)]))
    options = {"gradientshap": {"background": background}, "counterfactual": {"steps": 150}}
    maps, costs = {}, {}
    for m in methods:
        exp = pellucid.explain(loaded, x, m, target=target, **options.get(m, {}))
        maps[m] = list(exp.attributions)
        costs[m] = exp.cost.as_dict()
        positive = exp.attributions.clamp_min(0)
        inside = [float((a[0].numpy() * (c > 0.5)).sum() / max(a.sum().item(), 1e-12))
                  for a, c in zip(positive, contours, strict=True)]
        costs[m]["energy_inside_lesion"] = float(np.mean(inside))
        for i, (case, att) in enumerate(zip(cases, exp.attributions, strict=True)):
            title = f"{m} | {case['case_id']}"
            viz.save(viz.overlay(case["image"], att, title, contour=contours[i]),
                     out / name / f"case{i}_{m}.png")
    titles = [c["case_id"].split("-", 2)[-1] for c in cases]
    families = {"cam": "cams", "gradient": "gradients", "relevance": "attributions",
                "perturbation": "attributions", "counterfactual": "attributions"}
    family_of = {m["name"]: families[m["family"]] for m in available()}
    for group in sorted(set(family_of[m] for m in methods)):
        members = {m: maps[m] for m in methods if family_of[m] == group}
        viz.save(viz.grid([c["image"] for c in cases], members, titles, contours=contours),
                 out / f"{name}_{group}_grid.png")
    return costs


def run_demo(out: str | Path = "demo_out", quick: bool = False) -> dict:
    """Train (or reuse) the demo models, explain held-out phantoms, write figures and a summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = configure_threads()
    start = time.perf_counter()
    methods = [m["name"] for m in available()]
    summary: dict = {"pellucid": pellucid.__version__, "threads": threads, "tasks": {}}
    for name, spec in TASKS.items():
        console.rule(f"[bold]{name}")
        loaded = _model(out, name, spec, quick)
        console.print_json(json.dumps({k: v for k, v in loaded.card.metrics.get("test", {}).items()
                                       if k not in ("per_class", "per_region")}, default=float))
        costs = _explain_task(loaded, name, spec, methods, out, 3 if quick else 4)
        summary["tasks"][name] = {"metrics": loaded.card.metrics.get("test", {}), "methods": costs}
        table = Table("method", "seconds", "forwards", "backwards",
                      "positive attribution inside the lesion")
        for m, c in costs.items():
            table.add_row(m, f"{c['seconds']:.3f}", str(c["forward_passes"]), str(c["backward_passes"]),
                          f"{c['energy_inside_lesion']:.2f}")
        console.print(table)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    console.print(f"[bold green]done[/] in {summary['seconds']} s: figures and summary in {out}/")
    return summary
