"""Vision transformers: CAMs on token and channels-last layers equal pytorch-grad-cam with its
``reshape_transform`` (1e-4); the layout is never guessed on the wrong axis; attention rollout and
gradient-weighted attention equal a hand computation on a 2-layer, 2-head ViT; outputs that are
not tensors are reduced by the documented rule or ``output=``."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import pellucid
from pellucid.errors import ConfigError, ModelError
from pellucid.explainers import default_layer
from pellucid.explainers.layouts import detect_layout
from pellucid.models.outputs import reduce_output, select_output

PEERS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM,
         "hirescam": HiResCAM, "layercam": LayerCAM, "scorecam": ScoreCAM}
TOL = 1e-4


def tiny_vit(classes: int = 3, size: int = 32, patch: int = 8) -> nn.Module:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=size, patch_size=patch, num_layers=2, num_heads=2,
                            hidden_dim=16, mlp_dim=32, num_classes=classes).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return vit


def small_swin() -> nn.Module:
    """torchvision's Swin, four stages of one block (channels-last stage outputs, as swin_t's)."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1],
                           num_heads=[1, 1, 2, 2], window_size=[4, 4], num_classes=3).eval()


def _tokens_to_maps(grid):
    def transform(t):  # the peer's documented ViT reshape_transform
        r = t[:, 1:, :].reshape(t.size(0), grid[0], grid[1], t.size(2))
        return r.transpose(2, 3).transpose(1, 2)
    return transform


def _peer(method, model, layer, x, target, reshape):
    with PEERS[method](model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        cam.batch_size = 64
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * len(x))


@pytest.mark.parametrize("method", list(PEERS))
def test_cams_on_vit_tokens_equal_the_peer_with_its_reshape_transform(method):
    model = tiny_vit(size=64, patch=16)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    layer = default_layer(model, x[:1])
    assert layer == "encoder.layers.encoder_layer_1.ln_1"  # the last block's first norm
    ours = pellucid.explain(model, x, method, target=2, layer=layer)
    assert ours.extras["layout"] == "tokens, grid 4x4, 1 prefix token(s) dropped"
    ref = _peer(method, model, model.get_submodule(layer), x, 2, _tokens_to_maps((4, 4)))
    assert ref.std() > 0.01
    assert np.abs(ours.attributions[:, 0].numpy() - ref).max() <= TOL


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "scorecam", "layercam"])
def test_cams_on_swin_channels_last_equal_the_peer_with_the_permuting_transform(method):
    model = small_swin()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    ours = pellucid.explain(model, x, method, target=1, layer="features.7")
    assert ours.extras["layout"] == "channels_last, grid 4x4"
    ref = _peer(method, model, model.features[7], x, 1, lambda t: t.permute(0, 3, 1, 2))
    assert ref.std() > 0.01
    assert np.abs(ours.attributions[:, 0].numpy() - ref).max() <= TOL
    # what pellucid used to do, and the peer does without the transform: read (B, H, W, C) as
    # channels-first. It is a different map; pellucid no longer computes it unless told so
    wrong = _peer(method, model, model.features[7], x, 1, None) if method != "scorecam" else None
    if wrong is not None:
        assert np.abs(wrong - ref).max() > 0.1


class _ChannelsLastNet(nn.Module):
    """conv -> (B, H, W, C) feature 'feat' -> back to channels-first -> pool -> linear. At 64 px
    the feature is (B, 32, 32, 32): either axis could be the channels."""

    def __init__(self, fixed_size: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 32, 3, stride=2, padding=1)
        self.feat = nn.Identity()
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 2)
        self.fixed_size = fixed_size

    def forward(self, x):
        if self.fixed_size and x.shape[-1] != 64:
            raise RuntimeError("this model takes 64 x 64 inputs only")
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.feat(torch.relu(y))
        y = self.mix(y)  # channels-last linear over C
        return self.head(y.mean((1, 2)))


def test_an_ambiguous_channels_last_layer_is_settled_by_a_larger_input_or_refused():
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    model = _ChannelsLastNet().eval()
    ours = pellucid.explain(model, x, "gradcam", target=1, layer="feat")
    assert ours.extras["layout"] == "channels_last, grid 32x32"
    ref = _peer("gradcam", model, model.feat, x, 1, lambda t: t.permute(0, 3, 1, 2))
    assert np.abs(ours.attributions[:, 0].numpy() - ref).max() <= TOL
    fixed = _ChannelsLastNet(fixed_size=True).eval()
    with pytest.raises(ConfigError, match=r"could be the first or the last.*layout="):
        pellucid.explain(fixed, x, "gradcam", target=1, layer="feat")
    stated = pellucid.explain(fixed, x, "gradcam", target=1, layer="feat", layout="channels_last")
    assert np.abs(stated.attributions[:, 0].numpy() - ref).max() <= TOL


def test_layout_detection_refuses_what_it_cannot_tell():
    assert detect_layout((2, 512, 2, 2), (64, 64)).kind == "channels_first"
    assert detect_layout((2, 2, 2, 768), (64, 64)).kind == "channels_last"
    assert detect_layout((2, 32, 16, 32, 32), (32, 64, 64)).kind == "channels_first"
    with pytest.raises(ConfigError, match="could be the first or the last"):
        detect_layout((2, 16, 16, 16), (64, 64))
    layout = detect_layout((2, 197, 768), (224, 224), patch=(16, 16))
    assert (layout.grid, layout.prefix) == ((14, 14), 1)
    assert detect_layout((2, 201, 384), (224, 224)).prefix == 5  # class + 4 register tokens
    with pytest.raises(ConfigError, match="no patch grid"):
        detect_layout((2, 300, 8), (64, 64))
    with pytest.raises(ConfigError, match="could be grid"):
        detect_layout((2, 5, 8), (48, 48))
    assert detect_layout((2, 5, 8), (48, 48), grid=(2, 2)).prefix == 1
    assert detect_layout((2, 5, 8), (48, 48), prefix_tokens=4).grid == (1, 1)


# --- attention rollout and gradient-weighted attention against a hand computation -------------

def _manual_vit(vit: VisionTransformer, x: torch.Tensor):
    """torchvision's ViT forward written out with explicit attention probabilities."""
    b = x.shape[0]
    t = vit._process_input(x)
    t = torch.cat([vit.class_token.expand(b, -1, -1), t], 1) + vit.encoder.pos_embedding
    probs = []
    for block in vit.encoder.layers:
        h = block.ln_1(t)
        mha = block.self_attention
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        heads, d = mha.num_heads, q.shape[-1] // mha.num_heads

        def split(z, heads=heads, d=d):
            return z.reshape(b, -1, heads, d).transpose(1, 2)
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), -1)
        probs.append(a)
        o = (a @ split(v)).transpose(1, 2).reshape(b, -1, heads * d)
        t = t + mha.out_proj(o)
        t = t + block.mlp(block.ln_2(t))
    return vit.heads(vit.encoder.ln(t)[:, 0]), probs


def test_attention_rollout_and_gradient_equal_a_hand_computation_on_a_2_layer_2_head_vit():
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    logits, probs = _manual_vit(vit, x)
    with torch.no_grad():
        assert torch.allclose(logits, vit(x), atol=1e-5)  # the written-out forward is the model's
    target = 1
    grads = torch.autograd.grad(logits[:, target].sum(), probs)
    a = [p.detach().numpy().astype(np.float64) for p in probs]
    g = [q.numpy().astype(np.float64) for q in grads]
    eye = np.eye(17)
    for i in range(2):
        rollout = eye
        chefer = eye
        for layer in range(2):
            fused = 0.5 * a[layer][i].mean(0) + 0.5 * eye
            fused = fused / fused.sum(-1, keepdims=True)
            rollout = fused @ rollout
            chefer = chefer + np.maximum(g[layer][i] * a[layer][i], 0).mean(0) @ chefer
        for method, rel in (("rollout", rollout), ("chefer", chefer)):
            exp = pellucid.explain(vit, x, method, target=target, normalize="none")
            assert exp.raw.shape == (2, 1, 4, 4)
            np.testing.assert_allclose(exp.raw[i, 0].numpy().ravel(), rel[0, 1:], rtol=1e-4,
                                       atol=1e-6)
    assert pellucid.explain(vit, x, "rollout").extras["attention_layers"] == 2


def test_attention_methods_refuse_windowed_attention_and_cnns():
    swin = small_swin()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="not global self-attention"):
        pellucid.explain(swin, x, "rollout")
    cnn = torchvision.models.resnet18(num_classes=3).eval()
    with pytest.raises(ModelError, match="no self-attention"):
        pellucid.explain(cnn, x, "chefer")


# --- outputs that are not a tensor -----------------------------------------------------------

@dataclasses.dataclass
class _Out:
    features: torch.Tensor
    logits: torch.Tensor


class _Wrapped(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        f = torch.relu(self.conv(x))
        logits = self.head(f.mean((2, 3)))
        if self.kind == "dict":
            return {"aux": logits * 0, "out": logits}
        if self.kind == "dataclass":
            return _Out(f, logits)
        if self.kind == "list":
            return [logits, logits * 0]
        return {"a": logits, "b": logits * 2}


@pytest.mark.parametrize("kind", ["dict", "dataclass", "list"])
def test_outputs_are_reduced_by_the_rule(kind):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    model = _Wrapped(kind).eval()
    plain = _Wrapped("list").eval()
    ours = pellucid.explain(model, x, "gradcam", target=1, layer="conv")
    ref = pellucid.explain(plain, x, "gradcam", target=1, layer="conv")
    assert torch.allclose(ours.attributions, ref.attributions)
    occl = pellucid.explain(model, x, "occlusion", target=1, window=4)
    assert torch.allclose(occl.attributions, pellucid.explain(plain, x, "occlusion", target=1,
                                                              window=4).attributions)
    assert not isinstance(model(x), torch.Tensor)  # the user's model is left as it was


def test_an_output_without_a_rule_asks_for_a_selector():
    x = torch.randn(2, 1, 16, 16)
    model = _Wrapped("ambiguous").eval()
    with pytest.raises(ModelError, match="entries a, b; say which to explain with output="):
        pellucid.explain(model, x, "saliency", target=0)
    select_output(model, "b")
    exp = pellucid.explain(model, x, "saliency", target=0)
    assert torch.allclose(exp.output, model(x)["b"])
    with pytest.raises(ModelError, match="no such entry"):
        reduce_output({"a": x}, "logits")


def test_the_selector_holds_outside_explanations_and_nested_uses_share_one_hook():
    from pellucid.models.outputs import forward_tensor, tensor_outputs

    x = torch.randn(2, 1, 16, 16)
    model = _Wrapped("dict").eval()
    with torch.no_grad():
        assert torch.equal(forward_tensor(model, x), model(x)["out"])  # the rule
        select_output(model, "aux")  # what training's predictions and the benchmark scan read too
        assert torch.equal(forward_tensor(model, x), model(x)["aux"])
        with tensor_outputs(model):
            with tensor_outputs(model):
                assert len(model._forward_hooks) == 1
            assert torch.equal(model(x), forward_tensor(model, x))  # still reduced
        assert not model._forward_hooks and isinstance(model(x), dict)
