"""Exact incremental inference for inputs that differ from one clean input inside one box each
(Nakandala et al., "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN
Explanations" (Krypton), SIGMOD 2019).

The network is traced once (``torch.fx``) and run once on the clean input, keeping every node's
value. A batch of perturbed copies is then carried through the graph as a :class:`Region`: the
clean value, plus per row one box (the same size for every row, at its own corner) that holds the
only values that can differ. Per node:

- sliding operators (convolution with zero padding, max pooling, average pooling counting its
  padding) compute only the output box that the input box can reach: output positions
  ``o`` with ``o s - p <= b_end - 1`` and ``o s - p + (k - 1) d >= b_start``, from the input window
  under that box (the clean value around the rows' box, the padding value outside the map);
- per-channel and element-wise operators (BatchNorm with running statistics, activations,
  dropout in eval mode, scalar arithmetic) run on the box alone;
- additions and products of two regions run on the union of their boxes; a channel
  concatenation is the clean concatenation's window with each region's box on top (one gather);
- everything else (global pooling, flatten, linear layers, attention, instance or layer
  normalisation, whose statistics span the map) gets the full tensors, rebuilt from the clean value
  and the boxes, and runs as in the model: from there on that branch is a full forward.

A ReLU whose input is a fresh value (a convolution's, normalisation's, pooling's, sum's or
concatenation's) read by nothing else runs in place, and each value is dropped after its last
reader: fewer new buffers, whose first touch costs as much as a pass over them.

Values equal the full forward's up to the order of floating-point sums (the box convolution sums
the same products); its user checks them against the full forward before trusting them
(:mod:`pellucid.explainers.occlusion_plan`). Multiply-accumulates are counted (per node, by
``torch.utils.flop_counter`` on the clean pass) so the saving is measured, not estimated.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from pellucid.models.outputs import reduce_output, selected_output

ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU,
                       nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
                       nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                       nn.AlphaDropout)
ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu,
                         F.silu, F.leaky_relu, F.elu, F.relu6, F.hardswish, F.mish, F.softplus,
                         F.dropout}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float"}
BINARY = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub}
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass
class Region:
    """Rows that equal ``clean`` (1, C, *S) except inside one box each: ``patch`` (n, C, *h) at
    corner ``start`` (n, nd) (long)."""

    clean: torch.Tensor
    patch: torch.Tensor
    start: torch.Tensor
    tables: dict | None = None  # the engine's padded clean values, shared by its regions

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.patch.shape[2:])

    @property
    def rows(self) -> int:
        return self.patch.shape[0]


def _table(clean: torch.Tensor, lo: list[int], hi: list[int], fill: float,
           tables: dict | None) -> torch.Tensor:
    """``clean`` (1, C, *S) padded by ``lo``/``hi`` with ``fill``, as (positions, C): the rows a
    window gathers. Kept in ``tables`` while the clean pass lasts."""
    key = (id(clean), tuple(lo), tuple(hi), fill)
    table = tables.get(key) if tables is not None else None
    if table is None:
        nd = clean.ndim - 2
        padded = clean
        if any(lo) or any(hi):
            padded = F.pad(clean, [v for a in reversed(range(nd)) for v in (lo[a], hi[a])],
                           value=fill)
        table = padded[0].reshape(clean.shape[1], -1).t().contiguous()
        if tables is not None:
            tables[key] = table
    return table


def _gather_index(spatial: tuple[int, ...], corner: torch.Tensor, size: tuple[int, ...]
                  ) -> tuple[list[int], list[int], torch.Tensor]:
    """The padding (``lo``, ``hi`` per axis) that boxes of ``size`` at ``corner`` (n, nd) need,
    and each box position's row (n * prod(size)) in the padded map's table."""
    nd, n, device = len(spatial), corner.shape[0], corner.device
    lo = corner.min(0).values.clamp(max=0).neg()
    hi = (corner.max(0).values + torch.tensor(size, device=device)
          - torch.tensor(spatial, device=device)).clamp(min=0)
    full = [s + a + b for s, a, b in zip(spatial, lo.tolist(), hi.tolist(), strict=True)]
    flat = torch.zeros((n, *([1] * nd)), dtype=torch.long, device=device)
    for a in range(nd):
        shape = [n, *[-1 if b == a else 1 for b in range(nd)]]
        ax = corner[:, a:a + 1] + lo[a] + torch.arange(size[a], device=device)
        flat = flat + (ax * math.prod(full[a + 1:])).view(shape)
    return lo.tolist(), hi.tolist(), flat.reshape(-1)


def _placement(r: Region, corner: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Each of ``r``'s box positions' row in boxes of ``size`` at ``corner`` stacked row by row;
    a position outside its row's box goes to the spare row ``n * prod(size)``."""
    n, nd, device = r.rows, corner.shape[1], corner.device
    length = math.prod(size)
    target = torch.arange(n, device=device).view(n, *([1] * nd)) * length
    valid = torch.ones((n, *([1] * nd)), dtype=torch.bool, device=device)
    rel = r.start - corner
    for a in range(nd):
        shape = [n, *[-1 if b == a else 1 for b in range(nd)]]
        pos = rel[:, a:a + 1] + torch.arange(r.size[a], device=device)
        target = target + (pos * math.prod(size[a + 1:])).view(shape)
        valid = valid & ((pos >= 0) & (pos < size[a])).view(shape)
    return torch.where(valid, target, n * length).reshape(-1)


def _same_box(r: Region, corner: torch.Tensor, size: tuple[int, ...]) -> bool:
    return tuple(size) == r.size and torch.equal(corner, r.start)


def window(r: Region, corner: torch.Tensor, size: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
    """(n, C, *size), channels last: each row's values in the box at ``corner`` (n, nd), which may
    reach past the map (those positions take ``fill``, the operator's padding value)."""
    if _same_box(r, corner, size):
        return r.patch
    return stacked_window(r.clean, [r], corner, size, fill, r.tables)


def stacked_window(clean: torch.Tensor, parts: list[Region], corner: torch.Tensor,
                   size: tuple[int, ...], fill: float = 0.0, tables: dict | None = None
                   ) -> torch.Tensor:
    """:func:`window` of regions whose clean values, stacked along the channels, are ``clean``:
    the channel concatenation of their windows, gathered once."""
    n, c = parts[0].rows, clean.shape[1]
    lo, hi, flat = _gather_index(tuple(clean.shape[2:]), corner, size)
    table = _table(clean, lo, hi, fill, tables)
    length = math.prod(size)
    out = torch.empty((n * length + 1, c), dtype=table.dtype, device=corner.device)
    torch.index_select(table, 0, flat, out=out[:-1])
    placed = out[:-1].view(n, *size, c)
    first = 0
    for r in parts:  # the rows' boxes on top; positions outside the window go to the spare row
        width = r.patch.shape[1]
        if _same_box(r, corner, size):
            placed[..., first:first + width] = r.patch.movedim(1, -1)
        else:
            out[:, first:first + width].index_copy_(0, _placement(r, corner, size),
                                                    r.patch.movedim(1, -1).reshape(-1, width))
        first += width
    return placed.movedim(-1, 1)


def dense(value):
    """A Region's full rows (n, C, *S); anything else as it is."""
    if isinstance(value, Region):
        zero = torch.zeros_like(value.start)
        return window(value, zero, tuple(value.clean.shape[2:]))
    return value


def _fit(lo: torch.Tensor, size: int, length: int) -> tuple[torch.Tensor, int]:
    """Corners moved so that a box of ``size`` stays inside ``length``; the whole axis when the box
    would not fit."""
    if size >= length:
        return torch.zeros_like(lo), length
    return torch.minimum(lo.clamp(min=0), torch.full_like(lo, length - size)), size


def sliding(r: Region, out_spatial: tuple[int, ...], kernel, stride, padding, dilation, fill: float,
            op: Callable[[torch.Tensor], torch.Tensor]) -> Region | torch.Tensor:
    """The output box a sliding operator's input box reaches, computed from its input window with
    ``op`` (the operator without padding)."""
    nd = len(out_spatial)
    corners, sizes, wcorners, wsizes = [], [], [], []
    for a in range(nd):
        k, s, p, d = kernel[a], stride[a], padding[a], dilation[a]
        b0 = r.start[:, a]
        b1 = b0 + r.size[a] - 1
        lo = torch.div(b0 + p - (k - 1) * d + s - 1, s, rounding_mode="floor").clamp(min=0)
        hi = torch.div(b1 + p, s, rounding_mode="floor").clamp(max=out_spatial[a] - 1)
        size = max(int((hi - lo + 1).max()), 1)
        lo, size = _fit(lo, size, out_spatial[a])
        corners.append(lo)
        sizes.append(size)
        wcorners.append(lo * s - p)
        wsizes.append((size - 1) * s + (k - 1) * d + 1)
    win = window(r, torch.stack(wcorners, 1), tuple(wsizes), fill)
    out = op(win)
    if tuple(sizes) == tuple(out_spatial):
        return out
    return Region(clean=None, patch=out, start=torch.stack(corners, 1))  # clean set by the caller


def union(regions: list[Region]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The smallest box (one size for all rows) holding every region's box, row by row."""
    spatial = regions[0].clean.shape[2:]
    corners, sizes = [], []
    for a in range(len(spatial)):
        lo = torch.stack([r.start[:, a] for r in regions]).min(0).values
        hi = torch.stack([r.start[:, a] + r.size[a] for r in regions]).max(0).values
        lo, size = _fit(lo, int((hi - lo).max()), spatial[a])
        corners.append(lo)
        sizes.append(size)
    return torch.stack(corners, 1), tuple(sizes)


def _tuple(v, nd: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


class IncrementalForward:
    """A traced model that evaluates boxes-perturbed copies of one clean input incrementally.

    ``IncrementalForward(model)`` raises RuntimeError (one line) when the model cannot be traced.
    ``prepare(x)`` runs the clean pass for one input (1, C, *S); ``__call__(patches, corners)``
    returns the model's output (n, ...) on the clean input with the box at ``corners[i]``
    replaced by ``patches[i]``, and ``macs`` counts the multiply-accumulates done so far.
    """

    def __init__(self, model: nn.Module) -> None:
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise RuntimeError(f"the model cannot be traced by torch.fx ({first})") from None
        try:  # a copy, BatchNorm after a convolution folded into it (fewer passes over each box)
            from torch.fx.experimental.optimization import fuse

            with torch.no_grad():
                self.graph_module = fuse(self.graph_module, no_trace=True)
        except Exception:
            self.graph_module = copy.deepcopy(self.graph_module)
        self.output_index = selected_output(model)
        _functional(self.graph_module)
        with torch.no_grad():  # the convolutions' weights in the layout of their inputs
            for module in self.graph_module.modules():
                if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.weight.device.type == "cpu":
                    fmt = torch.channels_last if module.weight.ndim == 4 else torch.channels_last_3d
                    module.weight.data = module.weight.data.contiguous(memory_format=fmt)
        self.modules = dict(self.graph_module.named_modules())
        self.nodes = list(self.graph_module.graph.nodes)
        self.last_use = _last_uses(self.nodes)
        self.in_place = {node for node in self.nodes if self._rectifies_its_own_input(node)}
        if sum(n.op == "placeholder" for n in self.nodes) != 1:
            raise RuntimeError("the model takes more than one input")
        self.clean: dict[fx.Node, object] = {}
        self.macs = 0
        self.full_macs_per_row = 0
        self.node_macs: dict[fx.Node, int] = {}  # per row, on the prepared input's shape
        self._counted: dict[tuple, dict[fx.Node, int]] = {}  # node_macs by input shape
        self.decisions: dict[tuple, dict] = {}  # what its users measured (occlusion's "auto")
        self.tables: dict[tuple, torch.Tensor] = {}
        self.lock = threading.Lock()  # one caller at a time (the clean pass is shared state)

    def _rectifies_its_own_input(self, node: fx.Node) -> bool:
        """A ReLU whose input is a fresh tensor (a convolution's, a normalisation's, a pooling's,
        a sum's or a concatenation's output) that nothing else reads: it may run in place."""
        relu = (node.op == "call_module" and type(self.modules[node.target]) is nn.ReLU) or \
            (node.op == "call_function" and node.target in (F.relu, torch.relu) and
             not node.kwargs) or (node.op == "call_method" and node.target == "relu")
        if not relu or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            return False
        source = node.args[0]
        if len(source.users) != 1:
            return False
        if source.op == "call_module":
            return isinstance(self.modules[source.target],
                              (*CONVS, *MAX_POOLS, *AVG_POOLS, nn.modules.batchnorm._BatchNorm))
        return source.op == "call_function" and "out" not in source.kwargs and \
            (source.target in BINARY or source.target is torch.cat)  # out=: not a fresh tensor

    def _run(self, node: fx.Node, args, kwargs):
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            value = self.graph_module
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        raise RuntimeError(f"unexpected node {node.op}")

    def release(self) -> None:
        """Drop the clean pass's values (the activations of one input)."""
        self.clean, self.tables = {}, {}

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Run the clean pass on ``x`` (1, C, *S), keep every node's value; return the output."""
        if x.shape[0] != 1:
            raise ValueError("prepare takes one input")
        env: dict[fx.Node, object] = {}
        self.tables.clear()
        known = self._counted.get((tuple(x.shape), x.dtype))
        counter = FlopCounterMode(display=False) if known is None else contextlib.nullcontext()
        macs: dict[fx.Node, int] = {}
        with counter:  # the MACs per node: once per input shape (the counter slows the pass)
            for node in self.nodes:
                if node.op == "placeholder":
                    env[node] = x
                elif node.op == "output":
                    out = fx.node.map_arg(node.args[0], lambda a: env[a])
                else:
                    args = fx.node.map_arg(node.args, lambda a: env[a])
                    kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                    before = counter.get_total_flops() if known is None else 0
                    env[node] = self._run(node, args, kwargs)
                    if known is None:
                        macs[node] = (counter.get_total_flops() - before) // 2
        if known is None:
            known = self._counted[(tuple(x.shape), x.dtype)] = macs
        self.node_macs = known
        self.clean = env
        self.full_macs_per_row = sum(self.node_macs.values())
        return out if isinstance(out, torch.Tensor) else reduce_output(out, self.output_index)

    def _incremental(self, node: fx.Node, args, kwargs):
        """Node ``node`` on region arguments, or NotImplemented where it has no incremental rule."""
        out_shape = tuple(self.clean[node].shape[2:]) if isinstance(self.clean[node], torch.Tensor) \
            else None
        if node.op == "call_function" and node.target is torch.cat and out_shape is not None:
            tensors = args[0] if args and isinstance(args[0], (list, tuple)) else None
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return NotImplemented if tensors is None else \
                self._cat(tensors, dim, out_shape, self.clean[node])
        regions = [a for a in args if isinstance(a, Region)]
        if not regions or any(isinstance(v, Region) for v in kwargs.values()):
            return NotImplemented
        r = regions[0]
        nd = r.start.shape[1]
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if len(args) == 1:
            if module is not None:
                if isinstance(module, CONVS) and module.padding_mode == "zeros" \
                        and not isinstance(module.padding, str):
                    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
                    return sliding(r, out_shape, module.kernel_size, module.stride, module.padding,
                                   module.dilation, 0.0,
                                   lambda w: conv(w, module.weight, module.bias, module.stride, 0,
                                                  module.dilation, module.groups))
                if isinstance(module, MAX_POOLS) and not module.return_indices:
                    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
                    k = _tuple(module.kernel_size, nd)
                    s = _tuple(module.stride or module.kernel_size, nd)
                    d = _tuple(module.dilation, nd)
                    return sliding(r, out_shape, k, s, _tuple(module.padding, nd), d, -math.inf,
                                   lambda w: pool(w, k, s, 0, d, ceil_mode=module.ceil_mode))
                if isinstance(module, AVG_POOLS) and module.divisor_override is None and \
                        not module.ceil_mode and (module.count_include_pad or
                                                  not any(_tuple(module.padding, nd))):
                    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
                    k = _tuple(module.kernel_size, nd)
                    s = _tuple(module.stride or module.kernel_size, nd)
                    return sliding(r, out_shape, k, s, _tuple(module.padding, nd), (1,) * nd, 0.0,
                                   lambda w: pool(w, k, s, 0))
                frozen_norm = isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                    module.running_mean is not None and not module.training
                if frozen_norm or (isinstance(module, ELEMENTWISE_MODULES) and not module.training):
                    return Region(None, module(r.patch), r.start)
                return NotImplemented
            if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS and \
                    not kwargs.get("training", node.target is F.dropout):  # its default: True
                return Region(None, node.target(r.patch, **kwargs), r.start)
            if node.op == "call_method" and node.target in ELEMENTWISE_METHODS and not kwargs:
                return Region(None, getattr(r.patch, node.target)(), r.start)
            return NotImplemented
        if node.op == "call_function" and node.target in BINARY and len(args) == 2 and not kwargs:
            a, b = args
            if all(isinstance(v, Region) for v in args):
                corner, size = union([a, b])
                return self._boxed(node.target(window(a, corner, size), window(b, corner, size)),
                                   corner, out_shape)
            scalar = b if isinstance(a, Region) else a
            if isinstance(scalar, (int, float)):
                patch = node.target(a.patch, b) if isinstance(a, Region) else node.target(a, b.patch)
                return Region(None, patch, r.start)
            return NotImplemented
        return NotImplemented

    def _box_macs(self, node: fx.Node, value) -> int:
        """Multiply-accumulates of a node computed on boxes: its per-row count scaled by the share
        of the output it computed (a convolution's cost is proportional to its output size)."""
        per_row = self.node_macs.get(node, 0)
        if not per_row:
            return 0
        patch = value.patch if isinstance(value, Region) else value
        full = self.clean[node]
        return patch.shape[0] * per_row * math.prod(patch.shape[2:]) // math.prod(full.shape[2:])

    def _boxed(self, patch: torch.Tensor, corner: torch.Tensor, out_shape) -> Region | torch.Tensor:
        if tuple(patch.shape[2:]) == tuple(out_shape):
            return patch
        return Region(None, patch, corner)

    def _cat(self, tensors, dim, out_shape, clean: torch.Tensor):
        """A channel concatenation of regions on the union of their boxes: the clean
        concatenation's window, each region's box on top."""
        ndim = len(out_shape) + 2
        if dim % ndim != 1:
            return NotImplemented
        regions = [t for t in tensors if isinstance(t, Region)]
        if len(regions) != len(tensors):
            return NotImplemented
        corner, size = union(regions)
        return self._boxed(stacked_window(clean, regions, corner, size, 0.0, self.tables), corner,
                           out_shape)

    @torch.no_grad()
    def __call__(self, patches: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """The output (n, ...) on the prepared input with ``patches`` (n, C, *h) at ``corners``."""
        env: dict[fx.Node, object] = {}
        n = patches.shape[0]
        for node in self.nodes:
            for done in self.last_use.get(node, ()):  # values no later node reads
                del env[done]
            if node in self.in_place:
                value = env[node.args[0]]
                env[node] = Region(self.clean[node], value.patch.relu_(), value.start, self.tables) \
                    if isinstance(value, Region) else value.relu_()
                continue
            if node.op == "placeholder":
                env[node] = Region(self.clean[node], _channels_last(patches), corners, self.tables)
                continue
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda a: dense(env[a]))
                continue
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            value = NotImplemented if node.op == "get_attr" else \
                self._incremental(node, args, kwargs)
            if value is NotImplemented:
                args = fx.node.map_aggregate(args, dense)
                kwargs = fx.node.map_aggregate(kwargs, dense)
                value = self._run(node, args, kwargs)
                self.macs += n * self.node_macs.get(node, 0)
            else:
                if isinstance(value, Region):
                    value.clean, value.tables = self.clean[node], self.tables
                self.macs += self._box_macs(node, value)
            env[node] = value
        return out if isinstance(out, torch.Tensor) else reduce_output(out, self.output_index)


def _last_uses(nodes: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """Per node, the earlier nodes whose last reader it precedes (their values can go before it
    runs)."""
    last: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(nodes[:-1]):  # the output node's arguments stay
        for arg in node.all_input_nodes:
            last[arg] = nodes[i + 1]
    for arg in nodes[-1].all_input_nodes:
        last.pop(arg, None)
    out: dict[fx.Node, list[fx.Node]] = {}
    for value, after in last.items():
        out.setdefault(after, []).append(value)
    return out


IN_PLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv,
                      F.relu_: F.relu, torch.relu_: torch.relu}


def _functional(graph_module: fx.GraphModule) -> None:
    """Every in-place operation of the traced copy made out-of-place (modules' ``inplace``, ``+=``,
    ``relu_``...): a box shared by two consumers must not change under one of them, and the clean
    pass must keep each node's own value. A model whose result relied on the aliasing gives another
    output, which the clean-input check catches."""
    for module in graph_module.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            node.target = IN_PLACE_FUNCTIONS.get(node.target, node.target)
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target.endswith("_") and \
                not node.target.startswith("_") and \
                callable(getattr(torch.Tensor, node.target[:-1], None)):
            node.target = node.target[:-1]
    graph_module.recompile()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return x.contiguous(memory_format=fmt) if fmt else x


