"""Media types by content: what an upload really is, whatever its name says."""

from __future__ import annotations

import mimetypes
import struct
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


def media_kind_of(name: str) -> str | None:
    """image, video or audio, from a stored name (whose extension the content chose)."""
    guessed, _ = mimetypes.guess_type(name)
    kind = (guessed or "").partition("/")[0]
    return kind if kind in ("image", "video", "audio") else None


def content_type_for(name: str) -> str:
    """The Content-Type to send a stored file with, from its name."""
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"
