"""Every registered method and metric on a GPU against the same call on the CPU.

Runs each explainer (classification and segmentation targets, 2D and 3D) and each metric on the
CPU and on ``--device``, with the same model weights, inputs and seeds, and prints per item whether
the result stays on the inputs' device and how far it is from the CPU result (max |GPU - CPU| over
max |CPU|). TF32 is off, so both sides compute in float32 and differ only by summation order;
the counterfactual is an optimisation whose path may fork, so only its validity is compared.

    python benchmarks/device_parity.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, setup_device, table

import pellucid
from pellucid.explainers import available as available_methods
from pellucid.metrics import available as available_metrics
from pellucid.models import build
from pellucid.targets import SegmentationTarget

warnings.filterwarnings("ignore")

LIGHT = {
    "integratedgradients": {"steps": 16}, "smoothgrad": {"samples": 4},
    "gradientshap": {"samples": 4}, "rise": {"masks": 64}, "lime": {"samples": 40, "n_features": 8},
    "kernelshap": {"samples": 40, "n_features": 8}, "shapley": {"n_features": 5},
    "counterfactual": {"steps": 30}, "occlusion": {"window": 8, "stride": 8},
}
METRIC_OPTIONS = {
    "deletion": {"step": 64}, "insertion": {"step": 64}, "pixel_flipping": {"features_in_step": 64},
    "faithfulness_correlation": {"nr_runs": 6, "subset_size": 32},
    "infidelity": {"n_perturb_samples": 4}, "road": {"fractions": (0.2, 0.6)},
    "road_morf": {"fractions": (0.2, 0.6)}, "road_lerf": {"fractions": (0.2, 0.6)},
    "max_sensitivity": {"nr_samples": 2}, "local_lipschitz": {"nr_samples": 2},
    "model_randomization": {"progress": False, "depth": 1}, "cost": {},
}
# values that differ by definition between two runs: wall time and memory
NOT_COMPARED = {"cost"}
TOLERANCE = 1e-3
# perturbation attributions are differences of target scores; a segmentation score sums
# thousands of logits, whose float32 rounding (~1e-7 of the sum) is amplified in the difference
# of two nearly equal sums
FAMILY_TOLERANCE = {"perturbation": 1e-2}


def cases() -> list[dict]:
    """Small networks with fixed random weights: 2D and 3D, classification and segmentation."""
    torch.manual_seed(0)
    masks2 = torch.zeros(2, 48, 48, dtype=torch.bool)
    masks2[:, 12:30, 16:34] = True
    masks3 = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    masks3[:, 4:10, 4:12, 6:12] = True
    return [
        {"name": "resnet18-2d", "model": build("resnet18", 2, 3, 4).module.eval(),
         "x": torch.randn(2, 3, 48, 48), "target": None, "layer": "layer3", "masks": masks2},
        {"name": "unet-2d", "model": build("unet", 2, 4, 3, unet_channels=(8, 16, 32)).module.eval(),
         "x": torch.randn(2, 4, 48, 48), "target": SegmentationTarget(1, "all"),
         "layer": "model.1.submodule.2", "masks": masks2, "fused": ["model.1", "model.0"]},
        {"name": "resnet18-3d", "model": build("resnet18", 3, 1, 2).module.eval(),
         "x": torch.randn(1, 1, 16, 16, 16), "target": None, "layer": "layer3", "masks": masks3},
        {"name": "unet-3d", "model": build("unet", 3, 2, 2, unet_channels=(4, 8, 16)).module.eval(),
         "x": torch.randn(1, 2, 16, 16, 16), "target": SegmentationTarget(1, "all"),
         "layer": "model.1.submodule.2", "masks": masks3, "fused": ["model.1", "model.0"]},
    ]


def _to(target, device):
    if isinstance(target, SegmentationTarget) and isinstance(target.region, torch.Tensor):
        return SegmentationTarget(target.class_index, target.region.to(device), target.kind,
                                  target.activation)
    return target


def explain_both(case: dict, method: str, needs_layer: bool, device: torch.device):
    opts = dict(LIGHT.get(method, {}))
    if needs_layer:
        opts["layer"] = case["layer"]
    if method == "fusedcam" and "fused" in case:
        opts["layers"] = case["fused"]
    if method == "lrp" and case["target"] is not None:
        opts = {}  # LRP explains logits: the region's summed logits are the default kind
    results = {}
    for dev in (torch.device("cpu"), device):
        model = copy.deepcopy(case["model"]).to(dev)
        x = case["x"].to(dev)
        if method == "gradientshap":
            opts["background"] = torch.zeros_like(x[:1])
        start = time.perf_counter()
        results[dev.type] = pellucid.explain(model, x, method, target=_to(case["target"], dev), **opts)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        results[dev.type + " s"] = time.perf_counter() - start
    return results


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
    scale = torch.nan_to_num(a.abs(), nan=0.0).max().clamp_min(1e-12)
    return float(diff.max() / scale)


def method_row(case: dict, m: dict, device: torch.device) -> dict:
    """One method on one case: same device out, same values as on the CPU."""
    name, row = m["name"], {}
    r = explain_both(case, name, m["needs_layer"], device)
    gpu, cpu = r[device.type], r["cpu"]
    on_device = gpu.attributions.device.type == device.type
    if name == "counterfactual":
        valid_gpu, valid_cpu = gpu.extras.get("valid"), cpu.extras.get("valid")
        same = bool((valid_gpu == valid_cpu).all()) if isinstance(valid_gpu, torch.Tensor) else True
        row["rel diff"] = "n/a (optimisation)"
        ok = on_device and same
    else:
        d = relative(cpu.attributions, gpu.attributions)
        row["rel diff"] = f"{d:.1e}"
        ok = on_device and d <= FAMILY_TOLERANCE.get(m["family"], TOLERANCE)
    row["on device"] = "yes" if on_device else "NO"
    row["cpu s"], row["gpu s"] = f"{r['cpu s']:.2f}", f"{r[device.type + ' s']:.2f}"
    row["result"] = "ok" if ok else "FAIL"
    return row


def metrics_row(case: dict, device: torch.device) -> dict:
    """Every metric on one case's Grad-CAM map, on the CPU and on the device."""
    specs = [(n["name"], METRIC_OPTIONS.get(n["name"], {})) for n in available_metrics()
             if n["name"] not in ("box_accuracy", "msfi")]
    scores, reference = {}, None
    for dev in (torch.device("cpu"), device):
        model = copy.deepcopy(case["model"]).to(dev)
        x, target = case["x"].to(dev), _to(case["target"], dev)
        e = pellucid.explain(model, x, "gradcam", target=target, layer=case["layer"])
        # both devices score the CPU's map: a metric's own arithmetic is compared, not the rank
        # order of two maps equal to 1e-6 (which moves a threshold's ties)
        reference = e.attributions.cpu() if reference is None else reference
        e = dataclasses.replace(e, attributions=reference.to(dev))
        res = pellucid.evaluate(model, x, e, target=e.target, metrics=specs,
                                masks=case["masks"].to(dev))
        scores[dev.type] = {k: v.scores for k, v in res.items()}
        assert all(v.scores.device.type in (dev.type, "cpu") for v in res.values())
    worst, bad = 0.0, []
    for k, v in scores["cpu"].items():
        if k in NOT_COMPARED:
            continue
        d = relative(v, scores[device.type][k])
        if not math.isfinite(d) or d > TOLERANCE:
            bad.append(f"{k} {d:.1e}")
        worst = max(worst, d if math.isfinite(d) else worst)
    return {"rel diff": f"{worst:.1e}", "result": "FAIL" if bad else "ok", "error": ", ".join(bad)}


def checked(row: dict, check) -> dict:
    """``row`` completed by ``check()``; an exception becomes an ERROR row (one table of all)."""
    try:
        row.update(check())
    except Exception as exc:
        row["result"] = "ERROR"
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        traceback.print_exc(limit=4)
    print(f"{row['case']:12s} {row['item']:20s} {row['result']} {row.get('error', '')}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-metrics", action="store_true")
    args = parser.parse_args()
    device = setup_device(args.device)
    start = time.perf_counter()
    rows = []
    for case in cases():
        for m in available_methods():
            rows.append(checked({"case": case["name"], "item": m["name"]},
                                lambda case=case, m=m: method_row(case, m, device)))
        if not args.skip_metrics:
            rows.append(checked({"case": case["name"], "item": "metrics (all)"},
                                lambda case=case: metrics_row(case, device)))
    columns = ["case", "item", "result", "on device", "rel diff", "cpu s", "gpu s", "error"]
    print(table(rows, columns))
    bad = [r for r in rows if r["result"] != "ok"]
    if bad:
        print("\nnot ok:")
        print(table(bad, columns))
    worst = max((float(r["rel diff"]) for r in rows if r.get("rel diff", "n/a")[0].isdigit()),
                default=float("nan"))
    print(f"largest relative difference of the items compared: {worst:.1e}")
    print(f"\n{len(rows) - len(bad)} of {len(rows)} ok on {device_name(device)}, torch "
          f"{torch.__version__}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
