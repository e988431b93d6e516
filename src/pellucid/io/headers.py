"""What an uploaded file declares, read from its header alone (no pixel decoded, no torch):
the service's server process refuses an oversized or unfit upload with this before any worker
is needed, and the readers apply the same checks before they decode.

:func:`declared` returns the file's :class:`Declared` size after checking it against the decode
limits (:func:`pellucid.guards.check_shape`) and, for compressed DICOM, every frame's codestream
against the header (:mod:`pellucid.io.codestreams`). :func:`check_fits` refuses a file whose
dimensionality no model of ``spatial_dims`` could take (a volume for a 2D model), the refusal the
readers would reach only after decoding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pellucid.errors import DataError
from pellucid.guards import check_shape


@dataclass(frozen=True)
class Declared:
    """A header's size: ``spatial`` dims, ``frames`` (a multi-frame DICOM), ``channels``."""

    spatial: tuple[int, ...]
    frames: int = 1
    channels: int = 1

    @property
    def volume(self) -> bool:
        return len(self.spatial) == 3


def _dicom(path: Path) -> Declared:
    import pydicom

    from pellucid.io.codestreams import check_deflated, check_encapsulated

    check_deflated(path)
    try:
        ds = pydicom.dcmread(str(path))
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    except Exception as exc:
        raise DataError(path, f"cannot parse the DICOM header ({type(exc).__name__})") from None
    check_shape(path, (rows, cols), frames, samples)
    check_encapsulated(ds, path)
    return Declared((rows, cols), frames, samples)


def _nifti(path: Path) -> Declared:
    import nibabel as nib

    try:
        shape = tuple(int(d) for d in nib.load(str(path)).shape)  # the header only
    except Exception as exc:
        raise DataError(path, f"cannot read NIfTI ({type(exc).__name__})") from None
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise DataError(path, f"expected a 3D volume, got shape {shape}")
    check_shape(path, shape[:3])
    return Declared(shape[:3])


def _raster(path: Path) -> Declared:
    from pellucid.io.files import raster_header

    spatial, frames, channels = raster_header(path)
    check_shape(path, spatial, frames, channels)
    return Declared(tuple(spatial), frames, channels)


def declared(path: str | Path, kind: str) -> Declared:
    """The size ``path`` (of ``kind``: dicom, nifti, nifti-gz, png, jpeg, tiff) declares, checked
    against the decode limits in force; one :class:`DataError` (or ``TooLarge``) naming the file."""
    path = Path(path)
    if kind == "dicom":
        return _dicom(path)
    if kind in ("nifti", "nifti-gz"):
        return _nifti(path)
    if kind in ("png", "jpeg", "tiff"):
        return _raster(path)
    raise DataError(path, f"unknown file kind {kind!r}")


def check_fits(path: str | Path, size: Declared, spatial_dims: int) -> None:
    """Refuse a file no ``spatial_dims`` model takes: a volume for a 2D model (a multi-frame DICOM
    is frames, each a 2D case) or a single 2D image for a 3D model."""
    if spatial_dims == 2 and size.volume:
        raise DataError(path, f"a 3D image ({'x'.join(map(str, size.spatial))}) cannot go to a 2D "
                              f"model")
    if spatial_dims == 3 and not size.volume and size.frames == 1:
        raise DataError(path, "a 2D image cannot go to a 3D model")
