"""LeGrad (pellucid.explainers.legrad) against torchcam 0.5.0's ``LeGrad`` on torchvision's ViT: the
patch-grid map within 1e-4 of its [0, 1] scale (measured 2e-7), over every block and over the last
one; the class-token readout (and, in test_model_libraries, timm's ViT, which torchcam cannot take)
checked against the formula written out with autograd; a CNN refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchcam.methods import LeGrad

import pellucid
from pellucid.errors import ConfigError
from pellucid.targets import ClassTarget
from tests.peers import peer, record
from tests.test_transformers import tiny_vit

TOL = 1e-4


def _inputs():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("blocks", [None, 1])
def test_legrad_equals_torchcam_on_a_torchvision_vit(blocks):
    vit, x = tiny_vit(classes=5, size=64, patch=16), _inputs()
    ours = pellucid.explain(vit, x, "legrad", target=ClassTarget([1, 3]), blocks=blocks)
    layers = list(vit.encoder.layers)[-(blocks or len(vit.encoder.layers)):]
    with LeGrad(vit, layers) as extractor:
        ref = extractor([1, 3], vit(x))[0]
    assert ref.std() > 0.05, "degenerate reference"
    record("legrad", peer("torchcam", "LeGrad"), ours.raw[:, 0], ref,
           f"torchvision ViT, {len(layers)} block(s)")
    assert (ours.raw[:, 0] - ref).abs().max() <= TOL
    assert ours.attributions.shape == (2, 1, 64, 64) and ours.extras["blocks"] == len(layers)


def legrad_formula(model, x, classes, blocks, norm, head, pool: str, prefix: int,
                   grid: tuple[int, int]) -> torch.Tensor:
    """LeGrad written out with autograd: each block's attention probabilities and tokens captured,
    ReLU(d s_l / d A_l) averaged over heads and queries, over the blocks, min-max scaled."""
    from pellucid.explainers.attention import _layers, capture_attention

    tokens = []
    hooks = [b.register_forward_hook(lambda m, i, o: tokens.append(o)) for b in blocks]
    try:
        with torch.enable_grad(), capture_attention(model) as captured:
            model(x.clone().requires_grad_(True))
            attn = _layers(captured, len(x))
            maps = []
            for z, a in zip(tokens, attn, strict=True):
                pooled = z.mean(1) if pool == "mean" else z[:, 0]
                s = head(norm(pooled))[range(len(x)), classes].sum()
                (g,) = torch.autograd.grad(s, a, retain_graph=True)
                maps.append(g.clamp_min(0).mean((1, 2))[:, prefix:])
    finally:
        for h in hooks:
            h.remove()
    out = torch.stack(maps).mean(0).reshape(len(x), *grid)
    out = out - out.flatten(1).amin(1).view(-1, 1, 1)
    return out / (out.flatten(1).amax(1).view(-1, 1, 1) + 1e-8)


def test_class_token_readout_is_the_formula_and_other_models_are_refused():
    vit, x = tiny_vit(classes=5, size=64, patch=16), _inputs()
    ours = pellucid.explain(vit, x, "legrad", target=ClassTarget([1, 3]), pool="token")
    grid = legrad_formula(vit, x, [1, 3], list(vit.encoder.layers), vit.encoder.ln, vit.heads,
                          "token", 1, (4, 4))
    record("legrad", "the paper's formula (autograd), class-token readout", ours.raw[:, 0], grid,
           "torchvision ViT")
    assert (ours.raw[:, 0] - grid).abs().max() <= TOL
    # MONAI's ViT, pellucid's zoo ViT (its head reads the class token)
    from pellucid.models import build

    torch.manual_seed(0)
    monai_vit = build("vit", 2, 1, 3, input_size=[32, 32]).module.eval()
    img = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    for pool in ("mean", "token"):
        got = pellucid.explain(monai_vit, img, "legrad", target=ClassTarget([0, 2]), pool=pool)
        ref = legrad_formula(monai_vit, img, [0, 2], list(monai_vit.blocks), monai_vit.norm,
                             monai_vit.classification_head, pool, 1, (4, 4))
        record("legrad", f"the paper's formula (autograd), {pool} readout", got.raw[:, 0], ref,
               "MONAI ViT")
        assert ref.std() > 0.01 and (got.raw[:, 0] - ref).abs().max() <= TOL
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="final norm and head"):
        pellucid.explain(cnn, x, "legrad", target=ClassTarget(0))
