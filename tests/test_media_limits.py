"""POST /upload refuses images whose headers promise more pixels than a GPU server should decode."""

from __future__ import annotations

import gzip
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfybridge.config import ConfigError, load_settings
from comfybridge.store.media import MAX_FRAMES, BadHeaders, Frames, _timeline, image_frames, is_complete

from .conftest import FIXTURES, BridgeFactory, EmulatorFactory
from .helpers import Client, jpeg, png, stored, upload

Rect = tuple[int, int, int, int]  # left, top, width, height

# Files are built here, small: a bomb's headers declare huge or many frames over a token of data.
SMALL = 64 * 64  # frames up to this many pixels get real pixel data; larger ones a token stream


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def deflated(width: int, height: int) -> bytes:
    """Zero rows of 8-bit grey for a small frame; a valid but token zlib stream for a large one."""
    return zlib.compress(bytes((width + 1) * height) if width * height <= SMALL else b"\0")


def apng(width: int, height: int, frames: int, described: int | None = None) -> bytes:
    """A PNG whose acTL declares `frames`, `described` of them (all, by default) with an fcTL and data.
    One frame and no acTL: a plain PNG."""
    described = frames if described is None else described
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = [png_chunk(b"IHDR", ihdr)]
    if frames > 1:
        chunks.append(png_chunk(b"acTL", struct.pack(">II", frames, 0)))
    data = deflated(width, height)
    for index in range(described if frames > 1 else 0):
        # One sequence over fcTL and fdAT chunks: fcTL 0, IDAT, fcTL 1, fdAT 2, fcTL 3, fdAT 4...
        fctl = struct.pack(">5I2H2B", max(2 * index - 1, 0), width, height, 0, 0, 1, 10, 0, 0)
        chunks.append(png_chunk(b"fcTL", fctl))
        chunks.append(png_chunk(b"fdAT", struct.pack(">I", 2 * index) + data) if index else png_chunk(b"IDAT", data))
    if frames == 1 or not described:
        chunks.append(png_chunk(b"IDAT", data))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b"")


def lzw(pixels: int) -> bytes:
    """Colour 0 for `pixels` pixels as GIF LZW data: a clear code before each, so codes stay 3 bits."""
    codes = [4, 0] * pixels + [4, 5]
    packed = sum(code << (3 * i) for i, code in enumerate(codes)).to_bytes((3 * len(codes) + 7) // 8, "little")
    blocks = b"".join(bytes([len(packed[i : i + 255])]) + packed[i : i + 255] for i in range(0, len(packed), 255))
    return b"\x02" + blocks + b"\x00"


def gif(screen: tuple[int, int], frames: list[Rect]) -> bytes:
    """A GIF89a of this logical screen with a 4-colour palette and one image per rect, 1/10 s apart."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x81, 0, 0) + b"\x00" * 12
    blocks = [
        b"!\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 1/10 s
        + b","
        + struct.pack("<4HB", left, top, width, height, 0)
        + lzw(width * height if width * height <= SMALL else 0)
        for left, top, width, height in frames
    ]
    return head + b"".join(blocks) + b";"


def vp8l(width: int, height: int) -> bytes:
    """A lossless bitstream of one opaque black colour: five one-symbol prefix codes, 0 bits a pixel."""
    header = (width - 1) | (height - 1) << 14
    # no transform, no colour cache, no meta codes; green, red, blue: symbol 0; alpha: 255; distance: 0
    codes = 0b000 | 0b0001 << 3 | 0b0001 << 7 | 0b0001 << 11 | (0b101 | 255 << 3) << 15 | 0b0001 << 26
    return b"\x2f" + struct.pack("<I", header) + codes.to_bytes(4, "little")


def riff_chunk(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return kind + struct.pack("<I", len(body)) + body + b"\0" * (len(body) & 1)


def webp(canvas: tuple[int, int], frames: list[Rect]) -> bytes:
    """An animated WebP: this canvas, one lossless frame per rect (placed at even offsets)."""
    vp8x = struct.pack("<B3x", 0x02) + (canvas[0] - 1).to_bytes(3, "little") + (canvas[1] - 1).to_bytes(3, "little")
    chunks = [riff_chunk(b"VP8X", vp8x), riff_chunk(b"ANIM", b"\x00" * 6)]
    for left, top, width, height in frames:
        place = b"".join(v.to_bytes(3, "little") for v in (left // 2, top // 2, width - 1, height - 1, 100))
        chunks.append(riff_chunk(b"ANMF", place + b"\x00" + riff_chunk(b"VP8L", vp8l(width, height))))
    return riff(b"".join(chunks))


def riff(body: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def vp8(width: int, height: int) -> bytes:
    """A lossy WebP's key frame header of this size, with a token of data."""
    frame = b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 8
    return riff(riff_chunk(b"VP8 ", frame))


def bmp(width: int, height: int) -> bytes:
    """A 24-bit BMP (height < 0: rows top-down); black rows when small, none for a bomb."""
    stride = (width * 3 + 3) & ~3
    pixels = bytes(stride * abs(height)) if width * abs(height) <= SMALL else b""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels), 0, 0, 54) + info + pixels


def tiff_entry(order: str, tag: int, kind: int, value: int, count: int = 1) -> bytes:
    """One 12-byte directory entry; a SHORT value sits in the first half of its 4 bytes."""
    field = struct.pack(order + "H", value) + b"\0\0" if kind == 3 else struct.pack(order + "I", value)
    return struct.pack(order + "HHI", tag, kind, count) + field


def tiff(pages: list[tuple[int, int]], order: str = "<", kind: int = 4, loop: bool = False) -> bytes:
    """A TIFF of one directory per page holding its ImageWidth and ImageLength (LONG, or SHORT:
    kind 3) and no pixel data; `loop`: the last directory leads back to the first."""
    ifds = []
    for index, (width, height) in enumerate(pages):
        after = 8 + 30 * (index + 1) if index + 1 < len(pages) else (8 if loop else 0)
        entries = tiff_entry(order, 256, kind, width) + tiff_entry(order, 257, kind, height)
        ifds.append(struct.pack(order + "H", 2) + entries + struct.pack(order + "I", after))
    return (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8) + b"".join(ifds)


def box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, *parts: bytes, version: int = 0, flags: int = 0) -> bytes:
    return box(kind, struct.pack(">I", version << 24 | flags), *parts)


Reference = tuple[bytes, int, list[int]]  # type (dimg, thmb, auxl...), from item, to items
Track = tuple[int, int, int, bytes]  # width, height, samples, handler


def heif(
    brand: bytes,
    items: dict[int, tuple[int, int]],
    references: list[Reference] | None = None,
    tracks: list[Track] | None = None,
) -> bytes:
    """An HEIF file's boxes: ftyp; a meta box whose items have an ispe each (items of one size
    share it, as encoders do) after a codec property all share, and these references; a moov box
    of these tracks; a token of media data. No real image data: the boxes are what is read."""
    sizes = sorted(set(items.values()))
    ipco = box(
        b"ipco", full_box(b"pixi", b"\x03\x08\x08\x08"), *(full_box(b"ispe", struct.pack(">II", *s)) for s in sizes)
    )
    wide = len(sizes) + 1 > 127  # property indexes past 7 bits take 15
    index = ">H" if wide else ">B"
    essential = 0x8000 if wide else 0x80
    entries = [
        struct.pack(">HB", item, 2) + struct.pack(index, 1 | essential) + struct.pack(index, 2 + sizes.index(size))
        for item, size in items.items()
    ]
    ipma = full_box(b"ipma", struct.pack(">I", len(entries)), *entries, flags=int(wide))
    refs = [box(kind, struct.pack(f">HH{len(to)}H", source, len(to), *to)) for kind, source, to in references or []]
    meta = full_box(
        b"meta",
        full_box(b"hdlr", b"\0" * 4 + b"pict" + b"\0" * 13),
        full_box(b"pitm", struct.pack(">H", max(items, default=1))),
        full_box(b"iref", *refs),
        box(b"iprp", ipco, ipma),
    )
    parts = [box(b"ftyp", brand, b"\0\0\0\0", b"mif1", brand), meta]
    if tracks:
        parts.append(box(b"moov", *(track(*t) for t in tracks)))
    return b"".join(parts) + box(b"mdat", b"\0" * 16)


def track(
    width: int,
    height: int,
    samples: int,
    handler: bytes = b"pict",
    ident: int = 0,
    described: tuple[int, int] | None = None,
    edits: int = 0,
) -> bytes:
    """A trak box: its id and presentation size in tkhd (16.16), its handler, its sample count in
    stsz, one sample description (mp4a for sound; else avc1, of the `described` size or none) and,
    if `edits`, an edit list of that many entries, each playing the whole media."""
    times = struct.pack(">8xI8x", ident)  # creation, modification, the track's id, reserved, duration
    tkhd = full_box(b"tkhd", times, b"\0" * 52, struct.pack(">II", width << 16, height << 16), flags=3)
    if handler == b"soun":
        entry = box(b"mp4a", bytes(6), b"\0\1", bytes(20))
    else:
        entry = box(b"avc1", bytes(24), struct.pack(">HH", *(described or (0, 0))))
    stsd = full_box(b"stsd", struct.pack(">I", 1), entry)
    stts = full_box(b"stts", struct.pack(">III", 1, samples, 1))  # a sample a time unit
    stbl = box(b"stbl", stsd, stts, full_box(b"stsz", struct.pack(">II", 0, samples)))
    hdlr = full_box(b"hdlr", b"\0" * 4 + handler + b"\0" * 13)
    mdhd = full_box(b"mdhd", struct.pack(">IIII", 0, 0, 1, samples), bytes(4))  # a sample a time unit
    parts = [tkhd]
    if edits:
        elst = full_box(b"elst", struct.pack(">I", edits), struct.pack(">IiI", samples, 0, 1 << 16) * edits)
        parts.append(box(b"edts", elst))
    return box(b"trak", *parts, box(b"mdia", mdhd, hdlr, box(b"minf", stbl)))


def movie(tracks: list[bytes], fragments: list[tuple[int, list[int]]] | None = None, brand: bytes = b"isom") -> bytes:
    """An MP4 (a QuickTime movie with brand `qt  `): ftyp; a moov of a movie header (its time scale
    1: edits are timed in samples) and these trak boxes; movie fragments, each of one track (its id)
    with runs of these sample counts; a token of media data."""
    mvhd = full_box(b"mvhd", struct.pack(">IIII", 0, 0, 1, 0), bytes(80))
    moofs = [
        box(
            b"moof",
            box(
                b"traf",
                full_box(b"tfhd", struct.pack(">I", ident)),
                *(full_box(b"trun", struct.pack(">I", n)) for n in runs),
            ),
        )
        + box(b"mdat", bytes(8))
        for ident, runs in fragments or []
    ]
    return box(b"ftyp", brand, bytes(4)) + box(b"moov", mvhd, *tracks) + b"".join(moofs) + box(b"mdat", bytes(16))


def ebml(element: bytes, *children: bytes, unknown: bool = False) -> bytes:
    body = b"".join(children)
    size = b"\x01" + (b"\xff" * 7 if unknown else len(body).to_bytes(7, "big"))
    return element + size + body


def ebml_uint(element: bytes, value: int) -> bytes:
    return ebml(element, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


WebmTrack = tuple[int, int, int, int]  # number, type (1 video, 2 audio), width, height
Block = tuple[int, int, bool]  # track number, frames (laced past 1), in a BlockGroup


def webm(
    tracks: list[WebmTrack], clusters: list[list[Block]], unknown: bool = False, tracks_last: bool = False
) -> bytes:
    """A WebM: its EBML header; a Segment (of unknown size, and its Clusters, if `unknown`) holding
    Info, these tracks and these clusters of blocks, each a token of data (the tracks after the
    clusters if `tracks_last`)."""
    entries = [
        ebml(
            b"\xae",
            ebml_uint(b"\xd7", number),
            ebml_uint(b"\x83", kind),
            ebml(b"\xe0", ebml_uint(b"\xb0", width), ebml_uint(b"\xba", height)),
        )
        for number, kind, width, height in tracks
    ]

    def block(track: int, frames: int, grouped: bool) -> bytes:
        laced = frames > 1  # Xiph lacing: the frame count less one follows the flags
        head = bytes([0x80 | track]) + b"\0\0" + bytes([0x80 | (0x02 if laced else 0)])
        data = head + (bytes([frames - 1]) if laced else b"") + bytes(4)
        return ebml(b"\xa0", ebml(b"\xa1", data)) if grouped else ebml(b"\xa3", data)

    declared = ebml(b"\x16\x54\xae\x6b", *entries)
    segment = [ebml(b"\x15\x49\xa9\x66", bytes(4)), *([] if tracks_last else [declared])]
    for blocks in clusters:
        segment.append(ebml(b"\x1f\x43\xb6\x75", ebml_uint(b"\xe7", 0), *(block(*b) for b in blocks), unknown=unknown))
    segment += [declared] if tracks_last else []
    return ebml(b"\x1aE\xdf\xa3", ebml(b"\x42\x82", b"webm")) + ebml(b"\x18\x53\x80\x67", *segment, unknown=unknown)


def riff_list(form: bytes, *chunks: bytes) -> bytes:
    return riff_chunk(b"LIST", form, *chunks)


def avi(size: tuple[int, int], streams: list[tuple[bytes, tuple[int, int]]], chunks: list[bytes]) -> bytes:
    """An AVI: its main header of `size`; stream headers (type, and a BITMAPINFOHEADER of this size);
    a movi list of these chunk ids, each a token of data (a chunk id of "rec " a rec list of two frames
    of stream 00)."""
    avih = riff_chunk(b"avih", bytes(32), struct.pack("<II", *size), bytes(16))
    strls = [
        riff_list(
            b"strl",
            riff_chunk(b"strh", kind, bytes(52)),
            riff_chunk(b"strf", struct.pack("<Iii", 40, *dims), bytes(28)),
        )
        for kind, dims in streams
    ]
    movi = [
        riff_list(b"rec ", riff_chunk(b"00dc", bytes(3)), riff_chunk(b"00dc", bytes(3)))
        if c == b"rec "
        else riff_chunk(c, bytes(3))
        for c in chunks
    ]
    body = b"AVI " + riff_list(b"hdrl", avih, *strls) + riff_list(b"movi", *movi)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def mpo(
    first: tuple[int, int],
    others: list[tuple[int, int]],
    claimed: int | None = None,
    shift: int = 0,
    late: bool = False,
) -> bytes:
    """A JPEG holding more after its end (an MPO): its MP index (APP2 "MPF"; after the frame
    header if `late`) counts `claimed` images (all, by default) and has an entry for each, the
    first, then a JPEG's headers apiece; `shift` moves where the entries after the first say
    their image is."""
    count = len(others) + 1
    table_at = 8 + 2 + 3 * 12 + 4  # TIFF header, then a directory of three entries
    directory = (
        tiff_entry("<", 0xB000, 7, int.from_bytes(b"0100", "little"), count=4)
        + tiff_entry("<", 0xB001, 4, count if claimed is None else claimed)
        + tiff_entry("<", 0xB002, 7, table_at, count=16 * count)
    )
    main = jpeg(*first)
    at = len(main) - 2 if late else 2  # before EOI, or after SOI
    start = at + 8  # APP2 marker and length, "MPF\0": the index, where its offsets count from
    position = len(main) + 8 + table_at + 16 * count  # the first image's end
    offsets = [0]
    for width, height in others:
        offsets.append(position - start + shift)
        position += len(jpeg(width, height))
    table = b"".join(
        struct.pack("<3I2H", 0x030000 if i == 0 else 0, 0, offset, 0, 0) for i, offset in enumerate(offsets)
    )
    index = b"II*\x00" + struct.pack("<IH", 8, 3) + directory + struct.pack("<I", 0) + table
    app2 = b"\xff\xe2" + struct.pack(">H", 2 + 4 + len(index)) + b"MPF\x00" + index
    return main[:at] + app2 + main[at:] + b"".join(jpeg(w, h) for w, h in others)


FULL = (0, 0, 1024, 1024)
TOTAL = "(10486 megapixels in all), over the limit of 200 megapixels (max_total_mp)."
TIFF_TOTAL = "(314.6 megapixels in all), over the limit of 200 megapixels (max_total_mp)."
MANY = f"has 10000 frames of 1024x1024 {TOTAL}"
HUGE = "is 13000x13000 (169 megapixels a frame), over the limit of 50 megapixels (max_frame_mp)."
BOMBS = {
    "GIF of many frames": ("x.gif", gif((1024, 1024), [FULL] * 10000), f"has 10000 frames of 1024x1024 {TOTAL}"),
    "APNG of many frames": ("x.png", apng(1024, 1024, 10000), f"has 10000 frames of 1024x1024 {TOTAL}"),
    "APNG declaring more frames than it holds": (
        "x.png",
        apng(1024, 1024, 10000, described=2),
        f"has 10000 frames of 1024x1024 {TOTAL}",
    ),
    "WebP of many frames": ("x.webp", webp((1024, 1024), [FULL] * 10000), f"has 10000 frames of 1024x1024 {TOTAL}"),
    "GIF of tiny frames past the frame count": (
        "x.gif",
        gif((1, 1), [(0, 0, 1, 1)] * 100_001),
        "has more than 100000 frames, over the limit of 100000 frames.",
    ),
    "huge PNG": ("x.png", apng(13000, 13000, 1), HUGE),
    "huge JPEG": ("x.jpg", jpeg(13000, 13000), HUGE),
    "huge lossless WebP": ("x.webp", riff(riff_chunk(b"VP8L", vp8l(13000, 13000))), HUGE),
    "huge lossy WebP": (
        "x.webp",
        vp8(16383, 16383),
        "is 16383x16383 (268.4 megapixels a frame), over the limit of 50 megapixels (max_frame_mp).",
    ),
    "huge top-down BMP": ("x.bmp", bmp(13000, -13000), HUGE),
    "GIF frame placed far outside a tiny screen": ("x.gif", gif((1, 1), [(12999, 12999, 1, 1)]), HUGE),
    "TIFF of many pages": ("x.tiff", tiff([(1024, 1024)] * 300), f"has 300 frames of 1024x1024 {TIFF_TOTAL}"),
    "huge TIFF": (
        "x.tiff",
        tiff([(40000, 40000)], order=">"),
        "is 40000x40000 (1600 megapixels a frame), over the limit of 50 megapixels (max_frame_mp).",
    ),
    "TIFF whose second page is huge": (
        "x.tiff",
        tiff([(100, 100), (13000, 13000)]),
        "has 2 frames of up to 13000x13000 (169 megapixels a frame), over the limit of 50 megapixels (max_frame_mp).",
    ),
    "huge AVIF": ("x.avif", heif(b"avif", {1: (13000, 13000)}), HUGE),
    "huge HEIC": ("x.heic", heif(b"heic", {1: (13000, 13000)}), HUGE),
    "HEIC thumbnail far larger than its image": (
        "x.heic",
        heif(b"heic", {1: (100, 100), 2: (13000, 13000)}, [(b"thmb", 2, [1])]),
        HUGE,
    ),
    "HEIC grid of a huge tile": (
        "x.heic",
        heif(b"heic", {1: (13000, 13000), 2: (512, 512), 3: (1024, 512)}, [(b"dimg", 3, [1, 2])]),
        HUGE,
    ),
    "HEIF of many images": ("x.heic", heif(b"mif1", dict.fromkeys(range(1, 10001), (1024, 1024))), MANY),
    "AVIF sequence of many frames": (
        "x.avif",
        heif(b"avis", {1: (1024, 1024)}, tracks=[(1024, 1024, 9999, b"pict")]),
        MANY,
    ),
    "MPO of many images": (
        "x.jpg",
        mpo((4000, 3000), [(4000, 3000)] * 999),
        "has 1000 frames of 4000x3000 (12000 megapixels in all), over the limit of 200 megapixels (max_total_mp).",
    ),
    "MPO whose second image is huge": (
        "x.jpg",
        mpo((100, 100), [(13000, 13000)]),
        "has 2 frames of up to 13000x13000 (169 megapixels a frame), over the limit of 50 megapixels (max_frame_mp).",
    ),
    "GIF frames of growing size": (
        "x.gif",
        gif((100, 100), [(0, 0, 100, 100), (0, 0, 8000, 8000)]),
        "has 2 frames of up to 8000x8000 (64 megapixels a frame), over the limit of 50 megapixels (max_frame_mp).",
    ),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
async def test_bombs_are_refused_and_nothing_is_kept(bridge: Client, case: str) -> None:
    filename, data, detail = BOMBS[case]
    status, body = await upload(bridge, {"file": (filename, data)}, client_id="bomber")
    assert (status, body) == (413, {"detail": f"File {filename!r} {detail}"})
    assert stored(bridge) == []


async def test_a_bomb_beside_good_files_stores_none_of_them(bridge: Client) -> None:
    files = {"good": ("a.png", png()), "bomb": ("b.jpg", jpeg(13000, 13000)), "after": ("c.png", png())}
    status, body = await upload(bridge, files)
    assert (status, body) == (413, {"detail": f"File 'b.jpg' {HUGE}"})
    assert stored(bridge) == []


async def test_a_48_megapixel_photo_passes_and_a_larger_one_does_not(bridge: Client) -> None:
    status, names = await upload(bridge, {"photo": ("phone.jpg", jpeg(8000, 6000))})
    assert status == 200
    assert names["photo"].endswith("-phone.jpg")
    status, body = await upload(bridge, {"photo": ("big.jpg", jpeg(8200, 6200))})
    detail = "File 'big.jpg' is 8200x6200 (50.84 megapixels a frame), over the limit of 50 megapixels (max_frame_mp)."
    assert (status, body) == (413, {"detail": detail})
    assert [p.name for p in stored(bridge)] == [names["photo"]]


SHORT = [(0, 0, 32, 32), (8, 8, 16, 16), (0, 0, 32, 32)]
# A 48 MP phone photo: an 8064x6048 grid (item 193) of 16x12 tiles of 512x512, with a thumbnail and
# a quarter-size gain map (an auxiliary image, itself a grid of 12 tiles).
PYRAMID = [(8000 >> level, 6000 >> level) for level in range(6)]
TILES = list(range(1, 193))
GAIN_TILES = list(range(196, 208))
GRID: tuple[dict[int, tuple[int, int]], list[Reference]] = (
    {
        **dict.fromkeys(TILES + GAIN_TILES, (512, 512)),
        193: (8064, 6048),
        194: (416, 312),
        195: (2016, 1512),
    },
    [(b"dimg", 193, TILES), (b"thmb", 194, [193]), (b"auxl", 195, [193]), (b"dimg", 195, GAIN_TILES)],
)
GOOD = {
    "a.gif": gif((32, 32), SHORT),
    "a.png": apng(32, 32, 3),
    "a.webp": webp((32, 32), SHORT),
    "b.bmp": bmp(16, -16),
    "b.webp": riff(riff_chunk(b"VP8L", vp8l(32, 32))),
    "c.tiff": tiff([(32, 32), (16, 16)], order=">", kind=3),
    "c.jpg": mpo((1920, 1080), [(1920, 1080)]),  # a stereo pair
    "c.avif": heif(b"avis", {1: (640, 480)}, tracks=[(640, 480, 48, b"pict"), (0, 0, 90_000, b"soun")]),
    "c.heic": heif(b"heic", *GRID),
    "d.tiff": tiff(PYRAMID),  # a 48 MP page and its reductions: 64 megapixels, each page its own size
}


async def test_real_images_and_short_animations_pass_up_to_the_total(bridge: Client) -> None:
    status, names = await upload(bridge, {name: (name, data) for name, data in GOOD.items()})
    assert status == 200, names
    assert sorted(names) == sorted(GOOD)
    # 190 frames of 1024x1024 are 199.2 megapixels in all; one frame more is over.
    status, _ = await upload(bridge, {"file": ("190.gif", gif((1024, 1024), [FULL] * 190))})
    assert status == 200
    status, body = await upload(bridge, {"file": ("191.png", apng(1024, 1024, 191))})
    detail = "has 191 frames of 1024x1024 (200.3 megapixels in all), over the limit of 200 megapixels (max_total_mp)."
    assert (status, body) == (413, {"detail": f"File '191.png' {detail}"})
    assert len(stored(bridge)) == len(GOOD) + 1


async def test_the_limits_are_settings(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    emulator = await make_emulator()
    strict = await make_bridge(emulator, max_frame_mp=0.01, max_total_mp=0.02)
    status, _ = await upload(strict, {"file": ("edge.png", png(100, 100))})
    assert status == 200  # 0.01 megapixels: at the limit, not over it
    status, body = await upload(strict, {"file": ("a.png", png(200, 200))})
    detail = "File 'a.png' is 200x200 (0.04 megapixels a frame), over the limit of 0.01 megapixels (max_frame_mp)."
    assert (status, body) == (413, {"detail": detail})
    status, body = await upload(strict, {"file": ("a.gif", gif((100, 100), [(0, 0, 100, 100)] * 3))})
    detail = "File 'a.gif' has 3 frames of 100x100 (0.03 megapixels in all), over the limit of 0.02 megapixels"
    assert (status, body) == (413, {"detail": detail + " (max_total_mp)."})
    lenient = await make_bridge(emulator, max_frame_mp=170)
    status, _ = await upload(lenient, {"file": ("huge.png", apng(13000, 13000, 1))})
    assert status == 200


async def test_a_video_whose_frames_would_not_fit_in_memory_is_refused(bridge: Client) -> None:
    """ComfyUI's video input decodes every frame to float32: 10,000 frames of 1080p, declared in a
    few hundred bytes, would ask it for 250 GB."""
    bomb = movie([track(1920, 1080, 10000, b"vide", ident=1)])
    status, body = await upload(bridge, {"clip": ("clip.mp4", bomb)}, client_id="bomber")
    detail = (
        "has 10000 frames of 1920x1080 (20736 megapixels in all), over the limit of 2000 megapixels (max_video_mp)."
    )
    assert (status, body) == (413, {"detail": f"File 'clip.mp4' {detail}"})
    fragmented = movie([track(1920, 1080, 0, b"vide", ident=1)], fragments=[(1, [600, 400])] * 10)
    status, body = await upload(bridge, {"clip": ("clip.mp4", fragmented)}, client_id="bomber")
    assert (status, body) == (413, {"detail": f"File 'clip.mp4' {detail}"})
    assert stored(bridge) == []
    # Four seconds of 1080p: more pixels than an image may have, well within a video's limit.
    status, names = await upload(
        bridge, {"clip": ("clip.mov", movie([track(1920, 1080, 100, b"vide", ident=1)], brand=b"qt  "))}
    )
    assert status == 200
    assert names["clip"].endswith("-clip.mov")


async def test_a_webm_whose_frames_would_not_fit_in_memory_is_refused(bridge: Client) -> None:
    """A recorder's WebM (Segment and Clusters of unknown size) of 40 blocks, each lacing 256 frames."""
    bomb = webm([(1, 1, 1920, 1080)], [[(1, 256, False)] * 4] * 10, unknown=True)
    status, body = await upload(bridge, {"clip": ("clip.webm", bomb)}, client_id="bomber")
    detail = "has 10240 frames of 1920x1080 (21234 megapixels in all), over the limit of 2000 megapixels"
    assert (status, body) == (413, {"detail": f"File 'clip.webm' {detail} (max_video_mp)."})
    assert stored(bridge) == []
    status, _ = await upload(bridge, {"clip": ("clip.webm", webm([(1, 1, 1920, 1080)], [[(1, 1, False)] * 100]))})
    assert status == 200


def test_a_webms_video_blocks_are_frames_and_its_sound_is_not(tmp_path: Path) -> None:
    tracks = [(1, 1, 1280, 720), (2, 2, 0, 0)]
    clusters = [[(1, 1, False), (2, 1, False), (1, 4, False)], [(2, 1, False), (1, 1, True), (2, 9, False)]]
    expected = Frames(6, 1280, 720, 6 * 921600, True)
    assert frames_of(tmp_path, ".webm", webm(tracks, clusters)) == expected
    assert frames_of(tmp_path, ".webm", webm(tracks, clusters, unknown=True)) == expected
    # Tracks declared after the clusters count as well; frames are at the largest video track's size.
    assert frames_of(tmp_path, ".webm", webm(tracks, clusters, tracks_last=True)) == expected
    two = webm([*tracks, (3, 1, 3840, 2160)], [*clusters, [(3, 2, False)]])
    assert frames_of(tmp_path, ".webm", two) == Frames(8, 3840, 2160, 8 * 8294400, True)
    assert frames_of(tmp_path, ".webm", webm([(2, 2, 0, 0)], [[(2, 1, False)] * 3])) is None  # sound alone
    # A video track that declares no size is decoded at its bitstream's (checked with PyAV), not read.
    with pytest.raises(BadHeaders, match="declares no frame size"):
        frames_of(tmp_path, ".webm", webm([(1, 1, 0, 0)], [[(1, 1, False)] * 40]))


async def test_an_avi_whose_frames_would_not_fit_in_memory_is_refused(bridge: Client) -> None:
    bomb = avi((1920, 1080), [(b"vids", (1920, 1080))], [b"00dc"] * 1100)
    status, body = await upload(bridge, {"clip": ("clip.avi", bomb)}, client_id="bomber")
    detail = "has 1100 frames of 1920x1080 (2281 megapixels in all), over the limit of 2000 megapixels (max_video_mp)."
    assert (status, body) == (413, {"detail": f"File 'clip.avi' {detail}"})
    assert stored(bridge) == []
    status, _ = await upload(
        bridge, {"clip": ("clip.avi", avi((1920, 1080), [(b"vids", (1920, 1080))], [b"00dc"] * 100))}
    )
    assert status == 200


def test_an_avis_video_chunks_are_frames_and_its_sound_is_not(tmp_path: Path) -> None:
    streams = [(b"auds", (0, 0)), (b"vids", (640, -480))]  # a negative height: rows top down
    chunks = [b"01dc", b"00wb", b"01db", b"JUNK", b"ix01", b"01dc", b"00wb"]
    assert frames_of(tmp_path, ".avi", avi((320, 240), streams, chunks)) == Frames(3, 640, 480, 3 * 307200, True)
    # rec lists hold frames too; the main header's size counts when it is the larger
    grouped = avi((1280, 720), [(b"vids", (640, 480))], [b"rec ", b"00dc"])
    assert frames_of(tmp_path, ".avi", grouped) == Frames(3, 1280, 720, 3 * 921600, True)
    assert frames_of(tmp_path, ".avi", avi((0, 0), [(b"auds", (0, 0))], [b"00wb"] * 3)) is None  # sound alone


def test_a_movie_track_is_video_by_its_format_and_plays_as_often_as_its_edit_list_says(tmp_path: Path) -> None:
    """Checked against PyAV 18 (ComfyUI's video input): ffmpeg makes a track video by its sample
    format whatever its handler says (unless sound), and decodes its samples again for each entry
    of its edit list; a track of only 0x0 would be decoded at its bitstream's size. A phone's
    per-frame metadata track (mebx) and a timecode track are no frames."""
    for handler in (b"pict", b"meta", b"auxv", b"abcd"):
        clip = movie([track(1920, 1080, 10_000, handler, ident=1)])
        assert frames_of(tmp_path, ".mp4", clip) == Frames(10_000, 1920, 1080, 10_000 * 2073600, True), handler
    replayed = movie([track(64, 48, 100, b"vide", ident=1, edits=100)])
    assert frames_of(tmp_path, ".mp4", replayed) == Frames(10_000, 64, 48, 10_000 * 3072, True)
    metadata = track(0, 0, 900, b"meta", ident=2).replace(b"avc1", b"mebx")
    timecode = track(0, 0, 1, b"tmcd", ident=3).replace(b"avc1", b"tmcd")
    phone = movie([track(1920, 1080, 900, b"vide", ident=1), metadata, timecode])
    assert frames_of(tmp_path, ".mp4", phone) == Frames(900, 1920, 1080, 900 * 2073600, True)
    with pytest.raises(BadHeaders, match="declares no frame size"):
        frames_of(tmp_path, ".mp4", movie([track(0, 0, 10, b"vide", ident=1)]))


def test_a_track_of_a_format_not_known_is_video_when_it_declares_a_size(tmp_path: Path) -> None:
    """ffmpeg looks a format up among QuickTime's and AVI's video tags, which no list here holds
    whole: a track (not sound) of a format known as neither video nor metadata counts as video when
    it declares a frame size. Known metadata does not, whatever size it declares; nor does a format
    of no declared size (its bitstream's size is not read)."""
    unknown = movie([track(1920, 1080, 900, b"meta", ident=1).replace(b"avc1", b"Qx9z")])
    assert frames_of(tmp_path, ".mp4", unknown) == Frames(900, 1920, 1080, 900 * 2073600, True)
    metadata = movie([track(1920, 1080, 900, b"meta", ident=1).replace(b"avc1", b"mebx")])
    assert frames_of(tmp_path, ".mp4", metadata) is None
    unsized = movie([track(0, 0, 900, b"meta", ident=1).replace(b"avc1", b"Qx9z")])
    assert frames_of(tmp_path, ".mp4", unsized) is None


def test_a_compressed_movie_header_is_refused_unread(tmp_path: Path) -> None:
    """ffmpeg inflates a QuickTime compressed movie header (moov > cmov) and decodes its tracks."""
    inner = box(b"moov", track(1920, 1080, 10_000, b"vide", ident=1))
    cmov = box(b"cmov", box(b"dcom", b"zlib"), box(b"cmvd", struct.pack(">I", len(inner)), zlib.compress(inner)))
    path = tmp_path / "clip.mov"
    path.write_bytes(box(b"ftyp", b"qt  ", bytes(4)) + box(b"moov", cmov) + box(b"mdat", bytes(16)))
    with pytest.raises(BadHeaders, match="compressed movie header"):
        image_frames(path, ".mov")


def avi_of(movi: list[bytes], headers: list[bytes] | None = None, idx1: bytes | None = None) -> bytes:
    """An AVI of 1080p MJPEG: these header chunks (by default avih and one strl list of a video
    stream), these chunks in its movi list, and an idx1 if given."""
    size = (1920, 1080)
    if headers is None:
        strh = riff_chunk(b"strh", b"vidsMJPG", bytes(48))
        strf = riff_chunk(b"strf", struct.pack("<IiiHH4s", 40, *size, 1, 24, b"MJPG"), bytes(20))
        avih = riff_chunk(b"avih", bytes(32), struct.pack("<II", *size), bytes(16))
        headers = [riff_list(b"hdrl", avih, riff_list(b"strl", strh, strf))]
    body = b"AVI " + b"".join(headers) + riff_list(b"movi", *movi)
    if idx1 is not None:
        body += riff_chunk(b"idx1", idx1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_an_avi_is_read_for_frames_as_ffmpeg_reads_it(tmp_path: Path) -> None:
    """Checked against PyAV 18: ffmpeg takes every chunk NN?? of a video stream as a frame (but its
    ix, wc, pc), in any list of movi; reads stream headers wherever they are before movi; and,
    reading through idx1, decodes one frame an entry, however often entries repeat a chunk. A
    chunk it does not know in movi it scans byte by byte for frames: refused."""
    hd = 1920 * 1080
    for tag in (b"00wb", b"00xx", b"00DC"):
        assert frames_of(tmp_path, ".avi", avi_of([riff_chunk(tag, bytes(4))] * 1000)) == Frames(
            1000, 1920, 1080, 1000 * hd, True
        )
    forty = [riff_chunk(b"00dc", bytes(4))] * 40
    for movi in ([riff_list(b"abcd", *forty)], [riff_list(b"rec ", riff_list(b"rec ", *forty))]):
        assert frames_of(tmp_path, ".avi", avi_of(movi)) == Frames(40, 1920, 1080, 40 * hd, True)
    with pytest.raises(BadHeaders, match="unknown chunk in the movi list"):
        frames_of(tmp_path, ".avi", avi_of([riff_chunk(b"zzzz", *forty)]))
    chunk = riff_chunk(b"00dc", bytes(4))
    entry = [struct.pack("<4sIII", b"00dc", 0x10, at, 4) for at in (4, 4 + len(chunk))]
    index = entry[0] * 2 + (entry[1] + entry[0]) * 5000
    assert frames_of(tmp_path, ".avi", avi_of([chunk, chunk], idx1=index)) == Frames(
        10002, 1920, 1080, 10002 * hd, True
    )
    avih = riff_chunk(b"avih", bytes(32), struct.pack("<II", 1920, 1080), bytes(16))
    strh = riff_chunk(b"strh", b"vidsMJPG", bytes(48))
    for headers in (
        [riff_list(b"hdrl", avih, strh)],  # no strl list
        [riff_list(b"hdrl", avih, riff_list(b"abcd", riff_list(b"strl", strh)))],  # one within another list
        [riff_list(b"abcd", avih, riff_list(b"strl", strh))],  # hdrl named otherwise
    ):
        assert frames_of(tmp_path, ".avi", avi_of(forty, headers)) == Frames(40, 1920, 1080, 40 * hd, True)
    with pytest.raises(BadHeaders, match="declares no frame size"):
        frames_of(tmp_path, ".avi", avi_of(forty, [riff_list(b"hdrl", strh)]))


async def test_video_bombs_that_hid_their_frames_are_refused(bridge: Client) -> None:
    """Each asks ComfyUI's video input to decode 10,000 frames of 1080p (20,736 megapixels, about
    250 GB of float32); each was stored (200) when only `vide` tracks and `NNdc` chunks counted."""
    bombs = {
        "pict.mp4": movie([track(1920, 1080, 10_000, b"pict", ident=1)]),
        "wb.avi": avi_of([riff_chunk(b"00wb", bytes(4))] * 10_000),
    }
    for name, data in bombs.items():
        status, body = await upload(bridge, {"clip": (name, data)}, client_id="bomber")
        assert status == 413, (name, status, body)
        assert body["detail"].endswith("over the limit of 2000 megapixels (max_video_mp)."), body
    assert stored(bridge) == []


def test_a_movies_video_samples_are_frames_and_its_sound_is_not(tmp_path: Path) -> None:
    sound = track(0, 0, 90000, b"soun", ident=2)
    clip = movie([track(1280, 720, 240, b"vide", ident=1), sound])
    assert frames_of(tmp_path, ".mp4", clip) == Frames(240, 1280, 720, 240 * 921600, True)
    # Fragmented: the runs of the video track's fragments; a sound track's runs are no frames.
    fragments = [(1, [100, 20]), (2, [5000]), (1, [30])]
    fragmented = movie([track(640, 360, 0, b"vide", ident=1), sound], fragments)
    assert frames_of(tmp_path, ".mp4", fragmented) == Frames(150, 640, 360, 150 * 230400, True)
    # Decoded at the size the sample description declares when it is larger than the presentation's.
    coded = movie([track(320, 240, 10, b"vide", ident=1, described=(3840, 2160))])
    assert frames_of(tmp_path, ".mp4", coded) == Frames(10, 3840, 2160, 10 * 8294400, True)
    assert frames_of(tmp_path, ".mp4", movie([sound])) is None  # sound alone: nothing to decode to frames


@pytest.mark.parametrize("name", ["max_frame_mp", "max_total_mp", "max_video_mp"])
def test_the_limits_must_be_positive(tmp_path: Path, name: str) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError) as caught:
        load_settings([flag, "0"], environ={}, cwd=tmp_path)
    assert str(caught.value) == f"{flag}: '0' must be greater than 0"
    assert getattr(load_settings([flag, "0.5"], environ={}, cwd=tmp_path), name) == 0.5


IEND = png_chunk(b"IEND", b"")
GIF_HEAD = b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0, 0, 0)
SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
FTYP = box(b"ftyp", b"heic", bytes(4))
MP4_FTYP = box(b"ftyp", b"isom", bytes(4))
# Files whose ends look right (so the whole-file check passes) but whose headers are cut off, lie
# about lengths or hold no image: refused as malformed, never a 500.
BROKEN = {
    "PNG chunk longer than the file": ("x.png", apng(8, 8, 1)[:33] + b"\x7f\xff\xff\xffIDAT" + IEND),
    "PNG IHDR too short for a size": ("x.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"\x00\x00") + IEND),
    "PNG with a second IHDR (a decoder may take its size)": (
        "x.png",
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0))
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0))
        + png_chunk(b"IDAT", deflated(4, 4))
        + IEND,
    ),
    "PNG of no pixels": (
        "x.png",
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)) + IEND,
    ),
    "APNG fcTL too short": (
        "x.png",
        apng(8, 8, 1)[:33] + png_chunk(b"acTL", struct.pack(">II", 2, 0)) + png_chunk(b"fcTL", b"\x00" * 8) + IEND,
    ),
    "GIF image descriptor cut off": ("x.gif", GIF_HEAD + b",\x00\x00\x00;"),
    "GIF sub-block longer than the file": ("x.gif", GIF_HEAD + b"!\xfe\xff abc;"),
    "GIF unknown block": ("x.gif", GIF_HEAD + b"?" * 30 + b";"),
    "GIF with no image": ("x.gif", GIF_HEAD + b"!\xfe\x03abc\x00" * 5 + b";"),
    "GIF screen cut off": ("x.gif", b"GIF89a\x08;"),
    "JPEG segment longer than the file": ("x.jpg", SOI + b"\xff\xe1\xff\xff" + b"\x00" * 40 + EOI),
    "JPEG segment shorter than its length": ("x.jpg", SOI + b"\xff\xe1\x00\x01" + b"\x00" * 40 + EOI),
    "JPEG scan before any frame header": ("x.jpg", SOI + b"\xff\xda\x00\x08" + b"\x00" * 40 + EOI),
    "JPEG junk where a marker belongs": ("x.jpg", jpeg(8, 8)[:20] + b"\x00" * 40 + EOI),
    "JPEG junk after the frame header": ("x.jpg", jpeg(8, 8)[:-2] + b"\x00" * 40 + EOI),  # read up to the scan
    "JPEG frame header too short": ("x.jpg", SOI + b"\xff\xc0\x00\x04\x08\x00" + b"\x00" * 40 + EOI),
    "WebP chunk longer than the file": ("x.webp", riff(b"VP8L" + struct.pack("<I", 1000) + vp8l(8, 8) * 4)),
    "WebP VP8 without its start code": ("x.webp", riff(riff_chunk(b"VP8 ", b"\x00" * 24))),
    "WebP VP8L without its signature": ("x.webp", riff(riff_chunk(b"VP8L", b"\x00" * 24))),
    "WebP VP8X too short": ("x.webp", riff(riff_chunk(b"VP8X", b"\x02\x00") + riff_chunk(b"VP8L", vp8l(8, 8)))),
    "WebP canvas with no image": ("x.webp", riff(riff_chunk(b"VP8X", b"\x00" * 10) + riff_chunk(b"ANIM", b"\0" * 6))),
    "BMP header of unknown size": (
        "x.bmp",
        b"BM" + struct.pack("<IHHI", 40, 0, 0, 26) + struct.pack("<I", 5) + bytes(22),
    ),
    "BMP cut off in its header": ("x.bmp", b"BM" + struct.pack("<IHHI", 20, 0, 0, 26) + struct.pack("<IH", 40, 1)),
    "TIFF directories in a loop": ("x.tiff", tiff([(8, 8)] * 3, loop=True)),
    "TIFF directory leading to itself": ("x.tiff", tiff([(8, 8)], order=">", loop=True)),
    "TIFF directory past the end": ("x.tiff", tiff([(8, 8)])[:-4] + struct.pack("<I", 10**6)),
    "TIFF directory cut off": ("x.tiff", b"II*\x00" + struct.pack("<IH", 8, 5) + bytes(20)),
    "TIFF directory of more entries than libtiff reads": (
        "x.tiff",
        b"II*\x00" + struct.pack("<IH", 8, 4097) + bytes(4097 * 12 + 4),
    ),
    "TIFF width as a fraction": (
        "x.tiff",
        b"II*\x00" + struct.pack("<IH", 8, 1) + tiff_entry("<", 256, 5, 8) + bytes(12),
    ),
    "HEIC box running past its parent": (
        "x.heic",
        FTYP + box(b"meta", bytes(4), box(b"iprp", b"\0\0\0\x40ipco" + bytes(8))),
    ),
    "HEIC without an image size": ("x.heic", heif(b"heic", {})),
    "HEIC image size too short": (
        "x.heic",
        FTYP + box(b"meta", bytes(4), box(b"iprp", box(b"ipco", box(b"ispe", bytes(8))))),
    ),
    "HEIC properties associated before listed": (
        "x.heic",
        FTYP + box(b"meta", bytes(4), box(b"iprp", full_box(b"ipma", bytes(4)), box(b"ipco"))),
    ),
    "HEIC associations past their box": (
        "x.heic",
        FTYP + box(b"meta", bytes(4), box(b"iprp", box(b"ipco"), full_box(b"ipma", struct.pack(">I", 5)))),
    ),
    "MPO index without its number of images": (
        "x.jpg",
        mpo((8, 8), [(8, 8)]).replace(tiff_entry("<", 0xB001, 4, 2), tiff_entry("<", 0xB0FF, 4, 2)),
    ),
    "MPO index of another type": (
        "x.jpg",
        mpo((8, 8), [(8, 8)]).replace(tiff_entry("<", 0xB001, 4, 2), tiff_entry("<", 0xB001, 5, 2)),
    ),
    "MPO index that is no TIFF structure": ("x.jpg", SOI + b"\xff\xe2\x00\x0aMPF\x00XXXX" + jpeg(8, 8)[2:]),
    "MPO entry where no JPEG starts": ("x.jpg", mpo((8, 8), [(8, 8)], shift=1)),
    "MPO entry past the end": ("x.jpg", mpo((8, 8), [(8, 8)], shift=10**6)),
}
MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp"}
MIME |= {".tiff": "image/tiff", ".avif": "image/avif", ".heic": "image/heic"}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_headers_are_refused_as_malformed(bridge: Client, case: str) -> None:
    filename, data = BROKEN[case]
    status, body = await upload(bridge, {"file": (filename, data)})
    mime = MIME[Path(filename).suffix]
    assert (status, body) == (415, {"detail": f"File {filename!r} is not a complete, well-formed {mime} file."})
    assert stored(bridge) == []


TAILS = {
    ".png": IEND,
    ".gif": b";",
    ".jpg": EOI,
    ".webp": b"",
    ".bmp": b"",
    ".tiff": b"",
    ".avif": b"",
    ".heic": b"",
    ".mp4": b"",
    ".avi": b"",
}


def whole(ext: str, head: bytes) -> bytes:
    """`head` made to pass the whole-file check, so the headers inside are what is judged."""
    data = head + TAILS[ext]
    if ext in (".webp", ".avi"):
        return b"RIFF" + struct.pack("<I", max(len(data), 12) - 8) + data[8:]
    if ext == ".bmp":
        return data[:2] + struct.pack("<I", max(len(data), 6)) + data[6:]
    if ext == ".tiff":
        return data.ljust(9, b"\0")  # past the first directory's offset
    if ext in (".avif", ".heic"):
        return tiled(data[:8] + ext[1:].encode() + data[12:])  # the brand, which says what the file is
    if ext == ".mp4":
        return tiled(data)
    return data


def tiled(data: bytes) -> bytes:
    """ISO BMFF boxes cut anywhere, the last made to end where the file does, as whole ones do."""
    position = 0
    while position + 8 <= len(data):
        (size,) = struct.unpack_from(">I", data, position)
        if size < 8 or position + size >= len(data):
            return data[:position] + struct.pack(">I", len(data) - position) + data[position + 4 :]
        position += size
    return data[:position]


async def test_cut_off_bombs_are_never_an_error(bridge: Client) -> None:
    """Every bomb cut short at many places, its end restored so that it still looks whole: a cut
    one-frame bomb is refused, as too large while its header is whole and as malformed once not;
    a cut animation may also be a short one that is fine to store."""
    for case in sorted(BOMBS):
        filename, data, detail = BOMBS[case]
        ext = Path(filename).suffix
        for cut in (*range(8, 80, 3), len(data) // 3, len(data) - 7):
            status, body = await upload(bridge, {"file": (filename, whole(ext, data[:cut]))})
            allowed = (413, 415) if detail.startswith("is ") else (200, 413, 415)
            assert status in allowed, (case, cut, status, body)
            assert status == 200 or set(body) == {"detail"}


SIGNATURES = {
    ".png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    ".gif": b"GIF89a",
    ".jpg": SOI,
    ".webp": b"RIFF\x00\x00\x00\x00WEBP",
    ".bmp": b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    ".tiff": b"II*\x00\x08\x00\x00\x00",
    ".heic": FTYP,
    ".mp4": MP4_FTYP,
}


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(ext=st.sampled_from(sorted(SIGNATURES)), rest=st.binary(max_size=600))
def test_any_bytes_after_a_signature_give_frames_or_a_refusal(ext: str, rest: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{ext}"
        path.write_bytes(whole(ext, SIGNATURES[ext] + rest))
        assert is_complete(path, ext)
        try:
            frames = image_frames(path, ext)
        except BadHeaders:
            return
        if frames is None and ext in (".mp4", ".avi"):  # no video track
            return
        assert isinstance(frames, Frames)
        assert 1 <= frames.count <= MAX_FRAMES + 1
        assert frames.pixels <= frames.count * frames.width * frames.height


def frames_of(folder: Path, ext: str, data: bytes) -> Frames | None:
    path = folder / f"image{ext}"
    path.write_bytes(data)
    assert is_complete(path, ext)
    return image_frames(path, ext)


def test_tiff_pages_are_frames_of_their_own_size(tmp_path: Path) -> None:
    pixels = sum(width * height for width, height in PYRAMID)
    assert frames_of(tmp_path, ".tiff", tiff(PYRAMID)) == Frames(6, 8000, 6000, pixels, same_size=False)
    assert frames_of(tmp_path, ".tiff", tiff([(300, 200)] * 2, order=">", kind=3)) == Frames(2, 300, 200, 120000, True)
    # As many entries as libtiff reads in one directory, none of them a size: a page of nothing,
    # refused (a TIFF signature and an empty directory glued onto a script are no image).
    crowded = b"MM\x00*" + struct.pack(">IH", 8, 4096) + bytes(4096 * 12 + 4)
    with pytest.raises(BadHeaders, match="no pixels"):
        frames_of(tmp_path, ".tiff", crowded)


async def test_bigtiff_is_not_taken_for_an_image(bridge: Client) -> None:
    """BigTIFF has no header reader, so it is not sniffed as an image at all."""
    for head in (b"II+\x00\x08\x00\x00\x00", b"MM\x00+\x00\x08\x00\x00"):
        status, body = await upload(bridge, {"file": ("big.tiff", head + bytes(32))})
        detail = "File 'big.tiff' is not a recognised media file (allowed: image, video, audio)."
        assert (status, body) == (415, {"detail": detail})
    assert stored(bridge) == []


def test_a_grid_photo_is_one_frame_of_its_full_size(tmp_path: Path) -> None:
    """Tiles, thumbnail and gain map serve the grid, so only it is a frame; without the references
    that say so, each image is a frame, at the largest size."""
    items, references = GRID
    assert frames_of(tmp_path, ".heic", heif(b"heic", items, references)) == Frames(1, 8064, 6048, 48771072, True)
    assert frames_of(tmp_path, ".heic", heif(b"heic", items)) == Frames(207, 8064, 6048, 207 * 48771072, True)
    # A thumbnail larger than its image: the largest image counts, whatever serves what.
    thumbnail = heif(b"heic", {1: (100, 100), 2: (400, 300)}, [(b"thmb", 2, [1])])
    assert frames_of(tmp_path, ".heic", thumbnail) == Frames(1, 400, 300, 120000, True)


def test_heif_sequences_count_their_samples(tmp_path: Path) -> None:
    still = {1: (640, 480)}
    animated = heif(b"avis", still, tracks=[(640, 480, 24, b"pict"), (0, 0, 5000, b"soun")])
    assert frames_of(tmp_path, ".avif", animated) == Frames(25, 640, 480, 25 * 307200, True)
    # 16.16 fixed point, rounded up.
    presented = b"\0" * 72 + struct.pack(">II", 640 << 16, 480 << 16)  # tkhd's end
    odd = animated.replace(presented, presented[:-5] + b"\x01" + presented[-4:])
    assert frames_of(tmp_path, ".avif", odd) == Frames(25, 641, 480, 307200 + 24 * 307680, False)
    # A track of no presentation size is the size so far; a sequence may have no still image.
    sizeless = heif(b"avis", still, tracks=[(0, 0, 9, b"vide")])
    assert frames_of(tmp_path, ".avif", sizeless) == Frames(10, 640, 480, 10 * 307200, True)
    bare = heif(b"avis", {}, tracks=[(320, 240, 3, b"pict")])
    assert frames_of(tmp_path, ".avif", bare) == Frames(3, 320, 240, 3 * 76800, True)


def test_mpo_images_are_frames(tmp_path: Path) -> None:
    stereo = mpo((1920, 1080), [(1920, 1080)])
    assert frames_of(tmp_path, ".jpg", stereo) == Frames(2, 1920, 1080, 2 * 2073600, True)
    # More images counted than listed: those are the size so far; one counted is a plain JPEG.
    assert frames_of(tmp_path, ".jpg", mpo((100, 50), [(200, 100)], claimed=5)) == Frames(
        5, 200, 100, 5000 + 80000, False
    )
    assert frames_of(tmp_path, ".jpg", mpo((100, 50), [(200, 100)], claimed=1)) == Frames(1, 100, 50, 5000, True)
    # An index after the frame header, before the scan, is read too, as Pillow reads it.
    assert frames_of(tmp_path, ".jpg", mpo((100, 50), [(300, 20)], late=True)) == Frames(
        2, 300, 50, 5000 + 15000, False
    )


BOX_TYPES = [b"meta", b"iprp", b"ipco", b"ipma", b"ispe", b"iref", b"dimg", b"thmb", b"auxl", b"moov", b"trak"]
BOX_TYPES += [
    b"tkhd",
    b"mdia",
    b"hdlr",
    b"minf",
    b"stbl",
    b"stsz",
    b"free",
    b"stsd",
    b"moof",
    b"traf",
    b"tfhd",
    b"trun",
]
boxes = st.recursive(
    st.builds(box, st.sampled_from(BOX_TYPES), st.binary(max_size=24)),
    # Containers, some with a full box's 4 bytes before their children (or a wrong number of them).
    lambda inner: st.builds(
        lambda kind, head, children: box(kind, head, *children),
        st.sampled_from(BOX_TYPES),
        st.sampled_from([b"", b"\0" * 4, b"\x01\0\0\x01", b"\0\0\0\0\0\0\0\x02", b"\0\x03"]),
        st.lists(inner, max_size=4),
    ),
    max_leaves=12,
)
directories = st.lists(
    st.tuples(
        st.lists(
            st.tuples(
                st.sampled_from([256, 257, 273]),
                st.sampled_from([3, 4, 5]),
                st.integers(0, 2),
                st.integers(0, 2**32 - 1),
            ),
            max_size=4,
        ),
        st.integers(-1, 7),  # the next directory: none, one of these (a loop, maybe), the end or past it
    ),
    min_size=1,
    max_size=6,
)


def tiff_of(order: str, listed: list[tuple[list[tuple[int, int, int, int]], int]]) -> bytes:
    """A TIFF of these directories: their entries (tag, type, count, value) and which one is next."""
    starts = [8]
    for entries, _ in listed:
        starts.append(starts[-1] + 6 + 12 * len(entries))
    body = b""
    for entries, after in listed:
        body += struct.pack(order + "H", len(entries))
        body += b"".join(
            struct.pack(order + "HHI", tag, kind, count) + struct.pack(order + "I", v)
            for tag, kind, count, v in entries
        )
        body += struct.pack(order + "I", 0 if after < 0 else starts[after] if after < len(starts) else 2**32 - 1)
    return (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8) + body


def mpo_of(claimed: int, offsets: list[int], sizes: list[tuple[int, int]]) -> bytes:
    """An MPO of images of these sizes whose index counts `claimed` and says they are at `offsets`."""
    data = mpo(sizes[0], sizes[1:], claimed)
    table = data.index(b"MPF\x00") + 4 + 50
    for index, offset in enumerate(offsets[: len(sizes)]):
        data = data[: table + 16 * index + 8] + struct.pack("<I", offset) + data[table + 16 * index + 12 :]
    return data


heifs = st.builds(
    heif,
    st.sampled_from([b"heic", b"avif", b"avis"]),
    st.dictionaries(st.integers(1, 300), st.tuples(st.integers(0, 70000), st.integers(0, 70000)), max_size=150),
    st.lists(
        st.tuples(
            st.sampled_from([b"dimg", b"thmb", b"auxl", b"cdsc"]),
            st.integers(1, 300),
            st.lists(st.integers(1, 300), max_size=5),
        ),
        max_size=4,
    ),
    st.lists(
        st.tuples(
            st.integers(0, 65535),
            st.integers(0, 65535),
            st.integers(0, 2**32 - 1),
            st.sampled_from([b"pict", b"vide", b"soun"]),
        ),
        max_size=2,
    ),
)
mpos = st.builds(
    mpo_of,
    st.integers(0, 2**32 - 1),
    st.lists(st.integers(0, 2**32 - 1), max_size=3),
    st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 65535)), min_size=1, max_size=3),
)
tiffs = st.builds(tiff_of, st.sampled_from("<>"), directories)
sizes = st.tuples(st.integers(0, 65535), st.integers(0, 65535))
signed = st.tuples(st.integers(-70000, 70000), st.integers(-70000, 70000))
avis = st.builds(
    avi,
    sizes,
    st.lists(st.tuples(st.sampled_from([b"vids", b"auds"]), signed), max_size=3),
    st.lists(st.sampled_from([b"00dc", b"01db", b"00wb", b"rec ", b"JUNK", b"02dc"]), max_size=20),
)
movies = st.builds(
    movie,
    st.lists(
        st.builds(
            track,
            st.integers(0, 65535),
            st.integers(0, 65535),
            st.integers(0, 2**32 - 1),
            st.sampled_from([b"vide", b"soun", b"tmcd"]),
            st.integers(0, 3),
            st.one_of(st.none(), sizes),
        ),
        max_size=3,
    ),
    st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 2**32 - 1), max_size=3)), max_size=3),
)


def mutated(ext: str, data: bytes, at: int, new: bytes) -> tuple[str, bytes]:
    """`data` with `new` written over it somewhere past its first 16 bytes, made whole again."""
    at = 16 + at % max(len(data) - 16, 1)
    return ext, whole(ext, data[:at] + new + data[at + len(new) :])


# Files built right, then maybe changed here and there; and trees of boxes of any kind.
structured = st.one_of(
    st.builds(mutated, st.just(".heic"), heifs, st.integers(0, 2**20), st.binary(max_size=4)),
    st.builds(mutated, st.just(".tiff"), tiffs, st.integers(0, 2**20), st.binary(max_size=4)),
    st.builds(mutated, st.just(".jpg"), mpos, st.integers(0, 2**20), st.binary(max_size=4)),
    st.builds(lambda found: (".heic", tiled(FTYP + b"".join(found))), st.lists(boxes, max_size=3)),
    st.builds(mutated, st.just(".mp4"), movies, st.integers(0, 2**20), st.binary(max_size=4)),
    st.builds(mutated, st.just(".avi"), avis, st.integers(0, 2**20), st.binary(max_size=4)),
    st.builds(lambda found: (".mp4", tiled(MP4_FTYP + b"".join(found))), st.lists(boxes, max_size=3)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=structured)
def test_any_structure_of_boxes_directories_or_mp_entries_gives_frames_or_a_refusal(case: tuple[str, bytes]) -> None:
    ext, data = case
    with tempfile.TemporaryDirectory() as folder:
        try:
            frames = frames_of(Path(folder), ext, data)
        except BadHeaders:
            return
        if frames is None and ext in (".mp4", ".avi"):  # no video track
            return
        assert isinstance(frames, Frames)
        assert 1 <= frames.count <= MAX_FRAMES + 1
        assert frames.pixels <= frames.count * frames.width * frames.height


webms = st.builds(
    webm,
    st.lists(
        st.tuples(st.integers(0, 300), st.integers(0, 3), st.integers(0, 70000), st.integers(0, 70000)), max_size=3
    ),
    st.lists(st.lists(st.tuples(st.integers(0, 127), st.integers(1, 256), st.booleans()), max_size=4), max_size=3),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=webms, at=st.integers(0, 2**20), new=st.binary(max_size=4))
def test_any_webm_changed_anywhere_gives_frames_or_a_refusal(data: bytes, at: int, new: bytes) -> None:
    at = 16 + at % max(len(data) - 16, 1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.webm"
        path.write_bytes(data[:at] + new + data[at + len(new) :])
        try:
            frames = image_frames(path, ".webm")
        except BadHeaders:
            return
        if frames is not None:
            assert 1 <= frames.count <= MAX_FRAMES + 1
            assert frames.pixels <= frames.count * frames.width * frames.height


async def test_a_webp_frame_that_swallows_the_frames_after_it_is_refused(bridge: Client) -> None:
    """libwebp decodes the frames hidden inside a first frame whose length covers the rest of the file;
    counting that as one frame would let 60 frames of 2000x2000 through as 4 megapixels."""
    honest = webp((2000, 2000), [(0, 0, 2000, 2000)] * 60)
    first = honest.index(b"ANMF")
    swallowing = bytearray(honest)
    swallowing[first + 4 : first + 8] = struct.pack("<I", len(honest) - first - 8)
    status, body = await upload(bridge, {"file": ("anim.webp", bytes(swallowing))})
    assert (status, body) == (415, {"detail": "File 'anim.webp' is not a complete, well-formed image/webp file."})
    assert stored(bridge) == []


def metadata_track(fmt: bytes, samples: int, ident: int) -> bytes:
    """A timed-metadata track as cameras write them: handler `meta`, tkhd 0x0, a short sample entry."""
    return track(0, 0, samples, b"meta", ident=ident).replace(b"avc1", fmt)


def test_a_camera_metadata_track_of_an_unlisted_format_is_no_video(tmp_path: Path) -> None:
    """DJI drones write a `djmd` track, Sony XAVC S an `rtmd` one, GoPro HERO5-7 an `fdsc` (SOS) one, all
    with handler `meta`. Checked with PyAV 18 (ffmpeg): each is a `data` stream, not video (ffmpeg makes
    video of a known video format only, or of handler `vide`). The bridge takes them for video tracks
    that declare no size and refuses the whole (ordinary) clip as malformed."""
    for fmt in (b"djmd", b"rtmd", b"fdsc"):
        clip = movie([track(1920, 1080, 900, b"vide", ident=1), metadata_track(fmt, 900, 2)])
        try:
            counted = frames_of(tmp_path, ".mp4", clip)
        except BadHeaders as exc:
            counted = f"BadHeaders: {exc}"  # type: ignore[assignment]
        assert counted == Frames(900, 1920, 1080, 900 * (1920 * 1080), True), fmt


async def test_a_dji_clip_uploads(bridge: Client) -> None:
    """30 s of 1080p at 30 fps from a drone: 1,866 megapixels, under max_video_mp (2,000)."""
    clip = movie([track(1920, 1080, 900, b"vide", ident=1), metadata_track(b"djmd", 900, 2)])
    status, body = await upload(bridge, {"clip": ("DJI_0001.mp4", clip)}, client_id="drone")
    assert status == 200, body
    assert len(stored(bridge)) == 1


def split_in_two(samples: int) -> bytes:
    """A video track whose edit list plays its media in two pieces: the first half, then the second
    (as an editor keeps a clip cut in two, or trims without re-encoding). Timescales are 1 to 1."""
    whole = struct.pack(">IiI", samples, 0, 1 << 16) * 2
    halves = struct.pack(">IiI", samples // 2, 0, 1 << 16) + struct.pack(">IiI", samples // 2, samples // 2, 1 << 16)
    return track(1920, 1080, samples, b"vide", ident=1, edits=2).replace(whole, halves)


def test_an_edit_list_in_pieces_plays_each_sample_once(tmp_path: Path) -> None:
    """Checked with PyAV 18 on a real 30-frame MP4 given such an edit list: 30 frames decoded (60 for
    two edits that each play the whole media). ffmpeg (mov_fix_index) plays, for each edit, only the
    samples within that edit's range; the bridge multiplies all the samples by the edits."""
    assert frames_of(tmp_path, ".mp4", movie([split_in_two(900)])) == Frames(900, 1920, 1080, 900 * (1920 * 1080), True)


async def test_a_clip_cut_in_two_edits_uploads(bridge: Client) -> None:
    status, body = await upload(bridge, {"clip": ("cut.mov", movie([split_in_two(900)], brand=b"qt  "))})
    assert status == 200, body


async def test_a_fragmented_video_that_declares_no_size_is_refused(bridge: Client) -> None:
    """README: "Refused as malformed: ... a video track that declares no frame size" (decoded at its
    bitstream's size, which is not read). A fragmented MP4 (its samples in moof runs, none in moov's
    stsz) of 0x0 gets past: 10,000 frames counted at 0 pixels, stored with 200."""
    bomb = movie([track(0, 0, 0, b"vide", ident=1)], fragments=[(1, [10_000])])
    status, body = await upload(bridge, {"clip": ("frag.mp4", bomb)}, client_id="bomber")
    assert status == 415, (status, body)
    assert stored(bridge) == []


def test_a_vide_track_is_video_whatever_its_sample_format(tmp_path: Path) -> None:
    """Checked with PyAV 18: a real 30-frame MPEG-4 MP4 (mp4v + esds) whose sample entry is renamed
    mp4s, mp4a, tmcd or gpmd still decodes 30 frames (the handler `vide` makes it video, the esds gives
    the codec). The bridge skips any track whose formats are all in NOT_VIDEO, handler `vide` or not:
    no video found, so no limit at all. Before this change (handler `vide` counted) it was counted."""
    for fmt in (b"mp4s", b"mp4a", b"tmcd", b"gpmd"):
        clip = movie([track(1920, 1080, 900, b"vide", ident=1).replace(b"avc1", fmt)])
        assert frames_of(tmp_path, ".mp4", clip) == Frames(900, 1920, 1080, 900 * (1920 * 1080), True), fmt


async def test_a_video_bomb_named_mp4s_is_refused(bridge: Client) -> None:
    """10,000 frames of 1080p (20,736 megapixels) in a `vide` track whose sample entry says mp4s."""
    bomb = movie([track(1920, 1080, 10_000, b"vide", ident=1).replace(b"avc1", b"mp4s")])
    status, body = await upload(bridge, {"clip": ("bomb.mp4", bomb)}, client_id="bomber")
    assert status == 413, (status, body)
    assert stored(bridge) == []


# Real files from ffmpeg's own muxers (written and decoded with PyAV 18, which this virtualenv does
# not have: their bytes are kept in fixtures/video, 64x48 a frame, 3,072 pixels).
VIDEOS = FIXTURES / "video"
TIGHT_VIDEO_MP = 0.05  # 20 frames of 64x48 are 0.061 megapixels; 4 are 0.012


def test_an_edit_list_that_skips_a_long_preroll_plays_every_frame_after_it() -> None:
    """preroll_edit.mp4: mp4 muxer, default options, mpeg4, time base 1/1000; 21 frames at pts -8000,
    then 0, 40 ... 760 (a frame held 8 s before the cut: what a `-c copy` trim of a variable-rate
    clip keeps). Its edit list plays 0.8 s of 8.8 s of media; PyAV decodes 20 frames. The share of
    time (2 frames) was taken for the share of samples: a 1080p clip made so (one frame 3,000 s
    early, 2,000 after) counted 52 frames for 2,000 decoded (4,147 megapixels) and was stored. One
    edit plays each sample once at most: all 21 count."""
    path = VIDEOS / "preroll_edit.mp4"
    assert is_complete(path, ".mp4")
    assert image_frames(path, ".mp4") == Frames(21, 64, 48, 21 * 3072, True)


@pytest.mark.parametrize(("fixture", "fits"), [("preroll_edit.mp4", False), ("still_gap.avi", True)])
async def test_real_videos_against_a_tight_max_video_mp(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, fixture: str, fits: bool
) -> None:
    """20 frames (the trimmed MP4) are over 0.05 megapixels, 4 (the AVI with a held frame) under."""
    bridge = await make_bridge(await make_emulator(), max_video_mp=TIGHT_VIDEO_MP)
    status, body = await upload(bridge, {"clip": (fixture, (VIDEOS / fixture).read_bytes())})
    assert status == (200 if fits else 413), (status, body)
    if not fits:
        assert "(max_video_mp)" in body["detail"]
    assert len(stored(bridge)) == fits


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 7)), min_size=1, max_size=6),
    offsets=st.lists(st.tuples(st.integers(0, 12), st.integers(-20, 20)), max_size=6),
    samples=st.integers(0, 30),
    span=st.tuples(st.integers(-30, 120), st.integers(0, 60)),
)
def test_a_timeline_counts_the_samples_shown_within_a_span(
    steps: list[tuple[int, int]], offsets: list[tuple[int, int]], samples: int, span: tuple[int, int]
) -> None:
    """Against each sample's time worked out one by one, as ffmpeg's mov demuxer does: stts's steps
    from 0, plus ctts's offset. Tables that leave samples untimed (which ffmpeg's releases time
    differently) give no timeline: each edit then counts every sample."""
    each_step = [step for count, step in steps for _ in range(count)]
    each_offset = [offset for count, offset in offsets for _ in range(count)] if offsets else [0] * samples
    timeline = _timeline(samples, steps, offsets)
    if len(each_step) < samples or len(each_offset) < samples:
        assert timeline is None
        return
    times, time = [], 0
    for n in range(samples):
        times.append(time + each_offset[n])
        time += each_step[n]
    start, end = span[0], span[0] + span[1]
    assert timeline is not None
    assert timeline.within(start, end) == sum(1 for t in times if start <= t < end)


def test_an_avis_empty_chunks_are_no_frames() -> None:
    """still_gap.avi: avi muxer, default options, mpeg4 at 25 fps; 4 frames at pts 0, 1, 2, 62 (a still
    held 2.4 s). The muxer fills the gap with 59 empty 00dc chunks, listed in idx1; PyAV decodes 4
    frames. Each was counted: 63 frames, so a 10 fps screen recording written at 25 fps counted 2.5
    times what it decodes, and was refused."""
    path = VIDEOS / "still_gap.avi"
    assert is_complete(path, ".avi")
    assert image_frames(path, ".avi") == Frames(4, 64, 48, 4 * 3072, True)


def opendml() -> bytes:
    """opendml_8k_shrunk.avi.gz: avi muxer, default options, rawvideo 7680x4320 bgr24, 13 frames (a
    1.29 GB file). Past 1 GB the muxer ends the first RIFF (hdrl, INFO, a movi of 11 frames and an
    ix00, idx1) and goes on in a RIFF AVIX (a movi of 2 frames and an ix00), as OpenDML says. The
    chunks are kept as written, each frame cut to 2 bytes (the sizes recomputed); PyAV decodes 13
    frames from the original and demuxes 13 packets from this copy."""
    return gzip.decompress((VIDEOS / "opendml_8k_shrunk.avi.gz").read_bytes())


def test_an_opendml_avi_counts_the_frames_of_every_riff(tmp_path: Path) -> None:
    """It was not complete (the first RIFF is not the file's size), and the walk stopped at the
    first RIFF's end: 11 frames."""
    assert frames_of(tmp_path, ".avi", opendml()) == Frames(13, 7680, 4320, 13 * 7680 * 4320, True)
    bomb = opendml() + riff_chunk(b"RIFF", b"AVIX" + riff_list(b"movi", riff_chunk(b"00dc", b"xx") * 100))
    assert frames_of(tmp_path, ".avi", bomb) == Frames(113, 7680, 4320, 113 * 7680 * 4320, True)
    for tail in (riff_chunk(b"RIFF", b"WAVE" + riff_chunk(b"data", b"xx")), riff_chunk(b"JUNK", bytes(8))):
        path = tmp_path / "tailed.avi"
        path.write_bytes(opendml() + tail)
        assert not is_complete(path, ".avi")  # no AVIX: not an AVI's


async def test_an_avi_over_a_gigabyte_from_ffmpeg_uploads(bridge: Client) -> None:
    """13 frames of 8K are 431 megapixels, under max_video_mp (2,000)."""
    status, body = await upload(bridge, {"clip": ("camera.avi", opendml())})
    assert status == 200, (status, body)
    assert len(stored(bridge)) == 1
