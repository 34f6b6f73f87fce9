"""Video bombs that the frame count (max_video_mp, 2,000 megapixels) once let through: each got a
200, then ffmpeg decoded thousands of 1080p frames from it.

Each file below was written by this code and decoded with PyAV 18 (FFmpeg 8.1, ComfyUI's video
decoder): the counts in the docstrings are what `av.open(path).decode(video=0)` yields, every
frame 1920x1080. The frames are one real baseline JPEG (flat grey, 8 KB) that many samples,
chunks or index entries point at, so each file is a few KB to a few tens of KB. Each test's
docstring tells how the count went wrong before it was mended."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from comfybridge.store.media import image_frames

from .helpers import Client, stored, upload
from .test_media_limits import box, full_box, riff_chunk, riff_list

W, H = 1920, 1080


def grey_jpeg(width: int, height: int) -> bytes:
    """A baseline greyscale JPEG whose blocks are all flat: a 1-bit DC code (no change) and a 1-bit
    AC code (end of block) each, so 1080p is 8 KB. ffmpeg's mjpeg decoder decodes it at its size."""
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    dht = b"".join(b"\xff\xc4" + struct.pack(">H", 20) + bytes([kind, 1] + [0] * 15 + [0]) for kind in (0x00, 0x10))
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x00\x3f\x00"
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    return b"\xff\xd8" + dqt + sof + dht + sos + bytes((2 * blocks + 7) // 8) + b"\xff\xd9"


FRAME = grey_jpeg(W, H)


# ---- MP4 ----------------------------------------------------------------------------------------


def entries(kind: bytes, rows: Sequence[tuple[int, ...]], code: str) -> bytes:
    return full_box(kind, struct.pack(">I", len(rows)), *(struct.pack(code, *row) for row in rows))


def mp4(
    samples: int,
    stts: list[tuple[int, int]],
    ctts: list[tuple[int, int]] | None = None,
    edits: list[tuple[int, int]] | None = None,
    stsz_samples: int | None = None,
    trak_extra: bytes = b"",
    trak_outside_moov: bool = False,
    moov_extra: bytes = b"",
    after_moov: bytes | None = None,
    fmt: bytes = b"jpeg",
    handler: bytes = b"vide",
) -> bytes:
    """A QuickTime Photo-JPEG (`jpeg`) video track of `samples` samples, each its own chunk, all at
    the one JPEG in mdat. Movie and media are timed in ms (a sample 40 ms). `stsz_samples`: the
    count the sample table's stsz states (by default `samples`); `trak_extra`: boxes after mdia."""

    def build(data_at: int) -> tuple[bytes, bytes]:
        tkhd = full_box(
            b"tkhd",
            bytes(8),
            struct.pack(">I", 1),
            bytes(24),
            struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000),
            struct.pack(">II", W << 16, H << 16),
            flags=3,
        )
        entry = box(
            fmt,
            bytes(6),
            struct.pack(">H", 1),
            bytes(16),
            struct.pack(">HH", W, H),
            struct.pack(">IIIH", 0x480000, 0x480000, 0, 1),
            bytes(32),
            struct.pack(">hh", 24, -1),
        )
        table = [full_box(b"stsd", struct.pack(">I", 1), entry), entries(b"stts", stts, ">Ii")]
        if ctts is not None:
            table.append(entries(b"ctts", ctts, ">Ii"))
        count = samples if stsz_samples is None else stsz_samples
        table += [
            entries(b"stsc", [(1, 1, 1)], ">III"),
            full_box(b"stsz", struct.pack(">II", len(FRAME), count)),
            full_box(b"stco", struct.pack(">I", samples), struct.pack(">I", data_at) * samples),
        ]
        dinf = box(b"dinf", full_box(b"dref", struct.pack(">I", 1), full_box(b"url ", flags=1)))
        minf = box(b"minf", full_box(b"vmhd", bytes(8), flags=1), dinf, box(b"stbl", *table))
        mdhd = full_box(b"mdhd", struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">HH", 0x55C4, 0))
        hdlr = full_box(b"hdlr", bytes(4), handler, bytes(12), b"VideoHandler\x00")
        parts = [tkhd]
        if edits:
            elst = full_box(b"elst", struct.pack(">I", len(edits)), *(struct.pack(">IiI", *e, 1 << 16) for e in edits))
            parts.append(box(b"edts", elst))
        trak = box(b"trak", *parts, box(b"mdia", mdhd, hdlr, minf), trak_extra)
        mvhd = full_box(
            b"mvhd",
            struct.pack(">IIII", 0, 0, 1000, 0),
            struct.pack(">IH", 0x10000, 0x100),
            bytes(10),
            struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000),
            bytes(24),
            struct.pack(">I", 2),
        )
        if trak_outside_moov:
            return trak, box(b"moov", mvhd, moov_extra)
        return b"", box(b"moov", mvhd, trak, moov_extra)

    ftyp = box(b"ftyp", b"isom", struct.pack(">I", 512), b"isomiso2mp41")
    before, moov = build(0)
    before, moov = build(len(ftyp) + len(before) + len(moov) + 8)
    if after_moov is not None:
        return ftyp + before + moov + after_moov
    return ftyp + before + moov + box(b"mdat", FRAME)


def test_the_grey_jpeg_mp4_counts_as_it_decodes(tmp_path: Path) -> None:
    """Control: PyAV 18 decodes 300 frames of 1920x1080 from this, and the bridge counts 300."""
    path = tmp_path / "plain.mp4"
    path.write_bytes(mp4(300, [(300, 40)]))
    frames = image_frames(path, ".mp4")
    assert frames is not None
    assert (frames.count, frames.width, frames.height) == (300, W, H)


async def test_an_empty_edit_after_a_played_one_plays_the_media_again(bridge: Client) -> None:
    """ffmpeg (mov_fix_index) takes media time -1 as an empty edit only before the first edit that
    plays: after it, an edit of media time -1 plays the samples shown in [-1, -1 + duration) like
    any other. One sample, an edit that shows it, then 2,000 edits of media time -1: PyAV decodes
    2,001 frames of 1080p (4,149 megapixels). The bridge drops every -1 edit, counts 1 frame (one
    edit plays each sample once) and stores it."""
    bomb = mp4(1, [(1, 40)], edits=[(40, 0)] + [(40, -1)] * 2000)
    status, body = await upload(bridge, {"clip": ("replayed.mp4", bomb)}, client_id="bomber")
    assert status == 413, (status, body)
    assert stored(bridge) == []


async def test_samples_stts_does_not_time_are_shown_at_once(bridge: Client) -> None:
    """FFmpeg 8 expands stts (and ctts) to one duration per sample (mov_merge_tts_data): a sample
    no stts entry covers gets duration 0, and an entry of count 0 times no sample. So with stts
    [(0, 40)] all 1,000 samples are at time 0 and each of 10 edits of one frame's time (40 ms from
    0) shows all of them: PyAV decodes 10,000 frames of 1080p (20,736 megapixels). The bridge lets
    the last step (40) go on, puts the samples at 0, 40, 80..., finds one in each edit: 10 frames,
    stored. Alike: stts [(1, 40)] with a ctts over all samples (PyAV 2,990 frames from 300 samples
    and 10 edits of 40 ms at 40; counted 10), and stts [(1, 40), (0, 1000000)] (the bridge steps
    by the empty entry's 1,000,000; PyAV by 40: 3,000 frames, counted 20)."""
    bombs = {
        "zero.mp4": mp4(1000, [(0, 40)], edits=[(40, 0)] * 10),
        "ctts.mp4": mp4(300, [(1, 40)], ctts=[(300, 0)], edits=[(40, 40)] * 10),
        "empty_last.mp4": mp4(300, [(1, 40), (0, 1_000_000)], edits=[(12_000, 0)] * 10),
    }
    for name, bomb in bombs.items():
        status, body = await upload(bridge, {"clip": (name, bomb)}, client_id="bomber")
        assert status == 413, (name, status, body)
    assert stored(bridge) == []


async def test_a_sample_count_outside_the_sample_table_is_read_by_ffmpeg(bridge: Client) -> None:
    """ffmpeg parses a track's boxes by type wherever they are in it (mov_read_default's one table):
    an stsz after mdia, in the trak itself, sets the sample count. The stbl's stsz says 10, the
    trak's says 2,000 (the stco lists 2,000 chunks): PyAV decodes 2,000 frames of 1080p (4,147
    megapixels); the bridge reads stsz only in stbl, counts 10 and stores it."""
    bomb = mp4(2000, [(2000, 40)], stsz_samples=10, trak_extra=full_box(b"stsz", struct.pack(">II", len(FRAME), 2000)))
    status, body = await upload(bridge, {"clip": ("stsz.mp4", bomb)}, client_id="bomber")
    assert status == 413, (status, body)
    assert stored(bridge) == []


async def test_a_track_before_the_movie_box_is_decoded(bridge: Client) -> None:
    """A trak at the top level, before a moov that holds only mvhd: ffmpeg parses it (its parse
    table is the same at every level) and decodes its 2,000 frames of 1080p. The bridge reads
    traks only inside moov, finds no video, counts nothing and stores it."""
    bomb = mp4(2000, [(2000, 40)], trak_outside_moov=True)
    status, body = await upload(bridge, {"clip": ("toptrak.mp4", bomb)}, client_id="bomber")
    assert status == 413, (status, body)
    assert stored(bridge) == []


async def test_a_track_of_an_avi_fourcc_is_video_whatever_its_handler(bridge: Client) -> None:
    """ffmpeg's mov demuxer (mov_codec_id) looks a sample format up in its QuickTime video tags and
    then in its AVI (BMP) fourcc tags: MJPG, mjpg, AVI1 (also H264, XVID, DIVX...) are video in a
    track of any handler but sound. 2,000 samples of 1080p in a `meta` (or `pict`, or `abcd`) track
    of format MJPG: PyAV decodes 2,000 frames of 1920x1080 (4,147 megapixels). The bridge takes a
    track that is not `vide` for video only if its format is in VIDEO_FORMATS, finds no video and
    stores it."""
    for handler in (b"meta", b"pict"):
        bomb = mp4(2000, [(2000, 40)], fmt=b"MJPG", handler=handler)
        status, body = await upload(bridge, {"clip": ("mjpg.mp4", bomb)}, client_id="bomber")
        assert status == 413, (handler, status, body)
    assert stored(bridge) == []


def fragmented(runs: int, runs_in_traf: bool) -> bytes:
    """A fragmented MP4 (moov: the track, no samples; mvex: each sample 40 ms of the JPEG's size) of
    one fragment: `runs` runs (trun) of one sample each, all at the one JPEG in the mdat after the
    moof, in its traf or, if not `runs_in_traf`, beside it in the moof."""
    trex = full_box(b"trex", struct.pack(">IIIII", 1, 1, 40, len(FRAME), 0))
    tfhd = full_box(b"tfhd", struct.pack(">I", 1), flags=0x020000)  # offsets from the moof's start

    def moof(data_offset: int) -> bytes:
        trun = full_box(b"trun", struct.pack(">Ii", 1, data_offset), flags=0x000001) * runs
        mfhd = full_box(b"mfhd", struct.pack(">I", 1))
        if runs_in_traf:
            return box(b"moof", mfhd, box(b"traf", tfhd, trun))
        return box(b"moof", mfhd, box(b"traf", tfhd), trun)

    size = len(moof(0))
    return mp4(0, [], moov_extra=box(b"mvex", trex), after_moov=moof(size + 8) + box(b"mdat", FRAME))


async def test_runs_beside_a_track_fragment_are_decoded(bridge: Client) -> None:
    """ffmpeg reads a trun wherever it is in a moof (the one parse table), for the track the last
    tfhd named. A fragment whose 2,000 one-sample runs follow its traf: PyAV decodes 2,000 frames
    of 1080p; the bridge counts runs only inside traf, finds no frame and stores it. The same runs
    inside the traf are counted (control)."""
    status, body = await upload(bridge, {"clip": ("counted.mp4", fragmented(2000, True))}, client_id="bomber")
    assert status == 413, (status, body)
    status, body = await upload(bridge, {"clip": ("beside.mp4", fragmented(2000, False))}, client_id="bomber")
    assert status == 413, (status, body)
    assert stored(bridge) == []


# ---- AVI ----------------------------------------------------------------------------------------


def avi(movi: list[bytes], idx1: bytes | None = None, strl_extra: bytes = b"", before: bytes = b"") -> bytes:
    """An MJPEG AVI of 1080p: `before`, then avih, one video stream (strh, strf, `strl_extra`),
    these movi chunks."""
    avih = riff_chunk(b"avih", struct.pack("<10I", 40000, 0, 0, 0x10, 1, 0, 1, 0, W, H), bytes(16))
    rates = struct.pack("<IHHIIIIIIII", 0, 0, 0, 0, 1, 25, 0, 1, 0, 0xFFFFFFFF, 0)  # 25 fps
    strh = riff_chunk(b"strh", b"vidsMJPG", rates, struct.pack("<4h", 0, 0, W, H))
    strf = riff_chunk(b"strf", struct.pack("<IiiHH4sIiiII", 40, W, H, 1, 24, b"MJPG", W * H * 3, 0, 0, 0, 0))
    hdrl = riff_list(b"hdrl", avih, riff_list(b"strl", strh, strf, strl_extra))
    body = b"AVI " + before + hdrl + riff_list(b"movi", *movi)
    if idx1 is not None:
        body += riff_chunk(b"idx1", idx1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


CHUNK = riff_chunk(b"00dc", FRAME)


def alternating(entry: bytes, other: bytes, rounds: int) -> bytes:
    """Index entries A, A, then B, A rounds times: a repeated entry makes ffmpeg read the file
    through its index (non-interleaved), and each entry that differs from the last is a packet."""
    return entry * 2 + (other + entry) * rounds


async def test_idx1_entries_ffmpeg_takes_for_the_video_stream_are_frames(bridge: Client) -> None:
    """ffmpeg's idx1 reader (avi_read_idx1) makes an entry the stream (tag[0] - '0') * 10 +
    (tag[1] - '0'), digits or not, and skips only `pc` entries; reading through the index it seeks
    to the entry's offset and decodes the chunk there. So 00ix, 00wc, /:dc (-10 + 10) or 1&dc
    (10 - 10) entries over the two 00dc chunks are frames of stream 0: PyAV decodes 2,201 frames of
    1080p (4,564 megapixels) from each. The bridge counts only entries whose tag starts with the
    stream's two digits and is not ix, wc or pc: 2 frames, stored."""
    for tag in (b"00ix", b"00wc", b"/:dc", b"1&dc"):
        a, b = (struct.pack("<4sIII", tag, 0x10, at, len(FRAME)) for at in (4, 4 + len(CHUNK)))
        bomb = avi([CHUNK, CHUNK], idx1=alternating(a, b, 1100))
        status, body = await upload(bridge, {"clip": ("idx1.avi", bomb)}, client_id="bomber")
        assert status == 413, (tag, status, body)
    assert stored(bridge) == []


async def test_a_stream_header_in_an_info_list_is_no_stream(bridge: Client) -> None:
    """ffmpeg's AVI header reader takes a LIST INFO (or ncdt) as metadata (ff_read_riff_info) and
    reads no stream header in it; the bridge reads strh in any list before movi. An INFO list that
    holds an `auds` strh, before hdrl: to ffmpeg the video stream is 00 and the 00dc chunks (read
    through an idx1 of 2,202 entries over two of them) are 2,201 frames of 1080p (4,564
    megapixels), as PyAV decodes. The bridge numbers the INFO's strh 00, the video 01, counts no
    frame (00 is sound to it) and stores it."""
    a, b = (struct.pack("<4sIII", b"00dc", 0x10, at, len(FRAME)) for at in (4, 4 + len(CHUNK)))
    for form in (b"INFO", b"ncdt"):
        hidden = riff_list(form, riff_chunk(b"strh", b"auds", bytes(52)))
        bomb = avi([CHUNK, CHUNK], idx1=alternating(a, b, 1100), before=hidden)
        status, body = await upload(bridge, {"clip": ("info.avi", bomb)}, client_id="bomber")
        assert status == 413, (form, status, body)
    assert stored(bridge) == []


async def test_an_opendml_index_names_frames(bridge: Client) -> None:
    """An OpenDML AVI indexes its frames in ix00 chunks that the stream's indx (in its strl) lists;
    ffmpeg reads them (read_odml_index) instead of idx1, one packet an entry. An indx listing an
    ix00 (in movi, where the bridge passes over ix chunks) of 2,202 entries over the two 00dc
    chunks: PyAV decodes 2,201 frames of 1080p. The bridge reads neither indx nor ix00: 2 frames,
    stored."""
    rounds = 1100

    def build(ix_at: int, a: int, b: int) -> bytes:
        count = 2 * rounds + 2
        superindex = struct.pack("<HBBI4sIII", 4, 0, 0, 1, b"00dc", 0, 0, 0) + struct.pack("<QII", ix_at, 0, count)
        first, other = (struct.pack("<II", at, len(FRAME)) for at in (a, b))
        standard = struct.pack("<HBBI4sQI", 2, 0, 1, count, b"00dc", 0, 0) + alternating(first, other, rounds)
        return avi([CHUNK, CHUNK, riff_chunk(b"ix00", standard)], strl_extra=riff_chunk(b"indx", superindex))

    draft = build(0, 0, 0)
    first = draft.index(b"movi") + 4  # the first 00dc chunk
    ix_at = first + 2 * len(CHUNK)
    bomb = build(ix_at, first + 8, first + len(CHUNK) + 8)  # entries give where each chunk's data starts
    assert bomb[ix_at : ix_at + 4] == b"ix00"
    status, body = await upload(bridge, {"clip": ("odml.avi", bomb)}, client_id="bomber")
    assert status == 413, (status, body)
    assert stored(bridge) == []


# One PAL DV frame (720x576, 144,000 bytes) of black, as ffmpeg's dvvideo encoder (PyAV 18) writes it.
DV_FRAME = zlib.decompress(
    base64.b64decode(
        "eNqt2rfSrclVx+FzRtJ8wh4Jo8YPSEDjnYCFcINfCOHNNB4JtxASHk0PXtgORaS+hL6EDkm5DC4BpyoFVB0CvoAqAiZ4dvK+"
        "e9euX9VK/tHz0sOTf/r4a6+99hx9Xn548pF//Z/Xj/zb4/PfH5//8fj8z8fnx15X7yntvfLw5L3Pn//L8/e9/M//9Xru+f/+"
        "/MrDU9x7gfZefXjyXH4++vDk2T+++L9/ef3fnrzt/7599OEp7r2Ae2/AvTfi3ptw70Xce8C9N+PeJ+DeJ+LeJ+HeJ+Pep+De"
        "p9Leqw9P8f49w/e+BffeinufhnufjnufgXufiXtvw72Ge5+Fe5+Ne5+De5+Le5+He5+P9+8FvH9fgO99Cfe+EPe+CPfejnvv"
        "wL0vxr0vwb0vxb2Oe1+Ge1+Oe1+Be1+Je1+F9+8NeP++Gt/7Nbj3tbj3dbj39bj3Dbj3Ttz7Rtz7Jtz7ZtwL3PsW3HsX7n0r"
        "7n0b3r834v37dnzvd+Ded+Ley7j3Xbj33bj3Pbj3vbj3fbj3/bj3A7iXuPeDuPdu3PshvH9vwvv3HnzvD+Pej+Dej+Lej+He"
        "j+PeT+DeT+LeT+HeT+Pez+DeK7g3cO9nce/n8P69iPfv5/G9v4B7v4h7v4R7v4x7v4J778W99+Her+Ler+Her+Peb+Deb+Je"
        "4d5v4f17wPv3fnzvb+PeB3Dvg7j3O7j3u7j3e7j3+7j3B7j3h7j3R7j3x7j3Idx7Ffcm3r834/17Dd/7J7j3p7j3Z7j357j3"
        "F7j3l7j3V7j3Ydz7a9z7G9z7W9z7O9z7e9z7B9p7qWHf3rBvb9i3N+zbG/btDfv2hn17w769Yd/esG9v2Lc37Nsb9u0N+/aG"
        "fXvDvr1h396wb2/Ytzfs2xv27Q379oZ9e8O+vWHf3rBvb9i3N+zbG/btDfv2hn17w769Yd/esG9v2Lc37Nsb9u0N+/aGfXvD"
        "vr1h396wb2/Ytzfs2xv27Q379oZ9e8O+vWHf3rBvb9i3N+zbG/btDfv2hn17w769Yd/esG9v2Lc37Nsb9u0N+/aGfXvDvr1h"
        "396wb2/Ytzfs2xv27Q379oZ9e8O+vWHf3rBvb9i3N+zbG/btDfv2hn17w769Yd/esG9v2Lc37Nsb9u0N+/aGfXvDvr1h396w"
        "b2/Ytzfs2xv27Q379oZ9e8O+vWHf3rBvb9i3N+zbG/btDfv2hn17w769Yd/esG9v2Lc37Nsb9u0N+/aGfXvDvr1h396wb2/Y"
        "tzfs2xv27Q379oZ9e8O+vWHf3rBvb9i3N+zbG/btDfv2hn17w769Yd/esG9v2Lc37Nsb9u0N+/aGfXvDvr1h396wb2/Ytzfs"
        "2xv27Q379oZ9e8O+vWHf3rBvb9i3N+zbG/btDfv2jn17x769Y9/esW/v2Ld37Ns79u0d+/aOfXvHvr1j396xb+/Yt3fs2zv2"
        "7R379o59e8e+vWPf3rFv79i3d+zbO/btHfv2jn17x769Y9/esW/v2Ld37Ns79u0d+/aOfXvHvr1j396xb+/Yt3fs2zv27R37"
        "9o59e8e+vWPf3rFv79i3d+zbO/btHfv2jn17x769Y9/esW/v2Ld37Ns79u0d+/aOfXvHvr1j396xb+/Yt3fs2zv27R379o59"
        "e8e+vWPf3rFv79i3d+zbO/btHfv2jn17x769Y9/esW/v2Ld37Ns79u0d+/aOfXvHvr1j396xb+/Yt3fs2zv27R379o59e8e+"
        "vWPf3rFv79i3d+zbO/btHfv2jn17x769Y9/esW/v2Ld37Ns79u0d+/aOfXvHvr1j396xb+/Yt3fs2zv27R379o59e8e+vWPf"
        "3rFv79i3d+zbO/btHfv2jn17x769Y9/esW/v2Ld37Ns79u0d+/aOfXvHvr1j396xb+/Yt3fs2zv27R379o59e8e+vWPf3rFv"
        "79i3d+zbO/btHfv2jn17x769Y9/esW/v2Ld37NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s"
        "2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+"
        "PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zb"
        "A/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49"
        "sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD"
        "+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2wbw/s2wP79sC+PbBvD+zbA/v2wL49sG8P7NsD+/bAvj2w"
        "bw/s2wP79sC+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP7"
        "9sS+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFv"
        "T+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2"
        "xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P"
        "7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsT+/bE"
        "vj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsT+/bEvj2xb0/s2xP79sS+PbFvT+zbE/v2xL49sW9P7NsH9u0D+/aBffvA"
        "vn1g3z6wbx/Ytw/s2wf27QP79oF9+8C+fWDfPrBvH9i3D+zbB/btA/v2gX37wL59YN8+sG8f2LcP7NsH9u0D+/aBffvAvn1g"
        "3z6wbx/Ytw/s2wf27QP79oF9+8C+fWDfPrBvH9i3D+zbB/btA/v2gX37wL59YN8+sG8f2LcP7NsH9u0D+/aBffvAvn1g3z6w"
        "bx/Ytw/s2wf27QP79oF9+8C+fWDfPrBvH9i3D+zbB/btA/v2gX37wL59YN8+sG8f2LcP7NsH9u0D+/aBffvAvn1g3z6wbx/Y"
        "tw/s2wf27QP79oF9+8C+fWDfPrBvH9i3D+zbB/btA/v2gX37wL59YN8+sG8f2LcP7NsH9u0D+/aBffvAvn1g3z6wbx/Ytw/s"
        "2wf27QP79oF9+8C+fWDfPrBvH9i3D+zbB/btA/v2gX37wL59YN8+sG8f2LcP7NsH9u0D+/aBffvAvn1g3z6wbx/Ytw/s2wf2"
        "7QP79oF9+8C+fWDfPrBvH9i3D+zbB/btA/v2gX37wL59YN8+sG8f2LcP7NsH9u0D+/aBffvAvn1g3z6wby/s2+vJs0eP/uzR"
        "oz979OjPHj36s0eP/ux1+fZ6SnuvFPbthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth"
        "317Ytxf27YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf2"
        "7YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2Hf"
        "Xti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bt"
        "hX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd9e"
        "2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd9e2LcX9u2FfXth317Ytxf27YV9e2HfXti3F/bthX17Yd8+sW+f2LdP"
        "7Nsn9u0T+/aJffvEvn1i3z6xb5/Yt0/s2yf27RP79ol9+8S+fWLfPrFvn9i3T+zbJ/btE/v2iX37xL59Yt8+sW+f2LdP7Nsn"
        "9u0T+/aJffvEvn1i3z6xb5/Yt0/s2yf27RP79ol9+8S+fWLfPrFvn9i3T+zbJ/btE/v2iX37xL59Yt8+sW+f2LdP7Nsn9u0T"
        "+/aJffvEvn1i3z6xb5/Yt0/s2yf27RP79ol9+8S+fWLfPrFvn9i3T+zbJ/btE/v2iX37xL59Yt8+sW+f2LdP7Nsn9u0T+/aJ"
        "ffvEvn1i3z6xb5/Yt0/s2yf27RP79ol9+8S+fWLfPrFvn9i3T+zbJ/btE/v2iX37xL59Yt8+sW+f2LdP7Nsn9u0T+/aJffvE"
        "vn1i3z6xb5/Yt0/s2yf27RP79ol9+8S+fWLfPrFvn9i3T+zbJ/btE/v2iX37xL59Yt8+sW+f2LdP7Nsn9u0T+/aJffvEvn1i"
        "3z6xb5/Yt0/s2yf27RP79ol9+8S+fWLfPrFvn9i3T+zbJ/btE/v2iX37xL59Yt8+sW+f2LdP7Nsn9u0T+/aJffvCvn1h376w"
        "b1/Yty/s2xf27Qv79oV9+8K+fWHfvrBvX9i3L+zbF/btC/v2hX37wr59Yd++sG9f2Lcv7NsX9u0L+/aFffvCvn1h376wb1/Y"
        "ty/s2xf27Qv79oV9+8K+fWHfvrBvX9i3L+zbF/btC/v2hX37wr59Yd++sG9f2Lcv7NsX9u0L+/aFffvCvn1h376wb1/Yty/s"
        "2xf27Qv79oV9+8K+fWHfvrBvX9i3L+zbF/btC/v2hX37wr59Yd++sG9f2Lcv7NsX9u0L+/aFffvCvn1h376wb1/Yty/s2xf2"
        "7Qv79oV9+8K+fWHfvrBvX9i3L+zbF/btC/v2hX37wr59Yd++sG9f2Lcv7NsX9u0L+/aFffvCvn1h376wb1/Yty/s2xf27Qv7"
        "9oV9+8K+fWHfvrBvX9i3L+zbF/btC/v2hX37wr59Yd++sG9f2Lcv7NsX9u0L+/aFffvCvn1h376wb1/Yty/s2xf27Qv79oV9"
        "+8K+fWHfvrBvX9i3L+zbF/btC/v2hX37wr59Yd++sG9f2Lcv7NsX9u0L+/aFffvCvn1h376wb1/Yty/s2xf27Rv79o19+8a+"
        "fWPfvrFv39i3b+zbN/btG/v2jX37xr59Y9++sW/f2Ldv7Ns39u0b+/aNffvGvn1j376xb9/Yt2/s2zf27Rv79o19+8a+fWPf"
        "vrFv39i3b+zbN/btG/v2jX37xr59Y9++sW/f2Ldv7Ns39u0b+/aNffvGvn1j376xb9/Yt2/s2zf27Rv79o19+8a+fWPfvrFv"
        "39i3b+zbN/btG/v2jX37xr59Y9++sW/f2Ldv7Ns39u0b+/aNffvGvn1j376xb9/Yt2/s2zf27Rv79o19+8a+fWPfvrFv39i3"
        "b+zbN/btG/v2jX37xr59Y9++sW/f2Ldv7Ns39u0b+/aNffvGvn1j376xb9/Yt2/s2zf27Rv79o19+8a+fWPfvrFv39i3b+zb"
        "N/btG/v2jX37xr59Y9++sW/f2Ldv7Ns39u0b+/aNffvGvn1j376xb9/Yt2/s2zf27Rv79o19+8a+fWPfvrFv39i3b+zbN/bt"
        "G/v2jX37xr59Y9++sW/f2Ldv7Ns39u0b+/aNffvGvn1j376xb9/Yt2/s2zf27Rv79o19+8a+fWPfvrFv39i3H+zbD/btB/v2"
        "g337wb79YN9+sG8/2Lcf7NsP9u0H+/aDffvBvv1g336wbz/Ytx/s2w/27Qf79oN9+8G+/WDffrBvP9i3H+zbD/btB/v2g337"
        "wb79YN9+sG8/2Lcf7NsP9u0H+/aDffvBvv1g336wbz/Ytx/s2w/27Qf79oN9+8G+/WDffrBvP9i3H+zbD/btB/v2g337wb79"
        "YN9+sG8/2Lcf7NsP9u0H+/aDffvBvv1g336wbz/Ytx/s2w/27Qf79oN9+8G+/WDffrBvP9i3H+zbD/btB/v2g337wb79YN9+"
        "sG8/2Lcf7NsP9u0H+/aDffvBvv1g336wbz/Ytx/s2w/27Qf79oN9+8G+/WDffrBvP9i3H+zbD/btB/v2g337wb79YN9+sG8/"
        "2Lcf7NsP9u0H+/aDffvBvv1g336wbz/Ytx/s2w/27Qf79oN9+8G+/WDffrBvP9i3H+zbD/btB/v2g337wb79YN9+sG8/2Lcf"
        "7NsP9u0H+/aDffvBvv1g336wbz/Ytx/s2w/27Qf79oN9+8G+/WDffrBvP9i3H+zbD/btB/v2g337wb79YN9+sW+/2Ldf7Nsv"
        "9u0X+/aLffvFvv1i336xb7/Yt1/s2y/27Rf79ot9+8W+/WLffrFvv9i3X+zbL/btF/v2i337xb79Yt9+sW+/2Ldf7Nsv9u0X"
        "+/aLffvFvv1i336xb7/Yt1/s2y/27Rf79ot9+8W+/WLffrFvv9i3X+zbL/btF/v2i337xb79Yt9+sW+/2Ldf7Nsv9u0X+/aL"
        "ffvFvv1i336xb7/Yt1/s2y/27Rf79ot9+8W+/WLffrFvv9i3X+zbL/btF/v2i337xb79Yt9+sW+/2Ldf7Nsv9u0X+/aLffvF"
        "vv1i336xb7/Yt1/s2y/27Rf79ot9+8W+/WLffrFvv9i3X+zbL/btF/v2i337xb79Yt9+sW+/2Ldf7Nsv9u0X+/aLffvFvv1i"
        "336xb7/Yt1/s2y/27Rf79ot9+8W+/WLffrFvv9i3X+zbL/btF/v2i337xb79Yt9+sW+/2Ldf7Nsv9u0X+/aLffvFvv1i336x"
        "b7/Yt1/s2y/27Rf79ot9+8W+/WLffrFvv9i3X+zbL/btF/v2i337xb79Yt9+sW+/2Ldf7Nsv9u0X+/Zrfft/A+8g1vk="
    )
)


def test_a_dv_type1_avi_is_video(tmp_path: Path) -> None:
    """A type-1 DV AVI (the camcorder's: one `iavs` stream, handler dvsd, its chunks whole DV
    frames) is video to ffmpeg (the DV demuxer inside avidec): PyAV decodes 3 frames of 720x576
    from this. The bridge takes only `vids` streams for video, finds none and counts nothing
    (None: no limit at all), so a DV AVI of any length is stored: ten minutes of one (2.1 GB,
    15,000 frames, 6,221 megapixels: 24 GB of float32) would pass max_video_mp."""
    avih = riff_chunk(b"avih", struct.pack("<10I", 40000, 0, 0, 0x10, 3, 0, 1, 0, 720, 576), bytes(16))
    rates = struct.pack("<IHHIIIIIIII", 0, 0, 0, 0, 1, 25, 0, 3, 0, 0xFFFFFFFF, 0)
    strh = riff_chunk(b"strh", b"iavsdvsd", rates, struct.pack("<4h", 0, 0, 720, 576))
    body = b"AVI " + riff_list(b"hdrl", avih, riff_list(b"strl", strh, riff_chunk(b"strf", bytes(32))))
    body += riff_list(b"movi", *[riff_chunk(b"00dc", DV_FRAME)] * 3)
    path = tmp_path / "camcorder.avi"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    frames = image_frames(path, ".avi")
    assert frames is not None, "a DV AVI counted as no video"
    assert (frames.count, frames.width, frames.height) == (3, 720, 576)
