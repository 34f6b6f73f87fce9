"""The jobs in PostgreSQL (`--database`): start-up against a real server, its schema migrations under
a lock, what a database that cannot be used does, and the journal's own behaviours (test_journal.py
and test_restarts.py run them on both stores)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from comfybridge.core.jobs import Job
from comfybridge.store.journal import JournalError
from comfybridge.store.pgjournal import MIGRATIONS, PgJournal

from .helpers import assert_one_line_error, bridge_process, count, run_cli, submit, unused_port
from .postgres import PostgresServer


async def test_an_unreachable_database_is_one_line_and_exit_2(workdir: Path) -> None:
    dsn = f"postgresql://bridge:s3cret@127.0.0.1:{unused_port()}/jobs"  # nothing listens there
    result = await asyncio.to_thread(run_cli, ["--emulate", "1", "--database", dsn], workdir)
    assert_one_line_error(result, "database postgresql://bridge@127.0.0.1:", "cannot be used")
    assert "s3cret" not in result.stderr


def test_a_database_setting_that_is_not_postgresql_is_refused(workdir: Path) -> None:
    result = run_cli(["--database", "mysql://h/db"], workdir)
    assert_one_line_error(result, "--database: 'mysql://h/db' must be empty (the SQLite journal) or a postgresql://")


async def test_jobs_survive_a_restart_in_the_database_not_the_data_folder(
    workdir: Path, postgres: PostgresServer
) -> None:
    database = postgres.new_database()
    async with bridge_process(workdir, "--emulate", "1", "--database", database) as (_, url):
        await submit(url, "kept")
        await submit(url, "kept")
    assert not (workdir / "data" / "journal.sqlite3").exists()
    async with bridge_process(workdir, "--emulate", "1", "--database", database) as (_, url):
        assert await count(url) == 2
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM jobs WHERE client_id = 'kept'") == 2
    finally:
        await conn.close()


async def test_a_second_bridge_on_one_database_is_refused_for_now(
    workdir: Path, tmp_path: Path, postgres: PostgresServer
) -> None:
    database = postgres.new_database()
    async with bridge_process(workdir, "--emulate", "1", "--database", database):
        other = tmp_path / "other"
        (other / "workflows").mkdir(parents=True)
        result = await asyncio.to_thread(run_cli, ["--emulate", "1", "--database", database], other)
        assert_one_line_error(result, "is in use by another comfybridge")


async def test_two_bridges_starting_together_migrate_once(postgres: PostgresServer) -> None:
    database = postgres.new_database()
    journals = [PgJournal(database) for _ in range(4)]
    opened = await asyncio.gather(*(j.open() for j in journals), return_exceptions=True)
    winners = [j for j, outcome in zip(journals, opened, strict=True) if not isinstance(outcome, BaseException)]
    assert len(winners) == 1  # the others are refused: one bridge per database until cluster mode
    assert all(isinstance(o, JournalError) for o in opened if isinstance(o, BaseException))
    await winners[0].close()
    conn = await asyncpg.connect(database)
    try:
        versions = [row[0] for row in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [v for v, _ in MIGRATIONS]
        await conn.execute("INSERT INTO schema_migrations (version) VALUES (999)")
    finally:
        await conn.close()
    with pytest.raises(JournalError, match="written by a newer comfybridge"):
        await PgJournal(database).open()


async def test_writes_land_in_the_order_asked_and_share_commits(postgres: PostgresServer) -> None:
    journal = PgJournal(postgres.new_database())
    await journal.open()
    commits: list[float] = []
    journal.on_commit = commits.append
    try:
        job = Job("c", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0)
        await journal.accept(job.record())
        steps = [journal.update(job.id, {"error": f"step {i}"}) for i in range(200)]
        await asyncio.gather(*steps)
    finally:
        await journal.close()
    assert len(commits) < 50  # 200 steps asked at once share a few commits
    conn = await asyncpg.connect(journal.dsn)
    try:
        assert await conn.fetchval("SELECT error FROM jobs WHERE id = $1", job.id) == "step 199"
    finally:
        await conn.close()
