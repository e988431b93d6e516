"""A differentiable copy of the model for methods that read only the input gradient.

Saliency, input x gradient, integrated gradients and their relatives (SmoothGrad, GradientSHAP,
Blur IG, Guided IG, XRAI, counterfactuals) differentiate the model's output with respect to its
input and nothing else: no layer is hooked, no rule replaces a layer's backward. For them the
model may run as any function with the same values and the same input gradient. On a CPU this
module makes such a copy with ``torch.fx``:

- BatchNorm with running statistics after a convolution is folded into the convolution's weights
  (``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``: one pass over the
  activation less, forward and backward);
- PReLU with one shared slope ``a`` becomes ``leaky_relu(x, a)``: the same function
  (``x`` for ``x > 0``, else ``a x``) whose backward computes no gradient for ``a``;
- a convolution with at most 8 channels on one side computes its input gradient as one forward
  convolution whose outputs interleave into it (oneDNN's backward is 2-4.5x slower there), and a
  transposed convolution with so few channels runs its forward that way (it is such a gradient)
  and its backward as the strided convolution;
- the weights and inputs go channels-last (oneDNN's native layout), unless the model normalises
  over channel-first reshapes (instance, group or layer normalisation), where that was slower.

Measured here (2 cores, ``benchmarks/gradient_calls.py``: one saliency call against Captum on the
model itself, at the grid's batch / at batch 1): ResNet-18 at 128 px 1.24x / 1.03x, DenseNet-121
at 96 px 1.26x / 1.12x, a MONAI 2D U-Net 1.04x / 0.81-1.0x, a 3D U-Net 1.11x / 0.96x (at one small
input pellucid's fixed work per call, about 0.8 ms, outweighs what the copy saves); integrated
gradients 1.07-2.18x.

The copy is built the second time a model is explained at an input shape with the same weights
(a single call, or a model whose weights change between calls, does not pay for it). It is used
only after two checks on that shape: its output equals the model's within 1e-5 of the output's
scale in float32, and a float64 copy made the same way gives the float64 model's input gradient
within 1e-9 (relative, for a random weighting of the outputs). In float64 a near-tie of max
pooling or ReLU would have to lie within 1e-16 to flip, so this compares the functions, not the
rounding; in float32 such ties flip between any two ways of summing (the float32 DenseNet-121
itself differs from its float64 self by 2e-3 of the largest gradient, at single pixels). A model
that cannot be traced, has hooks of its own (checked on every call), selects a part of its output,
has nothing the copy would change, would need more memory to build and check it than the memory
limit (or 2 GiB), runs on a GPU or in reduced precision runs as it is. The copy is rebuilt when
the model's weights change (their storage or version).
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pellucid.models.outputs import selected_output

_NORMS_OVER_RESHAPES = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_NORM_FUNCTIONS = (F.instance_norm, F.group_norm, F.layer_norm, torch.instance_norm,
                   torch.group_norm, torch.layer_norm)
_CONV = {2: F.conv2d, 3: F.conv3d}


def phase_kernels(weight: torch.Tensor, stride: tuple[int, ...], padding: tuple[int, ...]
                  ) -> tuple[torch.Tensor, list[int]]:
    """The input gradient of ``conv(x, weight, stride, padding)`` as one forward convolution.

    Per axis, input position ``n = s q + r`` receives ``g[o] w[k]`` for ``s o + k - p = n``, so
    ``k = s t + c`` with ``c = (r + p) mod s`` and ``dx[s q + r] = sum_t g[q + m - t] w[s t + c]``,
    ``m = (r + p) div s``: a stride-1 correlation of ``g`` per phase ``r`` with a sub-kernel of
    ``w``. All ``s^d`` phases become the output channels of one convolution (kernels placed at a
    common offset ``u_min``, zeros elsewhere); interleaving them gives ``dx`` (a sub-pixel
    convolution, as in Shi et al. 2016). Returns the kernel (C_in * s^d, C_out, *L) and ``u_min``
    per axis."""
    nd = weight.ndim - 2
    axes = []
    for a in range(nd):
        k, s, p = weight.shape[2 + a], stride[a], padding[a]
        phases = [((r + p) % s, (r + p) // s, -(-(k - (r + p) % s) // s)) for r in range(s)]
        live = [(m, t) for c, m, t in phases if t > 0]
        lo = min(m - t + 1 for m, t in live)
        length = max(m for m, _ in live) - lo + 1
        index = torch.full((s, length), -1, dtype=torch.long)
        for r, (c, m, t) in enumerate(phases):
            for i in range(length):
                if 0 <= m - lo - i < t:
                    index[r, i] = s * (m - lo - i) + c
        axes.append((index, lo))
    c_out, c_in = weight.shape[:2]
    kernel = weight.new_zeros(c_in, *stride, c_out, *(index.shape[1] for index, _ in axes))
    for phase in itertools.product(*(range(s) for s in stride)):
        sub, keep = weight, torch.ones((), dtype=torch.bool)
        for a, r in enumerate(phase):
            index = axes[a][0][r]
            sub = sub.index_select(2 + a, index.clamp(min=0))
            keep = keep & (index >= 0).view([-1 if b == a else 1 for b in range(nd)])
        kernel[(slice(None), *phase)] = (sub * keep).transpose(0, 1)
    return kernel.reshape(c_in * math.prod(stride), c_out, *kernel.shape[2 + nd:]), \
        [lo for _, lo in axes]


def phase_input_gradient(grad: torch.Tensor, kernel: torch.Tensor, lows: list[int],
                         stride: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """``dL/dx`` (B, C_in, *size) from the output gradient with :func:`phase_kernels`' result."""
    nd = grad.ndim - 2
    q = [-(-n // s) for n, s in zip(size, stride, strict=True)]
    pads = []
    for a in reversed(range(nd)):
        pads += [-lows[a], q[a] - 1 + kernel.shape[2 + a] - grad.shape[2 + a] + lows[a]]
    out = _CONV[nd](F.pad(grad, pads), kernel)
    b, c_in = grad.shape[0], kernel.shape[0] // math.prod(stride)
    out = out.reshape(b, c_in, *stride, *q)
    order = [0, 1, *(i for a in range(nd) for i in (2 + nd + a, 2 + a))]
    out = out.permute(order).reshape(b, c_in, *(n * s for n, s in zip(q, stride, strict=True)))
    return out[(slice(None), slice(None), *(slice(0, n) for n in size))]


class _InputGradientConv(torch.autograd.Function):
    """A convolution with frozen weights whose input gradient runs as a forward convolution
    (:func:`phase_kernels`). For layers with few channels oneDNN's convolution backward ran
    2-4.5x slower than this here (a U-Net's 3-channel head: 2.1 of 16 ms per 3D saliency map;
    ResNet-18's 1-channel stem: 8.8 of 62 ms); for wider layers the two were within 10 %, so only
    layers with at most :data:`FEW_CHANNELS` in or out channels are replaced."""

    @staticmethod
    def forward(ctx, x, weight, kernel, bias, stride, padding, lows):
        ctx.save_for_backward(kernel)
        ctx.options = (stride, lows, tuple(x.shape[2:]))
        return _CONV[x.ndim - 2](x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        stride, lows, size = ctx.options
        return phase_input_gradient(grad, kernel, lows, stride, size), None, None, None, None, \
            None, None


FEW_CHANNELS = 8


class _Conv(nn.Module):
    """A replaceable convolution (:func:`_replaceable`) run by :class:`_InputGradientConv`."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        kernel, self.lows = phase_kernels(conv.weight.detach(), self.stride, self.padding)
        self.register_buffer("kernel", kernel.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InputGradientConv.apply(x, self.weight, self.kernel, self.bias, self.stride,
                                        self.padding, self.lows)


class _TransposedConv(torch.autograd.Function):
    """A transposed convolution with frozen weights: its forward is a convolution's input
    gradient, so it runs as :func:`phase_input_gradient` (oneDNN's transposed convolution took
    1.1 ms against 0.64 ms for a 3D U-Net's 32-to-3-channel head); its input gradient is the
    strided forward convolution ``conv(dL/dy, w)``."""

    @staticmethod
    def forward(ctx, x, weight, kernel, bias, stride, padding, lows, size):
        ctx.save_for_backward(weight)
        ctx.options = (stride, padding)
        out = phase_input_gradient(x, kernel, lows, stride, size)
        return out if bias is None else out + bias.view(1, -1, *([1] * (x.ndim - 2)))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding = ctx.options
        return _CONV[grad.ndim - 2](grad, weight, None, stride, padding), None, None, None, None, \
            None, None, None


class _ConvTranspose(nn.Module):
    """A replaceable transposed convolution run by :class:`_TransposedConv`."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.output_padding = tuple(conv.output_padding)
        kernel, self.lows = phase_kernels(conv.weight.detach(), self.stride, self.padding)
        self.register_buffer("kernel", kernel.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple((n - 1) * s - 2 * p + k + o for n, s, p, k, o in zip(
            x.shape[2:], self.stride, self.padding, self.weight.shape[2:], self.output_padding,
            strict=True))
        return _TransposedConv.apply(x, self.weight, self.kernel, self.bias, self.stride,
                                     self.padding, self.lows, size)


@contextmanager
def few_channel_convolutions(model: nn.Module) -> Iterator[int]:
    """Inside, every few-channel convolution of ``model`` (:func:`_replaceable`) computes its input
    gradient in the sub-pixel form, from whatever weight and bias it holds at each call (LRP's
    rules run the layer again with parameters of their own, which zennit makes trainable); no
    gradient reaches those weights inside. Yields how many layers. For methods that hook layers
    or replace their backward and so cannot run a copy."""
    swapped = []
    for module in model.modules():
        if _replaceable(module) is _Conv and "forward" not in module.__dict__:
            def forward(x, m=module):
                kernel, lows = phase_kernels(m.weight.detach(), tuple(m.stride),
                                             tuple(m.padding))
                return _InputGradientConv.apply(x, m.weight, kernel, m.bias, tuple(m.stride),
                                                tuple(m.padding), lows)
            module.forward = forward
            swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward


def _replaceable(module: nn.Module | None) -> type[nn.Module] | None:
    """The replacement of a 2D/3D (transposed) convolution with one group, no dilation, zero
    padding given as numbers and few channels on one side; None for any other module."""
    kinds = {nn.Conv2d: _Conv, nn.Conv3d: _Conv, nn.ConvTranspose2d: _ConvTranspose,
             nn.ConvTranspose3d: _ConvTranspose}
    kind = kinds.get(type(module))
    if kind is None or module.padding_mode != "zeros" or isinstance(module.padding, str) or \
            module.groups != 1 or any(d != 1 for d in module.dilation) or \
            min(module.in_channels, module.out_channels) > FEW_CHANNELS:
        return None
    return kind


@dataclass
class GradientCopy:
    """The copy's forward and what was changed."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    folded: int  # BatchNorms folded into convolutions
    prelus: int  # PReLUs run as leaky ReLU
    convs: int  # few-channel convolutions whose input gradient runs as a forward convolution
    channels_last: bool

    def describe(self) -> str:
        layout = "channels-last" if self.channels_last else "channel-first"
        return (f"{self.folded} BatchNorm folded, {self.prelus} PReLU as leaky ReLU, {self.convs} "
                f"few-channel (transposed) convolutions in forward form, {layout}")


def _build(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, int, int, int, bool]:
    """The traced, folded copy in ``dtype`` (RuntimeError when it cannot be traced)."""
    from torch.fx.experimental.optimization import fuse

    source = copy.deepcopy(model).eval().to(dtype)
    try:
        traced = fx.symbolic_trace(source)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise RuntimeError(f"the model cannot be traced by torch.fx ({first})") from None
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in traced.modules())
    with torch.no_grad():
        gm = fuse(traced, inplace=True, no_trace=True)
    folded = norms - sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    modules = dict(gm.named_modules())
    prelus = 0
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.PReLU) and module.weight.numel() == 1 and len(node.args) == 1:
            slope = float(module.weight.detach().reshape(()))
            with gm.graph.inserting_after(node):
                leaky = gm.graph.call_function(F.leaky_relu, (node.args[0],),
                                               {"negative_slope": slope})
            node.replace_all_uses_with(leaky)
            gm.graph.erase_node(node)
            prelus += 1
    convs = 0
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        kind = _replaceable(module)
        if kind is not None and len(node.args) == 1 and not node.kwargs:
            parent, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, kind(module))
            convs += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.requires_grad_(False)
    # normalisation over channel-first reshapes, as a module or traced into functions
    last = not any(isinstance(m, _NORMS_OVER_RESHAPES) for m in source.modules()) and not any(
        node.op == "call_function" and node.target in _NORM_FUNCTIONS for node in gm.graph.nodes)
    return gm, folded, prelus, convs, last


def _layout(x: torch.Tensor, last: bool) -> torch.Tensor:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim) if last else None
    return x.contiguous(memory_format=fmt) if fmt else x


def _input_gradient(module: Callable, x: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = module(leaf)
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"the model returns {type(out).__name__}, not one tensor")
        (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
    return out.detach(), grad


def make_gradient_copy(model: nn.Module, example: torch.Tensor) -> GradientCopy:
    """Build and check the copy for inputs shaped like ``example`` (its first row); RuntimeError
    (one line) when it cannot be made or does not match the model."""
    from pellucid.inference.torch_copy import probe_batch

    gm, folded, prelus, convs, last = _build(model, torch.float32)
    x_layout = last and example.ndim in (4, 5)
    if x_layout:
        gm = gm.to(memory_format=torch.channels_last if example.ndim == 4
                   else torch.channels_last_3d)
    probe = probe_batch(example[:1].float())
    with torch.no_grad():
        reference = model(probe)
        if not isinstance(reference, torch.Tensor):
            raise RuntimeError(f"the model returns {type(reference).__name__}, not one tensor")
        got = gm(_layout(probe, x_layout))
    if not isinstance(got, torch.Tensor):
        raise RuntimeError(f"the traced model returns {type(got).__name__}, not one tensor")
    scale = reference.abs().max().clamp_min(1e-12)
    if got.shape != reference.shape or (got - reference).abs().max() > 1e-5 * scale:
        raise RuntimeError("the folded copy's output differs from the model's")
    exact, *_ = _build(model, torch.float64)
    one = probe[:1].double()
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(reference[:1].shape, generator=gen, dtype=torch.float64)
    source = copy.deepcopy(model).double()
    _, want = _input_gradient(source, one, weights)
    _, have = _input_gradient(exact, one, weights)
    if (have - want).abs().max() > 1e-9 * want.abs().max().clamp_min(1e-300):
        raise RuntimeError("the folded copy's input gradient differs from the model's")
    del exact, source
    return GradientCopy(lambda x: gm(_layout(x, x_layout)), folded, prelus, convs,
                        bool(x_layout))


def _fingerprint(modules: list[nn.Module]) -> tuple:
    """Every parameter's and buffer's storage and version."""
    return tuple((t.data_ptr(), t._version) for m in modules
                 for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)


def _foreign_hooks(model: nn.Module, modules: list[nn.Module]) -> bool:
    """Hooks other than pellucid's own output reduction on the model, or global module hooks (a
    copy would lose them or run them on other modules); checked on every call."""
    from torch.nn.modules import module as torch_module

    from pellucid.models.outputs import _USERS

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks or \
            torch_module._global_backward_hooks or \
            getattr(torch_module, "_global_backward_pre_hooks", None):
        return True
    ours = _USERS.get(id(model))
    own = {ours[1].id} if ours else set()
    for m in modules:
        forward = set(m._forward_hooks) - (own if m is model else set())
        if forward or m._forward_pre_hooks or m._backward_hooks or \
                getattr(m, "_backward_pre_hooks", None):
            return True
    return False


_LOCK = threading.Lock()
# (model id, shape, dtype) -> the weights' fingerprint when last explained: a second call with
# the same weights builds the copy (weights that change on every call never pay for one)
_SEEN: OrderedDict[tuple, tuple] = OrderedDict()
_SEEN_KEPT = 256
_COPIES: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (weakref, fingerprint, copy or reason)
_KEPT = 4  # each copy holds the model's weights once more


BUILD_FOOTPRINT = 6  # model and activation bytes while building and checking (float64 copies)


def _not_worth(model: nn.Module, example: torch.Tensor, modules: list[nn.Module]) -> str | None:
    """Why no copy is built: nothing it would change, or more memory to build and check it (float
    copies of the weights and one input's activations) than the memory limit, or 2 GiB."""
    from pellucid.inference.footprint import activation_bytes
    from pellucid.runtime import memory_limit_bytes

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) or _replaceable(m) is not None or
               (isinstance(m, nn.PReLU) and m.weight.numel() == 1) for m in modules):
        return "nothing in the model to fold or replace"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = BUILD_FOOTPRINT * (weights + activation_bytes(model, example[:1]))
    limit = memory_limit_bytes() or 2 * 2**30
    if need > limit:
        return f"building and checking it needs about {need / 2**20:.0f} MiB (limit " \
               f"{limit / 2**20:.0f} MiB)"
    return None


def gradient_copy(model: nn.Module, example: torch.Tensor,
                  modules: list[nn.Module] | None = None) -> GradientCopy | None:
    """The checked copy for inputs shaped like ``example``, or None where the model runs as it
    is (first call at this shape, not eligible, or the copy failed its checks). ``modules``: the
    model's modules, when the caller has walked the tree already."""
    if example.device.type != "cpu" or example.dtype != torch.float32 or \
            isinstance(model, torch.jit.ScriptModule) or selected_output(model) is not None:
        return None
    from pellucid.runtime import reduced_precision

    if reduced_precision() is not None:
        return None
    key = (id(model), tuple(example.shape[1:]), example.dtype)
    modules = modules if modules is not None else list(model.modules())
    if _foreign_hooks(model, modules):
        return None
    fingerprint = _fingerprint(modules)
    with _LOCK:
        found = _COPIES.get(key)
        if found is not None and found[0]() is model and found[1] == fingerprint:
            _COPIES.move_to_end(key)
            return found[2] if isinstance(found[2], GradientCopy) else None
        if _SEEN.get(key) != fingerprint:
            _SEEN[key] = fingerprint
            _SEEN.move_to_end(key)
            while len(_SEEN) > _SEEN_KEPT:
                _SEEN.popitem(last=False)
            return None
    made: GradientCopy | str | None = _not_worth(model, example, modules)
    if made is None:
        try:
            made = make_gradient_copy(model, example)
        except Exception as exc:  # any failure: the model itself is correct
            made = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    with _LOCK:
        _COPIES[key] = (weakref.ref(model), fingerprint, made)
        _COPIES.move_to_end(key)
        while len(_COPIES) > _KEPT:
            _COPIES.popitem(last=False)
    return made if isinstance(made, GradientCopy) else None


def why_not(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why the last attempt at a copy for this model and shape failed (None: no failure)."""
    found = _COPIES.get((id(model), tuple(example.shape[1:]), example.dtype))
    return found[2] if found is not None and isinstance(found[2], str) else None
