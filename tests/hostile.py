"""A corpus of malformed and hostile files, made by the tests: decompression bombs whose headers
declare gigabytes, truncated files, non-finite pixels in every format, object arrays, and pickles
whose unpickling would write a marker file."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np


class Payload:
    """Unpickling this object creates ``marker`` (standing in for any code an attacker runs)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_pickle_bytes(marker: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"explanation": Payload(marker)}, buf)
    return buf.getvalue()


def object_npy_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    return buf.getvalue()


def object_npz_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=np.array([Payload(marker)], dtype=object))
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels; the data is one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x00" * min(width, 4096))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", row) + _chunk(b"IEND", b"")


def png_bomb(side: int = 9000) -> bytes:
    """A real, fully decodable grey PNG of ``side`` x ``side`` pixels (compresses to ~80 KB)."""
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * side for _ in range(side)), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


def noise_png(side: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A baseline JPEG header (SOF0) declaring ``width`` x ``height``, without scan data."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD declares a ``width`` x ``height`` 8-bit grey strip."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
               (279, 4, 1, width * height)]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 64


def float_tiff(values: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, values.astype(np.float32))
    return buf.getvalue()


def nifti_declaring(shape: tuple[int, ...], gz: bool = True) -> bytes:
    """A NIfTI-1 header declaring ``shape`` float32 voxels, followed by a few bytes of data."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4 + b"\x00" * 64
    return gzip.compress(raw) if gz else raw


def nifti_bytes(data: np.ndarray, gz: bool = True) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(np.float32), np.eye(4))
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def npy_bytes(data: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, data)
    return buf.getvalue()


def npy_declaring(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring ``shape`` bytes, followed by a few bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + b"\x00" * 64


def dicom_bytes(rows: int = 64, cols: int = 64, frames: int | None = None,
                pixels: bytes | None = None, name: str = "Doe^Jane") -> bytes:
    """A CR-like DICOM file; ``rows``/``cols``/``frames`` are what the header declares, ``pixels``
    what it holds (default: matching zeros)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = name, "HOSTILE-1", "CR"
    ds.ReferringPhysicianName = "Strange"  # a single-part name: highdicom warns with it
    ds.Rows, ds.Columns = rows, cols
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels is None:
        count = rows * cols * (frames or 1)
        pixels = (np.arange(count, dtype=np.uint16) % 4096).tobytes()
    ds.PixelData = pixels
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def corpus(tmp: Path) -> dict[str, tuple[str, bytes, str]]:
    """{case: (file name, bytes, what must happen)}: 'too large', 'non-finite' or 'refused'."""
    nan = np.ones((64, 64), np.float32)
    nan[3, 5] = np.nan
    inf = np.ones((64, 64), np.float32)
    inf[7, 7] = np.inf
    vol = np.ones((16, 16, 16), np.float32)
    vol[1, 2, 3] = np.nan
    good_dicom = dicom_bytes()
    return {
        "png header 60000^2": ("a.png", png_declaring(60000, 60000), "too large"),
        "png bomb 9000^2": ("b.png", png_bomb(9000), "too large"),
        "jpeg header 65000^2": ("c.jpg", jpeg_declaring(65000, 65000), "too large"),
        "tiff header 60000^2": ("d.tif", tiff_declaring(60000, 60000), "too large"),
        "nifti header 2000^3": ("e.nii.gz", nifti_declaring((2000, 2000, 2000)), "too large"),
        "nifti header 2000^3 uncompressed": ("f.nii", nifti_declaring((2000, 2000, 2000), False),
                                             "too large"),
        "dicom 60000^2": ("g.dcm", dicom_bytes(60000, 60000, pixels=b"\x00" * 128), "too large"),
        "dicom 100000 frames": ("h.dcm", dicom_bytes(64, 64, 100000, pixels=b"\x00" * 128),
                                "too large"),
        "dicom truncated": ("i.dcm", good_dicom[: len(good_dicom) // 2], "refused"),
        "png truncated": ("j.png", noise_png()[:600], "refused"),
        "float tiff with NaN": ("k.tif", float_tiff(nan), "non-finite"),
        "float tiff with Inf": ("l.tif", float_tiff(inf), "non-finite"),
        "nifti with NaN": ("m.nii.gz", nifti_bytes(vol), "non-finite"),
        "npy with NaN": ("n.npy", npy_bytes(nan[None]), "non-finite"),
        "npy with Inf": ("o.npy", npy_bytes(inf[None]), "non-finite"),
        "npy of objects": ("p.npy", object_npy_bytes(tmp / "npy-marker"), "refused"),
        "npy header 60000^2": ("q.npy", npy_declaring((1, 60000, 60000)), "too large"),
    }
