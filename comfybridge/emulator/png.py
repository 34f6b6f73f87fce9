"""Tiny PNG writer and reader, so the emulator makes real image files without Pillow."""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def solid_png(width: int, height: int, rgb: int) -> bytes:
    """A valid RGB PNG of one colour (`rgb` as 0xRRGGBB), as ComfyUI's EmptyImage makes."""
    pixel = bytes(((rgb >> 16) & 0xFF, (rgb >> 8) & 0xFF, rgb & 0xFF))
    row = b"\x00" + pixel * width
    raw = row * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 1)) + _chunk(b"IEND", b"")


def png_from_rows(width: int, height: int, rows: list[bytes]) -> bytes:
    """A valid RGB PNG from `height` rows of `width` RGB pixels each."""
    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 1)) + _chunk(b"IEND", b"")


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG header, or None when `data` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def png_first_pixel(data: bytes) -> int | None:
    """The top-left pixel as 0xRRGGBB of an 8-bit RGB or RGBA PNG (every row filter leaves it as
    stored), or None for anything else; so a loaded image keeps its real colour."""
    size = png_size(data)
    if size is None or data[24] != 8 or data[25] not in (2, 6):
        return None
    position, compressed = 8, b""
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            compressed += data[position + 8 : position + 8 + length]
        elif kind == b"IEND":
            break
        position += 12 + length
    try:
        first = zlib.decompressobj().decompress(compressed, 4)
    except zlib.error:
        return None
    return int.from_bytes(first[1:4], "big") if len(first) == 4 else None
