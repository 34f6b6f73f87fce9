"""A ComfyUI's folders as this machine sees them: outputs read from its output folder instead of
fetched over GET /view, uploads written into its input folder instead of sent over /upload/image.

ComfyUI writes an output file before it announces it (`executed`). When its folders are on this
machine (the same host, or a shared disk), a file costs the bridge a thread trip where HTTP costs
a request and ComfyUI an answer: most of what collecting a small result costs, on the path between
the prompt's end and the client's answer, and for a large upload most of its hand-over.

Output names come from ComfyUI's events, so every path is resolved and must stay inside the folder
(no `..`, no symlink out of it), and only a regular file is read. A file that is not there (a
folder set wrongly, a ComfyUI on another host) is fetched over /view as before, and the log says
so. An input folder is checked at every connect: ComfyUI must serve back a file written there,
else uploads go over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from ..store.files import SMALL_FILE, in_thread, open_off_loop
from .shapes import Complaints, OutputRef

__all__ = ["LocalInputs", "LocalOutputs", "LocalReadFailed", "LocalTooLarge"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read from disk at a time, past SMALL_FILE
_temp_names = itertools.count()


class Sink(Protocol):
    async def reserve(self, size: int | None) -> None: ...

    async def write(self, chunk: bytes) -> None: ...


class LocalReadFailed(Exception):
    """The file broke off while being read, part of it already written to the sink."""


class LocalTooLarge(Exception):
    """The file is larger than the caller may take."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class LocalOutputs:
    """One ComfyUI's output folder, as this machine sees it."""

    def __init__(self, folder: Path, name: str) -> None:
        self.root = os.path.realpath(folder)
        said = "ComfyUI %s, its output folder: could not %s a file, %s%s"
        self.complaints = Complaints(name, log, said=said)

    def _place(self, ref: OutputRef) -> str | None:
        """The file's real path, if it lies inside the folder (blocking: it resolves links)."""
        path = os.path.realpath(os.path.join(self.root, ref.subfolder, ref.filename))
        return path if path.startswith(self.root + os.sep) else None

    def _look(self, ref: OutputRef, max_bytes: int) -> tuple[str, int, bytes | None] | str:
        """In a thread: the file's path, its size, and its bytes if it is small; or why it cannot be
        read here."""
        path = self._place(ref)
        if path is None:
            return f"its name leads out of {self.root}"
        try:
            # O_NONBLOCK: a FIFO planted under the name cannot hang the open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            return f"{exc.strerror or exc} ({path})"
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return f"{path} is not a regular file"
            if info.st_size > max_bytes:
                raise LocalTooLarge(info.st_size)
            if info.st_size > SMALL_FILE:
                return path, info.st_size, None
            data = handle.read(info.st_size + 1)
        if len(data) != info.st_size:
            return f"{path} changed while it was read"
        return path, len(data), data

    async def remove(self, refs: list[OutputRef]) -> None:
        """Delete these outputs, and each one's folder once empty (a job's own, with output_subfolder),
        from ComfyUI's folder: the bridge has stored them. Only regular files inside the folder."""
        await in_thread(self._remove, refs)

    def _remove(self, refs: list[OutputRef]) -> None:
        folders = set()
        for ref in refs:
            path = self._place(ref)
            try:
                if path is not None and stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
                    folders.add(os.path.dirname(path))
            except FileNotFoundError:
                pass  # not there to begin with: fetched over /view, which the log has said
            except OSError as exc:
                self.complaints.note("delete", f"{ref.filename!r}: {exc.strerror or exc}")
        for folder in folders - {self.root}:
            with contextlib.suppress(OSError):  # not empty: another output, not only this job's
                os.rmdir(folder)  # only the job's own folder: a day's folder may be in use by ComfyUI

    async def copy(self, ref: OutputRef, target: Sink, max_bytes: int) -> int | None:
        """Copy the output into `target` and return its size; None when it cannot be read here
        (nothing was written then: fetch it over /view). Raises LocalTooLarge past `max_bytes`, and
        LocalReadFailed when the file broke off part-way."""
        try:
            found = await in_thread(self._look, ref, max_bytes)
        except OSError as exc:  # the read itself failed (EIO): /view may still give it
            found = f"{exc.strerror or exc}"
        if isinstance(found, str):
            self.complaints.note("read", f"{ref.filename!r}: {found}; fetched over /view")
            return None
        path, size, data = found
        if data is not None:
            await target.write(data)
            return size
        await target.reserve(size)
        copied = 0
        try:
            async with open_off_loop(Path(path), "rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise LocalTooLarge(copied)
                    await target.write(chunk)
        except OSError as exc:  # the sink raises StorageError, never OSError: this is the read
            raise LocalReadFailed(f"reading {path} failed: {exc.strerror or exc}") from exc
        if copied != size:
            raise LocalReadFailed(f"{path} changed while it was read ({copied} bytes of {size})")
        return copied


class LocalInputs:
    """One ComfyUI's input folder, as this machine sees it: uploads are copied in, whole, under a
    temporary name first, so ComfyUI never loads half a file. `usable` says whether ComfyUI was
    seen to read from this folder (checked at each connect, `confirm`)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.usable = False
        said = "ComfyUI %s, its input folder: could not %s a file, %s%s"
        self.complaints = Complaints(name, log, said=said)

    def _temp(self, name: str) -> Path:
        return self.folder / f".{name}.comfybridge-{os.getpid()}-{next(_temp_names)}.tmp"

    def _copy(self, source: Path, name: str) -> None:
        temp = self._temp(name)
        try:
            shutil.copyfile(source, temp)  # a copy, not a link: what ComfyUI does to it stays its own
            os.replace(temp, self.folder / name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    async def place(self, source: Path | AsyncIterator[bytes], name: str) -> bool:
        """Put an upload into the folder as `name`. False when it could not be written and nothing
        was taken from `source`: send it over HTTP. Raises OSError when a stream broke off part-way
        (it cannot be sent from its start again here). After a failure, uploads go over HTTP until
        the next connect's check."""
        if os.sep in name or name.startswith("."):
            return False  # the bridge's own upload names have neither; never write anywhere else
        if isinstance(source, Path):
            try:
                await in_thread(self._copy, source, name)
            except OSError as exc:
                self._failed(name, exc)
                return False
            return True
        temp = self._temp(name)
        try:
            async with open_off_loop(temp, "wb") as handle:
                async for chunk in source:
                    await in_thread(handle.write, chunk)
            await in_thread(os.replace, temp, self.folder / name)
        except OSError as exc:
            self._failed(name, exc)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                await in_thread(os.unlink, temp)
        return True

    def _failed(self, name: str, exc: OSError) -> None:
        self.usable = False
        self.complaints.note("write", f"{name!r}: {exc.strerror or exc}; uploads go over HTTP until it reconnects")

    def write_probe(self) -> tuple[str, bytes]:
        """In a thread: a file for ComfyUI to serve back (GET /view?type=input), proof that this is
        the folder it reads its inputs from."""
        data = os.urandom(16).hex().encode()
        name = f".comfybridge-probe-{data.decode()}"
        (self.folder / name).write_bytes(data)
        return name, data

    def remove_probe(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / name)
