"""The percentile bootstrap used by every interval pellucid reports (metric protocols, benchmark
statistics, the review study): resample with replacement, take the mean, read the percentiles
(Efron & Tibshirani 1993, ch. 13)."""

from __future__ import annotations

import numpy as np
import torch


def bootstrap_ci(values: torch.Tensor, resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the non-NaN ``values``."""
    v = values[~torch.isnan(values)].double().cpu().numpy()
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.RandomState(seed)
    means = v[rng.randint(0, len(v), size=(resamples, len(v)))].mean(1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
