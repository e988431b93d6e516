"""Process-wide settings: thread count, seeding, the memory bound of batched forwards, and the
precision of model forwards."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (``/sys/fs/cgroup/cpu.max``, a container's limit) and, inside a Ray task, by the CPUs Ray
    assigned to it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX) as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    import sys

    if "ray" in sys.modules:  # only a process that imported Ray can be one of its workers
        try:
            import ray

            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
                if assigned:
                    cores = min(cores, max(1, int(assigned)))
        except Exception:  # an older Ray without these calls: keep the affinity
            pass
    return max(1, cores)


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default: ``$PELLUCID_THREADS`` or every usable core, :func:`usable_cores`)
    for torch's CPU kernels; ONNX Runtime and OpenVINO sessions take the same number."""
    n = threads or int(os.environ.get("PELLUCID_THREADS", "0")) or usable_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


_MEMORY_LIMIT_MB: float | None = None


def set_memory_limit(megabytes: float | None) -> None:
    """Bound the memory of each chunk of batched forwards (Score-CAM, perturbation methods and
    metrics): chunks are cut so that their estimated activation memory stays under ``megabytes``.
    ``None`` (default) lets the batch size follow speed alone. Also ``$PELLUCID_MEMORY_LIMIT_MB``."""
    global _MEMORY_LIMIT_MB
    if megabytes is not None and megabytes <= 0:
        from pellucid.errors import ConfigError

        raise ConfigError(f"memory limit must be positive megabytes, got {megabytes}")
    _MEMORY_LIMIT_MB = megabytes


def memory_limit_bytes() -> int | None:
    mb = _MEMORY_LIMIT_MB
    if mb is None and os.environ.get("PELLUCID_MEMORY_LIMIT_MB"):
        mb = float(os.environ["PELLUCID_MEMORY_LIMIT_MB"])
    return int(mb * 2**20) if mb else None


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION: str | None = None


def set_precision(name: str | None) -> None:
    """Run every model forward (and its backward) that pellucid makes under ``torch.autocast`` with
    ``"bf16"`` or ``"fp16"``; ``"fp32"`` or ``None`` (default) turns it off. Map arithmetic (CAM
    weights, up-sampling, least squares, metric curves) stays in float32 and attributions are
    float32 either way. Off unless asked for: it changes the numbers (benchmarks/vs_peers.py
    ``--precision`` measures by how much). Also ``$PELLUCID_PRECISION``."""
    global _PRECISION
    if name is not None and name not in PRECISIONS:
        from pellucid.errors import ConfigError

        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    _PRECISION = name


def precision_name() -> str:
    """The precision setting in force: ``set_precision``'s, else ``$PELLUCID_PRECISION``, else
    ``"fp32"``."""
    name = _PRECISION or os.environ.get("PELLUCID_PRECISION") or "fp32"
    if name not in PRECISIONS:
        from pellucid.errors import ConfigError

        raise ConfigError(f"PELLUCID_PRECISION must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def autocast_dtype() -> torch.dtype | None:
    """The autocast dtype of model forwards, or None for full precision."""
    return PRECISIONS[precision_name()]


def use_precision(name: str | None) -> None:
    """``set_precision`` for this process and the workers it starts (through the environment);
    ``None`` (a command-line option left out) changes nothing."""
    if name is None:
        return
    set_precision(name)
    os.environ["PELLUCID_PRECISION"] = name


_FULL_PRECISION: contextvars.ContextVar[bool] = contextvars.ContextVar("full", default=False)


def reduced_precision() -> torch.dtype | None:
    """The autocast dtype that model calls here use now (None inside ``full_precision``)."""
    return None if _FULL_PRECISION.get() else autocast_dtype()


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Model calls inside run in float32 whatever the precision setting (LRP: zennit's rules
    re-run each layer in the backward pass, outside any autocast region)."""
    token = _FULL_PRECISION.set(True)
    try:
        yield
    finally:
        _FULL_PRECISION.reset(token)


@contextlib.contextmanager
def model_precision(device_type: str) -> Iterator[bool]:
    """Autocast for one model call on ``device_type`` when a reduced precision is set; yields
    whether it is on."""
    dtype = reduced_precision()
    if dtype is None:
        yield False
        return
    with torch.autocast(device_type, dtype=dtype):
        yield True
