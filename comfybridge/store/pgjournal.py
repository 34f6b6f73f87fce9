"""The job journal in PostgreSQL (`--database postgresql://...`): the same `JobStore` as the SQLite
journal, its schema brought up to date by versioned migrations under a lock at start-up.

asyncpg is the driver: measured against psycopg 3 with its pool on what the journal does (an accept
and a step per job, 1 and 32 callers), it matched or beat its rate and cost the bridge about a third
less CPU per job (0.25 vs 0.38 ms at 32 callers). It is the `cluster` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from yarl import URL

from ..errors import StorageError, StorageFull, StorageUnavailable
from .journal import COLUMNS, ENDED_STATES, JournalError, OutageLog, retrieve_failure, row_of, values_of

if TYPE_CHECKING:
    from typing import TypeAlias

    import asyncpg

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record]

__all__ = ["MIGRATIONS", "Leader", "PgJournal", "keepalives", "shown_dsn"]

log = logging.getLogger(__name__)

# Taken (inside the migrating transaction) by every bridge that starts: two starting at once migrate once.
MIGRATION_LOCK = 0x636F6D6679  # "comfy"
# Held by the leading bridge, on the one connection that carries its writes: if that session ends,
# its lock and its writes end together, so two bridges can never both write as the leader.
BRIDGE_LOCK = 0x6272696467  # "bridg"
INCUMBENT_WAIT = 3.0  # seconds a bridge that lost the database waits, once back, before it campaigns
# A leader whose session said nothing for FROZEN_FACTOR * leader_timeout + FROZEN_MARGIN seconds is
# frozen (paused, its loop blocked): it stopped sending at leader_timeout (`Leadership.holds`), but
# PostgreSQL keeps its lock while its host answers keepalives. A follower ends that session.
FROZEN_FACTOR = 2.0
FROZEN_MARGIN = 2.0
# The lock's holder, if its session has run no query of its own for $3 seconds: idle, idle in a
# transaction, or halfway through a request (`active` but waiting on the client: ClientRead); its
# session ended. clock_timestamp is the database's clock: no two hosts' clocks are compared.
DEPOSE_FROZEN = """
SELECT a.pid, extract(epoch FROM clock_timestamp() - a.state_change)::float8 AS silent,
       pg_terminate_backend(a.pid) AS ended
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND a.pid <> pg_backend_pid() AND a.state IS NOT NULL AND (a.state <> 'active' OR a.wait_event_type = 'Client')
  AND a.state_change < clock_timestamp() - make_interval(secs => $3)
"""
# How long PostgreSQL keeps a silent leader's session (and lock): `silence` + 1 s idle, then 3 probes
# 2 s apart, so at least 7 s after the leader itself has stopped sending (`silence` without an answer).
KEEPALIVE_PROBES = (2, 3)  # seconds apart, how many


def keepalives(silence: float) -> dict[str, str]:
    interval, count = KEEPALIVE_PROBES
    return {
        "tcp_keepalives_idle": str(math.ceil(silence) + 1),
        "tcp_keepalives_interval": str(interval),
        "tcp_keepalives_count": str(count),
    }


APPLICATION = "comfybridge"  # every bridge's sessions' application_name
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 15.0  # seconds one commit may take before it counts as the database's trouble
MAX_BATCH = 512  # writes in one commit at most
FAILURE_LOG_EVERY = 10.0  # seconds between log lines about writes failing in a row (an outage)
RETRY_AFTER = 2  # seconds a refused client is told to wait: a restart of PostgreSQL takes about that
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE jobs (
            id text PRIMARY KEY,
            seq bigint NOT NULL,
            client_id text NOT NULL,
            workflow text NOT NULL,
            state text NOT NULL,
            backend text,
            prompt_id text NOT NULL,
            error text,
            attempts integer NOT NULL DEFAULT 0,
            retries integer NOT NULL DEFAULT 0,
            accepted_at double precision NOT NULL,
            ended_at double precision,
            prompt bytea NOT NULL,
            uploads bytea NOT NULL,
            results bytea,
            webhook text
        );
        CREATE INDEX jobs_by_client ON jobs (client_id);
        CREATE INDEX jobs_by_seq ON jobs (seq);
        CREATE TABLE deliveries (
            id text PRIMARY KEY, url text NOT NULL, body bytea NOT NULL, created double precision NOT NULL
        );
        """,
    ),
    (2, "ALTER TABLE deliveries ADD COLUMN owner text"),  # whose turns a call takes: its API key's
]


def shown_dsn(dsn: str) -> str:
    """A database URL as it may be shown: without its password (after the user, or in the query)."""
    try:
        url = URL(dsn)
        if url.password:
            url = url.with_password(None)
        hidden = {key: "[redacted]" for key in ("password", "sslpassword") if key in url.query}
        return str(url.update_query(hidden) if hidden else url)
    except (ValueError, TypeError):
        return "(an unreadable database URL)"


async def _connect(dsn: str, settings: dict[str, str]) -> Conn:
    import asyncpg

    conn: Conn = await asyncpg.connect(
        dsn, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT, server_settings=settings
    )
    return conn


@dataclass(frozen=True)
class Leader:
    """Who leads a cluster, as `meta` says: where other bridges reach it, which takeover it is."""

    url: str
    generation: int
    since: float
    backends: tuple[str, ...] = ()  # the ComfyUI servers it schedules over
    folder: str = ""  # the mark of its data folder (`folder_mark`); "" with object storage

    def dumps(self) -> str:
        return orjson.dumps(
            {"url": self.url, "generation": self.generation, "since": self.since, "backends": self.backends,
             "folder": self.folder}
        ).decode()  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Leader:
        value = orjson.loads(text)
        backends = tuple(str(url) for url in value.get("backends", ()))
        folder = str(value.get("folder", ""))
        return cls(str(value["url"]), int(value["generation"]), float(value["since"]), backends, folder)


class PgJournal:
    """Every write is one transaction on a pooled connection; its future is done once PostgreSQL has
    committed it (synchronous_commit as the server has it: on by default)."""

    def __init__(self, dsn: str, url: str = "", silence: float = 5.0, backends: tuple[str, ...] = ()) -> None:
        """`silence`: how long the leader goes on without an answer from the database (its
        leader_timeout); the server keeps a silent session well past it (`keepalives`). `backends`:
        this bridge's ComfyUI servers, told to the others while it leads."""
        self.dsn = dsn
        self.backends = backends
        self.folder = ""  # this bridge's data folder's mark, told to the others while it leads
        # Named, so that a leader can tell whether another bridge is there to take over (`others`).
        self._server_settings = {**keepalives(silence), "application_name": APPLICATION}
        self.frozen_after = FROZEN_FACTOR * silence + FROZEN_MARGIN
        self._may_depose = True  # False once PostgreSQL refused to end another bridge's session
        self.url = url  # where other bridges reach this one, told to them while it leads
        self.leader: Leader | None = None  # who leads, as last seen
        self._silence = silence
        self._leaving: Conn | None = None  # the connection named as a bridge that stops (it leads no more)
        self._leader_seen = -math.inf  # monotonic time the database last named the leader
        self.relay_secret = ""  # shared by the cluster's bridges: a request relayed by one is believed
        self.count = 0
        self.bridge_id = ""
        self.write_trouble: str | None = None  # the database's trouble is its own (503 "database away")
        self.deliveries: list[dict[str, Any]] = []
        self.learned = ""
        self.abandoned = ""
        self.on_commit: Callable[[float], None] = lambda seconds: None
        self._conn: Conn | None = None  # the one connection: it holds BRIDGE_LOCK and runs every write
        self._holds_lock = False
        self._lost: str | None = None
        self._splittable = False  # the last failed commit failed for one write's own data, not the database
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._error: StorageError | None = None  # what the last failed commit was
        self._outages = OutageLog(f"database {shown_dsn(dsn)}", FAILURE_LOG_EVERY)

    # start-up --------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect and bring the schema up to date (under MIGRATION_LOCK: two bridges starting at once
        migrate once). Raises JournalError, naming the database without its password, if it cannot."""
        if importlib.util.find_spec("asyncpg") is None:
            raise JournalError("--database needs the cluster extra: pip install 'comfybridge[cluster]'")
        where = shown_dsn(self.dsn)
        with self._refused_as_journal_error(where):
            conn = self._conn = await _connect(self.dsn, self._server_settings)
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await _migrate(conn, where)
                await conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('relay_secret', $1) ON CONFLICT (key) DO NOTHING",
                    secrets.token_urlsafe(32),
                )
                self.relay_secret = str(await conn.fetchval("SELECT value FROM meta WHERE key = 'relay_secret'"))

    @contextlib.contextmanager
    def _refused_as_journal_error(self, where: str) -> Iterator[None]:
        """At start-up: any trouble with the database ends the session and is one JournalError line."""
        import asyncpg

        try:
            yield
        except JournalError:
            self._drop_connection()
            raise
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._drop_connection()
            raise JournalError(f"database {where} cannot be used: {exc.__class__.__name__}: {exc}") from None
        except (ValueError, TypeError, KeyError) as exc:
            self._drop_connection()
            raise JournalError(f"database {where} holds a record it cannot read ({exc})") from None

    async def campaign(
        self, url: str, follow: Callable[[Leader | None], None], poll: float = 1.0, contend: bool = True
    ) -> None:
        """Wait until this bridge holds BRIDGE_LOCK, then say so in `meta` (its URL, the next generation).
        Meanwhile `follow` hears, every `poll` seconds, who leads (None: nobody, or it is unknown); not
        `contend`ing, it only follows, for ever.
        After losing the database, it waits INCUMBENT_WAIT before trying again: a restart of PostgreSQL
        frees the lock, and the bridge that held it should take it back, not a follower."""
        import asyncpg

        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._drop_connection()
                    self._conn = await _connect(self.dsn, self._server_settings)
                    if contend:  # one that only follows (standing down) must learn the next leader at once
                        await asyncio.sleep(INCUMBENT_WAIT)
                conn = self._conn
                if not contend and self._leaving is not conn:  # not one to hand over to (`others`)
                    await conn.execute(f"SET application_name = '{APPLICATION}-leaving'")
                    self._leaving = conn
                won, leader = await _fetch_row(
                    conn,
                    "SELECT CASE WHEN $2 THEN pg_try_advisory_lock($1) ELSE false END, "
                    "(SELECT value FROM meta WHERE key = 'leader')",
                    BRIDGE_LOCK,
                    contend,
                )
                if won:
                    self._holds_lock = True
                    generation = (Leader.parse(leader).generation if leader else 0) + 1
                    self.leader = Leader(url, generation, time.time(), self.backends, self.folder)
                    await conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('leader', $1) "
                        "ON CONFLICT (key) DO UPDATE SET value = $1",
                        self.leader.dumps(),
                    )
                    return
                self.leader = Leader.parse(leader) if leader else None
                self._leader_seen = time.monotonic()
                if contend and self.leader is not None:
                    await self._depose_frozen(conn)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The leader last seen leads on without the database for its `silence` at most,
                # serving what needs none: it is relayed to until then.
                self._drop_connection()
                if time.monotonic() - self._leader_seen >= self._silence:
                    self.leader = None
                log.warning("database %s: %s: %s", shown_dsn(self.dsn), exc.__class__.__name__, exc)
            except (ValueError, TypeError, KeyError) as exc:
                self.leader = None
                log.warning("database %s: the leader's record cannot be read (%s)", shown_dsn(self.dsn), exc)
            follow(self.leader)
            await asyncio.sleep(poll)

    async def _depose_frozen(self, conn: Conn) -> None:
        """End the session of a leader frozen for `frozen_after` seconds: its lock is free for the
        next campaign (this one's, or another follower's)."""
        import asyncpg

        if not self._may_depose:
            return
        try:
            rows = await conn.fetch(DEPOSE_FROZEN, BRIDGE_LOCK >> 32, BRIDGE_LOCK & 0xFFFFFFFF, self.frozen_after)
        except asyncpg.InsufficientPrivilegeError as exc:
            self._may_depose = False
            log.warning("database %s: a frozen leader cannot be deposed by this bridge (%s); give every "
                        "bridge of a cluster the same role", shown_dsn(self.dsn), exc)  # fmt: skip
            return
        for row in rows:
            leader = self.leader.url if self.leader else "?"
            log.warning(
                "the leading bridge %s has said nothing to the database for %.0fs: its session (pid %d) %s, so "
                "that another bridge can lead",
                leader, row["silent"], row["pid"], "is ended" if row["ended"] else "could not be ended",
            )  # fmt: skip

    async def open(self, count_floor: int = 0) -> list[dict[str, Any]]:
        """Load the journal and start its writer. This bridge must hold BRIDGE_LOCK: taken here if it
        is free, else JournalError names the bridge that leads (cluster mode waits in `campaign`)."""

        where = shown_dsn(self.dsn)
        if self._conn is None:
            await self.connect()
        assert self._conn is not None
        self._lost = None
        with self._refused_as_journal_error(where):
            conn = self._conn
            if not self._holds_lock and not await conn.fetchval("SELECT pg_try_advisory_lock($1)", BRIDGE_LOCK):
                raise JournalError(f"database {where} is in use by another comfybridge, which leads")
            self._holds_lock = True
            rows = await self._load(conn, count_floor)
        self._writer = asyncio.ensure_future(self._write_loop())
        return rows

    def others(self) -> asyncio.Future[int]:
        """How many other bridges' sessions are on this database now (those of another role may not
        be seen: PostgreSQL hides their names)."""
        return self._submit(
            lambda conn: conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                "AND datname = current_database() AND pid <> pg_backend_pid()",
                APPLICATION,
            )
        )

    def heartbeat(self) -> asyncio.Future[None]:
        """A round trip through the writer (in order with the writes): done once the database answered
        on the connection that holds the lock (connected and locked again first if it had dropped)."""
        return self._submit(lambda conn: conn.execute("SELECT 1"))

    async def _load(self, conn: Conn, count_floor: int) -> list[dict[str, Any]]:
        meta: dict[str, str] = {row["key"]: row["value"] for row in await conn.fetch("SELECT key, value FROM meta")}
        self.bridge_id = meta.get("bridge_id") or f"comfybridge-{uuid.uuid4().hex[:12]}"
        self.count = max(int(meta.get("generation_count", 0)), count_floor)
        self.learned = meta.get("run_times", "")
        self.abandoned = meta.get("abandoned", "")
        await conn.executemany(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
            [("bridge_id", self.bridge_id), ("generation_count", str(self.count))],
        )
        rows = [row_of(tuple(r)) for r in await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY seq")]
        self.deliveries = [
            {"id": d["id"], "url": d["url"], "body": bytes(d["body"]), "created": d["created"], "owner": d["owner"]}
            for d in await conn.fetch("SELECT id, url, body, created, owner FROM deliveries ORDER BY created")
        ]
        return rows

    def lost(self) -> str | None:
        """Set once the database was taken by another bridge while this one's connection was down."""
        return self._lost

    async def ensure_in_place(self) -> str | None:
        return self._lost

    async def _locked(self) -> Conn:
        """The one connection, which holds BRIDGE_LOCK: connected and locked again if it dropped (a
        restart of PostgreSQL ends the session, and the lock with it)."""
        if self._lost is not None:
            raise StorageUnavailable(f"The bridge cannot record anything: its database {self._lost}.")
        if self._conn is None or self._conn.is_closed():
            self._drop_connection()
            conn = self._conn = await _connect(self.dsn, self._server_settings)
            try:
                won, leader = await _fetch_row(
                    conn, "SELECT pg_try_advisory_lock($1), (SELECT value FROM meta WHERE key = 'leader')", BRIDGE_LOCK
                )
            except BaseException:  # a session half set up is never used
                self._drop_connection()
                raise
            # Free again is not enough: another bridge may have led meanwhile (and run our jobs).
            if not won or (self.leader is not None and leader != self.leader.dumps()):
                self._drop_connection()
                self._lost = "was taken by another comfybridge while the connection to it was down"
                log.error("database %s %s: accepting no new jobs", shown_dsn(self.dsn), self._lost)
                raise StorageUnavailable(f"The bridge cannot record anything: its database {self._lost}.")
            self._holds_lock = True
            log.info("database %s: connected again", shown_dsn(self.dsn))
        return self._conn

    async def close(self) -> None:
        """Every write asked for so far lands, then the connection closes (the lock goes with it)."""
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
            self._writer = None
        self._drop_connection()

    def _drop_connection(self) -> None:
        """End the session at once, whatever the server's state: a frozen server cannot hold us up."""
        self._holds_lock = False
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    # writes ----------------------------------------------------------------------------------
    def accept(self, record: dict[str, Any]) -> asyncio.Future[int]:
        values = values_of(record)

        names = [*values, "seq"]
        marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        # One statement, one round trip: the count rises only if the job is new (a commit whose answer
        # was lost, tried again, finds it in already and counts nothing).
        query = (
            f"WITH counted AS (UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'generation_count' "
            f"AND NOT EXISTS (SELECT 1 FROM jobs WHERE id = ${list(values).index('id') + 1}) "
            "RETURNING value::bigint AS seq) "
            f"INSERT INTO jobs ({', '.join(names)}) VALUES ({marks}, coalesce((SELECT seq FROM counted), 0)) "
            "ON CONFLICT (id) DO NOTHING RETURNING seq"
        )

        async def write(conn: Conn) -> int:
            stored = await conn.fetchval(query, *values.values())
            if stored is None:  # in already
                return int(await conn.fetchval("SELECT seq FROM jobs WHERE id = $1", values["id"]))
            return int(stored)

        def counted(seq: int) -> int:
            self.count = max(self.count, seq)  # only now is it durable, so only now is it served
            return seq

        return self._submit(write, counted)

    def update(
        self, job_id: str, fields: dict[str, Any], delivery: dict[str, Any] | None = None
    ) -> asyncio.Future[None]:
        values = values_of(fields)

        async def write(conn: Conn) -> None:
            assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(values, 1))
            await conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ${len(values) + 1}", *values.values(), job_id)
            if delivery is not None:  # in the same transaction as the change it tells of
                await conn.execute(
                    "INSERT INTO deliveries (id, url, body, created, owner) VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT DO NOTHING",
                    delivery["id"], delivery["url"], delivery["body"], delivery["created"], delivery["owner"],
                )  # fmt: skip

        return self._submit(write, alone=delivery is None)

    def delivered(self, delivery_id: str) -> asyncio.Future[None]:
        return self._submit(lambda conn: conn.execute("DELETE FROM deliveries WHERE id = $1", delivery_id))

    def remember(self, learned: str) -> asyncio.Future[None]:
        return self._keep("run_times", learned)

    def keep_abandoned(self, abandoned: str) -> asyncio.Future[None]:
        return self._keep("abandoned", abandoned)

    def _keep(self, key: str, value: str) -> asyncio.Future[None]:
        return self._submit(
            lambda conn: conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2", key, value
            )
        )

    def forget(self, job_ids: Iterable[str], later: bool = False) -> asyncio.Future[None]:
        ids = list(job_ids)
        return self._submit(lambda conn: conn.execute("DELETE FROM jobs WHERE id = ANY($1::text[])", ids))

    def forget_client(self, client_id: str, later: bool = False) -> asyncio.Future[None]:
        return self._submit(
            lambda conn: conn.execute(
                "DELETE FROM jobs WHERE client_id = $1 AND state = ANY($2::text[])", client_id, list(ENDED_STATES)
            )
        )

    def forget_ended_before(self, cutoff: float) -> asyncio.Future[None]:
        return self._submit(
            lambda conn: conn.execute(
                "DELETE FROM jobs WHERE state IN ('failed', 'cancelled') AND ended_at < $1", cutoff
            )
        )

    def _submit(
        self,
        write: Callable[[Conn], Awaitable[Any]],
        then: Callable[[Any], Any] = lambda result: result,
        alone: bool = True,
    ) -> asyncio.Future[Any]:
        """`write` must be safe to repeat (a commit whose answer was lost is sent again). `alone`: it is
        one statement, atomic by itself; committed on its own, it needs no BEGIN and COMMIT (two round
        trips of the three)."""
        if self._writer is None or self._writer.done():
            raise RuntimeError("the journal is not open for writes")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(retrieve_failure)
        self._queue.put_nowait((write, then, future, alone))
        return future

    async def _write_loop(self) -> None:
        """The one writer: writes land in the order they were asked for (a job's later step never
        under an earlier one), and those that queue up while a commit is under way share the next one."""
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    self._queue.put_nowait(None)  # seen after this batch
                    break
                batch.append(item)
            await self._commit(batch)

    async def _commit(self, batch: list[_Item]) -> None:
        try:
            results = await self._transaction([write for write, _, _, _ in batch], alone=batch[0][3])
        except StorageError:
            if len(batch) == 1 or not self._splittable:  # the database's trouble: the others would fail too
                for _, _, future, _ in batch:
                    _settle(future, error=_last_error(self))
                return
            for item in batch:  # one bad write must not fail the others that shared its commit
                await self._commit([item])
            return
        for (_, then, future, _), result in zip(batch, results, strict=True):
            value = then(result)  # the count rises even if nobody waits for the answer any more
            if not future.done():
                future.set_result(value)

    async def _transaction(self, writes: list[Callable[[Conn], Awaitable[Any]]], alone: bool) -> list[Any]:
        import asyncpg

        started = time.perf_counter()
        for attempt in (1, 2):
            self._splittable = False
            sent = False
            try:
                conn = await self._locked()
                sent = True
                if len(writes) == 1 and alone:
                    results = [await writes[0](conn)]
                else:
                    async with conn.transaction():
                        results = [await write(conn) for write in writes]
                break
            except StorageError as exc:
                self._error = exc
                raise
            except asyncpg.DiskFullError:
                self._error = StorageFull("The bridge's database is out of disk space; try again later.")
                raise self._error from None
            except Exception as exc:  # unreachable, refused, or a fault: the writer must live on either way
                self._splittable = isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)
                # A session in a state the driver cannot tell (an operation cut short) is never used again.
                broken = (
                    OSError | asyncpg.InterfaceError | asyncpg.InternalClientError | asyncpg.PostgresConnectionError
                )
                if isinstance(exc, broken):
                    self._drop_connection()  # a new one at the next commit
                    if sent and attempt == 1:
                        # The commit may have landed with only its answer lost: told "not accepted", a
                        # client would submit again while the first job waited unseen. Every write is
                        # safe to repeat, so the batch goes again, once, on a new session.
                        log.warning("database %s: the connection broke during a commit (%s); committing again",
                                    shown_dsn(self.dsn), exc.__class__.__name__)  # fmt: skip
                        continue
                self._outages.failed(exc, expected=isinstance(exc, TimeoutError | broken | asyncpg.PostgresError))
                self._error = StorageUnavailable(
                    "The bridge's database cannot be reached or refused the change; try again shortly.",
                    retry_after=RETRY_AFTER if isinstance(exc, TimeoutError | broken) else None,  # likely to pass
                )
                raise self._error from None
        self._outages.landed()
        self.on_commit(time.perf_counter() - started)
        return results


_Item = tuple[Callable[["Conn"], Awaitable[Any]], Callable[[Any], Any], asyncio.Future[Any], bool]


async def _fetch_row(conn: Conn, query: str, *args: Any) -> tuple[Any, ...]:
    row = await conn.fetchrow(query, *args)
    if row is None:
        raise ValueError("the database answered no row")
    return tuple(row)


def _settle(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _last_error(journal: PgJournal) -> BaseException:
    return journal._error or StorageUnavailable("The bridge could not record the change.")


async def _migrate(conn: Conn, where: str) -> None:
    """Apply the migrations this database has not had yet, in order (the caller holds MIGRATION_LOCK)."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at timestamptz "
        "NOT NULL DEFAULT now())"
    )
    applied = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    newest = max(version for version, _ in MIGRATIONS)
    if applied and max(applied) > newest:
        raise JournalError(f"database {where} was written by a newer comfybridge (schema {max(applied)})")
    for version, sql in MIGRATIONS:
        if version not in applied:
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("database %s: schema migration %d applied", where, version)
