"""The retained heap (pellucid.inference.heap): same values, memory handed back afterwards, nesting
across threads, and the user's own malloc settings left alone."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import pellucid
from pellucid.inference import heap
from tests.test_incremental import Branchy

GLIBC = heap._libc() is not None


def _rss() -> int:
    from pellucid.explainers.base import _status_kib

    return _status_kib("VmRSS") * 1024


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_values_are_the_same_and_free_memory_is_handed_back_after_the_call():
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 1, 64, 64)
    with_heap = pellucid.explain(model, x, "occlusion", target=0, window=8, stride=8,
                                 incremental=False)
    libc = heap._LIBC
    try:
        heap._LIBC = None  # the C library's own policy
        without = pellucid.explain(model, x, "occlusion", target=0, window=8, stride=8,
                                   incremental=False)
    finally:
        heap._LIBC = libc
    assert torch.equal(with_heap.attributions, without.attributions)
    # 320 MiB allocated and freed inside the scope stay resident there (glibc would have unmapped
    # them), and are handed back to the system afterwards
    before = _rss()
    with heap.retained_heap():
        blocks = [torch.ones(10 * 2**20 // 4) for _ in range(32)]
        del blocks
        assert _rss() - before > 300 * 2**20
    assert _rss() - before < 64 * 2**20


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_the_thresholds_return_only_when_the_last_running_explanation_ends():
    inside, release = threading.Event(), threading.Event()

    def hold():
        with heap.retained_heap():
            inside.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait(30)
    before = _rss()
    with heap.retained_heap():
        assert heap._RUNNING == 2
    assert heap._RUNNING == 1  # the other thread's explanation still runs with the heap kept
    blocks = [torch.ones(10 * 2**20 // 4) for _ in range(16)]
    del blocks
    assert _rss() - before > 150 * 2**20
    release.set()
    worker.join(30)
    assert heap._RUNNING == 0 and _rss() - before < 64 * 2**20


@pytest.mark.parametrize("env", [{"PELLUCID_HEAP": "default"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
                                 {"MALLOC_ARENA_MAX": "2"}])
def test_the_users_own_malloc_settings_win(env):
    import os

    code = "from pellucid.inference import heap; print(heap._libc() is None, heap.heap_policy())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    assert out.startswith("True the C library's own"), out
