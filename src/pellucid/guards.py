"""Guards every reader applies before it trusts a file: the decoded size, read from the header
before any pixel is decoded, and finite values after decoding.

A few bytes can declare gigabytes (a PNG of 9000 x 9000 pixels compresses to 79 KB, a NIfTI
header can declare 2000^3 voxels), so each reader asks :func:`check_shape` with the header's
dimensions first and refuses with :class:`TooLarge`, which names the limit. The limits in force
are a context variable: the library's defaults below bound a single read to a few GiB, and
``pellucid serve`` sets tighter ones around each job with :func:`decode_limits`.

Non-finite values (NaN, +-Inf) have no meaning in an image: min-max scaling turns one NaN into an
all-zero image that a model then scores with confidence. :func:`require_finite` refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pellucid.errors import DataError


@dataclass(frozen=True)
class DecodeLimits:
    """Largest decoded image a reader accepts: ``max_pixels`` per 2D image (rows x columns),
    ``max_voxels`` per volume or multi-frame image, ``max_frames`` frames or slices."""

    max_pixels: int = 2**26  # 67 M pixels: 8192 x 8192 (under Pillow's bomb guard)
    max_voxels: int = 2**29  # 537 M voxels: 2 GiB as float32
    max_frames: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_voxels", "max_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")


class TooLarge(DataError):
    """A file whose header declares more than the limits allow (the service answers 413)."""


DEFAULT_LIMITS = DecodeLimits()
SERVICE_LIMITS = DecodeLimits(max_pixels=2**25, max_voxels=2**27, max_frames=1024)  # 5792^2, 512^3
_LIMITS: ContextVar[DecodeLimits | None] = ContextVar("pellucid_decode_limits", default=None)


def current_limits() -> DecodeLimits:
    return _LIMITS.get() or DEFAULT_LIMITS


@contextmanager
def decode_limits(limits: DecodeLimits) -> Iterator[DecodeLimits]:
    """Apply ``limits`` to every read in this context (thread and task local)."""
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


def check_shape(path: str | Path, spatial: Sequence[int], frames: int = 1, channels: int = 1) -> None:
    """Refuse a declared image of ``spatial`` dims (x ``frames``, x ``channels`` samples per pixel)
    beyond the limits in force, or one with a zero or negative dimension."""
    dims = [int(d) for d in spatial]
    if frames < 1 or channels < 1 or any(d < 1 for d in dims):
        raise DataError(path, f"the header declares an empty or negative size {tuple(dims)}"
                              f"{f' x {frames} frames' if frames != 1 else ''}")
    if channels > 4:
        raise DataError(path, f"an image with {channels} samples per pixel is not supported")
    limits = current_limits()
    if len(dims) <= 2 and frames == 1:
        pixels = math.prod(dims)
        if pixels > limits.max_pixels:
            raise TooLarge(path, f"{'x'.join(map(str, dims))} = {pixels:,} pixels is over the limit "
                                 f"of {limits.max_pixels:,} pixels (max_pixels)")
        return
    depth = frames * (math.prod(dims[:-2]) if len(dims) > 2 else 1)
    if depth > limits.max_frames:
        raise TooLarge(path, f"{depth:,} frames or slices is over the limit of {limits.max_frames:,} "
                             f"(max_frames)")
    voxels = math.prod(dims) * frames * channels  # an RGB frame decodes to three values a pixel
    if voxels > limits.max_voxels:
        shape = "x".join(map(str, [frames] * (frames > 1) + dims + [channels] * (channels > 1)))
        raise TooLarge(path, f"{shape} = {voxels:,} voxels is over the limit of "
                             f"{limits.max_voxels:,} voxels (max_voxels)")


def require_finite(array: np.ndarray, path: str | Path) -> np.ndarray:
    """``array`` unchanged when every value is finite; else refuse, counting the bad values."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        nan = int(np.isnan(array).sum())
        inf = int(np.isinf(array).sum())
        raise DataError(path, f"the image holds non-finite values ({nan} NaN, {inf} Inf); "
                              f"pellucid does not explain undefined pixels")
    return array
