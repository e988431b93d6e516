"""The layout of a layer's output, and its conversion to the channels-first maps (B, C, *grid) that
the CAM family combines.

=================  ===========================  ==================================================
layout             layer output                 typical layer
=================  ===========================  ==================================================
``channels_first``  (B, C, *grid)               a CNN stage; MONAI, smp, nnU-Net networks
``channels_last``   (B, *grid, C)               torchvision and timm Swin stages, ConvNeXt blocks'
                                                internal norms
``tokens``          (B, prefix + prod(grid), C)  a ViT block (class, distillation and register
                                                tokens first; they are dropped)
=================  ===========================  ==================================================

``layout="auto"`` detects the layout only where the shapes leave one reading:

- tokens: a 3-D output (B, N, C) of a 2-D or 3-D input. The grid is the input size over the
  model's patch size (its patch-embedding convolution, kernel = stride) or else over the one stride
  whose grid leaves 0 to 5 tokens over; those left over are the prefix. A second possible grid is
  refused: give ``grid=`` or ``prefix_tokens=``.
- channels-first against channels-last for an output of the input's rank: a reading is *plausible*
  when its grid is no larger than the input and one integer stride gives every axis of the grid
  from the input's (floor or ceiling). One plausible reading is taken. Two (e.g. (B, 32, 32, 32)
  for a 64-pixel input) are told apart by running the model once more on the input at twice its
  size: the axes that grow are the grid. A model that cannot take that input is refused. When
  neither reading is plausible (anisotropic strides), the reading whose grid fits inside the input
  is taken, and a tie is settled the same way.

A wrong guess here would silently compute a map over the channel axis; when the shapes cannot
decide, pellucid asks instead.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pellucid.errors import ConfigError

LAYOUTS = ("auto", "channels_first", "channels_last", "tokens")
MAX_PREFIX = 5  # a class token, a distillation token and up to four register tokens (at most 5)


@dataclass(frozen=True)
class FeatureLayout:
    """How a layer's output is laid out; converts it to channels-first maps and back."""

    kind: str
    grid: tuple[int, ...]
    prefix: int = 0

    def to_channels_first(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) from the layer's output (or its gradient, laid out alike)."""
        if self.kind == "channels_first":
            return t
        if self.kind == "channels_last":
            return torch.movedim(t, -1, 1)
        b, _, c = t.shape
        return t[:, self.prefix:, :].reshape(b, *self.grid, c).movedim(-1, 1)

    def from_channels_first(self, maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The layer's layout from channels-first ``maps``; prefix tokens are taken from ``like``
        (an output of the layer, broadcast over the batch)."""
        if self.kind == "channels_first":
            return maps
        if self.kind == "channels_last":
            return torch.movedim(maps, 1, -1)
        b, c = maps.shape[:2]
        patches = maps.movedim(1, -1).reshape(b, -1, c)
        prefix = like[:, :self.prefix, :].expand(b, self.prefix, c)
        return torch.cat([prefix.to(patches), patches], dim=1)

    def describe(self) -> str:
        text = f"{self.kind}, grid {'x'.join(map(str, self.grid))}"
        return text + (f", {self.prefix} prefix token(s) dropped" if self.prefix else "")


def patch_size(model: nn.Module) -> tuple[int, ...] | None:
    """The patch size of a vision transformer: the first convolution whose kernel equals its
    stride (> 1), i.e. a patch embedding; None when the model has none."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            kernel, stride = tuple(module.kernel_size), tuple(module.stride)
            if kernel == stride and max(kernel) > 1:
                return kernel
    return None


def _stride_fits(grid: tuple[int, ...], size: tuple[int, ...]) -> bool:
    """One integer stride gives every axis of ``grid`` from ``size`` (floor or ceiling)."""
    if len(grid) != len(size) or any(g < 1 or g > s for g, s in zip(grid, size, strict=True)):
        return False
    for stride in {max(1, round(s / g)) for g, s in zip(grid, size, strict=True)}:
        if all(g in (s // stride, math.ceil(s / stride)) for g, s in zip(grid, size, strict=True)):
            return True
    return False


def _fits(grid: tuple[int, ...], size: tuple[int, ...]) -> bool:
    return len(grid) == len(size) and all(1 <= g <= s for g, s in zip(grid, size, strict=True))


def _token_grids(n: int, size: tuple[int, ...], patch: tuple[int, ...] | None,
                 prefix: int | None) -> list[tuple[tuple[int, ...], int]]:
    allowed = range(0, MAX_PREFIX + 1) if prefix is None else (prefix,)
    if patch is not None and len(patch) == len(size):
        grid = tuple(s // p for s, p in zip(size, patch, strict=True))
        if n - math.prod(grid) in allowed:
            return [(grid, n - math.prod(grid))]
    found: dict[tuple[int, ...], int] = {}
    for stride in range(1, max(size) + 1):
        for grid in (tuple(s // stride for s in size), tuple(math.ceil(s / stride) for s in size)):
            if min(grid) >= 1 and n - math.prod(grid) in allowed:
                found.setdefault(grid, n - math.prod(grid))
    return list(found.items())


def detect_layout(shape: tuple[int, ...], size: tuple[int, ...], layout: str = "auto",
                  grid: tuple[int, ...] | None = None, prefix_tokens: int | None = None,
                  patch: tuple[int, ...] | None = None, layer: str = "the layer",
                  probe: Callable[[], tuple[int, ...] | None] | None = None) -> FeatureLayout:
    """The layout of an output of ``shape`` (batch first) for inputs of spatial ``size``; see the
    module docstring. ``probe`` returns the layer's output shape for the input at twice its size
    (None when the model cannot take it). Raises a one-line :class:`ConfigError` when it cannot be
    sure."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    size, shape = tuple(size), tuple(shape)
    rank = len(size)
    hint = "; say layout='tokens', 'channels_last' or 'channels_first' (and grid=...)"
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        if len(grid) != rank:
            raise ConfigError(f"grid={grid} has {len(grid)} axes; the inputs have {rank}")
    if layout == "tokens" or (layout == "auto" and len(shape) == 3 and rank >= 2):
        if len(shape) != 3:
            raise ConfigError(f"{layer} outputs shape {shape}; tokens are (B, N, C)")
        n = shape[1]
        if grid is not None:
            prefix = n - math.prod(grid) if prefix_tokens is None else prefix_tokens
            if prefix < 0 or prefix + math.prod(grid) != n:
                raise ConfigError(f"{layer} outputs {n} tokens; grid={grid} with {prefix} prefix "
                                  f"token(s) does not add up")
            return FeatureLayout("tokens", grid, prefix)
        options = _token_grids(n, size, patch, prefix_tokens)
        if len(options) == 1:
            return FeatureLayout("tokens", *options[0])
        if not options:
            raise ConfigError(f"{layer} outputs {n} tokens, which no patch grid of the input "
                              f"{'x'.join(map(str, size))} explains; give grid=... (and prefix_tokens=...)")
        readings = "; ".join(f"grid {'x'.join(map(str, g))} + {p} prefix" for g, p in options[:4])
        raise ConfigError(f"{layer} outputs {n} tokens, which could be {readings}; give grid=... "
                          f"or prefix_tokens=...")
    if len(shape) != rank + 2:
        raise ConfigError(f"{layer} outputs shape {shape}; a CAM layer must output (B, C, *grid), "
                          f"(B, *grid, C) or tokens (B, N, C) for inputs of {rank} spatial axes")
    first, last = shape[2:], shape[1:-1]
    if layout == "channels_first" or layout == "channels_last":
        chosen = first if layout == "channels_first" else last
        if grid is not None and tuple(grid) != chosen:
            raise ConfigError(f"{layer}: grid={grid} but the {layout} grid is {chosen}")
        return FeatureLayout(layout, chosen)
    if grid is not None:
        matches = [k for k, g in (("channels_first", first), ("channels_last", last)) if g == grid]
        if len(matches) == 1:
            return FeatureLayout(matches[0], grid)
    for test in (_stride_fits, _fits):
        cf, cl = test(first, size), test(last, size)
        if cf and cl:
            grown = probe() if probe is not None else None
            if grown is not None and len(grown) == len(shape):
                changed = [i for i in range(1, len(shape)) if grown[i] != shape[i]]
                if changed == list(range(2, len(shape))):
                    return FeatureLayout("channels_first", first)
                if changed == list(range(1, len(shape) - 1)):
                    return FeatureLayout("channels_last", last)
            raise ConfigError(f"{layer} outputs shape {shape}: the channel axis could be the first "
                              f"or the last, and the model could not tell on a larger input{hint}")
        if cf:
            return FeatureLayout("channels_first", first)
        if cl:
            return FeatureLayout("channels_last", last)
    raise ConfigError(f"{layer} outputs shape {shape}, whose grid fits neither axis order of the "
                      f"input {'x'.join(map(str, size))}{hint}")


_GROWN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {(model, shape): shape}


def grown_shape(model: nn.Module, module: nn.Module, example: torch.Tensor) -> tuple[int, ...] | None:
    """The output shape of ``module`` when ``model`` runs on ``example`` (one sample) at twice its
    spatial size; None when the model cannot take that input. Remembered per layer, model and
    input shape (shapes do not depend on the weights), so the extra forward runs once."""
    key = (id(model), tuple(example.shape[1:]), example.dtype)
    known = _GROWN.setdefault(module, {})
    if key not in known:
        known[key] = _grown_shape(model, module, example)
    return known[key]


def _grown_shape(model: nn.Module, module: nn.Module, example: torch.Tensor) -> tuple[int, ...] | None:
    bigger = torch.nn.functional.interpolate(example[:1], scale_factor=2, mode="nearest")
    store: dict[str, tuple[int, ...]] = {}

    def hook(mod: nn.Module, inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            store.setdefault("shape", tuple(out.shape))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(bigger)
    except Exception:
        return None
    finally:
        handle.remove()
    return store.get("shape")
