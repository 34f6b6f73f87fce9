"""Where files live: named blobs in a local folder or in S3-compatible object storage, the same to
everything above. A blob is written through a `BlobWriter` (nothing is visible under its name until
`commit`, which makes it durable and checks its size) and read back as chunks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import StorageError, StorageFull, StorageUnavailable
from .files import NO_SPACE, SMALL_FILE, fsync_path, in_thread, open_off_loop, sync_handle, write_synced

__all__ = ["BlobGone", "BlobStore", "BlobWriter", "LocalBlobs", "storage_error", "sweep"]

log = logging.getLogger(__name__)

ROOM_MARGIN = 16 * 1024 * 1024  # free space kept beyond a large blob, for the journal and other writes


class BlobGone(Exception):
    """No blob is stored under that name (removed by hand, expired, or lost with its disk)."""


class BlobWriter(Protocol):
    async def reserve(self, size: int | None) -> None:
        """The blob will be about `size` bytes (None: not known): fail now, before anything is
        read, if it cannot be stored (a local disk without room)."""

    async def write(self, chunk: bytes) -> None: ...

    async def commit(self) -> int:
        """Make the blob durable and visible under its name; its size, checked."""

    async def abort(self) -> None:
        """Drop what was written: nothing remains under the name, nor half-written anywhere."""


class BlobStore(Protocol):
    where: str  # for logs: the folder, or s3://bucket/prefix
    links: bool  # whether `link` gives URLs (object storage), not only bytes

    def writer(self, key: str) -> BlobWriter: ...

    def chunks(self, key: str, size: int) -> AsyncGenerator[bytes, None]:
        """The blob's bytes, in chunks of at most `size`; BlobGone if there is none."""

    async def read(self, key: str) -> bytes:
        """A small blob, whole."""

    async def exists(self, key: str) -> bool: ...

    async def sizes(self, keys: list[str]) -> dict[str, int] | None:
        """The size of each of these blobs that exists; None where asking costs a round trip each
        (object storage: its reads fail instead)."""

    async def seal(self, prefix: str) -> None:
        """The blobs under `prefix` are all written: their names, too, survive a power cut."""

    async def delete(self, keys: list[str]) -> None:
        """Remove these blobs (those already gone are no error)."""

    async def delete_prefix(self, prefix: str) -> None:
        """Remove every blob whose name starts with `prefix` (a job's partial results)."""

    async def keys(self, prefix: str = "") -> list[tuple[str, float]]:
        """(name, modified time) of every blob whose name starts with `prefix`."""

    async def link(self, key: str, expires: int) -> str | None:
        """A URL anyone may GET the blob from for `expires` seconds (None: this store has none)."""


async def sweep(blobs: BlobStore, orphan: Callable[[str, float], bool], what: str) -> int:
    """Delete the blobs `orphan(key, modified)` picks. Best effort: a store away is logged and the
    next sweep tries again. How many went."""
    try:
        gone = [key for key, modified in await blobs.keys() if orphan(key, modified)]
        await blobs.delete(gone)
    except StorageError as exc:
        log.warning("%s not removed now: %s", what, exc)
        return 0
    if gone:
        log.warning("removed %d %s", len(gone), what)
    return len(gone)


def storage_error(exc: OSError) -> StorageError:
    """A write of the bridge's own that failed, as the error the client or the log sees."""
    if exc.errno in NO_SPACE:
        return StorageFull(f"the bridge's disk is full ({exc.strerror})")
    log.warning("cannot write %s: %s", exc.filename, exc.strerror)  # the path for the operator, not the client
    return StorageUnavailable(f"the bridge could not write its data folder ({exc.strerror})")


# local folder ---------------------------------------------------------------------------------------
class LocalBlobs:
    """Blobs as files under `root` (a name's `/` makes folders). A small blob is written in one trip
    to a thread; a large one streams. Each is fsynced at commit; the caller syncs the folders once
    a group is written (`seal`)."""

    links = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def writer(self, key: str) -> BlobWriter:
        return _LocalWriter(self.path(key))

    async def seal(self, prefix: str) -> None:
        """fsync the folder of `prefix` and its parent: the names written there survive a power cut."""
        folder = self.path(prefix)
        await in_thread(_sync_folders, folder)

    async def chunks(self, key: str, size: int) -> AsyncGenerator[bytes, None]:
        path = self.path(key)
        try:
            async with open_off_loop(path, "rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, size):
                    yield chunk
        except (FileNotFoundError, NotADirectoryError):
            raise BlobGone(key) from None
        except OSError as exc:  # as in `read`
            raise StorageUnavailable(f"the bridge could not read its data folder ({exc.strerror}: {key})") from None

    async def read(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(key).read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobGone(key) from None
        except OSError as exc:  # as in _sizes: the storage's trouble, which may pass
            raise StorageUnavailable(f"the bridge could not read its data folder ({exc.strerror}: {key})") from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)

    async def sizes(self, keys: list[str]) -> dict[str, int] | None:
        return await asyncio.to_thread(_sizes, self.root, keys)

    async def delete(self, keys: list[str]) -> None:
        await asyncio.to_thread(_delete_files, self.root, keys)

    async def delete_prefix(self, prefix: str) -> None:
        target = self.path(prefix)
        await asyncio.to_thread(shutil.rmtree, target, True)

    async def keys(self, prefix: str = "") -> list[tuple[str, float]]:
        return await asyncio.to_thread(_walk, self.root, prefix)

    async def link(self, key: str, expires: int) -> str | None:
        return None


def _sync_folders(folder: Path) -> None:
    fsync_path(folder)
    fsync_path(folder.parent)


def _sizes(root: Path, keys: list[str]) -> dict[str, int]:
    """Only a file that is not there is missing: any other trouble (EIO, a permission, a stale NFS
    handle) may pass, and is the storage's (StorageError), not a verdict on the file."""
    found = {}
    for key in keys:
        try:
            found[key] = (root / key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise StorageUnavailable(f"the bridge could not read its data folder ({exc.strerror}: {key})") from None
    return found


def _delete_files(root: Path, keys: list[str]) -> None:
    """Remove the files, then their folders once empty (all in one thread). A file the disk will
    not remove (read-only, EIO) is the storage's trouble (StorageError), which may pass."""
    folders = set()
    for key in keys:
        path = root / key
        try:
            path.unlink(missing_ok=True)
        except NotADirectoryError:
            continue
        except OSError as exc:
            trouble = f"the bridge could not remove from its data folder ({exc.strerror}: {key})"
            raise StorageUnavailable(trouble) from None
        folders.add(path.parent)
    for folder in folders:
        if folder != root:
            try:
                folder.rmdir()
            except OSError:  # something else in it (a partial download): remove it all
                shutil.rmtree(folder, ignore_errors=True)


def _walk(root: Path, prefix: str) -> list[tuple[str, float]]:
    """Every file under `root` whose key starts with `prefix`, with its modified time. A folder it
    may not list raises (OSError): read as empty (as a glob would), its files would be taken for
    gone, and their records forgotten."""
    found: list[tuple[str, float]] = []
    if not root.is_dir():
        return found

    def refuse(exc: OSError) -> None:
        raise exc

    for folder, _, names in os.walk(root, onerror=refuse):
        for name in names:
            path = Path(folder, name)
            key = path.relative_to(root).as_posix()
            if key.startswith(prefix) and path.is_file():
                found.append((key, path.stat().st_mtime))
    return sorted(found)


class _LocalWriter:
    """Writes straight into the file (its folder made first); a small blob is held until commit and
    written in one trip. Abort removes the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._held: list[bytes] = []
        self._handle: BinaryIO | None = None
        self._opened: contextlib.AbstractAsyncContextManager[BinaryIO] | None = None

    async def reserve(self, size: int | None) -> None:
        try:
            await in_thread(_make_room, self.path, size)
        except OSError as exc:
            raise storage_error(exc) from None

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        try:
            if self._handle is None:
                if self.size <= SMALL_FILE:
                    self._held.append(chunk)
                    return
                await in_thread(_make_room, self.path, None)
                self._opened = open_off_loop(self.path, "wb")
                self._handle = await self._opened.__aenter__()
                chunk = b"".join([*self._held, chunk])
                self._held.clear()
            await in_thread(self._handle.write, chunk)
        except OSError as exc:
            raise storage_error(exc) from None

    async def commit(self) -> int:
        try:
            if self._handle is None:
                await in_thread(write_synced, self.path, b"".join(self._held))
                self._held.clear()
            else:
                await in_thread(sync_handle, self._handle)
                await self._close()
        except OSError as exc:
            raise storage_error(exc) from None
        return self.size

    async def abort(self) -> None:
        self._held.clear()
        try:
            with contextlib.suppress(OSError):  # a close that fails (a full disk's flush) still removes it
                await self._close()
        finally:
            with contextlib.suppress(OSError):
                await in_thread(self.path.unlink, True)

    async def _close(self) -> None:
        opened, self._opened, self._handle = self._opened, None, None
        if opened is not None:
            await opened.__aexit__(None, None, None)


def _make_room(target: Path, length: int | None) -> None:
    """Create the target's folder and check the disk has room for `length` bytes, before any is read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if length is not None and shutil.disk_usage(target.parent).free < length + ROOM_MARGIN:
        raise OSError(errno.ENOSPC, f"no room for {length} bytes", str(target.parent))
