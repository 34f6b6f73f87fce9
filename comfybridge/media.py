"""Media types by content: what an upload really is, whatever its name says."""

from __future__ import annotations

import contextlib
import mimetypes
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

SNIFF_BYTES = 32


def sniff(head: bytes) -> tuple[str, str, str] | None:
    """(kind, MIME type, extension) of a file from its first bytes, or None for anything not media."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "image/png", ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "image/jpeg", ".jpg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image", "image/gif", ".gif"
    if head.startswith(b"RIFF") and len(head) >= 12:
        riff = {b"WEBP": ("image", "image/webp", ".webp"), b"WAVE": ("audio", "audio/wav", ".wav")}
        riff[b"AVI "] = ("video", "video/x-msvideo", ".avi")
        return riff.get(head[8:12])
    if head.startswith(b"BM"):
        return "image", "image/bmp", ".bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image", "image/tiff", ".tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "image", "image/avif", ".avif"
        if brand in (b"heic", b"heix", b"mif1"):
            return "image", "image/heic", ".heic"
        if brand.startswith(b"M4A"):
            return "audio", "audio/mp4", ".m4a"
        if brand == b"qt  ":
            return "video", "video/quicktime", ".mov"
        return "video", "video/mp4", ".mp4"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "video", "video/webm", ".webm"
    if head.startswith(b"OggS"):
        return "audio", "audio/ogg", ".ogg"
    if head.startswith(b"fLaC"):
        return "audio", "audio/flac", ".flac"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio", "audio/mpeg", ".mp3"
    return None


ISO_BMFF = {".mp4", ".mov", ".m4a", ".avif", ".heic"}
OGG_MAX_PAGE = 65307


def is_complete(path: Path, ext: str) -> bool:
    """Whether the file is whole and well-formed where its format makes that cheap to see: its
    structure must account for every byte (a PNG ends with IEND, a RIFF or BMP states its size, an
    MP4's boxes add up), so a signature glued onto a script, or a cut-off file, is refused.
    Blocking: run it in a thread."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(64)
        handle.seek(max(0, size - 64))
        tail = handle.read()
        if ext == ".png":
            return head[12:16] == b"IHDR" and tail.endswith(b"IEND\xaeB`\x82")
        if ext == ".jpg":
            return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
        if ext == ".gif":
            return tail.rstrip(b"\x00").endswith(b";")
        if ext in (".webp", ".wav", ".avi"):
            stated = struct.unpack("<I", head[4:8])[0] + 8
            return stated in (size, size - 1)  # RIFF pads odd chunks with one byte
        if ext == ".bmp":
            return len(head) >= 6 and struct.unpack("<I", head[2:6])[0] == size
        if ext == ".tiff":
            order = "<" if head[:2] == b"II" else ">"
            return len(head) >= 8 and 8 <= struct.unpack(order + "I", head[4:8])[0] < size
        if ext in ISO_BMFF:
            return _boxes_fill(handle, size)
        if ext == ".flac":
            return len(head) >= 8 and head[4] & 0x7F == 0 and head[5:8] == b"\x00\x00\x22"  # STREAMINFO
        if ext == ".ogg":
            handle.seek(max(0, size - OGG_MAX_PAGE))
            return b"OggS" in handle.read()
    return True  # WebM, MP3: the signature is all that is checked


def _boxes_fill(handle: BinaryIO, size: int) -> bool:
    """ISO BMFF (MP4, MOV, AVIF, HEIC): top-level boxes must tile the file exactly."""
    position = 0
    while position < size:
        handle.seek(position)
        header = handle.read(16)
        if len(header) < 8:
            return False
        length = struct.unpack(">I", header[:4])[0]
        if length == 1:
            if len(header) < 16:
                return False
            length = struct.unpack(">Q", header[8:16])[0]
        elif length == 0:
            return True  # the last box runs to the end of the file
        if length < 8:
            return False
        position += length
    return position == size


# Decoders (Pillow, which ComfyUI loads images with) paint each frame onto the whole canvas, and a
# frame placed outside it grows the canvas: so every frame is counted at the canvas's size so far.
MAX_FRAMES = 100_000  # frames counted at most: past this a file is refused without reading on
MAX_PIECES = 1_000_000  # headers (chunks, blocks, sub-blocks, segments) one image may make us read
_BUFFER = 64 * 1024


class BadHeaders(ValueError):
    """Image headers that are cut off, run past the file, or are too many to read: the image is refused."""


@dataclass(frozen=True)
class Frames:
    """What decoding an image would make, read from its headers alone."""

    count: int  # MAX_FRAMES + 1 when there are more (counting stopped there)
    width: int  # the largest frame
    height: int
    pixels: int  # all frames together
    same_size: bool

    @property
    def frame_mp(self) -> float:
        return self.width * self.height / 1e6

    @property
    def total_mp(self) -> float:
        return self.pixels / 1e6


class _Enough(Exception):
    """Past MAX_FRAMES: the verdict is known, so the walk stops."""


class _Tally:
    """Frames as a decoder makes them: each at the canvas's size so far, which frames only grow."""

    def __init__(self) -> None:
        self.canvas = (0, 0)
        self.first: tuple[int, int] | None = None
        self.count = self.pixels = 0

    def grow(self, width: int, height: int) -> None:
        self.canvas = (max(self.canvas[0], width), max(self.canvas[1], height))

    def add(self, width: int = 0, height: int = 0, left: int = 0, top: int = 0) -> None:
        """One frame of this size at this place, decoded at the canvas's size."""
        self.grow(left + width, top + height)
        self.fill(self.count + 1)

    def fill(self, count: int) -> None:
        """Frames declared but not described, up to `count`, each the canvas's size."""
        if count <= self.count:
            return
        self.first = self.first or self.canvas
        self.pixels += (count - self.count) * self.canvas[0] * self.canvas[1]
        self.count = count
        if count > MAX_FRAMES:
            self.count = MAX_FRAMES + 1
            raise _Enough

    def frames(self) -> Frames:
        if self.count == 0:
            raise BadHeaders("no image in the file")
        return Frames(self.count, *self.canvas, self.pixels, self.first == self.canvas)


class _Walk:
    """A file read a header at a time: each read is small, and bodies are seeked over."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size
        self.pieces = 0

    def take(self, count: int) -> bytes:
        self.pieces += 1
        if self.pieces > MAX_PIECES:
            raise BadHeaders(f"more than {MAX_PIECES} headers")
        data = self.handle.read(count)
        if len(data) < count:
            raise BadHeaders("cut off")
        return data

    def seek(self, position: int) -> None:
        if position > self.size:
            raise BadHeaders("a length runs past the end of the file")
        self.handle.seek(position)

    def skip(self, count: int) -> None:
        self.seek(self.handle.tell() + count)


def image_frames(path: Path, ext: str) -> Frames | None:
    """How many frames an image has and how large, from its headers only, so a decompression bomb
    (ComfyUI decodes every frame to float32) is refused before anything decodes it; None for a
    format not read here. Reads in small pieces and stops past MAX_FRAMES or MAX_PIECES, so a
    hostile file costs little; raises only BadHeaders. Blocking: run it in a thread."""
    read = _READERS.get(ext)
    if read is None:
        return None
    tally = _Tally()
    with path.open("rb", buffering=_BUFFER) as handle, contextlib.suppress(_Enough):
        read(_Walk(handle, os.fstat(handle.fileno()).st_size), tally)
    return tally.frames()


def _png(walk: _Walk, tally: _Tally) -> None:
    """IHDR is the canvas. An APNG declares its frames in acTL (before the first IDAT, or it is a
    still image) and places each in an fcTL; an IDAT before any fcTL is one frame more."""
    chunks = _png_chunks(walk)
    kind, length = next(chunks)
    if kind != b"IHDR":
        raise BadHeaders("no IHDR first")
    tally.grow(*struct.unpack(">II", _body(walk, length, 8)))
    declared = extra = 0
    for kind, length in chunks:
        if kind == b"acTL" and not declared:
            (declared,) = struct.unpack(">I", _body(walk, length, 4))
        elif kind == b"fcTL" and declared:
            _, width, height, left, top = struct.unpack(">5I", _body(walk, length, 20))
            tally.add(width, height, left, top)
        elif kind == b"IDAT" and not declared:
            break  # a still image
        elif kind == b"IDAT" and not tally.count:
            extra = 1  # the default image, shown before the animation
            tally.add()
        elif kind == b"IEND":
            break
    tally.fill(max(declared + extra, 1))


def _body(walk: _Walk, length: int, need: int) -> bytes:
    """The first `need` bytes of a chunk `length` long, whose fields need that many."""
    if length < need:
        raise BadHeaders("a chunk too short for its fields")
    return walk.take(need)


def _png_chunks(walk: _Walk) -> Iterator[tuple[bytes, int]]:
    """(type, length) of each chunk; the next starts where the length says, whatever was read."""
    position = 8
    while True:
        walk.seek(position)
        length, kind = struct.unpack(">I4s", walk.take(8))
        position += 12 + length
        if position > walk.size:
            raise BadHeaders("a chunk runs past the end of the file")
        yield kind, length


def _gif(walk: _Walk, tally: _Tally) -> None:
    """The logical screen is the canvas; each image descriptor is a frame. Blocks and their data
    sub-blocks are stepped over by their lengths: nothing is decompressed."""
    width, height, flags = struct.unpack("<HHB", walk.take(11)[6:])
    tally.grow(width, height)
    walk.skip(2 + _palette(flags))
    while True:
        block = walk.take(1)
        if block == b";":
            return
        if block == b"!":
            walk.skip(1)  # the extension's label
        elif block == b",":
            left, top, width, height, flags = struct.unpack("<4HB", walk.take(9))
            tally.add(width, height, left, top)
            walk.skip(_palette(flags) + 1)  # and the LZW minimum code size
        else:
            raise BadHeaders(f"unknown GIF block {block!r}")
        while length := walk.take(1)[0]:
            walk.skip(length)


def _palette(flags: int) -> int:
    """Bytes of the colour table a GIF screen or image descriptor's flags announce."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _jpeg(walk: _Walk, tally: _Tally) -> None:
    """Segments up to the first start-of-frame (SOF0..SOF15, but C4, C8 and CC are other markers),
    whose height and width are the image's: a JPEG is one frame."""
    walk.skip(2)  # SOI
    while True:
        marker = walk.take(2)
        if marker[0] != 0xFF:
            raise BadHeaders("no marker where one should be")
        code = marker[1]
        while code == 0xFF:  # fill bytes
            code = walk.take(1)[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:
            continue  # markers without a length
        if code in (0xD9, 0xDA):
            raise BadHeaders("image data before any frame header")
        (length,) = struct.unpack(">H", walk.take(2))
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
            if length < 7:
                raise BadHeaders("short frame header")
            _, height, width = struct.unpack(">BHH", walk.take(5))
            tally.add(width, height)
            return
        if length < 2:
            raise BadHeaders("segment shorter than its length field")
        walk.skip(length - 2)


def _webp(walk: _Walk, tally: _Tally) -> None:
    """VP8X gives the canvas and ANMF each frame's place and size; a still image is its VP8
    (lossy) or VP8L (lossless) bitstream's size, on the canvas if there is one."""
    image = None
    for kind, length in _riff_chunks(walk):
        if kind == b"VP8X":
            head = _body(walk, length, 10)
            tally.grow(_u24(head, 4) + 1, _u24(head, 7) + 1)
        elif kind == b"ANMF":
            head = _body(walk, length, 12)
            left, top, width, height = (_u24(head, at) for at in (0, 3, 6, 9))
            tally.add(width + 1, height + 1, left * 2, top * 2)
        elif kind == b"VP8 " and image is None:
            image = _vp8_size(_body(walk, length, 10))
        elif kind == b"VP8L" and image is None:
            image = _vp8l_size(_body(walk, length, 5))
    if not tally.count and image is not None:
        tally.add(*image)


def _riff_chunks(walk: _Walk) -> Iterator[tuple[bytes, int]]:
    """(fourcc, length) of each chunk inside the RIFF, which end on even offsets."""
    (riff_size,) = struct.unpack("<I", walk.take(8)[4:])
    end = min(8 + riff_size, walk.size)
    position = 12
    while position + 8 <= end:
        walk.seek(position)
        kind, length = struct.unpack("<4sI", walk.take(8))
        if position + 8 + length > end:
            raise BadHeaders("a chunk runs past the end of the file")
        position += 8 + length + (length & 1)
        yield kind, length


def _u24(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 3], "little")


def _vp8_size(head: bytes) -> tuple[int, int]:
    if head[3:6] != b"\x9d\x01\x2a":
        raise BadHeaders("no VP8 key frame")
    width, height = struct.unpack("<HH", head[6:])
    return width & 0x3FFF, height & 0x3FFF


def _vp8l_size(head: bytes) -> tuple[int, int]:
    if head[0] != 0x2F:
        raise BadHeaders("no VP8L signature")
    (bits,) = struct.unpack("<I", head[1:])
    return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1


def _bmp(walk: _Walk, tally: _Tally) -> None:
    """The DIB header after the 14-byte file header: 16-bit sizes in the old 12-byte core header,
    signed 32-bit ones from BITMAPINFOHEADER on (a negative height means top-down rows)."""
    walk.skip(14)
    (header_size,) = struct.unpack("<I", walk.take(4))
    if header_size == 12:
        width, height = struct.unpack("<HH", walk.take(4))
    elif header_size >= 16:
        width, height = struct.unpack("<ii", walk.take(8))
    else:
        raise BadHeaders("unknown BMP header")
    tally.add(abs(width), abs(height))


_READERS: dict[str, Callable[[_Walk, _Tally], None]] = {
    ".png": _png,
    ".gif": _gif,
    ".jpg": _jpeg,
    ".webp": _webp,
    ".bmp": _bmp,
}


def media_kind_of(name: str) -> str | None:
    """image, video or audio, from a stored name (whose extension the content chose)."""
    guessed, _ = mimetypes.guess_type(name)
    kind = (guessed or "").partition("/")[0]
    return kind if kind in ("image", "video", "audio") else None


def content_type_for(name: str) -> str:
    """The Content-Type to send a stored file with, from its name."""
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"
