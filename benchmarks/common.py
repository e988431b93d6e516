"""Helpers shared by the benchmark scripts: timing, peak memory, models, printing."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs; and its result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _status(field: str) -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(fn: Callable[[], object]) -> tuple[float, object]:
    """Extra peak resident memory (MiB) while ``fn`` runs: the kernel's high-water mark is reset
    through /proc/self/clear_refs first (Linux)."""
    gc.collect()
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        return float("nan"), fn()
    base = _status("VmRSS")
    result = fn()
    return _status("VmHWM") - base, result


def bare_forward_backward(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """The model's own cost: forward, then backward of the summed target logits to the input,
    weights frozen."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        score = out.gather(1, target[:, None]).sum() if out.ndim == 2 else \
            out[:, 0].sum()
        torch.autograd.grad(score, xi)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns),
             "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
