"""A result that cannot be stored ends its job clearly and stops costing: names no disk or header can
take, files over the limit, a full disk (bounded tries, no download without room), an interrupt."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from comfybridge.edge import delivery, routes
from comfybridge.edge.appkeys import SCHEDULER, SETTINGS
from comfybridge.errors import StorageUnavailable
from comfybridge.store import blobs
from comfybridge.store.blobs import BlobGone, LocalBlobs

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .fake_comfy import FakeComfy
from .helpers import (
    files_under,
    generate,
    png,
    poll_status,
    read_only,
    read_results,
    run_job,
    small_disk,
    stored,
    without_job_id,
)

SOLID = {"workflow": "solid", "1/batch_size": 1}
ON_DISK = {"storage": "", "s3_endpoint": ""}  # results as files in the data folder, whatever the run's storage
NASTY_NAMES = [
    "a\x00b.png",
    "line\r\nX-Injected: yes.png",
    "../../etc/passwd.png",
    "x" * 300 + ".png",
    "sub/dir\\evil.png",
    "\x1b[31mred\x7f.png",
    '"quoted";name.png',
]


def renaming(name: str) -> Any:
    """Rewrites the `executed` event's file name, as a custom node with a strange prefix would make it."""

    def rewrite(text: str) -> str:
        message = orjson.loads(text)
        if message.get("type") == "executed":
            for item in message["data"]["output"].get("images", []):
                item["filename"] = name
        return orjson.dumps(message).decode()

    return rewrite


@pytest.mark.parametrize("name", NASTY_NAMES)
async def test_output_names_no_disk_or_header_can_take_get_safe_stored_names(
    make_fake: Any, make_bridge: BridgeFactory, name: str, tmp_path: Path
) -> None:
    fake: FakeComfy = await make_fake()
    picture = png(3, 2, 0x123456)
    fake.rewrite = renaming(name)
    fake.replace("GET /view", 200, picture)
    client = await make_bridge(fake.url, inline_result_kb=0)  # results as files, named on the disk
    results = tmp_path / "data" / "results"
    for client_id, res_type in (("multi", None), ("b64", "base64")):
        # The first client's file goes once its fetch is journaled, with the forgets written together.
        await wait_for(lambda: files_under(results) == [])
        status, _ = await generate(client, client_id, SOLID)
        assert status == 200
        info = await poll_status(client, client_id, {"closed", "error"})
        assert info["status"] == "closed", info
        stored = [p for p in results.rglob("*") if p.is_file()]
        assert len(stored) == 1
        assert len(stored[0].name) <= 104
        assert all(c.isalnum() or c in "._-" for c in stored[0].name)
        params = {"clientId": client_id, **({"resType": res_type} if res_type else {})}
        resp = await client.get("/history", params=params)
        raw = await resp.read()
        if res_type == "base64":
            (item,) = orjson.loads(raw)["files"]
            assert item["file_name"] == name  # ComfyUI's name, as it is, escaped by JSON
            assert base64.b64decode(item["content"]) == picture
        else:
            head_lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            assert not [line for line in head_lines if line.startswith(b"X-Injected")]
            assert not [line for line in head_lines if any(byte < 32 or byte == 127 for byte in line)]
            payload = raw.split(b"\r\n\r\n", 1)[1]
            assert payload[: payload.rindex(b"\r\n--")] == picture
            fake.replace("GET /view", 200, picture)  # for the second client's job


async def test_a_result_over_max_result_mb_fails_its_job_clearly(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    emulator = await make_emulator()
    emulator.engine.faults.video_mb = 2
    client = await make_bridge(emulator, max_result_mb=1)
    status, _ = await generate(client, "huge", SOLID)
    assert status == 200
    info = await poll_status(client, "huge", {"closed", "error"})
    assert info["status"] == "error"
    assert info["detail"].startswith("The result cannot be kept: the output '")
    assert info["detail"].endswith(".mp4' is larger than the limit of 1 MB (max_result_mb).")
    assert not [p for p in (tmp_path / "data" / "results").rglob("*") if p.is_file()]
    assert (await client.get("/history", params={"clientId": "huge"})).status == 204
    # The early fetch (as the SaveImage node reports) and the collect each refuse it from its length; no retry.
    assert emulator.engine.requests["GET /view"] <= 3


async def test_a_full_disk_fails_the_job_after_bounded_tries_without_downloading(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = await make_emulator()
    emulator.engine.faults.video_mb = 16
    data_dir = tmp_path / "small"
    kind = "tmpfs"
    try:
        disk = small_disk(data_dir, "8m")
        disk.__enter__()
    except pytest.skip.Exception:
        kind, disk = "injected", None
        data_dir = tmp_path / "data"

        def no_room(target: Path, length: int | None) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(target.parent))

        monkeypatch.setattr(blobs, "_make_room", no_room)
    try:
        client = await make_bridge(emulator, data_dir=data_dir, result_retries=3)
        status, _ = await generate(client, "full", SOLID)
        assert status == 200
        info = await poll_status(client, "full", {"closed", "error"}, timeout=30)
        assert info["status"] == "error", kind
        assert info["detail"].startswith("The results could not be stored: the bridge's disk is full")
        if kind == "tmpfs":  # refused from its length, before a byte of it was read
            assert info["detail"].endswith(f"(no room for {16 << 20} bytes).")
        # Three tries, each refused before the video's body is read.
        assert emulator.engine.requests["GET /view"] <= 3 * 2
        stored = [p for p in (data_dir / "results").rglob("*") if p.is_file()]
        assert stored == []
        # It never stopped serving: the next small job works once there is room.
        emulator.engine.faults.video_mb = 0
        monkeypatch.undo()
        status, _ = await generate(client, "after", SOLID)
        assert status == 200
        assert (await poll_status(client, "after", {"closed", "error"}))["status"] == "closed"
        await client.close()
    finally:
        if disk is not None:
            disk.__exit__(None, None, None)


async def test_interrupt_stops_the_tries_to_store_results_and_lets_comfyui_go(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt while a finished prompt's results are being stored: no try after it, and ComfyUI
    lets the prompt go as for a delivered job (its whole outputs and its history entry stayed there
    for good: a growing heap where interrupts race fast jobs)."""
    emulator = await make_emulator()
    outputs = Path(emulator.engine.output_dir)
    client = await make_bridge(
        emulator, result_retries=50, inline_result_kb=0, comfy_outputs=((emulator.url, outputs),)
    )
    tries: list[Path] = []

    def no_room(target: Path, data: bytes) -> None:
        tries.append(target)
        raise OSError(errno.ENOSPC, "No space left on device", str(target.parent))

    monkeypatch.setattr(blobs, "write_synced", no_room)
    status, _ = await generate(client, "stop", SOLID)
    assert status == 200
    await wait_for(lambda: len(tries) >= 2)
    assert emulator.engine.history  # done there, its outputs written
    assert files_under(outputs)
    resp = await client.post("/interrupt", params={"clientId": "stop"})
    assert resp.status == 200
    scheduler = client.app[SCHEDULER]
    await wait_for(lambda: not scheduler.core.collecting)
    count = len(tries)
    info = await poll_status(client, "stop", {"error"})
    assert info["detail"] == "interrupted"
    assert len(tries) == count  # no try after the interrupt
    assert not (tmp_path / "data" / "results" / info["job_id"]).exists()
    await wait_for(lambda: not emulator.engine.history)
    await wait_for(lambda: files_under(outputs) == [])


async def test_results_that_could_not_be_stored_stay_in_comfyui(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job failed as its results could not be stored leaves ComfyUI their one copy (and its history
    entry), also once its prompt leaves ComfyUI after that: only a job that ended before anything
    was collected lets ComfyUI go then."""
    emulator = await make_emulator()
    outputs = Path(emulator.engine.output_dir)
    client = await make_bridge(emulator, result_retries=2, inline_result_kb=0, comfy_outputs=((emulator.url, outputs),))

    def no_room(target: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(target.parent))

    monkeypatch.setattr(blobs, "write_synced", no_room)
    emulator.engine.faults.hold_end = True  # the prompt leaves ComfyUI only after the job failed
    assert (await generate(client, "full", SOLID))[0] == 200
    info = await poll_status(client, "full", {"closed", "error"}, timeout=30)
    assert info["detail"].startswith("The results could not be stored")
    (backend,) = client.app[SCHEDULER].backends.values()
    emulator.engine.release_hang()
    await wait_for(lambda: not backend.inflight)  # its prompt has left ComfyUI
    (kept,) = emulator.engine.history
    monkeypatch.undo()
    assert (await generate(client, "after", SOLID))[0] == 200  # delivered: ComfyUI lets it go
    assert (await poll_status(client, "after", {"closed", "error"}))["status"] == "closed"
    await wait_for(lambda: list(emulator.engine.history) == [kept])
    assert len(files_under(outputs)) == 1


async def test_a_result_that_trickles_in_fails_its_job_within_bounds(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """Each read in time, yet the file never arrives: comfy_timeout plus a second per 64 KB, then the
    bounded tries, then a clear error, never a job held for as long as ComfyUI drips."""
    fake: FakeComfy = await make_fake()
    fake.upstream.engine.faults.video_mb = 2  # streamed (over 1 MB): its deadline grows with what arrives
    fake.trickled["GET /view"] = 0.05  # 20 KB a second
    client = await make_bridge(fake.url, comfy_timeout=0.2, result_retries=2)
    status, _ = await generate(client, "drip", SOLID)
    assert status == 200
    info = await poll_status(client, "drip", {"closed", "error"}, timeout=30)
    assert info["status"] == "error"
    assert info["detail"].startswith("ComfyUI did not give the results (")
    assert "too slow" in info["detail"]


@pytest.mark.parametrize("tamper", ["remove", "cut short"])
async def test_a_result_file_lost_to_other_hands_is_one_clear_410(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tamper: str
) -> None:
    """A result file removed from the data folder, or cut short, by hand: not a 500 at every fetch
    (the client's other results stuck behind it), nor an answer shorter than it says taken for whole
    and forgotten: one 410 naming the job, whose results are forgotten, then the others."""
    client = await make_bridge(await make_emulator(), inline_result_kb=0, **ON_DISK)
    jobs = []
    for _ in range(2):
        frames = await run_job(client, "tampered", SOLID)
        jobs.append(frames[-1]["job_id"])
    (victim,) = [path for path in stored(client, "results") if jobs[0] in str(path)]
    if tamper == "remove":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:100])
    resp = await client.get("/history", params={"clientId": "tampered"})
    assert resp.status == 410
    assert jobs[0] in (await resp.json())["detail"]
    resp = await client.get("/history", params={"clientId": "tampered"})
    assert resp.status == 200
    assert [part[1] for part in await read_results(resp)] == [f"wf_b_empty_{jobs[1]}_00001_.png"]
    assert (await client.get("/history", params={"clientId": "tampered"})).status == 204


async def test_a_passing_read_error_is_a_503_and_keeps_the_results(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO, a permission, a stale NFS handle: a trouble that may pass, not a file lost. The fetch is
    refused (503), nothing is forgotten, and the next fetch gets the results."""
    client = await make_bridge(await make_emulator(), inline_result_kb=0, **ON_DISK)
    job = (await run_job(client, "nfs", SOLID))[-1]["job_id"]
    (victim,) = [path for path in stored(client, "results") if job in str(path)]
    real = Path.stat

    def flaky(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == victim:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", flaky)
    resp = await client.get("/history", params={"clientId": "nfs"})
    assert resp.status == 503
    assert "could not read its data folder" in (await resp.json())["detail"]
    monkeypatch.setattr(Path, "stat", real)
    resp = await client.get("/history", params={"clientId": "nfs"})
    assert [without_job_id(part[1]) for part in await read_results(resp)] == ["wf_b_empty_00001_.png"]


def unreadable(monkeypatch: pytest.MonkeyPatch, victim: Path) -> None:
    """Reading this file fails with EIO (a disk's passing trouble) until `monkeypatch.undo()`."""
    real = Path.read_bytes

    def flaky(self: Path) -> bytes:
        if self == victim:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", flaky)


async def test_a_read_error_before_the_answer_is_a_503_that_keeps_the_results(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small results are read whole before anything is sent: a file that cannot be read then (EIO,
    which may pass) is the storage's trouble, and nothing is handed over or forgotten."""
    client = await make_bridge(await make_emulator(), inline_result_kb=0, **ON_DISK)
    jobs = [(await run_job(client, "eio", SOLID))[-1]["job_id"] for _ in "ab"]
    (victim,) = [path for path in stored(client, "results") if jobs[1] in str(path)]
    unreadable(monkeypatch, victim)
    resp = await client.get("/history", params={"clientId": "eio"})
    assert resp.status == 503
    assert "could not read its data folder" in (await resp.json())["detail"]
    monkeypatch.undo()
    resp = await client.get("/history", params={"clientId": "eio"})
    assert len(await read_results(resp)) == 2


async def test_a_read_error_after_the_answer_began_cuts_it_off(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that cannot be read once earlier ones are on their way (results too large to be read
    first): the connection is cut (an error answer would land inside the body), and the results
    stay for the next fetch."""
    emulator = await make_emulator()
    client = await make_bridge(emulator, inline_result_kb=0, **ON_DISK)
    emulator.engine.faults.video_mb = 2  # the first job's video is streamed, not read whole first
    jobs = [(await run_job(client, "eio", SOLID))[-1]["job_id"]]
    emulator.engine.faults.video_mb = 0
    jobs.append((await run_job(client, "eio", SOLID))[-1]["job_id"])
    (victim,) = [path for path in stored(client, "results") if jobs[1] in str(path)]
    unreadable(monkeypatch, victim)
    resp = await client.get("/history", params={"clientId": "eio"})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    monkeypatch.undo()
    resp = await client.get("/history", params={"clientId": "eio"})
    assert len(await read_results(resp)) == 3


async def test_an_aborted_write_whose_close_fails_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = LocalBlobs(tmp_path).writer("job/000-big.png")
    await writer.reserve(None)
    await writer.write(b"x" * (2 << 20))  # large enough to be streamed into its file
    assert (tmp_path / "job" / "000-big.png").exists()

    async def close_fails() -> None:
        raise OSError(28, "No space left on device")  # the last flush, on a full disk

    real_close = writer._close  # type: ignore[attr-defined]
    monkeypatch.setattr(writer, "_close", close_fails)
    await writer.abort()
    assert not (tmp_path / "job" / "000-big.png").exists()
    await real_close()  # (the handle the failed close left open)


@pytest.mark.parametrize("how", ["read", "chunks"])
async def test_a_stored_file_that_cannot_be_read_is_the_storages_trouble_not_a_lost_file(
    tmp_path: Path, how: str
) -> None:
    """Only a file that is not there is gone (BlobGone: the job's results are forgotten); one that
    cannot be read (here a folder in its place: EISDIR; on a disk, EIO or a stale NFS handle) is the
    storage's passing trouble (503, the results kept), read whole or streamed."""
    store = LocalBlobs(tmp_path)
    (tmp_path / "folder-not-file").mkdir()
    (tmp_path / "plain").write_bytes(b"x")

    async def read(key: str) -> bytes:
        if how == "read":
            return await store.read(key)
        return b"".join([chunk async for chunk in store.chunks(key, 1024)])

    with pytest.raises(StorageUnavailable):
        await read("folder-not-file")
    for gone in ("missing", "plain/below"):  # not there; under a file, so not there either
        with pytest.raises(BlobGone):
            await read(gone)


async def test_a_client_hanging_up_mid_download_leaves_no_file_open_and_is_no_error(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "comfybridge")
    emulator = await make_emulator()
    emulator.engine.faults.video_mb = 8  # a result streamed from its file, not read whole
    client = await make_bridge(emulator)
    await run_job(client, "leaver", SOLID)
    results = str(client.app[SETTINGS].data_dir / "results")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /history?clientId=leaver HTTP/1.1\r\nHost: bridge\r\n\r\n")
    await reader.readexactly(64 * 1024)
    writer.transport.abort()  # mid-download
    await wait_for(lambda: "GET /history 499" in caplog.text)  # its handler has ended
    assert [path for path in _open_files() if path.startswith(results)] == []
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'route="/history",status="499"' in metrics
    assert 'route="/history",status="500"' not in metrics
    assert len(await read_results(await client.get("/history", params={"clientId": "leaver"}))) == 2  # all of it


async def test_a_client_gone_before_the_first_write_leaves_no_file_generator_open(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = await make_emulator()
    emulator.engine.faults.video_mb = 8  # streamed from its file: the answer is not sent whole
    client = await make_bridge(emulator, inline_result_kb=0)
    await run_job(client, "early", {"workflow": "solid", "1/batch_size": 1})
    closed: list[str] = []
    at_return: list[list[str]] = []
    real_checked, real_opened, real_write = delivery._checked, delivery._opened, routes.write_multipart

    async def tracked(*args: Any) -> AsyncGenerator[bytes, None]:  # what reads a file, the file open
        try:
            async for chunk in real_checked(*args):
                yield chunk
        finally:
            closed.append(args[2].file_name)

    async def slow_opened(*args: Any) -> Any:
        opened = await real_opened(*args)  # the first file open, its first chunk read
        try:
            await asyncio.sleep(0.5)  # the client hangs up meanwhile
        except asyncio.CancelledError:  # the test server cancels a lost client's handler; run_app does not
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        return opened

    async def write(*args: Any) -> Any:
        try:
            return await real_write(*args)
        finally:
            at_return.append(list(closed))

    monkeypatch.setattr(delivery, "_checked", tracked)
    monkeypatch.setattr(delivery, "_opened", slow_opened)
    monkeypatch.setattr(routes, "write_multipart", write)
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /history?clientId=early HTTP/1.1\r\nHost: bridge\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    await wait_for(lambda: bool(at_return))
    assert at_return[0], "the answer ended with its first file's reader still open"


def _open_files() -> list[str]:
    """What this process (the bridge under test) holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


async def test_a_results_folder_that_cannot_be_written_is_told_without_its_path(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_bridge(await make_emulator(), inline_result_kb=0, result_retries=1)
    results = client.app[SETTINGS].data_dir / "results"
    with read_only(results):
        status, _ = await generate(client, "ro", SOLID)
        assert status == 200
        info = await poll_status(client, "ro", {"closed", "error"}, timeout=30)
    assert info["status"] == "error"
    assert "could not write its data folder (Read-only file system)" in info["detail"]
    assert str(results) not in info["detail"]  # the server's paths are the operator's: in the log
    assert f"cannot write {results}" in caplog.text
