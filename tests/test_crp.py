"""Concept relevance propagation (pellucid.explainers.crp) against zennit-crp 0.6's
``CondAttribution`` with the same zennit composite and canonizers: within 1e-5 of the heatmap's
scale on a torchvision ResNet-18, a 3D MONAI ResNet and a U-Net region; the conditional heatmaps
over every channel of a stage sum to the plain LRP map; the default concepts are the most relevant
channels; bad concepts and a transformer are refused."""

from __future__ import annotations

import warnings

import pytest
import torch

import pellucid
from pellucid.errors import ConfigError
from pellucid.explainers.lrp import build_composite
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record

TOL = 1e-5


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ref.abs().max() > 0, "degenerate reference"
    return float((ours - ref).abs().max() / ref.abs().max())


def _zennit_crp(model, x, conditions, init_rel=None) -> torch.Tensor:
    from crp.attribution import CondAttribution  # make install adds it without its zennit pin

    composite = build_composite("epsilonplusflat", model, x, {}, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CondAttribution(model)(x.clone().requires_grad_(True), conditions, composite,
                                        init_rel=init_rel)
    return result.heatmap


def test_resnet18_equals_zennit_crp_and_every_channel_sums_to_lrp():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = pellucid.explain(model, x, "crp", target=ClassTarget([1, 3]), layer="layer3",
                            concepts=[4, 10, 77])
    ref = _zennit_crp(model, x, [{"y": [1], "layer3": [4, 10, 77]},
                                 {"y": [3], "layer3": [4, 10, 77]}])
    record("crp", peer("zennit-crp", "CondAttribution"), ours.attributions[:, 0], ref,
           "torchvision ResNet-18, layer3, 3 channels")
    assert _rel(ours.attributions[:, 0], ref) <= TOL
    every = pellucid.explain(model, x, "crp", target=ClassTarget([1, 3]), layer="layer3",
                             concepts=list(range(256)))
    plain = pellucid.explain(model, x, "lrp", target=ClassTarget([1, 3]))
    assert _rel(every.attributions, plain.attributions) <= 1e-4
    torch.testing.assert_close(every.extras["concept_share"], torch.ones(2), atol=1e-5, rtol=0)
    # per-sample concepts, and by default the most relevant channel of each sample
    per = pellucid.explain(model, x, "crp", target=ClassTarget([1, 3]), layer="layer3",
                           concepts=[[4], [77]])
    ref = _zennit_crp(model, x, [{"y": [1], "layer3": [4]}, {"y": [3], "layer3": [77]}])
    assert _rel(per.attributions[:, 0], ref) <= TOL
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept

    top = pellucid.explain(model, x, "crp", target=ClassTarget([1, 3]), layer="layer3", top=2)
    composite = build_composite("epsilonplusflat", model, x, {}, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CondAttribution(model)(x.clone().requires_grad_(True), [{"y": [1]}, {"y": [3]}],
                                        composite, record_layer=["layer3"])
    channels = ChannelConcept().attribute(result.relevances["layer3"], abs_norm=False)
    assert _rel(top.extras["channel_relevance"], channels) <= TOL
    assert top.extras["concepts"] == channels.topk(2, dim=1).indices.tolist()


def test_3d_resnet_and_a_unet_region_equal_zennit_crp():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = build("resnet18", 3, 1, 3).module.eval()
    v = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = pellucid.explain(model, v, "crp", target=ClassTarget([0, 2]), layer="layer2",
                            concepts=[1, 5])
    ref = _zennit_crp(model, v, [{"y": [0], "layer2": [1, 5]}, {"y": [2], "layer2": [1, 5]}])
    record("crp", peer("zennit-crp", "CondAttribution"), ours.attributions[:, 0], ref,
           "MONAI ResNet-18 3D, layer2")
    assert _rel(ours.attributions[:, 0], ref) <= TOL
    unet = UNet(2, 1, 2, (8, 16, 32), (2, 2), norm="batch").eval()
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        region = (unet(x).argmax(1) == 1).float()
    layer = "model.1.submodule.1"  # the bottleneck's skip block
    ours = pellucid.explain(unet, x, "crp", layer=layer, concepts=[0, 3],
                            target=SegmentationTarget(1, region=region, activation="softmax"))

    def start(prediction):  # the class-1 logits inside the region
        return prediction * torch.stack([torch.zeros_like(region), region], 1)
    ref = _zennit_crp(unet, x, [{layer: [0, 3]}], init_rel=start)
    record("crp", peer("zennit-crp", "CondAttribution"), ours.attributions[:, 0], ref,
           "MONAI UNet region")
    assert _rel(ours.attributions[:, 0], ref) <= TOL


def test_bad_concepts_and_a_transformer_are_refused():
    import torchvision

    from tests.test_transformers import tiny_vit

    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="256 channels"):
        pellucid.explain(model, x, "crp", target=ClassTarget(1), layer="layer3", concepts=[300])
    with pytest.raises(ConfigError, match="AttnLRP"):
        pellucid.explain(tiny_vit(), torch.randn(1, 3, 32, 32), "crp", target=ClassTarget(1))
