"""Media types by content: what an upload really is, whatever its name says."""

from __future__ import annotations

import mimetypes

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


def content_type_for(name: str) -> str:
    """The Content-Type to send a stored file with, from its name."""
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"
