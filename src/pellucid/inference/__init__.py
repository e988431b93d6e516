"""Forward-only inference backends: torch, ONNX Runtime and OpenVINO behind one function,
:func:`forward_only` (see :mod:`pellucid.inference.select`)."""

from pellucid.inference.select import BackendFallback, BackendForward, current_backend, forward_only
from pellucid.inference.settings import (
                                         BACKENDS,
                                         SETTINGS,
                                         backend_setting,
                                         cache_dir,
                                         set_backend,
                                         use_backend,
)

__all__ = ["BACKENDS", "SETTINGS", "BackendFallback", "BackendForward", "backend_setting",
           "cache_dir", "current_backend", "forward_only", "set_backend", "use_backend"]
