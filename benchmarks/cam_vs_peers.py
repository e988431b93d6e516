"""pellucid's CAMs against pytorch-grad-cam, Captum LayerGradCam and MONAI GradCAM, side by side in
one process on the same models and inputs. Checks that the maps agree, then prints seconds, the
pellucid/peer ratio and the ratio to the model's own forward+backward on that batch.

    .venv/bin/python benchmarks/cam_vs_peers.py            # ResNet-18 224 px batch 16, DenseNet-121, U-Net
    .venv/bin/python benchmarks/cam_vs_peers.py --quick    # smaller inputs, a routine check
    python benchmarks/cam_vs_peers.py --device cuda        # on a GPU (TF32 off: true float32)

Goals (issue 3): Grad-CAM and Grad-CAM++ within 1.2x of the bare forward+backward and at least 2x
faster than pytorch-grad-cam; Score-CAM at least 1.5x faster than pytorch-grad-cam's, equal output,
peak memory bounded by its batch_size option.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_forward_backward, device_name, peak_rss_mb, setup_device, table, timed

import pellucid
from pellucid.models import build
from pellucid.runtime import configure_threads
from pellucid.targets import SegmentationTarget

warnings.filterwarnings("ignore")


def quiet_tqdm() -> None:
    """pytorch-grad-cam prints a tqdm bar per Score-CAM sample; keep the table readable."""
    import functools

    import tqdm

    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)


def peers_gradcam(method: str, model, layer, x, targets=None):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    cls = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "scorecam": ScoreCAM}[method]
    with cls(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=targets)


def captum_gradcam(model, layer, x, target):
    from captum.attr import LayerAttribution, LayerGradCam

    raw = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    up = LayerAttribution.interpolate(raw, tuple(x.shape[2:]), interpolate_mode="bilinear")
    flat = up.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    return ((up - lo) / ((up - lo).flatten(1).max(1).values.view(-1, 1, 1, 1) + 1e-7)).detach()


def monai_gradcam(model, layer_name, x, target):
    from monai.visualize import GradCAM

    cam = GradCAM(nn_module=model, target_layers=layer_name)
    return 1 - cam(x, class_idx=target)  # MONAI's default normaliser maps (min, max) to (1, 0)


def run_case(name, model, layer_name, x, methods, scorecam_batch, repeat, seg=False):
    model.eval()
    layer = model.get_submodule(layer_name)
    with torch.no_grad():
        out = model(x)
    if seg:
        masks = (out[:, 0] > 0).float()
        if masks.sum() == 0:
            masks = torch.ones_like(masks)
        from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

        target = SegmentationTarget(0, masks)
        peer_targets = [SemanticSegmentationTarget(0, m.cpu().numpy()) for m in masks]
        cls = torch.zeros(len(x), dtype=torch.long, device=x.device)
    else:
        cls = out.argmax(1)
        target, peer_targets = cls, None
    bare, _ = timed(lambda: bare_forward_backward(model, x, cls), repeat)
    rows = []
    for method in methods:
        xs = x if method != "scorecam" else x[:scorecam_batch]
        tgt = target if method != "scorecam" or seg is False else SegmentationTarget(
            0, masks[:scorecam_batch])
        if method == "scorecam" and not seg:
            tgt = cls[:scorecam_batch]
        ptg = peer_targets if not (seg and method == "scorecam") else peer_targets[:scorecam_batch]
        ours_t, ours = timed(lambda xs=xs, tgt=tgt, m=method: pellucid.explain(
            model, xs, m, target=tgt, layer=layer_name), 1 if method == "scorecam" else repeat)
        ref_t, ref = timed(lambda xs=xs, m=method, ptg=ptg: peers_gradcam(m, model, layer, xs, ptg),
                           1 if method == "scorecam" else repeat)
        diff = float(np.abs(ours.attributions[:, 0].cpu().numpy() - ref).max())
        row = {"model": name, "method": method, "batch": len(xs), "pellucid s": f"{ours_t:.3f}",
               "pytorch-grad-cam s": f"{ref_t:.3f}", "speed-up": f"{ref_t / ours_t:.2f}x",
               "max |diff|": f"{diff:.1e}",
               "vs fwd+bwd": f"{ours_t / (bare * len(xs) / len(x)):.2f}x"}
        if method == "gradcam" and not seg:
            cap_t, cap = timed(lambda: captum_gradcam(model, layer, x, cls), repeat)
            mon_t, mon = timed(lambda: monai_gradcam(model, layer_name, x, cls), repeat)
            row["captum s"] = f"{cap_t:.3f}"
            row["monai s"] = f"{mon_t:.3f}"
            row["max |diff|"] += (f" / {float((ours.attributions - cap).abs().max()):.0e}"
                                  f" / {float((ours.attributions - mon).abs().max()):.0e}")
        if method == "scorecam" and name == "resnet18":
            dev = x.device
            mem_small, _ = peak_rss_mb(lambda xs=xs, tgt=tgt: pellucid.explain(
                model, xs, "scorecam", target=tgt, layer=layer_name, batch_size=16), dev)
            mem_big, _ = peak_rss_mb(lambda xs=xs, tgt=tgt: pellucid.explain(
                model, xs, "scorecam", target=tgt, layer=layer_name, batch_size=128), dev)
            mem_ref, _ = peak_rss_mb(lambda xs=xs, ptg=ptg: peers_gradcam("scorecam", model, layer,
                                                                          xs, ptg), dev)
            row["peak MiB (bs16/bs128/peer)"] = f"{mem_small:.0f}/{mem_big:.0f}/{mem_ref:.0f}"
        rows.append(row)
    return bare, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, one repeat")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = setup_device(args.device)
    threads = configure_threads()
    quiet_tqdm()
    torch.manual_seed(0)
    size, batch, repeat, sc_batch = (128, 4, 1, 1) if args.quick else (224, 16, 3, 2)
    if device.type == "cuda" and not args.quick:
        sc_batch = 16  # a GPU scores whole batches of masked inputs at once
    methods = ["gradcam", "gradcampp", "scorecam"]
    cases = [
        ("resnet18", build("resnet18", 2, 3, 14).module, "layer4", torch.randn(batch, 3, size, size),
         False),
        ("densenet121", build("densenet121", 2, 1, 14).module, "class_layers.relu",
         torch.randn(batch // 2, 1, size, size), False),
        ("unet-2d", build("unet", 2, 4, 3).module, "model.1.submodule.2",
         torch.randn(batch // 2, 4, size // 2, size // 2), True),
    ]
    print(f"pellucid {pellucid.__version__}, torch {torch.__version__}, {threads} threads, "
          f"{platform.processor() or platform.machine()}, {device_name(device)}")
    all_rows = []
    for name, model, layer, x, seg in cases:
        model, x = model.to(device), x.to(device)
        bare, rows = run_case(name, model, layer, x, methods, sc_batch, repeat, seg)
        print(f"{name}: input {tuple(x.shape)}, bare forward+backward {bare:.3f} s")
        all_rows += rows
    columns = ["model", "method", "batch", "pellucid s", "pytorch-grad-cam s", "speed-up",
               "vs fwd+bwd", "captum s", "monai s", "max |diff|", "peak MiB (bs16/bs128/peer)"]
    print(table(all_rows, columns))


if __name__ == "__main__":
    main()
