"""POST /upload: names, limits, media checks, all-or-nothing, and expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import aiohttp
import pytest

from comfybridge.core import scheduler as scheduler_module
from comfybridge.edge.appkeys import JOURNAL, SCHEDULER, SETTINGS
from comfybridge.errors import StorageFull
from comfybridge.store import uploads as uploads_module
from comfybridge.store.uploads import IncomingFile, UploadLimits, UploadStore

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import (
    FLAC,
    JPEG,
    MP4,
    OGG,
    WAV,
    Client,
    generate,
    png,
    read_results,
    run_job,
    stored,
    upload,
    without_job_id,
)

NAME = r"[0-9a-f]{12}-{}"


async def test_each_part_gets_a_unique_safe_name(bridge: Client) -> None:
    files = {
        "identifier_1": ("photo.png", png()),
        "identifier_2": ("../../etc/passwd.PNG", png()),
        "": ("no-extension", png()),
    }
    status, names = await upload(bridge, files, client_id="names")
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{12}-photo\.png", names["identifier_1"])
    assert re.fullmatch(r"[0-9a-f]{12}-passwd\.png", names["identifier_2"])
    assert re.fullmatch(r"[0-9a-f]{12}-no-extension\.png", names["file"])
    assert len(set(names.values())) == 3
    assert all(p.parent.parent == bridge.app[SETTINGS].data_dir / "uploads" for p in stored(bridge))


async def raw_upload(client: Client, disposition: str, data: bytes) -> tuple[int, dict[str, str]]:
    writer = aiohttp.MultipartWriter("form-data")
    part = writer.append(data)
    part.headers["Content-Disposition"] = disposition
    resp = await client.post("/upload", data=writer)
    return resp.status, await resp.json()


async def test_encoded_filenames_are_decoded(bridge: Client) -> None:
    status, body = await raw_upload(
        bridge, "form-data; name=\"pic\"; filename*=UTF-8''%EC%82%AC%EC%A7%84%20cat.png", png()
    )
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{12}-___cat\.png", body["pic"])
    status, body = await raw_upload(bridge, 'form-data; name="odd"; filename="we%20ird%2F..%2Fna..me.jpg"', JPEG)
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{12}-na_me\.jpg", body["odd"])


async def test_content_decides_the_media_type(bridge: Client) -> None:
    status, body = await upload(bridge, {"file": ("notes.png", b"just some text, not an image at all....")})
    assert status == 415
    assert body == {"detail": "File 'notes.png' is not a recognised media file (allowed: image, video, audio)."}
    for data, ext in ((WAV, "wav"), (MP4, "mp4"), (OGG, "ogg"), (FLAC, "flac")):
        status, body = await upload(bridge, {"file": ("clip.bin", data)})
        assert status == 200
        assert body["file"].endswith(f"-clip.{ext}")  # the content names the extension


async def test_media_kinds_are_configurable(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), allowed_media=("image",))
    status, body = await upload(client, {"file": ("a.wav", WAV)})
    assert status == 415
    assert body["detail"] == "File 'a.wav' is audio/wav, which is not allowed (allowed: image)."


async def test_size_limits_are_413(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), max_upload_mb=0.01, max_request_mb=0.015)
    status, body = await upload(client, {"file": ("big.png", png() + b"\0" * 20000)})
    assert (status, body) == (413, {"detail": "File 'big.png' is larger than the limit of 0.01 MB."})
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\0" * 6000  # a scan header, then its data
    parts = {f"f{i}": (f"{i}.jpg", JPEG[:-2] + scan + b"\xff\xd9") for i in range(3)}
    status, body = await upload(client, parts)
    assert status == 413
    assert body["detail"] in (
        "The upload is larger than the limit of 0.015 MB.",
        "The request body is too large",
    )
    assert stored(client) == []


async def test_a_bad_part_stores_nothing(bridge: Client) -> None:
    status, _ = await upload(bridge, {"good": ("a.png", png()), "bad": ("b.png", b"nope" * 20)}, client_id="atomic")
    assert status == 415
    assert stored(bridge) == []


async def test_bad_requests(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), max_upload_files=2)
    resp = await client.post("/upload", json={"file": "x"})
    assert resp.status == 400
    assert await resp.json() == {"detail": "Send files as multipart/form-data, one file per part."}
    status, body = await upload(client, {f"f{i}": (f"{i}.png", png()) for i in range(3)})
    assert (status, body) == (400, {"detail": "Too many files in one upload: at most 2."})
    status, body = await raw_upload(client, 'form-data; name="note"', b"plain text field")
    assert (status, body) == (400, {"detail": "Part 'note' is not a file: send it with a filename."})
    assert stored(client) == []


async def test_upload_makes_the_client_known(bridge: Client) -> None:
    assert (await bridge.get("/execution-info", params={"clientId": "uploader"})).status == 400
    await upload(bridge, {"file": ("a.png", png())}, client_id="uploader")
    assert (await bridge.get("/execution-info", params={"clientId": "uploader"})).status == 200


async def test_unused_uploads_expire(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), upload_ttl=0.3)
    _, names = await upload(client, {"file": ("a.png", png())})
    await wait_for(lambda: stored(client) == [])
    status, body = await generate(client, "late", {"workflow": "invert", "1/image": names["file"]})
    assert status == 400
    assert "names no uploaded file" in body["detail"]


async def test_unfetched_results_expire(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), result_ttl=0.5, inline_result_kb=0)  # results as files
    await run_job(client, "forgetful", {"workflow": "solid", "1/batch_size": 1})
    assert stored(client, "results")
    await wait_for(lambda: not stored(client, "results"))
    resp = await client.get("/history", params={"clientId": "forgetful"})
    assert resp.status == 204


async def test_uploads_and_results_survive_a_restart(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    emulator = await make_emulator()
    first = await make_bridge(emulator)
    _, names = await upload(first, {"file": ("keep.png", png(12, 10))}, client_id="restart")
    await run_job(first, "restart", {"workflow": "invert", "1/image": names["file"]})
    await first.close()
    second = await make_bridge(emulator)
    parts = await read_results(await second.get("/history", params={"clientId": "restart"}))
    assert [without_job_id(p[1]) for p in parts] == ["wf_a_invert_00001_.png"]
    status, _ = await generate(second, "restart", {"workflow": "invert", "1/image": names["file"]})
    assert status == 200


UNSAFE = {
    "a PNG signature glued onto a script": ("x.png", b"\x89PNG\r\n\x1a\n<script>alert(1)</script>" + b" " * 40),
    "BM glued onto a shell script": ("x.bmp", b"BM#!/bin/sh\nrm -rf /\n" + b"#" * 40),
    "a cut-off PNG": ("x.png", png()[:-20]),
    "an SVG": ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"></svg>'),
    "HTML": ("x.html", b"<!doctype html><script>alert(1)</script>" + b" " * 40),
    "PHP": ("x.php", b"<?php system($_GET['c']); ?>" + b" " * 40),
    "an ID3 tag glued onto HTML": ("x.mp3", b"ID3" + b"<!doctype html><script>alert(1)</script>" + b" " * 40),
    "an ID3 tag and no audio after it": ("x.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x04" + b"\0" * 4 + b"<?php ?>" * 8),
    "an ID3 tag, then a FLAC signature glued onto a script": (
        "x.flac",
        b"ID3\x04\x00\x00\x00\x00\x00\x04" + b"\0" * 4 + b"fLaC" + b"<?php system($_GET['c']); ?>" * 4,
    ),
    "a WebM signature glued onto HTML": ("x.webm", b"\x1aE\xdf\xa3<html><script>alert(1)</script>" + b" " * 40),
    "a WebM of unknown size that is HTML": (
        "x.webm",
        b"\x1aE\xdf\xa3\x87\x42\x82\x84webm\x18\x53\x80\x67\x01" + b"\xff" * 7 + b"<html><script>alert(1)</script>",
    ),
    "a WebM with no Segment, a Void holding HTML": (
        "x.webm",
        b"\x1aE\xdf\xa3\x87\x42\x82\x84webm\xec\xa0" + b"<html><script>alert(1)</script>!",
    ),
    "a WebM of countless Void elements": ("x.webm", b"\x1aE\xdf\xa3\x87\x42\x82\x84webm" + b"\xec\x80" * 200_000),
    "an MP3 frame sync glued onto HTML": (
        "x.mp3",
        b"\xff\xfb" + b"<!doctype html><script>alert(1)</script>" + b" " * 40,
    ),
    "a whole GIF with a script after it": (
        "x.gif",
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
        + b"alert(document.cookie);",
    ),
    "a PNG with PHP after its IEND": ("x.png", png() + b"<?php system($_GET['c']); ?>" + png()[-12:]),
    "an Ogg signature glued onto PHP": ("x.ogg", b"OggS" + b"<?php system($_GET['c']); ?>" + b" " * 40),
    "a FLAC signature glued onto PHP": (
        "x.flac",
        b"fLaC\x80\x00\x00\x22" + b"<?php system($_GET['c']); ?>" + b" " * 40,
    ),
    "an MP4 of countless tiny boxes": ("x.mp4", MP4 + b"\0\0\0\x08free" * 1_000_001),
    "a TIFF signature glued onto PHP": (
        "x.tif",
        b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00" + b"<?php system($_GET['c']); ?>" + b" " * 30,
    ),
}
MP3_FRAME = b"\xff\xfb\x90\x00" + bytes(413)
WEBM = (
    b"\x1aE\xdf\xa3\x87" + b"\x42\x82\x84webm"  # the EBML header: DocType webm
    + b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff"  # a Segment of unknown size, to the end:
    + b"\x15\x49\xa9\x66\x84" + bytes(4)  # its Info
)  # fmt: skip
WHOLE = {
    "an MP3 with an ID3 tag": ("a.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10) + MP3_FRAME),
    "an MP3 tagged twice, then padded": (
        "f.mp3",
        b"ID3\x03\x00\x00\x00\x00\x00\x14"
        + bytes(20)
        + b"ID3\x03\x00\x00\x00\x00\x00\x1e"
        + bytes(30 + 256)
        + MP3_FRAME * 3
        + b"TAG"
        + bytes(125),
    ),
    "a WebM as a recorder writes it (Segment and Clusters of unknown size)": (
        "g.webm",
        WEBM[:12]
        + b"\x18\x53\x80\x67\x01"
        + b"\xff" * 7
        + b"\x15\x49\xa9\x66\x84"
        + bytes(4)
        + (b"\x1f\x43\xb6\x75\x01" + b"\xff" * 7 + b"\xe7\x81\x00" + b"\xa3\x84" + bytes(4) * 1) * 3,
    ),
    "an MP3 with no tag": ("b.mp3", MP3_FRAME),
    "an Ogg of two pages": ("h.ogg", OGG * 2),
    "a FLAC": ("i.flac", FLAC),
    "a FLAC of its metadata alone": ("j.flac", FLAC[:42]),
    "a WebM recording of 144,000 blocks (30 minutes at 80 a second)": (
        "k.webm",
        WEBM + (b"\x1f\x43\xb6\x75\x01" + b"\xff" * 7 + b"\xe7\x81\x00" + (b"\xa3\x88" + bytes(8)) * 400) * 360,
    ),
    "a WebM": ("c.webm", WEBM),
    "a WebM of known sizes": ("d.webm", WEBM[:12] + b"\x18\x53\x80\x67\x90" + b"\xec\x8e" + bytes(14)),
    "a GIF padded with zeros": ("e.gif", UNSAFE["a whole GIF with a script after it"][1][:-23] + bytes(5)),
}


@pytest.mark.parametrize("case", sorted(WHOLE))
async def test_whole_media_files_of_every_format_checked_are_stored(bridge: Client, case: str) -> None:
    status, body = await upload(bridge, {"file": WHOLE[case]})
    assert status == 200, body


@pytest.mark.parametrize("case", sorted(UNSAFE))
async def test_only_whole_media_files_are_stored(bridge: Client, case: str) -> None:
    status, body = await upload(bridge, {"file": UNSAFE[case]})
    assert status == 415, body
    assert stored(bridge) == []


async def test_the_content_names_the_stored_extension(bridge: Client) -> None:
    status, names = await upload(
        bridge,
        {"page": ("x.html", png()), "conf": (".htaccess", png()), "photo": ("holiday.JPEG", JPEG)},
    )
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{12}-x\.png", names["page"])
    assert re.fullmatch(r"[0-9a-f]{12}-file\.png", names["conf"])
    assert re.fullmatch(r"[0-9a-f]{12}-holiday\.jpeg", names["photo"])  # the client's name, when it is true


def id3_tag(size: int) -> bytes:
    """An ID3v2.4 tag of `size` bytes of frames (a tagger's cover art), its size in 7-bit bytes."""
    return b"ID3\x04\x00\x00" + bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0)) + bytes(size)


@pytest.mark.parametrize("tag", [10, 300_000], ids=["small tag", "cover art over several chunks"])
async def test_a_flac_led_by_an_id3_tag_is_stored_as_flac(bridge: Client, tag: int) -> None:
    """Some taggers put an ID3v2 tag before a FLAC's "fLaC" (ffmpeg, and so ComfyUI, reads past it):
    it was taken for an MP3 by its first bytes, and refused as a broken one."""
    status, names = await upload(bridge, {"file": ("song.flac", id3_tag(tag) + FLAC)}, client_id="tagged")
    assert status == 200, names
    assert names["file"].endswith("-song.flac")


async def test_a_file_input_takes_only_its_kind(bridge: Client) -> None:
    _, names = await upload(bridge, {"file": ("song.wav", WAV)}, client_id="kinds")
    status, body = await generate(bridge, "kinds", {"workflow": "invert", "1/image": names["file"]})
    assert status == 400
    assert body["detail"] == f"Input '1/image' takes an image file, but {names['file']!r} is audio."


async def test_a_sweep_expires_a_bounded_number_of_results(
    make_bridge: BridgeFactory,
    make_emulator: EmulatorFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backlog of expired results goes a batch per sweep, not all in one long one."""
    monkeypatch.setattr(scheduler_module, "SWEEP_BATCH", 1)
    caplog.set_level(logging.INFO, logger="comfybridge")
    client = await make_bridge(await make_emulator(), result_ttl=0.5)
    for _ in range(3):
        await run_job(client, "backlog", {"workflow": "solid", "1/batch_size": 1})
    await wait_for(lambda: sum("expired 1 unfetched results" in r.getMessage() for r in caplog.records) == 3)
    assert not any("expired 2" in r.getMessage() or "expired 3" in r.getMessage() for r in caplog.records)
    assert (await client.get("/history", params={"clientId": "backlog"})).status == 204


async def test_a_sweep_that_fails_does_not_end_the_sweeping(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The uploads folder removed under the bridge fails each sweep of uploads: results still expire
    meanwhile (each step of a sweep on its own), and the uploads' sweep works again once it is back."""
    caplog.set_level(logging.INFO, logger="comfybridge")
    client = await make_bridge(  # in folders, whatever the test run's storage: one is removed
        await make_emulator(), upload_ttl=0.3, result_ttl=0.5, inline_result_kb=0, storage="", s3_endpoint=""
    )
    await upload(client, {"file": ("a.png", png())}, client_id="after")
    uploads = client.app[SETTINGS].data_dir / "uploads"
    shutil.rmtree(uploads)
    await run_job(client, "after", {"workflow": "solid", "1/batch_size": 1})
    assert stored(client, "results")
    await wait_for(lambda: any("sweeping expired uploads failed" in r.getMessage() for r in caplog.records))
    await wait_for(lambda: not stored(client, "results"))  # while the folder is still gone
    assert (await client.get("/history", params={"clientId": "after"})).status == 204
    uploads.mkdir()
    await upload(client, {"file": ("b.png", png())}, client_id="later")
    assert stored(client)
    await wait_for(lambda: not stored(client))


async def test_results_whose_expiry_cannot_be_written_stay_fetchable(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk refuses the journal's note that results expired: they stay the client's, in
    memory as on disk, and a next sweep tries again (they were dropped from memory first, so the
    client lost them while their files and rows stayed for good)."""
    client = await make_bridge(await make_emulator(), result_ttl=0.5, inline_result_kb=0)
    journal = client.app[JOURNAL]
    refused = asyncio.Event()

    def full(job_ids: Iterable[str]) -> asyncio.Future[None]:
        refused.set()
        future = asyncio.get_running_loop().create_future()
        future.set_exception(StorageFull("The bridge's disk is full"))
        return future

    monkeypatch.setattr(journal, "forget", full)
    await run_job(client, "patient", {"workflow": "solid", "1/batch_size": 1})
    await asyncio.wait_for(refused.wait(), 10)
    resp = await client.get("/history", params={"clientId": "patient"})
    assert resp.status == 200
    assert len(await read_results(resp)) == 1


async def test_results_being_expired_are_not_handed_to_a_fetch_meanwhile(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the journal writes that results expired, a fetch does not get them (their files go
    next, under its feet), and finds nothing: they are past their TTL, not "being fetched by another
    request right now" (409)."""
    client = await make_bridge(await make_emulator(), result_ttl=0.5, inline_result_kb=0)
    journal = client.app[JOURNAL]
    written, asked = asyncio.Event(), asyncio.Event()
    forget = journal.forget

    def slow(job_ids: Iterable[str], later: bool = False) -> asyncio.Future[None]:
        ids = list(job_ids)
        asked.set()

        async def when_let() -> None:
            await written.wait()
            await forget(ids, later)

        return asyncio.ensure_future(when_let())

    monkeypatch.setattr(journal, "forget", slow)
    await run_job(client, "late", {"workflow": "solid", "1/batch_size": 1})
    await asyncio.wait_for(asked.wait(), 10)
    assert (await client.get("/history", params={"clientId": "late"})).status == 204
    written.set()
    await wait_for(lambda: not stored(client, "results"))
    assert (await client.get("/history", params={"clientId": "late"})).status == 204


def _store(root: Path) -> UploadStore:
    return UploadStore(root, UploadLimits(1 << 20, 1 << 22, 4, ("image",), 50.0, 200.0, 2000.0))


async def _one_png(before: asyncio.Event | None = None) -> AsyncIterator[IncomingFile]:
    """One part, `cat.png`; after `before` is set (its headers on their way until then)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield png()

    if before is not None:
        await before.wait()
    yield IncomingFile("photo", "cat.png", chunks())


async def test_the_sweep_of_empty_folders_leaves_an_upload_that_is_starting_alone(tmp_path: Path) -> None:
    store = _store(tmp_path / "uploads")
    folder = tmp_path / "uploads" / "c-alice"
    folder.mkdir(parents=True)  # left empty when alice's earlier uploads expired, long ago
    os.utime(folder, (0, 0))
    first_part = asyncio.Event()
    receiving = asyncio.ensure_future(store.receive("alice", _one_png(first_part)))
    await asyncio.sleep(0.1)
    await store.expire(3600)  # the sweep runs while the upload's first part is on its way
    first_part.set()
    names = await receiving
    assert (folder / names["photo"]).is_file()


async def test_a_new_owner_folder_is_made_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    fsync = uploads_module.fsync_path
    monkeypatch.setattr(uploads_module, "fsync_path", lambda path: (synced.append(Path(path)), fsync(path))[1])
    await _store(tmp_path / "uploads").receive("carol", _one_png())
    assert tmp_path / "uploads" in synced, "the new folder's entry was not synced"
    assert tmp_path / "uploads" / "c-carol" in synced


async def test_an_upload_cancelled_while_it_is_put_in_place_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled (a stop's shutdown timeout) between the rename and its folder's sync: the file that
    was renamed into place goes too, not only its temporary name; nothing unindexed stays behind."""
    renamed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_sync(tmp: Path, path: Path) -> None:
        os.replace(tmp, path)
        loop.call_soon_threadsafe(renamed.set)
        time.sleep(0.3)  # a busy disk
        uploads_module.fsync_path(path.parent)

    monkeypatch.setattr(uploads_module, "_sync_and_rename", slow_sync)
    store = _store(tmp_path / "uploads")
    receiving = asyncio.ensure_future(store.receive("bob", _one_png()))
    await renamed.wait()
    receiving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await receiving
    assert list((tmp_path / "uploads" / "c-bob").iterdir()) == []


async def test_a_restart_knows_an_uploads_last_use(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """An upload's age restarts when a job that used it ends, and a restart knows it: the use is
    kept on the file (its modified time), not only in memory."""
    emulator = await make_emulator()
    first = await make_bridge(emulator, upload_ttl=3600, data_dir=tmp_path / "data")
    if first.app[SETTINGS].storage:
        pytest.skip("an object's modified time cannot be set: with object storage a restart counts from the upload")
    _, names = await upload(first, {"file": ("a.png", png())}, client_id="reuser")
    (path,) = stored(first)
    long_ago = time.time() - 7200  # uploaded two hours ago: past upload_ttl, unused since
    os.utime(path, (long_ago, long_ago))
    frames = await run_job(first, "reuser", {"workflow": "invert", "1/image": names["file"]})
    assert frames[-1]["status"] == "closed"
    await first.close()
    second = await make_bridge(emulator, upload_ttl=3600, data_dir=tmp_path / "data")
    assert await second.app[SCHEDULER].core.uploads.expire(3600) == 0  # the sweep, now: used a moment ago
    status, body = await generate(second, "reuser", {"workflow": "invert", "1/image": names["file"]})
    assert status == 200, body
