"""How much memory one forward of a model produces per input (chunk sizes and memory guards)."""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATION_BYTES: dict[tuple, int] = {}


def activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes per input of everything one forward produces (the input and every leaf module's
    output): an upper bound of a no-grad forward's working memory, per input."""
    key = (id(model), tuple(example.shape[1:]), example.dtype, example.device.type)
    if key not in _ACTIVATION_BYTES:
        total = [example[:1].numel() * example.element_size()]

        def hook(_module, _inputs, output) -> None:
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor):
                    total[0] += t.numel() * t.element_size()

        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                model(example[:1])
        finally:
            for h in handles:
                h.remove()
        _ACTIVATION_BYTES[key] = max(total[0], 1)
    return _ACTIVATION_BYTES[key]
