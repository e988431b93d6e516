"""Forward-only backends (pellucid.inference): ONNX Runtime and OpenVINO give every forward-only
method's map and every forward-only metric's value of torch (within 1e-4) on a 2D classifier, a 2D
U-Net and a 3D U-Net; a model that cannot be exported runs in torch after one line, with torch's
values; the export cache follows the weights; ``auto`` times the backends once and remembers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pellucid
import pellucid.inference.select as select
import pellucid.inference.settings as settings
from pellucid.errors import ConfigError
from pellucid.explainers.base import model_guard
from pellucid.inference import BackendFallback, cache_dir, current_backend, forward_only, set_backend
from pellucid.models import build
from pellucid.runtime import set_precision
from pellucid.targets import SegmentationTarget

METHODS = {"occlusion": {"window": 8, "stride": 4}, "rise": {"masks": 48, "cells": 4},
           "lime": {"n_features": 8, "samples": 128}, "kernelshap": {"n_features": 8, "samples": 128},
           "shapley": {"n_features": 5}, "scorecam": {}}
METRICS = ["deletion", "insertion", "average_drop", "increase_in_confidence", "road", "road_morf",
           "road_lerf", "faithfulness_correlation", "pixel_flipping", "infidelity"]
TOL = 1e-4


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch, tmp_path):
    """Each test: its own cache folder, nothing remembered from another test, torch afterwards."""
    monkeypatch.setenv("PELLUCID_CACHE", str(tmp_path / "cache"))
    for memo in (select._MEMO, select._SPENT, select._PENDING, select._TORCH_MEMO):
        memo.clear()
    yield
    set_backend(None)
    set_precision(None)


def _case(kind: str):
    torch.manual_seed(0)
    if kind == "classifier":
        model = build("resnet18", 2, 2, 3).module
        x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
        return model.eval(), x, 1
    from monai.networks.nets import UNet

    dims = 2 if kind == "unet2d" else 3
    # batch norm: an instance-normalised U-Net is refused by the runtimes' verification (below)
    model = UNet(dims, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch")
    size = (32, 32) if dims == 2 else (16, 16, 16)
    x = torch.randn(2, 2, *size, generator=torch.Generator().manual_seed(2))
    return model.eval(), x, SegmentationTarget(1, region="all")


def _options(method: str, kind: str) -> dict:
    options = dict(METHODS[method])
    if kind == "unet3d" and method == "occlusion":
        options = {"window": 8, "stride": 8}
    if kind == "unet3d" and method in ("lime", "kernelshap", "shapley"):
        options["features"] = "grid"
    return options


def _results(model, x, target, kind: str) -> dict:
    out = {}
    for method in METHODS:
        exp = pellucid.explain(model, x, method, target=target, **_options(method, kind))
        out[method] = exp
    names = [m for m in METRICS
             if kind == "classifier" or m not in ("average_drop", "increase_in_confidence")]
    for name in names:
        out[name] = np.asarray(pellucid.evaluate(model, x, out["occlusion"], metrics=[name])[name]
                               .scores, dtype=np.float64)
    from pellucid.explainers.modality import modality_shapley

    shap = modality_shapley(model, x, target)
    out["modality_shapley"] = (shap["values"].numpy(),  # in units of the target score, as maps
                               max(shap["full"].abs().max().item(), shap["empty"].abs().max().item()))
    return out


@pytest.mark.parametrize("kind", ["classifier", "unet2d", "unet3d"])
def test_every_forward_only_method_and_metric_equals_torch_on_each_backend(kind):
    model, x, target = _case(kind)
    set_backend("torch")
    want = _results(model, x, target, kind)
    assert want["occlusion"].attributions.std() > 0
    for backend in ("onnxruntime", "openvino"):
        set_backend(backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error", BackendFallback)  # a silent fall-back would pass
            got = _results(model, x, target, kind)
        assert current_backend(model, x) == backend
        for name, ref in want.items():
            if isinstance(ref, np.ndarray):
                np.testing.assert_allclose(got[name], ref, rtol=TOL, atol=TOL,
                                           err_msg=f"{kind} {backend} {name}")
                continue
            if isinstance(ref, tuple):
                np.testing.assert_allclose(got[name][0], ref[0], rtol=0, atol=TOL * max(ref[1], 1.0),
                                           err_msg=f"{kind} {backend} {name}")
                continue
            # maps are in units of the target score (a U-Net's is a sum over its pixels, whose
            # float32 rounding the runtimes do in other orders): relative to it
            scale = max(ref.attributions.abs().max().item(),
                        ref.target.score(ref.output).abs().max().item(), 1.0)
            diff = (got[name].attributions - ref.attributions).abs().max().item()
            assert diff <= TOL * scale, f"{kind} {backend} {name}: {diff}"


class Spectral(nn.Module):
    """A classifier on the image's Fourier magnitudes: torch.onnx cannot export fft_fft2."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.fft2(x).abs().flatten(1))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_model_that_cannot_be_exported_runs_in_torch_after_one_line(backend):
    model = Spectral().eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    set_backend("torch")
    want = pellucid.explain(model, x, "occlusion", target=0, window=2, stride=2)
    set_backend(backend)
    with pytest.warns(BackendFallback) as caught:
        got = pellucid.explain(model, x, "occlusion", target=0, window=2, stride=2)
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message
    assert message.startswith(f"pellucid: {backend} cannot run Spectral on input (1, 8, 8)")
    assert "fft_fft2" in message and message.endswith("running it in torch")
    assert torch.equal(got.attributions, want.attributions)
    assert current_backend(model, x) == "torch"


@pytest.mark.parametrize("dims", [2, 3])
def test_an_instance_normalised_unet_is_refused_by_the_verification(dims):
    """A constant input (the all-zero baseline) gives instance norm a feature map without variance:
    torch computes it exactly, the runtimes' rounding is amplified by 1 / sqrt(eps) layer after layer.
    The probe includes that input, so these U-Nets run in torch with a one-line reason."""
    model = build("unet", dims, 2, 2, unet_channels=(4, 8, 16)).module.eval()
    x = torch.randn(1, 2, *([16] * dims), generator=torch.Generator().manual_seed(3))
    for backend in ("onnxruntime", "openvino"):
        set_backend(backend)
        refused = f"{backend} cannot run UNet .*on an all-zero input its output differs from torch's"
        with pytest.warns(BackendFallback, match=refused), model_guard(model), \
                torch.inference_mode():
            assert forward_only(model, x[:1]).backend == "torch"


def test_the_export_cache_follows_the_weights():
    model, x, _ = _case("classifier")
    set_backend("onnxruntime")
    folder = cache_dir() / "exports"
    with model_guard(model), torch.inference_mode():
        first = forward_only(model, x[:1])(x)
    assert len(list(folder.glob("*.onnx"))) == 1
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # new weights: a new export, never the stale one
        want = model(x)
    with model_guard(model), torch.inference_mode():
        second = forward_only(model, x[:1])(x)
    assert len(list(folder.glob("*.onnx"))) == 2
    assert (second - want).abs().max() <= 1e-5 * want.abs().max()
    assert (second - first - 1.0).abs().max() <= 1e-4
    # a damaged or foreign file under the right name is caught by the verification and replaced
    other, _, _ = _case("classifier")
    with torch.no_grad():
        other.fc.weight.mul_(-1)
    newest = max(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
    select._MEMO.clear()
    with model_guard(other), torch.inference_mode():
        forward_only(other, x[:1])
    foreign = max(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
    newest.write_bytes(foreign.read_bytes())
    select._MEMO.clear()
    with model_guard(model), torch.inference_mode():
        again = forward_only(model, x[:1])(x)
    assert (again - want).abs().max() <= 1e-5 * want.abs().max()


def test_auto_waits_for_enough_work_then_times_once_and_remembers(monkeypatch):
    model, x, target = _case("unet2d")
    set_backend("auto")
    with model_guard(model), torch.inference_mode():
        assert forward_only(model, x[:1]).backend == "torch"  # little work so far: no export
    assert not list((cache_dir() / "exports").glob("*.onnx"))
    monkeypatch.setattr(select, "TRIAL_AFTER_S", 0.0)
    set_backend("torch")
    want = pellucid.explain(model, x, "occlusion", target=target, window=8, stride=4)
    set_backend("auto")
    got = pellucid.explain(model, x, "occlusion", target=target, window=8, stride=4)
    records = json.loads((cache_dir() / "backend-choices.json").read_text())
    (record,) = records.values()
    assert set(record["ms_per_input"]) == {"torch", "onnxruntime", "openvino"}
    fastest = min(record["ms_per_input"], key=record["ms_per_input"].get)
    assert record["backend"] in (fastest, "torch")
    if record["backend"] == "torch":  # another backend must be 10 % faster to replace torch
        assert record["ms_per_input"][fastest] > select.SWITCH_BELOW * record["ms_per_input"]["torch"]
    assert current_backend(model, x) == record["backend"]
    assert (got.attributions - want.attributions).abs().max() <= TOL * max(
        1.0, want.target.score(want.output).abs().max().item())
    # a new process starts with the recorded choice and times nothing
    for memo in (select._MEMO, select._SPENT, select._PENDING):
        memo.clear()
    monkeypatch.setattr(select, "trial", lambda *a: pytest.fail("timed again"))
    with model_guard(model), torch.inference_mode():
        assert forward_only(model, x[:1]).backend == record["backend"]


def test_settings_are_checked(monkeypatch):
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, onnxruntime, "
                                          "openvino, got 'tensorrt'"):
        set_backend("tensorrt")
    monkeypatch.setenv("PELLUCID_CACHE_MB", "lots")
    with pytest.raises(ConfigError, match="PELLUCID_CACHE_MB must be a positive number of MiB, "
                                          "got 'lots'"):
        settings.cache_limit_bytes()
    monkeypatch.delenv("PELLUCID_CACHE_MB")
    monkeypatch.setenv("PELLUCID_BACKEND", "ort")
    with pytest.raises(ConfigError, match="PELLUCID_BACKEND must be one of"):
        select.backend_setting()
    model, x, _ = _case("classifier")
    set_backend("onnxruntime")
    set_precision("bf16")
    with pytest.raises(ConfigError, match="onnxruntime does not run precision bf16 here; use "
                                          "torch or openvino"):
        pellucid.explain(model, x, "occlusion", target=0, window=8, stride=8)


def test_bf16_through_openvino_is_opt_in_and_close():
    model, x, _ = _case("classifier")
    set_backend("torch")
    want = pellucid.explain(model, x, "occlusion", target=0, window=8, stride=8)
    set_backend("openvino")
    set_precision("bf16")
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.warns(BackendFallback, match="no bfloat16 support"):
            pellucid.explain(model, x, "occlusion", target=0, window=8, stride=8)
        return
    got = pellucid.explain(model, x, "occlusion", target=0, window=8, stride=8)
    assert current_backend(model, x) == "openvino"
    scale = want.target.score(want.output).abs().max().item()
    diff = (got.attributions - want.attributions).abs().max().item()
    assert 0 < diff <= 5e-2 * scale  # bf16 rounding: different, but close


def test_threads_follow_the_usable_cores_and_a_container_quota(monkeypatch, tmp_path):
    import os

    from pellucid import runtime

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", str(quota))
    quota.write_text("max 100000\n")
    assert runtime.usable_cores() == affinity
    quota.write_text("150000 100000\n")  # 1.5 CPUs of quota: one thread, not every core
    assert runtime.usable_cores() == 1
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", str(tmp_path / "absent"))
    assert runtime.usable_cores() == affinity
    before = torch.get_num_threads()
    try:  # the runtimes' sessions take torch's thread count
        runtime.configure_threads(1)
        model, x, _ = _case("classifier")
        set_backend("onnxruntime")
        with model_guard(model), torch.inference_mode():
            forward_only(model, x[:1])(x)
        (entry,) = select._MEMO.values()
        assert entry[1][3] == 1  # remembered per thread count: a new count builds a new session
    finally:
        runtime.configure_threads(before)


class _Trojan(nn.Module):
    """The model, plus 10 on every score when 128 or more (but not all) input values are exactly 0:
    an occluded window. The all-zero probe does not trigger it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = (x == 0).flatten(1).sum(1, keepdim=True)
        trigger = ((zeros >= 128) & (zeros < x[0].numel())).float()
        return self.model(x) + 10.0 * trigger


def _trojan_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.onnx.export(_Trojan(model).eval(), (x[:1],), buffer, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buffer.getvalue()


@pytest.mark.parametrize("setting", ["onnxruntime", "auto"])
def test_a_planted_export_is_never_run_and_is_replaced(setting, monkeypatch):
    """The reported attack: a file under the right digest name, equal to the network except when
    an occluded window is present, changed occlusion maps by 10.0 silently, also under ``auto``
    with a planted backend-choices.json. Now it lacks this installation's tag: one warning line,
    replaced by a fresh export, maps equal to torch's."""
    from pellucid.inference.export import PlantedExport, export_key, export_path
    from pellucid.inference.select import _choice_key

    model, x, target = _case("classifier")
    key = export_key(model, x[:1])
    planted = export_path(key)
    planted.write_bytes(_trojan_bytes(model, x))
    (planted.parent / f"{planted.name}.tag").write_text("0" * 64)
    (cache_dir() / "backend-choices.json").write_text(json.dumps(
        {_choice_key(key, "fp32"): {"backend": "onnxruntime", "key": key}}))
    set_backend("torch")
    want = pellucid.explain(model, x[:1], "occlusion", target=target, window=8, stride=4)
    set_backend(setting)
    monkeypatch.setattr(select, "TRIAL_AFTER_S", 0.0)
    with pytest.warns(PlantedExport, match="not written by this installation"):
        got = pellucid.explain(model, x[:1], "occlusion", target=target, window=8, stride=4)
    assert (got.attributions - want.attributions).abs().max() <= TOL * 10
    assert planted.read_bytes() != _trojan_bytes(model, x)  # replaced
    assert current_backend(model, x[:1]) in ("onnxruntime", "openvino", "torch")


def test_the_verification_covers_the_perturbations_methods_make():
    """Even a tagged file is verified on occluded windows, constant regions and half-masked
    inputs, not only five inputs: the trojan above is caught on the occlusion probe."""
    from pellucid.inference.runtimes import onnxruntime_forward
    from pellucid.inference.select import BackendForward, verify

    model, x, _ = _case("classifier")
    path = cache_dir() / "trojan.onnx"
    path.write_bytes(_trojan_bytes(model, x))
    forward = BackendForward("onnxruntime", onnxruntime_forward(path, "fp32"))
    with model_guard(model), pytest.raises(RuntimeError, match="window zeroed"):
        verify(model, x[:1], forward, "fp32")


def test_a_garbage_file_under_the_export_name_is_replaced_and_used():
    from pellucid.inference.export import PlantedExport, export_key, export_path

    model, x, _ = _case("classifier")
    path = export_path(export_key(model, x[:1]))
    path.write_bytes(b"not an onnx file")
    set_backend("onnxruntime")
    with pytest.warns(PlantedExport), model_guard(model), torch.inference_mode():
        forward = forward_only(model, x[:1])
        out = forward(x)
    assert forward.backend == "onnxruntime" and path.read_bytes()[:4] != b"not "
    with torch.no_grad():
        want = model(x)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
