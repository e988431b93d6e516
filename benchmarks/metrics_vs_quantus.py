"""pellucid's metrics against Quantus 0.6.0, side by side in one process on the same model, batch,
attributions and random draws. Prints seconds, the speed-up, the largest difference of the values,
and each side's ratio to the forward-pass floor (the forwards the metric needs x the model's
batched forward time per image; fwd+bwd per image for max-sensitivity, which re-explains).

    .venv/bin/python benchmarks/metrics_vs_quantus.py           # ResNet-18, 8 radiographs, 224 px
    .venv/bin/python benchmarks/metrics_vs_quantus.py --quick   # 4 images, 128 px
    python benchmarks/metrics_vs_quantus.py --device cuda         # on a GPU (TF32 off)

Goal (issue 5): at least 5x faster than Quantus for pixel flipping, faithfulness correlation and
max-sensitivity at equal values, and within 1.3x of the forward-pass floor.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, setup_device, table, timed

import pellucid
from pellucid.explainers.accelerate import inference_forward
from pellucid.models import build
from pellucid.runtime import configure_threads
from pellucid.targets import ClassTarget

warnings.filterwarnings("ignore")


def radiographs(n: int, size: int) -> torch.Tensor:
    """``n`` shared ChestX-ray14 radiographs (1 channel, standardised); phantoms without the data."""
    from pellucid.data import ChestPhantom, ChestXray14
    from pellucid.data.transforms import resize_image
    from pellucid.errors import DataError
    from pellucid.paths import shared_data_dir

    try:
        ds = ChestXray14(shared_data_dir() / "chestxray14-sample")
        images = [ds[i]["image"] for i in range(n)]
    except DataError:
        ds = ChestPhantom(n, size)
        images = [ds[i]["image"] for i in range(n)]
    x = torch.stack([resize_image(im, (size, size))[:1] for im in images])
    return (x - x.mean()) / x.std()


def without_ties(maps: torch.Tensor) -> torch.Tensor:
    """The map's ranks (ties broken at random) over the pixel count: the same order without ties,
    which Quantus' unstable argsort would order its own way."""
    rng = np.random.RandomState(1)
    out = np.empty(maps.shape, dtype=np.float32)
    for i, m in enumerate(maps.reshape(maps.shape[0], -1).cpu().numpy()):
        order = np.lexsort((rng.random_sample(m.size), m))
        ranks = np.empty(m.size)
        ranks[order] = np.arange(m.size)
        out[i] = (ranks / m.size).reshape(maps.shape[1:])
    return torch.from_numpy(out).to(maps.device)


def per_image_seconds(fn, x: torch.Tensor, batch: int) -> float:
    xb = x[:1].expand(batch, *x.shape[1:]).contiguous()
    t, _ = timed(lambda: fn(xb), repeat=3)
    return t / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = setup_device(args.device)
    import quantus

    configure_threads()
    torch.manual_seed(0)
    n, size, sens_samples = (4, 128, 3) if args.quick else (8, 224, 10)
    model = build("resnet18", 2, 1, 14).module.eval().to(device)
    x = radiographs(n, size).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    cam = pellucid.explain(model, x, "gradcam", target=y, layer="layer4")
    a = without_ties(cam.attributions)
    xn, yn, an = x.cpu().numpy(), y.cpu().numpy(), a.cpu().numpy()
    step = size  # features_in_step: `size` steps for a size x size image
    # the forward floor: the model's batched forward (and forward+backward) time per image
    fast = inference_forward(model, x[:1])
    with torch.inference_mode():
        fwd = per_image_seconds(fast, x, 64)

    def fwd_bwd(xb):
        return pellucid.explain(model, xb, "gradcam", target=0, layer="layer4")

    fb = per_image_seconds(fwd_bwd, x, 32)

    def explain_func(model, inputs, targets, **_):
        return pellucid.explain(model, torch.as_tensor(inputs, device=device), "gradcam",
                                target=torch.as_tensor(targets, device=device),
                                layer="layer4").attributions.cpu().numpy()

    rows = []

    def add(name, ours_fn, peer_fn, floor_s, values):
        ours_t, ours = timed(ours_fn, repeat=1)
        peer_t, peer = timed(peer_fn, repeat=1, warmup=0)
        diff = float(np.nanmax(np.abs(values(ours) - np.asarray(peer, dtype=float))))
        rows.append({"metric": name, "pellucid s": f"{ours_t:.2f}", "Quantus s": f"{peer_t:.2f}",
                     "speed-up": f"{peer_t / ours_t:.2f}x", "max |diff|": f"{diff:.1e}",
                     "floor s": f"{floor_s:.2f}", "pellucid/floor": f"{ours_t / floor_s:.2f}",
                     "Quantus/floor": f"{peer_t / floor_s:.2f}"})

    target = ClassTarget(y, kind="probability")
    steps = -(-size * size // step)
    add(f"pixel flipping ({steps} steps)",
        lambda: pellucid.evaluate(model, x, a, target=target,
                                  metrics=[("pixel_flipping", {"features_in_step": step})]),
        lambda: quantus.PixelFlipping(features_in_step=step, disable_warnings=True)(
            model=model, x_batch=xn, y_batch=yn, a_batch=an, device=str(device), softmax=True),
        n * steps * fwd, lambda r: r["pixel_flipping"].curves.cpu().numpy())

    def quantus_fc():
        np.random.seed(42)
        return quantus.FaithfulnessCorrelation(disable_warnings=True, return_aggregate=False)(
            model=model, x_batch=xn, y_batch=yn, a_batch=an, device=str(device))

    add("faithfulness correlation (100 runs)",
        lambda: pellucid.evaluate(model, x, a, target=ClassTarget(y, kind="logit"),
                                  metrics=["faithfulness_correlation"]),
        quantus_fc, n * 101 * fwd, lambda r: r["faithfulness_correlation"].scores.cpu().numpy())

    fast = pellucid.evaluate(model, x, a, target=ClassTarget(y, kind="logit"),
                             metrics=[("faithfulness_correlation", {"sampler": "fast"})])
    fast_t, _ = timed(lambda: pellucid.evaluate(
        model, x, a, target=ClassTarget(y, kind="logit"),
        metrics=[("faithfulness_correlation", {"sampler": "fast"})]), repeat=1)
    quantus_t = float(rows[-1]["Quantus s"])
    equal = rows[-1]["pellucid s"]
    rows.append({"metric": "  same, sampler='fast' (other draws)", "pellucid s": f"{fast_t:.2f}",
                 "Quantus s": f"{quantus_t:.2f}", "speed-up": f"{quantus_t / fast_t:.2f}x",
                 "max |diff|": "n/a", "floor s": rows[-1]["floor s"],
                 "pellucid/floor": f"{fast_t / (n * 101 * fwd):.2f}", "Quantus/floor": ""})
    print(f"faithfulness correlation: {equal} s with Quantus' draws, {fast_t:.2f} s with "
          f"sampler='fast'; mean score {float(fast['faithfulness_correlation'].scores.mean()):.3f} "
          f"(fast) vs Quantus' draws in the table")

    def quantus_ms():
        np.random.seed(42)
        return quantus.MaxSensitivity(nr_samples=sens_samples, disable_warnings=True,
                                      return_aggregate=False)(
            model=model, x_batch=xn, y_batch=yn, a_batch=cam.attributions.cpu().numpy(),
            device=str(device), explain_func=explain_func)

    add(f"max-sensitivity ({sens_samples} samples, Grad-CAM)",
        lambda: pellucid.evaluate(model, x, cam, metrics=[("max_sensitivity",
                                                           {"nr_samples": sens_samples})]),
        quantus_ms, n * sens_samples * fb, lambda r: r["max_sensitivity"].scores.cpu().numpy())
    print(f"ResNet-18 (1 channel, 14 classes), {n} images of {size} px, "
          f"{torch.get_num_threads()} threads, {device_name(device)}; forward {fwd * 1e3:.1f} ms/image, "
          f"Grad-CAM fwd+bwd {fb * 1e3:.1f} ms/image (batched)")
    print(table(rows, ["metric", "pellucid s", "Quantus s", "speed-up", "max |diff|", "floor s",
                       "pellucid/floor", "Quantus/floor"]))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
