"""Guided backpropagation and Guided Grad-CAM.

=================  ==================================================================  ===============
method             attribution                                                         source
=================  ==================================================================  ===============
guidedbackprop     dy/dx with every ReLU's backward replaced by g -> ReLU(g) * (x > 0)  Springenberg 2015
guidedgradcam      guidedbackprop * up(ReLU(Grad-CAM)), the layer's map up-sampled     Selvaraju 2017
=================  ==================================================================  ===============

Every ReLU of the forward pass is guided, whether a module (``nn.ReLU``) or a function
(``F.relu``, ``torch.relu``, ``Tensor.relu``), as the paper defines it: the calls are intercepted
for the duration of the pass (a ``TorchFunctionMode``). Captum guides ``nn.ReLU`` modules only, so
on a network that calls ReLU as a function (torchvision's DenseNet) its "guided" gradient is partly
the plain one; ``relus="modules"`` reproduces that. A network without any ReLU is refused in one
line: its guided gradient would be the plain gradient under another name. Other activations
(PReLU, GELU, SiLU) pass their ordinary gradient, as in the paper and the peers.

Springenberg et al., "Striving for simplicity: the all convolutional net", ICLR-W 2015; Selvaraju
et al., "Grad-CAM: Visual explanations from deep networks via gradient-based localization",
ICCV 2017.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import REDUCTIONS, reduce_channels
from pellucid.explainers.base import Explainer, Explanation, ModelRunner
from pellucid.explainers.gradients import _OnePassGradient
from pellucid.explainers.registry import register

RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward ReLU(g) where the output is positive (guided backpropagation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0)


class _GuidedMode(TorchFunctionMode):
    """Replaces ReLU calls by :class:`_GuidedReLU`: all of them, or (``modules_only``) those made
    inside an ``nn.ReLU`` module's forward; counts the replacements."""

    def __init__(self, modules_only: bool) -> None:
        super().__init__()
        self.modules_only, self.inside, self.guided = modules_only, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELU_FUNCTIONS and (not self.modules_only or self.inside):
            self.guided += 1
            return _GuidedReLU.apply(args[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def mode_in_modules(mode, model: nn.Module, module_types: tuple[type, ...] | None):
    """Enter the TorchFunctionMode ``mode``; with ``module_types``, ``mode.inside`` counts how deep
    the pass is inside modules of those types (a mode may act only there). Hooks removed on exit."""
    handles = []
    if module_types:
        def enter(*_):
            mode.inside += 1

        def leave(*_):
            mode.inside -= 1

        for module in model.modules():
            if isinstance(module, module_types):
                handles += [module.register_forward_pre_hook(enter),
                            module.register_forward_hook(leave)]
    try:
        with mode:
            yield mode
    finally:
        for h in handles:
            h.remove()


def guided_relus(model: nn.Module, modules_only: bool = False):
    """Within the block, the ReLUs of forward passes are guided; yields the mode (``.guided``:
    how many ReLU calls were)."""
    return mode_in_modules(_GuidedMode(modules_only), model, (nn.ReLU,) if modules_only else None)


def _check_relus(relus: str) -> None:
    if relus not in ("all", "modules"):
        raise ConfigError(f"relus must be 'all' or 'modules', got {relus!r}")


def _guided_forward(runner: ModelRunner, model: nn.Module, inputs: torch.Tensor, relus: str,
                    name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input leaf, output graph) of one forward pass with guided ReLUs; the backward through it is
    guided (the replaced ReLUs are in the graph)."""
    with torch.enable_grad(), guided_relus(model, relus == "modules") as mode:
        leaf = inputs.clone().requires_grad_(True)
        out = runner.forward(leaf)
    if mode.guided == 0:
        where = "nn.ReLU module" if relus == "modules" else "ReLU"
        raise ConfigError(f"{name}: the model runs no {where}; guided backpropagation is defined "
                          f"at ReLUs (its map would be the plain gradient)")
    return leaf, out


@register
@dataclass
class GuidedBackprop(_OnePassGradient):
    """Guided backpropagation: the input gradient with each ReLU passing back only positive
    gradients where its input was positive (Springenberg et al. 2015); ``relus="modules"``: only
    ``nn.ReLU`` modules are guided (Captum's ``GuidedBackprop``). One forward pass (its ReLUs
    guided, their forward values unchanged) binds the target and is differentiated."""

    relus: str = "all"
    name: ClassVar[str] = "guidedbackprop"

    def __post_init__(self) -> None:
        _check_relus(self.relus)

    def clean_forward(self, runner: ModelRunner, inputs: torch.Tensor) -> torch.Tensor:
        self._leaf, self._graph = _guided_forward(runner, runner.model, inputs, self.relus,
                                                  self.name)
        return self._graph.detach()

    def from_gradient(self, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad


@register
@dataclass
class GuidedGradCAM(Explainer):
    """Guided Grad-CAM: guided backpropagation times the layer's Grad-CAM (ReLU'd, not normalised)
    up-sampled to the input (Selvaraju et al. 2017). ``upsample="linear"`` (the paper's bilinear,
    default) or ``"nearest"`` (Captum's ``GuidedGradCam`` default); ``relus`` as guidedbackprop;
    the per-channel attributions are kept in ``raw`` and summed over channels for the map."""

    upsample: str = "linear"
    relus: str = "all"
    channel_reduce: str = "sum"
    name: ClassVar[str] = "guidedgradcam"
    family: ClassVar[str] = "cam"
    needs_layer: ClassVar[bool] = True
    channel_maps: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_relus(self.relus)
        if self.upsample not in ("linear", "nearest"):
            raise ConfigError(f"upsample must be 'linear' or 'nearest', got {self.upsample!r}")
        if self.channel_reduce not in REDUCTIONS:
            raise ConfigError(f"channel_reduce must be one of {REDUCTIONS}, got "
                              f"{self.channel_reduce!r}")

    def _explain(self, runner, model, inputs, target, layer, handles) -> Explanation:
        from pellucid.explainers.cam import GradCAM

        cam = GradCAM(relu=False, normalize="none", upsample="nearest")
        low = cam._explain(runner, model, inputs, target, layer, handles)
        bound, output = low.target, low.output
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[inputs.ndim - 2] \
            if self.upsample == "linear" else "nearest"
        heat = F.interpolate(low.raw.clamp_min(0), size=tuple(inputs.shape[2:]), mode=mode,
                             **({"align_corners": False} if mode != "nearest" else {}))
        leaf, graph = _guided_forward(runner, model, inputs, self.relus, self.name)
        with torch.enable_grad():
            (grad,) = runner.backward(bound.score(graph).sum(), [leaf])
        attr = grad.detach() * heat
        return Explanation(reduce_channels(attr, self.channel_reduce), self.name, bound, layer,
                           raw=attr, output=output, extras={"layout": low.extras.get("layout")})
