"""The support matrix: models of the libraries people use (random weights; nothing downloads) x
every method family that can read them, each cell equal to a reference or refused with its reason.

References: pytorch-grad-cam 1.5.7 (Grad-CAM, with its ``reshape_transform`` for token and
channels-last layers), Captum (saliency, occlusion), zennit (LRP of CNNs, run directly with its own
canonizer), lxt's AttnLRP rules (LRP of transformers), and attention rollout recomputed in NumPy
from the attention weights each library itself returns (Hugging Face ``output_attentions``, timm's
explicit path, MONAI's ``save_attn``, the written-out torchvision ViT of test_transformers).

The table in docs/models.md is this test's result: ``PELLUCID_WRITE_DOCS=1 pytest
tests/test_model_libraries.py -k matrix`` rewrites it, and the test fails while it differs.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pellucid
from pellucid.errors import ConfigError, ModelError
from pellucid.explainers import default_layer
from pellucid.models.outputs import reduce_output
from pellucid.targets import ClassTarget, SegmentationTarget
from tests import peers
from tests.peers import record

sys.path.insert(0, str(Path(__file__).parent))
from test_transformers import _manual_vit, small_swin, tiny_vit

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"cam": "gradcam", "attention": "rollout", "gradient": "saliency", "relevance": "lrp",
            "perturbation": "occlusion"}
TOL = 1e-4


@dataclass
class Case:
    """One model of the matrix: how to build it, its inputs and target, and where a peer reads."""

    name: str
    library: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    task: str = "classification"
    reshape: Callable | None = None  # pytorch-grad-cam's reshape_transform for the CAM layer
    attention: Callable | None = None  # the library's own attention probabilities (list, per layer)
    window: int = 16
    cam_layer: str | None = None  # compare the CAM here instead of at the default layer
    refusals: dict[str, str] = field(default_factory=dict)  # family -> expected message part


def _tokens(prefix: int, grid: tuple[int, ...]):
    def transform(t):
        return t[:, prefix:, :].reshape(t.size(0), *grid, t.size(2)).movedim(-1, 1)
    return transform


def _timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3,
                             depth=2)


def _timm_attention(model, x):
    probs = []
    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(
            lambda m, i, o: probs.append(i[0])))
    try:
        return model(x), probs
    finally:
        for h in handles:
            h.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
    return probs


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=16, num_hidden_layers=2, hidden_size=32,
                       num_attention_heads=2, intermediate_size=64, num_labels=3,
                       initializer_range=0.2, attn_implementation="sdpa")
    return ViTForImageClassification(config)


def _hf_attention(model, x):
    model.set_attn_implementation("eager")
    try:
        out = model(x, output_attentions=True)
        return out.logits, list(out.attentions)
    finally:
        model.set_attn_implementation("sdpa")


def _torchvision_attention(model, x):
    return _manual_vit(model, x)


def _unetr():
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    return UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8,
                 hidden_size=48, mlp_dim=96, num_heads=4)


def _unetr_attention(model, x):
    probs = []
    handles = [block.attn.drop_weights.register_forward_hook(lambda m, i, o: probs.append(i[0]))
               for block in model.vit.blocks]
    try:
        return model(x), probs
    finally:
        for h in handles:
            h.remove()


def _nnunet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    return PlainConvUNet(1, 4, (8, 16, 32, 64), nn.Conv2d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 2,
                         (2, 2, 2), False, nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None,
                         None, nn.LeakyReLU, {"inplace": True}, deep_supervision=True)


def _swinunetr(dims: int):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=2, spatial_dims=dims, feature_size=12)


def _smp():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=2)


def _xrv():
    import torchxrayvision as xrv

    torch.manual_seed(0)
    return xrv.models.DenseNet(weights=None)


def _convnext():
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=3)


NO_ATTENTION = "no self-attention"
WINDOWED = "not global self-attention"
OWN_SOFTMAX = "computes its own softmax"
CASES = [
    Case("torchvision ViT", "torchvision", lambda: tiny_vit(size=64, patch=16), (3, 64, 64),
         reshape=_tokens(1, (4, 4)), attention=_torchvision_attention),
    Case("torchvision Swin", "torchvision", small_swin, (3, 64, 64),
         reshape=lambda t: t.permute(0, 3, 1, 2),
         refusals={"attention": WINDOWED, "relevance": OWN_SOFTMAX}),
    Case("timm ViT", "timm", _timm_vit, (3, 64, 64), reshape=_tokens(1, (4, 4)),
         attention=_timm_attention),
    Case("timm ConvNeXt", "timm", _convnext, (3, 64, 64), refusals={"attention": NO_ATTENTION}),
    # its forward applies ReLU in place to the output of `features` (the default layer); the peer
    # keeps that output by reference, so its activations there turn post-ReLU behind its back
    # (pellucid keeps the layer's own output). Compared one layer earlier, where nothing aliases.
    Case("TorchXRayVision DenseNet", "torchxrayvision", _xrv, (1, 224, 224), window=56,
         cam_layer="features.denseblock4", refusals={"attention": NO_ATTENTION}),
    Case("Hugging Face ViT", "transformers", _hf_vit, (3, 64, 64), reshape=_tokens(1, (4, 4)),
         attention=_hf_attention),
    Case("smp U-Net", "segmentation_models_pytorch", _smp, (1, 64, 64), task="segmentation",
         refusals={"attention": NO_ATTENTION}),
    Case("nnU-Net v2 PlainConvUNet", "dynamic_network_architectures (nnU-Net v2)", _nnunet,
         (1, 64, 64), task="segmentation", refusals={"attention": NO_ATTENTION}),
    Case("MONAI SwinUNETR 2D", "monai", lambda: _swinunetr(2), (1, 64, 64), task="segmentation",
         refusals={"attention": WINDOWED, "relevance": OWN_SOFTMAX}),
    # 64 x 32 x 32: five halvings leave 2 x 1 x 1 voxels for its instance norm (which refuses
    # one); a quarter of 64^3, whose occlusion cell alone took 48 s
    Case("MONAI SwinUNETR 3D", "monai", lambda: _swinunetr(3), (1, 64, 32, 32), task="segmentation",
         window=16, refusals={"attention": WINDOWED, "relevance": OWN_SOFTMAX}),
    Case("MONAI UNETR 3D", "monai", _unetr, (1, 32, 32, 32), task="segmentation", window=16,
         attention=_unetr_attention),
]


# --- references --------------------------------------------------------------------------------

class _Tensor(nn.Module):
    """The model with its output reduced to a tensor, for the peers (which need one)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return reduce_output(self.model(x))


def _score_fn(peer: nn.Module, task: str, cls: int):
    if task == "classification":
        return lambda x: peer(x)[:, cls]
    return lambda x: peer(x)[:, cls].flatten(1).sum(1)


def _gradcam_reference(case, model, peer, x, layer, cls):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputTarget,
        SemanticSegmentationTarget,
    )

    if case.task == "classification":
        targets = [ClassifierOutputTarget(cls)] * len(x)
    else:
        targets = [SemanticSegmentationTarget(cls, np.ones(x.shape[2:], dtype=np.float32))] * len(x)
    with GradCAM(model=peer, target_layers=[model.get_submodule(layer)],
                 reshape_transform=case.reshape) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=targets))[:, None]


def _attention_references(case, model, x, cls, prefix: int, grid: tuple[int, ...]):
    """Rollout and Chefer's rule recomputed in NumPy from the attention probabilities the library
    itself computes (and their gradients)."""
    with torch.enable_grad():
        out, probs = case.attention(model, x)
        score = out[:, cls] if case.task == "classification" else out[:, cls].flatten(1).sum(1)
        grads = torch.autograd.grad(score.sum(), probs)
    a = [np.asarray(p.detach(), dtype=np.float64) for p in probs]
    g = [np.asarray(q, dtype=np.float64) for q in grads]
    n = a[0].shape[-1]
    eye = np.eye(n)
    rollouts, chefers = [], []
    for i in range(len(x)):
        rollout, chefer = eye, eye
        for layer, grad in zip(a, g, strict=True):
            fused = 0.5 * layer[i].mean(0) + 0.5 * eye
            rollout = (fused / fused.sum(-1, keepdims=True)) @ rollout
            chefer = chefer + np.maximum(grad[i] * layer[i], 0).mean(0) @ chefer
        row = np.zeros(n)
        if prefix:
            row[0] = 1.0
        else:
            row[:] = 1.0 / n  # a segmentation target over the whole image, or mean pooling
        rollouts.append((row @ rollout)[prefix:].reshape(grid))
        chefers.append((row @ chefer)[prefix:].reshape(grid))
    return (torch.from_numpy(np.stack(rollouts))[:, None].float(),
            torch.from_numpy(np.stack(chefers))[:, None].float())


def _lrp_reference(case, model, peer, x, cls, transformer: bool) -> torch.Tensor:
    """zennit for CNNs; for transformers lxt's AttnLRP rules set on the modules by hand (lxt patches
    whole classes of two libraries only)."""
    score = _score_fn(peer, case.task, cls)
    if not transformer:
        from torchvision.models.resnet import BasicBlock, Bottleneck
        from zennit.attribution import Gradient
        from zennit.canonizers import NamedMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat
        from zennit.rules import Pass
        from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

        # zennit's SequentialMergeBatchNorm pairs a DenseNet's convolution with the next dense
        # layer's BatchNorm and fails; its NamedMergeBatchNorm takes the pairs a user would name: a
        # BatchNorm right after a convolution of its channel count, in the same parent module
        names = {m: n for n, m in peer.named_modules()}
        pairs = [((names[a],), names[b]) for parent in peer.modules()
                 for a, b in itertools.pairwise(parent.children())
                 if isinstance(a, nn.Conv2d | nn.Conv3d | nn.Linear)
                 and isinstance(b, nn.BatchNorm2d | nn.BatchNorm3d | nn.BatchNorm1d)
                 and a.weight.shape[0] == b.num_features]
        # zennit's merge leaves each BatchNorm computing x / sqrt(1 + eps); over DenseNet-121's 59
        # merges and its z+ rules that moves relevance by 9 % (max). pellucid's documented fix
        # (canonizers.exact_merge_batch_norm) is applied to the reference too
        from pellucid.explainers.canonizers import exact_merge_batch_norm

        class ExactNamedMerge(NamedMergeBatchNorm):
            merge_batch_norm = staticmethod(exact_merge_batch_norm)
        canonizers = [ExactNamedMerge(pairs)]
        if any(isinstance(m, BasicBlock | Bottleneck) for m in peer.modules()):
            canonizers += [ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]
        norms = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm,
                 nn.LayerNorm, nn.Dropout, nn.Dropout2d, nn.Dropout3d)
        composite = EpsilonPlusFlat(layer_map=[(norms, Pass())], canonizers=canonizers)
        with Gradient(model=peer, composite=composite) as attributor:
            out = peer(x)
            onehot = torch.zeros_like(out)
            onehot[:, cls] = 1.0
            _, relevance = attributor(x, onehot * out)
        return relevance
    from lxt.efficient.patches import layer_norm_forward
    from lxt.efficient.rules import divide_gradient, identity_rule_implicit, stop_gradient

    saved = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            saved.append((m, m.__dict__.get("forward")))
            m.forward = layer_norm_forward.__get__(m)
        elif isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
            def instance(x, m=m):  # lxt's LayerNorm rule, over each channel's voxels
                dims = tuple(range(2, x.ndim))
                mean = x.mean(dims, keepdim=True)
                std = (((x - mean) ** 2).mean(dims, keepdim=True) + m.eps).sqrt()
                y = (x - mean) / stop_gradient(std)
                if m.weight is not None:
                    shape = (-1,) + (1,) * (x.ndim - 2)
                    y = y * m.weight.view(shape) + m.bias.view(shape)
                return y
            saved.append((m, m.__dict__.get("forward")))
            m.forward = instance
        elif isinstance(m, (nn.GELU, nn.LeakyReLU, nn.PReLU, nn.ReLU)) or \
                type(m).__name__.endswith("Activation"):
            saved.append((m, m.__dict__.get("forward")))
            # lxt's rule reads its input after calling f: an in-place activation (MONAI's
            # LeakyReLU) must get a copy, or the ratio f(x)/x becomes 1 everywhere
            m.forward = lambda x, f=m.forward: identity_rule_implicit(lambda t: f(t.clone()), x)
        if hasattr(m, "fused_attn"):
            saved.append((m, ("fused_attn", m.fused_attn)))
            m.fused_attn = True
        if hasattr(m, "use_flash_attention"):
            saved.append((m, ("use_flash_attention", m.use_flash_attention)))
            m.use_flash_attention = True
    sdpa = F.scaled_dot_product_attention

    def uniform(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        return sdpa(divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
                    attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, **kwargs)
    F.scaled_dot_product_attention = uniform
    try:
        xx = x.clone().requires_grad_(True)
        with torch.enable_grad():
            score(xx).sum().backward()
    finally:
        F.scaled_dot_product_attention = sdpa
        for m, old in reversed(saved):
            if isinstance(old, tuple):
                setattr(m, *old)
            elif old is None:
                del m.forward
            else:
                m.forward = old
    return (xx * xx.grad).detach()


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, method: str, against: str) -> None:
    record(method, against, ours, ref, what)
    assert ref.abs().max() > 0, f"{what}: degenerate reference"
    diff = (ours - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
    assert diff <= TOL, f"{what}: relative difference {diff:.2e}"


def _run_cell(case: Case, family: str, model, peer, x, target, cls) -> str:
    method = FAMILIES[family]
    if family in case.refusals:
        with pytest.raises((ConfigError, ModelError), match=case.refusals[family]) as caught:
            pellucid.explain(model, x, method, target=target)
        assert len(str(caught.value).splitlines()) == 1
        return f"refused: {case.refusals[family]}"
    if family == "cam":
        layer = case.cam_layer or default_layer(model, x[:1])
        # the peer resizes 3D maps with scipy's cubic spline (pellucid's upsample="bspline")
        options = {"upsample": "bspline"} if x.ndim == 5 else {}
        ours = pellucid.explain(model, x, method, target=target, layer=layer, **options)
        _close(ours.attributions.float(), _gradcam_reference(case, model, peer, x, layer, cls),
               f"{case.name} gradcam", "gradcam", peers.peer("grad-cam", "GradCAM"))
        spline = ', `upsample="bspline"`' if x.ndim == 5 else ""
        return f"= pytorch-grad-cam ({ours.extras['layout'].split(',')[0]}{spline})"
    if family == "attention":
        ours = pellucid.explain(model, x, method, target=target, normalize="none")
        chefer = pellucid.explain(model, x, "chefer", target=target, normalize="none")
        layout = ours.extras["layout"]
        prefix = int(re.search(r"(\d+) prefix", layout).group(1)) if "prefix" in layout else 0
        rollout_ref, chefer_ref = _attention_references(case, model, x, cls, prefix,
                                                        tuple(ours.raw.shape[2:]))
        own = "a computation from the library's own attention weights"
        _close(ours.raw.float(), rollout_ref, f"{case.name} rollout", "rollout", own)
        _close(chefer.raw.float(), chefer_ref, f"{case.name} chefer", "chefer", own)
        return "= the library's own attention weights (rollout and `chefer`)"
    if family == "gradient":
        from captum.attr import Saliency

        ours = pellucid.explain(model, x, method, target=target)
        ref = Saliency(_score_fn(peer, case.task, cls)).attribute(x, abs=True)
        _close(ours.raw, ref, case.name, "saliency", peers.peer("captum", "Saliency"))
        return "= Captum"
    if family == "relevance":
        # in float64: relevance rules divide by activations, and over a deep network (UNETR: 12
        # blocks and a decoder) float32 rounding alone moves them by 8e-4 (7.8e-7 in float64)
        import copy

        from pellucid.explainers.base import attention_blocks

        model, x = copy.deepcopy(model).double(), x.double()
        peer = _Tensor(model).eval()
        transformer = bool(attention_blocks(model))
        ours = pellucid.explain(model, x, method, target=target)
        against = (peers.peer("lxt", "AttnLRP") if transformer
                   else peers.peer("zennit", "EpsilonPlusFlat"))
        _close(ours.raw, _lrp_reference(case, model, peer, x, cls, transformer), f"{case.name} lrp",
               "lrp", against)
        return "= lxt (AttnLRP rules)" if transformer else "= zennit"
    from captum.attr import Occlusion

    w = case.window
    ours = pellucid.explain(model, x, method, target=target, window=w, stride=w)
    ref = Occlusion(_score_fn(peer, case.task, cls)).attribute(
        x, sliding_window_shapes=(x.shape[1],) + (w,) * (x.ndim - 2),
        strides=(x.shape[1],) + (w,) * (x.ndim - 2), baselines=0.0)
    _close(ours.raw, ref, case.name, "occlusion", peers.peer("captum", "Occlusion"))
    return "= Captum"


def _onnx_row(tmp: Path) -> dict[str, str]:
    """The timm ConvNeXt exported to ONNX and run by ONNX Runtime as a black box."""
    from captum.attr import Occlusion

    from pellucid.models.blackbox import load_onnx

    model = _convnext().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x[:1], str(tmp / "convnext.onnx"), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    box = load_onnx(tmp / "convnext.onnx")
    row = {}
    for family, method in FAMILIES.items():
        if family == "perturbation":
            ours = pellucid.explain(box, x, method, target=1, window=16, stride=16)
            ref = Occlusion(lambda t: model(t)[:, 1]).attribute(
                x, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16), baselines=0.0)
            _close(ours.raw, ref, "ONNX ConvNeXt", "occlusion", peers.peer("captum", "Occlusion"))
            row[family] = "= Captum on the PyTorch model"
            continue
        with pytest.raises(ModelError, match="only runs forward"):
            pellucid.explain(box, x, method, target=1)
        row[family] = "refused: only runs forward"
    return row


def _table(rows: dict[str, tuple[str, dict[str, str]]]) -> str:
    head = "| model | library | " + " | ".join(f"{f} (`{m}`)" for f, m in FAMILIES.items()) + " |"
    lines = [head, "|" + "---|" * (len(FAMILIES) + 2)]
    for name, (library, cells) in rows.items():
        lines.append(f"| {name} | {library} | " + " | ".join(cells[f] for f in FAMILIES) + " |")
    return "\n".join(lines)


BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


def test_support_matrix(tmp_path):
    rows: dict[str, tuple[str, dict[str, str]]] = {}
    for case in CASES:
        model = case.build().eval()
        x = torch.randn(2 if len(case.shape) == 3 else 1, *case.shape,
                        generator=torch.Generator().manual_seed(3))
        cls = 1
        target = cls if case.task == "classification" else SegmentationTarget(cls, region="all")
        peer = _Tensor(model).eval()
        cells = {}
        for family in FAMILIES:
            cells[family] = _run_cell(case, family, model, peer, x, target, cls)
        rows[case.name] = (case.library, cells)
    rows["ONNX export (timm ConvNeXt)"] = ("onnxruntime", _onnx_row(tmp_path))
    table = _table(rows)
    doc_path = ROOT / "docs" / "models.md"
    doc = doc_path.read_text()
    start, stop = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    current = doc[start:stop].strip()
    if os.environ.get("PELLUCID_WRITE_DOCS") == "1":
        doc_path.write_text(doc[:start] + "\n" + table + "\n" + doc[stop:])
    else:
        assert current == table, "docs/models.md's support matrix differs from this test's " \
                                 "results; rewrite it with PELLUCID_WRITE_DOCS=1"


# --- timm layouts, AttnLRP against lxt ----------------------------------------------------------

def _gradcam_peer(method, model, layer, x, target, reshape):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * len(x))


def test_timm_vit_with_register_tokens_and_convnext():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3,
                            reg_tokens=4, depth=2).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    layer = default_layer(vit, x[:1])
    assert layer == "blocks.1.norm1"
    ours = pellucid.explain(vit, x, "gradcam", target=0, layer=layer)
    assert ours.extras["layout"] == "tokens, grid 4x4, 5 prefix token(s) dropped"

    def reshape(t):
        return t[:, 5:, :].reshape(t.size(0), 4, 4, t.size(2)).permute(0, 3, 1, 2)
    ref = _gradcam_peer("gradcam", vit, vit.get_submodule(layer), x, 0, reshape)
    assert np.abs(ours.attributions[:, 0].numpy() - ref).max() <= TOL
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    layer = default_layer(convnext, x[:1])
    assert layer.startswith("stages")  # the last stage (or the Sequential of stages ending there)
    ours = pellucid.explain(convnext, x, "gradcam", target=0, layer=layer)
    ref = _gradcam_peer("gradcam", convnext, convnext.get_submodule(layer), x, 0, None)
    assert np.abs(ours.attributions[:, 0].numpy() - ref).max() <= TOL


def _restore_classes(saved: dict) -> None:
    for cls, forward in saved.items():
        if forward is None:
            cls.__dict__.get("forward") and delattr(cls, "forward")
        else:
            cls.forward = forward
        if "original_forward" in cls.__dict__:
            delattr(cls, "original_forward")


def test_attnlrp_equals_lxt_monkey_patched_hugging_face_vit():
    """lxt's own patches (its attention wrapper, LayerNorm and activation rules) on the Hugging
    Face ViT module, undone afterwards: pellucid's AttnLRP gives the same relevance."""
    from functools import partial

    from lxt.efficient import monkey_patch
    from lxt.efficient.patches import (
        layer_norm_forward,
        non_linear_forward,
        patch_attention,
        patch_method,
    )
    from transformers.models.vit import modeling_vit

    model = _hf_vit().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    ours = pellucid.explain(model, x, "lrp", target=1)
    assert ours.extras["rules"] == "AttnLRP (attnlrp)"
    act = type(model.vit.encoder.layer[0].intermediate.intermediate_act_fn)
    saved_functions = (modeling_vit.eager_attention_forward, modeling_vit.ALL_ATTENTION_FUNCTIONS)
    saved = {nn.LayerNorm: nn.LayerNorm.__dict__.get("forward"), act: act.__dict__.get("forward")}
    try:
        monkey_patch(modeling_vit, {modeling_vit: patch_attention,
                                    nn.LayerNorm: partial(patch_method, layer_norm_forward),
                                    act: partial(patch_method, non_linear_forward, keep_original=True)})
        xx = x.clone().requires_grad_(True)
        model(xx).logits[:, 1].sum().backward()
        ref = (xx * xx.grad).detach()
    finally:
        modeling_vit.eager_attention_forward, modeling_vit.ALL_ATTENTION_FUNCTIONS = saved_functions
        _restore_classes(saved)
    _close(ours.raw, ref, "Hugging Face ViT, AttnLRP", "lrp", peers.peer("lxt", "AttnLRP"))
    # the classes are as they were: a plain forward equals the reference logits
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ours.output, atol=1e-6)


def test_cp_lrp_equals_lxt_on_torchvision_vit_and_conserves_without_biases():
    """lxt's CP-LRP patch map for torchvision's ViT; with every bias, the class token and the
    position embedding at zero the relevance sums to the logit (CP-LRP is conservative). AttnLRP's
    softmax rule hands relevance to a bias term by construction (Achtibat et al., Eq. 11): its sum
    is reported, not asserted equal."""
    import torchvision
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.vit_torch import cp_LRP

    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    ours = pellucid.explain(model, x, "lrp", target=1, attention="cp")
    saved = {c: c.__dict__.get("forward") for c in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)}
    try:
        monkey_patch(torchvision.models.vision_transformer, cp_LRP)
        xx = x.clone().requires_grad_(True)
        model(xx)[:, 1].sum().backward()
        ref = (xx * xx.grad).detach()
    finally:
        _restore_classes(saved)
    _close(ours.raw, ref, "torchvision ViT, CP-LRP", "lrp", peers.peer("lxt", "CP-LRP"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("class_token", "encoder.pos_embedding"):
                p.zero_()
    cp = pellucid.explain(model, x, "lrp", target=1, attention="cp")
    assert torch.allclose(cp.extras["conservation"], torch.ones(2), atol=1e-4)
    attn = pellucid.explain(model, x, "lrp", target=1)
    assert torch.isfinite(attn.extras["conservation"]).all()


def test_import_model_records_the_library_and_the_output_and_explains_through_them(tmp_path):
    """module:factory of a Hugging Face ViT and an nnU-Net with deep supervision: the card records
    the library and the output selector, and the loaded model explains through them."""
    from pellucid.cli import main
    from pellucid.models import load_model
    from tests.factories import hf_vit, nnunet_2d

    torch.manual_seed(2)
    vit = hf_vit().eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    main(["import-model", "tests.factories:hf_vit", "--weights", str(tmp_path / "vit.pt"), "--out",
          str(tmp_path / "vit"), "--task", "classification", "--classes", "no,yes", "--activation",
          "softmax", "--input-size", "64,64", "--output", "logits"])
    loaded = load_model(tmp_path / "vit")
    import transformers

    assert loaded.card.library == f"transformers {transformers.__version__}"
    assert loaded.card.output == "logits" and loaded.card.default_layer.endswith("layernorm_before")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    exp = pellucid.explain(loaded, x, "gradcam", target=1)
    with torch.no_grad():
        assert torch.allclose(exp.output, vit(x).logits, atol=1e-5)
    unet = nnunet_2d().eval()
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    main(["import-model", "tests.factories:nnunet_2d", "--weights", str(tmp_path / "unet.pt"),
          "--out", str(tmp_path / "unet"), "--task", "segmentation", "--classes", "bg,lesion",
          "--activation", "softmax", "--input-size", "32,32"])
    seg = load_model(tmp_path / "unet")
    assert seg.card.library.startswith("dynamic_network_architectures")
    assert seg.card.default_layer.startswith("decoder.stages")  # not a deep-supervision head
    x = torch.randn(1, 1, 32, 32)
    exp = pellucid.explain(seg, x, "gradcam", target=SegmentationTarget(1, region="all"))
    with torch.no_grad():
        assert torch.allclose(exp.output, unet(x)[0], atol=1e-5)


def test_torchxrayvision_calibration_becomes_the_cards_operating_points(tmp_path):
    """A TorchXRayVision network calibrated by op_threshs returns op_norm(sigmoid(z)), already
    rescaled probabilities. Imported, it returns the logits z, and the op_threshs become the card's
    thresholds (NaN, a class the calibration does not cover, becomes no operating point): the
    same decisions, and no sigmoid applied twice."""
    from pellucid.cli import main
    from pellucid.models import load_model
    from pellucid.pipeline.outputs import findings
    from tests.factories import xrv_densenet

    torch.manual_seed(4)
    net = xrv_densenet().eval()
    op = torch.rand(18) * 0.6 + 0.2
    op[3] = float("nan")
    net.op_threshs = op
    torch.save(net.state_dict(), tmp_path / "xrv.pt")
    names = [f"finding{i}" for i in range(18)]
    main(["import-model", "tests.factories:xrv_densenet", "--weights", str(tmp_path / "xrv.pt"),
          "--out", str(tmp_path / "xrv"), "--task", "classification", "--classes", ",".join(names),
          "--input-size", "224,224"])
    loaded = load_model(tmp_path / "xrv")
    card = loaded.card
    assert card.activation == "sigmoid" and card.thresholds[3] is None
    assert card.thresholds[0] == pytest.approx(float(op[0]))
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(13)) * 2048 - 1024
    with torch.no_grad():
        calibrated = net(x)  # TorchXRayVision's own output: 0.5 is each operating point
        logits = loaded.module(x)
    assert not torch.allclose(torch.sigmoid(logits), calibrated)
    finite = torch.isfinite(op)
    ours = torch.sigmoid(logits) >= torch.nan_to_num(op, nan=2.0)
    assert torch.equal(ours[:, finite], (calibrated >= 0.5)[:, finite])

    from types import SimpleNamespace

    result = SimpleNamespace(classes={n: float(torch.sigmoid(logits[0, i])) for i, n in enumerate(names)},
                             prediction={"index": 0})  # what the pipeline hands to findings()
    found = findings(card, result)
    assert found[3].present is None and found[3].threshold is None
    assert found[0].present == bool(ours[0, 0])


def test_nnunet_deep_supervision_through_the_sliding_window():
    """nnU-Net predicts patch-wise with Gaussian weights (sigma 1/8 of the patch) and a step of half
    a patch: pellucid's sliding window with mode gaussian and overlap 0.5. The deep-supervision list
    is stitched output by output and its full-resolution head is explained; on an input the size of
    one patch the window equals the network."""
    from pellucid.models.sliding import SlidingWindow
    from tests.factories import nnunet_2d

    torch.manual_seed(5)
    net = nnunet_2d().eval()
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(14))
    one = SlidingWindow(net, (32, 32), overlap=0.5, mode="gaussian").eval()
    with torch.no_grad():
        assert torch.allclose(reduce_output(one(x)), net(x)[0], atol=1e-5)
    big = torch.randn(1, 1, 64, 48, generator=torch.Generator().manual_seed(15))
    window = SlidingWindow(net, (32, 32), overlap=0.5, mode="gaussian").eval()
    target = SegmentationTarget(1, region="all")
    exp = pellucid.explain(window, big, "saliency", target=target)
    assert exp.attributions.shape == (1, 1, 64, 48) and exp.output.shape == (1, 2, 64, 48)
    with pytest.raises(ConfigError, match="once per patch"):
        pellucid.explain(window, big, "gradcam", target=target)


def test_legrad_on_a_timm_vit_equals_the_formula_through_the_models_own_norm_and_head():
    """torchcam's LeGrad takes only torchvision's blocks (``self_attention``); on timm's ViT the
    reference is the formula written out with autograd (tests/test_legrad.py)."""
    from tests.test_legrad import legrad_formula

    model = _timm_vit().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for pool in ("mean", "token"):
        ours = pellucid.explain(model, x, "legrad", target=ClassTarget([0, 2]), pool=pool)
        ref = legrad_formula(model, x, [0, 2], list(model.blocks), model.norm, model.head, pool, 1,
                             (4, 4))
        record("legrad", f"the paper's formula (autograd), {pool} readout", ours.raw[:, 0], ref,
               "timm ViT-Tiny")
        assert ref.std() > 0.05 and (ours.raw[:, 0] - ref).abs().max() <= 1e-4
