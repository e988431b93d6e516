"""The class activation map (CAM) family: one base class, each variant says only how its map is
combined from the target layer's activations A (B, C, *low) and gradients g = dy/dA.

==============  ======================================================================  ==========
method          map (before ReLU, up-sampling and min-max)                              paper
==============  ======================================================================  ==========
gradcam         sum_k w_k A_k,  w_k = mean_space(g_k)                                   Selvaraju 2017
gradcampp       sum_k w_k A_k,  w_k = sum_space(ReLU(g_k) alpha_k), alpha below        Chattopadhay 2018
xgradcam        sum_k w_k A_k,  w_k = sum_space(g_k A_k) / (sum_space(A_k) + 1e-7)      Fu 2020
hirescam        sum_k g_k * A_k (element-wise, no spatial averaging)                    Draelos 2020
layercam        sum_k ReLU(g_k) * A_k                                                   Jiang 2021
eigencam        projection of the centred activations on their first principal axis     Muhammad 2020
scorecam        sum_k w_k A_k,  w = softmax_k(y(x * norm(up(A_k))))                    Wang 2020
ablationcam     sum_k w_k A_k,  w_k = (y - y_{A_k=0}) / y                               Desai 2020
shapleycam      sum_k w_k A_k,  w_k = mean_space(g_k - (H A)_k / 2), score y + log a(y)    Cai 2025
finercam        Grad-CAM of sum_j p_j (y_c - alpha y_j) / sum_j p_j, j closest to c     Zhang 2025
kpcacam         first kernel principal component of the centred activations             Karmani 2024
reciprocam      map(p) = y(A masked to position p, all channels), no gradient           Byun 2022
==============  ======================================================================  ==========

Grad-CAM++ alpha (eq. 19 of the paper, read two ways):

- ``plusplus="eq19"`` (default; pytorch-grad-cam's reading):
  alpha = g^2 / (2 g^2 + (sum_space A) g^3 + 1e-6), alpha = 0 where g = 0
- ``plusplus="summed"`` (torch-cam, MONAI, M3d-CAM):
  alpha = g^2 / (2 g^2 + sum_space(A g^3) + 1e-6), alpha = 0 where g = 0

Everything runs batched on the inputs' device, 2D and 3D through one code path. The layer may
output channels-first maps, channels-last maps (Swin) or a token sequence (ViT): ``layout``,
``grid`` and ``prefix_tokens`` say which where :mod:`pellucid.explainers.layouts` cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pellucid.errors import ConfigError, ModelError
from pellucid.explainers.accelerate import AutoBatch
from pellucid.explainers.base import (
    Explainer,
    Explanation,
    ModelRunner,
    capture_layer,
    postprocess,
    replace_layer_output,
    resolve_layer,
)
from pellucid.explainers.layouts import LAYOUTS, FeatureLayout, detect_layout, grown_shape, patch_size
from pellucid.explainers.registry import register
from pellucid.targets import BoundTarget, Target


def _spatial(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def _expand(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.view(*w.shape, *([1] * (like.ndim - w.ndim)))


@dataclass
class CAM(Explainer):
    """Base class of the CAM family (not registered)."""

    relu: bool = True
    upsample: str = "linear"
    normalize: str = "minmax"
    layout: str = "auto"
    grid: tuple[int, ...] | None = None
    prefix_tokens: int | None = None

    family: ClassVar[str] = "cam"
    needs_layer: ClassVar[bool] = True
    uses_gradients: ClassVar[bool] = True
    # a Hessian-vector product H A of the score at the layer goes in ctx["hvp"] (ShapleyCAM)
    second_order: ClassVar[bool] = False

    def cam_score(self, bound: BoundTarget, output: torch.Tensor) -> torch.Tensor:
        """The score whose gradient the map is made of (one per sample); the target's by default."""
        return bound.score(output)

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor | None,
                        ctx: dict) -> torch.Tensor:
        """(B, C) weights of the activation channels."""
        raise TypeError(f"{type(self).__name__} must override channel_weights or combine")

    def combine(self, acts: torch.Tensor, grads: torch.Tensor | None, ctx: dict) -> torch.Tensor:
        """(B, *low) map; by default the weighted sum of activation channels."""
        weights = self.channel_weights(acts, grads, ctx)
        return (_expand(weights, acts) * acts).sum(1)

    def _explain(self, runner: ModelRunner, model: nn.Module, inputs: torch.Tensor,
                 target: Target | BoundTarget | None, layer: str | None,
                 handles: list) -> Explanation:
        _, module = resolve_layer(model, layer)
        store = capture_layer(module, handles, grad=self.uses_gradients)
        grads = hvp = None
        if self.uses_gradients:
            with torch.enable_grad(), _twice_differentiable(self.second_order):
                output = runner.forward(inputs)
                if "leaf" not in store:
                    raise ModelError(f"layer {layer!r} was not reached by the forward pass")
                bound = self.bind(target, output)
                scalar = self.cam_score(bound, output).sum()
                (grads,) = runner.backward(scalar, [store["leaf"]], create_graph=self.second_order)
                if self.second_order:
                    hvp = _hessian_vector(runner, grads, store["leaf"])
                    grads = grads.detach()
            output = output.detach()
        else:
            with torch.no_grad():
                output = runner.forward(inputs)
            bound = self.bind(target, output)
        if "activation" not in store:
            raise ModelError(f"layer {layer!r} was not reached by the forward pass")
        acts = store.pop("activation").float()  # float32 map arithmetic under autocast too
        grads = grads.float() if grads is not None else None
        store.clear()
        handles.pop().remove()
        layout = self.find_layout(model, module, layer, acts, inputs)
        ctx = {"runner": runner, "model": model, "module": module, "inputs": inputs,
               "target": bound, "output": output, "layout": layout, "layer_output": acts}
        acts = layout.to_channels_first(acts)
        grads = layout.to_channels_first(grads) if grads is not None else None
        if hvp is not None:
            ctx["hvp"] = layout.to_channels_first(hvp.float())
        with torch.no_grad():
            raw = self.combine(acts, grads, ctx)[:, None]
            maps = postprocess(raw, tuple(inputs.shape[2:]), self.relu, self.upsample,
                               self.normalize)
        return Explanation(maps, self.name, bound, layer, raw, output=output,
                           extras={"layout": layout.describe()})

    def find_layout(self, model: nn.Module, module: nn.Module, layer: str | None,
                    acts: torch.Tensor, inputs: torch.Tensor) -> FeatureLayout:
        """The layer output's layout (:mod:`pellucid.explainers.layouts`), or a one-line refusal."""
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        return detect_layout(tuple(acts.shape), tuple(inputs.shape[2:]), self.layout, self.grid,
                             self.prefix_tokens, patch_size(model), f"layer {layer!r}",
                             probe=lambda: grown_shape(model, module, inputs))


def _twice_differentiable(second_order: bool):
    """Attention through PyTorch's math kernel when a second derivative follows: the fused CPU
    kernel of ``scaled_dot_product_attention`` has no double backward (same values)."""
    import contextlib

    if not second_order:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _hessian_vector(runner: ModelRunner, grads: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """H A: the Hessian of the score at the layer times the layer's activations A, by a second
    backward pass through the gradient ``grads`` (built with ``create_graph``). Zero where the
    network after the layer is piecewise linear in A (the gradient does not depend on A)."""
    runner.cost.backward_passes += 1
    if not grads.requires_grad:
        return torch.zeros_like(leaf)
    (hvp,) = torch.autograd.grad(grads, [leaf], grad_outputs=leaf.detach(), allow_unused=True)
    return torch.zeros_like(leaf) if hvp is None else hvp.detach()


@register
@dataclass
class GradCAM(CAM):
    """Grad-CAM: channels weighted by their spatially averaged gradient (Selvaraju et al. 2017)."""

    name: ClassVar[str] = "gradcam"

    def channel_weights(self, acts, grads, ctx):
        return grads.mean(_spatial(grads))


@register
@dataclass
class GradCAMPlusPlus(CAM):
    """Grad-CAM++: positive gradients weighted by alpha (Chattopadhay et al. 2018), two readings."""

    plusplus: str = "eq19"
    name: ClassVar[str] = "gradcampp"

    def __post_init__(self) -> None:
        if self.plusplus not in ("eq19", "summed"):
            raise ConfigError(f"plusplus must be 'eq19' or 'summed', got {self.plusplus!r}")

    def channel_weights(self, acts, grads, ctx):
        dims = _spatial(grads)
        g2 = grads.pow(2)
        g3 = g2 * grads
        if self.plusplus == "eq19":
            denom_term = acts.sum(dims, keepdim=True) * g3
        else:
            denom_term = (acts * g3).sum(dims, keepdim=True)
        alpha = g2 / (2 * g2 + denom_term + 1e-6)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (grads.clamp_min(0) * alpha).sum(dims)


@register
@dataclass
class XGradCAM(CAM):
    """XGrad-CAM: gradients weighted by normalised activations (Fu et al. 2020)."""

    name: ClassVar[str] = "xgradcam"

    def channel_weights(self, acts, grads, ctx):
        dims = _spatial(grads)
        return (grads * acts / (acts.sum(dims, keepdim=True) + 1e-7)).sum(dims)


@register
@dataclass
class HiResCAM(CAM):
    """HiResCAM: element-wise gradient x activation summed over channels (Draelos & Carin 2020)."""

    name: ClassVar[str] = "hirescam"

    def combine(self, acts, grads, ctx):
        return (grads * acts).sum(1)


@register
@dataclass
class LayerCAM(CAM):
    """LayerCAM: positive gradients x activations, element-wise (Jiang et al. 2021)."""

    name: ClassVar[str] = "layercam"

    def combine(self, acts, grads, ctx):
        return (grads.clamp_min(0) * acts).sum(1)


def _against_activation(projection: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """(B,) whether each projection (B, N positions) correlates negatively with the
    channel-summed activation: the sign rule of ``sign="activation"`` (Eigen-CAM, KPCA-CAM)."""
    summed = torch.nan_to_num(acts).float().sum(1).reshape(acts.shape[0], -1)
    summed = summed - summed.mean(1, keepdim=True)
    return (projection.float() * summed).sum(1) < 0


@register
@dataclass
class EigenCAM(CAM):
    """Eigen-CAM: first principal component of the layer's activations (Muhammad & Yeasin 2020);
    class-agnostic, no gradients.

    A singular vector's sign is arbitrary (it differs between LAPACK builds), so ``sign`` fixes it:
    ``"activation"`` (default) makes the map correlate positively with the channel-summed
    activation; ``"max"`` flips it when |min| > |max| (Seg-Eigen-CAM, Chung & Ying 2025);
    ``"lapack"`` keeps whatever the SVD returned (pytorch-grad-cam's behaviour).
    """

    sign: str = "activation"
    name: ClassVar[str] = "eigencam"
    uses_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.sign not in ("activation", "max", "lapack"):
            raise ConfigError(f"sign must be 'activation', 'max' or 'lapack', got {self.sign!r}")

    def combine(self, acts, grads, ctx):
        b, c = acts.shape[:2]
        x = torch.nan_to_num(acts.reshape(b, c, -1).transpose(1, 2))  # (B, N, C)
        x = x - x.mean(1, keepdim=True)
        _, _, vh = torch.linalg.svd(x, full_matrices=True)
        projection = (x @ vh[:, 0, :, None])[..., 0]  # (B, N)
        if self.sign == "activation":
            flip = _against_activation(projection, acts)
        elif self.sign == "max":
            flip = projection.amin(1).abs() > projection.amax(1).abs()
        else:
            flip = torch.zeros(b, dtype=torch.bool, device=acts.device)
        projection = torch.where(flip[:, None], -projection, projection)
        return projection.reshape(b, *acts.shape[2:])


@register
@dataclass
class ScoreCAM(CAM):
    """Score-CAM: channel weights from the target score of the input masked by each up-sampled,
    min-max normalised activation map, soft-maxed over channels (Wang et al. 2020).

    Masked inputs are built ``batch_size`` at a time (peak memory bounded by it; by default tuned on
    a CPU, 128 on a GPU, see :class:`AutoBatch`), mixing samples in one batch, and run through an
    optimised inference copy of the model; channels whose map is constant give the all-zero input
    and are scored once.
    """

    batch_size: int | None = None
    name: ClassVar[str] = "scorecam"
    uses_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def channel_weights(self, acts, grads, ctx):
        runner, inputs, bound = ctx["runner"], ctx["inputs"], ctx["target"]
        b, c = acts.shape[:2]
        size = tuple(inputs.shape[2:])
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        flat = acts.flatten(2)
        constant = flat.amax(2) == flat.amin(2)  # (B, C): normalised map is all zero
        scores = torch.empty(b, c, device=acts.device, dtype=torch.float32)
        if constant.any():
            zero = runner.fast_forward(torch.zeros_like(inputs[:1]))
            zero_scores = bound.score(zero.expand(b, *zero.shape[1:]))
            scores[constant] = zero_scores[:, None].expand(b, c)[constant].float()
        rows, chans = torch.nonzero(~constant, as_tuple=True)
        for start, stop in AutoBatch(self.batch_size, ctx["model"], inputs).chunks(rows.numel()):
            r, ch = rows[start:stop], chans[start:stop]
            maps = F.interpolate(acts[r, ch][:, None], size=size, mode=mode, align_corners=True)
            lo = maps.flatten(1).amin(1).view(-1, *([1] * (maps.ndim - 1)))
            hi = maps.flatten(1).amax(1).view(-1, *([1] * (maps.ndim - 1)))
            maps = (maps - lo) / (hi - lo + 1e-8)
            out = runner.fast_forward(inputs[r] * maps)
            scores[r, ch] = bound.score(out, r).float()
        return torch.softmax(scores, dim=1).to(acts.dtype)


@register
@dataclass
class AblationCAM(CAM):
    """Ablation-CAM: a channel's weight is the relative drop of the target score when that channel
    is set to zero, (y - y_k) / y (Desai & Ramaswamy 2020). Layers before the target layer run
    once per sample; the ablated copies run ``batch_size`` at a time from the layer on."""

    batch_size: int = 64
    name: ClassVar[str] = "ablationcam"
    uses_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def channel_weights(self, acts, grads, ctx):
        runner, inputs, bound = ctx["runner"], ctx["inputs"], ctx["target"]
        module, output, layout = ctx["module"], ctx["output"], ctx["layout"]
        b, c = acts.shape[:2]
        original = bound.score(output).float()
        ablated = torch.empty(b, c, device=acts.device, dtype=torch.float32)
        fast = True  # feed one copy of the input, expand at the layer; needs no skip past it
        for i in range(b):
            for start in range(0, c, self.batch_size):
                chans = torch.arange(start, min(start + self.batch_size, c), device=acts.device)
                copies = acts[i:i + 1].repeat(len(chans), *([1] * (acts.ndim - 1)))
                copies[torch.arange(len(chans), device=acts.device), chans] = 0
                copies = layout.from_channels_first(copies, ctx["layer_output"][i:i + 1])
                rows = torch.full((len(chans),), i, device=acts.device, dtype=torch.long)
                handles: list = []
                replace_layer_output(module, handles, lambda out, copies=copies: copies)
                try:
                    if fast:
                        try:
                            out = runner.forward(inputs[i:i + 1])
                            # one input fed, len(chans) ablated rows run on from the layer: the
                            # cost counts the rows (it counted 9 for a ResNet-18's 512 channels)
                            runner.cost.forward_samples += out.shape[0] - 1
                        except (RuntimeError, ModelError):
                            fast = False
                    if not fast:
                        out = runner.forward(inputs[i:i + 1].expand(len(chans), *inputs.shape[1:]))
                finally:
                    for h in handles:
                        h.remove()
                ablated[i, chans] = bound.score(out, rows).float()
        return ((original[:, None] - ablated) / original[:, None]).to(acts.dtype)


def _rest_values(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """y + log a(y) per output channel (dim 1), a = softmax (over the channels) or sigmoid."""
    log_a = F.log_softmax(logits, 1) if activation == "softmax" else F.logsigmoid(logits)
    return logits + log_a


@register
@dataclass
class ShapleyCAM(CAM):
    """ShapleyCAM: w_k = mean_space(g_k - (H A)_k / 2), the gradient corrected by the
    Hessian-vector product of the score at the layer (a second-order estimate of each channel's
    Shapley value), of the ReST score y_c + log softmax(y)_c (Cai et al. 2025, "CAMs as Shapley
    value-based explainers", arXiv 2501.06261; pytorch-grad-cam's ``ShapleyCAM`` with
    ``ClassifierOutputReST``).

    ``score="rest"`` (default): y_c + log a(y)_c with the target's activation a (softmax as the
    paper; for a sigmoid head log sigmoid, and for a segmentation target the sum over its region,
    pellucid's extensions); ``score="target"``: the target's own score (with a logit target of a
    network piecewise linear after the layer H A = 0 and the map is Grad-CAM's).
    """

    score: str = "rest"
    name: ClassVar[str] = "shapleycam"
    second_order: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.score not in ("rest", "target"):
            raise ConfigError(f"score must be 'rest' or 'target', got {self.score!r}")

    def cam_score(self, bound, output):
        import dataclasses

        if self.score == "target":
            return bound.score(output)
        activation = getattr(bound, "activation", None)
        if activation not in ("softmax", "sigmoid"):
            raise ConfigError(f"shapleycam: score='rest' is defined for class and segmentation "
                              f"targets, not {type(bound).__name__}; give score='target'")
        # the target's own selection (its class, its region) of y + log a(y), taken as logits
        return dataclasses.replace(bound, kind="logit").score(_rest_values(output, activation))

    def channel_weights(self, acts, grads, ctx):
        return (grads - 0.5 * ctx["hvp"]).mean(_spatial(grads))


@register
@dataclass
class FinerCAM(GradCAM):
    """Finer-CAM: Grad-CAM of the target class against the classes most easily confused with it,
    score = sum_j p_j (y_c - alpha y_j) / (sum_j p_j + 1e-9) over the classes j whose logits are
    closest to y_c (``comparisons``: their ranks by |y_j - y_c|, rank 0 being c itself), p =
    softmax(y) (Zhang et al. 2025, "Finer-CAM: Spotting the difference reveals finer details for
    visual explanation", CVPR; pytorch-grad-cam's ``FinerCAM``). Defined for a softmax
    classification head; a head with fewer classes compares with those it has."""

    alpha: float = 1.0
    comparisons: tuple[int, ...] = (1, 2, 3)
    name: ClassVar[str] = "finercam"

    def __post_init__(self) -> None:
        self.comparisons = tuple(int(r) for r in self.comparisons)
        if not self.comparisons or min(self.comparisons) < 1:
            raise ConfigError(f"comparisons are ranks of the closest classes, each >= 1, got "
                              f"{self.comparisons}")

    def cam_score(self, bound, output):
        from pellucid.targets import BoundClassTarget

        if not isinstance(bound, BoundClassTarget) or bound.activation != "softmax":
            raise ConfigError("finercam compares a class with the classes of a softmax "
                              "classification head closest to it; this target is not one")
        ranks = [r for r in self.comparisons if r < output.shape[1]]
        if not ranks:
            raise ConfigError(f"finercam needs at least two classes; the model gives {output.shape[1]}")
        c = bound.classes[:, None].to(output.device)
        y_c = output.gather(1, c)
        with torch.no_grad():  # the order of closeness is a choice of classes, not differentiated
            order = (output - y_c).abs().argsort(dim=1, stable=True)
        others = order[:, ranks]
        p = torch.softmax(output, 1).gather(1, others)
        return (p * (y_c - self.alpha * output.gather(1, others))).sum(1) / (p.sum(1) + 1e-9)


KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def _top_eigenpair(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest eigenvalue of a symmetric matrix and its unit eigenvector: a full
    decomposition for small matrices; for large ones (a U-Net layer of 48 x 48 positions, whose
    full decomposition costs O(N^3)) ARPACK's Lanczos iteration for that one pair, to machine
    precision, as scikit-learn's KernelPCA does (on the CPU; the result returns to k's device)."""
    n = k.shape[0]
    if n <= 256:
        values, vectors = torch.linalg.eigh(k.double())  # small: float64 costs nothing
        return values[-1].to(k.dtype), vectors[:, -1].to(k.dtype)
    from scipy.sparse.linalg import LinearOperator, eigsh

    dtype = np.float32 if k.dtype == torch.float32 else np.float64

    def matvec(v: np.ndarray) -> np.ndarray:  # in torch: no BLAS thread pool beside torch's
        return (k @ torch.from_numpy(np.ascontiguousarray(v, dtype=dtype)).to(k)).cpu().numpy()

    values, vectors = eigsh(LinearOperator((n, n), matvec=matvec, dtype=dtype), k=1, which="LA",
                            v0=np.ones(n, dtype=dtype))
    return (torch.as_tensor(values[0], dtype=k.dtype, device=k.device),
            torch.as_tensor(vectors[:, 0], dtype=k.dtype, device=k.device))


@register
@dataclass
class KPCACAM(CAM):
    """KPCA-CAM: the layer's centred activations (positions x channels) projected on their first
    kernel principal component (Karmani et al. 2024, "KPCA-CAM: Visual explainability of deep
    computer vision models using kernel PCA", arXiv 2410.00267; pytorch-grad-cam's ``KPCA_CAM``).
    Class-agnostic, no gradients. The projection is scikit-learn's ``KernelPCA.fit_transform``:
    v sqrt(lambda) of the top eigenpair of the centred kernel matrix, in float32 as scikit-learn
    computes it for float32 activations.

    ``kernel``: sigmoid (tanh(gamma <a, b> + coef0), the paper's default), rbf, poly, linear or
    cosine; ``gamma`` None: 1 / channels. ``sign``: ``"activation"`` (default, as ``eigencam``:
    the map correlates positively with the channel-summed activation) or ``"largest"`` (the entry
    of largest magnitude positive: scikit-learn's ``svd_flip``, the peer's behaviour).
    """

    kernel: str = "sigmoid"
    gamma: float | None = None
    coef0: float = 1.0
    degree: int = 3
    sign: str = "activation"
    name: ClassVar[str] = "kpcacam"
    uses_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.sign not in ("activation", "largest"):
            raise ConfigError(f"sign must be 'activation' or 'largest', got {self.sign!r}")

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel matrix of ``x`` (N, C). The product in torch; on a CPU the element-wise part
        through a NumPy view of it, in place (torch 2.14's float32 tanh and exp ran 4-8x slower
        here on an N x N matrix, the largest array of the method)."""
        gamma = self.gamma if self.gamma is not None else 1.0 / x.shape[1]
        dot = x @ x.T
        if self.kernel == "linear":
            return dot
        if self.kernel == "cosine":
            norm = x.norm(dim=1, keepdim=True).clamp_min(1e-300)
            return (x / norm) @ (x / norm).T
        k, xp = (dot.numpy(), np) if dot.device.type == "cpu" else (dot, torch)
        if self.kernel in ("sigmoid", "poly"):
            k *= gamma
            k += self.coef0
            if self.kernel == "poly":
                k **= self.degree
            else:
                xp.tanh(k, out=k)
            return dot
        sq = (x * x).sum(1)  # rbf: exp(-gamma |a - b|^2)
        sq = sq.numpy() if xp is np else sq
        k *= -2
        k += sq[:, None]
        k += sq[None, :]
        k[k < 0] = 0
        k *= -gamma
        xp.exp(k, out=k)
        return dot

    def combine(self, acts, grads, ctx):
        b, c = acts.shape[:2]
        tops = []
        for i in range(b):
            x = torch.nan_to_num(acts[i].reshape(c, -1).T.float())  # (N positions, C)
            x = x - x.mean(0, keepdim=True)
            kernel = self._kernel(x)  # symmetric by construction
            k = kernel.numpy() if kernel.device.type == "cpu" else kernel
            means = k.mean(0)
            k -= means[None, :]  # centred in feature space
            k -= means[:, None]
            k += means.mean()
            value, vector = _top_eigenpair(kernel)
            tops.append(vector * value.clamp_min(0).sqrt())
        top = torch.stack(tops)  # (B, N)
        if self.sign == "largest":
            flip = top.gather(1, top.abs().argmax(1, keepdim=True))[:, 0] < 0
        else:
            flip = _against_activation(top, acts)
        top = torch.where(flip[:, None], -top, top)
        return top.reshape(b, *acts.shape[2:]).to(acts.dtype)


def _channels_first_only(layout: FeatureLayout) -> None:
    if layout.kind != "channels_first":
        raise ConfigError("reciprocam masks positions of a channels-first feature map; this layer "
                          f"is {layout.kind} (the ViT variant is another method)")


@register
@dataclass
class ReciproCAM(CAM):
    """Recipro-CAM: the map at each position p of the layer is the target's score when the layer's
    activations are kept at p only (every channel) and zero elsewhere, the network after the layer
    run on that "mosaic" (Byun & Lee 2022, "Recipro-CAM: fast gradient-free visual explanations for
    convolutional neural networks", arXiv 2209.14074; openvino-xai's ``ReciproCAM``). Gradient-free;
    one mosaic per position of the layer (h w, or d h w in 3D), ``batch_size`` mosaics at a time
    across the samples, run from the layer on (each sample's layers before it once per batch). The
    target's ``kind`` says what is scored: its logit (openvino-xai's PyTorch implementation) or its
    probability (the paper's softmax). No ReLU before the min-max scaling (a logit map may be
    negative everywhere). Channels-first layers only: the transformer variant
    (ViT Recipro-CAM, Gaussian token masks) is not this method and is refused."""

    relu: bool = False
    batch_size: int = 256  # rows from the layer on: a ResNet's 8 cases x 16 positions in one pass
    name: ClassVar[str] = "reciprocam"
    uses_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def _explain(self, runner, model, inputs, target, layer, handles):
        """The clean forward computes the map too when the clean rows and every mosaic fit in
        ``batch_size`` rows: the layer's output is extended by the mosaics built from it (the
        layers before it run once, as openvino-xai's). Otherwise the remaining mosaics run in
        chunks from the captured activations; past a skip connection around the layer (the
        extended batch cannot meet it), the CAM path with each chunk's inputs expanded."""
        b = inputs.shape[0]
        _, module = resolve_layer(model, layer)
        seen: dict[str, torch.Tensor] = {}

        def extend(mod, inp, out):
            if not isinstance(out, torch.Tensor) or out.ndim < 3:
                return None
            seen["acts"] = out
            n = out[0, 0].numel()
            if b * (n + 1) > self.batch_size:
                return None
            seen["extended"] = out
            eye = torch.eye(n, device=out.device, dtype=out.dtype).view(1, n, 1, *out.shape[2:])
            return torch.cat([out, (out[:, None] * eye).reshape(b * n, *out.shape[1:])])

        hook = module.register_forward_hook(extend)
        try:
            with torch.no_grad():
                out = runner.forward(inputs)
        except (RuntimeError, ModelError):
            if "extended" not in seen:
                raise
            out = None
        finally:
            hook.remove()
        if out is None:
            return super()._explain(runner, model, inputs, target, layer, handles)
        acts = seen.get("acts")
        if acts is None:
            raise ModelError(f"layer {layer!r} was not reached by the forward pass")
        layout = self.find_layout(model, module, layer, acts, inputs)
        _channels_first_only(layout)
        output = out[:b]
        bound = self.bind(target, output)
        spatial = acts.shape[2:]
        if "extended" in seen:
            runner.cost.forward_samples += out.shape[0] - b
            rows = torch.arange(b, device=out.device).repeat_interleave(acts[0, 0].numel())
            raw = bound.score(out[b:], rows).float().view(b, 1, *spatial)
        else:
            raw = self.mosaic_scores(runner, inputs, module, acts, bound)[:, None].float()
        maps = postprocess(raw, tuple(inputs.shape[2:]), self.relu, self.upsample, self.normalize)
        return Explanation(maps, self.name, bound, layer, raw, output=output,
                           extras={"layout": layout.describe()})

    def combine(self, acts, grads, ctx):
        _channels_first_only(ctx["layout"])
        return self.mosaic_scores(ctx["runner"], ctx["inputs"], ctx["module"], acts,
                                  ctx["target"]).to(acts.dtype)

    def mosaic_scores(self, runner, inputs, module, acts, bound) -> torch.Tensor:
        """(B, *grid) target scores of every mosaic, ``batch_size`` rows at a time across the
        samples: each chunk's samples fed once and expanded at the layer, or, past a skip
        connection, the chunk's inputs expanded."""
        b, spatial = acts.shape[0], acts.shape[2:]
        n = acts[0, 0].numel()
        scores = torch.empty(b * n, device=acts.device, dtype=torch.float32)
        eye = torch.eye(n, device=acts.device, dtype=acts.dtype).view(n, 1, *spatial)
        fast = True
        for start in range(0, b * n, self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, b * n), device=acts.device)
            sample, pos = rows // n, rows % n
            mosaic = acts[sample] * eye[pos]
            fed = torch.unique(sample)  # sorted: the mosaics' samples, each fed once
            handles: list = []
            replace_layer_output(module, handles, lambda out, m=mosaic: m.to(out.dtype))
            try:
                if fast:
                    try:
                        with torch.no_grad():
                            out = runner.forward(inputs[fed])
                        runner.cost.forward_samples += out.shape[0] - len(fed)
                    except (RuntimeError, ModelError):
                        fast = False
                if not fast:
                    with torch.no_grad():
                        out = runner.forward(inputs[sample])
            finally:
                for h in handles:
                    h.remove()
            scores[rows] = bound.score(out, sample).float()
        return scores.view(b, *spatial)
