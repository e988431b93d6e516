"""Process-wide settings: thread count and seeding."""

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
