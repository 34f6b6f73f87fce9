"""The job journal through the real edge: the durable counter, group commit, what is (not) persisted,
pinned uploads, and a full disk."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from comfybridge.core.jobs import InvalidStep, Job, JobState
from comfybridge.edge.appkeys import JOURNAL, SETTINGS
from comfybridge.errors import StorageFull, StorageUnavailable
from comfybridge.store import journal as journal_module
from comfybridge.store import journal_file
from comfybridge.store import results as results_module
from comfybridge.store.datadir import DataDirLock, DataDirLocked
from comfybridge.store.files import atomic_write
from comfybridge.store.journal import JournalError, SqliteJournal

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import (
    Client,
    fill,
    frames_until,
    generate,
    png,
    poll_status,
    read_only,
    read_results,
    run_job,
    seed,
    slow_ends,
    small_disk,
    stored,
    upload,
)

TINY = {"workflow": "solid", "1/width": 8, "1/height": 8, "1/batch_size": 1}


ROWS = "SELECT client_id, state, coalesce(error, '') FROM jobs ORDER BY seq"


async def journal_rows(client: Client) -> list[tuple[str, str, str]]:
    """(client id, state, error) of every job the journal holds, read as an operator would, from the
    SQLite file or the PostgreSQL database."""
    settings = client.app[SETTINGS]
    if settings.database:
        conn = await asyncpg.connect(settings.database)
        try:
            return [tuple(row) for row in await conn.fetch(ROWS)]  # type: ignore[misc]
        finally:
            await conn.close()
    # Read only: a connection that may create would make an empty file where the journal was deleted.
    with contextlib.closing(sqlite3.connect(f"file:{settings.journal_file}?mode=ro", uri=True)) as conn:
        return conn.execute(ROWS).fetchall()


async def until_ready(client: Client) -> None:
    """/ready says 200 again (a journal written back is taken for in place at the watch's next look)."""
    async with asyncio.timeout(10):
        while (await client.get("/ready")).status != 200:
            await asyncio.sleep(0.05)


async def wait_until_rows(client: Client, rows: list[tuple[str, str, str]]) -> None:
    async with asyncio.timeout(10):
        while True:
            with contextlib.suppress(sqlite3.OperationalError):  # not there yet (being written back)
                if await journal_rows(client) == rows:
                    return
            await asyncio.sleep(0.02)


@pytest.mark.both_stores
async def test_accepted_job_is_in_the_journal_before_the_answer(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    emulator = await make_emulator()
    emulator.engine.pause()
    client = await make_bridge(emulator)
    status, body = await generate(client, "journaled", TINY)
    assert status == 200
    [(owner, state, _)] = await journal_rows(client)
    assert (owner, state in ("waiting", "submitting", "queued")) == ("journaled", True)
    assert body["job_id"]
    assert await (await client.get("/generation-count")).json() == 1
    emulator.engine.resume()
    await poll_status(client, "journaled", {"closed"})
    assert await journal_rows(client) == [("journaled", "done", "")]
    await read_results(await client.get("/history", params={"clientId": "journaled"}))
    await wait_until_rows(client, [])  # forgotten once the answer is complete


@pytest.mark.both_stores
async def test_a_fetch_while_another_job_s_end_is_recorded_keeps_that_job_journaled(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """A client fetches job A's results while job B's end is still being written (a slow commit): the
    client is not taken for done (B's results are not yet among what it owns), so the fetch's forget
    takes A alone, and B's results are still journaled: a restart would find them."""
    client = await make_bridge(await make_emulator())
    journal = client.app[JOURNAL]
    await run_job(client, "rest", TINY)
    gate, held = slow_ends(journal)
    status, second = await generate(client, "rest", TINY)
    assert status == 200
    await wait_for(lambda: held == [second["job_id"]])  # B ran; its end is being written
    assert len(await read_results(await client.get("/history", params={"clientId": "rest"}))) == 1  # A's
    gate.set()
    await poll_status(client, "rest", {"closed"})
    await asyncio.sleep(1.0)  # the fetch's forget joins a commit within half a second
    assert await journal_rows(client) == [("rest", "done", "")]
    assert len(await read_results(await client.get("/history", params={"clientId": "rest"}))) == 1  # B's


@pytest.mark.both_stores
async def test_a_client_s_unexpired_results_outlive_the_sweep_of_old_clients(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """The sweep forgets clients last seen (their job accepted) over result_ttl ago; one whose job ended
    later still owns its results until they expire, in memory and in the journal alike."""
    client = await make_bridge(await make_emulator(pace=0.8), result_ttl=3.0)
    await run_job(client, "slowpoke", TINY)  # accepted ~1.6 s before it ends
    await asyncio.sleep(2.0)  # the client was touched over result_ttl ago; its results are younger
    assert await journal_rows(client) == [("slowpoke", "done", "")]
    assert (await client.get("/execution-info", params={"clientId": "slowpoke"})).status == 200
    await wait_until_rows(client, [])  # then they expire, and go


@pytest.mark.both_stores
async def test_counter_is_the_larger_of_state_file_and_journal(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, base_settings: object
) -> None:
    emulator = await make_emulator()
    first = await make_bridge(emulator)
    for _ in range(3):
        await generate(first, "count", TINY)
    data_dir = first.app[SETTINGS].data_dir
    await first.close()
    state = data_dir / "current_state.json"
    assert orjson.loads(state.read_bytes()) == {"generation_count": 3}
    state.write_bytes(orjson.dumps({"generation_count": 2}))  # an older copy of the file
    second = await make_bridge(emulator)
    assert await (await second.get("/generation-count")).json() == 3
    await second.close()
    state.write_bytes(orjson.dumps({"generation_count": 10}))  # a journal restored from an older backup
    third = await make_bridge(emulator)
    assert await (await third.get("/generation-count")).json() == 10
    await generate(third, "count", TINY)
    assert await (await third.get("/generation-count")).json() == 11


@pytest.mark.both_stores
async def test_clients_that_own_nothing_are_not_persisted(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    emulator = await make_emulator()
    first = await make_bridge(emulator)
    for index in range(20):
        async with first.ws_connect("/ws", params={"clientId": f"visitor-{index}"}):
            pass
    _, names = await upload(first, {"file": ("a.png", png())}, client_id="owner")
    await run_job(first, "worker", TINY)
    data_dir = first.app[SETTINGS].data_dir
    await first.close()
    assert orjson.loads((data_dir / "current_state.json").read_bytes()) == {"generation_count": 1}
    second = await make_bridge(emulator)
    assert (await second.get("/execution-info", params={"clientId": "visitor-3"})).status == 400
    assert (await second.get("/execution-info", params={"clientId": "owner"})).status == 200
    assert seed(await (await second.get("/execution-info", params={"clientId": "worker"})).json()) == {
        "status": "closed",
        "detail": "Execution is done",
        "details": "Execution is done",
    }
    assert names["file"]


@pytest.mark.both_stores
async def test_an_upload_a_waiting_job_needs_does_not_expire(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    emulator = await make_emulator()
    emulator.engine.pause()
    client = await make_bridge(emulator, upload_ttl=0.3, pipeline_depth=0)
    await generate(client, "ahead", TINY)  # takes the only slot inside ComfyUI
    _, needed = await upload(client, {"file": ("needed.png", png(10, 10))}, client_id="pinned")
    status, _ = await generate(client, "pinned", {"workflow": "invert", "1/image": needed["file"]})
    assert status == 200
    _, control = await upload(client, {"file": ("control.png", png(10, 10))}, client_id="pinned")
    uploads = client.app[SETTINGS].data_dir / "uploads" / "c-pinned"
    await wait_for(lambda: not (uploads / control["file"]).exists())  # the sweeper ran past the TTL
    assert (uploads / needed["file"]).exists()
    emulator.engine.resume()
    info = await poll_status(client, "pinned", {"closed", "error"})
    assert info["status"] == "closed", info
    await wait_for(lambda: not (uploads / needed["file"]).exists())  # released when its job ended


async def test_invalid_step_is_refused() -> None:
    job = Job("c", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 1)
    await job.move(JobState.CANCELLED, error="interrupted")
    with pytest.raises(InvalidStep):
        job.move(JobState.RUNNING)
    assert job.state is JobState.CANCELLED


async def test_concurrent_accepts_share_commits(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    await journal.open()
    commits = 0
    original = journal._transaction

    def counted(writes: list[object]) -> object:
        nonlocal commits
        commits += 1
        return original(writes)  # type: ignore[arg-type]

    journal._transaction = counted  # type: ignore[assignment,method-assign]
    try:
        jobs = [Job(f"c{i}", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0) for i in range(200)]
        seqs = await asyncio.gather(*(journal.accept(job.record()) for job in jobs))
    finally:
        await journal.close()
    assert sorted(seqs) == list(range(1, 201))
    assert journal.count == 200
    assert commits < 20  # group commit: 200 accepts, a handful of fsyncs
    reopened = SqliteJournal(tmp_path / "journal.sqlite3")
    rows = await reopened.open()
    await reopened.close()
    assert [row["seq"] for row in rows] == list(range(1, 201))
    assert reopened.bridge_id == journal.bridge_id


async def test_forgets_wait_and_share_one_commit_and_spare_a_job_accepted_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgets are written together, LATER seconds on (or at close), in one commit off the path of the
    writes that follow; a client's forget spares its job accepted meanwhile, even if that one ended first."""
    monkeypatch.setattr(journal_module, "LATER", 3600.0)  # they go at close, whatever the machine's pace
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    await journal.open()
    commits: list[float] = []
    try:
        jobs = [Job(f"c{i}", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0) for i in range(20)]
        await asyncio.gather(*(journal.accept(job.record()) for job in jobs))
        await asyncio.gather(*(journal.update(job.id, {"state": "done"}) for job in jobs))
        journal.on_commit = commits.append
        forgets = [journal.forget([job.id], later=True) for job in jobs[:10]]
        forgets += [journal.forget_client(job.client_id, later=True) for job in jobs[10:19]]
        again = Job("c10", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0)  # c10 is back meanwhile
        await journal.accept(again.record())
        await journal.update(again.id, {"state": "done"})
        assert len(commits) == 2
        assert not any(forget.done() for forget in forgets)
    finally:
        await journal.close()
    await asyncio.gather(*forgets)
    assert len(commits) == 3
    reopened = SqliteJournal(tmp_path / "journal.sqlite3")
    rows = await reopened.open()
    await reopened.close()
    assert [row["id"] for row in rows] == [jobs[19].id, again.id]


async def test_full_disk_refuses_with_507_and_corrupts_nothing(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "small") as data_dir:
        client = await make_bridge(await make_emulator(), data_dir=data_dir)
        await run_job(client, "before", TINY)
        filler = fill(data_dir)
        status, body = await generate(client, "full", {**TINY, "1/width": 9})
        assert status == 507
        assert body == {"detail": "The bridge's disk is full, so nothing more can be recorded; try again later."}
        status, body = await upload(client, {"file": ("a.png", png())})
        assert status == 507
        assert "disk is full" in body["detail"]
        assert await (await client.get("/generation-count")).json() == 1
        assert (await client.get("/execution-info", params={"clientId": "full"})).status == 400
        filler.unlink()
        await run_job(client, "after", TINY)
        assert await (await client.get("/generation-count")).json() == 2
        assert [row[0] for row in await journal_rows(client)] == ["before", "after"]
        await client.close()
        with contextlib.closing(sqlite3.connect(data_dir / "journal.sqlite3")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert client.app[JOURNAL].count == 2


@pytest.mark.both_stores
async def test_a_stopping_bridge_refuses_new_jobs_with_503(bridge: Client) -> None:
    await bridge.app.shutdown()  # what SIGTERM runs first, before connections close
    status, body = await generate(bridge, "late", TINY)
    assert (status, body) == (
        503,
        {"detail": "The bridge is shutting down and accepts no new jobs; try again in a moment."},
    )
    assert await (await bridge.get("/generation-count")).json() == 0


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, client_id TEXT NOT NULL, workflow TEXT NOT NULL,
    state TEXT NOT NULL, backend TEXT, prompt_id TEXT NOT NULL, error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL NOT NULL, ended_at REAL, prompt BLOB NOT NULL, uploads BLOB NOT NULL, results BLOB
);
CREATE INDEX jobs_by_client ON jobs (client_id);
PRAGMA user_version=1;
"""


async def test_a_journal_of_the_previous_release_opens_and_its_jobs_run(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, base_settings: Any, workflow_dir: Path
) -> None:
    """Schema 1 (no webhook column, no deliveries table) is upgraded in place; its waiting job runs."""
    path = base_settings.journal_file
    path.parent.mkdir(parents=True)
    prompt = orjson.loads((workflow_dir / "b_emptyimage_save.json").read_bytes())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_1)
        conn.execute("INSERT INTO meta VALUES ('generation_count', '7'), ('bridge_id', 'comfybridge-old')")
        conn.execute(
            "INSERT INTO jobs (id, seq, client_id, workflow, state, prompt_id, accepted_at, prompt, uploads) "
            "VALUES ('a' || hex(randomblob(15)), 7, 'veteran', 'solid', 'waiting', ?, 1.0, ?, '{}')",
            ("0f0e0d0c-0b0a-4908-8706-050403020100", orjson.dumps(prompt)),
        )
        conn.commit()
    client = await make_bridge(await make_emulator())
    assert (await poll_status(client, "veteran", {"closed", "error"}))["status"] == "closed"
    assert await (await client.get("/generation-count")).json() == 7
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        assert "webhook" in columns
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0


@pytest.mark.parametrize("what", ["file", "WAL", "data folder"])
async def test_a_journal_deleted_while_running_is_written_back_and_keeps_every_job(
    make_bridge: BridgeFactory,
    make_emulator: EmulatorFactory,
    tmp_path: Path,
    what: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    await run_job(client, "before", TINY)
    status, _ = await generate(client, "unfetched", TINY)
    assert status == 200
    assert (await poll_status(client, "unfetched", {"closed", "error"}))["status"] == "closed"
    data = tmp_path / "data"
    journal = data / "journal.sqlite3"
    if what == "file":
        for name in (journal, *(journal.with_name(journal.name + end) for end in ("-wal", "-shm"))):
            name.unlink()
    elif what == "WAL":  # where nearly every change lives until a checkpoint
        journal.with_name(journal.name + "-wal").unlink()
    else:
        shutil.rmtree(data)
    status, body = await generate(client, "after", TINY)  # its commit looks first, and writes the file back
    assert status == 200, body
    assert (await poll_status(client, "after", {"closed", "error"}))["status"] == "closed"
    await wait_until_rows(client, [(name, "done", "") for name in ("before", "unfetched", "after")])
    assert (await client.get("/ready")).status == 200
    assert any("was deleted under the running bridge: written back" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataDirLocked, match="in use by another comfybridge"):  # the folder made again is locked
        DataDirLock.acquire(data, "a second bridge")
    await client.close()

    again = await make_bridge(emulator)  # the next start finds every job
    assert await (await again.get("/generation-count")).json() == 3
    for client_id in ("before", "unfetched", "after"):
        results = await read_results(await again.get("/history", params={"clientId": client_id}))
        assert len(results) == 1


async def test_a_journal_deleted_on_a_full_disk_is_written_back_in_the_space_it_held(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "small") as data_dir:
        client = await make_bridge(await make_emulator(), data_dir=data_dir)
        await run_job(client, "before", TINY)
        fill(data_dir)
        (data_dir / "journal.sqlite3").unlink()  # its blocks stay taken while the bridge holds it open
        await wait_until_rows(client, [("before", "done", "")])  # the next look writes it back
        assert not list(data_dir.glob("*.restoring*"))


async def test_a_journal_deleted_in_a_read_only_folder_refuses_until_it_can_be_written_back(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Every job stays in the bridge's memory meanwhile: the connection that held them is closed by
    then (its file's space freed), and the copy cannot be written yet."""
    data_dir = tmp_path / "data"
    client = await make_bridge(await make_emulator(), data_dir=data_dir)
    await run_job(client, "before", TINY)
    journal = data_dir / "journal.sqlite3"
    journal.unlink()
    with read_only(data_dir):
        status, body = await generate(client, "refused", TINY)
        assert status == 503
        assert f"its journal {journal} was deleted, and cannot be written back" in body["detail"]
        async with asyncio.timeout(10):  # the watch finds it too, and says so (the write's failure, first)
            while "was deleted" not in (await (ready := await client.get("/ready")).json()).get("detail", ""):
                await asyncio.sleep(0.05)
        assert ready.status == 503
        assert (await ready.json())["detail"].startswith(f"the job journal {journal} was deleted, and cannot be")
    await until_ready(client)  # writable again: the next look writes it back
    await run_job(client, "after", TINY)
    assert [row[0] for row in await journal_rows(client)] == ["before", "after"]
    assert await (await client.get("/generation-count")).json() == 2
    assert not list(data_dir.glob("*.restoring*"))


async def test_a_write_back_cut_short_by_a_stop_is_taken_up_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = SqliteJournal(path)
    await journal.open()
    job = Job("kept", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0)
    await journal.accept(job.record())
    await journal.close()
    path.rename(path.with_name(path.name + ".restoring"))  # the copy made whole, not yet in place
    path.with_name(path.name + ".restoring-partial").write_bytes(b"SQLite format 3\0cut")  # a later one, cut short
    reopened = SqliteJournal(path)
    rows = await reopened.open(count_floor=1)
    await reopened.close()
    assert [row["id"] for row in rows] == [job.id]
    assert sorted(os.listdir(tmp_path)) == ["journal.sqlite3"]


async def test_a_copy_deleted_again_while_it_is_written_back_costs_a_retry_not_the_jobs(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm -rf` still running takes the copy just before it is put in place: the jobs are still
    in the bridge's memory, and the next look writes them back (never an empty file of SQLite's)."""
    client = await make_bridge(await make_emulator())
    await run_job(client, "before", TINY)
    data = tmp_path / "data"
    taken: list[str] = []

    def deleted_again(source: Any, target: Any) -> None:
        if str(source).endswith(".restoring") and not taken:
            taken.append(source)
            shutil.rmtree(data)
        os.replace(source, target)

    monkeypatch.setattr(journal_file, "os", OsWith(replace=deleted_again))  # the journal's file handling only
    shutil.rmtree(data)
    await wait_until_rows(client, [("before", "done", "")])
    assert taken
    await until_ready(client)
    await run_job(client, "after", TINY)
    assert [row[0] for row in await journal_rows(client)] == ["before", "after"]


class OsWith:
    """The os module with some of its functions replaced, for one module's eyes only."""

    def __init__(self, **replaced: Any) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def starting_with(folder: Path, prefix: str) -> list[Path]:
    return [folder / name for name in os.listdir(folder) if name.startswith(prefix)]


def journal_of(client: Client) -> SqliteJournal:
    journal = client.app[JOURNAL]
    assert isinstance(journal, SqliteJournal)
    return journal


async def test_a_file_put_at_the_path_while_a_write_back_waits_is_not_overwritten(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    client = await make_bridge(await make_emulator(), data_dir=data_dir)
    await run_job(client, "before", TINY)
    journal = data_dir / "journal.sqlite3"
    journal.unlink()
    with read_only(data_dir):  # the copy waits in memory
        status, _ = await generate(client, "refused", TINY)
        assert status == 503
    journal.write_bytes(b"the operator's")  # a backup put back meanwhile, say
    status, body = await generate(client, "after", TINY)
    assert status == 503
    assert "another file put there before it could be written back" in body["detail"]
    assert journal.read_bytes() == b"the operator's"
    (aside,) = data_dir.glob("journal.sqlite3.displaced-*")
    with contextlib.closing(sqlite3.connect(f"file:{aside}?mode=ro", uri=True)) as conn:
        assert conn.execute("SELECT client_id FROM jobs").fetchall() == [("before",)]


async def test_a_write_back_still_waiting_at_a_stop_keeps_the_jobs_and_says_where(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(journal_file.tempfile, "gettempdir", lambda: str(tmp_path))
    data_dir = tmp_path / "data"
    client = await make_bridge(await make_emulator(), data_dir=data_dir)
    await run_job(client, "before", TINY)
    (data_dir / "journal.sqlite3").unlink()
    with read_only(data_dir):
        assert (await generate(client, "refused", TINY))[0] == 503  # the copy waits in memory
        await client.close()
    (kept,) = starting_with(tmp_path, "journal.sqlite3.unsaved-")
    with contextlib.closing(sqlite3.connect(f"file:{kept}?mode=ro", uri=True)) as conn:
        assert conn.execute("SELECT client_id FROM jobs").fetchall() == [("before",)]
    assert any(f"its jobs are kept in {kept}" in r.getMessage() for r in caplog.records)


async def test_a_journal_whose_files_vanish_as_they_are_opened_is_not_called_in_place(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm -rf` still running removes the file written back just as it is opened: a retry, not
    a journal taken for in place while its files are gone."""
    client = await make_bridge(await make_emulator())
    await run_job(client, "before", TINY)
    data = tmp_path / "data"
    file = journal_of(client).file
    opened, taken = file.open, []

    def removed_as_opened(create: bool = True) -> Any:
        if not create and not taken:
            taken.append(True)
            shutil.rmtree(data)
        return opened(create)

    monkeypatch.setattr(file, "open", removed_as_opened)
    shutil.rmtree(data)
    await wait_until_rows(client, [("before", "done", "")])
    assert taken
    await until_ready(client)  # written back: the failed write's "lost" clears at the watch's next look
    await run_job(client, "after", TINY)
    assert [row[0] for row in await journal_rows(client)] == ["before", "after"]


async def test_a_data_folder_replaced_by_a_file_refuses_until_a_folder_is_back(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """`stat` then fails with "Not a directory": gone, for whoever made it so, not a passing trouble."""
    data = tmp_path / "data"
    client = await make_bridge(await make_emulator(), data_dir=data)
    await run_job(client, "before", TINY)
    shutil.rmtree(data)
    data.write_text("x")
    status, body = await generate(client, "refused", TINY)
    assert status == 503
    assert "was deleted, and cannot be written back" in body["detail"]
    data.unlink()
    await wait_until_rows(client, [("before", "done", "")])


async def test_a_data_folder_moved_away_whole_stays_locked_where_it_went(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Its journal is in it: a bridge started there would run its jobs a second time."""
    data, moved = tmp_path / "data", tmp_path / "data.old"
    client = await make_bridge(await make_emulator(), data_dir=data)
    await run_job(client, "before", TINY)
    data.rename(moved)
    data.mkdir()
    await wait_until_rows(client, [("before", "done", "")])  # written back into the new folder
    for folder in (data, moved):
        with pytest.raises(DataDirLocked, match="in use by another comfybridge"):
            DataDirLock.acquire(folder, "a second bridge")


async def test_a_copy_left_beside_a_journal_is_kept_aside_never_taken_up_later(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = SqliteJournal(path)
    await journal.open()
    await journal.accept(Job("old", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0).record())
    await journal.close()
    shutil.copy(path, path.with_name("journal.sqlite3.restoring"))  # a copy a stop left, beside a journal
    again = SqliteJournal(path)
    await again.open(count_floor=1)
    await again.close()
    (aside,) = starting_with(tmp_path, "journal.sqlite3.displaced-")
    path.unlink()  # as an operator told to remove a journal would
    fresh = SqliteJournal(path)
    assert await fresh.open() == []  # the old jobs do not come back
    await fresh.close()
    assert aside.exists()


@pytest.mark.parametrize("checkpointed", [False, True], ids=["pages in its WAL", "pages in the file"])
async def test_a_journal_emptied_in_place_is_put_back_from_its_wal_or_refuses(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, checkpointed: bool
) -> None:
    """`: > journal.sqlite3` under the running bridge: what the WAL still holds is put back; if that
    is not all of it, no new job is taken, and the next start refuses too (never a start as if no job
    had been accepted)."""
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    await run_job(client, "before", TINY)
    journal = tmp_path / "data" / "journal.sqlite3"
    if checkpointed:  # every page moved into the file, and the WAL emptied: cutting the file loses them
        with contextlib.closing(sqlite3.connect(journal)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.truncate(journal, 0)
    status, body = await generate(client, "after", TINY)
    if not checkpointed:
        assert status == 200, body
        assert (await poll_status(client, "after", {"closed"}))["status"] == "closed"
        # The file holds them while the bridge runs: what a start after a kill would find.
        assert [row[0] for row in await journal_rows(client)] == ["before", "after"]
        return
    assert status == 503
    assert f"its journal {journal} was emptied by other hands" in body["detail"]
    await client.close()
    with pytest.raises(JournalError, match=r"is empty|is unreadable or corrupt"):  # as the next start opens it
        await SqliteJournal(journal).open(count_floor=1)


async def test_a_journal_replaced_while_running_stops_new_jobs_and_keeps_its_jobs_aside(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_bridge(await make_emulator())
    status, _ = await generate(client, "unfetched", TINY)
    assert status == 200
    assert (await poll_status(client, "unfetched", {"closed", "error"}))["status"] == "closed"
    journal = tmp_path / "data" / "journal.sqlite3"
    journal.unlink()
    journal.write_bytes(b"")  # another file at its path: not ours to overwrite
    status, body = await generate(client, "at-once", TINY)  # no window: the commit itself looks first
    assert status == 503
    assert body["detail"].startswith("The bridge cannot record anything: its journal")
    (aside,) = journal.parent.glob("journal.sqlite3.displaced-*")
    assert f"was replaced by another file; the jobs it held are kept in {aside}" in body["detail"]
    with contextlib.closing(sqlite3.connect(aside)) as conn:
        assert conn.execute("SELECT client_id, state FROM jobs").fetchall() == [("unfetched", "done")]
    assert journal.read_bytes() == b""
    # Our WAL beside the other file is empty: a kill now leaves no frames for SQLite to apply to it.
    assert journal.with_name(journal.name + "-wal").stat().st_size == 0
    ready = await client.get("/ready")
    async with asyncio.timeout(10):
        while ready.status == 200:
            await asyncio.sleep(0.05)
            ready = await client.get("/ready")
    assert (await ready.json())["detail"].startswith(f"the job journal {journal} was replaced by another file")
    status, body = await generate(client, "after", TINY)
    assert status == 503
    assert body["detail"].startswith("The bridge cannot record new jobs: its journal ")
    assert await (await client.get("/generation-count")).json() == 1
    assert any(r.levelname == "ERROR" and "accepting no new jobs" in r.getMessage() for r in caplog.records)
    status, body = await upload(client, {"file": ("a.png", png())}, client_id="after")  # no job could use it
    assert status == 503
    assert body["detail"].startswith("The bridge cannot take uploads: its journal ")


async def test_results_no_journal_row_names_are_moved_aside_at_start_never_deleted(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, inline_result_kb=0)  # results as files
    frames = await run_job(client, "unfetched", TINY)
    job_id = frames[-1]["job_id"]
    stored = sorted((tmp_path / "data" / "results" / job_id).iterdir())
    contents = [path.read_bytes() for path in stored]
    await client.close()
    for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"):
        (tmp_path / "data" / name).unlink(missing_ok=True)
    again = await make_bridge(emulator, inline_result_kb=0)
    assert (await again.get("/history", params={"clientId": "unfetched"})).status == 204
    (aside,) = (tmp_path / "data" / "orphans").iterdir()
    assert aside.name.startswith("results-")
    assert [p.read_bytes() for p in sorted((aside / job_id).iterdir())] == contents
    assert not (tmp_path / "data" / "results" / job_id).exists()
    assert any(f"moved 1 result folders that no journal row names to {aside}" in r.getMessage() for r in caplog.records)


@pytest.mark.both_stores
async def test_a_jobs_end_is_told_only_once_it_is_recorded(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    client = await make_bridge(await make_emulator())
    journal = client.app[JOURNAL]
    real_update, refused = journal.update, []

    def update(job_id: str, fields: dict[str, Any], delivery: dict[str, Any] | None = None) -> Any:
        if fields.get("state") == "done" and len(refused) < 2:  # the disk refuses the end, twice
            refused.append(job_id)
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(StorageFull("The bridge's disk is full, so nothing more can be recorded."))
            return failed
        return real_update(job_id, fields, delivery)

    journal.update = update  # type: ignore[method-assign]
    async with client.ws_connect("/ws", params={"clientId": "durable"}) as ws:
        status, _ = await generate(client, "durable", TINY)
        assert status == 200
        await wait_for(lambda: len(refused) == 1)
        info = await (await client.get("/execution-info", params={"clientId": "durable"})).json()
        assert info["status"] != "closed"  # not durable, so not told
        assert (await client.get("/history", params={"clientId": "durable"})).status == 204
        frames = await frames_until(ws, "closed")  # once a later try lands
    assert len(refused) == 2
    assert "closed" not in [f["status"] for f in frames[:-1]]
    assert [row[1] for row in await journal_rows(client) if row[0] == "durable"] == ["done"]
    assert (await client.get("/history", params={"clientId": "durable"})).status == 200


@pytest.mark.both_stores
async def test_small_results_ride_in_the_journal_with_no_file_of_their_own(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, storage: dict[str, str]
) -> None:
    """An output up to inline_result_kb is kept with its job's end: no file (or object) is
    written, it survives a restart, and it comes back whole, as bytes or as base64."""
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    jobs = [(await run_job(client, "small", TINY))[-1]["job_id"] for _ in range(2)]
    assert stored(client, "results") == []
    await client.close()
    again = await make_bridge(emulator)
    answer = await (await again.get("/history", params={"clientId": "small", "resType": "base64"})).json()
    assert sorted(f["job_id"] for f in answer["files"]) == sorted(jobs)
    contents = [base64.b64decode(f["content"]) for f in answer["files"]]
    assert all(c.startswith(b"\x89PNG") and c.endswith(b"IEND\xaeB`\x82") for c in contents)
    assert (await again.get("/history", params={"clientId": "small"})).status == 204
    assert stored(again, "results") == []


async def test_larger_results_and_any_past_the_memory_budget_are_files(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_bridge(await make_emulator(), inline_result_kb=0.1)
    await run_job(client, "large", {**TINY, "1/width": 64, "1/height": 64})  # a PNG over 100 bytes
    assert len(stored(client, "results")) == 1
    roomy = await make_bridge(await make_emulator())
    monkeypatch.setattr(results_module, "INLINE_BUDGET", 0)  # memory holds no more inline results
    await run_job(roomy, "spilled", TINY)
    assert len(stored(roomy, "results")) == 1
    for bridge, client_id in ((client, "large"), (roomy, "spilled")):
        (part,) = await read_results(await bridge.get("/history", params={"clientId": client_id}))
        assert part[3].startswith(b"\x89PNG")
    await wait_for(lambda: stored(client, "results") == stored(roomy, "results") == [])  # deleted once fetched


async def test_a_jobs_inline_results_are_bounded_so_its_end_commit_stays_small(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline results of one job share one commit: past JOB_INLINE_MAX the job's further files are
    files, counted as each is committed (not only once the job has ended)."""
    client = await make_bridge(await make_emulator())
    await run_job(client, "probe", TINY)
    (one,) = await read_results(await client.get("/history", params={"clientId": "probe"}))
    monkeypatch.setattr(results_module, "JOB_INLINE_MAX", len(one[3]))  # room for one of the pair
    await run_job(client, "pair", {**TINY, "1/batch_size": 2})
    assert len(stored(client, "results")) == 1
    parts = await read_results(await client.get("/history", params={"clientId": "pair"}))
    assert [len(p[3]) for p in parts] == [len(one[3])] * 2


async def test_a_fetch_the_journal_could_not_forget_is_forgotten_later_never_served_twice(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    await run_job(client, "once", TINY)
    journal = client.app[JOURNAL]
    refused: list[str] = []

    def away_once(forget: Any) -> Any:
        def write(*args: Any, **kwargs: Any) -> asyncio.Future[None]:
            if refused:
                return forget(*args, **kwargs)
            refused.append(forget.__name__)
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(StorageUnavailable("the database is away"))
            return failed

        return write

    journal.forget, journal.forget_client = away_once(journal.forget), away_once(journal.forget_client)
    assert len(await read_results(await client.get("/history", params={"clientId": "once"}))) == 1
    await wait_until_rows(client, [])  # asked again, it lands
    assert refused == ["forget_client"]
    assert any("not yet forgotten in the journal" in r.getMessage() for r in caplog.records)
    await client.close()

    again = await make_bridge(emulator)  # a restart does not serve them a second time
    assert (await again.get("/history", params={"clientId": "once"})).status == 204  # nothing to fetch


async def test_a_recovered_job_waited_since_it_was_accepted_not_since_the_restart(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, workflow_dir: Path
) -> None:
    emulator = await make_emulator()
    first = await make_bridge(emulator)
    path = first.app[SETTINGS].journal_file
    await first.close()
    prompt = orjson.loads((workflow_dir / "b_emptyimage_save.json").read_bytes())
    with contextlib.closing(sqlite3.connect(path)) as conn:  # accepted an hour ago, by a bridge since gone
        conn.execute(
            "INSERT INTO jobs (id, seq, client_id, workflow, state, prompt_id, accepted_at, prompt, uploads) "
            "VALUES ('a' || hex(randomblob(15)), 1, 'patient', 'solid', 'waiting', ?, ?, ?, '{}')",
            ("0f0e0d0c-0b0a-4908-8706-050403020100", time.time() - 3600, orjson.dumps(prompt)),
        )
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'generation_count'")
        conn.commit()
    again = await make_bridge(emulator)
    assert (await poll_status(again, "patient", {"closed", "error"}))["status"] == "closed"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await (await again.get("/metrics")).text())
        for s in family.samples
    }
    waited = samples[("comfybridge_job_wait_seconds_sum", (("backend", emulator.url), ("workflow", "solid")))]
    assert 3600 <= waited < 3600 + 60


def test_the_state_file_written_on_a_full_disk_leaves_no_temporary_file(tmp_path: Path) -> None:
    with small_disk(tmp_path / "small") as folder:
        fill(folder)
        with pytest.raises(OSError, match="No space left"):
            atomic_write(folder / "current_state.json", b'{"generation_count": 1}' * 2000)
        assert sorted(os.listdir(folder)) == ["filler"]
