"""``make demo``: the main job on the embedded phantoms, start to end on a laptop CPU.

Runs the built-in benchmark ``demo`` (src/pellucid/bench/configs/demo.yaml): trains a ResNet-18 on
chest-like phantoms, a 2D U-Net on brain-like slices and a 3D U-Net on brain-like volumes (or reuses
them from ``out/models``), explains 24 held-out cases per task with the seed's methods beside the
trivial baselines, scores them with a metric of each quality family, the randomisation check and
cost, prints the leaderboard and writes ``out/report.html`` and the explanation cards. ``full``
runs ``demo-full`` instead: every registered method x every applicable metric. A second run
resumes: finished work is skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from pellucid.bench import load_config, run_bench
from pellucid.bench.runner import print_leaderboard

console = Console()


def demo_config(quick: bool = False, full: bool = False):
    """The demo configuration (``full``: every method x every metric); ``quick`` keeps 4 cases per
    task, five methods and cheap metrics, with models trained on a quarter of the images for an
    eighth of the epochs and the metric checks on 3 cases (a smoke run: the same code, answers
    that mean nothing)."""
    config = load_config("demo-full" if full else "demo")
    if quick:
        config.name = "demo-quick"
        for d in config.datasets.values():
            d.cases = 4
        keep = {"gradcam", "scorecam", "saliency", "lrp", "occlusion"}
        config.methods = [m for m in config.methods if m.name in keep]
        for m in config.metrics:
            m.skip_methods = [s for s in m.skip_methods if s in keep]
        config.metrics = [m for m in config.metrics if m.name not in
                          ("max_sensitivity", "local_lipschitz", "faithfulness_correlation")]
        for spec in config.models.values():  # a smoke run: models barely trained
            train = spec.train or {}
            spec.train = dict(train, epochs=max(1, train["epochs"] // 8),
                              n_train=max(32, int(train.get("n_train", 512)) // 4))
        if config.metric_trust is not None:
            config.metric_trust = dict(config.metric_trust, cases=3)
    return config


def run_demo(out: str | Path = "demo_out", quick: bool = False, full: bool = False):
    """Train (or reuse) the demo models, run the benchmark, print the leaderboard, write the
    explanation cards; returns the result table."""
    from pellucid.bench.card import write_cards

    start = time.perf_counter()
    table = run_bench(demo_config(quick, full), Path(out))
    write_cards(Path(out))
    print_leaderboard(table)
    console.print(f"[bold green]done[/] in {time.perf_counter() - start:.0f} s: report in "
                  f"{out}/report.html, results in {out}/results.parquet")
    return table
