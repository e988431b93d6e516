"""Seeded group-wise splits: no patient ever lands in two splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pellucid.errors import ConfigError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def group_split(
    groups: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Assign every item to train/val/test so that each group (patient) is in exactly one split.

    Groups are shuffled with ``seed`` and dealt out until each split holds its fraction of *items*
    (not of groups), so a patient with many images does not skew the proportions.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got "
                          f"{tuple(fractions)}")
    unique = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    total = len(groups)
    bounds = np.cumsum(fractions) * total
    assignment: dict[str, str] = {}
    seen = 0
    for idx in order:
        g = unique[idx]
        # place the group in the split whose quota the group's midpoint falls into
        mid = seen + counts[g] / 2
        split = SPLITS[int(np.searchsorted(bounds, mid, side="right").clip(0, 2))]
        assignment[g] = split
        seen += counts[g]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, g in enumerate(groups):
        out[assignment[g]].append(i)
    return out


def check_split(split: str) -> str:
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"split must be one of train, val, test, all; got {split!r}")
    return split
