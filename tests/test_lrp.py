"""LRP: canonizers keep the function, route relevance through every addition and concatenation
(conservation with biases and normalisation shifts zeroed), never leave the model mutated; equal to
zennit's own output on a torchvision ResNet; ratios on trained networks are reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pellucid
from pellucid.explainers.canonizers import canonized, canonizers_for
from pellucid.explainers.lrp import build_composite
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record


def zero_shifts(model: nn.Module) -> nn.Module:
    """Biases and normalisation shifts to zero, running means to zero: nothing can absorb relevance."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


NETWORKS = [
    ("resnet18", 2, {"backend": "torchvision"}, (1, 3, 64, 64)),
    ("resnet18", 2, {"backend": "monai"}, (1, 3, 64, 64)),
    ("resnet18", 3, {}, (1, 2, 32, 32, 32)),
    ("densenet121", 2, {}, (1, 1, 64, 64)),
    ("densenet121", 3, {}, (1, 1, 32, 32, 32)),
    ("unet", 2, {}, (1, 2, 32, 32)),
    ("unet", 3, {"unet_channels": (8, 16, 32)}, (1, 2, 16, 16, 16)),
]


def _net(arch, dims, opts, shape):
    out = 3
    return build(arch, dims, shape[1], out, **opts).module


@pytest.mark.parametrize("arch,dims,opts,shape", NETWORKS)
def test_canonizers_keep_the_function_and_undo_themselves(arch, dims, opts, shape):
    """In float64, so that the check sees the canonizer's algebra and not float32 rounding (folding
    random BatchNorm statistics into 18 layers moves float32 outputs by up to ~1e-4)."""
    torch.manual_seed(0)
    model = _net(arch, dims, opts, shape).double()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    composite = build_composite("epsilonplusflat", model, x, {}, None, None)
    with canonized(model, composite), torch.no_grad():
        canon = model(x)
    assert (canon - ref).abs().max() <= 1e-5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch,dims,opts,shape", NETWORKS)
def test_relevance_is_conserved_without_biases(arch, dims, opts, shape):
    model = zero_shifts(_net(arch, dims, opts, shape))
    x = torch.randn(*shape)
    target = SegmentationTarget(1, "all") if arch == "unet" else ClassTarget(1)
    exp = pellucid.explain(model, x, "lrp", target=target)
    ratio = float(exp.extras["conservation"][0])
    assert abs(ratio - 1) < 0.05, f"{arch} {dims}D: relevance sum / score = {ratio}"


def test_equal_to_zennit_on_torchvision_resnet(chest_model, monkeypatch):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    from pellucid.data import ChestPhantom

    model = chest_model.module
    x = chest_model.card.normalize(torch.stack([ChestPhantom(3, 128, seed=60)[i]["image"]
                                                for i in range(3)]))
    cls = torch.tensor([0, 1, 2])
    ours = pellucid.explain(model, x, "lrp", target=cls)
    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    with Gradient(model=model, composite=composite) as attributor:
        _, ref = attributor(x, torch.eye(3)[cls] * model(x).detach())
    # zennit's BatchNorm merge leaves x / sqrt(1 + eps) per layer; pellucid's is exact: the two
    # differ by that shrink only, and agree once zennit's merge is made exact too
    scale = ref.abs().max()
    case = f"trained ResNet-18 {tuple(x.shape)}"
    record("lrp", peer("zennit", "EpsilonPlusFlat + ResNetCanonizer"), ours.raw, ref, case)
    assert (ours.raw - ref).abs().max() <= 5e-3 * scale  # 1.2e-3 on this model
    from zennit.canonizers import SequentialMergeBatchNorm

    from pellucid.explainers.canonizers import exact_merge_batch_norm

    monkeypatch.setattr(SequentialMergeBatchNorm, "merge_batch_norm",
                        staticmethod(exact_merge_batch_norm))
    with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as att:
        _, exact = att(x, torch.eye(3)[cls] * model(x).detach())
    record("lrp", peer("zennit", "EpsilonPlusFlat + ResNetCanonizer, exact BatchNorm merge"),
           ours.raw, exact, case)
    assert (ours.raw - exact).abs().max() <= 1e-6 * scale
    ratios = ours.extras["conservation"]
    assert torch.isfinite(ratios).all()  # trained: biases absorb some relevance (reported)


def test_canonizer_failure_leaves_the_model_untouched():
    model = build("resnet18", 2, 1, 3, backend="monai").module.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pellucid.errors.ModelError):
        pellucid.explain(model, torch.randn(1, 3, 64, 64), "lrp")  # wrong channel count
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all("forward" not in m.__dict__ and "pellucid_sum" not in m.__dict__["_modules"]
               for m in model.modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("composite", ["epsilongammabox", "epsilonalpha2beta1"])
def test_other_composites_and_per_layer_rules(chest_model, composite):
    from pellucid.data import ChestPhantom

    x = chest_model.card.normalize(ChestPhantom(1, 128, seed=61)[0]["image"][None])
    exp = pellucid.explain(chest_model.module, x, "lrp", composite=composite)
    assert torch.isfinite(exp.raw).all() and exp.raw.abs().sum() > 0
    custom = pellucid.explain(chest_model.module, x, "lrp", rules={"layer4.1.conv2": "epsilon"})
    base = pellucid.explain(chest_model.module, x, "lrp")
    assert not torch.allclose(custom.raw, base.raw)
    with pytest.raises(pellucid.errors.ConfigError, match="unknown layer"):
        pellucid.explain(chest_model.module, x, "lrp", rules={"layer9": "epsilon"})


def test_canonizer_choice():
    from zennit.torchvision import ResNetBasicBlockCanonizer

    from pellucid.explainers.canonizers import ExactSequentialMergeBatchNorm

    parts = [type(c) for c in canonizers_for(build("resnet18", 2, 1, 2).module)[0].canonizers]
    assert ExactSequentialMergeBatchNorm in parts and ResNetBasicBlockCanonizer in parts


def test_lrp_skips_only_the_backward_its_rules_replace(monkeypatch):
    """A convolution or linear layer under an active zennit rule skips its own backward in the
    model's pass (the rule's hook returns the relevance in its place): the relevance is the same
    as with every backward computed, and the layers' forwards are restored afterwards."""
    import contextlib

    from zennit.composites import EpsilonPlusFlat

    import pellucid.explainers.lrp as lrp

    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(2, 1, 48, 48)
    with canonized(model, EpsilonPlusFlat(canonizers=canonizers_for(model))), \
            lrp._no_discarded_backward(model) as swapped:
        assert swapped == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    fast = pellucid.explain(model, x, "lrp", target=1)
    monkeypatch.setattr(lrp, "_no_discarded_backward", lambda m: contextlib.nullcontext(0))
    full = pellucid.explain(model, x, "lrp", target=1)
    assert torch.allclose(fast.raw, full.raw, rtol=0, atol=1e-6 * float(full.raw.abs().max()))
    crp_full = pellucid.explain(model, x, "crp", target=1, concepts=[0, 1])
    monkeypatch.undo()
    crp_fast = pellucid.explain(model, x, "crp", target=1, concepts=[0, 1])
    assert torch.allclose(crp_fast.raw, crp_full.raw, rtol=0,
                          atol=1e-6 * float(crp_full.raw.abs().max()))
