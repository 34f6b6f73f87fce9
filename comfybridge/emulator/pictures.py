"""Real, small pictures for the emulator's nodes, so results differ by input as they would on a GPU.

An image is a dict `{"w", "h", "b", "c"}` (size, batch, a solid colour) that may carry a tile: `px`,
`tw` x `th` RGB pixels at most TILE wide, scaled up to `w` x `h` when saved. Working on the tile
keeps every node to a few milliseconds in pure Python, whatever the image size. A loaded picture
becomes such a tile too: its pixels averaged down as it is decoded."""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import itertools
import math
import random
import threading
from typing import Any

from .png import MAX_PIXELS, PNG_SIGNATURE, Thumbnail, png_from_rows, png_thumbnail, solid_png

__all__ = ["Image", "add_noise", "blur", "imagine", "invert", "load", "sharpen", "to_png"]

TILE = 32
Image = dict[str, Any]


def _tile(image: Image) -> tuple[int, int, bytes]:
    """The image's tile; a solid image gets one of its colour."""
    if "px" in image:
        return image["tw"], image["th"], image["px"]
    tw, th = min(TILE, max(1, int(image["w"]))), min(TILE, max(1, int(image["h"])))
    colour = int(image["c"]) & 0xFFFFFF
    return tw, th, bytes(((colour >> 16) & 0xFF, (colour >> 8) & 0xFF, colour & 0xFF)) * (tw * th)


def _with_tile(image: Image, tw: int, th: int, px: bytes) -> Image:
    return {**image, "tw": tw, "th": th, "px": px, "c": int.from_bytes(px[:3], "big")}


def load(data: bytes) -> tuple[Image, Image] | None:
    """LoadImage's IMAGE and MASK from a picture file: its real pixels on a tile, and as ComfyUI does,
    a mask of 1 - alpha (white where transparent) when it has alpha, else an empty one. PNGs are read
    by png.py; other formats (JPEG, WebP, GIF, ...) and PNGs it refuses (interlaced) by Pillow, only if
    Pillow happens to be importable: it is no dependency of comfybridge. None when neither reads the
    file (no Pillow, truncated, over MAX_PIXELS): the caller falls back to one flat colour. Results are
    remembered by content, since ComfyUI runs a loader again for every prompt that uses the file."""
    key = hashlib.sha256(data).digest()
    with _LOADED_LOCK:
        if key in _LOADED:
            return _LOADED[key]
    thumbnail = png_thumbnail(data, TILE) if data.startswith(PNG_SIGNATURE) else None
    if thumbnail is None:
        thumbnail = _pillow_thumbnail(data)
    loaded = None if thumbnail is None else _image_and_mask(thumbnail)
    with _LOADED_LOCK:
        _LOADED[key] = loaded
        while len(_LOADED) > 32:
            del _LOADED[next(iter(_LOADED))]
    return loaded


def _image_and_mask(thumbnail: Thumbnail) -> tuple[Image, Image]:
    size = {"w": thumbnail.width, "h": thumbnail.height, "b": 1}
    image = _solid_or_tile(size, thumbnail.tw, thumbnail.th, thumbnail.rgb)
    if thumbnail.alpha is None:
        return image, {**size, "c": 0}
    grey = thumbnail.alpha.translate(_INVERT)
    return image, _solid_or_tile(size, thumbnail.tw, thumbnail.th, bytes(v for g in grey for v in (g, g, g)))


def _solid_or_tile(size: dict[str, int], tw: int, th: int, px: bytes) -> Image:
    """A tile of one colour stays a solid image, as nodes already treat those (a blur leaves it alone)."""
    if px == px[:3] * (tw * th):
        return {**size, "c": int.from_bytes(px[:3], "big")}
    return _with_tile(size, tw, th, px)


def _pillow_thumbnail(data: bytes) -> Thumbnail | None:
    """The picture through Pillow, when it is importable (imported by name so that it stays optional),
    shrunk with Pillow's own box filter; JPEGs decode straight at a reduced scale."""
    try:
        pil = importlib.import_module("PIL.Image")
        ops = importlib.import_module("PIL.ImageOps")
    except ImportError:
        return None
    try:
        with pil.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                return None
            if opened.getexif().get(0x0112) in (5, 6, 7, 8):  # ComfyUI turns it upright: a quarter turn
                width, height = height, width
            tw, th = min(TILE, width), min(TILE, height)
            opened.draft("RGB", (TILE, TILE))  # a JPEG decodes at the smallest scale still this large
            upright = ops.exif_transpose(opened)
            has_alpha = "A" in upright.getbands() or (upright.mode == "P" and "transparency" in upright.info)
            rgba = upright.convert("RGBA").resize((tw, th), pil.Resampling.BOX).tobytes()
    except Exception:  # whatever Pillow cannot read, the emulator falls back
        return None
    rgb = bytearray(tw * th * 3)
    for c in range(3):
        rgb[c::3] = rgba[c::4]
    return Thumbnail(width, height, tw, th, bytes(rgb), rgba[3::4] if has_alpha else None)


def invert(image: Image) -> Image:
    inverted = {**image, "c": 0xFFFFFF ^ int(image["c"])}
    if "px" in image:
        inverted["px"] = image["px"].translate(_INVERT)
    return inverted


def add_noise(image: Image, seed: int, strength: float) -> Image:
    """ImageAddNoise: the seed decides the noise, the strength how much of it."""
    tw, th, px = _tile(image)
    noise = random.Random(seed).randbytes(len(px))
    amount = max(0.0, min(1.0, strength))
    mixed = bytes(_clamp(p + (n - 128) * amount) for p, n in zip(px, noise, strict=True))
    return _with_tile(image, tw, th, mixed)


def blur(image: Image, radius: int) -> Image:
    """ImageBlur as a box blur (rows, then columns), its radius scaled to the tile."""
    if "px" not in image:
        return image  # a solid image is its own blur
    tw, th, px = _tile(image)
    r = max(1, round(radius * tw / max(1, int(image["w"]))))
    return _with_tile(image, tw, th, _box_blur(px, tw, th, r))


def sharpen(image: Image, radius: int, alpha: float) -> Image:
    """ImageSharpen as an unsharp mask: the image plus `alpha` times its difference from a blur."""
    if "px" not in image:
        return image
    tw, th, px = _tile(image)
    r = max(1, round(radius * tw / max(1, int(image["w"]))))
    soft = _box_blur(px, tw, th, r)
    return _with_tile(image, tw, th, bytes(_clamp(p + alpha * (p - s)) for p, s in zip(px, soft, strict=True)))


@functools.lru_cache(maxsize=64)
def imagine(width: int, height: int, batch: int, seed: int, text: str) -> Image:
    """What a sampler "draws": interference of waves whose shape comes from the seed, in a palette
    that comes from the prompt text. The same seed and text give the same picture."""
    tw, th = min(TILE, max(1, width)), min(TILE, max(1, height))
    rng = random.Random(seed)
    waves = [(rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0, 2 * math.pi)) for _ in range(3)]
    digest = hashlib.sha256(text.encode()).digest()
    dark = [b * 100 // 255 for b in digest[0:3]]  # a dark and a light colour, always apart
    light = [155 + b * 100 // 255 for b in digest[3:6]]
    px = bytearray()
    for y in range(th):
        for x in range(tw):
            level = sum(math.sin(fx * x + fy * y + phase) for fx, fy, phase in waves) / 6 + 0.5
            px.extend(round(d + (lt - d) * level) for d, lt in zip(dark, light, strict=True))
    return _with_tile({"w": width, "h": height, "b": batch, "c": 0}, tw, th, bytes(px))


def to_png(image: Image) -> bytes:
    """The image as a PNG of its full size."""
    width, height = max(1, int(image["w"])), max(1, int(image["h"]))
    if "px" not in image:
        return solid_png(width, height, int(image["c"]) & 0xFFFFFF)
    return _scaled_png(image["px"], image["tw"], image["th"], width, height)


@functools.lru_cache(maxsize=64)
def _scaled_png(px: bytes, tw: int, th: int, width: int, height: int) -> bytes:
    """Nearest-neighbour scaling of the tile; each distinct row is built once."""
    columns = [(x * tw // width) * 3 for x in range(width)]
    rows: dict[int, bytes] = {}
    for ty in {y * th // height for y in range(height)}:
        line = px[ty * tw * 3 : (ty + 1) * tw * 3]
        rows[ty] = b"".join(line[c : c + 3] for c in columns)
    return png_from_rows(width, height, [rows[y * th // height] for y in range(height)])


def _box_blur(px: bytes, tw: int, th: int, r: int) -> bytes:
    rows = _blur_lines(px, tw, th, r, horizontal=True)
    return _blur_lines(rows, tw, th, r, horizontal=False)


def _blur_lines(px: bytes, tw: int, th: int, r: int, horizontal: bool) -> bytes:
    """A moving average of width 2r+1 along every row (or column) of every channel."""
    out = bytearray(len(px))
    lines, length = (th, tw) if horizontal else (tw, th)
    step = 3 if horizontal else tw * 3
    for index in range(lines):
        for channel in range(3):
            start = (index * tw * 3 if horizontal else index * 3) + channel
            stop = start + step * (length - 1) + 1
            sums = [0, *itertools.accumulate(px[start:stop:step])]
            out[start:stop:step] = bytes(
                (sums[min(length, i + r + 1)] - sums[max(0, i - r)]) // (min(length, i + r + 1) - max(0, i - r))
                for i in range(length)
            )
    return bytes(out)


def _clamp(value: float) -> int:
    return 0 if value < 0 else 255 if value > 255 else int(value)


_INVERT = bytes(255 - i for i in range(256))
_LOADED: dict[bytes, tuple[Image, Image] | None] = {}  # by the file's sha256, oldest first
_LOADED_LOCK = threading.Lock()  # LoadImage decodes in a worker thread
