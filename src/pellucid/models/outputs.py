"""From whatever a model returns to the one tensor pellucid explains.

Model libraries return more than a tensor: Hugging Face models a ``ModelOutput`` (a dict with
attribute access), torchvision's segmentation models ``{"out": ..., "aux": ...}``, nnU-Net with deep
supervision a list of outputs from the full resolution down, Inception-style networks a named tuple.
The rule (``output=None``), applied recursively until a tensor is reached:

- a tensor is itself;
- a mapping (dict, ``ModelOutput``) or a dataclass gives its ``logits``, else its ``out``, else its
  only tensor-valued entry; several candidates and none of those keys is refused, naming the keys;
- a tuple or list gives its first element (the main output: nnU-Net's and MONAI DynUNet's
  full-resolution head, a classifier's logits before auxiliary heads).

``output=`` overrides the rule: a key or attribute name (``"logits"``, ``"out"``), an index into a
tuple or list, or a callable from the raw output to a tensor. It is set once on the model with
:func:`select_output` (recorded on the model card as ``output``) and applied wherever pellucid calls
the model, through a forward hook installed only while pellucid runs it (:func:`tensor_outputs`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pellucid.errors import ModelError

Selector = str | int | Callable[[Any], torch.Tensor] | None
_ATTRIBUTE = "_pellucid_output"
_PREFERRED = ("logits", "out")


def _entries(out: Any) -> dict[str, Any] | None:
    if isinstance(out, Mapping):
        return dict(out.items())
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return None


def reduce_output(out: Any, select: Selector = None) -> torch.Tensor:
    """The tensor of a model output ``out`` by the module's rule, or by ``select``."""
    if select is not None:
        if callable(select):
            picked = select(out)
        elif isinstance(select, int):
            if not isinstance(out, (tuple, list)):
                raise ModelError(f"output={select}: the model returns {type(out).__name__}, not a "
                                 f"tuple or list")
            if not -len(out) <= select < len(out):
                raise ModelError(f"output={select}: the model returns {len(out)} outputs")
            picked = out[select]
        else:
            entries = _entries(out)
            if entries is None or select not in entries:
                keys = ", ".join(entries) if entries else type(out).__name__
                raise ModelError(f"output={select!r}: the model's output has no such entry "
                                 f"(it has: {keys})")
            picked = entries[select]
        return reduce_output(picked)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        if not out:
            raise ModelError("the model returns an empty tuple; nothing to explain")
        return reduce_output(out[0])
    entries = _entries(out)
    if entries is not None:
        for key in _PREFERRED:
            if entries.get(key) is not None:
                return reduce_output(entries[key])
        tensors = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ModelError(f"the model returns {type(out).__name__} with entries "
                         f"{', '.join(entries) or 'none'}; say which to explain with output=...")
    raise ModelError(f"the model returns {type(out).__name__}, not a tensor; say what to explain "
                     f"with output=...")


def select_output(model: nn.Module, select: Selector) -> nn.Module:
    """Record on ``model`` which part of its output pellucid explains (see the module docstring);
    ``None`` restores the rule. The model itself is unchanged; it returns ``model``."""
    if select is not None and not isinstance(select, (str, int)) and not callable(select):
        raise ModelError(f"output= must be a key, an index or a callable, got {type(select).__name__}")
    setattr(model, _ATTRIBUTE, select)
    return model


def output_selector(text: str | None) -> Selector:
    """The selector a model card or command line writes as text: "" = the rule, digits = an
    index, anything else = a key or attribute."""
    if not text:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def selected_output(model: nn.Module) -> Selector:
    return getattr(model, _ATTRIBUTE, None)


def forward_tensor(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` reduced to its one tensor, by the model's selector or the rule."""
    out = model(x)
    return out if isinstance(out, torch.Tensor) else reduce_output(out, selected_output(model))


_USERS: dict[int, list] = {}  # id(model) -> [users inside tensor_outputs, hook handle]
_USERS_LOCK = threading.Lock()


@contextmanager
def tensor_outputs(model: nn.Module) -> Iterator[None]:
    """While inside, calling ``model`` returns one tensor (by its selector or the rule). Nested
    and concurrent uses share one hook, removed when the last of them leaves."""
    if isinstance(model, torch.jit.ScriptModule):  # no hooks; ModelRunner reduces its outputs
        yield
        return

    def hook(module: nn.Module, inputs: Any, out: Any) -> torch.Tensor | None:
        select = selected_output(module)
        if select is None and isinstance(out, torch.Tensor):
            return None
        return reduce_output(out, select)

    key = id(model)
    with _USERS_LOCK:
        if key in _USERS:
            _USERS[key][0] += 1
        else:
            _USERS[key] = [1, model.register_forward_hook(hook)]
    try:
        yield
    finally:
        with _USERS_LOCK:
            _USERS[key][0] -= 1
            if _USERS[key][0] == 0:
                _USERS.pop(key)[1].remove()
