"""Recipro-CAM (pellucid.explainers.cam.ReciproCAM) against openvino-xai 1.1.0's PyTorch
``TorchReciproCAM`` (un-scaled maps, per class): equal (measured 0.0) on a torchvision ResNet-18,
for the logit and, through the peer's per-mosaic logits, the softmax probability; a 3D MONAI ResNet
and a U-Net region against the definition run position by position; a token layer refused.

openvino-xai 1.1.0 imports ``openvino.runtime``, which OpenVINO 2025 folded into ``openvino``;
the test maps the old names onto the new package before importing it (``make install`` adds
openvino-xai without its pins on openvino-dev 2024.4 and numpy 1)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record


def _torch_reciprocam():
    import openvino

    openvino.runtime = openvino
    sys.modules.setdefault("openvino.runtime", openvino)
    for name in ("opset10", "utils", "utils.data_helpers", "utils.data_helpers.wrappers"):
        sys.modules.setdefault(f"openvino.runtime.{name}", importlib.import_module(f"openvino.{name}"))
    from openvino_xai.methods.white_box.torch import TorchReciproCAM

    return TorchReciproCAM


def _by_definition(model, x, layer: str, score) -> torch.Tensor:
    """Each position of the layer kept alone (every channel), the full network run once per
    position: the map of the paper, slowly."""
    module = model.get_submodule(layer)
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    acts = seen["a"]
    maps = torch.empty(acts.shape[0], acts[0, 0].numel())
    for p in range(maps.shape[1]):
        keep = torch.zeros(acts[0, 0].numel())
        keep[p] = 1
        masked = acts * keep.view(1, 1, *acts.shape[2:])
        handle = module.register_forward_hook(lambda m, i, o, a=masked: a)
        with torch.no_grad():
            maps[:, p] = score(model(x))
        handle.remove()
    return maps.view(acts.shape[0], *acts.shape[2:])


def test_resnet18_equals_openvino_xai_for_logits_and_probabilities():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    # the peer's automatic layer: the last module with a (B, C, H, W) output, C > H, W: layer4
    ref = torch.from_numpy(_torch_reciprocam()(model, embed_scaling=False, input_size=(96, 96))
                           .generate_saliency_map(x.numpy()))  # (B, classes, 3, 3) logits
    ours = pellucid.explain(model, x, "reciprocam", target=ClassTarget([1, 3]), layer="layer4")
    record("reciprocam", peer("openvino-xai", "TorchReciproCAM"), ours.raw[:, 0], ref[[0, 1], [1, 3]],
           "torchvision ResNet-18, layer4, logit")
    assert (ours.raw[:, 0] - ref[[0, 1], [1, 3]]).abs().max() <= 1e-5
    prob = pellucid.explain(model, x, "reciprocam", layer="layer4",
                            target=ClassTarget([1, 3], kind="probability", activation="softmax"))
    expected = ref.softmax(1)[[0, 1], [1, 3]]
    assert (prob.raw[:, 0] - expected).abs().max() <= 1e-6
    assert ours.cost.forward_samples == 2 * (1 + 9)  # the clean pass and one mosaic per position


def test_3d_resnet_and_a_unet_region_follow_the_definition_and_tokens_are_refused():
    from monai.networks.nets import UNet

    from tests.test_transformers import tiny_vit

    torch.manual_seed(0)
    model = build("resnet18", 3, 1, 3).module.eval()
    v = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = pellucid.explain(model, v, "reciprocam", target=ClassTarget([0, 2]), layer="layer3",
                            batch_size=16)
    ref = _by_definition(model, v, "layer3", lambda out: out[[0, 1], [0, 2]])
    record("reciprocam", "the definition, one full pass per position", ours.raw[:, 0], ref,
           "MONAI ResNet-18 3D, layer3")
    assert (ours.raw[:, 0] - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.manual_seed(0)
    unet = UNet(2, 1, 2, (8, 16, 32), (2, 2)).eval()
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        region = (unet(x).argmax(1) == 1).float()
    layer = "model.1.submodule.1"  # the bottleneck, 8 x 8
    ours = pellucid.explain(unet, x, "reciprocam", layer=layer,
                            target=SegmentationTarget(1, region=region, activation="softmax"))
    ref = _by_definition(unet, x, layer, lambda out: (out[:, 1] * region).flatten(1).sum(1))
    assert (ours.raw[:, 0] - ref).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(ConfigError, match="channels-first"):
        pellucid.explain(tiny_vit(), torch.randn(1, 3, 32, 32), "reciprocam", target=ClassTarget(1),
                         layer="encoder.layers.encoder_layer_1")
