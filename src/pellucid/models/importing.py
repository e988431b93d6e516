"""``pellucid import-model``: a model folder (``card.json`` + the network) from what a user has:
a state dict or safetensors file of a network pellucid builds (``--arch``), a ``module:factory``
with its weights, or a TorchScript file. What can be read off the network is inferred and checked
(input channels from its first convolution, the number of outputs from a forward pass, the CAM
layer); what cannot is asked for, with a suggestion, never guessed: above all the activation of a
multi-class head (softmax for one finding per image, sigmoid for several), which decides every
probability pellucid reports.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pellucid.errors import ConfigError, ModelError
from pellucid.models.card import ACTIVATIONS, TASKS, ModelCard
from pellucid.models.outputs import output_selector, reduce_output
from pellucid.models.store import (
    CALIBRATION,
    CARD,
    TORCHSCRIPT,
    _load_state,
    _read_state_dict,
    factory_module,
    load_torchscript,
    save_model,
)
from pellucid.version import __version__

IMAGENET = {"kind": "meanstd", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@dataclass
class ImportSpec:
    """What the user says about the model (None: infer it, or ask)."""

    source: str  # weights file, TorchScript file, or module:factory
    task: str | None = None
    classes: list[str] = field(default_factory=list)
    activation: str | None = None
    input_size: list[int] = field(default_factory=list)
    channels: int | None = None
    weights: str | None = None  # with module:factory
    arch: str | None = None  # with a weights file: one of pellucid's zoo architectures
    backend: str | None = None
    normalization: str = "none"  # none | imagenet | meanstd:m1,m2,.../s1,s2,...
    layer: str | None = None
    name: str = ""
    version: str = ""
    intended_use: dict[str, Any] = field(default_factory=dict)
    resize: str = "bilinear"  # how inputs are resized (data.transforms.RESIZE_METHODS)
    output: str = ""  # which part of a non-tensor output to explain (pellucid.models.outputs)


def _normalization(text: str) -> dict[str, Any]:
    if text == "none":
        return {"kind": "none"}
    if text == "imagenet":
        return dict(IMAGENET)
    if text.startswith("meanstd:") and "/" in text:
        try:
            mean, std = ([float(v) for v in part.split(",")] for part in text[8:].split("/"))
        except ValueError:
            mean = std = []
        if mean and len(mean) == len(std) and min(std) > 0:
            return {"kind": "meanstd", "mean": mean, "std": std}
    raise ConfigError(f"--normalization: give none, imagenet or meanstd:M1,M2/S1,S2 (per channel, "
                      f"positive stds), got {text!r}")


def _calibration(module: nn.Module, spec: ImportSpec) -> list[float | None] | None:
    """A TorchXRayVision network's operating points (``op_threshs``; NaN: a class its calibration
    does not cover -> None), after which the network returns logits (see store.CALIBRATION)."""
    op = getattr(module, "op_threshs", None)
    if not isinstance(op, torch.Tensor):
        return None
    if spec.activation not in (None, "sigmoid"):
        raise ConfigError(f"--activation {spec.activation}: this TorchXRayVision network is "
                          f"multi-label (sigmoid), calibrated by its op_threshs")
    points = [None if not torch.isfinite(t) else float(t) for t in op.flatten()]
    module.op_threshs = None
    return points


def network_library(module: nn.Module) -> str:
    """The package (and its version) that the network's class comes from, e.g. "timm 1.0.22"."""
    from importlib import metadata

    package = type(module).__module__.split(".")[0]
    if package in ("__main__", "builtins", "torch") and isinstance(module, torch.jit.ScriptModule):
        return "torchscript"
    names = {"pellucid": "pellucid", "segmentation_models_pytorch": "segmentation-models-pytorch"}
    try:
        return f"{package} {metadata.version(names.get(package, package))}"
    except metadata.PackageNotFoundError:
        return package


def first_conv_channels(module: nn.Module) -> int | None:
    """The input channels of the network's first convolution (None without one)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return int(m.in_channels)
    for _, p in module.named_parameters():  # a TorchScript module: its first 4D or 5D kernel
        if p.ndim in (4, 5):
            return int(p.shape[1])
    return None


def _network(spec: ImportSpec) -> tuple[nn.Module, str, str, str]:
    """The network with its weights, and how a folder rebuilds it: (module, arch, backend,
    factory)."""
    source = spec.source
    path = Path(source)
    if ":" in source and not path.exists():
        if spec.weights is None:
            raise ConfigError(f"{source}: give --weights FILE (a state dict or safetensors) for the "
                              f"factory's network")
        module = factory_module(source)
        state = _read_state_dict(Path(spec.weights))
        if isinstance(state.get("op_threshs"), torch.Tensor) and \
                getattr(module, "op_threshs", False) is None:  # TorchXRayVision's calibration
            module.op_threshs = state["op_threshs"].clone()
        _load_state(module, state, Path(spec.weights))
        return module, "custom", "", source
    if not path.is_file():
        raise ConfigError(f"{source}: no such file (a weights file, a TorchScript file or "
                          f"module:factory)")
    try:
        module = load_torchscript(path)
        return module, "torchscript", "", ""
    except Exception:  # not TorchScript: a state dict or safetensors file
        pass
    if spec.arch is None:
        from pellucid.models.zoo import ARCHS

        raise ConfigError(f"{source}: a weights file; give --arch (one of {', '.join(ARCHS)}) or "
                          f"a module:factory that builds the network with --weights {source}")
    return None, spec.arch, spec.backend or "", ""  # built once the channels and classes are known


def _activation(spec: ImportSpec, task: str, outputs: int) -> str:
    if spec.activation is not None:
        if spec.activation not in ACTIVATIONS:
            raise ConfigError(f"--activation must be one of {', '.join(ACTIVATIONS)}, "
                              f"got {spec.activation!r}")
        if task == "regression" and spec.activation != "identity":
            raise ConfigError("a regression model's outputs are values: --activation identity")
        return spec.activation
    if task == "regression":
        return "identity"
    if outputs == 1:
        return "sigmoid"  # one output: a probability by the logistic function, nothing else fits
    raise ConfigError(f"the model has {outputs} outputs: give --activation softmax (exactly one "
                      f"class per {'pixel' if task == 'segmentation' else 'image'}) or sigmoid "
                      f"(each class on its own); pellucid does not guess it")


def _end_layers(module: nn.Module) -> tuple[str | None, str | None]:
    """State-dict names of the weights of the network's first convolution and of its output
    layer: the last convolution or linear layer in the module's own registration order (the
    order its constructor built it, which a safetensors file, sorted by name, does not keep)."""
    layers = [n for n, m in module.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d,
                                nn.ConvTranspose3d)) and getattr(m, "weight", None) is not None]
    convs = [n for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    first = f"{convs[0]}.weight" if convs else None
    return first, (f"{layers[-1]}.weight" if layers else None)


def _require_finite_weights(module: nn.Module, spec: ImportSpec) -> None:
    """Refuse a network with a NaN or infinite weight or buffer: every output would be undefined
    or, worse, silently constant after a softmax."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ConfigError(f"{spec.weights or spec.source}: {bad} non-finite value(s) in {name}; "
                              f"pellucid does not import a network with undefined weights")


def _check_size(size: list[int]) -> None:
    """--input-size within what a reader would accept (the default decode limits)."""
    import math

    from pellucid.guards import current_limits

    limits = current_limits()
    bound = limits.max_pixels if len(size) == 2 else limits.max_voxels
    if math.prod(size) > bound:
        raise ConfigError(f"--input-size {','.join(map(str, size))}: {math.prod(size):,} "
                          f"{'pixels' if len(size) == 2 else 'voxels'} is over the limit of "
                          f"{bound:,} that pellucid reads")


def import_model(spec: ImportSpec, out: str | Path,
                 find_layer: Callable[[nn.Module, torch.Tensor], str] | None = None) -> Path:
    """Check ``spec`` against the network and write the model folder ``out``. ``find_layer``
    (e.g. :func:`pellucid.explainers.default_layer`) names the CAM layer when ``spec`` does not;
    without either the card has none and the CAMs find it when they run."""
    from pellucid.models.zoo import build

    if spec.task not in TASKS:
        raise ConfigError(f"--task: give one of {', '.join(TASKS)}"
                          + (f", got {spec.task!r}" if spec.task else ""))
    if not spec.classes:
        raise ConfigError("--classes: give the names of the model's outputs, in output order "
                          "(e.g. --classes Atelectasis,Effusion,Nodule)")
    if not spec.input_size or any(v < 1 for v in spec.input_size) or len(spec.input_size) not in (2, 3):
        raise ConfigError("--input-size: give the size the model takes, e.g. 224,224 (2D) or "
                          "96,96,96 (3D)")
    _check_size(spec.input_size)
    module, arch, backend, factory = _network(spec)
    dims = len(spec.input_size)
    if module is None:  # one of pellucid's architectures, built to the stated channels and classes
        weights = Path(spec.source)
        state = _read_state_dict(weights)
        probe = build(arch, dims, spec.channels or 3, len(spec.classes), backend=spec.backend,
                      input_size=spec.input_size).module
        first, last = _end_layers(probe)  # found by the network's structure, not key order
        for name, what in ((first, "input channels"), (last, "outputs")):
            if name is not None and name in state and state[name].ndim < 2:
                raise ConfigError(f"{weights}: {name} is not a layer's weight matrix ({what})")
        channels = spec.channels or (int(state[first].shape[1]) if first in state else 3)
        if last in state and int(state[last].shape[0]) != len(spec.classes):
            raise ConfigError(f"--classes names {len(spec.classes)} outputs; the network gives "
                              f"{int(state[last].shape[0])} (its output layer {last})")
        built = build(arch, dims, channels, len(spec.classes), backend=spec.backend,
                      input_size=spec.input_size)
        module, backend = built.module, built.backend
        _load_state(module, state, weights)
    calibration = _calibration(module, spec)
    _require_finite_weights(module, spec)
    inferred = first_conv_channels(module)
    channels = spec.channels or inferred
    if channels is None:
        raise ConfigError("--channels: the network has no convolution to read its input channels "
                          "from; give them")
    if inferred is not None and channels != inferred:
        raise ConfigError(f"--channels {channels}: the network's first convolution takes {inferred}")
    example = torch.zeros(1, channels, *spec.input_size)
    module.eval()
    try:
        with torch.no_grad():
            out_tensor = module(example)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the network cannot take an input of {tuple(example.shape)}: {first}") \
            from None
    out_tensor = reduce_output(out_tensor, output_selector(spec.output))
    outputs = int(out_tensor.shape[1]) if out_tensor.ndim >= 2 else 1
    if outputs != len(spec.classes):
        raise ConfigError(f"--classes names {len(spec.classes)} outputs; the network gives {outputs}")
    if spec.task == "segmentation" and tuple(out_tensor.shape[2:]) != tuple(spec.input_size):
        raise ConfigError(f"a segmentation network returns a map the size of its input; this one "
                          f"returns {tuple(out_tensor.shape[2:])} for {tuple(spec.input_size)}")
    if spec.task != "segmentation" and out_tensor.ndim != 2:
        raise ConfigError(f"a {spec.task} network returns (batch, outputs); this one returns "
                          f"{tuple(out_tensor.shape)}: is the task segmentation?")
    activation = "sigmoid" if calibration is not None else _activation(spec, spec.task, outputs)
    layer = spec.layer
    if layer is None and arch != "torchscript" and find_layer is not None:
        layer = find_layer(module, example)  # the CLI's suggestion: the last down-sampled layer
    elif layer is not None:
        names = {n for n, _ in module.named_modules()}
        if layer not in names:
            raise ConfigError(f"--layer {layer!r} is not a layer of the network (pellucid layers "
                              f"lists them once imported)")
    card = ModelCard(arch=arch, task=spec.task, class_names=list(spec.classes), in_channels=channels,
                     spatial_dims=dims, input_size=list(spec.input_size), activation=activation,
                     backend=backend, normalization=_normalization(spec.normalization),
                     default_layer=layer, name=spec.name, version=spec.version,
                     pellucid_version=__version__, intended_use=dict(spec.intended_use),
                     factory=factory, resize=spec.resize,
                     output=spec.output, library=network_library(module),
                     thresholds=calibration or [],
                     training={"imported_from": str(spec.source),
                               **({"calibration": CALIBRATION} if calibration is not None else {})})
    out = Path(out)
    if arch == "torchscript":
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.source, out / TORCHSCRIPT)
        card.save(out / CARD)
        return out
    return save_model(out, module, card)
