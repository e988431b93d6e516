"""pellucid's attribution methods against Captum, zennit and shap, side by side in one process on
the same model, image and features. Prints seconds and ratios, and checks agreement where the
definitions coincide.

    .venv/bin/python benchmarks/attribution_vs_peers.py           # ResNet-18, one 224 px image
    .venv/bin/python benchmarks/attribution_vs_peers.py --quick   # 128 px, fewer samples
    python benchmarks/attribution_vs_peers.py --device cuda         # on a GPU (TF32 off)

Goal (issue 4): KernelSHAP and LIME with 200 samples at least 2x faster than Captum's defaults
(one forward per sample) at the same number of samples.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, setup_device, table, timed

import pellucid
from pellucid.explainers.features import slic_labels
from pellucid.models import build
from pellucid.runtime import configure_threads

warnings.filterwarnings("ignore")


def example_image(size: int) -> torch.Tensor:
    """A real ChestX-ray14 radiograph (the shared sample) as a 3-channel batch of one; a chest
    phantom when the shared data is not there."""
    from pellucid.data import ChestPhantom, ChestXray14
    from pellucid.data.transforms import resize_image
    from pellucid.errors import DataError
    from pellucid.paths import shared_data_dir

    try:
        image = ChestXray14(shared_data_dir() / "chestxray14-sample")[0]["image"]
    except DataError:
        image = ChestPhantom(1, size)[0]["image"]
    image = resize_image(image, (size, size))
    return ((image - image.mean()) / image.std()).repeat(3, 1, 1)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = setup_device(args.device)
    configure_threads()
    torch.manual_seed(0)
    size, samples, repeat = (128, 50, 1) if args.quick else (224, 200, 2)
    model = build("resnet18", 2, 3, 14).module.eval().to(device)
    x = example_image(size).to(device)
    with torch.no_grad():
        cls = int(model(x).argmax())
    labels = slic_labels(x[0], 50, 10.0).to(device)
    mask = labels[None, None].expand(1, 3, size, size)
    rows = []

    from captum.attr import IntegratedGradients, KernelShap, Lime, Occlusion, Saliency
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    def add(name, ours_fn, peer_fn, compare=None):
        ours_t, ours = timed(ours_fn, repeat)
        peer_t, peer = timed(peer_fn, repeat)
        row = {"method": name, "pellucid s": f"{ours_t:.3f}", "peer s": f"{peer_t:.3f}",
               "speed-up": f"{peer_t / ours_t:.2f}x"}
        if compare is not None:
            row["agreement"] = compare(ours, peer)
        rows.append(row)

    add("saliency vs Captum", lambda: pellucid.explain(model, x, "saliency", target=cls),
        lambda: Saliency(model).attribute(x, target=cls),
        lambda o, p: f"max |diff| {float((o.raw - p).abs().max()):.1e}")
    add("IG 50 steps vs Captum", lambda: pellucid.explain(model, x, "integratedgradients",
                                                          target=cls, steps=50),
        lambda: IntegratedGradients(model).attribute(x, target=cls, n_steps=50),
        lambda o, p: f"max |diff| {float((o.raw - p).abs().max()):.1e}")
    add("occlusion 32/16 vs Captum", lambda: pellucid.explain(model, x, "occlusion", target=cls,
                                                             window=32, stride=16),
        lambda: Occlusion(model).attribute(x, (3, 32, 32), strides=(3, 16, 16), target=cls),
        lambda o, p: f"max |diff| {float((o.attributions - p[:, :1]).abs().max()):.1e}")
    add(f"KernelSHAP {samples} vs Captum",
        lambda: pellucid.explain(model, x, "kernelshap", target=cls, features=labels,
                                 samples=samples),
        lambda: KernelShap(model).attribute(x, target=cls, feature_mask=mask, n_samples=samples))
    add(f"LIME {samples} vs Captum",
        lambda: pellucid.explain(model, x, "lime", target=cls, features=labels, samples=samples),
        lambda: Lime(model, similarity_func=get_exp_kernel_similarity_function(
            "cosine", kernel_width=0.25)).attribute(x, target=cls, feature_mask=mask,
                                                    n_samples=samples))

    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    def zennit_lrp():
        with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as a:
            out = model(x).detach()
            return a(x, torch.eye(14, device=device)[[cls]] * out)[1]

    add("LRP EpsilonPlusFlat vs zennit", lambda: pellucid.explain(model, x, "lrp", target=cls),
        zennit_lrp, lambda o, p: f"max |diff| {float((o.raw - p).abs().max()):.1e}")
    print(f"ResNet-18, one {size} px image, {torch.get_num_threads()} threads, "
          f"{device_name(device)}, SLIC {int(labels.max()) + 1} superpixels")
    print(table(rows, ["method", "pellucid s", "peer s", "speed-up", "agreement"]))


if __name__ == "__main__":
    main()
