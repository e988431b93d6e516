"""The measured columns of the method and metric catalogue (docs/reference/): for every registered
method and metric, the peer it equals with the largest difference the oracle tests measured, and
its cost on a reference model. Writes docs/catalogue.json; docs/gen_reference.py renders it, and
refuses to build when a registered name is missing from it.

    .venv/bin/python benchmarks/catalogue.py              # oracle tests, then costs (~6 minutes)
    .venv/bin/python benchmarks/catalogue.py --costs-only # keep the recorded peers, re-measure costs

Differences: the oracle tests (ORACLE_TESTS) call ``tests/peers.py``'s ``record`` with pellucid's
values and the peer's on the same model, input and options; a method's row keeps, per peer, the
largest relative difference max |ours - peer| / max |peer| over every case (or the smallest
correlation, for sampling methods whose random draws differ from the peer's). A name without a
peer says how its test checks it instead (NO_PEER).

Costs, at each method's defaults on one 1 x 64 x 64 input to a random-init ResNet-18 (3 classes;
attention methods on a 2-block ViT at 32 px): the model rows it evaluates (forward samples, from
the explanation's own count) and the seconds as a multiple of one forward + backward of the same
model and input. Metrics (on a Grad-CAM map of the same input): seconds as a multiple of one
forward. The class is the rows' order of magnitude: none, one pass (at most 2), a few (at most 9),
tens (at most 99), hundreds (at most 999), thousands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "catalogue.json"
ORACLE_TESTS = ["tests/test_cam_vs_gradcam.py", "tests/test_cam_2026.py", "tests/test_guided.py",
                "tests/test_gradients.py",
                "tests/test_perturbation.py", "tests/test_lrp.py", "tests/test_model_libraries.py",
                "tests/test_metrics_localization.py", "tests/test_metrics_vs_peers.py",
                "tests/test_metrics_protocols.py", "tests/test_deeplift.py",
                "tests/test_pair_saliency.py", "tests/test_refinecam_arcc.py", "tests/test_legrad.py",
                "tests/test_crp.py", "tests/test_reciprocam.py"]

# how each name without a peer oracle is checked instead (the test that does it, in words)
NO_PEER = {
    # methods
    "centre": "by hand: the centred Gaussian (tests/test_baselines.py)",
    "edges": "by hand: the image's gradient magnitude (tests/test_baselines.py)",
    "random": "uniform and seeded (tests/test_baselines.py)",
    "prior": "equals the given map; the benchmark's is the training masks' mean (test_baselines)",
    "counterfactual": "flips a phantom finding, stays in a region when asked, reports "
                      "non-convergence (tests/test_counterfactual.py)",
    "fusedcam": "one layer equals its CAM; two layers fuse by maximum (tests/test_fusedcam.py)",
    "lime": "recovers a model linear in its features (Captum's Lime samples and weights "
            "differently; tests/test_perturbation.py)",
    "shapley": "exact: by hand, and efficiency (the values sum to f(x) - f(baseline)) on a trained "
               "network (tests/test_perturbation.py)",
    "rise": "finds the region a model looks at; equal on every forward backend "
            "(tests/test_perturbation.py, tests/test_backends.py)",
    # metrics
    "deletion": "by hand: the area under the deletion curve (tests/test_metrics_faithfulness.py)",
    "insertion": "by hand: the area under the insertion curve (tests/test_metrics_faithfulness.py)",
    "energy_pointing_game": "by hand, each normalisation (tests/test_metrics_protocols.py)",
    "dice": "by hand on binarised maps (tests/test_metrics_localization.py)",
    "box_accuracy": "by hand; a one-pixel blob or a random map is not rewarded "
                    "(tests/test_metrics_protocols.py)",
    "chexlocalize": "by hand (tests/test_metrics_protocols.py)",
    "msfi": "by hand (tests/test_modality_targets.py)",
    "cost": "the explanation's own counts, time and memory (tests/test_metrics_protocols.py)",
    "psc": "separates Grad-CAM (PSC 0.9) from an input-edge map (0.1, insensitive) and a random "
           "map (fragile) on the phantom classifier (tests/test_psc.py)",
}


def run_oracles() -> list[dict]:
    """Run the oracle tests with recording on; their records (one dict per comparison)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peers.jsonl"
        env = {**os.environ, "PELLUCID_RECORD_PEERS": str(path)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "auto",
                   "--dist", "loadfile", *ORACLE_TESTS]
        print("running the oracle tests:", " ".join(command[3:]), flush=True)
        if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
            raise SystemExit("an oracle test failed: nothing written")
        return [json.loads(line) for line in path.read_text().splitlines()]


def summarise(records: list[dict]) -> dict[str, list[dict]]:
    """Per name, per peer: the worst value over its cases and how many cases."""
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        entry = out.setdefault(r["name"], {}).setdefault(
            r["peer"], {"peer": r["peer"], "measure": r["measure"], "value": None, "cases": 0})
        worse = max if r["measure"] == "difference" else min
        entry["value"] = r["value"] if entry["value"] is None else worse(entry["value"], r["value"])
        entry["cases"] += 1
    return {name: sorted(peers.values(), key=lambda p: p["peer"]) for name, peers in out.items()}


def cost_class(rows: float) -> str:
    """The order of magnitude of the model passes (rows) per image."""
    if rows == 0:
        return "none"
    return ("one pass" if rows <= 2 else "a few" if rows <= 9 else "tens" if rows <= 99
            else "hundreds" if rows <= 999 else "thousands")


def _seconds(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def method_costs() -> dict[str, dict]:
    import pellucid
    from pellucid.explainers.registry import REGISTRY
    from pellucid.models import build
    from pellucid.models.outputs import forward_tensor

    torch.manual_seed(0)
    models = {"cnn": (build("resnet18", 2, 1, 3).module.eval(), torch.randn(1, 1, 64, 64)),
              "vit": (build("vit", 2, 1, 3, input_size=[32, 32]).module.eval(),
                      torch.randn(1, 1, 32, 32))}
    extra = {"gradientshap": {"background": torch.randn(4, 1, 64, 64)},
             "expectedgradients": {"background": torch.randn(4, 1, 64, 64)},
             "deepliftshap": {"background": torch.randn(4, 1, 64, 64)},
             "prior": {"prior": torch.rand(64, 64)}}
    unit = {}
    for key, (model, x) in models.items():
        def pass_once(model=model, x=x):
            y = forward_tensor(model, x.requires_grad_(True))
            torch.autograd.grad(y[0, 0], x)
        unit[key] = _seconds(pass_once, 5)
    out = {}
    for name in REGISTRY.names():
        key = "vit" if REGISTRY.get(name).family == "attention" else "cnn"
        model, x = models[key]
        options = extra.get(name, {})
        pellucid.explain(model, x, name, target=0, **options)  # warm-up
        runs = [pellucid.explain(model, x, name, target=0, **options) for _ in range(3)]
        exp = runs[0]
        seconds = sorted(r.cost.seconds for r in runs)[1]  # the median of three
        rows = exp.cost.forward_samples / len(x)
        out[name] = {"rows": rows, "backward_passes": exp.cost.backward_passes,
                     "time": seconds / unit[key], "class": cost_class(rows),
                     "model": "ViT 32 px" if key == "vit" else "ResNet-18 64 px"}
        print(f"{name:22s} {rows:8.0f} rows  {out[name]['time']:8.1f} x fwd+bwd", flush=True)
    return out


def metric_costs() -> dict[str, dict]:
    import pellucid
    from pellucid.metrics.base import REGISTRY
    from pellucid.models import build

    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(1, 1, 64, 64)
    exp = pellucid.explain(model, x, "gradcam", target=0)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, 20:40, 24:44] = True
    boxes = [torch.tensor([[24.0, 20.0, 44.0, 40.0]])]
    four = build("resnet18", 2, 4, 3).module.eval()
    x4 = torch.randn(1, 4, 64, 64)
    exp4 = pellucid.explain(four, x4, "inputxgradient", target=0)
    with torch.inference_mode():
        unit = _seconds(lambda: model(x), 5)
    def evaluate(name: str) -> None:
        if name == "msfi":
            pellucid.evaluate(four, x4, exp4, metrics=["msfi"], masks=mask)
        elif name == "box_accuracy":
            pellucid.evaluate(model, x, exp, metrics=[name], boxes=boxes)
        else:
            masks = mask if "mask" in REGISTRY.get(name).needs else None
            pellucid.evaluate(model, x, exp, metrics=[name], masks=masks)

    out = {}
    for name in REGISTRY.names():
        needs = REGISTRY.get(name).needs
        seconds = _seconds(lambda n=name: evaluate(n), 1)
        uses_model = bool({"model", "explainer"} & set(needs))
        out[name] = {"time": seconds / unit, "uses_model": uses_model,
                     "class": "none" if not uses_model else cost_class(seconds / unit)}
        print(f"{name:26s} {out[name]['time']:10.1f} x fwd", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs-only", action="store_true",
                        help="keep the peers recorded in docs/catalogue.json; re-measure costs")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    warnings.filterwarnings("ignore")
    from pellucid.runtime import configure_threads

    configure_threads()
    import pellucid.explainers
    import pellucid.metrics  # noqa: F401 - registers the metrics
    from pellucid.explainers.registry import REGISTRY as METHODS
    from pellucid.metrics.base import REGISTRY as METRICS
    from pellucid.version import __version__

    if args.costs_only:
        peers = json.loads(OUT.read_text())["peers"]
    else:
        peers = summarise(run_oracles())
        kept = json.loads(OUT.read_text()) if OUT.is_file() else {}
        OUT.write_text(json.dumps({**kept, "peers": peers}, indent=1, sort_keys=True) + "\n")
    names = set(METHODS.names()) | set(METRICS.names())
    unchecked = sorted(names - set(peers) - set(NO_PEER))
    if unchecked:
        raise SystemExit(f"no oracle record and no NO_PEER entry for: {', '.join(unchecked)}")
    stale = sorted((set(peers) | set(NO_PEER)) - names)
    if stale:
        raise SystemExit(f"recorded names that are not registered: {', '.join(stale)}")
    catalogue = {
        "measured": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, pellucid {__version__}",
        "peers": peers,
        "no_peer": {n: NO_PEER[n] for n in sorted(NO_PEER) if n not in peers},
        "method_costs": method_costs(),
        "metric_costs": metric_costs(),
    }
    OUT.write_text(json.dumps(catalogue, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
