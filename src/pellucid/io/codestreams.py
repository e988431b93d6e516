"""What a compressed DICOM's pixel data says about its own size, read before anything is decoded.

The DICOM header's Rows and Columns are checked against the decode limits (:mod:`pellucid.guards`),
but a decoder allocates what the *codestream* declares: a 6 KB file whose header says 64 x 64 and
whose JPEG 2000 SIZ marker says 40000 x 40000 makes OpenJPEG allocate gigabytes. So every frame's
codestream is parsed for its own dimensions, which must equal the header's:

- JPEG 2000 (ISO/IEC 15444-1 A.5.1): the SIZ marker (``FF51``) after SOC (``FF4F``), raw or inside
  a JP2 ``jp2c`` box; width ``Xsiz - XOsiz``, height ``Ysiz - YOsiz``, ``Csiz`` components.
- JPEG and JPEG-LS (ITU-T T.81 B.2.2, T.87): the first start-of-frame marker (``FFC0``-``FFCF``
  but DHT/JPG/DAC, ``FFF7``): height, width, components. A height of 0 (set later by DNL) is
  refused.
- RLE (DICOM PS3.5 G): the header's segment count must be samples x bytes per sample, and every
  segment is scanned (control bytes only, stopping as soon as it passes the frame's size) so that
  no segment can expand beyond ``rows x columns`` bytes (a replicate run turns 2 bytes into 128).
- Deflate (PS3.5 A.5): the dataset is inflated in bounded chunks and counted, output discarded,
  before pydicom inflates it in one piece; more than the limits allow is refused.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

from pellucid.errors import DataError
from pellucid.guards import TooLarge, current_limits

DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
JPEG2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
            "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
            "1.2.840.10008.1.2.4.203")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
HEADER_BYTES = 2**24  # what a DICOM dataset may hold beside its pixels (16 MiB)


def jpeg2000_size(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ marker (raw or in a JP2)."""
    start = 0
    if data[4:8] == b"jP  ":  # a JP2 file: find the contiguous codestream box
        pos = 0
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            header = 8
            if length == 1:
                length, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
            if kind == b"jp2c":
                start = pos + header
                break
            if length < header:
                raise ValueError("a JP2 box with a bad length")
            pos += length
        else:
            raise ValueError("a JP2 file without a codestream box")
    if data[start:start + 4] != b"\xff\x4f\xff\x51":
        raise ValueError("no SOC and SIZ marker at the start of the JPEG 2000 codestream")
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[start + 8:start + 24])
    (csiz,) = struct.unpack(">H", data[start + 40:start + 42])
    return ysiz - yo, xsiz - xo, csiz


def jpeg_size(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from the first start-of-frame marker of a JPEG/JPEG-LS stream."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("no SOI marker at the start of the JPEG stream")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError("a JPEG marker segment is out of place")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            if height == 0:
                raise ValueError("the JPEG frame declares its height later (DNL), which is not "
                                 "supported")
            return height, width, data[pos + 9]
        if length < 2:
            raise ValueError("a JPEG marker segment with a bad length")
        pos += 2 + length
    raise ValueError("no start-of-frame marker in the JPEG stream")


class Oversize(ValueError):
    """A codestream that would decode to more than its header allows."""


def rle_check(data: bytes, rows: int, cols: int, segments: int) -> None:
    """Refuse an RLE frame whose header or segments could decode to more than ``rows x cols`` bytes
    per segment (each segment is scanned, stopping at the first byte past that size)."""
    if len(data) < 64:
        raise ValueError("the RLE header is truncated")
    count, *offsets = struct.unpack("<16I", data[:64])
    if count != segments:
        raise ValueError(f"the RLE header declares {count} segments, the DICOM header needs "
                         f"{segments}")
    ends = [*offsets[1:count], len(data)]
    need = rows * cols
    for start, end in zip(offsets[:count], ends, strict=True):
        if not 64 <= start <= end <= len(data):
            raise ValueError("an RLE segment offset points outside the frame")
        produced, pos = 0, start
        while pos < end:
            n = data[pos]
            if n < 128:
                produced += n + 1
                pos += n + 2
            elif n > 128:
                produced += 257 - n
                pos += 2
            else:
                pos += 1
            if produced > need + 1:  # one byte of padding is allowed
                raise Oversize(f"an RLE segment decodes to more than the {need:,} bytes that "
                                 f"{rows} x {cols} pixels need")


def check_encapsulated(ds: Any, path: Path) -> None:
    """Check every frame's codestream of a compressed dataset against its header (see the module
    docstring); a mismatch or an unreadable codestream is one :class:`DataError` naming the file."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if "PixelData" not in ds or not getattr(ds["PixelData"], "is_undefined_length", False):
        return
    from pydicom.encaps import generate_frames

    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    bits = int(getattr(ds, "BitsAllocated", 8) or 8)
    seen = 0
    try:
        for frame in generate_frames(ds.PixelData, number_of_frames=frames):
            seen += 1
            if seen > frames:
                raise ValueError(f"more frames in the pixel data than the {frames} declared")
            if syntax == RLE:
                rle_check(frame, rows, cols, samples * ((bits + 7) // 8))
                continue
            if syntax in JPEG2000:
                size, kind = jpeg2000_size(frame), "JPEG 2000 codestream"
            elif syntax.startswith("1.2.840.10008.1.2.4."):
                size, kind = jpeg_size(frame), "JPEG stream"
            else:
                continue
            if size[:2] != (rows, cols) or size[2] != samples:
                comp = "" if size[2] == samples else f" with {size[2]} components"
                mine = f" ({samples} samples)" if size[2] != samples else ""
                error = TooLarge if size[0] * size[1] * size[2] > rows * cols * samples else DataError
                raise error(path, f"frame {seen}: the {kind} declares {size[0]} x {size[1]}{comp}, "
                                  f"the DICOM header {rows} x {cols}{mine}; refused before decoding")
    except DataError:
        raise
    except Oversize as exc:
        raise TooLarge(path, f"frame {seen}: {exc}; refused before decoding") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(path, f"frame {seen or 1}: cannot read the compressed pixel data's header "
                              f"({first[:160]})") from None


def check_deflated(path: Path) -> None:
    """For a Deflated Explicit VR Little Endian file, inflate the dataset in bounded chunks and
    refuse it when it holds more than the limits allow (``max_voxels`` x 2 bytes, 16-bit pixels,
    plus 16 MiB of header)."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            pydicom.filereader.read_preamble(fh, False)  # past the 128 bytes and DICM
            file_meta = pydicom.filereader._read_file_meta_info(fh)
            if str(file_meta.get("TransferSyntaxUID", "")) != DEFLATED:
                return
            bound = current_limits().max_voxels * 2 + HEADER_BYTES
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            while chunk := fh.read(2**20):
                data = inflater.decompress(chunk, 2**22)
                total += len(data)
                while inflater.unconsumed_tail and total <= bound:
                    total += len(inflater.decompress(inflater.unconsumed_tail, 2**22))
                if total > bound:
                    raise TooLarge(path, f"the deflated dataset inflates to more than {bound:,} "
                                         f"bytes (max_voxels); refused before decoding")
    except DataError:
        raise
    except Exception:
        return  # not a readable file meta: the DICOM reader gives the error
