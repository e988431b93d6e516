"""Process-wide settings: thread count, seeding, and the memory bound of batched forwards."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default: ``$PELLUCID_THREADS`` or every core) for torch's CPU kernels."""
    n = threads or int(os.environ.get("PELLUCID_THREADS", "0")) or os.cpu_count() or 1
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
