"""Helpers shared by the benchmark scripts: timing, peak memory, models, printing."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def setup_device(name: str) -> torch.device:
    """The device the benchmark runs on. On a GPU, TF32 is turned off for convolutions and matrix
    products, so that pellucid and its peers are compared in true float32 (a reduced precision is
    only ever an explicit option)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA device is visible")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock times include it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs (GPU work
    included: the device is synchronised around each run); and its result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _status(field: str) -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, object]:
    """Extra peak memory (MiB) while ``fn`` runs: on a GPU, CUDA's peak allocation above what was
    allocated before; on the CPU the resident set, whose high-water mark is reset through
    /proc/self/clear_refs first (Linux)."""
    gc.collect()
    if device is not None and device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        sync()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, result
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
