"""The job journal: every accepted job and each step of its life, the bridge's source of truth.

`JobStore` is the interface the rest of the bridge uses; `SqliteJournal` keeps it in one SQLite file
(WAL) written by one thread with group commit: every write that arrives while a commit is under way
joins the next one, so a burst of accepted jobs shares a few fsyncs. Nothing else touches SQL.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from ..errors import StorageFull, StorageUnavailable
from .journal_file import JournalFile

__all__ = [
    "COLUMNS",
    "ENDED_STATES",
    "JobStore",
    "JournalError",
    "OutageLog",
    "SqliteJournal",
    "Write",
    "retrieve_failure",
    "row_of",
    "values_of",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: jobs.webhook, and the deliveries table; 3: deliveries.owner
MAX_BATCH = 512  # writes in one commit at most, so one commit never holds the others back for long
LATER = 0.5  # seconds forgets wait to be written together, off the path of the jobs that follow
ENDED_STATES = ("done", "failed", "cancelled")
JSON_COLUMNS = {"uploads", "results"}  # and prompt, kept as the JSON bytes the job holds
COLUMNS = (
    "id",
    "seq",
    "client_id",
    "workflow",
    "state",
    "backend",
    "prompt_id",
    "error",
    "attempts",
    "retries",
    "accepted_at",
    "ended_at",
    "prompt",
    "uploads",
    "results",
    "webhook",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    state TEXT NOT NULL,
    backend TEXT,
    prompt_id TEXT NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL NOT NULL,
    ended_at REAL,
    prompt BLOB NOT NULL,
    uploads BLOB NOT NULL,
    results BLOB,
    webhook TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_client ON jobs (client_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    owner TEXT
);
"""


# SQLite's primary result codes that speak of the disk, not of the journal: full, read-only, an I/O
# error, a file it could not open, no permission.
DISK_TROUBLE = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM}
)


class JournalError(Exception):
    """The journal exists but cannot be read or trusted; start-up stops rather than forget jobs."""


class JobStore(Protocol):
    """Where jobs are recorded. Every write returns a future that is done once the write is durable."""

    count: int  # jobs ever accepted, as far as is durable
    bridge_id: str  # this bridge's name at its ComfyUI backends, the same across restarts

    @property
    def write_trouble(self) -> str | None:
        """Why writes fail right now (a full disk), until one lands again: None while they land."""
        ...

    async def open(self, count_floor: int = 0) -> list[dict[str, Any]]:
        """Open (creating or upgrading it if need be) and take writes from now on; every job still
        recorded, in acceptance order. Raises JournalError when it cannot be used."""
        ...

    on_commit: Callable[[float], None]  # told each commit's duration (metrics)

    def accept(self, record: dict[str, Any]) -> asyncio.Future[int]:
        """Record a new job; its future gives the job's place in acceptance order (the new count)."""
        ...

    deliveries: list[dict[str, Any]]  # webhook calls recorded but not yet acknowledged, found at open
    learned: str  # the scheduler's learned run times as last remembered (JSON text), found at open

    def remember(self, learned: str) -> asyncio.Future[None]:
        """Keep the scheduler's learned run times (replacing what was kept)."""
        ...

    abandoned: str  # prompts that must not run where they were sent, as last kept (JSON text), found at open

    def keep_abandoned(self, abandoned: str) -> asyncio.Future[None]:
        """Keep the prompts to take back from each backend (replacing what was kept): a job moved off a
        backend that was away leaves its old prompt there, which must not run too, restart or not."""
        ...

    def update(
        self, job_id: str, fields: dict[str, Any], delivery: dict[str, Any] | None = None
    ) -> asyncio.Future[None]:
        """Change a job's record; `delivery`, a webhook call that tells of the change, is recorded in
        the same transaction, so a change is never durable without its call."""
        ...

    def delivered(self, delivery_id: str) -> asyncio.Future[None]: ...

    async def ensure_in_place(self) -> str | None:
        """Make sure the next start will find the journal: written back to its place if other hands
        deleted it under the running bridge. None if it is there; else why it cannot be."""
        ...

    def forget(self, job_ids: Iterable[str], later: bool = False) -> asyncio.Future[None]:
        """Drop jobs whose story is over (results fetched or expired). `later`: it may wait a moment,
        to share a commit with others (a fetch's: nothing waits on it but removing delivered files)."""
        ...

    def forget_client(self, client_id: str, later: bool = False) -> asyncio.Future[None]:
        """Drop the ended jobs of a client the bridge no longer knows (`later` as for `forget`)."""
        ...

    def forget_ended_before(self, cutoff: float) -> asyncio.Future[None]:
        """Drop failed and cancelled jobs that ended before `cutoff` (their error has been there to read)."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Batch:
    count: int  # the generation count inside the transaction under way
    accepted: list[int] = field(default_factory=list)


Write = Callable[[sqlite3.Connection, _Batch], Any]
Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]  # a write's future, its result, its error


def _look_only(conn: sqlite3.Connection, batch: _Batch) -> None:
    """Not a write: asks the writer thread to look at the journal file (`ensure_in_place`), and is
    answered why it is not in place, or None."""


class SqliteJournal:
    def __init__(self, path: Path, sync: bool = True) -> None:
        self.path = path
        self.sync = sync
        self.count = 0
        self.bridge_id = ""
        self.on_commit: Callable[[float], None] = lambda seconds: None  # called in the writer thread
        self.deliveries: list[dict[str, Any]] = []  # webhook calls not yet acknowledged, found at open
        self.learned = ""
        self.abandoned = ""
        self._committed = 0  # the count as committed, seen from the writer thread
        self._queue: queue.SimpleQueue[tuple[Write, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._later: list[tuple[Write, asyncio.Future[Any]]] = []  # forgets waiting to go together
        self._later_timer: asyncio.TimerHandle | None = None
        self._outages = OutageLog(f"journal {path}")
        self.file = JournalFile(path, sync, self._outages.failed)  # kept in place before each commit

    # start-up --------------------------------------------------------------------------------
    def _check_not_emptied(self, counted: int) -> None:
        """SQLite takes an empty file for an empty journal: one emptied by other hands, in a data folder
        that counted jobs, would lose them in silence. A journal that is not there at all starts afresh
        (a first start, or one after an upgrade from before the journal), said in the log."""
        if counted <= 0:
            return
        if not self.path.exists():
            log.warning(
                "no journal at %s, though this data folder counted %d jobs: starting with %s (jobs accepted "
                "before, if any, are not known to this bridge)", self.path, counted,
                "what its leftover WAL holds" if self.file.wal.exists() else "none",
            )  # fmt: skip
            return
        if self.path.stat().st_size == 0:  # a WAL beside it does not help: SQLite ignores it then
            raise JournalError(
                f"journal {self.path} is empty, but this data folder counted {counted} jobs: it was emptied by "
                "other hands. Restore it from a backup, or remove it to start with no jobs (accepted jobs are "
                "never dropped silently)"
            )

    async def open(self, count_floor: int = 0) -> list[dict[str, Any]]:
        rows = await asyncio.to_thread(self._open_file, count_floor)
        self._start()
        return rows

    def _open_file(self, count_floor: int) -> list[dict[str, Any]]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file.take_up_leftovers()
            self._check_not_emptied(count_floor)
            conn = self.file.open()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} was written by a newer comfybridge (schema {version})")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise JournalError(f"journal {self.path} is corrupt ({check})")
            conn.executescript(SCHEMA)
            if "webhook" not in {column[1] for column in conn.execute("PRAGMA table_info(jobs)")}:
                conn.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")  # a journal of schema 1
            if "owner" not in {column[1] for column in conn.execute("PRAGMA table_info(deliveries)")}:
                conn.execute("ALTER TABLE deliveries ADD COLUMN owner TEXT")  # a journal of schema 2
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            self.bridge_id = meta.get("bridge_id") or f"comfybridge-{uuid.uuid4().hex[:12]}"
            recorded = int(meta.get("generation_count", 0))
            if count_floor > recorded and self.path.exists() and "bridge_id" in meta:
                log.warning(
                    "journal %s counted %d jobs, but this data folder counted %d: it lost the last ones accepted "
                    "(its WAL cut short, or restored from an older backup); their clients are not known to this "
                    "bridge", self.path, recorded, count_floor,
                )  # fmt: skip
            self.count = max(recorded, count_floor)
            self.learned = meta.get("run_times", "")
            self.abandoned = meta.get("abandoned", "")
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("bridge_id", self.bridge_id), ("generation_count", str(self.count))],
            )
            cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY seq")
            rows = [row_of(record) for record in cursor]
            self.deliveries = [
                {"id": d[0], "url": d[1], "body": bytes(d[2]), "created": d[3], "owner": d[4]}
                for d in conn.execute("SELECT id, url, body, created, owner FROM deliveries ORDER BY created")
            ]
        except sqlite3.DatabaseError as exc:
            self.file.close_connection()
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in DISK_TROUBLE:
                raise JournalError(
                    f"journal {self.path} cannot be used now ({exc}): the disk is full, read-only or failing. "
                    "Free space or mend it, then start again: the journal is kept as it is"
                ) from None
            raise JournalError(
                f"journal {self.path} is unreadable or corrupt ({exc}); restore it from a backup or move it "
                "aside (accepted jobs are never dropped silently)"
            ) from None
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            self.file.close_connection()
            raise JournalError(f"journal {self.path} holds a record it cannot read ({exc})") from None
        except OSError as exc:
            self.file.close_connection()
            raise JournalError(f"journal {self.path} cannot be opened: {exc}") from None
        self._committed = self.count
        return rows

    async def ensure_in_place(self) -> str | None:
        reason: str | None = await self._submit(_look_only)  # the writer thread looks before each commit
        return reason

    def _start(self) -> None:
        """Start the writer thread; writes are accepted from this event loop from now on."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._write_loop, name="journal writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Every write asked for so far lands, then the file is closed."""
        if self._thread is not None:
            self._send_later()
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        await asyncio.to_thread(self.file.close)

    # writes ----------------------------------------------------------------------------------
    def accept(self, record: dict[str, Any]) -> asyncio.Future[int]:
        values = values_of(record)

        def write(conn: sqlite3.Connection, batch: _Batch) -> int:
            batch.count += 1
            values["seq"] = batch.count
            columns = ", ".join(values)
            conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(values))})", list(values.values()))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'generation_count'", (str(batch.count),))
            batch.accepted.append(batch.count)
            return batch.count

        return self._submit(write)

    def update(
        self, job_id: str, fields: dict[str, Any], delivery: dict[str, Any] | None = None
    ) -> asyncio.Future[None]:
        values = values_of(fields)

        def write(conn: sqlite3.Connection, batch: _Batch) -> None:
            assignments = ", ".join(f"{name} = ?" for name in values)
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values.values(), job_id])
            if delivery is not None:  # in the same transaction as the change it tells of
                row = (delivery["id"], delivery["url"], delivery["body"], delivery["created"], delivery["owner"])
                conn.execute(
                    "INSERT OR IGNORE INTO deliveries (id, url, body, created, owner) VALUES (?, ?, ?, ?, ?)", row
                )

        return self._submit(write)

    def delivered(self, delivery_id: str) -> asyncio.Future[None]:
        """A webhook call was acknowledged (or given up): forget it."""
        return self._submit(lambda conn, batch: conn.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,)))

    def remember(self, learned: str) -> asyncio.Future[None]:
        return self._keep("run_times", learned)

    def keep_abandoned(self, abandoned: str) -> asyncio.Future[None]:
        return self._keep("abandoned", abandoned)

    def _keep(self, key: str, value: str) -> asyncio.Future[None]:
        return self._submit(
            lambda conn, batch: conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        )

    def forget(self, job_ids: Iterable[str], later: bool = False) -> asyncio.Future[None]:
        ids = [(job_id,) for job_id in job_ids]
        return self._submit(lambda conn, batch: conn.executemany("DELETE FROM jobs WHERE id = ?", ids), later)

    def forget_client(self, client_id: str, later: bool = False) -> asyncio.Future[None]:
        # Perhaps written later: a job the clientId gets meanwhile, which may end first, is counted past `upto`.
        upto = self.count
        return self._submit(
            lambda conn, batch: conn.execute(
                "DELETE FROM jobs WHERE client_id = ? AND state IN (?, ?, ?) AND seq <= ?",
                (client_id, *ENDED_STATES, upto),
            ),
            later,
        )

    def forget_ended_before(self, cutoff: float) -> asyncio.Future[None]:
        return self._submit(
            lambda conn, batch: conn.execute(
                "DELETE FROM jobs WHERE state IN ('failed', 'cancelled') AND ended_at < ?", (cutoff,)
            )
        )

    def _submit(self, write: Write, later: bool = False) -> asyncio.Future[Any]:
        """Hand a write to the writer thread. Writes `later` (forgets: nothing waits on them but the
        removal of files already delivered) wait LATER seconds and go together: one commit for all the
        jobs fetched meanwhile, not one each, and none in the way of the next job's accept."""
        if self._loop is None or self._thread is None:
            raise RuntimeError("the journal is not open for writes")
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(retrieve_failure)
        if later:
            self._later.append((write, future))
            if self._later_timer is None:
                self._later_timer = self._loop.call_later(LATER, self._send_later)
            return future
        self._queue.put((write, future))
        return future

    def _send_later(self) -> None:
        if self._later_timer is not None:
            self._later_timer.cancel()
            self._later_timer = None
        for item in self._later:
            self._queue.put(item)
        self._later.clear()

    # the writer thread -----------------------------------------------------------------------
    def _write_loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            batch = [] if first is None else [first]
            stop = first is None
            while not stop and len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._commit(batch)

    @property
    def write_trouble(self) -> str | None:
        return self._outages.trouble

    def _commit(self, items: list[tuple[Write, asyncio.Future[Any]]]) -> None:
        assert self._loop is not None
        gone = self.file.in_place()
        # A look at the file (done just now) is told what it found; it has no transaction of its own.
        outcomes: list[Outcome] = [(future, gone, None) for write, future in items if write is _look_only]
        items = [item for item in items if item[0] is not _look_only]
        if gone is not None:
            refusal = StorageUnavailable(f"The bridge cannot record anything: its journal {gone}.")
            outcomes += [(future, None, refusal) for _, future in items]
            self._loop.call_soon_threadsafe(self._resolve, outcomes, 0)
            return
        accepted: list[int] = []
        try:
            if items:
                results, accepted = self._transaction([write for write, _ in items])
                outcomes += [(future, result, None) for (_, future), result in zip(items, results, strict=True)]
        except Exception:
            # One bad write must not fail the others that shared its commit: try each on its own.
            accepted = []
            for write, future in items:
                try:
                    (result,), one = self._transaction([write])
                    accepted += one
                    outcomes.append((future, result, None))
                except Exception as exc:
                    outcomes.append((future, None, _storage_error(exc, self._outages)))
        self._loop.call_soon_threadsafe(self._resolve, outcomes, max(accepted, default=0))

    def _transaction(self, writes: list[Write]) -> tuple[list[Any], list[int]]:
        conn = self.file.conn
        assert conn is not None
        batch = _Batch(self._committed)
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [write(conn, batch) for write in writes]
            conn.execute("COMMIT")
            self.on_commit(time.perf_counter() - started)
            self._outages.landed()
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back by itself (a full disk does)
                conn.execute("ROLLBACK")
            raise
        self._committed = batch.count
        return results, batch.accepted

    def _resolve(self, outcomes: list[Outcome], count: int) -> None:
        if count > self.count:
            self.count = count  # only now is it durable, so only now is it served
        for future, result, error in outcomes:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


class OutageLog:
    """Writes failing in a row (an outage, a disk gone read-only): the first is logged, then one line
    every `every` seconds, and the end of it; a fault of the bridge's own is logged each time."""

    def __init__(self, where: str, every: float = 10.0) -> None:
        self.where = where
        self.every = every
        self.failures = 0
        self.trouble: str | None = None  # why the last write failed, until one lands
        self._logged = -math.inf  # monotonic: none yet (a machine just booted has small ones)

    def failed(self, exc: BaseException, expected: bool = True) -> None:
        self.failures += 1
        self.trouble = f"cannot be written ({exc})"
        if not expected or time.monotonic() - self._logged >= self.every:
            self._logged = time.monotonic()
            log.error("%s: write failed (%d in a row): %s: %s", self.where, self.failures, exc.__class__.__name__,
                      exc, exc_info=None if expected else exc)  # fmt: skip

    def landed(self) -> None:
        self.trouble = None
        if self.failures:
            log.info("%s: writes land again (%d failed before)", self.where, self.failures)
            self.failures, self._logged = 0, -math.inf


def retrieve_failure(future: asyncio.Future[Any]) -> None:
    """A write nobody waits for (a forget) may fail unheard: the journal has said why once, not once
    per write (an outage, once and then every 10 s; a full disk, to the requests it refuses)."""
    if not future.cancelled() and future.exception() is not None:
        log.debug("journal write failed: %s", future.exception())


def _storage_error(exc: Exception, outages: OutageLog) -> Exception:
    """A failed journal write as the error a request answers with: a full disk (507), anything else
    (read-only, no permission, an I/O error) 503, told to the operator in the log."""
    if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
        outages.trouble = "cannot be written: the disk is full"
        return StorageFull("The bridge's disk is full, so nothing more can be recorded; try again later.")
    outages.failed(exc, expected=isinstance(exc, sqlite3.Error | OSError))
    return StorageUnavailable(f"The bridge could not record the change ({exc}); its operator has been told.")


def values_of(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not journal columns: {sorted(unknown)}")
    return {k: orjson.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in fields.items()}


def row_of(record: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, record, strict=True))
    for name in JSON_COLUMNS:
        if row[name] is not None:
            row[name] = orjson.loads(row[name])
    return row
