"""The data folder's lock: one bridge per data folder, taken before anything in it is read or changed."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import secrets
import weakref
from collections.abc import Callable
from pathlib import Path

import orjson

from .files import write_synced

__all__ = ["DataDirLock", "DataDirLocked", "folder_mark"]

LOCK_FILE = "bridge.lock"
MARK_FILE = "cluster-mark"


class DataDirLocked(Exception):
    """Another bridge holds the data folder; the message names it."""


class DataDirLock:
    """An exclusive `flock` on the data folder itself, held for the bridge's life.

    Two bridges on one folder would both recover the journal, share one ComfyUI client id and
    sweep each other's results. `flock` belongs to the open folder, so a second bridge, even in the
    same process, is refused; the kernel releases it when its holder dies (kill -9 included), so
    there is no stale lock to clean up by hand; and no file can be deleted to get around it.
    `bridge.lock` only names the holder, for the refusal."""

    def __init__(self, path: Path, fd: int | None, listening: str = "") -> None:
        self.path = path
        self._listening = listening
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd) if fd is not None else None
        self._kept: list[Callable[[], object]] = []  # locks on earlier folders, moved away whole

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None and self._finalizer is not None:
            self._fd = None
            self._finalizer()  # closing the file releases the lock
        for kept in self._kept:
            kept()
        self._kept.clear()

    @classmethod
    def shared(cls, data_dir: Path) -> DataDirLock:
        """No lock: the bridges of a cluster share the folder, and the database's lock says which one
        of them leads (only the leader writes or sweeps it)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir / LOCK_FILE, None)

    @classmethod
    def acquire(cls, data_dir: Path, listening: str) -> DataDirLock:
        """Take the lock (creating the folder if new) or raise DataDirLocked naming the holder."""
        return cls(data_dir / LOCK_FILE, _lock(data_dir, listening), listening)

    def retake(self) -> None:
        """The data folder was deleted under the running bridge and made again (the journal writes
        itself back into it): lock the new one before anything is written there, so that no second
        bridge can take it and the jobs in it. DataDirLocked if one already did. Blocking."""
        if self._fd is None or self._finalizer is None:
            return  # a cluster's shared folder: nothing is locked
        folder = self.path.parent
        held = os.fstat(self._fd)
        with contextlib.suppress(FileNotFoundError):
            now = folder.stat()
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return
        fd = _lock(folder, self._listening)
        if held.st_nlink == 0:  # the old folder is gone for good: nobody can take it any more
            self._finalizer()
        else:  # moved elsewhere, its journal in it: still ours, or a bridge started there would run its jobs
            self._kept.append(self._finalizer)
        self._fd, self._finalizer = fd, weakref.finalize(self, os.close, fd)


def _lock(data_dir: Path, listening: str) -> int:
    """Lock the data folder (creating it if new) and name the holder in its lock file: the folder's
    open descriptor, which holds the lock. DataDirLocked if another bridge holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise DataDirLocked(
                f"data folder {data_dir} cannot be locked ({exc.strerror}: a network filesystem without "
                "locking?); one bridge per data folder needs a lock: use a local disk"
            ) from None
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise DataDirLocked(
            f"data folder {data_dir} is in use by another comfybridge ({_holder(path)}); one bridge per data "
            "folder: stop that one, or give this one its own --data-dir"
        ) from None
    holder = {
        "pid": os.getpid(),
        "listening": listening,
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        path.write_bytes(orjson.dumps(holder))
    except OSError:
        os.close(fd)
        raise
    return fd


def _holder(path: Path) -> str:
    """What the lock file says of the bridge holding it, as a phrase."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        info = orjson.loads(path.read_bytes())
        return f"pid {int(info['pid'])}, listening on {info['listening']}, since {info['since']}"
    return "its lock file does not say which"


def folder_mark(data_dir: Path) -> str:
    """A random name this data folder keeps (made by the first bridge to ask): bridges of a cluster
    that share the folder read the same one, so one whose --data-dir is another folder can tell.
    Made whole under a name of its own, then linked into place: two bridges starting at once agree
    on one, and a kill can leave no empty mark."""
    path = data_dir / MARK_FILE
    with contextlib.suppress(FileNotFoundError):
        mark = path.read_text().strip()
        if mark:
            return mark
    made = data_dir / f".{MARK_FILE}.{secrets.token_hex(8)}"
    write_synced(made, secrets.token_hex(16).encode())
    try:
        with contextlib.suppress(FileExistsError):
            os.link(made, path)  # only if there is none yet
    finally:
        made.unlink(missing_ok=True)
    return path.read_text().strip()
