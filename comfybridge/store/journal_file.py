"""The SQLite file the job journal lives in, kept where the next start will find it.

Other hands may delete the file, its WAL (where nearly every change lives until a checkpoint) or the
whole data folder under the running bridge, put another file at its path, or cut it to nothing. The
open connection still holds every job, so a deleted journal is written back from it; a file that is
not ours is never overwritten, and our jobs are kept beside it instead. Everything here runs in the
journal's writer thread (or at its start and stop), never on the event loop.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from .datadir import DataDirLocked
from .files import fsync_path, write_synced

__all__ = ["JournalFile"]

log = logging.getLogger(__name__)

RESTORING = ".restoring"  # a whole copy on its way back to the journal's path (taken up at a start)
PARTIAL = ".restoring-partial"  # the same while it is written (only removed at a start)
UNSEEN_LIMIT = 10  # looks in a row the files may not be seen (a passing trouble) before it is a verdict


class JournalFile:
    """The connection to the journal's file, and the file kept in place (`in_place`, before each
    commit and now and then). Every job is held in memory (`_image`) from the moment a write-back
    closes the old connection until a new one is open on the file written back: a second deletion
    meanwhile (an `rm -rf` still running) costs a retry, never the jobs."""

    def __init__(self, path: Path, sync: bool, failed: Callable[[BaseException], None]) -> None:
        self.path = path
        self.sync = sync
        self.failed = failed  # told each write-back that fails (logged once an outage, not each time)
        self.conn: sqlite3.Connection | None = None
        self.displaced: str | None = None  # why the file at our path is not ours, once found out
        # Called before the journal is written back into a data folder made again: locks it (DataDirLocked).
        self.claim_folder: Callable[[], None] = lambda: None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file open, and of its WAL
        self._wal_identity: tuple[int, int] | None = None
        self._image: bytes | None = None  # the whole journal, while a write-back has no connection open
        self._placed: tuple[int, int] | None = None  # the file a write-back put in place, before it opened it
        self._unseen = 0  # looks in a row that could not stat the files

    @property
    def wal(self) -> Path:
        return self._beside("-wal")

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def open(self, create: bool = True) -> sqlite3.Connection:
        """Connect to the file (only to an existing one unless `create`: a write-back must never go on
        in an empty file of SQLite's making) and note which files it is, WAL included."""
        target = self.path if create else f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=not create)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.sync else 'OFF'}")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a first read makes the WAL
            self._identity, self._wal_identity = _identity(self.path), _identity(self.wal)
            if self._identity is None or self._wal_identity is None:
                raise sqlite3.OperationalError("the journal's files went away as they were opened")
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    def take_up_leftovers(self) -> None:
        """At a start: a whole copy a stopped write-back left, with no journal, is the journal (checked
        as any journal is, once opened); beside a journal, it is kept aside, never taken up later (an
        operator told to remove a journal must not get old jobs back). A copy cut short is removed."""
        self._beside(PARTIAL).unlink(missing_ok=True)
        copy = self._beside(RESTORING)
        if not copy.exists():
            return
        if self.path.exists():
            aside = self._aside_path()
            os.replace(copy, aside)
            log.warning("journal %s: the copy a write-back left beside it is kept as %s", self.path, aside.name)
            return
        log.warning("journal %s: taking up the copy a write-back left, %s", self.path, copy.name)
        self._remove_wal_names()
        os.replace(copy, self.path)

    def in_place(self) -> str | None:
        """None if the files at the journal's path are the ones open (or were just written back);
        else why the journal cannot be trusted to be found by the next start."""
        if self.displaced is not None:
            return self.displaced
        if self.conn is None:  # a write-back under way: its copy waits in memory
            return self._written_back()
        try:
            found, wal = _stat(self.path), _identity(self.wal)
        except OSError as exc:
            self._unseen += 1
            if self._unseen < UNSEEN_LIMIT:  # a passing trouble (NFS, I/O): not a verdict; the next look decides
                log.warning("journal %s: cannot look at it now (%s)", self.path, exc.strerror)
                return None
            return f"{self.path} cannot be looked at ({exc.strerror}), {self._unseen} times in a row"
        self._unseen = 0
        main = (found.st_dev, found.st_ino) if found is not None else None
        if main == self._identity and found is not None and found.st_size == 0:
            return self._emptied()
        if main == self._identity and wal == self._wal_identity:
            return None
        if main is not None and main != self._identity:
            return self._set_aside(f"{self.path} was replaced by another file")
        return self._written_back()  # the file, its WAL or the whole folder deleted

    def _written_back(self) -> str | None:
        try:
            self._write_back()
        except _NotOurs as exc:
            return self._set_aside(str(exc))
        except DataDirLocked as exc:  # another bridge took the folder made again: its jobs are its own now
            return self._set_aside(f"{self.path} was deleted, and its folder taken by another bridge ({exc})")
        except (OSError, sqlite3.Error) as exc:
            self.failed(exc)
            return f"{self.path} was deleted, and cannot be written back ({exc})"
        except Exception as exc:  # a fault of the bridge's own must not end the writer thread
            log.exception("journal %s: writing it back failed", self.path)
            return f"{self.path} was deleted, and cannot be written back ({exc.__class__.__name__})"
        log.warning("journal %s was deleted under the running bridge: written back from the open file", self.path)
        return None

    def _write_back(self) -> None:
        """Put the journal back at its path, then go on writing there. The old connection is closed
        first, with the deleted files' WAL names removed: SQLite deletes a WAL by name when it closes,
        and must not take the new file's. The copy is named RESTORING only once whole."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)  # the whole data folder may have gone
        self.claim_folder()
        if self.conn is not None:
            self._image = self.conn.serialize()  # every page, WAL included (SQLite 3.36+)
            self.close_connection()
        elif (there := _identity(path)) is not None and there != self._placed:
            raise _NotOurs(f"{path} was deleted, and another file put there before it could be written back")
        if self._image is None:
            raise sqlite3.OperationalError("no connection and no copy of the journal to write back")
        self._remove_wal_names()
        partial, copy = self._beside(PARTIAL), self._beside(RESTORING)
        write_synced(partial, self._image)
        os.replace(partial, copy)
        os.replace(copy, path)
        fsync_path(path.parent)
        self._placed = _identity(path)
        self.open(create=False)
        self._image = self._placed = None

    def _emptied(self) -> str | None:
        """The file was cut to nothing in place (SQLite never leaves a journal in WAL mode under one
        page). The pages changed since the last checkpoint are still in the WAL: put back, they may be
        all of it (a young journal); if not, the rest is gone, and no copy can be made of it."""
        assert self.conn is not None
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            whole = self.conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except sqlite3.Error:
            whole = False
        if whole:
            log.warning("journal %s was emptied by other hands: every page was still in its WAL, put back", self.path)
            return None
        return self._set_aside(f"{self.path} was emptied by other hands")

    def _set_aside(self, why: str) -> str:
        """The journal's path is not ours any more: keep our jobs beside it for its operator, and write
        no more. With a connection, its WAL is emptied into its own (unnamed) file first, so that a kill
        cannot leave its frames beside the other file, for SQLite to apply to it."""
        aside = self._aside_path()
        try:
            if self.conn is not None:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.conn.execute("VACUUM INTO ?", (str(aside),))
                fsync_path(aside)
            elif self._image is not None:
                write_synced(aside, self._image)
                self._image = None
            why += f"; the jobs it held are kept in {aside}"
        except (OSError, sqlite3.Error) as exc:
            log.error("journal %s: its jobs could not be kept aside in %s: %s", self.path, aside, exc)
        self.displaced = why
        log.error("journal %s", why)
        return why

    def close(self) -> None:
        """At a stop: a write-back still waiting is tried once more; if it cannot land, its jobs are
        kept in a file of their own where the system's temporary files go, and the log says where."""
        if self.conn is None and self._image is not None and self.displaced is None:
            self._written_back()
        if self.conn is None and self._image is not None:
            kept = Path(tempfile.gettempdir()) / f"{self.path.name}.unsaved-{time.strftime('%Y%m%dT%H%M%S')}"
            try:
                write_synced(kept, self._image)
                log.error("journal %s could not be written back before the stop: its jobs are kept in %s; put it "
                          "at %s before the next start", self.path, kept, self.path)  # fmt: skip
            except OSError as exc:
                log.error("journal %s could not be written back before the stop, nor kept anywhere (%s): the "
                          "jobs it held are lost", self.path, exc)  # fmt: skip
            self._image = None
        self.close_connection()

    def close_connection(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _aside_path(self) -> Path:
        return self._beside(f".displaced-{time.strftime('%Y%m%dT%H%M%S')}")

    def _remove_wal_names(self) -> None:
        """The WAL and shared-memory names beside the journal's path, of a journal no longer there:
        SQLite must not take them for the next file's."""
        for suffix in ("-wal", "-shm"):
            self._beside(suffix).unlink(missing_ok=True)


class _NotOurs(Exception):
    """The file at the journal's path is another's."""


def _stat(path: Path) -> os.stat_result | None:
    """The file at `path`, or None if there is none (its folder gone, or a file or a link loop where a
    folder of its path should be: as gone, for whoever made it so)."""
    try:
        return path.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None if there is none."""
    found = _stat(path)
    return (found.st_dev, found.st_ino) if found is not None else None
