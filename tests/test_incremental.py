"""Exact incremental inference (pellucid.inference.incremental) against the full forward: per
network family (the zoo's and the model libraries' CNNs, in float64 to show the algorithm exact and
in float32 within 1e-5 of the output's scale), the occlusion map with and without it, the layers it
cannot bound, the refusals, and the work ratio in the cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pellucid.errors import ConfigError, ModelError
from pellucid.explainers import create
from pellucid.inference.incremental import IncrementalForward
from pellucid.models.outputs import reduce_output
from pellucid.models.zoo import build


def _zoo(arch: str, dims: int, channels: int = 1, classes: int = 2):
    torch.manual_seed(0)
    model = build(arch, dims, channels, classes).module.eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _smp():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=2).eval()


def _convnext():
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()


def _xrv():
    import torchxrayvision as xrv

    torch.manual_seed(0)
    return xrv.models.DenseNet(weights=None).eval()


def _nnunet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    return PlainConvUNet(1, 4, (8, 16, 32, 64), nn.Conv2d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 2,
                         (2, 2, 2), False, nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None,
                         None, nn.LeakyReLU, {"inplace": True}, deep_supervision=False).eval()


class Odd(nn.Module):
    """Layers whose boxes are easy to get wrong: a dilated strided convolution, max pooling with
    ceil_mode, a grouped convolution with asymmetric padding, a padding-excluding average pool (no
    incremental rule: full tensors from there), a reflect-padded convolution (the same)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(2, 6, 3, stride=2, padding=2, dilation=2)
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.b = nn.Conv2d(6, 6, (3, 5), padding=(1, 2), groups=3)
        self.avg = nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)
        self.c = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = self.pool(y)
        y = self.b(y) * 0.5 + y
        y = self.c(self.avg(y))
        return self.head(y.mean((2, 3)))


FAMILIES = {
    "torchvision ResNet-18 2D": (lambda: _zoo("resnet18", 2), (1, 64, 64), 12),
    "MONAI ResNet-18 3D": (lambda: _zoo("resnet18", 3), (1, 24, 24, 24), 6),
    "MONAI DenseNet-121 2D": (lambda: _zoo("densenet121", 2), (1, 64, 64), 12),
    "MONAI U-Net 2D (instance norm)": (lambda: _zoo("unet", 2), (1, 48, 48), 12),
    "MONAI U-Net 3D (instance norm)": (lambda: _zoo("unet", 3), (1, 24, 24, 24), 6),
    "timm ConvNeXt (layer norm)": (_convnext, (3, 64, 64), 12),
    "smp U-Net (BatchNorm, up-sampling)": (_smp, (1, 64, 64), 12),
    "TorchXRayVision DenseNet": (_xrv, (1, 224, 224), 40),
    "nnU-Net PlainConvUNet": (_nnunet, (1, 64, 64), 12),
    "odd layers": (Odd, (2, 37, 41), 7),
}


def _corners(spatial, window, n=9, seed=0):
    """The four-plus corners of the map and random positions, windows partly past no edge."""
    gen = torch.Generator().manual_seed(seed)
    nd = len(spatial)
    far = [s - window for s in spatial]
    fixed = [[0] * nd, far, [f // 2 for f in far], [0, *far[1:]], [far[0], *([0] * (nd - 1))]]
    rand = [[int(torch.randint(0, f + 1, (1,), generator=gen)) for f in far] for _ in range(n - 5)]
    return torch.tensor(fixed + rand)


def _tolerance(explanation) -> float:
    """1e-5 of the scores' scale (a drop is a difference of two float32 scores)."""
    return 1e-5 * max(1.0, float(explanation.target.score(explanation.output).abs().max()))


def _full(model, x, corners, patches, window):
    xs = x.repeat(len(corners), *([1] * (x.ndim - 1)))
    for i, c in enumerate(corners.tolist()):
        xs[(i, slice(None), *[slice(a, a + window) for a in c])] = patches[i]
    with torch.no_grad():
        out = model(xs)
    return out if isinstance(out, torch.Tensor) else reduce_output(out)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_incremental_forward_equals_the_full_forward(family):
    make, shape, window = FAMILIES[family]
    model = make()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((1, *shape), generator=gen)
    corners = _corners(shape[1:], window)
    patches = torch.randn((len(corners), shape[0], *[window] * (len(shape) - 1)), generator=gen)
    # float64: the algorithm is exact (the same products, summed in another order)
    model64, x64 = model.double(), x.double()
    engine = IncrementalForward(model64)
    engine.prepare(x64)
    got = engine(patches.double(), corners)
    want = _full(model64, x64, corners, patches.double(), window)
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()
    # float32: within 1e-5 of the output's scale
    model32 = model.float()
    engine = IncrementalForward(model32)
    clean = engine.prepare(x)
    with torch.no_grad():
        reference = model32(x)
    reference = reference if isinstance(reference, torch.Tensor) else reduce_output(reference)
    assert (clean - reference).abs().max() <= 1e-5 * reference.abs().max()
    got = engine(patches, corners)
    want = _full(model32, x, corners, patches, window)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), family
    assert 0 < engine.macs <= len(corners) * engine.full_macs_per_row


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "TorchXRayVision DenseNet"])
def test_incremental_occlusion_map_equals_the_full_one(family):
    make, shape, window = FAMILIES[family]
    model = make().double()
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(2)).double()
    seg = family.startswith(("MONAI U-Net", "smp", "nnU-Net"))
    target = None if seg else 1
    stride = window if len(shape) == 4 else window // 2  # 3D: 64 windows, not 343
    opts = {"window": window, "stride": stride, "baseline": "mean"}
    full = create("occlusion", incremental=False, **opts).explain(model, x, target=target)
    inc = create("occlusion", incremental=True, **opts).explain(model, x, target=target)
    assert inc.extras["incremental"] == "on"
    assert full.extras["incremental"] == "off (incremental=False)"
    # the scores are float32 (as every explainer's): equal up to their rounding, not 1e-9 (a box
    # rule that missed a changed value would be off by the size of a drop)
    assert (inc.attributions - full.attributions).abs().max() <= _tolerance(full)
    # every copy is counted; the first batch ran both ways (the check)
    assert inc.cost.forward_samples > full.cost.forward_samples
    assert inc.cost.work_ratio <= 1.0 and full.cost.work_ratio == pytest.approx(1.0)


def test_work_ratio_shows_the_saving_on_a_resnet():
    model = _zoo("resnet18", 2)
    x = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(3))
    inc = create("occlusion", window=16, stride=16, incremental=True).explain(model, x, target=0)
    full = create("occlusion", window=16, stride=16, incremental=False).explain(model, x, target=0)
    assert (inc.attributions - full.attributions).abs().max() <= _tolerance(full)
    # the first batch runs both ways (the check), the rest boxes only: well under the full work
    assert inc.cost.work_ratio < 0.85 and full.cost.work_ratio == pytest.approx(1.0)
    assert inc.cost.full_macs == inc.cost.forward_samples * full.cost.full_macs // \
        full.cost.forward_samples
    sal = create("saliency").explain(model, x, target=0)
    assert sal.cost.work_ratio == pytest.approx(1.0)
    from pellucid.metrics import create as metric
    from pellucid.metrics.base import Context

    result = metric("cost").compute(Context(model=model, inputs=x, explanation=inc, target=0,
                                            attributions=inc.attributions))
    assert result.extras["work_ratio"] == pytest.approx(inc.cost.work_ratio)


class Branchy(nn.Module):
    """Control flow on the input's values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return y.mean((2, 3))


def test_untraceable_model_falls_back_or_refuses_in_one_line():
    model = Branchy().eval()
    x = torch.randn(2, 1, 32, 32)
    auto = create("occlusion", window=4, stride=4).explain(model, x, target=0)
    assert auto.extras["incremental"].startswith("off: the model cannot be traced by torch.fx")
    full = create("occlusion", window=4, stride=4, incremental=False).explain(model, x, target=0)
    assert torch.equal(auto.attributions, full.attributions)
    with pytest.raises(ConfigError, match="incremental=True, but the model cannot be traced") as e:
        create("occlusion", window=4, stride=4, incremental=True).explain(model, x, target=0)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="incremental must be"):
        create("occlusion", incremental="yes").explain(model, x, target=0)


def test_a_disagreeing_incremental_forward_is_never_used(monkeypatch):
    """An engine off by 1e-3 (as a stale or wrong rule would be): "auto" runs the full forward
    and says why; incremental=True refuses."""
    model = _zoo("resnet18", 2)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    full = create("occlusion", window=8, stride=8, incremental=False).explain(model, x, target=0)
    original = IncrementalForward.__call__
    monkeypatch.setattr(IncrementalForward, "__call__",
                        lambda self, p, c: original(self, p, c) + 1e-3)
    auto = create("occlusion", window=8, stride=8).explain(model, x, target=0)
    assert auto.extras["incremental"].startswith("off: disagrees with the full forward")
    assert torch.allclose(auto.attributions, full.attributions, atol=1e-5)
    with pytest.raises(ModelError, match="disagrees with the full forward"):
        create("occlusion", window=8, stride=8, incremental=True).explain(model, x, target=0)


def test_changed_weights_rebuild_the_cached_incremental_forward():
    """The traced copy is cached per model; weights changed in place after it was made (fine-tuning,
    a user's edit) are noticed on the clean input and the copy is made again, never used stale."""
    model = _zoo("resnet18", 2)
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    opts = {"window": 8, "stride": 8}
    create("occlusion", incremental=True, **opts).explain(model, x, target=0)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(-1.5)
    inc = create("occlusion", incremental=True, **opts).explain(model, x, target=0)
    full = create("occlusion", incremental=False, **opts).explain(model, x, target=0)
    assert inc.extras["incremental"] == "on"
    assert (inc.attributions - full.attributions).abs().max() <= _tolerance(full)


def test_an_engine_in_use_is_not_shared():
    """The engine's clean pass is one caller's at a time: while another holds it, occlusion runs
    the full forward and says so."""
    from pellucid.explainers.occlusion_plan import _ENGINES

    model = _zoo("resnet18", 2)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    opts = {"window": 8, "stride": 4}
    create("occlusion", incremental=True, **opts).explain(model, x, target=0)
    engine = _ENGINES[model]
    with engine.lock:  # as another caller would hold it
        busy = create("occlusion", **opts).explain(model, x, target=0)
    assert busy.extras["incremental"] == "off: in use by another explanation in this process"
    full = create("occlusion", incremental=False, **opts).explain(model, x, target=0)
    assert torch.equal(busy.attributions, full.attributions)
    assert not engine.lock.locked() and engine.clean == {}  # released, activations dropped


class Aliased(nn.Module):
    """A result that relies on an in-place activation's aliasing: ``self.act(y)``'s return is
    ignored, ``y`` itself changed. The engine runs every operation out of place (a box shared by
    two consumers must not change under one), so its clean pass differs from the model's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        self.act(y)
        return self.head(y.mean((2, 3)))


def test_in_place_aliasing_is_caught_not_computed_wrong():
    model = Aliased().eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(8))
    opts = {"window": 4, "stride": 4}
    auto = create("occlusion", **opts).explain(model, x, target=0)
    full = create("occlusion", incremental=False, **opts).explain(model, x, target=0)
    assert auto.extras["incremental"] == "off: disagrees with the model on the clean input"
    assert torch.equal(auto.attributions, full.attributions)
    with pytest.raises(ModelError, match="disagrees with the model on the clean input"):
        create("occlusion", incremental=True, **opts).explain(model, x, target=0)


class Shared(nn.Module):
    """Activations the engine may run in place and ones it must not: a convolution read twice,
    a ReLU after an Identity (which returns its input itself), a ReLU after a sum read once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.same = nn.Identity()
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x)
        z = torch.relu(y)  # y is read again below: not in place
        v = self.act(self.same(self.b(z)))  # after an Identity: not in place
        return self.head(torch.relu(y + v).mean((2, 3)))  # the sum's only reader: in place


def test_activations_run_in_place_only_on_a_fresh_value_with_one_reader():
    model = Shared().eval()
    engine = IncrementalForward(model)
    assert [str(n.args[0]) for n in engine.in_place] == ["add"]
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 1, 32, 32, generator=gen)
    engine.prepare(x)
    kept = {n: v.clone() for n, v in engine.clean.items() if isinstance(v, torch.Tensor)}
    corners = _corners((32, 32), 6)
    patches = torch.randn((len(corners), 1, 6, 6), generator=gen)
    first = engine(patches, corners)
    assert (first - _full(model, x, corners, patches, 6)).abs().max() <= 1e-5
    assert torch.equal(engine(patches, corners), first)  # the second call: the same values
    assert all(torch.equal(engine.clean[n], v) for n, v in kept.items())  # clean pass untouched
    dense = IncrementalForward(_zoo("densenet121", 2))
    relus = [n for n in dense.nodes if n.op == "call_module" and
             isinstance(dense.modules[n.target], nn.ReLU)]
    assert len(dense.in_place) == len(relus) == 121  # MONAI's DenseNet-121: every ReLU


def test_the_clean_pass_stays_within_the_memory_limit():
    """The clean pass keeps one input's activations: under a memory limit they do not fit, the
    full forward runs (chunked by the limit) and the explanation says why; True refuses."""
    from pellucid.runtime import set_memory_limit

    model = _zoo("resnet18", 2)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(9))
    full = create("occlusion", window=8, stride=8, incremental=False).explain(model, x, target=0)
    set_memory_limit(2)  # MB: a 64 px ResNet-18's activations are about 3 MB per input
    try:
        auto = create("occlusion", window=8, stride=8).explain(model, x, target=0)
        with pytest.raises(ConfigError, match="would not fit the memory limit"):
            create("occlusion", window=8, stride=8, incremental=True).explain(model, x, target=0)
    finally:
        set_memory_limit(None)
    assert auto.extras["incremental"].startswith("off: the clean pass's activations")
    assert torch.equal(auto.attributions, full.attributions)


def test_a_benchmark_run_records_the_choice_and_a_resumed_run_computes_the_same_way(monkeypatch):
    """In a benchmark run "auto"'s choice is recorded (backends.json) and a resumed run, in a new
    process that would choose otherwise, computes the same way: the maps are bit-identical."""
    from pellucid.explainers import occlusion_plan
    from pellucid.inference.select import Pinned, pin_backends

    model = _zoo("resnet18", 2)
    x = torch.randn(2, 1, 128, 128, generator=torch.Generator().manual_seed(10))
    opts = {"window": 16, "stride": 16}
    recorded: dict = {}
    pin_backends(Pinned({}, recorded.__setitem__))
    try:
        first = create("occlusion", **opts).explain(model, x, target=0)
        chosen = [v for k, v in recorded.items() if k.endswith("|incremental")]
        assert chosen in (["on"], ["off"])
        occlusion_plan._ENGINES.clear()  # a new process: nothing measured yet
        monkeypatch.setattr(occlusion_plan, "SURE_GAIN", 0.0)  # it would time, and decide the
        monkeypatch.setattr(occlusion_plan, "GAIN_NEEDED", 0.0 if chosen == ["on"] else 1e9)
        pin_backends(Pinned(dict(recorded), recorded.__setitem__))  # other way round
        resumed = create("occlusion", **opts).explain(model, x, target=0)
    finally:
        pin_backends(None)
    assert torch.equal(first.attributions, resumed.attributions)
    assert resumed.extras["incremental"] in ("on (chosen for this benchmark run, backends.json)",
                                             "off: chosen for this benchmark run (backends.json)")
    occlusion_plan._ENGINES.clear()  # another process, outside a run: it chooses for itself
    alone = create("occlusion", **opts).explain(model, x, target=0)
    assert alone.extras["incremental"].startswith("off" if chosen == ["on"] else "on")
    assert (alone.attributions - first.attributions).abs().max() <= _tolerance(first)
