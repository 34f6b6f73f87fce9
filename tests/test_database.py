"""The jobs in PostgreSQL (`--database`): start-up against a real server, its schema migrations under
a lock, what a database that cannot be used does, and the journal's own behaviours (test_journal.py
and test_restarts.py run them on both stores)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from comfybridge.core.jobs import Job
from comfybridge.edge.relay import ClusterView
from comfybridge.errors import StorageUnavailable
from comfybridge.leadership import Leadership
from comfybridge.store import pgjournal
from comfybridge.store.journal import JournalError
from comfybridge.store.pgjournal import MIGRATIONS, Leader, PgJournal

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import (
    TINY,
    assert_one_line_error,
    backends,
    bridge_process,
    count,
    fetch_results,
    frames_until,
    run_cli,
    submit,
    wait_closed,
)
from .postgres import PostgresServer, running_postgres
from .services import unused_port


async def test_an_unreachable_database_is_one_line_and_exit_2(workdir: Path) -> None:
    dsn = f"postgresql://bridge:s3cret@127.0.0.1:{unused_port()}/jobs"  # nothing listens there
    result = await asyncio.to_thread(run_cli, ["--backends", "127.0.0.1:9", "--database", dsn], workdir)
    assert_one_line_error(result, "database postgresql://bridge@127.0.0.1:", "cannot be used")
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    "value", ["mysql://u:s3cret@h/db", "postgresql://u:s3cret@/db", "postgresql://u:s3cret@h:99999/db"]
)
def test_a_database_setting_that_is_not_usable_is_refused_without_its_password(workdir: Path, value: str) -> None:
    result = run_cli(["--database", value], workdir)
    assert_one_line_error(
        result, "--database: (its value hidden) must be empty (the SQLite journal) or a postgresql://"
    )
    assert "s3cret" not in result.stderr


async def test_jobs_survive_a_restart_in_the_database_not_the_data_folder(
    workdir: Path, postgres: PostgresServer, make_emulator: EmulatorFactory
) -> None:
    database = postgres.new_database()
    flags = (*backends(await make_emulator()), "--database", database)
    async with bridge_process(workdir, *flags) as (_, url):
        await submit(url, "kept")
        await submit(url, "kept")
    assert not (workdir / "data" / "journal.sqlite3").exists()
    async with bridge_process(workdir, *flags) as (_, url):
        assert await count(url) == 2
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM jobs WHERE client_id = 'kept'") == 2
    finally:
        await conn.close()


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


async def test_a_bridge_standing_down_learns_the_next_leader_without_the_incumbents_wait(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait after a lost connection lets a restarted database's incumbent take its lock back
    before a follower does. A bridge that stands down (it only follows) must not wait: until it knows
    the next leader, it can only refuse the requests it would relay."""
    database = postgres.new_database()
    leader, standing_down = PgJournal(database), PgJournal(database)
    await leader.connect()
    await leader.campaign("http://leader", lambda _: None)  # nobody else contends: won at once
    monkeypatch.setattr(pgjournal, "INCUMBENT_WAIT", 3600.0)  # were it waited, the test would time out
    heard = asyncio.Event()

    def follow(next_leader: Leader | None) -> None:
        if next_leader is not None and next_leader.url == "http://leader":
            heard.set()

    campaign = asyncio.create_task(standing_down.campaign("http://other", follow, contend=False))
    try:
        async with asyncio.timeout(30):
            await heard.wait()
    finally:
        campaign.cancel()
        await asyncio.gather(campaign, return_exceptions=True)
        await standing_down.close()
        await leader.close()


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


async def test_a_job_accepted_again_keeps_its_number_and_counts_once(postgres: PostgresServer) -> None:
    """A commit whose answer was lost is sent again: the job is in already, and the count rose once."""
    journal = PgJournal(postgres.new_database())
    await journal.open()
    try:
        first, second = (Job("c", "w", b"{}", 0) for _ in range(2))
        assert await journal.accept(first.record()) == 1
        assert await journal.accept(first.record()) == 1
        assert await journal.accept(second.record()) == 2
        assert journal.count == 2
    finally:
        await journal.close()
    reopened = PgJournal(journal.dsn)
    try:
        assert len(await reopened.open()) == 2
        assert reopened.count == 2
    finally:
        await reopened.close()


async def answer_dropping_proxy(port: int, trigger: bytes) -> asyncio.Server:
    """A TCP proxy to PostgreSQL that lets the server run and commit the first statement holding
    `trigger` (prepared, then executed: the second ReadyForQuery after it ends the execution's
    answer), then cuts the connection instead of passing that answer on."""
    ready = b"Z\x00\x00\x00\x05I"  # ReadyForQuery, idle: nothing is left uncommitted
    armed = {"answers": -1}  # ReadyForQuery messages still to pass on before the cut; -1: not armed

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if trigger in data and armed["answers"] == -1:
                    armed["answers"] = 1  # the preparation's answer passes; the execution's does not
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if armed["answers"] == 0 and ready in data:
                    armed["answers"] = -2  # done: never again
                    client_w.transport.abort()  # the client sees its connection reset at once
                    return
                if armed["answers"] > 0 and ready in data:
                    armed["answers"] -= 1
                client_w.write(data)
                await client_w.drain()

        try:
            await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        finally:
            for writer in (client_w, server_w):
                writer.transport.abort()
                writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_commit_whose_answer_is_lost_is_sent_again_not_refused(postgres: PostgresServer) -> None:
    """The connection breaks after PostgreSQL committed an accept: the journal commits again on a new
    session (the job is found in already), so the client hears 'accepted', not 'try again' (which
    would make it submit a second job while the first waited unseen)."""
    database = postgres.new_database()
    proxy = await answer_dropping_proxy(postgres.port, b"WITH counted")
    proxy_port = proxy.sockets[0].getsockname()[1]
    journal = PgJournal(f"postgresql://postgres@127.0.0.1:{proxy_port}/{database.rsplit('/', 1)[1]}")
    await journal.open()
    try:
        first, second = Job("c", "w", b"{}", 0), Job("c", "w", b"{}", 0)
        assert await journal.accept(first.record()) == 1
        assert await journal.accept(second.record()) == 2
    finally:
        await journal.close()
        proxy.close()
        await proxy.wait_closed()
    conn = await asyncpg.connect(database)
    try:
        assert [tuple(r) for r in await conn.fetch("SELECT id, seq FROM jobs ORDER BY seq")] == [
            (first.id, 1), (second.id, 2),
        ]  # fmt: skip
        assert await conn.fetchval("SELECT value FROM meta WHERE key = 'generation_count'") == "2"
    finally:
        await conn.close()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, which it may stop and start."""
    yield from running_postgres()


async def test_a_restarted_database_is_reconnected_and_its_lock_taken_again(
    own_postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    journal = PgJournal(own_postgres.new_database())
    await journal.open()
    try:
        job = Job("c", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0)
        assert await journal.accept(job.record()) == 1
        own_postgres.stop()
        caplog.clear()
        for n in range(20):  # refused at once, not hung; and nobody waits for most writes (forgets), so
            with pytest.raises(StorageUnavailable):  # each failure must not be a log line of its own
                await journal.update(job.id, {"error": f"while down {n}"})
        failures = [r for r in caplog.records if r.levelno >= logging.WARNING and "fail" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        own_postgres.start()
        await journal.update(job.id, {"error": "after"})  # a new session, locked again
        second = PgJournal(journal.dsn)
        with pytest.raises(JournalError, match="in use by another comfybridge"):
            await second.open()
        assert journal.lost() is None
    finally:
        await journal.close()


async def test_a_database_taken_while_the_connection_was_down_is_lost_not_shared(
    own_postgres: PostgresServer,
) -> None:
    first = PgJournal(own_postgres.new_database())
    await first.open()
    own_postgres.stop()
    own_postgres.start()  # first's session is gone, and its lock with it
    second = PgJournal(first.dsn)
    await second.open()
    try:
        job = Job("c", "w", b'{"1": {"class_type": "X", "inputs": {}}}', 0)
        with pytest.raises(StorageUnavailable, match="taken by another comfybridge"):
            await first.accept(job.record())
        assert first.lost() == "was taken by another comfybridge while the connection to it was down"
        assert await second.accept(job.record()) == 1  # one bridge records, never two
    finally:
        await first.close()
        await second.close()


@pytest.mark.timeout(120)
async def test_postgresql_stopped_and_started_mid_burst_loses_and_repeats_nothing(
    workdir: Path, make_emulator: EmulatorFactory, own_postgres: PostgresServer
) -> None:
    """While the database is away: every request that needs it answers 503 within a bound (never a
    500, never a hang), prompts inside ComfyUI run on; once it is back, every accepted job ends once."""
    emulator = await make_emulator(pace=0.05)
    database = own_postgres.new_database()
    accepted: dict[str, str] = {}
    refused = 0
    clients = [f"db-{i}" for i in range(6)]
    async with (
        bridge_process(workdir, *backends(emulator, database=database)) as (_, url),
        aiohttp.ClientSession() as session,
    ):

        async def submit_one(client_id: str) -> None:
            nonlocal refused
            async with asyncio.timeout(20):  # bounded, whatever the database does
                async with session.post(
                    f"{url}/generate-based-workflow", params={"clientId": client_id}, json=TINY
                ) as resp:
                    body = await resp.json()
            assert resp.status in (200, 503), (resp.status, body)
            if resp.status == 200:
                accepted[body["job_id"]] = client_id
            else:
                assert resp.headers["Retry-After"] == "2", body  # the outage is likely to pass
                refused += 1

        for client_id in clients:
            for _ in range(3):
                await submit_one(client_id)
        await wait_for(lambda: len(emulator.engine.started) >= 3)
        own_postgres.stop()
        for client_id in clients:
            await submit_one(client_id)  # refused while it is away
        async with session.get(f"{url}/health") as resp:
            assert resp.status == 200
        own_postgres.start()
        for client_id in clients:
            await submit_one(client_id)
        await wait_closed(session, url, sorted(set(accepted.values())), timeout=90)
        delivered = [job for c in clients for job, _ in await fetch_results(session, url, c)]
    assert refused >= len(clients)
    assert sorted(delivered) == sorted(accepted)  # every accepted job, once
    log = (workdir / "bridge.log").read_text()
    assert "write failed" in log  # the outage did hit the journal's writes
    assert "Traceback" not in log
    assert " 500 " not in log
    started = emulator.engine.started
    assert len(started) == len(set(started))  # no prompt ran twice


async def test_a_leader_slow_to_start_its_term_is_not_deposed_as_frozen(postgres: PostgresServer) -> None:
    """A leader that just won the lock starts its term (the journal loaded, the stores listed, the
    backends' first connect awaited) before `_hold` sends its first heartbeat: its session must not
    look frozen to a follower meanwhile (DEPOSE_FROZEN, at 4 s with --leader-timeout 1)."""
    database = postgres.new_database()
    a, b = PgJournal(database, "http://a", silence=1.0), PgJournal(database, "http://b", silence=1.0)
    await a.connect()
    entered, ended = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def term(again: bool) -> AsyncIterator[None]:
        await a.open()
        await asyncio.sleep(6.0)  # the term's start-up: a bucket listed, a backend's connect awaited
        entered.set()
        try:
            yield
        finally:
            ended.set()
            await a.close()

    async def demoted() -> None:
        pass

    leading = Leadership(ClusterView("http://a"), a, term, 1.0, demoted)
    leading.start()
    try:
        async with asyncio.timeout(10):
            while a.leader is None or a.leader.url != "http://a":
                await asyncio.sleep(0.05)
        await b.connect()
        seen: list[Leader | None] = []
        follower = asyncio.create_task(b.campaign("http://b", seen.append))
        try:
            async with asyncio.timeout(20):
                await entered.wait()
            await asyncio.sleep(4.0)  # leading, heartbeat after heartbeat
            assert not ended.is_set(), "the live leader's term ended: its session was ended as frozen"
            assert not follower.done(), "the follower took the lock of a leader that was alive"
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    finally:
        await leading.stop()
        await b.close()
        await a.close()


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
async def test_a_leader_handing_over_closes_the_socket_of_a_client_that_fetched_without_a_fault(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Cluster mode: a client fetched its results with its socket open (the SDK's usual run, then
    save_results). The leader hands over (SIGTERM with a peer there): its term ends, its journal is
    closed, then `demoted` closes the term's sockets (1012). `socket_closed` now journals
    forget_client for that client, on the closed journal: RuntimeError out of the socket's handler
    (its outbox never closed), logged with a traceback as a request "cut off after its answer began"."""
    from comfybridge.app import LEADERSHIP
    from comfybridge.edge.appkeys import CLUSTER

    emulator = await make_emulator()
    leader = await make_bridge(emulator)
    await wait_for(lambda: leader.app[CLUSTER].leading, 30)
    await make_bridge(emulator)  # a peer to take over
    async with leader.ws_connect("/ws", params={"clientId": "fetched"}) as ws:
        status = (
            await leader.post(
                "/generate-based-workflow", params={"clientId": "fetched"}, json={"workflow": "solid", "1/width": 8}
            )
        ).status
        assert status == 200
        await frames_until(ws, "closed")
        resp = await leader.get("/history", params={"clientId": "fetched"})
        assert resp.status == 200
        await resp.read()
        caplog.clear()
        caplog.set_level(logging.WARNING)
        leader.app[LEADERSHIP].stand_down()
        async with asyncio.timeout(20):
            while not ws.closed:
                await ws.receive()
        assert ws.close_code == 1012
    await asyncio.sleep(0.5)
    faults = [r.getMessage() for r in caplog.records if r.exc_info or "cut off" in r.getMessage()]
    assert not faults, faults
