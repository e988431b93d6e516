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


def _compressed_dicom(frames: list[bytes], syntax: str, rows: int, cols: int, bits: int = 16,
                      samples: int = 1) -> bytes:
    """A DICOM file whose header declares ``rows`` x ``cols`` and whose encapsulated pixel data is
    ``frames`` (codestreams) under transfer syntax ``syntax``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "HOSTILE-2", "CR"
    ds.Rows, ds.Columns = rows, cols
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg2000_dicom(side: int = 64, declare: int | None = None) -> bytes:
    """A JPEG 2000 DICOM of ``side`` x ``side`` 16-bit pixels whose codestream's SIZ marker is
    rewritten to declare ``declare`` x ``declare`` (a decompression bomb when large)."""
    from openjpeg import encode

    pixels = (np.arange(side * side, dtype=np.uint16) % 4096).reshape(side, side)
    stream = bytearray(encode(pixels, photometric_interpretation=2, use_mct=False))
    if declare is not None:
        assert stream[:4] == b"\xff\x4f\xff\x51"
        stream[8:16] = struct.pack(">II", declare, declare)
    return _compressed_dicom([bytes(stream)], "1.2.840.10008.1.2.4.90", side, side)


def jpeg_dicom(side: int = 64, declare: int | None = None) -> bytes:
    """A baseline-JPEG DICOM of 8-bit pixels whose start-of-frame declares ``declare`` x
    ``declare``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(side * side) % 251).astype(np.uint8).reshape(side, side)).save(
        buf, format="JPEG", quality=95)
    stream = bytearray(buf.getvalue())
    if declare is not None:
        pos = stream.index(b"\xff\xc0")
        stream[pos + 5:pos + 9] = struct.pack(">HH", declare, declare)
    return _compressed_dicom([bytes(stream)], "1.2.840.10008.1.2.4.50", side, side, bits=8)


def rle_bomb(side: int = 64, expand_mb: int = 64) -> bytes:
    """An RLE DICOM of ``side`` x ``side`` 8-bit pixels whose one segment is replicate runs that
    would expand to ``expand_mb`` MB (each 2 bytes become 128)."""
    runs = b"\x81\x07" * (expand_mb * 2**20 // 128)
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return _compressed_dicom([header + runs], "1.2.840.10008.1.2.5", side, side, bits=8)


def rle_dicom(side: int = 64) -> bytes:
    """A valid RLE DICOM of ``side`` x ``side`` 8-bit pixels (literal runs)."""
    row = bytes(range(side))
    segment = b"".join(bytes([side - 1]) + row for _ in range(side)) if side <= 128 else b""
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return _compressed_dicom([header + segment], "1.2.840.10008.1.2.5", side, side, bits=8)


def deflate_bomb(mb: int = 2048) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose dataset inflates to ``mb`` MB (a private
    OB element of zeros), while its header declares a 64 x 64 image."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = dicom_bytes()
    # the dataset after the file meta: rebuild it deflated with a large tail element
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(plain))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    ds.save_as(head, enforce_file_format=True)
    raw = head.getvalue()
    # split: preamble + meta stay, the deflated dataset is replaced by a bomb stream
    meta_end = 132 + 12 + struct.unpack("<I", raw[140:144])[0]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    tag = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, mb * 2**20)
    body = compressor.compress(tag)
    zeros = b"\x00" * 2**20
    for _ in range(mb):
        body += compressor.compress(zeros)
    body += compressor.flush()
    return raw[:meta_end] + body
