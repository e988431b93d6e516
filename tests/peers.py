"""The differences the oracle tests measure between pellucid and its peers, kept for the catalogue.

Each oracle test calls :func:`record` with pellucid's values and the peer's on the same model,
input and options. With ``PELLUCID_RECORD_PEERS=<file>`` set (``benchmarks/catalogue.py`` sets it)
each comparison is appended to that file as one JSON line; the catalogue pages then state, per
method and metric, the peer it equals and the largest difference any test measured:

    relative difference = max |ours - peer| / max |peer|

Without the variable nothing is written; the tests assert their own tolerances either way.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

_DISPLAY = {"grad-cam": "pytorch-grad-cam"}  # the distribution's name as users know the project


def peer(distribution: str, what: str) -> str:
    """The peer as the catalogue names it: project, installed version, class or function."""
    from importlib.metadata import version

    return f"{_DISPLAY.get(distribution, distribution)} {version(distribution)} {what}"


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def record(name: str, peer: str, ours: Any, ref: Any, case: str,
           measure: str = "difference") -> float:
    """The relative max difference of ``ours`` from ``ref`` (pellucid's method or metric ``name``
    against ``peer``, from :func:`peer`, on ``case``); appended to the file named by
    ``PELLUCID_RECORD_PEERS`` when it is set. ``measure="correlation"``: Pearson's r instead,
    for sampling methods that estimate the same expectation with other random draws."""
    a, b = _array(ours), _array(ref)
    try:  # a map pellucid keeps once that the peer repeats over channels compares by broadcasting
        a, b = np.broadcast_arrays(a, b)
    except ValueError:
        raise ValueError(f"{name} vs {peer}: shapes {a.shape} and {b.shape} differ") from None
    if measure == "correlation":
        value = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        _write(name, peer, measure, value, case)
        return value
    finite = np.isfinite(b)
    scale = float(np.abs(b[finite]).max()) if finite.any() else 0.0
    both_nan = np.isnan(a) & np.isnan(b)
    gap = np.where(both_nan, 0.0, np.abs(a - b))
    diff = float(gap.max() / scale) if scale > 0 else float(gap.max())
    _write(name, peer, measure, diff, case)
    return diff


def _write(name: str, peer: str, measure: str, value: float, case: str) -> None:
    path = os.environ.get("PELLUCID_RECORD_PEERS")
    if path:
        line = json.dumps({"name": name, "peer": peer, "measure": measure, "value": value,
                           "case": case})
        with open(path, "a") as f:  # one short append per line: whole lines from any worker
            f.write(line + "\n")
