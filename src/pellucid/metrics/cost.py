"""Compute cost of an explanation: wall seconds per sample (the score, lower is better), forward
and backward passes per sample, peak memory (the CUDA allocator's peak on a GPU, the rise of
the process's peak resident set, Linux ``VmHWM`` reset before the call, on a CPU) and the work
ratio: multiply-accumulates of the forward passes done over those of full forwards of the same
inputs (1 unless a method recomputed only what changed, as incremental occlusion does)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.metrics.base import Context, Metric, MetricResult, register


@register
@dataclass
class Cost(Metric):
    """Compute cost: wall seconds per sample, passes per sample and peak memory of the call."""

    name: ClassVar[str] = "cost"
    category: ClassVar[str] = "cost"
    role: ClassVar[str] = "property"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"explanation"})

    def compute(self, ctx: Context) -> MetricResult:
        cost = ctx.explanation.cost
        b = ctx.attributions.shape[0]
        seconds = torch.full((b,), cost.seconds / b)
        extras = {"seconds": cost.seconds, "forward_passes": cost.forward_passes,
                  "forward_samples_per_sample": cost.forward_samples / b,
                  "backward_passes": cost.backward_passes,
                  "peak_memory_bytes": cost.peak_memory_bytes,
                  "macs": cost.macs, "full_macs": cost.full_macs, "work_ratio": cost.work_ratio}
        return MetricResult(self.name, seconds, extras=extras)
