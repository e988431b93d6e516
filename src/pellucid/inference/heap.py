"""Freed tensor memory kept in the process heap while an explanation runs (glibc on Linux).

By default glibc hands a large block (above a threshold that grows with use to at most 32 MiB)
straight to the kernel with ``mmap`` and gives it back with ``munmap`` when it is freed, and trims
the top of the heap once 64 MiB lie free there. A method that runs hundreds of batched forwards
(occlusion, Score-CAM, RISE, integrated gradients) allocates and frees the same activations on
every batch, so the kernel maps, zero-fills and unmaps the same pages again and again. Measured
here (``benchmarks/heap.py``, 2 cores): Score-CAM 11 % faster with the heap kept, on a ResNet-18
and on a 2D U-Net; integrated gradients 1-7 %; occlusion 1 %.

:func:`retained_heap` raises both thresholds while explanations run (``mallopt``), so freed
blocks stay in the heap and the next batch reuses them; when the last running explanation ends,
the thresholds return to glibc's largest defaults (32 MiB, 64 MiB) and free memory over 64 MiB
is handed back (``malloc_trim``), so the next call's peak memory is measured from a trimmed heap.
The values computed are the same: only where the memory comes from changes.

Nothing changes where the C library is not glibc, where the user set glibc's own malloc
settings (``GLIBC_TUNABLES`` or ``MALLOC_*_`` variables: theirs win), or with
``PELLUCID_HEAP=default``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HELD_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap while explanations run
HELD_TRIM_THRESHOLD = (1 << 31) - 1  # and nothing is trimmed
DEFAULT_MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic values, restored afterwards
DEFAULT_TRIM_THRESHOLD = 64 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_LOCK = threading.Lock()
_RUNNING = 0
_LIBC: ctypes.CDLL | bool | None = False  # False: not looked up yet; None: not usable


def _libc() -> ctypes.CDLL | None:
    """glibc with mallopt, mallinfo2 and malloc_trim, unless the user chose malloc settings."""
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        chosen = os.environ.get("PELLUCID_HEAP", "").lower() == "default" or \
            "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ)
        if sys.platform.startswith("linux") and not chosen:
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.gnu_get_libc_version.restype = ctypes.c_char_p
                major, minor = (int(v) for v in libc.gnu_get_libc_version().split(b".")[:2])
                if (major, minor) >= (2, 33):  # mallinfo2
                    libc.mallinfo2.restype = _MallInfo2
                    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    libc.malloc_trim.argtypes = [ctypes.c_size_t]
                    _LIBC = libc
            except (OSError, AttributeError, ValueError):
                _LIBC = None
    return _LIBC


def heap_policy() -> str:
    """What :func:`retained_heap` does in this process, in words."""
    if _libc() is None:
        return "the C library's own (not glibc, or malloc settings chosen by the user)"
    return "freed blocks up to 1 GiB kept in the heap while explanations run"


@contextlib.contextmanager
def retained_heap() -> Iterator[None]:
    """Keep freed blocks in the heap for the duration (see the module); nests across threads."""
    global _RUNNING
    libc = _libc()
    if libc is None:
        yield
        return
    with _LOCK:
        _RUNNING += 1
        if _RUNNING == 1:
            libc.mallopt(M_MMAP_THRESHOLD, HELD_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _LOCK:
            _RUNNING -= 1
            if _RUNNING == 0:
                libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                if libc.mallinfo2().fordblks > DEFAULT_TRIM_THRESHOLD:
                    libc.malloc_trim(0)
