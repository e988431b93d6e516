"""Forward-only work in chunks: the backend that runs it and the chunk sizes.

``inference_forward(model, example)`` is the forward-only function of :mod:`pellucid.inference`
(torch's optimised copy, ONNX Runtime or OpenVINO, chosen by ``--backend``); :class:`AutoBatch`
cuts many inputs into the chunk sizes that run fastest on that backend (or fit a memory bound).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pellucid.inference import BackendForward, forward_only
from pellucid.inference.footprint import activation_bytes
from pellucid.inference.select import pinned_batch
from pellucid.runtime import memory_limit_bytes

Forward = Callable[[torch.Tensor], torch.Tensor]


def inference_forward(model: nn.Module, example: torch.Tensor) -> BackendForward:
    """A faster forward-only equivalent of ``model`` for inputs shaped like ``example``
    (:func:`pellucid.inference.forward_only`): float32 outputs on the input's device."""
    return forward_only(model, example)


_BEST_BATCH: dict[tuple, int] = {}
CPU_TRIALS = (4, 8, 16, 32)


class AutoBatch:
    """Chunk sizes for many forward passes. A given ``batch_size`` is used as is (it bounds peak
    memory). Otherwise, on a CPU, the first chunks try 4, 8, 16 and 32 inputs and the rest use the
    size with the lowest time per input (large batches are often slower per input on a CPU, whose
    caches they overflow); the choice is remembered per model and input shape. Work of at most 32
    inputs runs in one call. On a GPU: 128. With a memory limit (``pellucid.runtime.
    set_memory_limit``) no chunk exceeds limit / (activation bytes per input) inputs."""

    def __init__(self, fixed: int | None, model: nn.Module, example: torch.Tensor) -> None:
        backend = inference_forward(model, example[:1]).backend  # built once, memoised
        self.key = (id(model), tuple(example.shape[1:]), example.device.type, backend)
        self.fixed = fixed
        if fixed is None and example.device.type != "cpu":
            self.fixed = 128
        self.best = _BEST_BATCH.get(self.key)
        self.timings: dict[int, float] = {}
        limit = memory_limit_bytes()
        self.cap = max(1, limit // activation_bytes(model, example)) if limit else None
        if self.fixed is None and self.cap is None:  # a bench run: decided once, recorded
            pinned = pinned_batch(model, example, backend,
                                  lambda: self._time_sizes(model, example))
            if pinned is not None:
                self.fixed = pinned

    def _time_sizes(self, model: nn.Module, example: torch.Tensor) -> int:
        """The size of :data:`CPU_TRIALS` with the lowest time per input (the faster of two calls
        each), timed on throwaway batches (so that no computed value depends on which sizes were
        tried)."""
        import time

        from pellucid.inference.torch_copy import probe_batch

        fast = inference_forward(model, example[:1])
        timings = {}
        with torch.inference_mode():
            fast(probe_batch(example[:1], CPU_TRIALS[0]))  # warm-up
            for size in CPU_TRIALS:
                batch = probe_batch(example[:1], size)
                runs = []
                for _ in range(2):  # the faster of two: one call alone was noisy enough to keep 8
                    began = time.perf_counter()
                    fast(batch)
                    runs.append((time.perf_counter() - began) / size)
                timings[size] = min(runs)
        best = min(timings, key=timings.get)
        _BEST_BATCH[self.key] = best
        return best

    def chunks(self, total: int):
        """Yield (start, stop) ranges covering ``total``; time each one's processing."""
        import time

        if total <= 0:
            return  # nothing to run (e.g. every Score-CAM channel constant): no empty forward
        start = 0
        trials = list(CPU_TRIALS) if self.fixed is None and self.best is None else []
        if self.cap is not None:
            yield from self._capped(total)
            return
        if self.fixed is None and total <= CPU_TRIALS[-1]:
            yield 0, total  # little work: one call, nothing to tune
            return
        while start < total:
            if self.fixed is not None:
                size = self.fixed
            elif trials:
                size = trials.pop(0)
            else:
                size = self.best or CPU_TRIALS[1]
            stop = min(total, start + size)
            began = time.perf_counter()
            yield start, stop
            if self.fixed is None and self.best is None and stop - start == size:
                self.timings[size] = (time.perf_counter() - began) / size
                if not trials:
                    self.best = min(self.timings, key=self.timings.get)
                    _BEST_BATCH[self.key] = self.best
            start = stop

    def _capped(self, total: int):
        """Chunks under the memory cap: the given (or remembered) size, or the largest allowed."""
        size = min(self.fixed or self.best or self.cap, self.cap)
        for start in range(0, total, size):
            yield start, min(total, start + size)
