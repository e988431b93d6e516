"""``pellucid.io.read``: DICOM (single and multi-frame files, a series folder sorted by position),
NIfTI, PNG/JPEG/TIFF and ``.npy`` arrays into one record: the image tensor, spacing, affine and,
for DICOM, the source datasets that derived objects reference.

DICOM pixels go through the Modality LUT (rescale slope/intercept or a LUT), optionally the VOI LUT
(window centre/width, ``voi=True``), and MONOCHROME1 images are inverted so that high values are
bright. Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through the pylibjpeg
plugins. The affine of a DICOM volume maps (slice, row, column) indices to patient coordinates
(LPS, mm); a NIfTI affine is kept as stored (RAS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid.errors import DataError
from pellucid.guards import check_shape, require_finite
from pellucid.io.codestreams import check_deflated, check_encapsulated
from pellucid.io.files import IMAGE_SUFFIXES, is_nifti, read_image_2d, read_nifti, read_npy


@dataclass
class MedicalImage:
    """An image as read: ``array`` (C, *spatial) float32, ``spacing`` per spatial axis in mm."""

    array: torch.Tensor
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    kind: str  # dicom | nifti | image | array
    path: Path
    datasets: list[Any] = field(default_factory=list)  # the source DICOM datasets, sorted

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def ras_affine(self) -> np.ndarray | None:
        """The affine in NIfTI's RAS convention, whatever the source: a DICOM affine (LPS) has its
        first two world axes negated, a NIfTI affine is RAS already."""
        if self.affine is None:
            return None
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine if self.kind == "dicom" else self.affine


def _pixels(ds: Any, path: Path, voi: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(path, "the DICOM file has no pixel data")
    declared(ds, path)
    check_encapsulated(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken or truncated pixel data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(path, f"cannot decode the DICOM pixel data ({first})") from None
    if int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        arr = apply_modality_lut(arr, ds).astype(np.float32)
        if voi and ("WindowCenter" in ds or "VOILUTSequence" in ds):
            arr = apply_voi_lut(arr, ds).astype(np.float32)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            arr = arr.max() + arr.min() - arr
    return require_finite(np.asarray(arr, dtype=np.float32), path)


def declared(ds: Any, path: Path, slices: int = 1) -> None:
    """Check the size the header declares (rows, columns, frames, samples; ``slices`` files of a
    series) against the decode limits before any pixel is decoded."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise DataError(path, "the DICOM header lacks a valid Rows, Columns, NumberOfFrames or "
                              "SamplesPerPixel") from None
    check_shape(path, (rows, cols), frames * slices, samples)


def _normal(ds: Any) -> np.ndarray | None:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return np.cross(row, col)


def _affine(first: Any, slice_step: np.ndarray | None) -> np.ndarray | None:
    """(slice, row, column) -> LPS mm for a volume; (row, column) for one image (3 x 3 block)."""
    iop = getattr(first, "ImageOrientationPatient", None)
    ipp = getattr(first, "ImagePositionPatient", None)
    spacing = getattr(first, "PixelSpacing", None)
    if iop is None or ipp is None or spacing is None:
        return None
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    dr, dc = float(spacing[0]), float(spacing[1])
    affine = np.eye(4)
    affine[:3, 1] = col_dir * dr  # moving down one row follows the column direction
    affine[:3, 2] = row_dir * dc
    affine[:3, 0] = slice_step if slice_step is not None else np.cross(row_dir, col_dir)
    affine[:3, 3] = np.asarray(ipp, float)
    return affine


def _pixel_spacing(ds: Any) -> tuple[float, float]:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, key, None)
        if value is not None and len(value) == 2 and min(float(v) for v in value) > 0:
            return float(value[0]), float(value[1])
    return 1.0, 1.0


def _read_dicom_file(path: Path, voi: bool) -> MedicalImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    check_deflated(path)
    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        raise DataError(path, "not a DICOM file (no DICM preamble); pass force-readable files "
                              "through a DICOM toolkit first") from None
    except Exception as exc:
        raise DataError(path, f"cannot parse the DICOM file ({type(exc).__name__}: {exc})") from None
    arr = _pixels(ds, path, voi)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    rgb = int(getattr(ds, "SamplesPerPixel", 1)) == 3
    dr, dc = _pixel_spacing(ds)
    if frames > 1:
        volume = arr.mean(-1) if rgb else arr  # an RGB cine: luminance per frame
        thickness = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 1)
                           or 1)
        return MedicalImage(torch.from_numpy(np.ascontiguousarray(volume))[None],
                            (thickness, dr, dc), None, "dicom", path, [ds])
    image = np.moveaxis(arr, -1, 0) if rgb else arr[None]
    return MedicalImage(torch.from_numpy(np.ascontiguousarray(image)), (dr, dc), None, "dicom",
                        path, [ds])


def _read_series(folder: Path, voi: bool, series: str | None) -> MedicalImage:
    import pydicom

    headers = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            check_deflated(p)
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except DataError:
            raise
        except Exception:  # non-DICOM files in a series folder are skipped
            continue
        if "SeriesInstanceUID" in ds:
            headers.append((p, ds))
    if not headers:
        raise DataError(folder, "no DICOM files found in the folder")
    uids = sorted({str(ds.SeriesInstanceUID) for _, ds in headers})
    if series is None and len(uids) > 1:
        raise DataError(folder, f"the folder holds {len(uids)} series; choose one with series= "
                                f"({', '.join(uids[:5])}{', ...' if len(uids) > 5 else ''})")
    chosen = series or uids[0]
    files = [(p, ds) for p, ds in headers if str(ds.SeriesInstanceUID) == chosen]
    if not files:
        raise DataError(folder, f"no file of series {chosen}")
    declared(files[0][1], folder, len(files))
    normal = _normal(files[0][1])
    if normal is not None and all("ImagePositionPatient" in ds for _, ds in files):
        files.sort(key=lambda f: float(np.dot(np.asarray(f[1].ImagePositionPatient, float), normal)))
    else:
        files.sort(key=lambda f: int(getattr(f[1], "InstanceNumber", 0) or 0))
    datasets = [pydicom.dcmread(str(p)) for p, _ in files]
    slices = [_pixels(ds, p, voi) for (p, _), ds in zip(files, datasets, strict=True)]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise DataError(folder, f"the series' images differ in size: {sorted(shapes)}")
    volume = np.stack(slices)
    step = None
    if len(datasets) > 1 and normal is not None and "ImagePositionPatient" in datasets[0]:
        step = (np.asarray(datasets[-1].ImagePositionPatient, float)
                - np.asarray(datasets[0].ImagePositionPatient, float)) / (len(datasets) - 1)
    dz = float(np.linalg.norm(step)) if step is not None else \
        float(getattr(datasets[0], "SliceThickness", 1) or 1)
    dr, dc = _pixel_spacing(datasets[0])
    return MedicalImage(torch.from_numpy(volume)[None], (dz, dr, dc), _affine(datasets[0], step),
                        "dicom", folder, datasets)


def read(path: str | Path, voi: bool = False, series: str | None = None,
         spatial_dims: int | None = None) -> MedicalImage:
    """Read a DICOM file or series folder, a NIfTI file, a PNG/JPEG/TIFF image or a ``.npy`` array:
    the one entry point every reader of a user's file goes through.

    ``voi`` applies the DICOM VOI LUT (window); ``series`` picks one series in a folder holding
    several; ``spatial_dims`` says whether a ``.npy`` array without a channel axis is 2D or 3D
    (an array with one more axis is channels first). Errors name the file and the reason.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file or folder")
    if p.is_dir():
        return _read_series(p, voi, series)
    if p.suffix.lower() == ".npy":
        data = torch.from_numpy(read_npy(p))
        if data.ndim == (spatial_dims or 2):
            data = data[None]
        return MedicalImage(data, (1.0,) * (data.ndim - 1), None, "array", p)
    if is_nifti(p):
        data, affine, spacing = read_nifti(p)
        arr = torch.from_numpy(np.asarray(data, dtype=np.float32))
        arr = arr[None] if arr.ndim == 3 else torch.movedim(arr, -1, 0) if arr.ndim == 4 else arr[None]
        return MedicalImage(arr, tuple(float(s) for s in spacing[:3]), affine, "nifti", p)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        img = read_image_2d(p)
        return MedicalImage(torch.from_numpy(img), (1.0, 1.0), None, "image", p)
    return _read_dicom_file(p, voi)
