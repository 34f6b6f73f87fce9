"""Memory and disk against outside input: long texts refused, waiting jobs kept compact, clients that own
nothing forgotten, a data folder that cannot be written answered with a clear 503 or 507."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfybridge.edge.appkeys import SCHEDULER
from comfybridge.store.journal import SqliteJournal

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import generate, png, small_disk, upload

TEXT = {"workflow": "text-to-image", "6/text": "a red fox"}


async def test_a_text_input_over_max_text_kb_is_refused_and_nothing_is_accepted(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    client = await make_bridge(await make_emulator(), max_text_kb=2)
    status, body = await generate(client, "long", {**TEXT, "6/text": "ü" * 1500})  # 3,000 bytes of UTF-8
    assert status == 413
    assert body == {"detail": "Input '6/text' is 3000 bytes long, over the limit of 2 KB (2048 bytes, max_text_kb)."}
    assert await (await client.get("/generation-count")).json() == 0
    status, _ = await generate(client, "long", {**TEXT, "6/text": "x" * 2048})  # at the limit: fine
    assert status == 200


async def test_waiting_jobs_hold_their_prompt_compact_and_no_progress_state(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    emulator = await make_emulator()
    emulator.engine.pause()
    client = await make_bridge(emulator, pipeline_depth=0)
    for index in range(5):
        status, _ = await generate(client, "many", {**TEXT, "3/seed": index})
        assert status == 200
    core = client.app[SCHEDULER].core
    waiting = list(core.queue.order())
    assert len(waiting) == 4  # one is inside ComfyUI
    for job in waiting:
        assert isinstance(job.prompt, bytes)
        assert job._progress is None
    emulator.engine.resume()


async def test_a_client_that_only_opened_a_socket_is_forgotten_when_it_closes(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    client = await make_bridge(await make_emulator())
    scheduler = client.app[SCHEDULER]
    async with client.ws_connect("/ws", params={"clientId": "visitor"}) as ws:
        await ws.receive()
        assert (await client.get("/execution-info", params={"clientId": "visitor"})).status == 200
    await wait_for(lambda: scheduler.clients.get("visitor") is None)
    assert (await client.get("/execution-info", params={"clientId": "visitor"})).status == 400
    # One that had a job stays known after its socket goes: its status is still to be read.
    async with client.ws_connect("/ws", params={"clientId": "worker"}) as ws:
        status, _ = await generate(client, "worker", {"workflow": "solid", "1/batch_size": 1})
        assert status == 200
        while (await ws.receive_json())["status"] != "closed":
            pass
    assert (await client.get("/execution-info", params={"clientId": "worker"})).status == 200


@contextlib.contextmanager
def read_only_uploads(data_dir: Path) -> Iterator[None]:
    """Make the upload folder refuse writes for real: its own tmpfs remounted read-only as root
    (permission bits do not stop root), else its permission bits."""
    uploads = data_dir / "uploads"
    if os.geteuid() == 0:
        with small_disk(uploads, "16m"):
            yield_ro = subprocess.run(["mount", "-o", "remount,ro", str(uploads)], capture_output=True)
            if yield_ro.returncode != 0:
                pytest.skip(f"cannot remount a tmpfs read-only here: {yield_ro.stderr.decode().strip()}")
            yield
    else:
        uploads.mkdir(parents=True, exist_ok=True)
        uploads.chmod(0o555)
        try:
            yield
        finally:
            uploads.chmod(0o755)


async def test_a_data_folder_that_refuses_writes_answers_503_with_a_clear_detail(
    make_bridge: BridgeFactory,
    make_emulator: EmulatorFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir = tmp_path / "data"
    with read_only_uploads(data_dir):
        client = await make_bridge(await make_emulator(), data_dir=data_dir)
        status, body = await upload(client, {"file": ("a.png", png())}, client_id="ro")
        assert status == 503
        assert body["detail"].startswith("The bridge cannot write to its data folder (")
        assert body["detail"].endswith("), so the file was not stored; its operator has been told in the log.")
        # The journal refusing a write, as SQLite does on a read-only disk.
        failure = sqlite3.OperationalError("attempt to write a readonly database")
        failure.sqlite_errorname = "SQLITE_READONLY"  # type: ignore[attr-defined]

        def refuse(self: SqliteJournal, writes: Any) -> Any:
            raise failure

        monkeypatch.setattr(SqliteJournal, "_transaction", refuse)
        status, body = await generate(client, "during", {"workflow": "solid", "1/batch_size": 1})
        assert status == 503
        assert body == {
            "detail": "The bridge could not record the change (attempt to write a readonly database); "
            "its operator has been told."
        }
        monkeypatch.undo()
        assert await (await client.get("/generation-count")).json() == 0
        assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere
        assert any(r.levelno == logging.ERROR and "uploads: cannot write" in r.getMessage() for r in caplog.records)
        await client.close()
