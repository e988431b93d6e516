"""A user's file as a model input: read through :func:`pellucid.io.read` (the one record of a file as
read, :class:`pellucid.io.MedicalImage`) or, for a BraTS case folder, the BraTS reader; brought to
reader units, the model card's channels and input size, keeping the source record to map results
back (source size, affine, DICOM datasets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pellucid.data.brats import BraTS
from pellucid.data.transforms import resize_image, zscore_nonzero
from pellucid.errors import DataError
from pellucid.io.files import IMAGE_SUFFIXES, is_nifti, minmax_unit
from pellucid.io.reading import MedicalImage, read


@dataclass
class InputImage:
    """A :class:`~pellucid.io.MedicalImage` prepared for a model: ``original`` in reader units at the
    source size (DICOM min-max scaled to [0, 1], NIfTI z-scored over non-zero voxels, images in
    [0, 1]), ``image`` at the model's input size."""

    source: MedicalImage
    original: torch.Tensor  # (C, *spatial) reader units, source size
    image: torch.Tensor  # (C, *spatial) reader units, the model's input size
    name: str

    @property
    def affine(self) -> np.ndarray | None:
        """Voxel indices to RAS mm, for maps written as NIfTI."""
        return self.source.ras_affine

    @property
    def datasets(self) -> list:
        """The source DICOM datasets (empty for other files)."""
        return self.source.datasets

    @property
    def path(self) -> Path:
        return self.source.path


def _brats_case(path: Path) -> MedicalImage:
    """A BraTS case folder: four modalities, each z-scored over its non-zero voxels by the reader."""
    case = BraTS(path, spatial_dims=3)[0]
    return MedicalImage(case["image"].float(), tuple(float(s) for s in case["spacing"]),
                        case["affine"].numpy(), "nifti", path)


def _reader_units(source: MedicalImage, in_channels: int, spatial_dims: int) -> torch.Tensor:
    """The source pixels as the readers give them to models."""
    arr = source.array
    if source.kind == "dicom":
        if source.datasets and int(getattr(source.datasets[0], "SamplesPerPixel", 1)) == 3 \
                and arr.shape[0] == 3:
            arr = arr.mean(0, keepdim=True)  # colour to luminance
        if arr.ndim == 4 and spatial_dims == 2:  # never one frame standing for all of them
            raise DataError(source.path, f"a multi-frame image ({arr.shape[1]} frames) for a 2D "
                                         f"model: each frame is a case of its own (pellucid "
                                         f"explain --input and --pacs explain them frame by frame)")
        return torch.from_numpy(minmax_unit(arr.numpy()))
    if source.kind == "nifti":
        return zscore_nonzero(arr)
    if source.kind == "image" and in_channels == 1 and arr.shape[0] in (3, 4):
        weights = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luminance
        return torch.tensordot(weights, arr[:3], dims=1)[None]
    return arr


def load_input(path: str | Path, in_channels: int, input_size: list[int] | None,
               spatial_dims: int, resize: str = "bilinear") -> InputImage:
    """Read ``path`` (an image, NIfTI, DICOM file or series folder, ``.npy`` channels first, or a
    BraTS case folder) and shape it for a model with ``in_channels`` and ``input_size``."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    suffix = path.suffix.lower()
    if path.is_dir() and any(is_nifti(p) for p in path.iterdir()):
        source = _brats_case(path)
        original = source.array  # z-scored by the BraTS reader
    elif path.is_dir() or is_nifti(path) or suffix in (".npy", ".dcm", ".dicom", *IMAGE_SUFFIXES):
        if is_nifti(path):  # a volume for a 2D model is refused from the header, before decoding
            from pellucid.io.headers import check_fits, declared

            check_fits(path, declared(path, "nifti"), spatial_dims)
        source = read(path, spatial_dims=spatial_dims)
        original = _reader_units(source, in_channels, spatial_dims)
    else:
        raise DataError(path, "unsupported input type (PNG/JPEG/TIFF, NIfTI, DICOM file or series "
                              "folder, .npy (channels first), or a BraTS case folder)")
    if original.ndim - 1 != spatial_dims:
        raise DataError(path, f"a {original.ndim - 1}D image cannot go to a {spatial_dims}D model")
    if original.shape[0] != in_channels:
        if original.shape[0] == 1:
            original = original.repeat(in_channels, *([1] * spatial_dims))
        else:
            raise DataError(path, f"image has {original.shape[0]} channels, the model takes "
                                  f"{in_channels}")
    image = resize_image(original, input_size, resize) if input_size else original
    if not (torch.isfinite(image).all() and torch.isfinite(original).all()):
        raise DataError(path, "the image's values overflow when normalised (non-finite results); "
                              "pellucid does not explain them")
    return InputImage(source, original.float(), image.float(), stem(path))


def stem(path: Path) -> str:
    """The file name without its image suffix (``.nii.gz`` counts as one); dots inside stay."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm", ".dicom", ".npy", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
