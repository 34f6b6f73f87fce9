"""Tiny PNG writer and reader, so the emulator makes real image files and reads uploaded ones without Pillow."""

from __future__ import annotations

import functools
import itertools
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "MAX_PIXELS",
    "PNG_SIGNATURE",
    "Thumbnail",
    "png_first_pixel",
    "png_from_rows",
    "png_size",
    "png_thumbnail",
    "solid_png",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Past these the reader refuses (its caller falls back), so an upload cannot make the emulator itself a
# bomb: rows are inflated and reduced one at a time, so memory stays small whatever the size, but every
# row is unfiltered in Python, so time grows with the pixels (up to about half a second a megapixel).
MAX_PIXELS = 50_000_000
MAX_ROW_BYTES = 1 << 22
# Channels per pixel of each colour type, and the bit depths the standard allows it.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_INFLATE_PIECE = 1 << 16


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
    stored), or None for anything else: a quick look at one colour, where decoding all is not needed."""
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


@dataclass(frozen=True)
class Thumbnail:
    """A picture's size and its pixels averaged down to a `tw` x `th` tile: each tile pixel is the
    mean of the block of picture pixels that falls on it, so the tile is the picture, only smaller."""

    width: int
    height: int
    tw: int
    th: int
    rgb: bytes  # tw * th RGB pixels
    alpha: bytes | None  # tw * th alpha values, None when the picture has no alpha


def png_thumbnail(data: bytes, tile: int, max_pixels: int = MAX_PIXELS) -> Thumbnail | None:
    """Decode a PNG to a tile at most `tile` pixels a side (a `tile` as large as the picture gives it
    whole). Every colour type and bit depth, every row filter, palettes with transparency; not
    interlaced pictures. None for anything it does not read (not a PNG, broken, truncated, interlaced,
    over `max_pixels`): the caller falls back. Rows are inflated a bounded piece at a time and folded
    into the tile as they come, so memory stays at a row or two whatever the picture's size."""
    try:
        return _decode(data, tile, max_pixels)
    except (zlib.error, ValueError, IndexError, struct.error):
        return None


def _decode(data: bytes, tile: int, max_pixels: int) -> Thumbnail | None:
    chunks = _chunks(data)
    before: dict[bytes, bytes] = {}  # what the standard puts ahead of the pixel data
    first: memoryview | None = None
    for kind, body in chunks:
        if kind == b"IDAT":
            first = body
            break
        if kind in (b"IHDR", b"PLTE", b"tRNS"):
            before[kind] = bytes(body)
    header = before.get(b"IHDR", b"")
    if first is None or len(header) != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", header)
    if colour not in _CHANNELS or depth not in _DEPTHS[colour] or (compression, filtering, interlace) != (0, 0, 0):
        return None  # an unknown kind, or interlaced: left to the fallback
    channels = _CHANNELS[colour]
    stride = (width * channels * depth + 7) // 8
    if not 0 < width * height <= max_pixels or stride > MAX_ROW_BYTES or tile < 1:
        return None
    entries: list[bytes] | None = None
    if colour == 3:
        palette = before.get(b"PLTE", b"")
        if not palette or len(palette) % 3:
            return None
        entries = _palette(palette, before.get(b"tRNS", b""))
        channels = len(entries[0])
    tw, th = min(tile, width), min(tile, height)
    reducer = _Reducer(width, height, tw, th, channels)
    bpp = max(1, channels * depth // 8) if colour != 3 else 1
    prior = bytes(stride)
    idats = itertools.chain([first], (body for kind, body in chunks if kind == b"IDAT"))
    for y, row in enumerate(_inflated_rows(idats, stride + 1, height)):
        line = _unfilter(row[0], row[1:], prior, bpp)
        prior = line
        reducer.add(y, _samples(line, width, depth, colour, entries))
    planes = reducer.planes()
    rgb = bytearray(tw * th * 3)
    for c in range(3):
        rgb[c::3] = planes[c if channels >= 3 else 0]
    alpha = planes[-1] if channels in (2, 4) else None
    return Thumbnail(width, height, tw, th, bytes(rgb), alpha)


def _chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """Each chunk's type and body (a view, not a copy), one at a time; a cut-off chunk or IEND ends them."""
    if not data.startswith(PNG_SIGNATURE):
        return
    view = memoryview(data)
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = view[position + 8 : position + 8 + length]
        if kind == b"IEND" or len(body) < length:
            return
        yield kind, body
        position += 12 + length


def _inflated_rows(idats: Iterator[memoryview], size: int, height: int) -> Iterator[bytes]:
    """The `height` rows of `size` bytes (filter type first) out of the IDAT stream, inflating at most
    a piece at a time: a stream that inflates to more is cut off, one that ends early is an error."""
    inflater = zlib.decompressobj()
    pending = bytearray()
    left = height
    piece = max(size, _INFLATE_PIECE)
    for chunk in idats:
        data: bytes | memoryview = chunk
        while left:
            out = inflater.decompress(data, piece)
            data = inflater.unconsumed_tail
            pending += out
            whole = min(left, len(pending) // size)
            for index in range(whole):
                yield bytes(pending[index * size : (index + 1) * size])
            del pending[: whole * size]
            left -= whole
            if not data and len(out) < piece:
                break  # this chunk is spent and zlib holds nothing more back
        if not left:
            return
    raise ValueError(f"PNG data ends {left} rows short")


def _unfilter(kind: int, line: bytes, prior: bytes, bpp: int) -> bytes:
    """Undo one row's filter (PNG's five: none, sub, up, average, Paeth), each a strip of bytes
    `bpp` apart at a time so the sequential ones run in itertools rather than a Python loop."""
    if kind == 0:
        return line
    if kind == 2:
        return _add_bytes(line, prior)
    out = bytearray(line)
    for c in range(bpp):
        raw = line[c::bpp]
        if kind == 1:
            out[c::bpp] = bytes(map(_BYTE, itertools.accumulate(raw)))
        elif kind == 3:
            averaged = itertools.accumulate(zip(raw, prior[c::bpp], strict=True), _average, initial=0)
            out[c::bpp] = bytes(averaged)[1:]
        elif kind == 4:
            up = prior[c::bpp]
            predicted = itertools.accumulate(zip(raw, up, b"\x00" + up[:-1], strict=True), _paeth, initial=0)
            out[c::bpp] = bytes(predicted)[1:]
        else:
            raise ValueError(f"unknown PNG row filter {kind}")
    return bytes(out)


def _add_bytes(line: bytes, prior: bytes) -> bytes:
    """Bytewise sum modulo 256 of two rows at once, as big integers: the low seven bits of every byte
    add without reaching the next byte, and the top bit is their carry xor the two top bits."""
    low, high = _masks(len(line))
    a, b = int.from_bytes(line, "little"), int.from_bytes(prior, "little")
    return (((a & low) + (b & low)) ^ ((a ^ b) & high)).to_bytes(len(line), "little")


@functools.lru_cache(maxsize=16)
def _masks(length: int) -> tuple[int, int]:
    return int.from_bytes(b"\x7f" * length, "little"), int.from_bytes(b"\x80" * length, "little")


def _average(left: int, here: tuple[int, int]) -> int:
    raw, up = here
    return (raw + ((left + up) >> 1)) & 0xFF


def _paeth(left: int, here: tuple[int, int, int]) -> int:
    """The Paeth predictor: of left, up and up-left, the one nearest to left + up - up-left."""
    raw, up, diagonal = here
    to_left, to_up = up - diagonal, left - diagonal  # distances of the estimate to left and to up
    to_diagonal = abs(to_left + to_up)
    to_left, to_up = abs(to_left), abs(to_up)
    if to_left <= to_up and to_left <= to_diagonal:
        return (raw + left) & 0xFF
    return (raw + (up if to_up <= to_diagonal else diagonal)) & 0xFF


def _samples(line: bytes, width: int, depth: int, colour: int, entries: list[bytes] | None) -> bytes:
    """An unfiltered row as 8-bit samples: 16-bit ones keep their high byte, packed ones are spread
    out (greys scaled to 0-255), palette indices become their RGB (or RGBA) entries."""
    if depth == 16:
        line = line[0::2]
    elif depth < 8:
        line = b"".join(map(_unpack_table(depth, colour == 0).__getitem__, line))[:width]
    if entries is not None:
        return b"".join(map(entries.__getitem__, line))
    return line


@functools.lru_cache(maxsize=8)
def _unpack_table(depth: int, scale: bool) -> list[bytes]:
    """For each byte value, the 8 // depth samples packed in it (left first), scaled to 0-255 for greys."""
    count, top = 8 // depth, (1 << depth) - 1
    factor = 255 // top if scale else 1
    return [bytes(((value >> (8 - depth * (i + 1))) & top) * factor for i in range(count)) for value in range(256)]


def _palette(palette: bytes, transparency: bytes) -> list[bytes]:
    """The 256 entries a palette index may name, RGBA when tRNS gives alphas, black past its end."""
    colours = [palette[i : i + 3] for i in range(0, len(palette), 3)]
    colours += [b"\x00\x00\x00"] * (256 - len(colours))
    if not transparency:
        return colours
    alphas = transparency + b"\xff" * (256 - len(transparency))
    return [colour + alphas[i : i + 1] for i, colour in enumerate(colours)]


class _Reducer:
    """Folds rows into the tile as they arrive: each tile pixel sums the picture pixels that fall on
    it (picture column x on tile column x * tw // width, rows likewise), one tile row at a time."""

    def __init__(self, width: int, height: int, tw: int, th: int, channels: int) -> None:
        self.height, self.th, self.channels = height, th, channels
        self.bounds = [-(-tx * width // tw) for tx in range(tw + 1)]  # first picture column of each
        self.planes_out = [bytearray() for _ in range(channels)]
        self.sums = [[0] * tw for _ in range(channels)]
        self.row = 0  # the tile row being summed
        self.rows = 0  # picture rows summed into it

    def add(self, y: int, samples: bytes) -> None:
        if y * self.th // self.height != self.row:
            self._flush()
        bounds = self.bounds
        for c, sums in enumerate(self.sums):
            totals = list(itertools.accumulate(samples[c :: self.channels], initial=0))
            for tx in range(len(sums)):
                sums[tx] += totals[bounds[tx + 1]] - totals[bounds[tx]]
        self.rows += 1

    def _flush(self) -> None:
        bounds = self.bounds
        for sums, plane in zip(self.sums, self.planes_out, strict=True):
            for tx, total in enumerate(sums):
                count = (bounds[tx + 1] - bounds[tx]) * self.rows
                plane.append((total + count // 2) // count)
                sums[tx] = 0
        self.row += 1
        self.rows = 0

    def planes(self) -> list[bytes]:
        """Each channel of the finished tile, row after row."""
        self._flush()
        return [bytes(plane) for plane in self.planes_out]


_BYTE = (0xFF).__and__
