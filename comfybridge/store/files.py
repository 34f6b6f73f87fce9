"""File helpers: blocking calls kept off the event loop, durable writes, and no handle ever leaked."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

__all__ = [
    "NO_SPACE",
    "SMALL_FILE",
    "all_bounded",
    "atomic_write",
    "fsync_path",
    "in_thread",
    "open_off_loop",
    "sync_handle",
    "write_synced",
]

_T = TypeVar("_T")

_temp_names = itertools.count()
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # what a write says when the disk (or the user's quota) is full
# Files up to this size are read or written whole, in one trip to a thread: a thread hop costs
# more than holding a small image in memory. Larger ones stream in chunks.
SMALL_FILE = 1 << 20


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder, so that a rename into it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (and its folder) holding `data`, fsynced; the folder's entry is the caller's to sync."""
    try:
        os.mkdir(path.parent)  # usually new (a job's result folder); cheaper than Path.mkdir(parents=...)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
        sync_handle(handle)


def sync_handle(handle: BinaryIO) -> None:
    """Everything written to an open file, on disk."""
    handle.flush()
    os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write so that a crash leaves either the old file or the new one: temp, flush, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_temp_names)}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            sync_handle(handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk: no half-written temp file left behind
            tmp.unlink()
        raise
    fsync_path(path.parent)


async def in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """`asyncio.to_thread`, except that a cancelled caller still waits for the thread to finish: a
    write cut off by a cancel cannot land after its caller has cleaned up (and recreate a file)."""
    running = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


async def all_bounded(steps: Iterable[Awaitable[_T]], at_once: int) -> list[_T]:
    """Every step's result, in order, at most `at_once` running at a time (requests to one server).
    A failure is raised once every step has ended: none is left running behind the caller."""
    room = asyncio.Semaphore(at_once)

    async def bounded(step: Awaitable[_T]) -> _T:
        async with room:
            return await step

    done = await asyncio.gather(*(bounded(step) for step in steps), return_exceptions=True)
    results: list[_T] = []
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results


@contextlib.asynccontextmanager
async def open_off_loop(path: Path, mode: str) -> AsyncIterator[BinaryIO]:
    """Open (and later close) a file in a thread. A task cancelled while the file opens or closes
    cannot leak the handle: the thread finishes, and the file is closed then. Read and write it with
    `asyncio.to_thread(handle.read, n)` / `(handle.write, chunk)`."""
    opening: asyncio.Future[BinaryIO] = asyncio.ensure_future(asyncio.to_thread(_open_binary, path, mode))
    try:
        handle = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_when_opened)
        raise
    try:
        yield handle
    finally:
        await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(handle.close)))


def _open_binary(path: Path, mode: str) -> BinaryIO:
    return cast(BinaryIO, open(path, mode))


def _close_when_opened(opening: asyncio.Future[BinaryIO]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()
