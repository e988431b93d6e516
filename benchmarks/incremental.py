"""Incremental occlusion against the full forward and against Captum's Occlusion, side by side in
one process, on the zoo's CNNs at growing image sizes: seconds, speed-ups, the work ratio (MACs
done / MACs of full forwards) and the largest difference of the maps.

    .venv/bin/python benchmarks/incremental.py            # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/incremental.py --quick    # under a minute

The models are untrained (weights change no timing); each item runs once after warm-up calls (the
full forward on every copy, so the forward-only backend is chosen before timing; the traced graph;
Captum on one case).
"""

from __future__ import annotations

import argparse
import time

import torch

from pellucid.explainers import create
from pellucid.models.zoo import build

CASES = [  # name, arch, dims, size, window, stride, cases
    ("ResNet-18 2D", "resnet18", 2, 128, 16, 8, 2),
    ("ResNet-18 2D", "resnet18", 2, 224, 16, 8, 1),
    ("ResNet-18 2D", "resnet18", 2, 448, 32, 32, 1),
    ("DenseNet-121 2D", "densenet121", 2, 224, 16, 16, 1),
    ("ResNet-18 3D (MONAI)", "resnet18", 3, 64, 8, 8, 1),
    ("U-Net 2D (MONAI, instance norm)", "unet", 2, 128, 16, 16, 1),
]
QUICK = [CASES[0], CASES[4]]


def _captum(model, x, window, stride, target):
    from captum.attr import Occlusion

    c, nd = x.shape[1], x.ndim - 2
    return Occlusion(model).attribute(x, (c, *(window,) * nd), strides=(c, *(stride,) * nd),
                                      target=target, perturbations_per_eval=32)


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from pellucid.inference import select

    select.TRIAL_AFTER_S = 0.0  # choose each model's forward-only backend at its first use (warm-up)
    rows = []
    for name, arch, dims, size, window, stride, cases in QUICK if args.quick else CASES:
        torch.manual_seed(0)
        model = build(arch, dims, 1, 2).module.eval().to(args.device)
        x = torch.rand(cases, 1, *(size,) * dims).to(args.device)
        seg = arch == "unet"
        target = None if seg else 1
        opts = {"window": window, "stride": stride}
        # warm-ups: the full forward on every copy first (the forward-only backend is chosen after
        # 2 s of such work, docs/scaling.md), then the traced graph
        create("occlusion", incremental=False, **opts).explain(model, x, target=target)
        create("occlusion", incremental=True, **opts).explain(model, x[:1], target=target)
        def ours(setting, model=model, x=x, target=target, opts=opts):
            return create("occlusion", incremental=setting, **opts).explain(model, x, target=target)

        t_inc, inc = _timed(lambda: ours(True))
        t_full, full = _timed(lambda: ours(False))
        t_auto, auto = _timed(lambda: ours("auto"))
        if seg:
            t_peer, diff = float("nan"), float("nan")
        else:
            _captum(model, x[:1], window, stride, target)
            t_peer, peer = _timed(lambda model=model, x=x, w=window, s=stride, t=target:
                                  _captum(model, x, w, s, t))
            diff = float((inc.raw - peer).abs().max())
        diff_full = float((inc.attributions - full.attributions).abs().max())
        rows.append((f"{name} {size}px w{window}/s{stride} x{cases}", inc.cost.work_ratio,
                     t_inc, t_full, t_auto, t_peer, t_full / t_inc, t_peer / t_inc, t_peer / t_auto,
                     diff_full, diff, auto.extras["incremental"]))
        print(f"{rows[-1][0]}: incremental {t_inc:.2f} s, full {t_full:.2f} s, auto {t_auto:.2f} s, "
              f"Captum {t_peer:.2f} s", flush=True)
    head = ("case", "work", "incr s", "full s", "auto s", "Captum s", "full/incr", "Captum/incr",
            "Captum/auto", "|incr-full|", "|incr-Captum|", "auto chose")
    print()
    print("  ".join(head))
    for r in rows:
        print(f"{r[0]}  {r[1]:.2f}  {r[2]:.2f}  {r[3]:.2f}  {r[4]:.2f}  {r[5]:.2f}  {r[6]:.2f}x  "
              f"{r[7]:.2f}x  {r[8]:.2f}x  {r[9]:.1e}  {r[10]:.1e}  {r[11]}")
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"{torch.get_num_threads()} threads, CPU"
    print(f"\ntorch {torch.__version__}, {where}")


if __name__ == "__main__":
    main()
