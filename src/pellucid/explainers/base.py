"""What every explainer shares: the Explanation record, cost counting, the model guard, layer
lookup, hooks and post-processing (ReLU, up-sampling, per-sample min-max)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import time
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.errors import ConfigError, ModelError
from pellucid.models.outputs import reduce_output, selected_output, tensor_outputs
from pellucid.runtime import model_precision
from pellucid.targets import BoundTarget, Target, as_target

UPSAMPLE_MODES = ("linear", "nearest", "bspline")
NORMALIZE_MODES = ("minmax", "none")


@dataclass
class Cost:
    """Compute spent on one explanation call (all samples of the batch together):
    ``forward_samples`` counts the rows the model's output had over all calls (Ablation-CAM's
    ablated copies, expanded at its layer, count one each)."""

    forward_passes: int = 0
    forward_samples: int = 0
    backward_passes: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    macs: int | None = None  # multiply-accumulates the forward passes did (None: not counted)
    full_macs: int | None = None  # what full forwards of the same inputs would have done

    @property
    def work_ratio(self) -> float | None:
        """MACs done / MACs of full forwards: 1 for a method that runs the whole model on every
        input, below 1 where only the changed part was recomputed (incremental occlusion)."""
        if self.macs is None or not self.full_macs:
            return None
        return self.macs / self.full_macs

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Explanation:
    """Attributions (B, 1, *spatial) at input resolution on the inputs' device, and how they were
    made: method, bound target, layer, the raw low-resolution map and the cost."""

    attributions: torch.Tensor
    method: str
    target: BoundTarget
    layer: str | None = None
    raw: torch.Tensor | None = None
    cost: Cost = field(default_factory=Cost)
    output: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # the method's options, to re-explain

    def __len__(self) -> int:
        return self.attributions.shape[0]


class ModelRunner:
    """Calls the model and counts forward and backward passes; turns shape errors into one line."""

    def __init__(self, model: nn.Module, cost: Cost, input_gradients: bool = False,
                 modules: list[nn.Module] | None = None) -> None:
        self.model, self.cost = model, cost
        self.modules = modules  # the model's modules, when the caller walked the tree
        self._fast: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}
        # the method reads only the input gradient: the model may run as its checked
        # differentiable copy (pellucid.inference.gradient_copy), resolved once per input shape
        self.input_gradients = input_gradients
        self._copies: dict[tuple, Callable[[torch.Tensor], torch.Tensor] | None] = {}
        self.copy_used: str | None = None
        self.rows: Counter = Counter()  # inputs run forward, by input shape and dtype
        self.saved_macs = 0  # MACs an incremental forward did not need to do

    def count(self, x: torch.Tensor) -> None:
        """Count a forward of ``x``'s rows (the incremental forward counts its copies here too)."""
        self.cost.forward_passes += 1
        self.cost.forward_samples += x.shape[0]
        self.rows[(tuple(x.shape[1:]), x.dtype, x.device)] += x.shape[0]

    def count_macs(self) -> None:
        """Fill the cost's MACs: full forwards of every input run, less what incremental forwards
        saved. One forward's MACs are measured once per architecture and input shape (torch's FLOP
        counter, on a zero input, the model in eval mode) and then looked up per model object."""
        if not _countable(self.model):
            return
        known = _SEEN.setdefault(self.model, {})
        missing = [key for key in self.rows if key not in known]
        if missing:
            arch = _architecture(self.model)
            measure = any((arch, shape, dtype, device.type) not in _MACS
                          for shape, dtype, device in missing)
            with model_guard(self.model) if measure else contextlib.nullcontext():
                for shape, dtype, device in missing:
                    known[(shape, dtype, device)] = forward_macs(self.model, shape, dtype, device,
                                                                 arch)
        full = sum(rows * known[key] for key, rows in self.rows.items())
        if full:
            self.cost.full_macs = full
            self.cost.macs = full - self.saved_macs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count(x)
        run = self._gradient_copy(x) if self.input_gradients else None
        try:
            with model_precision(x.device.type) as mixed:
                out = run(x) if run is not None else self.model(x)
        except RuntimeError as exc:
            if "shape" in str(exc) or "size" in str(exc) or "channels" in str(exc):
                first = str(exc).strip().splitlines()[0]
                raise ModelError(f"the model cannot take input of shape {tuple(x.shape)}: "
                                 f"{first}") from None
            raise
        if not isinstance(out, torch.Tensor):  # already reduced under the model guard
            out = reduce_output(out, selected_output(self.model))
        return out.float() if mixed else out

    def _gradient_copy(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._copies:
            from pellucid.inference.gradient_copy import gradient_copy

            made = gradient_copy(self.model, x.detach(), self.modules)
            self._copies[key] = made.forward if made is not None else None
            if made is not None:
                self.copy_used = made.describe()
        return self._copies[key]

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward-only pass through the forward-only backend (:mod:`pellucid.inference`), resolved
        once per input shape for this runner, so one explanation runs on one backend."""
        from pellucid.explainers.accelerate import inference_forward

        self.count(x)
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        with torch.inference_mode():
            if key not in self._fast:
                self._fast[key] = inference_forward(self.model, x[:1])
            return self._fast[key](x)

    def backward(self, scalar: torch.Tensor, inputs: list[torch.Tensor],
                 create_graph: bool = False, retain_graph: bool = False) -> tuple[torch.Tensor, ...]:
        """d scalar / d inputs; ``create_graph`` keeps the gradient differentiable (a
        Hessian-vector product follows), ``retain_graph`` keeps the graph for another backward."""
        self.cost.backward_passes += 1
        return torch.autograd.grad(scalar, inputs, create_graph=create_graph,
                                   retain_graph=retain_graph or create_graph)


_MACS: dict[tuple, int] = {}  # MACs of one forward, by architecture and input shape
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the same, by model object


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: one reduction (a NaN or Inf makes the float64 sum non-finite),
    the elementwise test only where the sum is not finite."""
    if torch.isfinite(x.sum(dtype=torch.float64)):
        return True
    return bool(torch.isfinite(x).all())


def _countable(model: nn.Module) -> bool:
    """A model whose forward torch's FLOP counter can see and that is cheap to run once: not a
    runtime session, a TorchScript module or a sliding-window wrapper."""
    return not (getattr(model, "forward_only", False) or getattr(model, "runs_per_patch", False)
                or isinstance(model, torch.jit.ScriptModule))


def _architecture(model: nn.Module) -> tuple:
    """What a forward's MACs depend on besides the input: the module types and parameter shapes
    (a randomised or fine-tuned copy has the same count)."""
    return tuple((type(m), *(tuple(p.shape) for p in m._parameters.values() if p is not None))
                 for m in model.modules())


def forward_macs(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, architecture: tuple | None = None) -> int:
    """Multiply-accumulates of one forward of ``model`` on one input of ``shape`` (convolutions,
    matrix products, attention: ``torch.utils.flop_counter``), measured once per architecture and
    shape on a zero input; 0 for a model torch cannot see into (a runtime session)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (architecture or _architecture(model), shape, dtype, device.type)
    if key not in _MACS:
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(torch.zeros((1, *shape), dtype=dtype, device=device))
            _MACS[key] = counter.get_total_flops() // 2
        except Exception:  # a model the counter cannot run is not counted
            _MACS[key] = 0
    return _MACS[key]


def _status_kib(field_name: str) -> int | None:
    """A ``/proc/self/status`` memory field in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset the process's peak resident set (Linux ``clear_refs`` 5) and return the current
    resident set in KiB, so that ``VmHWM`` afterwards is the peak of what follows; None elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


@contextmanager
def model_guard(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[list]:
    """Put the model in eval mode with frozen parameters, its output reduced to one tensor
    (:mod:`pellucid.models.outputs`); on exit (also on error) remove every hook registered into the
    yielded list and restore train/eval modes and ``requires_grad``. ``modules``: the model's
    modules when the caller has walked the tree already."""
    if modules is None:
        modules = list(model.modules())  # one walk of the tree (this runs on every call)
    training = [m for m in modules if m.training]
    trainable = [p for m in modules for p in m._parameters.values()
                 if p is not None and p.requires_grad]
    handles: list = []
    try:
        if training:
            model.eval()
        for p in trainable:
            p.requires_grad_(False)
        with tensor_outputs(model):
            yield handles
    finally:
        for h in handles:
            h.remove()
        for m in training:
            m.training = True
        for p in trainable:
            p.requires_grad_(True)


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Find a layer by dotted name (or module); an unknown name lists the closest names."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ConfigError("the given layer module is not part of the model")
    names = [n for n, _ in model.named_modules() if n]
    if layer in names:
        return layer, model.get_submodule(layer)
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else "; list them with `pellucid layers`"
    raise ConfigError(f"unknown layer {layer!r}{hint}")


def _is_attention(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower() \
        or name.lower() in ("attn", "attention", "self_attention", "self_attn")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not list(module.children())


def attention_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks of ``model`` (modules with an attention child and a norm
    child: torchvision's, timm's, Hugging Face's and MONAI's blocks), in definition order."""
    return [name for name, module in model.named_modules() if name
            and any(_is_attention(n, c) for n, c in module.named_children())
            and any(_is_norm(c) for c in module.children())]


def candidate_layers(model: nn.Module, example: torch.Tensor) -> list[dict[str, Any]]:
    """Layers a CAM can use, in execution order: those whose output has a layout pellucid can read
    without asking (:mod:`pellucid.explainers.layouts`: channels-first or channels-last maps of the
    input's rank, or a token sequence), with their output shape, layout and grid. Runs one forward
    pass of ``example``."""
    from pellucid.explainers.layouts import detect_layout, patch_size

    def shapes_at(x: torch.Tensor, graph: bool = False) -> tuple[list, torch.Tensor]:
        seen: list[tuple[str, str, tuple[int, ...], Any]] = []
        with model_guard(model) as handles:
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_hook(
                        lambda mod, inp, out, name=name: seen.append(
                            (name, type(mod).__name__, tuple(out.shape), out.grad_fn))
                        if isinstance(out, torch.Tensor) and out.ndim in (example.ndim, 3) else None))
            with torch.set_grad_enabled(graph):
                output = model(x.clone().requires_grad_(graph))
        return seen, output

    seen, output = shapes_at(example, graph=True)
    # the layers the explained output depends on (not, e.g., a deep-supervision head): their
    # outputs' autograd nodes are reachable from the output's
    reachable, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in reachable:
            continue
        reachable.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    size, patch = tuple(example.shape[2:]), patch_size(model)
    grown: dict[str, tuple[int, ...]] = {}

    def probe(name: str) -> tuple[int, ...] | None:
        if not grown:  # one forward at twice the size, only when some layer needs it
            try:
                bigger = F.interpolate(example[:1], scale_factor=2, mode="nearest")
                grown.update({n: shape for n, _, shape, _ in shapes_at(bigger)[0]})
            except Exception:
                grown["(none)"] = ()
        return grown.get(name)

    runs = Counter(name for name, *_ in seen)  # a layer run per tile or mirroring: no CAM layer
    found: list[dict[str, Any]] = []
    for name, kind, shape, node in seen:
        if (node is not None and node not in reachable) or runs[name] > 1:
            continue
        try:
            layout = detect_layout(shape, size, patch=patch, probe=lambda name=name: probe(name))
        except ConfigError:
            continue
        found.append({"name": name, "type": kind, "shape": shape[1:], "layout": layout.kind,
                      "grid": layout.grid,
                      "channels": shape[1] if layout.kind == "channels_first" else shape[-1]})
    if found:
        found[0]["model_output_ndim"] = output.ndim
    del seen, output, reachable
    return found


def default_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The default CAM layer. A transformer classifier: the first norm of its last attention block
    (the input of the last attention, whose patch tokens still reach the class token; the peers'
    advice for ViT and Swin). Otherwise the last layer (in execution order) whose output is a
    channels-first map smaller than the input: the last convolutional block of a classifier, the
    deepest decoder stage of a U-Net."""
    size = tuple(example.shape[2:])
    found = candidate_layers(model, example)
    names = {info["name"] for info in found}
    classifier = bool(found) and found[0].get("model_output_ndim") == 2
    blocks = attention_blocks(model) if classifier else []
    if blocks:
        executed = [info["name"] for info in found]
        last_block = max(blocks, key=lambda b: max((i for i, n in enumerate(executed)
                                                    if n == b or n.startswith(b + ".")), default=-1))
        norms = [n for n in executed if n.startswith(last_block + ".") and n.count(".") ==
                 last_block.count(".") + 1 and _is_norm(model.get_submodule(n))]
        if norms and norms[0] in names:
            return norms[0]
    best = None
    for info in found:
        grid = info["grid"]
        usable = info["layout"] == "channels_first" and info["type"] != "Identity"
        smaller = all(s <= t for s, t in zip(grid, size, strict=True)) and tuple(grid) != size
        if usable and any(s > 1 for s in grid) and smaller:
            best = info["name"]
    if best is None and not found:
        raise ModelError("no layer runs once per forward pass with a map the model's output depends "
                         "on (a sliding window, test-time mirroring or an ensemble runs each layer "
                         "several times): a class activation map would be of one run only; use a "
                         "gradient or perturbation method")
    if best is None:
        raise ConfigError("no layer with a down-sampled spatial output found; pass layer=...")
    return best


def _bspline_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """(n_out, n_in) matrix of cubic B-spline interpolation with mirror boundaries, sampling
    ``n_out`` points evenly over [0, n_in - 1] (the corners aligned, as ``scipy.ndimage.zoom``)."""
    if n_in == 1:
        return torch.ones(n_out, 1, device=device, dtype=dtype)
    idx = torch.arange(n_in, dtype=torch.float64)

    def mirror(k: torch.Tensor) -> torch.Tensor:
        period = 2 * (n_in - 1)
        k = torch.remainder(k, period)
        return torch.where(k >= n_in, period - k, k)

    def bspline3(t: torch.Tensor) -> torch.Tensor:
        t = t.abs()
        return torch.where(t < 1, 2 / 3 - t**2 + t**3 / 2,
                           torch.where(t < 2, (2 - t) ** 3 / 6, torch.zeros_like(t)))

    # interpolation at the knots: samples = B @ coefficients; coefficients = B^-1 @ samples
    knots = torch.zeros(n_in, n_in, dtype=torch.float64)
    for off in (-1, 0, 1):
        weight = bspline3(torch.tensor(float(off), dtype=torch.float64)).expand(n_in)
        knots.index_put_((idx.long(), mirror(idx + off).long()), weight, accumulate=True)
    coords = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / max(n_out - 1, 1)
    base = torch.floor(coords)
    evaluate = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    for off in (-1, 0, 1, 2):
        k = base + off
        evaluate.index_put_((rows, mirror(k).long()), bspline3(coords - k), accumulate=True)
    return (evaluate @ torch.linalg.inv(knots)).to(device=device, dtype=dtype)


def upsample(maps: torch.Tensor, size: tuple[int, ...], mode: str = "linear") -> torch.Tensor:
    """Resize (B, C, *low) maps to ``size``: (bi/tri)linear with ``align_corners=False``, nearest,
    or cubic B-spline (``bspline``: equal to ``scipy.ndimage.zoom(order=3)``, pytorch-grad-cam's
    3D resize)."""
    if mode not in UPSAMPLE_MODES:
        raise ConfigError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=size, mode="nearest")
    if mode == "linear":
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(maps, size=size, mode=interp, align_corners=False)
    out = maps
    for axis, n_out in enumerate(size):
        dim = 2 + axis
        matrix = _bspline_matrix(out.shape[dim], n_out, out.device, out.dtype)
        out = torch.movedim(torch.movedim(out, dim, -1) @ matrix.T, -1, dim)
    return out


def minmax(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample (x - min) / (max - min + eps) over all but the batch dimension."""
    flat = maps.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (maps.ndim - 1)))
    shifted = maps - lo
    hi = shifted.flatten(1).max(1).values.view(-1, *([1] * (maps.ndim - 1)))
    return shifted / (hi + eps)


def postprocess(raw: torch.Tensor, size: tuple[int, ...], relu: bool, upsample_mode: str,
                normalize: str) -> torch.Tensor:
    """ReLU (optional), per-sample min-max (optional), up-sample to ``size``, then ReLU and min-max
    again: a cubic spline overshoots, and its overshoot below the map's minimum is clipped (as
    pytorch-grad-cam does for 3D); for linear up-sampling the second pass changes nothing."""
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    maps = raw.clamp_min(0) if relu else raw
    if normalize == "minmax":
        maps = minmax(maps)
    maps = upsample(maps, size, upsample_mode)
    if relu:
        maps = maps.clamp_min(0)
    return minmax(maps) if normalize == "minmax" else maps


class Explainer(ABC):
    """Base class. Subclasses are dataclasses of their options and implement ``_explain``."""

    name: ClassVar[str]
    family: ClassVar[str]
    needs_layer: ClassVar[bool] = False
    # what the caller must supply as options (vocabulary: explainers.registry.REQUIRES); the
    # benchmark gives each from its case set, e.g. "background": reference images of the dataset
    requires: ClassVar[frozenset[str]] = frozenset()
    # whether ``Explanation.raw`` holds one map per input channel (per-modality metrics use it)
    channel_maps: ClassVar[bool] = False
    # whether the method needs only forward passes, so that it runs on a black-box model (ONNX)
    black_box: ClassVar[bool] = False
    # whether it reads nothing but the input gradient of the output (no layer hook, no backward
    # rule), so that the model may run as its checked differentiable copy
    input_gradients: ClassVar[bool] = False

    @abstractmethod
    def _explain(self, runner: ModelRunner, model: nn.Module, inputs: torch.Tensor,
                 target: Target | BoundTarget | None, layer: str | None,
                 handles: list) -> Explanation:
        """Run the method inside the model guard; ``handles`` collects hooks to remove."""

    def explain(self, model: nn.Module, inputs: torch.Tensor,
                target: Target | BoundTarget | int | None = None,
                layer: str | nn.Module | None = None, activation: str | None = None) -> Explanation:
        """Explain ``model`` on ``inputs`` (B, C, *spatial) for ``target``."""
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (3, 4, 5):
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ConfigError(f"inputs must be a tensor (B, C, H, W) or (B, C, D, H, W), got {shape}")
        if not inputs.is_floating_point():
            raise ConfigError(f"inputs must be floating point, got {inputs.dtype}")
        if not all_finite(inputs):
            raise ConfigError(f"inputs hold {int((~torch.isfinite(inputs)).sum())} non-finite values "
                              f"(NaN or Inf); an explanation of undefined pixels means nothing")
        if getattr(model, "forward_only", False) and not self.black_box:
            usable = ", ".join(n for n, c in _registered().items() if c.black_box)
            what = getattr(model, "name", type(model).__name__)
            raise ModelError(f"{self.name} needs gradients or layer hooks, which the {what} does "
                             f"not have: it only runs forward; use one of: {usable}")
        self._activation = activation
        cost = Cost()
        device = inputs.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = reset_peak_rss() if device.type == "cpu" else None
        start = time.perf_counter()
        modules = list(model.modules())  # one walk of the tree, for the guard and the runner
        with model_guard(model, modules) as handles:
            runner = ModelRunner(model, cost, self.input_gradients, modules)
            layer_name = None
            if self.needs_layer:
                if getattr(model, "runs_per_patch", False):  # a sliding-window wrapper
                    raise ConfigError(f"{self.name} hooks a layer that a sliding window runs once "
                                      f"per patch; use a gradient or perturbation method, or "
                                      f"explain the network on one patch")
                if isinstance(model, torch.jit.ScriptModule):
                    raise ModelError(f"{self.name} needs layer hooks, which TorchScript models do "
                                     f"not support; load the model as an nn.Module")
                layer_name = resolve_layer(model, layer)[0] if layer is not None else \
                    default_layer(model, inputs[:1].detach())
            explanation = self._explain(runner, model, inputs.detach(), target, layer_name, handles)
        if explanation.output is not None and not all_finite(explanation.output):
            raise ModelError("the model's output on these inputs is not finite (NaN or Inf); "
                             "nothing to explain")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            cost.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
        elif rss_before is not None:
            peak = _status_kib("VmHWM")
            cost.peak_memory_bytes = max(0, peak - rss_before) * 1024 if peak is not None else None
        cost.seconds = time.perf_counter() - start
        runner.count_macs()  # after the timing: not the method's cost
        explanation.cost = cost
        if runner.copy_used is not None:
            explanation.extras.setdefault("gradient_copy", runner.copy_used)
        explanation.options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} \
            if dataclasses.is_dataclass(self) else {}
        return explanation

    def bind(self, target: Target | BoundTarget | int | None,
             output: torch.Tensor) -> BoundTarget:
        return as_target(target, output, getattr(self, "_activation", None))


def _registered() -> dict[str, type]:
    from pellucid.explainers.registry import REGISTRY

    return dict(REGISTRY.items())


def capture_layer(module: nn.Module, handles: list, grad: bool) -> dict[str, torch.Tensor]:
    """Hook ``module`` to record its output under ``store['activation']``. With ``grad``, the output
    is replaced by a differentiable copy whose leaf is ``store['leaf']``, so a backward pass stops at
    this layer and its gradient is ``leaf.grad``-equivalent (weights stay frozen). A layer that
    runs twice in the forward pass is refused: its record would be of one run only."""
    store: dict[str, torch.Tensor] = {}
    runs = [0]

    def hook(mod: nn.Module, inp: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"layer {type(mod).__name__} returns {type(out).__name__}, not a tensor")
        runs[0] += 1
        if runs[0] > 1:  # the map of one run (one tile, one mirroring) is not the model's map
            raise ModelError(f"layer {type(mod).__name__} runs more than once in one forward pass "
                             f"(a sliding window, test-time mirroring or an ensemble): a map of its "
                             f"activations would be of one run only; use a gradient or perturbation "
                             f"method")
        if grad:
            leaf = out.detach().requires_grad_(True)
            store["leaf"] = leaf
            store["activation"] = leaf.detach()
            return leaf.clone()
        store["activation"] = out.detach()
        return None

    handles.append(module.register_forward_hook(hook))
    return store


def replace_layer_output(module: nn.Module, handles: list,
                         fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Hook ``module`` so that its output ``y`` is replaced by ``fn(y)``."""
    handles.append(module.register_forward_hook(lambda mod, inp, out: fn(out)))
