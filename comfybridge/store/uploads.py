"""Upload store: client files kept under unique names until a job sends them to its backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
import re
import secrets
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, StorageError, StorageFull, StorageUnavailable, TooLarge, UnsupportedMedia
from .blobs import BlobStore, BlobWriter, sweep
from .files import NO_SPACE, fsync_path, in_thread, open_off_loop
from .media import MAX_FRAMES, BadHeaders, Frames, image_frames, is_complete, media_kind_of, sniff, sniff_needs

__all__ = ["IncomingFile", "UploadGone", "UploadLimits", "UploadStore", "safe_name"]

log = logging.getLogger(__name__)

EMPTY_FOLDER_AGE = 60.0  # seconds an empty owner folder is kept (an upload may be about to use it)
SHARED = "_shared"  # folder of uploads made without a clientId, usable by any client
SPOOL = ".spool"  # with object storage: where a copy of a file waits while it is checked
STREAM_CHUNK = 256 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class UploadGone(Exception):
    """A file a job names is no longer stored (removed by hand, or lost with its disk)."""


@dataclass
class Upload:
    name: str
    path: Path  # on the local disk; in object storage, its key there
    owner: str | None
    kind: str
    last_used: float


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int
    max_request_bytes: int
    max_files: int
    allowed_kinds: tuple[str, ...]
    max_frame_mp: float
    max_total_mp: float
    max_video_mp: float


class IncomingFile:
    """One part of an upload request, read in chunks; the edge adapts its multipart reader to this."""

    def __init__(self, field_name: str, filename: str | None, chunks: AsyncIterator[bytes]) -> None:
        self.field_name = field_name
        self.filename = filename
        self.chunks = chunks


def safe_name(filename: str, mime: str, sniffed_ext: str) -> str:
    """`<random>-<stem>.<ext>`: decoded, last path segment only, nothing that could escape a folder.
    The client's extension is kept only when it names what the content is (`.jpeg` for a JPEG);
    otherwise the content decides (`x.html` holding a PNG is stored as `.png`)."""
    decoded = urllib.parse.unquote(filename)
    last = re.split(r"[/\\]", decoded)[-1]
    stem, dot, ext = last.rpartition(".")
    if not dot:
        stem, ext = last, ""
    stem = _SAFE.sub("_", stem).replace("..", "_")[:80].strip(".") or "file"  # cut, then trimmed: no ".."
    ext = "." + ext.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext) or mimetypes.guess_type("x" + ext)[0] != mime:
        ext = sniffed_ext
    return f"{secrets.token_hex(6)}-{stem}{ext}"


def _sniffed(head: bytes, chunk: bytes) -> bytes:
    """`head` grown from `chunk` up to what `sniff` needs (more once ID3 tags say how long they are)."""
    used = 0
    while used < len(chunk) and len(head) < (need := sniff_needs(head)):
        piece = chunk[used : used + need - len(head)]
        head, used = head + piece, used + len(piece)
    return head


def _touch(paths: list[Path], when: float) -> None:
    """An upload's last use, as its file's modified time (blocking: run it in a thread)."""
    for path in paths:
        with contextlib.suppress(OSError):  # gone meanwhile (expired, deleted): nothing to keep
            os.utime(path, (when, when))


def _owner_dir(owner: str | None) -> str:
    return SHARED if owner is None else "c-" + owner


class UploadStore:
    """Files under `root/<owner>/`; with `blobs` (object storage) kept there instead, as
    `<owner>/<name>`, and `root` only spools each file while it is checked."""

    def __init__(self, root: Path, limits: UploadLimits, blobs: BlobStore | None = None) -> None:
        self.root = root
        self.limits = limits
        self.blobs = blobs
        self._uploads: dict[str, Upload] = {}
        self._pins: dict[str, int] = {}  # upload name -> unfinished jobs that will send it
        self._owned: dict[str, int] = {}  # client id -> uploads it owns
        self._arriving: set[str] = set()  # names stored by a request not yet answered (not indexed yet)

    def owners(self) -> set[str]:
        """Clients that own an upload (and so are known)."""
        return set(self._owned)

    def owns(self, client_id: str) -> bool:
        return client_id in self._owned

    def _index(self, upload: Upload) -> None:
        self._uploads[upload.name] = upload
        if upload.owner is not None:
            self._owned[upload.owner] = self._owned.get(upload.owner, 0) + 1

    def _unindex(self, upload: Upload) -> None:
        self._uploads.pop(upload.name, None)
        if upload.owner is not None:
            left = self._owned.get(upload.owner, 0) - 1
            if left > 0:
                self._owned[upload.owner] = left
            else:
                self._owned.pop(upload.owner, None)

    def pin(self, names: Iterable[str]) -> None:
        """An unfinished job needs these files: they do not expire until it ends."""
        for name in names:
            self._pins[name] = self._pins.get(name, 0) + 1

    def pinned(self, name: str) -> bool:
        """An unfinished job needs this file."""
        return name in self._pins

    def unpin(self, names: Iterable[str]) -> list[str]:
        """The job ended: its files expire `upload_ttl` from now unless used again. Returns those no
        unfinished job needs any more."""
        now = time.time()
        unneeded, paths = [], []
        for name in names:
            left = self._pins.get(name, 0) - 1
            if left > 0:
                self._pins[name] = left
            else:
                self._pins.pop(name, None)
                unneeded.append(name)
            upload = self._uploads.get(name)
            if upload is not None:
                upload.last_used = now
                paths.append(upload.path)
        if paths and self.blobs is None:  # kept on the file itself, so that a restart knows the use (`load`)
            asyncio.get_running_loop().run_in_executor(None, _touch, paths, now)
        return unneeded

    async def reload(self) -> None:
        """Index what earlier runs (or, in a cluster, other bridges) left, so uploads survive a restart.
        Starts afresh: the jobs that pin files pin them again as they are recovered."""
        if self.blobs is None:
            await asyncio.to_thread(self.load)
            return
        self._forget_all()
        await asyncio.to_thread(shutil.rmtree, self.root / SPOOL, True)  # files a crash left mid-check
        for key, modified in await self.blobs.keys():
            folder, _, name = key.rpartition("/")
            owner = None if folder == SHARED else folder.removeprefix("c-")
            self._index(Upload(name, Path(key), owner, media_kind_of(name) or "", modified))

    def _forget_all(self) -> None:
        self._uploads.clear()
        self._pins.clear()
        self._owned.clear()

    def load(self) -> None:
        """`reload` for a local folder (blocking: run it in a thread)."""
        self._forget_all()
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in self.root.iterdir():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            owner = None if folder.name == SHARED else folder.name.removeprefix("c-")
            for path in folder.iterdir():
                if path.name.startswith("."):
                    path.unlink(missing_ok=True)  # an upload interrupted mid-write
                    continue
                kind = media_kind_of(path.name) or ""
                self._index(Upload(path.name, path, owner, kind, path.stat().st_mtime))

    def kind_for(self, name: str, client_id: str, pool: str | None) -> str | None:
        """The media kind of an upload this client may use (its own, or one of `pool`: the uploads
        made without a clientId that it may use), else None."""
        upload = self._uploads.get(name)
        if upload is None or upload.owner not in (pool, client_id):
            return None
        return upload.kind

    async def source_of(self, name: str) -> Path | AsyncIterator[bytes]:
        """An upload a job names: its path, or its bytes streamed from object storage; UploadGone if
        it is not there any more."""
        upload = self._uploads.get(name)
        gone = UploadGone(f"the uploaded file {name!r} of the job is gone")
        if upload is None:
            raise gone
        upload.last_used = time.time()
        if self.blobs is None:
            return upload.path
        key = upload.path.as_posix()
        if not await self.blobs.exists(key):
            raise gone
        return self.blobs.chunks(key, STREAM_CHUNK)

    async def receive(self, owner: str | None, parts: AsyncIterator[IncomingFile]) -> dict[str, str]:
        """Store every part; all or nothing: on any error the files of this request are removed."""
        saved: dict[str, Upload] = {}
        total = 0
        folder = self.root / (_owner_dir(owner) if self.blobs is None else SPOOL)
        try:
            async for part in parts:
                if len(saved) >= self.limits.max_files:
                    raise BadInput(f"Too many files in one upload: at most {self.limits.max_files}.")
                identifier = part.field_name or "file"
                if identifier in saved:
                    raise BadInput(f"Two parts share the identifier {identifier!r}; give each file its own field name.")
                if part.filename is None:
                    raise BadInput(f"Part {identifier!r} is not a file: send it with a filename.")
                upload, size = await self._receive_one(folder, owner, part, total)
                total += size
                saved[identifier] = upload
                self._arriving.add(upload.name)
        except BaseException:
            await self._remove(list(saved.values()))
            raise
        finally:
            self._arriving.difference_update(upload.name for upload in saved.values())
        if not saved:
            raise BadInput("No file in the request: send multipart/form-data with one file per part.")
        for upload in saved.values():
            self._index(upload)
        return {identifier: upload.name for identifier, upload in saved.items()}

    async def _receive_one(
        self, folder: Path, owner: str | None, part: IncomingFile, before: int
    ) -> tuple[Upload, int]:
        """One file, written to `folder` as it arrives and, with object storage, to the store at the
        same time (a multipart upload, completed only once the whole file has passed its checks)."""
        limits = self.limits
        tmp = folder / f".{secrets.token_hex(8)}.part"
        size = 0
        head = b""
        kind = mime = ext = name = ""
        early: list[bytes] = []  # with object storage: what came before the content said its name
        writer: BlobWriter | None = None
        placed: Path | None = None  # without object storage: where the file is renamed to
        try:
            await in_thread(_make_empty, tmp)
            async with open_off_loop(tmp, "wb") as handle:
                async for chunk in part.chunks:
                    size += len(chunk)
                    if size > limits.max_file_bytes:
                        raise TooLarge(
                            f"File {part.filename!r} is larger than the limit of {_mb(limits.max_file_bytes)} MB."
                        )
                    if before + size > limits.max_request_bytes:
                        raise TooLarge(f"The upload is larger than the limit of {_mb(limits.max_request_bytes)} MB.")
                    if not kind:
                        head = _sniffed(head, chunk)
                        if len(head) >= sniff_needs(head):
                            kind, mime, ext = self._check_media(head, part)
                            name = safe_name(part.filename or "", mime, ext)
                    await asyncio.to_thread(handle.write, chunk)
                    if self.blobs is not None:
                        early.append(chunk)
                        if name:
                            writer = writer or self.blobs.writer(f"{_owner_dir(owner)}/{name}")
                            for held in early:
                                await writer.write(held)
                            early.clear()
            if not kind:
                kind, mime, ext = self._check_media(head, part)
                name = safe_name(part.filename or "", mime, ext)
            await self._check_content(tmp, kind, ext, mime, part.filename or "")
            if self.blobs is not None:  # checked whole here; kept there (durable once committed)
                path = Path(f"{_owner_dir(owner)}/{name}")
                writer = writer or self.blobs.writer(path.as_posix())
                for held in early:
                    await writer.write(held)
                await writer.commit()
                await asyncio.to_thread(tmp.unlink, missing_ok=True)
            else:
                # Synced before the client hears of it: a job that names it is journaled as durable.
                path = placed = folder / name
                await in_thread(_sync_and_rename, tmp, path)
        except BaseException as exc:
            try:
                if writer is not None:
                    await writer.abort()
            finally:  # the spool copy goes even when the abort is cut short; so does a file renamed
                with contextlib.suppress(OSError):  # into place whose folder could not be synced
                    await asyncio.to_thread(_unlink_all, tmp, placed)
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):  # (the client hanging up)
                raise write_refused(exc) from None
            raise
        return Upload(name, path, owner, kind, time.time()), size

    async def _remove(self, uploads: list[Upload]) -> None:
        if self.blobs is not None:
            try:
                await self.blobs.delete([upload.path.as_posix() for upload in uploads])
            except StorageError as exc:  # they stay in the bucket, unindexed: a later start indexes them again
                log.warning("%d uploads not removed from object storage now: %s", len(uploads), exc)
            return
        for upload in uploads:
            await asyncio.to_thread(upload.path.unlink, missing_ok=True)

    async def _check_content(self, path: Path, kind: str, ext: str, mime: str, filename: str) -> None:
        """The whole file is well-formed and, for an image or a video, its headers promise no more
        pixels than the limits allow (ComfyUI decodes every frame to float32 at once)."""
        broken = f"File {filename!r} is not a complete, well-formed {mime} file."
        if not await asyncio.to_thread(is_complete, path, ext):
            raise UnsupportedMedia(broken)
        try:
            frames = await asyncio.to_thread(image_frames, path, ext)
        except BadHeaders:
            raise UnsupportedMedia(broken) from None
        problem = _over_pixels(filename, kind, frames, self.limits) if frames else None
        if problem:
            raise TooLarge(problem)

    def _check_media(self, head: bytes, part: IncomingFile) -> tuple[str, str, str]:
        found = sniff(head)
        allowed = ", ".join(self.limits.allowed_kinds)
        if found is None:
            raise UnsupportedMedia(f"File {part.filename!r} is not a recognised media file (allowed: {allowed}).")
        kind, mime, ext = found
        if kind not in self.limits.allowed_kinds:
            raise UnsupportedMedia(f"File {part.filename!r} is {mime}, which is not allowed (allowed: {allowed}).")
        return kind, mime, ext

    async def expire(self, ttl: float, limit: int | None = None) -> int:
        """Remove uploads unused for `ttl` seconds that no unfinished job needs (at most `limit`)."""
        cutoff = time.time() - ttl
        old = [u for u in self._uploads.values() if u.last_used < cutoff and u.name not in self._pins][:limit]
        for upload in old:
            self._unindex(upload)
        await self._remove(old)
        if old:
            log.info("expired %d unused uploads", len(old))
        if self.blobs is None:
            await asyncio.to_thread(self._remove_empty_folders, time.time() - min(ttl, EMPTY_FOLDER_AGE))
        return len(old)

    async def sweep_orphans(self, older_than: float) -> int:
        """In object storage, delete the upload objects this store does not index that are older than
        `older_than` seconds (one whose deletion was refused, or whose upload answer was lost)."""
        if self.blobs is None:
            return 0
        cutoff = time.time() - older_than

        def orphan(key: str, modified: float) -> bool:
            name = key.rpartition("/")[2]
            return modified < cutoff and name not in self._uploads and name not in self._arriving

        return await sweep(self.blobs, orphan, "upload objects no record names")

    def _remove_empty_folders(self, older_than: float) -> None:
        """Owner folders left empty (a failed upload, every file expired), once they have been empty a while."""
        for folder in self.root.iterdir():
            with contextlib.suppress(OSError):  # not empty, or gone: both fine
                if folder.is_dir() and folder.stat().st_mtime < older_than:
                    folder.rmdir()


def write_refused(exc: OSError) -> StorageFull | StorageUnavailable:
    """An upload the disk would not take: full (507), or the data folder not writable (503)."""
    if exc.errno in NO_SPACE:
        return StorageFull("The bridge's disk is full, so the file was not stored; try again later.")
    log.error("uploads: cannot write in %s: %s", exc.filename, exc.strerror)
    return StorageUnavailable(
        f"The bridge cannot write to its data folder ({exc.strerror}), so the file was not stored; "
        "its operator has been told in the log."
    )


def _sync_and_rename(tmp: Path, path: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _make_empty(tmp: Path) -> None:
    """The empty file `tmp`, and its folder if there is none (its entry in its parent made durable: a
    job will name a file in it). Made as a part arrives, not before: the sweep removes owner folders
    that have been empty a while, and a file in one keeps it."""
    try:
        tmp.touch()
    except FileNotFoundError:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        fsync_path(tmp.parent.parent)
        tmp.touch()


def _unlink_all(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            path.unlink(missing_ok=True)


def _over_pixels(filename: str, kind: str, frames: Frames, limits: UploadLimits) -> str | None:
    """Why an image or a video would take too much memory to decode, or None: a small file of many
    or huge frames could otherwise take a GPU server down."""
    if frames.count > MAX_FRAMES:
        return f"File {filename!r} has more than {MAX_FRAMES} frames, over the limit of {MAX_FRAMES} frames."
    size = f"{frames.width}x{frames.height}"
    if frames.count == 1:
        shape = f"is {size}"
    else:
        shape = f"has {frames.count} frames of {'' if frames.same_size else 'up to '}{size}"
    if frames.frame_mp > limits.max_frame_mp:
        return (
            f"File {filename!r} {shape} ({_mp(frames.frame_mp)} megapixels a frame), "
            f"over the limit of {_mp(limits.max_frame_mp)} megapixels (max_frame_mp)."
        )
    total, setting = (limits.max_video_mp, "max_video_mp") if kind == "video" else (limits.max_total_mp, "max_total_mp")
    if frames.total_mp > total:
        return (
            f"File {filename!r} {shape} ({_mp(frames.total_mp)} megapixels in all), "
            f"over the limit of {_mp(total)} megapixels ({setting})."
        )
    return None


def _mp(megapixels: float) -> str:
    return f"{megapixels:.0f}" if megapixels >= 1000 else f"{megapixels:.4g}"


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.3g}"
