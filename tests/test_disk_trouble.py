"""The single bridge (SQLite journal, local folders) on a disk that is full, read-only or cut short,
and a data folder whose parts are not what they should be (real processes where start-up counts)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from comfybridge.edge.appkeys import SETTINGS

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import (
    TINY,
    assert_one_line_error,
    backends,
    bridge_process,
    fill,
    generate,
    poll_status,
    post_job,
    read_only,
    run_cli,
    small_disk,
    status_of,
)

SOLID = {"workflow": "solid", "1/batch_size": 1}


async def test_a_full_disk_at_start_is_not_called_a_corrupt_journal(workdir: Path) -> None:
    """The journal is whole; only the disk is full. Start-up may refuse (exit 2), but its one line must
    say the disk is full, not tell the operator to "restore it from a backup or move it aside" (which,
    followed, would drop every accepted job it holds)."""
    with small_disk(workdir / "data", "4m") as data_dir:
        async with bridge_process(workdir, "--emulate", "1") as (proc, url), aiohttp.ClientSession() as session:
            await post_job(session, url, "before", TINY)
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        filler = fill(data_dir)
        result = await asyncio.to_thread(run_cli, ["--emulate", "1"], workdir)
        filler.unlink()
        assert_one_line_error(result, "journal.sqlite3")
        line = result.stderr.strip().splitlines()[-1]
        assert "corrupt" not in line, line
        assert "full" in line or "No space" in line, line


@pytest.mark.parametrize("area", ["uploads", "results"])
def test_a_data_subfolder_that_is_a_file_at_start_is_one_line_and_exit_2(workdir: Path, area: str) -> None:
    """While running, a results or uploads folder replaced by a file is a clear 503 / job error; at start
    it is a Python traceback and exit 1, where every other unusable piece of the data folder (journal,
    state file, lock) is one `comfybridge: error:` line and exit 2."""
    data = workdir / "data"
    data.mkdir()
    (data / area).write_text("not a folder\n")
    result = run_cli(["--emulate", "1"], workdir)
    assert_one_line_error(result, area)


async def test_results_fetched_while_their_folder_is_read_only_are_removed_once_it_is_writable(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A fetch while results/ is read-only (a disk remounted ro, EIO): the files cannot be removed then.
    ResultStore.delete promises "best effort: with the store away they stay, and a sweep removes them";
    for local folders the OSError escapes instead (a traceback: "task forget fetched ... failed"),
    nothing tries again while the bridge runs, and the next start moves them to orphans/ "until
    removed by hand": results a client already took are kept on the disk for ever."""
    client = await make_bridge(await make_emulator(), inline_result_kb=0, result_ttl=2.0)
    status, _ = await generate(client, "ro", SOLID)
    assert status == 200
    assert (await poll_status(client, "ro", {"closed", "error"}, timeout=30))["status"] == "closed"
    results = client.app[SETTINGS].data_dir / "results"
    assert [p for p in results.rglob("*") if p.is_file()]
    with read_only(results):
        resp = await client.get("/history", params={"clientId": "ro", "resType": "base64"})
        assert resp.status == 200
        assert len((await resp.json())["files"]) == 1
        await asyncio.sleep(1.0)  # the forget is journaled, then the deletion is tried (and refused)
    assert not [r for r in caplog.records if r.exc_info], "a disk's refusal logged as a fault of ours"
    # Writable again: the fetched files go without a restart.
    await wait_for(lambda: not [p for p in results.rglob("*") if p.is_file()], timeout=15)
    await client.close()


async def test_a_full_disk_shows_on_ready(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Every job and upload is refused with 507 while the disk is full, and a finished job's end cannot
    be recorded (its client hears nothing): /ready, "whether to send it work", still answers 200 and
    /health says the journal is "ok", so a load balancer keeps sending this bridge work it refuses."""
    with small_disk(tmp_path / "small") as data_dir:
        client = await make_bridge(await make_emulator(), data_dir=data_dir)
        status, _ = await generate(client, "before", TINY)
        assert status == 200
        filler = fill(data_dir)
        try:
            status, body = await generate(client, "full", {**TINY, "1/width": 9})
            assert status == 507, body
            resp = await client.get("/ready")
            report = await resp.json()
            assert resp.status == 503, report
            assert "full" in report["detail"]
        finally:
            filler.unlink()
        await client.close()


async def test_a_journal_that_lost_accepted_jobs_is_not_opened_in_silence(
    workdir: Path, make_emulator: EmulatorFactory
) -> None:
    """Jobs 2-4 were answered 200 (journaled, fsynced); the journal's WAL is then cut short between
    restarts (a disk or filesystem losing its tail, other hands). The state file beside it counted 4
    jobs and the journal's own count says 1, yet the bridge starts, says nothing, and the clients of
    jobs 2-4 get `400 Unknown clientId`. An emptied journal is refused for this very reason, a missing
    one is warned of; a journal that lost counted jobs should be at least as loud."""
    emulator = await make_emulator()
    emulator.engine.pause()  # every job waits: none ends
    wal = workdir / "data" / "journal.sqlite3-wal"
    args = (*backends(emulator), "--journal-sync", "true")
    async with bridge_process(workdir, *args) as (proc, url), aiohttp.ClientSession() as session:
        await post_job(session, url, "first", TINY)
        kept = wal.stat().st_size
        for index in range(2, 5):
            await post_job(session, url, f"later-{index}", {**TINY, "1/width": 8 + index})
        await asyncio.sleep(1.5)  # current_state.json follows the journal within a second
        proc.kill()  # kill -9: the WAL is not checkpointed
        await proc.wait()
    assert (workdir / "data" / "current_state.json").read_text().strip() == '{"generation_count":4}'
    os.truncate(wal, kept)  # the tail of the WAL lost
    with sqlite3.connect(f"file:{workdir / 'data' / 'journal.sqlite3'}?mode=ro", uri=True) as conn:
        assert [r[0] for r in conn.execute("SELECT client_id FROM jobs")] == ["first"]
    before = (workdir / "bridge.log").read_text()
    refused = False
    try:
        async with (
            bridge_process(workdir, *args) as (_, url),
            aiohttp.ClientSession() as session,
            session.get(f"{url}/execution-info", params={"clientId": "later-2"}) as resp,
        ):
            known = resp.status == 200
    except Exception:  # it refused to start: not silent
        refused = True
        known = False
    said = (workdir / "bridge.log").read_text()[len(before) :]
    loud = [line for line in said.splitlines() if (" WARNING " in line or " ERROR " in line) and "journal" in line]
    emulator.engine.resume()
    assert refused or known or loud, f"3 accepted jobs dropped in silence; the restart logged:\n{said}"
    logging.getLogger(__name__).info("restart said %s", loud)


async def test_a_read_only_results_folder_holding_an_orphan_does_not_stop_start_up(workdir: Path) -> None:
    """results/ on a mount that is read-only now, holding a folder no journal row names (a result
    folder of a journal lost earlier): ResultStore.sort_out is "best effort: with the store away they
    wait for the next sweep", and a bridge whose results/ is read-only starts and serves when there is
    no such folder. With one, start-up dies with a traceback (exit 1) from `shutil.move`, and leaves a
    half-made copy of the folder in orphans/ beside the original."""
    results = workdir / "data" / "results"
    (results / "feedface").mkdir(parents=True)
    (results / "feedface" / "000-x.png").write_bytes(b"left by a journal that is gone")
    with read_only(results):
        async with (
            bridge_process(workdir, "--emulate", "1") as (_, url),
            aiohttp.ClientSession() as session,
            session.get(f"{url}/health") as resp,
        ):
            assert resp.status == 200


async def test_an_interrupt_on_a_full_disk_says_its_cancellation_is_not_recorded(
    workdir: Path, make_emulator: EmulatorFactory
) -> None:
    """POST /interrupt on a full disk stops the jobs, but cannot record their end: it must not answer
    200 (a restart before the record lands would run them again), but 507 saying so; once the disk has
    room, the ends land."""
    emulator = await make_emulator()
    emulator.engine.pause()
    args = backends(emulator)
    with small_disk(workdir / "data", "4m") as data_dir:
        async with bridge_process(workdir, *args) as (_, url), aiohttp.ClientSession() as session:
            for index in range(3):
                await post_job(session, url, "x", {**TINY, "1/width": 8 + index})
            await asyncio.sleep(0.5)  # two inside ComfyUI (paused), one waiting in the bridge
            filler = fill(data_dir)
            async with session.post(f"{url}/interrupt", params={"clientId": "x"}) as resp:
                answered, said = resp.status, (await resp.json())["detail"]
            assert answered == 507, said  # stopped, but not recorded: the client is told so
            assert "not recorded yet" in said
            filler.unlink()
            # Room again: the ends land, and the client is told of them after all.
            async with asyncio.timeout(60):
                while (info := await status_of(session, url, "x"))["status"] != "error" or info["jobs_left"]:
                    await asyncio.sleep(0.1)
            assert info["detail"] == "interrupted"
