"""Writes the sample EHR's two images (no imaging library needed): `chest-xray.png`, a 4×4 RGB
PNG, and `knee-mri.jpg`, a 16×8 greyscale baseline JPEG (two flat 8×8 blocks, DC only).

    python tests/data/ehr/images/make_images.py
"""

import struct
import zlib
from pathlib import Path

HERE = Path(__file__).parent


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + b"".join(bytes((40 * x, 40 * y, 200)) for x in range(width)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def jpeg() -> bytes:
    """Two 8×8 blocks: mid grey, then lighter (DC difference +8 after the quantiser of 8)."""

    def segment(marker: int, data: bytes) -> bytes:
        return struct.pack(">HH", marker, len(data) + 2) + data

    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\x00" + bytes([8] * 64)  # table 0, 8-bit, every coefficient quantised by 8
    sof0 = struct.pack(">BHHB", 8, 8, 16, 1) + b"\x01\x11\x00"  # 8 bits, 8 rows, 16 columns, 1 component
    # DC table 0: categories 0 and 4, codes 00 and 01 (length 2: a JPEG code is never all ones)
    dht_dc = b"\x00" + bytes([0, 2] + [0] * 14) + bytes([0, 4])
    # AC table 0: only EOB (0x00), code 0 of length 1
    dht_ac = b"\x10" + bytes([1] + [0] * 15) + bytes([0])
    sos = b"\x01\x01\x00\x00\x3f\x00"  # 1 component, tables 0/0, spectral 0-63, no approximation
    # Block 1: DC diff 0 → "00", EOB "0". Block 2: DC diff +8 → category 4 "01" + bits "1000", EOB "0".
    bits = "00" + "0" + "01" + "1000" + "0"
    bits += "1" * (-len(bits) % 8)  # padded with ones
    scan = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))
    assert b"\xff" not in scan
    return (
        b"\xff\xd8"
        + segment(0xFFE0, app0)
        + segment(0xFFDB, dqt)
        + segment(0xFFC0, sof0)
        + segment(0xFFC4, dht_dc)
        + segment(0xFFC4, dht_ac)
        + segment(0xFFDA, sos)
        + scan
        + b"\xff\xd9"
    )


if __name__ == "__main__":
    (HERE / "chest-xray.png").write_bytes(png(4, 4))
    (HERE / "knee-mri.jpg").write_bytes(jpeg())
