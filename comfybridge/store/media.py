"""Media types by content: what an upload really is, whatever its name says."""

from __future__ import annotations

import contextlib
import math
import mimetypes
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "MAX_FRAMES",
    "SNIFF_BYTES",
    "BadHeaders",
    "Frames",
    "content_type_for",
    "image_frames",
    "is_complete",
    "media_kind_of",
    "sniff",
    "sniff_needs",
]

SNIFF_BYTES = 32
SNIFF_MAX = 4 << 20  # bytes of leading ID3v2 tags (cover art) looked past, at most, to see the audio


def sniff_needs(head: bytes) -> int:
    """How many first bytes `sniff` needs, from what `head` already holds: SNIFF_BYTES, or, after
    ID3v2 tags (an MP3's, or a FLAC's some taggers write), up to the audio's first four bytes."""
    return max(SNIFF_BYTES, min(_after_id3(head) + 4, SNIFF_MAX))


def _id3_length(header: bytes) -> int | None:
    """The whole length of the ID3v2 tag whose 10-byte header this is (its stated size is four 7-bit
    bytes; a footer follows when its flag says so), or None for a header cut off or of no size."""
    if len(header) < 10 or any(byte & 0x80 for byte in header[6:10]):
        return None
    stated = sum(byte << (7 * (3 - n)) for n, byte in enumerate(header[6:10]))
    return 10 + stated + (10 if header[5] & 0x10 else 0)


def _after_id3(head: bytes) -> int:
    """Where what follows the leading ID3v2 tags begins, as far as `head` tells (0 without one); past
    its end when more bytes are needed to tell."""
    position = 0
    while head[position : position + 3] == b"ID3":
        header = head[position : position + 10]
        length = _id3_length(header)
        if length is None:  # cut off: its header is needed; else no tag
            return position + 10 if len(header) < 10 else position
        position += length
    return position


def sniff(head: bytes) -> tuple[str, str, str] | None:
    """(kind, MIME type, extension) of a file from its first bytes (`sniff_needs` of them), or None
    for anything not media."""
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
    audio = head[_after_id3(head) :]  # (ID3v2 tags lead an MP3, and some FLACs)
    if audio.startswith(b"fLaC"):
        return "audio", "audio/flac", ".flac"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio", "audio/mpeg", ".mp3"
    return None


ISO_BMFF = {".mp4", ".mov", ".m4a", ".avif", ".heic"}
# Headers (boxes, EBML elements, Ogg pages, FLAC blocks) a completeness check reads at most, so a
# file of countless tiny ones costs little: a million is hours of recording.
MAX_HEADERS = 1_000_000


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
        if ext in (".webp", ".wav"):
            stated = struct.unpack("<I", head[4:8])[0] + 8
            return stated in (size, size - 1)  # RIFF pads odd chunks with one byte
        if ext == ".avi":
            return _riffs_fill(handle, size)
        if ext == ".bmp":
            return len(head) >= 6 and struct.unpack("<I", head[2:6])[0] == size
        if ext == ".tiff":
            order = "<" if head[:2] == b"II" else ">"
            return len(head) >= 8 and 8 <= struct.unpack(order + "I", head[4:8])[0] < size
        if ext in ISO_BMFF:
            return _boxes_fill(handle, size)
        if ext == ".flac":
            return _flac_frames_follow(handle, size)
        if ext == ".ogg":
            return _ogg_pages_fill(handle, size)
        if ext == ".webm":
            return _ebml_fills(handle, size)
        if ext == ".mp3":
            return _mpeg_audio_follows(handle, size)
    return True


def _riffs_fill(handle: BinaryIO, size: int) -> bool:
    """An AVI is one RIFF of the size it states or, past 1 GB (OpenDML), goes on in RIFF AVIX chunks
    of theirs: together they make up the file (each padded to an even length, the last maybe not)."""
    position = 0
    while position < size - 1:
        handle.seek(position)
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != (b"AVI " if position == 0 else b"AVIX"):
            return False
        length = struct.unpack("<I", head[4:8])[0]
        position += 8 + length + (length & 1)
    return position in (size, size + 1)


EBML_HEADER = b"\x1a\x45\xdf\xa3"
EBML_SEGMENT = b"\x18\x53\x80\x67"
EBML_BESIDE = {b"\xec", b"\xbf"}  # Void, CRC-32: allowed at any level
# A Segment's children (Matroska's level 1), and a Cluster's: what an element of unknown size may
# hold; the first ID of neither ends an unknown-size Cluster.
WEBM_LEVEL_1 = {
    b"\x11\x4d\x9b\x74", b"\x15\x49\xa9\x66", b"\x16\x54\xae\x6b", b"\x1f\x43\xb6\x75",
    b"\x1c\x53\xbb\x6b", b"\x12\x54\xc3\x67", b"\x10\x43\xa7\x70", b"\x19\x41\xa4\x69",
}  # fmt: skip
WEBM_CLUSTER = b"\x1f\x43\xb6\x75"
WEBM_IN_CLUSTER = {b"\xe7", b"\xa3", b"\xa0", b"\xa7", b"\xab", b"\xaf", b"\x58\x54"}


def _ebml_fills(handle: BinaryIO, size: int) -> bool:
    """WebM (EBML): an EBML header, then one Segment (Void and CRC-32 beside), tiling the file. A
    Segment or Cluster of unknown size (as recorders write them) is walked: its children, by their
    IDs, must run to the end."""
    elements = _ebml_elements(handle, 0, size)
    try:
        first = next(elements)
        if first[0] != EBML_HEADER or first[2] is None:
            return False
        segments = 0
        for element, _, length in elements:
            if element == EBML_SEGMENT:
                segments += 1
                if length is None:  # unknown: its children run to the end of the file
                    return segments == 1 and _unknown_segment(elements)
            elif element not in EBML_BESIDE:
                return False
        return segments == 1
    except _NotEbml:
        return False


class _NotEbml(Exception):
    """Bytes that are not EBML elements, or too many of them."""


def _ebml_elements(handle: BinaryIO, position: int, size: int) -> Iterator[tuple[bytes, int, int | None]]:
    """(ID, where its body starts, its length or None for unknown) of each element from `position`;
    the next starts after the body, or, for one of unknown size, at its body (its children)."""
    for _ in range(MAX_HEADERS):  # a Cluster of unknown size is walked a block at a time
        if position == size:
            return
        handle.seek(position)
        header = handle.read(12)
        id_length = 9 - header[0].bit_length() if header else 9
        if id_length > 4 or len(header) <= id_length:
            raise _NotEbml
        size_length = 9 - header[id_length].bit_length()
        if size_length > 8 or len(header) < id_length + size_length:
            raise _NotEbml
        raw = int.from_bytes(header[id_length : id_length + size_length], "big")
        stated = raw & ((1 << (7 * size_length)) - 1)  # the length marker taken off
        body = position + id_length + size_length
        unknown = stated == (1 << (7 * size_length)) - 1  # all ones
        if not unknown and body + stated > size:
            raise _NotEbml
        yield header[:id_length], body, None if unknown else stated
        position = body + (0 if unknown else stated)
    raise _NotEbml


def _unknown_segment(elements: Iterator[tuple[bytes, int, int | None]]) -> bool:
    """The rest of the file, inside a Segment of unknown size: level-1 elements, and inside a
    Cluster of unknown size its own children, until the file ends."""
    in_cluster = False
    for element, _, length in elements:
        if element in WEBM_LEVEL_1 or element in EBML_BESIDE:
            in_cluster = element == WEBM_CLUSTER and length is None
            if length is None and not in_cluster:
                return False  # only a Cluster's children are walked
        elif not (in_cluster and element in WEBM_IN_CLUSTER and length is not None):
            return False
    return True


# MPEG audio frame headers: kbit/s by (MPEG-1?, layer) and bitrate index; Hz by version.
_KBITS = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_KBITS[(False, 3)] = _KBITS[(False, 2)]
_HERTZ = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits
MP3_LEAD = 64 * 1024  # zero bytes allowed between the tags and the first frame (as ffmpeg resyncs)


def _id3_end(handle: BinaryIO) -> int | None:
    """Where the file's leading ID3v2 tags end (each where the last one's stated size ends; 0
    without one), or None for a tag that is cut off or states no size."""
    position = 0
    while True:
        handle.seek(position)
        header = handle.read(10)
        if not header.startswith(b"ID3"):
            return position
        length = _id3_length(header)
        if length is None:
            return None
        position += length


def _mpeg_audio_follows(handle: BinaryIO, size: int) -> bool:
    """MP3: after any ID3v2 tags and zero padding, MPEG audio frames: two in a row, or one that ends
    the file (an ID3v1 tag may follow)."""
    position = _id3_end(handle)
    if position is None:
        return False
    handle.seek(position)
    lead = handle.read(MP3_LEAD)
    position += len(lead) - len(lead.lstrip(b"\x00"))
    for _ in range(2):
        handle.seek(position)
        length = _mpeg_frame_length(handle.read(4))
        if length is None or position + length > size:
            return False  # no frame here, or one cut off
        position += length
        if position == size or _id3v1_at(handle, position, size):
            return True
    return True  # two frames in a row: MPEG audio


def _id3v1_at(handle: BinaryIO, position: int, size: int) -> bool:
    """The 128-byte ID3v1 tag that ends a file, at `position`."""
    if size - position != 128:
        return False
    handle.seek(position)
    return handle.read(3) == b"TAG"


def _mpeg_frame_length(header: bytes) -> int | None:
    """The length of the MPEG audio frame this header starts, or None if it is none."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer_bits = header[1] >> 3 & 3, header[1] >> 1 & 3
    index, rate, padding = header[2] >> 4, header[2] >> 2 & 3, header[2] >> 1 & 1
    if version == 1 or layer_bits == 0 or index in (0, 15) or rate == 3:
        return None  # reserved, free-format or bad values
    layer = 4 - layer_bits
    bits = _KBITS[(version == 3, layer)][index] * 1000
    hertz = _HERTZ[version][rate]
    if layer == 1:
        return (12 * bits // hertz + padding) * 4
    return (144 if layer == 2 or version == 3 else 72) * bits // hertz + padding


def _boxes_fill(handle: BinaryIO, size: int) -> bool:
    """ISO BMFF (MP4, MOV, AVIF, HEIC): top-level boxes must tile the file exactly."""
    position = 0
    for _ in range(MAX_HEADERS):
        if position >= size:
            break
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


def _ogg_pages_fill(handle: BinaryIO, size: int) -> bool:
    """Ogg (Vorbis, Opus): pages, each "OggS", version 0, and its segment table's length of data,
    tiling the file."""
    position = 0
    for _ in range(MAX_HEADERS):
        if position == size:
            return True
        handle.seek(position)
        header = handle.read(27)
        if len(header) < 27 or header[:5] != b"OggS\x00":
            return False
        table = handle.read(header[26])
        if len(table) < header[26]:
            return False
        position += 27 + len(table) + sum(table)
        if position > size:
            return False
    return False


def _flac_frames_follow(handle: BinaryIO, size: int) -> bool:
    """FLAC: after any ID3v2 tags (some taggers write them), "fLaC", STREAMINFO first (34 bytes),
    metadata blocks up to the one marked last, then a frame's sync code (or nothing: a stream of no
    samples)."""
    start = _id3_end(handle)
    if start is None:
        return False
    handle.seek(start)
    if handle.read(4) != b"fLaC":
        return False
    position, first = start + 4, True
    for _ in range(MAX_HEADERS):
        handle.seek(position)
        header = handle.read(4)
        if len(header) < 4:
            return False
        kind, length = header[0] & 0x7F, int.from_bytes(header[1:4], "big")
        if first and (kind, length) != (0, 34):
            return False
        first = False
        position += 4 + length
        if position > size:
            return False
        if header[0] & 0x80:  # the last block
            handle.seek(position)
            sync = handle.read(2)
            return position == size or (len(sync) == 2 and sync[0] == 0xFF and sync[1] & 0xFE == 0xF8)
    return False


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
    """Frames as a decoder makes them: each at the canvas's size so far, which frames only grow;
    or, for a format whose frames are separate pictures, each at its own size (`own`)."""

    def __init__(self) -> None:
        self.canvas = (0, 0)
        self.first: tuple[int, int] | None = None
        self.varied = False  # frames of their own sizes, not all the same
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
        self._counted(count, self.canvas[0] * self.canvas[1])

    def own(self, width: int, height: int) -> None:
        """One frame decoded at its own size, on no canvas: the largest is the frame size."""
        if width * height > self.canvas[0] * self.canvas[1]:
            self.canvas = (width, height)
        self.first = self.first or (width, height)
        self.varied = self.varied or self.first != (width, height)
        self._counted(self.count + 1, width * height)

    def _counted(self, count: int, each: int) -> None:
        """Frames up to `count`, each of `each` pixels; past MAX_FRAMES the walk stops."""
        count = min(count, MAX_FRAMES + 1)
        self.pixels += (count - self.count) * each
        self.count = count
        if count > MAX_FRAMES:
            raise _Enough

    def frames(self) -> Frames:
        if self.count == 0:
            raise BadHeaders("no image in the file")
        return Frames(self.count, *self.canvas, self.pixels, self.first == self.canvas and not self.varied)


class _Walk:
    """A file read a header at a time: each read is small, and bodies are seeked over."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size
        self.pieces = 0

    def take(self, count: int, pieces: int = 1) -> bytes:
        """`count` bytes, which hold `pieces` headers (entries of a table read at once)."""
        self.pieces += pieces
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
    """How many frames an image (or a video) has and how large, from its headers only, so a decompression bomb
    (ComfyUI decodes every frame to float32) is refused before anything decodes it; None for a
    format not read here. Reads in small pieces and stops past MAX_FRAMES or MAX_PIECES, so a
    hostile file costs little; raises only BadHeaders. Blocking: run it in a thread."""
    read = _READERS.get(ext)
    if read is None:
        return None
    tally = _Tally()
    with path.open("rb", buffering=_BUFFER) as handle, contextlib.suppress(_Enough):
        read(_Walk(handle, os.fstat(handle.fileno()).st_size), tally)
    if read in (_movie, _webm, _avi) and not tally.count:  # no video in it (sound alone): no frames to decode
        return None
    return tally.frames()


def _png(walk: _Walk, tally: _Tally) -> None:
    """IHDR is the canvas. An APNG declares its frames in acTL (before the first IDAT, or it is a
    still image) and places each in an fcTL; an IDAT before any fcTL is one frame more."""
    chunks = _png_chunks(walk)
    kind, length, end = next(chunks)
    if kind != b"IHDR":
        raise BadHeaders("no IHDR first")
    size = struct.unpack(">II", _body(walk, length, 8))
    if 0 in size:  # the PNG standard forbids it; decoders differ on what they make of it
        raise BadHeaders("an image with no pixels")
    tally.grow(*size)
    declared = extra = 0
    for kind, length, end in chunks:  # noqa: B007 (the last chunk's end is read after the loop)
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
        elif kind == b"IHDR":  # one only: a decoder may take the second's size, which was not checked
            raise BadHeaders("a second IHDR")
    tally.fill(max(declared + extra, 1))
    # Every byte is a chunk's, and the first IEND ends the file: nothing hides behind it.
    while kind != b"IEND":
        kind, _, end = next(chunks)
    if end != walk.size:
        raise BadHeaders("data after the image's end (IEND)")


def _body(walk: _Walk, length: int, need: int) -> bytes:
    """The first `need` bytes of a chunk `length` long, whose fields need that many."""
    if length < need:
        raise BadHeaders("a chunk too short for its fields")
    return walk.take(need)


def _png_chunks(walk: _Walk) -> Iterator[tuple[bytes, int, int]]:
    """(type, length, where it ends) of each chunk; the next starts there, whatever was read."""
    position = 8
    while True:
        walk.seek(position)
        length, kind = struct.unpack(">I4s", walk.take(8))
        position += 12 + length
        if position > walk.size:
            raise BadHeaders("a chunk runs past the end of the file")
        yield kind, length, position


def _gif(walk: _Walk, tally: _Tally) -> None:
    """The logical screen is the canvas; each image descriptor is a frame. Blocks and their data
    sub-blocks are stepped over by their lengths: nothing is decompressed."""
    width, height, flags = struct.unpack("<HHB", walk.take(11)[6:])
    tally.grow(width, height)
    walk.skip(2 + _palette(flags))
    while True:
        block = walk.take(1)
        if block == b";":
            if walk.handle.read(_BUFFER).strip(b"\x00") or walk.handle.read(1):
                raise BadHeaders("data after the image's end (its trailer)")
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
    """A JPEG is one frame, unless an MP index (an APP2 segment starting "MPF": an MPO, as stereo
    cameras and some phones write) counts more images after it: Pillow opens each as a frame, at
    the offset its MP entry gives, of its own size (older Pillow: the first one's). So each counts
    at the largest size so far, and images counted but given no entry at the size so far."""
    walk.skip(2)  # SOI
    size, index = _jpeg_headers(walk)
    tally.add(*size)
    if index is None:
        return
    at, data = index
    images, offsets = _mp_index(data)
    for offset in offsets[: images - 1]:
        walk.seek(at + offset)
        if walk.take(2) != b"\xff\xd8":
            raise BadHeaders("an MP entry where no JPEG starts")
        tally.add(*_jpeg_headers(walk)[0])
    tally.fill(images)


def _jpeg_headers(walk: _Walk) -> tuple[tuple[int, int], tuple[int, bytes] | None]:
    """Segments from after SOI up to the scan, as Pillow reads them: the size its start-of-frame
    headers (SOF0..SOF15, but C4, C8 and CC are other markers) give, and the MP index if there is
    one, with where it starts in the file (its offsets count from there)."""
    size: tuple[int, int] | None = None
    index = None
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
            if size is None:
                raise BadHeaders("image data before any frame header")
            return size, index
        (length,) = struct.unpack(">H", walk.take(2))
        if length < 2:
            raise BadHeaders("segment shorter than its length field")
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
            if length < 7:
                raise BadHeaders("short frame header")
            _, height, width = struct.unpack(">BHH", walk.take(5))
            size = (max(width, size[0]), max(height, size[1])) if size else (width, height)
            walk.skip(length - 7)
        elif code == 0xE2 and length >= 6:
            if walk.take(4) == b"MPF\x00":
                index = (walk.handle.tell(), walk.take(length - 6))
            else:
                walk.skip(length - 6)  # an ICC profile's piece, most often
        else:
            walk.skip(length - 2)


_TIFF_ORDER = {b"II*\x00": "<", b"MM\x00*": ">"}


def _mp_index(index: bytes) -> tuple[int, list[int]]:
    """How many images an MP index says the file holds (NumberOfImages, 0xB001), and where each
    after the first starts, from its MP entries (0xB002, 16 bytes each), counted from the index's
    start. The index is a TIFF structure, as small as the APP2 segment holding it."""
    order = _TIFF_ORDER.get(index[:4])
    if order is None or len(index) < 8:
        raise BadHeaders("an MP index that is no TIFF structure")
    (at,) = struct.unpack_from(order + "I", index, 4)
    if at + 2 > len(index):
        raise BadHeaders("an MP index cut off")
    (count,) = struct.unpack_from(order + "H", index, at)
    entries = index[at + 2 : at + 2 + 12 * count]
    if len(entries) < 12 * count:
        raise BadHeaders("an MP index cut off")
    tags = _ifd(entries, order)
    images = _tag_number(tags, order, 0xB001)
    if images is None:
        raise BadHeaders("an MP index without its number of images")
    _, length, value = tags.get(0xB002, (7, 0, bytes(4)))
    table = b""
    if length >= 16:  # less is not one entry
        (where,) = struct.unpack(order + "I", value)
        table = index[where : where + length - length % 16]
        if len(table) < length - length % 16:
            raise BadHeaders("MP entries cut off")
    offsets = [offset for _, _, offset, _, _ in struct.iter_unpack(order + "3I2H", table)]
    return max(images, 1), offsets[1:]  # the first entry is the file itself


def _ifd(entries: bytes, order: str) -> dict[int, tuple[int, int, bytes]]:
    """A TIFF directory's 12-byte entries: tag -> (type, count, value or offset)."""
    return {tag: (kind, count, value) for tag, kind, count, value in struct.iter_unpack(order + "2HI4s", entries)}


def _tag_number(tags: dict[int, tuple[int, int, bytes]], order: str, tag: int) -> int | None:
    """A tag's one SHORT or LONG value; any other type or count is refused, not guessed at."""
    if tag not in tags:
        return None
    kind, count, value = tags[tag]
    if kind not in (3, 4) or count != 1:
        raise BadHeaders(f"TIFF tag {tag} is not one SHORT or LONG")
    number: int = struct.unpack_from(order + ("H" if kind == 3 else "I"), value)[0]
    return number


TIFF_MAX_ENTRIES = 4096  # entries in one directory: libtiff refuses more as no directory at all


def _tiff(walk: _Walk, tally: _Tally) -> None:
    """Each directory (IFD) of the chain is a page, which Pillow opens as a frame of its own
    ImageWidth x ImageLength (so a pyramid's smaller pages count as what they are). Classic TIFF
    only: BigTIFF is not sniffed as an image. A directory seen twice is a loop, refused; so is one
    of more entries than libtiff would read. Entries count as headers against MAX_PIECES."""
    order = _TIFF_ORDER.get(walk.take(4))
    if order is None:
        raise BadHeaders("not a classic TIFF")
    (offset,) = struct.unpack(order + "I", walk.take(4))
    seen: set[int] = set()  # as many as the frames, which stop past MAX_FRAMES
    while offset:
        if offset in seen:
            raise BadHeaders("a loop of TIFF directories")
        seen.add(offset)
        walk.seek(offset)
        (count,) = struct.unpack(order + "H", walk.take(2))
        if count > TIFF_MAX_ENTRIES:
            raise BadHeaders(f"a TIFF directory of {count} entries")
        tags = _ifd(walk.take(12 * count, pieces=count), order)
        width, height = _tag_number(tags, order, 256) or 0, _tag_number(tags, order, 257) or 0
        if not width or not height:
            raise BadHeaders("a TIFF page with no pixels")
        tally.own(width, height)
        (offset,) = struct.unpack(order + "I", walk.take(4))


def _webp(walk: _Walk, tally: _Tally) -> None:
    """VP8X gives the canvas and ANMF each frame's place and size; a still image is its VP8
    (lossy) or VP8L (lossless) bitstream's size, on the canvas if there is one."""
    image = None
    for kind, length in _riff_chunks(walk):
        if kind == b"VP8X":
            head = _body(walk, length, 10)
            tally.grow(_u24(head, 4) + 1, _u24(head, 7) + 1)
        elif kind == b"ANMF":
            start = walk.handle.tell()
            head = _body(walk, length, 12)
            left, top, width, height = (_u24(head, at) for at in (0, 3, 6, 9))
            tally.add(width + 1, height + 1, left * 2, top * 2)
            _frame_data(walk, start + 16, start + length)
        elif kind == b"VP8 " and image is None:
            image = _vp8_size(_body(walk, length, 10))
        elif kind == b"VP8L" and image is None:
            image = _vp8l_size(_body(walk, length, 5))
    if not tally.count and image is not None:
        tally.add(*image)


def _frame_data(walk: _Walk, position: int, end: int) -> None:
    """An animation frame holds its bitstream (ALPH, VP8, VP8L) and nothing of the file's own: a frame
    whose length swallows the frames after it (which libwebp still decodes) is refused."""
    while position + 8 <= end:
        walk.seek(position)
        kind, length = struct.unpack("<4sI", walk.take(8))
        if kind in (b"ANMF", b"ANIM", b"VP8X"):
            raise BadHeaders(f"a frame holds a {kind.decode(errors='replace')} chunk")
        position += 8 + length + (length & 1)


def _riff_chunks(walk: _Walk) -> Iterator[tuple[bytes, int]]:
    """(fourcc, length) of each chunk inside the RIFF, which end on even offsets."""
    (riff_size,) = struct.unpack("<I", walk.take(8)[4:])
    for kind, _, length in _chunks(walk, 12, min(8 + riff_size, walk.size)):
        yield kind, length  # the walk stands at the chunk's body


AVI_NOT_FRAMES = {b"ix", b"wc", b"pc"}  # a stream's chunks that are no packets: index, palette changes
AVI_METADATA = {b"INFO", b"ncdt"}  # lists ffmpeg reads as tags (a stream header in one is none)
AVI_SKIPPED = {b"JUNK", b"idx1", b"indx"}
MAX_LIST_DEPTH = 8


class _AviHeaders:
    """An AVI's stream headers, read as ffmpeg reads them: wherever they are before the movi list,
    in any list. Each strh is the next stream; one that says vids is video, and its strf (the
    BITMAPINFOHEADER after it) and the main header (avih) give the largest frame size."""

    def __init__(self, walk: _Walk, tally: _Tally) -> None:
        self.walk, self.tally = walk, tally
        self.video: set[int] = set()  # the video streams' numbers
        self.streams = 0
        self.last_video = False
        self.indexed = 0  # video frames the OpenDML indexes (indx, and the ix chunks it lists) name

    def read(self, kind: bytes, at: int, length: int, depth: int = 0) -> None:
        walk = self.walk
        if kind == b"avih" and length >= 40:
            walk.seek(at + 32)
            self.tally.grow(*struct.unpack("<II", walk.take(8)))
        elif kind == b"strh" and length >= 4:
            walk.seek(at)
            kind = walk.take(4)
            self.last_video = kind == b"vids"
            if kind in (b"vids", b"iavs"):  # iavs: DV type 1, video and sound in one stream (sized by avih)
                self.video.add(self.streams)
            self.streams += 1
        elif kind == b"indx" and length >= 24:
            self.indexed += _odml_index(walk, at, self.video)
        elif kind == b"strf" and length >= 12 and self.last_video:
            walk.seek(at + 4)
            width, height = struct.unpack("<ii", walk.take(8))
            self.tally.grow(abs(width), abs(height))
        elif kind == b"LIST" and length >= 4:
            if depth >= MAX_LIST_DEPTH:
                raise BadHeaders("lists nested too deep")
            walk.seek(at)
            if walk.take(4) in AVI_METADATA:
                return
            for part, inner, size in _chunks(walk, at + 4, at + length):
                self.read(part, inner, size, depth + 1)


def _avi(walk: _Walk, tally: _Tally) -> None:
    """AVI, read as ffmpeg's demuxer reads it (the video input of ComfyUI decodes every frame). In
    the movi list, and in any list within it or after it, each chunk of a video stream (NN and two
    letters, but its index and palette chunks) is a frame; an idx1 that names more is read as
    ffmpeg may read it, one frame an entry. A chunk it does not know, in movi or after it, ffmpeg
    scans byte by byte for frames: such a file is refused. An empty chunk is no frame (ffmpeg's
    muxer writes one for each frame time a variable-rate source skips). Past 1 GB (OpenDML), the
    file goes on in RIFF AVIX chunks, each with a movi list of more frames. Frames are of the
    largest size the headers declare; the sizes coded inside the bitstream are not read."""
    headers = _AviHeaders(walk, tally)
    riffs = _riffs(walk)
    start, end = next(riffs)
    movi = False
    chunked = indexed = 0
    for kind, at, length in _chunks(walk, start + 12, end):
        form = walk.take(4) if kind == b"LIST" and length >= 4 else b""
        if form == b"movi" or (movi and kind == b"LIST"):
            movi = True
            chunked += _avi_frames(walk, at + 4, at + length, headers.video)
        elif kind == b"idx1":
            indexed = _avi_index(walk, at, length, headers.video)
        elif not movi:
            headers.read(kind, at, length)
        elif kind not in AVI_SKIPPED:
            raise BadHeaders("an unknown chunk after the movi list")
    extended = 0  # the frames of the RIFF AVIX chunks after the first (which idx1 does not index)
    for start, end in riffs:
        walk.seek(start + 8)
        if walk.take(4) != b"AVIX":
            raise BadHeaders("a RIFF after the first that is not AVIX")
        for kind, at, length in _chunks(walk, start + 12, end):
            if kind == b"LIST" and length >= 4:
                extended += _avi_frames(walk, at + 4, at + length, headers.video)
            elif kind not in AVI_SKIPPED:
                raise BadHeaders("an unknown chunk in a RIFF AVIX")
    if (chunked or indexed or extended or headers.indexed) and not _area(tally.canvas):
        raise BadHeaders("a video stream that declares no frame size")
    tally.fill(max(max(chunked, indexed) + extended, headers.indexed))


MAX_ODML_DEPTH = 4  # an OpenDML index of indexes, read through this many levels at most


def _odml_index(walk: _Walk, at: int, video: set[int], depth: int = 0) -> int:
    """The video frames an OpenDML index names, as ffmpeg reads it (read_odml_index), which it
    then reads instead of idx1: a standard index (type 1) names a packet an entry that is not
    empty; an index of indexes (type 0) lists, an entry each, where a standard index (or another
    index of indexes) sits, anywhere in the file. The stream is the one its chunk id names."""
    if depth > MAX_ODML_DEPTH:
        raise BadHeaders("OpenDML indexes nested too deep")
    walk.seek(at)
    sub_type, kind, count, chunk_id = struct.unpack("<2xBBI4s", walk.take(12))
    if sub_type or kind > 1:
        return 0  # ffmpeg refuses it and reads idx1 instead
    stream = (chunk_id[0] - 48) * 10 + chunk_id[1] - 48
    width = 8 if kind else 16
    count = min(count, max(walk.size - at - 24, 0) // width)  # entries past the file's end are none
    walk.seek(at + 24)
    table = walk.take(count * width, count)
    if kind:  # (offset, size with the key-frame bit)
        if stream not in video:
            return 0
        return sum(1 for _, size in struct.iter_unpack("<II", table) if size & 0x7FFFFFFF)
    frames = 0
    for offset, _, _ in struct.iter_unpack("<QII", table):  # (a chunk's offset, its size, its duration)
        if offset + 8 + 24 <= walk.size:
            frames += _odml_index(walk, offset + 8, video, depth + 1)
    return frames


def _riffs(walk: _Walk) -> Iterator[tuple[int, int]]:
    """(start, end) of each RIFF chunk the file is made of, one after another (each ends on an even
    offset)."""
    position = 0
    while position + 12 <= walk.size:
        walk.seek(position)
        kind, length = struct.unpack("<4sI", walk.take(8))
        if kind != b"RIFF":
            raise BadHeaders("something after the RIFF that is no RIFF")
        yield position, min(position + 8 + length, walk.size)
        position += 8 + length + (length & 1)


def _avi_frames(walk: _Walk, start: int, end: int, video: set[int], depth: int = 0) -> int:
    """The video chunks of a movi list and of every list within it."""
    frames = 0
    for kind, at, length in _chunks(walk, start, end):
        if kind[:2].isdigit():  # a stream's chunk, as ffmpeg tells them (two digits); an empty one is no frame
            frames += int(kind[:2]) in video and kind[2:] not in AVI_NOT_FRAMES and length > 0
        elif kind == b"LIST" and length >= 4:
            if depth >= MAX_LIST_DEPTH:
                raise BadHeaders("lists nested too deep")
            frames += _avi_frames(walk, at + 4, at + length, video, depth + 1)
        elif kind not in AVI_SKIPPED and kind[:2] != b"ix":
            raise BadHeaders("an unknown chunk in the movi list")
    return frames


def _avi_index(walk: _Walk, start: int, length: int, video: set[int]) -> int:
    """The entries of an idx1 that name a video chunk that is not empty (16 bytes each: id, flags,
    offset, size)."""
    count = length // 16
    if count > MAX_PIECES:
        raise BadHeaders("an index of too many entries")
    walk.seek(start)
    table = walk.take(count * 16, count)
    entries = struct.iter_unpack("<4s8xI", table)
    # ffmpeg (avi_read_idx1) takes an entry for stream (id[0] - '0') * 10 + (id[1] - '0'), digits or
    # not, and passes over its palette changes (pc) only.
    return sum(
        1 for kind, size in entries if (kind[0] - 48) * 10 + kind[1] - 48 in video and kind[2:] != b"pc" and size > 0
    )


def _chunks(walk: _Walk, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(fourcc, body's start, length) of each RIFF chunk in [start, end), which end on even offsets."""
    position = start
    while position + 8 <= end:
        walk.seek(position)
        kind, length = struct.unpack("<4sI", walk.take(8))
        if position + 8 + length > end:
            raise BadHeaders("a chunk runs past its list")
        yield kind, position + 8, length
        position += 8 + length + (length & 1)


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


MAX_ITEMS = 100_000  # properties, item associations and references one HEIF file may declare


def _heif(walk: _Walk, tally: _Tally) -> None:
    """HEIF (HEIC, AVIF). A still image is an item of the top-level meta box, sized by its ispe
    property. Decoders (libheif under pillow-heif, libavif) open the top-level images as frames:
    the items that are no thumbnail (thmb), auxiliary image (auxl: alpha, depth, gain map) or
    ingredient of a derived image (dimg: a grid's tiles). Those are decoded too, for the image they
    serve, so each frame counts at the largest ispe in the file, and there is one at least: a phone
    photo, a grid of 48 or 192 tiles with a thumbnail and a gain map, is one frame of the grid's
    size. A sequence is a track of the moov box: its samples (stsz) are frames of its presentation
    size (tkhd) or the size so far, unless it is a sound track. Not read: movie fragments (moof),
    and the sizes coded inside the bitstreams, which the boxes declare."""
    for kind, start, end in _boxes(walk, 0, walk.size):
        if kind == b"meta":
            largest, images = _heif_items(walk, start + 4, end)  # after its version and flags
            tally.grow(*largest)
            tally.fill(tally.count + images)
        elif kind == b"moov":
            for part, at, stop in _boxes(walk, start, end):
                if part == b"trak":
                    width, height, samples = _heif_track(walk, at, stop)
                    tally.grow(width, height)
                    tally.fill(tally.count + samples)


def _boxes(walk: _Walk, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, body's start, end) of each ISO BMFF box in [start, end), which they must fill; the
    next starts where the size says, whatever was read."""
    position = start
    while position < end:
        walk.seek(position)
        size, kind = struct.unpack(">I4s", walk.take(8))
        body = position + 8
        if size == 1:
            (size,) = struct.unpack(">Q", walk.take(8))
            body += 8
        elif size == 0:
            size = end - position  # to the end of its parent
        if size < body - position or position + size > end:
            raise BadHeaders("a box runs past its parent")
        yield kind, body, position + size
        position += size


def _fields(walk: _Walk, start: int, end: int, count: int) -> bytes:
    """`count` bytes from `start`, which the box ending at `end` must hold."""
    if start + count > end:
        raise BadHeaders("a box too short for its fields")
    walk.seek(start)
    return walk.take(count)


def _heif_items(walk: _Walk, start: int, end: int) -> tuple[tuple[int, int], int]:
    """The largest ispe in a meta box, and how many top-level images it counts as (1 at least, if
    any ispe): the items an ispe is associated with (ipma), but for thumbnails, auxiliary images
    and ingredients (iref)."""
    sized: set[int] | None = None  # the indexes of ispe properties in ipco
    largest = (0, 0)
    imaged: set[int] = set()
    served: set[int] = set()
    for kind, at, stop in _boxes(walk, start, end):
        if kind == b"iprp":
            for part, inner, limit in _boxes(walk, at, stop):
                if part == b"ipco":
                    sized, size = _ipco(walk, inner, limit)
                    largest = max(largest, size, key=_area)
                elif part == b"ipma":
                    if sized is None:
                        raise BadHeaders("item properties associated before they are listed")
                    imaged |= _ipma(walk, inner, limit, sized)
        elif kind == b"iref":
            served |= _iref(walk, at, stop)
    return largest, max(len(imaged - served), 1) if sized else 0


def _ipco(walk: _Walk, start: int, end: int) -> tuple[set[int], tuple[int, int]]:
    """Which properties (numbered from 1) are an ispe, and the largest of those."""
    sized: set[int] = set()
    largest = (0, 0)
    for index, (kind, at, stop) in enumerate(_boxes(walk, start, end), 1):
        if index > MAX_ITEMS:
            raise BadHeaders(f"more than {MAX_ITEMS} item properties")
        if kind == b"ispe":
            width, height = struct.unpack(">4xII", _fields(walk, at, stop, 12))
            sized.add(index)
            largest = max(largest, (width, height), key=_area)
    return sized, largest


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def _ipma(walk: _Walk, start: int, end: int, sized: set[int]) -> set[int]:
    """The items associated with one of the `sized` properties."""
    version, flags, entries = struct.unpack(">B3sI", _fields(walk, start, end, 8))
    if entries > MAX_ITEMS:
        raise BadHeaders(f"properties of more than {MAX_ITEMS} items")
    wide = flags[2] & 1  # 15-bit property indexes, else 7-bit
    imaged = set()
    position = start + 8
    for _ in range(entries):
        head = _fields(walk, position, end, 5 if version else 3)
        item, count = int.from_bytes(head[:-1], "big"), head[-1]
        position += len(head)
        associated = _fields(walk, position, end, count << wide)
        position += len(associated)
        indexes = struct.unpack(f">{count}{'H' if wide else 'B'}", associated)
        if any(index & (0x7FFF if wide else 0x7F) in sized for index in indexes):
            imaged.add(item)
    return imaged


def _iref(walk: _Walk, start: int, end: int) -> set[int]:
    """Items that serve another: thumbnails and auxiliary images (the items thmb and auxl
    references are from), and derived images' ingredients (what dimg references are to)."""
    version = _fields(walk, start, end, 4)[0]
    width = 4 if version else 2
    code = ">I" if version else ">H"
    served: set[int] = set()
    for kind, at, stop in _boxes(walk, start + 4, end):
        head = _fields(walk, at, stop, width + 2)
        (item,) = struct.unpack(code, head[:width])
        (count,) = struct.unpack(">H", head[width:])
        if kind in (b"thmb", b"auxl"):
            served.add(item)
        elif kind == b"dimg":
            ingredients = _fields(walk, at + width + 2, stop, width * count)
            served.update(struct.unpack(f"{code[0]}{count}{code[1]}", ingredients))
        if len(served) > MAX_ITEMS:
            raise BadHeaders(f"references to more than {MAX_ITEMS} items")
    return served


def _heif_track(walk: _Walk, start: int, end: int) -> tuple[int, int, int]:
    """A track's presentation size and sample count; none for a sound track."""
    track = _track(walk, start, end)
    if track.handler == b"soun":
        return 0, 0, 0
    size = max(track.size, track.described, key=_area) if track.handler in PICTURES else track.size
    return *size, track.samples


@dataclass(frozen=True)
class _Track:
    ident: int
    size: tuple[int, int]  # its presentation size (tkhd)
    described: tuple[int, int]  # the largest its sample descriptions declare (as visual entries)
    samples: int
    handler: bytes  # vide, soun, pict, text, tmcd...
    entries: frozenset[bytes]  # its sample descriptions' formats: avc1, hvc1, mp4a, tmcd...
    frames: int  # the frames its samples decode to, as its edit list plays them (see `_played`)


PICTURES = {b"vide", b"pict"}  # handlers of tracks whose sample descriptions are visual sample entries
# Sample formats ffmpeg decodes as video in a track whose handler is not `vide` (pict, meta, or any
# four letters; in a `vide` track any format is video). Camera metadata (djmd, rtmd, gpmd...) is not.
VIDEO_FORMATS = {b"avc1", b"avc2", b"avc3", b"avc4", b"hvc1", b"hev1", b"dvh1", b"dvhe", b"dva1", b"dvav"}
VIDEO_FORMATS |= {b"vvc1", b"vvi1", b"mp4v", b"av01", b"vp08", b"vp09", b"jpeg", b"mjpa", b"mjpb", b"mjp2"}
VIDEO_FORMATS |= {b"png ", b"raw ", b"rle ", b"rpza", b"cvid", b"smc ", b"8BPS", b"SVQ1", b"SVQ3", b"h263"}
VIDEO_FORMATS |= {b"s263", b"H263", b"apch", b"apcn", b"apcs", b"apco", b"ap4h", b"ap4x", b"aprn", b"aprh"}
VIDEO_FORMATS |= {b"dvc ", b"dvcp", b"dvpp", b"dv5n", b"dv5p", b"dvh5", b"dvh6", b"dvhq", b"dvhp", b"AVdn"}
VIDEO_FORMATS |= {b"AVdh", b"AVd1", b"AVdv", b"Hap1", b"Hap5", b"HapY", b"icod", b"tiff", b"gif ", b"v210"}
VIDEO_FORMATS |= {b"2vuy", b"yuv2", b"yuvs", b"mx5p", b"mx5n", b"mx4p", b"mx4n", b"mx3p", b"mx3n", b"xdv7"}
# ffmpeg looks a format it does not know as QuickTime's up among AVI's fourccs: video too.
VIDEO_FORMATS |= {b"MJPG", b"mjpg", b"AVI1", b"H264", b"h264", b"X264", b"x264", b"HEVC", b"H265", b"DIVX"}
VIDEO_FORMATS |= {b"divx", b"DX50", b"XVID", b"xvid", b"FMP4", b"MP4V", b"MP42", b"MP43", b"DIV3", b"WMV1"}
VIDEO_FORMATS |= {b"WMV2", b"WMV3", b"WVC1", b"VP80", b"VP90", b"AV01", b"HFYU", b"FFV1", b"FFVH", b"LJPG"}
VIDEO_FORMATS |= {b"MJLS", b"dvsd", b"dvhd", b"dvsl", b"dv25", b"dv50", b"MRLE", b"MSVC", b"CRAM", b"tscc"}
VIDEO_FORMATS |= {b"I420", b"IYUV", b"YV12", b"YUY2", b"UYVY", b"mpg1", b"mpg2", b"MPG1", b"MPG2", b"FLV1"}
VIDEO_FORMATS |= {b"DIB ", b"RGB ", b"RAW ", b"VP62", b"VP6F", b"ZMBV", b"MAGY", b"CFHD", b"cfhd", b"Y41P"}
# Formats that are no video in a track of any handler: camera and timed metadata, text, sound. A
# track of another format (and not sound) is video if it declares a frame size (else its frames'
# size is coded in the bitstream only, which is not read).
NOT_VIDEO_FORMATS = {b"mebx", b"tmcd", b"gpmd", b"djmd", b"dbgi", b"rtmd", b"camm", b"mett", b"metx", b"text"}
NOT_VIDEO_FORMATS |= {b"tx3g", b"wvtt", b"stpp", b"c608", b"c708", b"sbtt", b"stxt", b"urim", b"fdsc", b"priv"}
NOT_VIDEO_FORMATS |= {b"rtp ", b"srtp", b"mp4a", b"ac-3", b"ec-3", b"ac-4", b"Opus", b"fLaC", b"alac", b"lpcm"}
NOT_VIDEO_FORMATS |= {b"sowt", b"twos", b"in24", b"in32", b"fl32", b"fl64", b"ulaw", b"alaw", b"ima4", b".mp3"}
NOT_VIDEO_FORMATS |= {b"samr", b"sawb", b"dtsc", b"dtsh", b"dtsl", b"mha1", b"mhm1"}


TRACK_CONTAINERS = {b"edts", b"mdia", b"minf", b"stbl", b"dinf"}  # boxes ffmpeg reads a track's boxes in
MAX_BOX_DEPTH = 8


def _track_boxes(walk: _Walk, start: int, end: int, depth: int = 0) -> Iterator[tuple[bytes, int, int]]:
    """Every box of a trak, in the containers ffmpeg walks: it reads a box by its type wherever it
    is (an stsz in the trak itself sets the sample count as one in stbl does)."""
    for kind, at, stop in _boxes(walk, start, end):
        if kind in TRACK_CONTAINERS:
            if depth >= MAX_BOX_DEPTH:
                raise BadHeaders("boxes nested too deep")
            yield from _track_boxes(walk, at, stop, depth + 1)
        else:
            yield kind, at, stop


def _track(walk: _Walk, start: int, end: int, movie_scale: int = 0) -> _Track:
    """A trak box: its id and presentation size (tkhd, 16.16 fixed point, rounded up), the largest
    size its sample descriptions declare as visual entries (stsd), its sample count (stsz or stz2,
    the same field), its handler (hdlr: ISO's handler type, QuickTime's component subtype, alike),
    its sample formats and the frames its edit list plays (`movie_scale`: the movie's time scale,
    in which edits are timed). A box that comes twice (ffmpeg takes the last) counts at its most:
    the largest sizes and sample count, `vide` over any other handler, the edit list that plays
    the most, and no timeline (each edit plays every sample)."""
    ident = samples = 0
    size = described = (0, 0)
    handlers: list[bytes] = []
    entries: set[bytes] = set()
    edit_lists: list[list[tuple[int, int]]] = []  # (duration in the movie's time scale, media time) of each edit
    scales: set[int] = set()
    steps: list[tuple[int, int]] = []
    offsets: list[tuple[int, int]] = []
    for kind, at, stop in _track_boxes(walk, start, end):
        if kind == b"tkhd":
            wide = _fields(walk, at, stop, 1)[0]  # version 1: 64-bit times
            (ident,) = struct.unpack(">I", _fields(walk, at + (20 if wide else 12), stop, 4))
            fixed = struct.unpack(">II", _fields(walk, at + 4 + (84 if wide else 72), stop, 8))
            size = max(size, ((fixed[0] + 0xFFFF) >> 16, (fixed[1] + 0xFFFF) >> 16), key=_area)
        elif kind == b"elst":
            edit_lists.append(_edits(walk, at, stop))
        elif kind == b"mdhd":
            scales.add(_timing(walk, at, stop)[0])
        elif kind == b"hdlr":
            handlers.append(_fields(walk, at, stop, 12)[8:])
        elif kind in (b"stsz", b"stz2"):
            samples = max(samples, struct.unpack(">8xI", _fields(walk, at, stop, 12))[0])
        elif kind == b"stts":
            steps.append((at, stop))
        elif kind == b"ctts":
            offsets.append((at, stop))
        elif kind == b"stsd":
            for entry_kind, entry, entry_end in _boxes(walk, at + 8, stop):  # after version, flags, count
                entries.add(entry_kind)
                if entry + 28 <= entry_end:  # long enough to be a visual sample entry
                    declared = struct.unpack(">HH", _fields(walk, entry + 24, entry_end, 4))
                    described = max(described, declared, key=_area)
    handler = b"vide" if b"vide" in handlers else (handlers[-1] if handlers else b"")
    media_scale = scales.pop() if len(scales) == 1 else 0
    times: _Times = (None, None)
    if len(steps) == 1 and len(offsets) <= 1:
        times = (steps[0], offsets[0] if offsets else None)
    frames = samples
    for edits in edit_lists:
        # Edits timed in the media's own units. Media time -1 is an empty edit (plays nothing) before
        # the first edit that plays; after it, ffmpeg plays [-1, -1 + duration) as any other.
        scale = Fraction(media_scale, movie_scale) if movie_scale and media_scale else None
        first = next((n for n, (_, media_time) in enumerate(edits) if media_time != -1), len(edits))
        playing = [(media_time, duration * scale if scale else None) for duration, media_time in edits[first:]]
        frames = max(frames, _played(walk, samples, times, playing))
    return _Track(ident, size, described, samples, handler, frozenset(entries), frames)


MAX_EDIT_WORK = 2_000_000  # edits times a timeline's runs counted exactly; past that, each edit plays it all


def _played(walk: _Walk, samples: int, times: _Times, playing: list[tuple[int, Fraction | None]]) -> int:
    """The frames ffmpeg decodes from a track's samples (mov_fix_index): for each edit, the samples
    shown within its span (media time, duration), so edits over the same media decode it again.
    One edit (or none) plays each sample at most: all are counted, the timeline unread (an edit
    that trims costs only what it trims). Where a span or the samples' times are not known (an
    untimed movie, an edit of duration 0, a sample table without times) an edit plays them all."""
    if len(playing) <= 1:
        return samples
    steps, offsets = times
    timeline = None
    if steps is not None:
        timeline = _timeline(samples, _table(walk, *steps), _table(walk, *offsets) if offsets else [])
    if timeline is None or len(playing) * len(timeline.runs) > MAX_EDIT_WORK:
        return samples * len(playing)
    return sum(
        timeline.within(start, start + math.ceil(duration)) if duration else samples for start, duration in playing
    )


def _timing(walk: _Walk, start: int, end: int) -> tuple[int, int]:
    """A movie or media header's time scale and duration (mvhd, mdhd: the same first fields)."""
    if _fields(walk, start, end, 1)[0] == 1:  # version 1: 64-bit times
        return struct.unpack(">IQ", _fields(walk, start + 20, end, 12))
    return struct.unpack(">II", _fields(walk, start + 12, end, 8))


def _edits(walk: _Walk, start: int, end: int) -> list[tuple[int, int]]:
    """An edit list's entries: (segment duration, media time; -1 for an empty edit)."""
    version = _fields(walk, start, end, 1)[0]
    (count,) = struct.unpack(">I", _fields(walk, start + 4, end, 4))
    width = 20 if version == 1 else 12
    if count > MAX_ITEMS or start + 8 + count * width > end:
        raise BadHeaders("an edit list longer than its box, or of too many entries")
    walk.seek(start + 8)
    table = walk.take(count * width, count)
    code = ">Qq" if version == 1 else ">Ii"
    return [struct.unpack_from(code, table, n * width) for n in range(count)]


@dataclass(frozen=True)
class _Timeline:
    """When a track's samples are shown, in its media's time, as ffmpeg times them: each sample's
    decode time (the steps of stts, from 0) plus its composition offset (ctts). Kept as runs of
    samples whose times step evenly: (samples, the first one's time, step)."""

    runs: tuple[tuple[int, int, int], ...]

    def within(self, start: int, end: int) -> int:
        """How many samples are shown at a time in [start, end)."""
        shown = 0
        for count, first, step in self.runs:
            if step == 0:
                shown += count if start <= first < end else 0
            else:  # the run's samples j (0 <= j < count) with start <= first + j * step < end
                low = min(max(-((first - start) // step), 0), count)
                high = min(max(-((first - end) // step), 0), count)
                shown += high - low
        return shown


def _timeline(samples: int, steps: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> _Timeline | None:
    """The samples' times from stts's (count, step) and ctts's (count, offset) entries. None where
    ffmpeg's versions time them differently: a table that does not cover every sample (FFmpeg 8
    gives those no duration, earlier releases the last step), or a negative step (rewritten)."""
    if any(step < 0 for _, step in steps) or sum(count for count, _ in steps) < samples:
        return None
    if offsets and sum(count for count, _ in offsets) < samples:
        return None
    offsets = offsets or [(samples, 0)]
    runs = []
    time = done = 0
    step_at = offset_at = 0
    step_left, offset_left = steps[0][0], offsets[0][0]
    while done < samples:
        while not step_left:
            step_at += 1
            step_left = steps[step_at][0]
        while not offset_left:
            offset_at += 1
            offset_left = offsets[offset_at][0]
        count = min(step_left, offset_left, samples - done)
        step = steps[step_at][1]
        runs.append((count, time + offsets[offset_at][1], step))
        time += count * step
        done += count
        step_left -= count
        offset_left -= count
    return _Timeline(tuple(runs))


_Times = tuple[tuple[int, int] | None, tuple[int, int] | None]  # where a sample table's stts and ctts are


def _table(walk: _Walk, start: int, end: int) -> list[tuple[int, int]]:
    """A stts's or ctts's entries: (sample count, a signed 32-bit value: a step, an offset). ffmpeg
    reads a version 0 ctts's unsigned offsets as signed too."""
    (count,) = struct.unpack(">I", _fields(walk, start + 4, end, 4))
    if start + 8 + count * 8 > end:
        raise BadHeaders("a time table longer than its box")
    walk.seek(start + 8)
    return list(struct.iter_unpack(">Ii", walk.take(count * 8, count)))


def _movie(walk: _Walk, tally: _Tally) -> None:
    """MP4 and QuickTime. A video input (PyAV, in ComfyUI) decodes every frame of its video track
    to float32. As ffmpeg does, a track is video if its handler says so, or (unless it is sound) if
    one of its sample formats is a video codec's: each of its samples is a frame, as often as its
    edit list plays it (edits over the same media decode it again), counted in its sample table or,
    in a fragmented file, in the runs (trun) of each fragment of that track (traf, named by tfhd),
    at the largest size the track declares. A compressed movie header (cmov) is refused unread, as
    is a video track that declares no size. The sizes coded inside the bitstream are not read."""
    video: set[int] = set()
    scale = 0

    def track_at(at: int, stop: int) -> None:
        track = _track(walk, at, stop, scale)
        size = max(track.size, track.described, key=_area)
        known = track.handler == b"vide" or bool(track.entries & VIDEO_FORMATS)
        # Else: metadata, text; or a format of no declared size (the bitstream's is not read).
        if track.handler == b"soun" or not (known or (track.entries - NOT_VIDEO_FORMATS and _area(size))):
            return
        if not _area(size):  # (fragments may bring its samples)
            raise BadHeaders("a video track that declares no frame size")
        video.add(track.ident)
        tally.grow(*size)
        tally.fill(tally.count + track.frames)

    # ffmpeg reads a box by its type wherever it is: a trak at the top level is a track too, and a
    # trun beside a traf in a moof belongs to the track the last tfhd named.
    for kind, start, end in _boxes(walk, 0, walk.size):
        if kind == b"moov":
            for part, at, stop in _boxes(walk, start, end):
                if part == b"cmov":
                    raise BadHeaders("a compressed movie header")
                if part == b"mvhd":
                    scale = _timing(walk, at, stop)[0]
                elif part == b"trak":
                    track_at(at, stop)
        elif kind == b"trak":
            track_at(start, end)  # untimed unless a moov before it said its scale
        elif kind == b"moof":
            ident = 0
            for part, at, stop in _boxes(walk, start, end):
                if part == b"traf":
                    ident, samples = _fragment(walk, at, stop, ident)
                elif part == b"trun":
                    samples = struct.unpack(">4xI", _fields(walk, at, stop, 8))[0]
                else:
                    continue
                if ident in video:
                    tally.fill(tally.count + samples)


def _fragment(walk: _Walk, start: int, end: int, ident: int = 0) -> tuple[int, int]:
    """A track fragment's track (tfhd; else the one named before, `ident`) and the samples of its runs (trun)."""
    samples = 0
    for kind, at, stop in _boxes(walk, start, end):
        if kind == b"tfhd":
            (ident,) = struct.unpack(">4xI", _fields(walk, at, stop, 8))
        elif kind == b"trun":
            samples += struct.unpack(">4xI", _fields(walk, at, stop, 8))[0]
    return ident, samples


WEBM_TRACKS = b"\x16\x54\xae\x6b"
WEBM_TRACK_ENTRY = b"\xae"
WEBM_BLOCKS = {b"\xa3", b"\xa1"}  # SimpleBlock, a BlockGroup's Block
WEBM_DESCEND = {EBML_SEGMENT, WEBM_CLUSTER, b"\xa0"}  # walked into: Segment, Cluster, BlockGroup


def _webm(walk: _Walk, tally: _Tally) -> None:
    """WebM (Matroska). A video input (PyAV, in ComfyUI) decodes every frame of its video track:
    each block (SimpleBlock, or a BlockGroup's Block) of a track whose TrackType is video is a
    frame, or as many as its lacing packs, at the largest PixelWidth x PixelHeight the video
    tracks declare. Segments and Clusters of unknown size (as recorders write them) are walked
    alike. The sizes coded inside the bitstream, which the tracks declare, are not read."""
    video: set[int] = set()
    others: dict[int, int] = {}  # frames of tracks not known as video (yet: Tracks may come late)
    for element, body, length in _ebml_children(walk, 0, walk.size):
        if length is None:
            continue
        if element == WEBM_TRACKS:
            for entry, at, size in _ebml_children(walk, body, body + length, descend=False):
                if entry == WEBM_TRACK_ENTRY and size is not None:
                    number, width, height = _webm_track(walk, at, at + size)
                    if number is not None:
                        if not width or not height:  # decoded at its bitstream's size, which is not read
                            raise BadHeaders("a video track that declares no frame size")
                        video.add(number)
                        tally.grow(width, height)
        elif element in WEBM_BLOCKS:
            track, frames = _webm_block(walk, body, length)
            if track in video:
                tally.fill(tally.count + frames)  # (past MAX_FRAMES the walk stops)
            else:
                others[track] = others.get(track, 0) + frames
    tally.fill(tally.count + sum(count for track, count in others.items() if track in video))


def _ebml_children(walk: _Walk, start: int, end: int, descend: bool = True) -> Iterator[tuple[bytes, int, int | None]]:
    """(ID, body's start, length or None for unknown) of each EBML element in [start, end); the walk
    goes on inside a Segment, Cluster or BlockGroup (if `descend`) and inside any element of
    unknown size, past the body of any other."""
    position = start
    while position < end:
        walk.seek(position)
        header = walk.take(min(12, end - position))
        id_length = 9 - header[0].bit_length()
        if id_length > 4 or len(header) <= id_length:
            raise BadHeaders("not an EBML element")
        size_length = 9 - header[id_length].bit_length()
        if size_length > 8 or len(header) < id_length + size_length:
            raise BadHeaders("not an EBML element")
        stated = int.from_bytes(header[id_length : id_length + size_length], "big") & ((1 << (7 * size_length)) - 1)
        element, body = header[:id_length], position + id_length + size_length
        length = None if stated == (1 << (7 * size_length)) - 1 else stated
        if length is not None and body + length > end:
            raise BadHeaders("an element runs past its parent")
        yield element, body, length
        position = body if length is None or (descend and element in WEBM_DESCEND) else body + length


def _webm_track(walk: _Walk, start: int, end: int) -> tuple[int | None, int, int]:
    """A TrackEntry's number, and its pixel size, if it is a video track (TrackType 1); else None."""
    number = kind = width = height = 0
    for element, body, length in _ebml_children(walk, start, end, descend=False):
        if element == b"\xe0" and length is not None:  # Video
            for part, at, size in _ebml_children(walk, body, body + length, descend=False):
                if part in (b"\xb0", b"\xba") and size is not None:  # PixelWidth, PixelHeight
                    value = _ebml_uint(walk, at, size)
                    width, height = (value, height) if part == b"\xb0" else (width, value)
        elif element in (b"\xd7", b"\x83") and length is not None:  # TrackNumber, TrackType
            value = _ebml_uint(walk, body, length)
            number, kind = (value, kind) if element == b"\xd7" else (number, value)
    return (number if kind == 1 else None), width, height


def _ebml_uint(walk: _Walk, start: int, length: int) -> int:
    if length > 8:
        raise BadHeaders("an unsigned integer of more than 8 bytes")
    walk.seek(start)
    return int.from_bytes(walk.take(length), "big")


def _webm_block(walk: _Walk, start: int, length: int) -> tuple[int, int]:
    """A block's track number and how many frames it holds (its lacing packs up to 256); track 0,
    no track, for a block whose number cannot be read."""
    walk.seek(start)
    head = walk.take(min(length, 12))
    size = 9 - head[0].bit_length() if head else 9
    if size > 8 or len(head) < size + 3:
        return 0, 0
    track = int.from_bytes(head[:size], "big") & ((1 << (7 * size)) - 1)
    laced = head[size + 2] & 0x06
    return track, (head[size + 3] + 1 if laced and len(head) > size + 3 else 1)


_READERS: dict[str, Callable[[_Walk, _Tally], None]] = {
    ".png": _png,
    ".gif": _gif,
    ".jpg": _jpeg,
    ".webp": _webp,
    ".bmp": _bmp,
    ".tiff": _tiff,
    ".avif": _heif,
    ".heic": _heif,
    ".mp4": _movie,
    ".mov": _movie,
    ".webm": _webm,
    ".avi": _avi,
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
