"""Low-level readers for the image files the dataset readers are built on.

Every reader returns float32 numpy arrays channel-first and raises :class:`DataError` naming the
file when it cannot be used. Conversion to tensors happens in the dataset classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pellucid.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, "file not found")


def read_raster(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/BMP as an array (H, W) or (H, W, C) of its native dtype."""
    path = Path(path)
    _require_file(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except Exception as exc:  # any decoder failure is the file's fault
        raise DataError(path, f"cannot read image ({type(exc).__name__}: {exc})") from None
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise DataError(path, f"expected a 2D image, got an array of shape {arr.shape}")
    return arr


def _scale_to_unit(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    out = arr.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


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
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DataError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {data.shape}")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, np.asarray(img.affine, dtype=np.float64), spacing


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)
