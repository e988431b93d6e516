"""A deployed ONNX model explained as a black box: every forward-only method's map and every
forward-only metric on the exported model (ONNX Runtime) equals the PyTorch model's within 1e-4,
on a 2D classifier, a 2D U-Net and a 3D U-Net; gradient methods and weight randomisation are
refused with the reason; a model exported with a fixed batch of one runs sample by sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pellucid
from pellucid.errors import ConfigError, DataError, ModelError
from pellucid.explainers import available
from pellucid.models import build
from pellucid.models.blackbox import BlackBoxModel, load_onnx
from pellucid.targets import SegmentationTarget

METHODS = {"occlusion": {"window": 8, "stride": 4}, "rise": {"masks": 64, "cells": 4},
           "lime": {"n_features": 12, "samples": 64}, "kernelshap": {"n_features": 8, "samples": 64},
           "shapley": {"n_features": 6}, "random": {}, "centre": {}, "edges": {}}
METRICS = ["deletion", "insertion", "average_drop", "increase_in_confidence", "road",
           "faithfulness_correlation", "pixel_flipping", "infidelity", "sparseness", "complexity"]
TOL = 1e-4


def export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    axes = {"image": {0: "batch"}, "scores": {0: "batch"}} if dynamic else None
    torch.onnx.export(model.eval(), example[:1], str(path), dynamo=False, input_names=["image"],
                      output_names=["scores"], dynamic_axes=axes)
    return path


def _case(kind: str):
    torch.manual_seed(0)
    if kind == "classifier":
        model = build("resnet18", 2, 1, 3).module
        x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        return model.eval(), x, 1
    dims = 2 if kind == "unet2d" else 3
    model = build("unet", dims, 1, 2, unet_channels=(4, 8, 16)).module
    size = (32, 32) if dims == 2 else (16, 16, 16)
    x = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(2))
    return model.eval(), x, SegmentationTarget(1, region="all")


def _options(method: str, kind: str) -> dict:
    options = dict(METHODS[method])
    if kind == "unet3d" and method == "occlusion":
        options = {"window": 8, "stride": 8}
    if kind == "unet3d" and method in ("lime", "kernelshap", "shapley"):
        options["features"] = "grid"
    return options


@pytest.mark.parametrize("kind", ["classifier", "unet2d", "unet3d"])
def test_forward_only_methods_and_metrics_on_onnx_equal_torch(kind, tmp_path):
    model, x, target = _case(kind)
    box = load_onnx(export(model, x, tmp_path / f"{kind}.onnx"))
    with torch.no_grad():
        assert (box(x) - model(x)).abs().max() <= 1e-4
    for method in METHODS:
        options = _options(method, kind)
        ours = pellucid.explain(box, x, method, target=target, **options)
        ref = pellucid.explain(model, x, method, target=target, **options)
        # attributions are in units of the target score (a U-Net's is a sum over its pixels, whose
        # float32 rounding ONNX Runtime and torch do in different orders): relative to it
        scale = max(ref.attributions.abs().max().item(),
                    ref.target.score(ref.output).abs().max().item(), 1.0)
        diff = (ours.attributions - ref.attributions).abs().max().item()
        assert diff <= TOL * scale, f"{kind} {method}: {diff}"
        if method == "occlusion":
            assert ref.attributions.std() > 0
            occlusion = ref
    for name in METRICS:
        if kind != "classifier" and name in ("average_drop", "increase_in_confidence"):
            continue
        got = pellucid.evaluate(box, x, occlusion, metrics=[name])[name].scores
        want = pellucid.evaluate(model, x, occlusion, metrics=[name])[name].scores
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL,
                                   err_msg=f"{kind} {name}")


def test_gradient_methods_and_weight_randomisation_are_refused(tmp_path):
    model, x, _ = _case("classifier")
    box = load_onnx(export(model, x, tmp_path / "m.onnx"))
    usable = {m["name"] for m in available()} & set(METHODS)
    for method in ("gradcam", "saliency", "integratedgradients", "lrp", "scorecam",
                   "rollout"):
        with pytest.raises(ModelError, match=f"{method} needs gradients or layer hooks.*only runs "
                                              f"forward; use one of: .*occlusion"):
            pellucid.explain(box, x, method)
    assert usable == set(METHODS)
    exp = pellucid.explain(box, x, "occlusion", window=8, stride=4)
    with pytest.raises(ConfigError, match="black-box"):
        pellucid.evaluate(box, x, exp, metrics=["model_randomization"],
                          explain_fn=lambda m, i, t: exp.attributions)


def test_a_fixed_batch_export_and_a_plain_callable(tmp_path):
    model, x, _ = _case("classifier")
    box = load_onnx(export(model, x, tmp_path / "fixed.onnx", dynamic=False))
    assert box.batch == 1
    a = pellucid.explain(box, x, "occlusion", target=0, window=8, stride=8)
    b = pellucid.explain(model, x, "occlusion", target=0, window=8, stride=8)
    assert (a.attributions - b.attributions).abs().max() <= TOL

    def scores(arr: np.ndarray) -> np.ndarray:  # any function from arrays to scores
        with torch.no_grad():
            return model(torch.from_numpy(arr)).numpy()
    c = pellucid.explain(BlackBoxModel(scores, "a scoring service"), x, "occlusion", target=0,
                         window=8, stride=8)
    assert (c.attributions - b.attributions).abs().max() <= TOL
    with pytest.raises(DataError, match="no such ONNX file"):
        load_onnx(tmp_path / "missing.onnx")
    with pytest.raises(DataError, match="outputs are scores"):
        load_onnx(tmp_path / "fixed.onnx", output="logits")


def test_an_onnx_file_loads_as_a_model_with_its_card_and_its_own_digest(tmp_path):
    from pellucid.models import load_model
    from pellucid.models.card import ModelCard
    from pellucid.models.store import weights_digest

    model, x, _ = _case("classifier")
    export(model, x, tmp_path / "a.onnx")
    ModelCard(arch="onnx", task="classification", class_names=["a", "b", "c"], in_channels=1,
              spatial_dims=2, input_size=[32, 32], activation="softmax").save(tmp_path / "card.json")
    loaded = load_model(tmp_path / "a.onnx")
    assert loaded.card.class_names == ["a", "b", "c"] and loaded.module.forward_only
    exp = pellucid.explain(loaded, x, "occlusion", window=8, stride=8)
    ref = pellucid.explain(model, x, "occlusion", window=8, stride=8, activation="softmax")
    assert (exp.attributions - ref.attributions).abs().max() <= TOL
    torch.manual_seed(9)
    other, _, _ = _case("classifier")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    export(other, x, tmp_path / "b.onnx")
    digests = {weights_digest(load_model(tmp_path / n).module) for n in ("a.onnx", "b.onnx")}
    assert len(digests) == 2  # two deployed models never share cached results
    assert weights_digest(load_model(tmp_path / "a.onnx").module) in digests


def test_a_failing_runtime_and_a_non_float_input_are_one_line_errors(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def broken(arr):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions\nmore")
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ModelError, match=r"^the a service cannot take input of shape \(2, 1, 16, 16\): "
                                         r"\[ONNXRuntimeError\].*dimensions$"):
        pellucid.explain(BlackBoxModel(broken, "a service"), x, "occlusion", window=8, stride=8)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["scores"], axes=[2, 3], keepdims=0)],
        "uint8", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 1, 16, 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "u8.onnx")
    with pytest.raises(DataError, match=r"tensor\(uint8\); pellucid feeds float32"):
        load_onnx(tmp_path / "u8.onnx")
