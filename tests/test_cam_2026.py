"""The CAM variants pytorch-grad-cam 1.5.7 added in 2026 (KPCA-CAM, ShapleyCAM, Finer-CAM) equal
the peer within 1e-4 of the map (min-max normalised, so of its scale): on a 2D ResNet-18 with a
softmax head, a torchvision ViT (tokens, through the peer's ``reshape_transform``), a 3D MONAI ResNet
(the peer resizes with scipy's cubic spline: ``upsample="bspline"``) and, for ShapleyCAM, a U-Net
with the peer's ``SemanticSegmentationTarget``. ShapleyCAM's Hessian term is checked to matter
(its map differs from Grad-CAM's under the ReST score) and to vanish where it must (a logit target
of a network piecewise linear after the layer gives Grad-CAM exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import KPCA_CAM, FinerCAM, ShapleyCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, SemanticSegmentationTarget

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record

TOL = 1e-4
CLASSES = (1, 2, 0)
PEERS = {"kpcacam": KPCA_CAM, "shapleycam": ShapleyCAM, "finercam": FinerCAM}


def _reference(method: str, model, layer: str, x: torch.Tensor, reshape=None) -> np.ndarray:
    """The peer's map: KPCA-CAM class-agnostic, ShapleyCAM on the ReST target of each sample's
    class, Finer-CAM with ``target_idx`` (one sample at a time: the peer takes one index)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    module = model.get_submodule(layer)
    # the peer's ShapleyCAM differentiates twice: attention needs the math kernel (the fused CPU
    # kernel has no double backward), as pellucid runs it
    with PEERS[method](model=model, target_layers=[module], reshape_transform=reshape) as cam, \
            sdpa_kernel([SDPBackend.MATH]):
        if method == "kpcacam":
            return cam(input_tensor=x, targets=None)
        if method == "shapleycam":
            return cam(input_tensor=x, targets=[ClassifierOutputReST(c) for c in CLASSES[:len(x)]])
        return np.concatenate([cam(input_tensor=x[i:i + 1], target_idx=c)
                               for i, c in enumerate(CLASSES[:len(x)])])


def _check(method: str, model, layer: str, x: torch.Tensor, reshape=None, **options) -> np.ndarray:
    if method == "kpcacam":
        options.setdefault("sign", "largest")  # scikit-learn's sign, the peer's
    target = ClassTarget(list(CLASSES[:len(x)]), activation="softmax")
    ours = pellucid.explain(model, x, method, target=target, layer=layer, **options)
    ours = ours.attributions[:, 0].numpy()
    ref = _reference(method, model, layer, x, reshape)
    assert ours.shape == ref.shape and ref.std() > 0.01, "degenerate reference map"
    diff = float(np.abs(ours - ref).max())
    record(method, peer("grad-cam", PEERS[method].__name__), ours, ref,
           f"{type(model).__name__} {tuple(x.shape)}")
    assert diff <= TOL, f"{method}: max abs difference {diff}"
    return ours


@pytest.mark.parametrize("method", list(PEERS))
def test_resnet18_softmax_head(method):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    _check(method, model, "layer3" if method == "shapleycam" else "layer4", x)


VIT_LAYER = "encoder.layers.encoder_layer_1.ln_1"  # (B, 1 + 16 tokens, C)


def _vit():
    """torchvision's ViT (2 blocks, 64 px, 16 px patches: a 4 x 4 grid and a class token)."""
    from tests.test_transformers import tiny_vit

    vit = tiny_vit(classes=5, size=64, patch=16)
    return vit, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def _tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
    return t[:, 1:, :].reshape(t.size(0), 4, 4, t.size(2)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("method", ["kpcacam", "finercam"])
def test_vit_tokens(method):
    vit, x = _vit()
    _check(method, vit, VIT_LAYER, x, _tokens_to_grid)


def test_shapleycam_on_vit_tokens_equals_the_papers_formula():
    """The peer's ShapleyCAM cannot take tokens (its map step gets the un-reshaped (B, N, C)
    activations and raises "Invalid activation shape"), so the reference is the paper's formula
    computed here with autograd on the token layer: w = mean over the patch tokens of
    g - H A / 2 for the ReST score, map = ReLU(sum_k w_k A_k), resized and scaled by the peer's
    ``scale_cam_image``."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vit, x = _vit()
    layer = vit.get_submodule(VIT_LAYER)
    store = {}

    def hook(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        store["a"] = leaf
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            out = vit(x)
            rest = out[[0, 1], [1, 2]] - torch.nn.functional.cross_entropy(
                out, torch.tensor([1, 2]), reduction="none")
            (g,) = torch.autograd.grad(rest.sum(), [store["a"]], create_graph=True)
            (hvp,) = torch.autograd.grad(g, [store["a"]], grad_outputs=store["a"].detach())
    finally:
        handle.remove()
    a, w = _tokens_to_grid(store["a"].detach()), _tokens_to_grid((g - 0.5 * hvp).detach())
    cam = torch.relu((w.mean((2, 3), keepdim=True) * a).sum(1)).numpy()
    ref = scale_cam_image(np.maximum(scale_cam_image(cam, (64, 64)), 0))  # as its layer step
    # and its aggregation over layers scale the map
    ours = pellucid.explain(vit, x, "shapleycam", target=ClassTarget([1, 2], activation="softmax"),
                            layer=VIT_LAYER).attributions[:, 0].numpy()
    record("shapleycam", "the paper's formula (autograd)", ours, ref, "torchvision ViT tokens")
    assert ref.std() > 0.01 and np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("method", list(PEERS))
def test_3d_monai_resnet(method):
    torch.manual_seed(0)
    model = build("resnet18", 3, 1, 4).module.eval()
    x = torch.randn(2, 1, 48, 48, 48, generator=torch.Generator().manual_seed(2))
    _check(method, model, "layer3", x, upsample="bspline")


def test_shapleycam_on_a_unet_region_equals_the_peers_segmentation_target(brain_unet):
    from pellucid.data import BrainPhantom

    ds = BrainPhantom(8, 64, seed=21)
    x = torch.stack([ds[i]["image"] for i in range(8) if ds[i]["label"].item() == 1][:2])
    model, layer = brain_unet.module, "model.1.submodule.2"
    with torch.no_grad():
        masks = (model(x)[:, 0] > 0).float()
    ours = pellucid.explain(model, x, "shapleycam", target=SegmentationTarget(0, masks), layer=layer,
                            score="target").attributions[:, 0].numpy()
    cam = ShapleyCAM(model=model, target_layers=[model.get_submodule(layer)])
    ref = cam(input_tensor=x, targets=[SemanticSegmentationTarget(0, m.numpy()) for m in masks])
    try:  # the peer's clean-up detaches its stored gradients in place, which fails on views here
        cam.activations_and_grads.release()
    except RuntimeError:
        for handle in cam.activations_and_grads.handles:
            handle.remove()
    record("shapleycam", peer("grad-cam", "ShapleyCAM"), ours, ref, "MONAI UNet region")
    assert ref.std() > 0.01 and np.abs(ours - ref).max() <= TOL


def test_the_hessian_term_matters_under_rest_and_vanishes_where_it_must():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    target = ClassTarget([1, 2], activation="softmax")

    def raw(method, **options):
        return pellucid.explain(model, x, method, target=target, layer="layer4", relu=False,
                                normalize="none", **options).raw

    grad = raw("gradcam")
    # the logit of a network that is linear after layer4 (pooling, fully connected): H A = 0
    assert torch.allclose(raw("shapleycam", score="target"), grad, atol=1e-6)
    # ReST adds log softmax: H A != 0 and the map moves (the peer agrees, test above)
    assert (raw("shapleycam") - grad).abs().max() > 1e-3 * grad.abs().max()


def test_finercam_and_kpcacam_refuse_what_they_do_not_define():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="softmax classification head"):
        pellucid.explain(model, x, "finercam", target=ClassTarget(0, activation="sigmoid"),
                         layer="layer4")
    with pytest.raises(ConfigError, match="kernel must be one of"):
        pellucid.explain(model, x, "kpcacam", layer="layer4", kernel="laplace")
    with pytest.raises(ConfigError, match="comparisons are ranks"):
        pellucid.explain(model, x, "finercam", layer="layer4", comparisons=(0,))
