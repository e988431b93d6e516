"""Low-level readers for the image files the dataset readers are built on.

Every reader returns float32 numpy arrays channel-first and raises :class:`DataError` naming the
file when it cannot be used. Each checks the size its header declares against the decode limits
before decoding and refuses non-finite values (:mod:`pellucid.guards`). Nothing is unpickled.
Conversion to tensors happens in the dataset classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pellucid.errors import DataError
from pellucid.guards import TooLarge, check_shape, current_limits, require_finite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_file(path: Path) -> bool:
    """``path.is_file()``, False (never an exception) for a name the file system cannot hold: too
    long, or holding a NUL byte, as a user's CSV or JSON may give."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _require_file(path: Path) -> None:
    if not is_file(path):
        raise DataError(path, "file not found")


def _tiff_page(tif, path: Path):
    """The first page of an open TIFF. Only the first two page headers are ever read: walking a
    file's whole page chain (as tifffile's ``series`` does) lets a crafted file with a long or
    looping chain take minutes and gigabytes before any check."""
    try:
        page = tif.pages.first
    except (IndexError, KeyError, ValueError):
        page = None
    if page is None or not page.shape:
        raise DataError(path, "the TIFF file holds no image")
    try:
        more = tif.pages[1] is not None
    except (IndexError, KeyError):
        more = False
    if more:
        raise DataError(path, "a multi-page TIFF; give one 2D image per file")
    return page


def _tiff_size(page) -> tuple[tuple[int, int], int, int, bool]:
    """(spatial, frames, samples, planar) of a TIFF page: colour samples are an axis of their own,
    first when the samples are stored plane by plane (PlanarConfiguration 2), last otherwise."""
    shape = tuple(int(d) for d in page.shape)
    samples = int(getattr(page, "samplesperpixel", 1) or 1)
    planar = samples > 1 and int(getattr(page, "planarconfig", 1) or 1) == 2
    if samples > 1:
        spatial = shape[1:3] if planar else shape[-3:-1]
        frames = int(np.prod(shape[:-3])) if len(shape) > 3 else 1
        return (int(spatial[0]), int(spatial[1])), frames, samples, planar
    return (shape[-2], shape[-1]), int(np.prod(shape[:-2])) if len(shape) > 2 else 1, 1, False


def _tiff(path: Path) -> np.ndarray:
    """The first page of a TIFF, its declared size checked before decoding; colour samples last."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = _tiff_page(tif, path)
        spatial, frames, samples, planar = _tiff_size(page)
        check_shape(path, spatial, frames, samples)
        arr = page.asarray()
        return np.moveaxis(arr, 0, -1) if planar and arr.ndim == 3 else arr


def raster_header(path: str | Path) -> tuple[tuple[int, int], int, int]:
    """(spatial, frames, channels) a PNG/JPEG/TIFF/BMP header declares; nothing decoded."""
    path = Path(path)
    _require_file(path)
    with path.open("rb") as fh:
        magic = fh.read(4)
    try:
        if path.suffix.lower() in (".tif", ".tiff") or magic in (b"II*\x00", b"MM\x00*"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                spatial, frames, samples, _ = _tiff_size(_tiff_page(tif, path))
                return spatial, frames, samples
        from PIL import Image

        with Image.open(path) as im:
            return (im.size[1], im.size[0]), 1, len(im.getbands())
    except DataError:
        raise
    except Exception as exc:
        if type(exc).__name__ == "DecompressionBombError":  # Pillow's guard, above any of ours
            raise TooLarge(path, f"the image is over the limit of {current_limits().max_pixels:,} "
                                 f"pixels (max_pixels)") from None
        raise DataError(path, f"cannot read the image header ({type(exc).__name__})") from None


def _pil(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError:  # Pillow's guard (twice its limit, above any of ours)
        raise TooLarge(path, f"the image is over the limit of {current_limits().max_pixels:,} "
                             f"pixels (max_pixels)") from None
    with im:
        check_shape(path, im.size[::-1], 1, len(im.getbands()))
        if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
            im = im.convert("RGB")
        return np.asarray(im)


def read_raster(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/BMP as an array (H, W) or (H, W, C) of its native dtype."""
    path = Path(path)
    _require_file(path)
    try:
        arr = _tiff(path) if path.suffix.lower() in (".tif", ".tiff") else _pil(path)
    except DataError:
        raise
    except Exception as exc:  # any decoder failure is the file's fault
        raise DataError(path, f"cannot read image ({type(exc).__name__}: {exc})") from None
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise DataError(path, f"expected a 2D image, got an array of shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise DataError(path, f"unsupported pixel type {arr.dtype}")
    return require_finite(arr, path)


def _scale_to_unit(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    return minmax_unit(arr)


def minmax_unit(arr: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min) as float32, computed in float64 so that the range of extreme float32
    values does not overflow; a constant image becomes zeros."""
    out = arr.astype(np.float64)
    lo, hi = float(out.min()), float(out.max())
    return ((out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)).astype(np.float32)


def read_image_2d(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Read a 2D image as float32 (C, H, W) scaled to [0, 1].

    ``channels=1`` converts colour to luminance (ITU-R 601 weights); ``channels=3`` repeats a grey
    image; ``None`` keeps what the file has.
    """
    arr = _scale_to_unit(read_raster(path))
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    if channels is None or arr.shape[0] == channels:
        return np.ascontiguousarray(arr)
    if channels == 1 and arr.shape[0] in (3, 4):
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.tensordot(weights, arr[:3], axes=1)[None].astype(np.float32)
    if arr.shape[0] == 1:
        return np.repeat(arr, channels, axis=0)
    raise DataError(path, f"image has {arr.shape[0]} channels, expected {channels}")


def read_mask_2d(path: str | Path) -> np.ndarray:
    """Read a binary mask image as bool (H, W): any non-zero pixel is foreground."""
    arr = read_raster(path)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    return arr > 0


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a NIfTI volume: (data float32 in voxel order, 4x4 affine, voxel spacing)."""
    import nibabel as nib

    path = Path(path)
    _require_file(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.shape)
    except Exception as exc:
        raise DataError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    spatial = shape[:3]
    frames = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise DataError(path, f"expected a 3D volume, got shape {shape}")
    check_shape(path, spatial, frames)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DataError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(np.isfinite(spacing)) or not np.isfinite(img.affine).all():
        raise DataError(path, "the NIfTI header holds a non-finite voxel size or affine")
    return require_finite(data, path), np.asarray(img.affine, dtype=np.float64), spacing


def read_npy(path: str | Path) -> np.ndarray:
    """A ``.npy`` array of numbers as float32; the header (shape, dtype) is checked before the data
    is read, object arrays are refused (never unpickled), non-finite values refused."""
    path = Path(path)
    _require_file(path)
    try:
        with path.open("rb") as fh:
            major, _minor = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read_header(fh, max_header_size=10000)
    except Exception as exc:
        raise DataError(path, f"not a .npy file ({type(exc).__name__})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(path, f"a .npy input must hold numbers, got dtype {dtype}")
    if len(shape) < 2 or len(shape) > 4:
        raise DataError(path, f"expected a 2D or 3D image (channels first), got shape {shape}")
    check_shape(path, shape[-2:], int(np.prod(shape[:-2])) if len(shape) > 2 else 1)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(path, f"cannot read the .npy data ({type(exc).__name__})") from None
    return require_finite(np.ascontiguousarray(data, dtype=np.float32), path)


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)
