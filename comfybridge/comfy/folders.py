"""A ComfyUI's folders as this machine sees them: outputs read from its output folder instead of
fetched over GET /view, uploads written into its input folder instead of sent over /upload/image.

ComfyUI writes an output file before it announces it (`executed`). When its folders are on this
machine (the same host, or a shared disk), a file costs the bridge a thread trip where HTTP costs
a request and ComfyUI an answer: most of what collecting a small result costs, on the path between
the prompt's end and the client's answer, and for a large upload most of its hand-over.

Output names come from ComfyUI's events, so every path is resolved and must stay inside the folder
(no `..`, no symlink out of it), and only a regular file is read. A file that is not there (a
folder set wrongly, a ComfyUI on another host) is fetched over /view as before, and the log says
so. Each folder is checked at every connect: ComfyUI must serve back a file written there, else
outputs are fetched over /view and uploads go over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..store.files import SMALL_FILE, in_thread
from .shapes import Complaints, OutputRef

__all__ = ["InputDeletions", "InputFolders", "LocalInputs", "LocalOutputs", "LocalReadFailed", "LocalTooLarge"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read from disk at a time, past SMALL_FILE
TEMP_SUFFIX = ".comfybridge.tmp"  # an upload on its way into an input folder: `.<name>.<random><suffix>`
PROBE_PREFIX = ".comfybridge-probe-"  # the file ComfyUI is asked to serve back, at each connect
STALE_TEMP = 600.0  # seconds after which such files are a killed bridge's, removed at the next connect
REMOVE_DELAY = 0.25  # seconds outputs and uploads due for deletion wait, to go together in one thread trip
Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class Sink(Protocol):
    """Where a download goes (the store's writer): it raises StorageError when it cannot take it."""

    async def reserve(self, size: int | None) -> None: ...

    async def write(self, chunk: bytes) -> None: ...


class LocalReadFailed(Exception):
    """The file broke off while being read, part of it already written to the sink."""


class LocalTooLarge(Exception):
    """The file is larger than the caller may take."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _Folder:
    """One of ComfyUI's folders as this machine sees it, and the proof that it is that folder: a
    file written here that ComfyUI serves back (`write_probe`, asked at each connect)."""

    kind = ""  # "output" or "input": ComfyUI's name for the folder (GET /view?type=...)

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.usable = False  # ComfyUI was seen to use this folder
        said = f"ComfyUI %s, its {self.kind} folder: could not %s a file, %s%s"
        self.complaints = Complaints(name, log, said=said)

    def _create(self, name: str) -> tuple[int, str, int]:
        """In a thread: the folder's descriptor, a new temporary file's name there and its
        descriptor (the caller closes both). Raises OSError when the folder cannot take it."""
        folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        temp = f".{name}.{os.urandom(8).hex()}{TEMP_SUFFIX}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return folder, temp, os.open(temp, flags, 0o644, dir_fd=folder)
        except BaseException:
            os.close(folder)
            raise

    def _finish(self, created: tuple[int, str, int], name: str | None) -> None:
        """In a thread: rename the temporary file to `name` (None: remove it), close both."""
        folder, temp, fd = created
        try:
            os.close(fd)
            if name is not None:
                os.replace(
                    temp, name, src_dir_fd=folder, dst_dir_fd=folder
                )  # a link under `name` is replaced, not followed
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
            os.close(folder)

    def write_probe(self) -> tuple[str, bytes]:
        """In a thread: a file for ComfyUI to serve back (GET /view?type=<kind>), proof that this is
        the folder it uses. Temporary files a bridge killed meanwhile left here (older than
        STALE_TEMP) are removed first."""
        self._sweep()
        data = os.urandom(16).hex().encode()
        name = f"{PROBE_PREFIX}{data.decode()}"
        created = self._create(name)
        try:
            _write_all(created[2], data)
        except BaseException:
            self._finish(created, None)
            raise
        self._finish(created, name)
        return name, data

    def remove_probe(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / name)

    def _sweep(self) -> None:
        stale = time.time() - STALE_TEMP
        with contextlib.suppress(OSError), os.scandir(self.folder) as entries:
            for entry in entries:
                ours = entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)
                if not (ours or entry.name.startswith(PROBE_PREFIX)):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < stale:
                        os.unlink(entry.path)


class LocalOutputs(_Folder):
    """One ComfyUI's output folder, as this machine sees it.

    Paths are walked from the folder one name at a time, relative to the folder above and never
    through a symlink (`O_NOFOLLOW`), so no name ComfyUI reports, and no link swapped in meanwhile,
    reaches a file outside it. Which files the bridge may read or delete here is the caller's
    choice (only a job's own, see `owns_output`)."""

    kind = "output"

    def __init__(self, folder: Path, name: str) -> None:
        super().__init__(folder, name)
        self._due: list[tuple[list[OutputRef], str]] = []  # outputs to remove at the next batch

    def _folder_of(self, ref: OutputRef) -> int:
        """In a thread: an open descriptor of the ref's folder (the caller closes it). Raises
        OSError (ELOOP for a link) or ValueError (a name that is no plain name)."""
        if not _plain(ref.filename):
            raise ValueError("not a plain name")
        return self._walk([name for name in ref.subfolder.split("/") if name])

    def _walk(self, names: list[str]) -> int:
        """An open descriptor of the folder `names` leads to from this one, never through a link."""
        if any(not _plain(name) for name in names):
            raise ValueError("not a plain name")
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in names:
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open(self, ref: OutputRef) -> tuple[BinaryIO, int] | str:
        """In a thread: the file open for reading and its size, or why it cannot be read here."""
        try:
            folder = self._folder_of(ref)
        except (OSError, ValueError) as exc:
            return _why(exc)
        try:
            # O_NONBLOCK: a FIFO under the name cannot hang the open.
            fd = os.open(ref.filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except OSError as exc:
            return _why(exc)
        finally:
            os.close(folder)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                return "not a regular file"
            return os.fdopen(fd, "rb"), info.st_size
        except BaseException:
            os.close(fd)
            raise

    def _read_small(self, ref: OutputRef, max_bytes: int) -> bytes | int | str:
        """In a thread: the file's bytes if it is small, its size if not, or why it cannot be read."""
        opened = self._open(ref)
        if isinstance(opened, str):
            return opened
        handle, size = opened
        with handle:
            if size > max_bytes:
                raise LocalTooLarge(size)
            if size > SMALL_FILE:
                return size
            data = handle.read(size + 1)
        return data if len(data) == size else "it changed while it was read"

    async def copy(self, ref: OutputRef, target: Sink, max_bytes: int) -> int | None:
        """Copy the output into `target` and return its size; None when it cannot be read here
        (nothing was written then: fetch it over /view). Raises LocalTooLarge past `max_bytes`, and
        LocalReadFailed when the file broke off part-way."""
        try:
            found = await in_thread(self._read_small, ref, max_bytes)
        except OSError as exc:  # the read itself failed (EIO): /view may still give it
            found = _why(exc)
        if isinstance(found, bytes):
            await target.write(found)
            return len(found)
        if isinstance(found, str):
            self.complaints.note("read", f"{ref.filename!r}: {found}; fetched over /view")
            return None
        # Larger: streamed from a descriptor of its own, opened the same safe way.
        opening = asyncio.ensure_future(asyncio.to_thread(self._open, ref))
        try:
            opened = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        if isinstance(opened, str):
            self.complaints.note("read", f"{ref.filename!r}: {opened}; fetched over /view")
            return None
        handle, size = opened
        copied = 0
        try:
            if size > max_bytes:
                raise LocalTooLarge(size)
            await target.reserve(size)
            while chunk := await asyncio.to_thread(handle.read, CHUNK):
                copied += len(chunk)
                if copied > max_bytes:
                    raise LocalTooLarge(copied)
                await target.write(chunk)
        except OSError as exc:  # the sink raises StorageError, never OSError: this is the read
            raise LocalReadFailed(f"reading {ref.filename!r} failed: {exc.strerror or exc}") from exc
        finally:
            await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(handle.close)))
        if copied != size:
            raise LocalReadFailed(f"{ref.filename!r} changed while it was read ({copied} bytes of {size})")
        return copied

    async def remove(self, due: list[tuple[list[OutputRef], str]]) -> None:
        """Delete each batch of outputs (the caller's to choose: a job's own), then their folders,
        each once empty, up to and including its `top` (the job's own folder, e.g.
        `comfybridge/<day>/<job>`): never a folder above it, which ComfyUI may be saving into."""
        await in_thread(self._remove_all, due)

    def remove_later(self, refs: list[OutputRef], top: str, spawn: Spawn) -> None:
        """`remove`, together with the others of the next REMOVE_DELAY seconds: one thread trip for
        many jobs under load (a bridge killed meanwhile leaves them, as ComfyUI always kept them)."""
        self._due.append((refs, top))
        if len(self._due) == 1:
            spawn(self._remove_due(), f"remove outputs in {self.folder}")

    async def _remove_due(self) -> None:
        await asyncio.sleep(REMOVE_DELAY)
        due, self._due = self._due, []
        await self.remove(due)

    def _remove_all(self, due: list[tuple[list[OutputRef], str]]) -> None:
        for refs, top in due:
            self._remove(refs, top)

    def _remove(self, refs: list[OutputRef], top: str) -> None:
        floor = len([name for name in top.split("/") if name])
        for ref in refs:
            try:
                folder = self._folder_of(ref)
            except FileNotFoundError:
                continue  # not there to begin with: fetched over /view, which the log has said
            except (OSError, ValueError) as exc:
                self.complaints.note("delete", f"{ref.filename!r}: {_why(exc)}")
                continue
            try:
                if stat.S_ISREG(os.stat(ref.filename, dir_fd=folder, follow_symlinks=False).st_mode):
                    os.unlink(ref.filename, dir_fd=folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.complaints.note("delete", f"{ref.filename!r}: {_why(exc)}")
            finally:
                os.close(folder)
        folders = {tuple(name for name in ref.subfolder.split("/") if name) for ref in refs}
        for names in sorted(folders, key=len, reverse=True):  # the deepest first
            if not all(_plain(name) for name in names):
                continue
            for depth in range(len(names), max(floor, 1) - 1, -1):
                try:
                    parent = self._walk(list(names[: depth - 1]))
                except (OSError, ValueError):
                    break
                try:
                    os.rmdir(names[depth - 1], dir_fd=parent)  # refuses a folder that is not empty
                except FileNotFoundError:
                    continue  # removed with another output's folders
                except OSError:
                    break  # not empty: nor is any folder above it
                finally:
                    os.close(parent)


def _plain(name: str) -> bool:
    """A name of one folder entry: not empty, no separator, no `.`/`..`, no NUL."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return "its name is not a plain file name"


def _close_opened(opening: asyncio.Future[tuple[BinaryIO, int] | str]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        found = opening.result()
        if not isinstance(found, str):
            found[0].close()


class LocalInputs(_Folder):
    """One ComfyUI's input folder, as this machine sees it. An upload is written whole under a
    temporary name of its own, created new in the folder (never through a link someone planted
    there, never over another file), then renamed into place, so ComfyUI never loads half a
    file. An upload is deleted here once no unfinished job needs it (`remove_later`, see
    InputDeletions); nothing else here is deleted but the bridge's own stale temporary files."""

    kind = "input"

    def __init__(self, folder: Path, name: str, shared: InputFolders | None = None) -> None:
        super().__init__(folder, name)
        # With `shared`: one for every LocalInputs of the same folder on disk (see InputFolders).
        deletions = shared.deletions_for(folder, self.complaints) if shared else None
        self.deletions = deletions or InputDeletions(folder, self.complaints)

    def _copy(self, source: Path, name: str) -> bool:
        """In a thread: copy a local upload in; False when the folder cannot take it. Raises
        FileNotFoundError when the upload is gone."""
        with open(source, "rb") as src:
            try:
                created = self._create(name)
            except OSError as exc:
                self._failed(name, exc)
                return False
            try:
                with os.fdopen(os.dup(created[2]), "wb") as dst:  # a copy, not a link: ComfyUI's to change
                    shutil.copyfileobj(src, dst, CHUNK)
            except OSError as exc:
                self._finish(created, None)
                if not os.path.exists(source):
                    raise  # the upload is gone: the caller says so
                self._failed(name, exc)  # the folder's trouble (full, ...): over HTTP, from its start
                return False
            try:
                self._finish(created, name)
            except OSError as exc:
                self._failed(name, exc)
                return False
        return True

    async def place(self, source: Path | AsyncIterator[bytes], name: str) -> bool:
        """Put an upload into the folder as `name`. False when the folder could not take it and
        nothing was taken from `source`: send it over HTTP (and so are later ones, until the next
        connect's check). Raises OSError when a stream broke off part-way (it cannot be sent from
        its start again here), or when a local upload cannot be read."""
        if not _plain(name) or name.startswith("."):
            return False  # the bridge's own upload names are neither; never write anywhere else
        if isinstance(source, Path):
            return await in_thread(self._copy, source, name)
        creating = asyncio.ensure_future(asyncio.to_thread(self._create, name))
        try:
            created = await asyncio.shield(creating)
        except asyncio.CancelledError:
            creating.add_done_callback(lambda done: _discard_created(self, done))
            raise
        except OSError as exc:
            self._failed(name, exc)
            return False
        renamed = None
        try:
            async for chunk in source:
                await in_thread(_write_all, created[2], chunk)
            renamed = name
        except OSError as exc:
            self._failed(name, exc)
            raise
        finally:
            await in_thread(self._finish, created, renamed)
        return True

    async def settle(self, name: str) -> None:
        """Before `name` is sent to this ComfyUI again: see InputDeletions.settle."""
        await self.deletions.settle(name)

    def remove_later(self, names: Iterable[str], spawn: Spawn) -> None:
        """Delete these uploads from the folder (no unfinished job needs them any more): see InputDeletions."""
        self.deletions.remove_later(names, spawn)

    def _failed(self, name: str, exc: OSError) -> None:
        self.usable = False
        self.complaints.note("write", f"{name!r}: {exc.strerror or exc}; uploads go over HTTP until it reconnects")


class InputDeletions:
    """The uploads due to be deleted from one input folder, and those being deleted. An upload is
    deleted once no unfinished job needs it, together with the others of the next REMOVE_DELAY
    seconds, in one thread trip. Sending it to a ComfyUI that reads this folder again first calls
    off its pending deletion and waits out one under way (`settle`), so no batch ever deletes the
    new copy. Only upload names reach here (the bridge's own, `<random>-<stem>.<ext>`): a name it
    wrote, or ComfyUI wrote for it over HTTP, in this run or an earlier one."""

    def __init__(self, folder: Path, complaints: Complaints) -> None:
        self.folder = folder
        self.complaints = complaints
        self._due: set[str] = set()
        self._batching = False
        self._removing: dict[str, asyncio.Future[None]] = {}  # name -> the batch deleting it now

    async def settle(self, name: str) -> None:
        self._due.discard(name)
        removing = self._removing.get(name)
        if removing is not None:
            await asyncio.shield(removing)

    def remove_later(self, names: Iterable[str], spawn: Spawn) -> None:
        self._due.update(name for name in names if _plain(name) and not name.startswith("."))
        if self._due and not self._batching:
            self._batching = True
            spawn(self._remove_due(), f"remove uploads in {self.folder}")

    async def _remove_due(self) -> None:
        try:
            await asyncio.sleep(REMOVE_DELAY)
        finally:
            self._batching = False
        names, self._due = self._due, set()
        if not names:
            return  # each was sent again meanwhile (`settle`)
        removing = asyncio.ensure_future(in_thread(self._unlink_all, names))
        self._removing.update(dict.fromkeys(names, removing))
        try:
            await asyncio.shield(removing)
        finally:
            for name in names:
                if self._removing.get(name) is removing:
                    del self._removing[name]

    def _unlink_all(self, names: set[str]) -> None:
        """In a thread: unlink each name in the folder (a link planted under it is removed itself,
        never followed; a name not there is what was wanted)."""
        try:
            folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.complaints.note("delete", f"{len(names)} uploads: {exc.strerror or exc}; they stay")
            return
        try:
            for name in names:
                try:
                    os.unlink(name, dir_fd=folder)
                except FileNotFoundError:
                    pass  # deleted already: what was wanted
                except OSError as exc:
                    self.complaints.note("delete", f"{name!r}: {exc.strerror or exc}; it stays")
        finally:
            os.close(folder)


class InputFolders:
    """One InputDeletions per input folder as the disk knows it (device and inode), so backends that
    share a folder, or name it two ways, share one: a copy one writes is never deleted by a batch
    another scheduled. The scheduler keeps one for all its backends, across SIGHUPs."""

    def __init__(self) -> None:
        self._by_folder: dict[object, InputDeletions] = {}

    def deletions_for(self, folder: Path, complaints: Complaints) -> InputDeletions:
        try:
            info = os.stat(folder)  # once per backend at start-up or SIGHUP: a folder the config checked
            key: object = (info.st_dev, info.st_ino)
        except OSError:
            key = os.path.realpath(folder)
        found = self._by_folder.get(key)
        if found is None:
            found = self._by_folder[key] = InputDeletions(folder, complaints)
        return found


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _discard_created(inputs: LocalInputs, creating: asyncio.Future[tuple[int, str, int]]) -> None:
    if not creating.cancelled() and creating.exception() is None:
        inputs._finish(creating.result(), None)  # the same object's cleanup, after a cancel
