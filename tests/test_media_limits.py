"""POST /upload refuses images whose headers promise more pixels than a GPU server should decode."""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfybridge.config import ConfigError, load_settings
from comfybridge.media import MAX_FRAMES, BadHeaders, Frames, image_frames, is_complete

from .conftest import BridgeFactory, EmulatorFactory
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


def riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) & 1)


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


FULL = (0, 0, 1024, 1024)
TOTAL = "(10486 megapixels in all), over the limit of 200 megapixels (max_total_mp)."
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
GOOD = {
    "a.gif": gif((32, 32), SHORT),
    "a.png": apng(32, 32, 3),
    "a.webp": webp((32, 32), SHORT),
    "b.bmp": bmp(16, -16),
    "b.webp": riff(riff_chunk(b"VP8L", vp8l(32, 32))),
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


@pytest.mark.parametrize("name", ["max_frame_mp", "max_total_mp"])
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
# Files whose ends look right (so the whole-file check passes) but whose headers are cut off, lie
# about lengths or hold no image: refused as malformed, never a 500.
BROKEN = {
    "PNG chunk longer than the file": ("x.png", apng(8, 8, 1)[:33] + b"\x7f\xff\xff\xffIDAT" + IEND),
    "PNG IHDR too short for a size": ("x.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"\x00\x00") + IEND),
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
}
MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp"}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_headers_are_refused_as_malformed(bridge: Client, case: str) -> None:
    filename, data = BROKEN[case]
    status, body = await upload(bridge, {"file": (filename, data)})
    mime = MIME[Path(filename).suffix]
    assert (status, body) == (415, {"detail": f"File {filename!r} is not a complete, well-formed {mime} file."})
    assert stored(bridge) == []


TAILS = {".png": IEND, ".gif": b";", ".jpg": EOI, ".webp": b"", ".bmp": b""}


def whole(ext: str, head: bytes) -> bytes:
    """`head` made to pass the whole-file check, so the headers inside are what is judged."""
    data = head + TAILS[ext]
    if ext == ".webp":
        return b"RIFF" + struct.pack("<I", max(len(data), 12) - 8) + data[8:]
    if ext == ".bmp":
        return data[:2] + struct.pack("<I", max(len(data), 6)) + data[6:]
    return data


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
        assert isinstance(frames, Frames)
        assert 1 <= frames.count <= MAX_FRAMES + 1
        assert frames.pixels <= frames.count * frames.width * frames.height
