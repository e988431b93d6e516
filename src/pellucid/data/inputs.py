"""Loading a user's file as a model input: PNG/JPEG/TIFF, NIfTI, DICOM, or a BraTS case folder,
brought to the model card's channels and input size, keeping what is needed to map results back
(original shape, affine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pellucid.data.brats import BraTS
from pellucid.data.transforms import resize_image, zscore_nonzero
from pellucid.errors import DataError
from pellucid.io.files import (
    IMAGE_SUFFIXES,
    is_nifti,
    minmax_unit,
    read_image_2d,
    read_nifti,
    read_npy,
)
from pellucid.io.reading import read


@dataclass
class InputImage:
    image: torch.Tensor  # (C, *spatial) at the model's input size, reader units
    original: torch.Tensor  # (C, *spatial) as read
    affine: np.ndarray | None
    name: str
    path: Path
    datasets: list = field(default_factory=list)  # the DICOM source datasets, when read from DICOM


def _read_dicom(path: Path, spatial_dims: int) -> tuple[np.ndarray, list]:
    """A DICOM file through :func:`pellucid.io.read` (Modality LUT, MONOCHROME1, compressed
    syntaxes), colour to luminance, a multi-frame file's middle frame for a 2D model, min-max
    scaled to [0, 1] like the image readers; and the source datasets."""
    image = read(path)
    arr = image.array.numpy()
    if image.datasets and int(getattr(image.datasets[0], "SamplesPerPixel", 1)) == 3:
        arr = arr.mean(0, keepdims=True)
    if arr.ndim == 4 and spatial_dims == 2:
        arr = arr[:, arr.shape[1] // 2]
    return minmax_unit(arr), image.datasets


def load_input(path: str | Path, in_channels: int, input_size: list[int] | None,
               spatial_dims: int) -> InputImage:
    """Read ``path`` and shape it for a model with ``in_channels`` and ``input_size``."""
    path = Path(path)
    affine = None
    datasets: list = []
    if path.is_dir():
        case = BraTS(path, spatial_dims=3)[0]
        original, affine = case["image"], case["affine"].numpy()
    elif is_nifti(path):
        data, affine, _ = read_nifti(path)
        original = zscore_nonzero(torch.from_numpy(data)[None])
    elif path.suffix.lower() == ".npy" and path.is_file():  # (C, *spatial) or (*spatial) array
        original = torch.from_numpy(read_npy(path))
        if original.ndim == spatial_dims:
            original = original[None]
    elif path.suffix.lower() in (".dcm", ".dicom"):
        arr, datasets = _read_dicom(path, spatial_dims)
        original = torch.from_numpy(arr)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        original = torch.from_numpy(read_image_2d(path, channels=in_channels))
    elif not path.exists():
        raise DataError(path, "file not found")
    else:
        raise DataError(path, "unsupported input type (PNG/JPEG/TIFF, NIfTI, DICOM, .npy "
                              "(channels first), or a BraTS case folder)")
    if original.ndim - 1 != spatial_dims:
        raise DataError(path, f"a {original.ndim - 1}D image cannot go to a {spatial_dims}D model")
    if original.shape[0] != in_channels:
        if original.shape[0] == 1:
            original = original.repeat(in_channels, *([1] * spatial_dims))
        else:
            raise DataError(path, f"image has {original.shape[0]} channels, the model takes "
                                  f"{in_channels}")
    image = resize_image(original, input_size) if input_size else original
    if not (torch.isfinite(image).all() and torch.isfinite(original).all()):
        raise DataError(path, "the image's values overflow when normalised (non-finite results); "
                              "pellucid does not explain them")
    return InputImage(image.float(), original.float(), affine, stem(path), path, datasets)


def stem(path: Path) -> str:
    """The file name without its image suffix (``.nii.gz`` counts as one); dots inside stay."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm", ".dicom", ".npy", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
