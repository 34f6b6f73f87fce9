"""Result store: each finished job's output files, held until fetched or expired.

The journal records which files a finished job has; this store keeps the files and, in memory, which
client may fetch them. A small file (up to `inline_max` bytes) is kept inline: its bytes ride in the
job's end commit and are served from memory, so it costs no file or object of its own (while the
inline bytes held stay under INLINE_BUDGET). A larger one goes to the blob store (a local folder,
or object storage), named `<job id>/<index>-<name>`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StorageError
from .blobs import BlobStore, BlobWriter, LocalBlobs, sweep
from .files import all_bounded

__all__ = ["INLINE_BUDGET", "JOB_INLINE_MAX", "JobResult", "ResultFile", "ResultStore", "ResultWriter", "stored_name"]

log = logging.getLogger(__name__)

MAX_NAME = 100  # characters of ComfyUI's name kept in a stored file's name
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


INLINE_BUDGET = 256 * 1024 * 1024  # bytes of inline results held in memory at most; past it, files
JOB_INLINE_MAX = 16 * 1024 * 1024  # bytes of one job's inline results at most (they share one commit)


@dataclass(frozen=True)
class ResultFile:
    file_name: str  # the name ComfyUI gave the output
    key: str  # its name in the blob store: <job id>/<stored name>
    content_type: str
    size: int
    data: bytes | None = None  # kept inline (in the journal and here), not in the blob store

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "file_name": self.file_name,
            "path": self.key.rpartition("/")[2],
            "content_type": self.content_type,
            "size": self.size,
        }
        if self.data is not None:
            record["inline"] = base64.b64encode(self.data).decode()
        return record


@dataclass
class JobResult:
    job_id: str
    client_id: str
    seq: int  # acceptance order, so results come back in job order
    created: float
    files: list[ResultFile]


FETCHED = ".fetched"  # a fetched job's result folder, renamed so before the journal forgets the job
LOOKS_AT_ONCE = 16  # HEADs sent at once to check the objects of a fetch as links


class ResultStore:
    def __init__(self, blobs: BlobStore | Path, inline_max: int = 0) -> None:
        self.blobs: BlobStore = LocalBlobs(blobs) if isinstance(blobs, Path) else blobs
        self.inline_max = inline_max
        self.inline_held = 0  # bytes of inline results held now, those of jobs still collecting included
        self._collecting: dict[str, int] = {}  # job id -> inline bytes of its files committed so far
        self._by_client: dict[str, list[JobResult]] = {}
        self._claimed: set[str] = set()  # job ids being sent to a client right now
        self._expiring: set[str] = set()  # job ids past their TTL, their end being written
        self._undeleted: set[str] = set()  # keys of fetched or expired results the store would not remove

    def clear(self) -> None:
        """Forget every result (they are added again from the journal as its jobs are recovered)."""
        self._by_client.clear()
        self._claimed.clear()
        self._expiring.clear()
        self._collecting.clear()
        self.inline_held = 0

    @staticmethod
    def key_for(job_id: str, index: int, file_name: str) -> str:
        return f"{job_id}/{stored_name(index, file_name)}"

    def writer(self, key: str) -> ResultWriter:
        """Where one output file is downloaded to: kept inline if it is small, else a blob."""
        return ResultWriter(self, key)

    async def seal(self, job_id: str, files: list[ResultFile]) -> None:
        """A job's files are all written: their names, too, survive a power cut."""
        if any(f.data is None for f in files):
            await self.blobs.seal(job_id)

    async def chunks(self, item: ResultFile, size: int) -> AsyncGenerator[bytes, None]:
        if item.data is not None:
            yield item.data
            return
        async with contextlib.aclosing(self.blobs.chunks(item.key, size)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def read(self, item: ResultFile) -> bytes:
        return item.data if item.data is not None else await self.blobs.read(item.key)

    @property
    def links(self) -> bool:
        """Whether results can be handed out as links (object storage), not only as bytes."""
        return self.blobs.links

    async def link(self, item: ResultFile, expires: int) -> str:
        """A link to the file; one kept inline is put in the blob store first (links are rare)."""
        if item.data is not None:
            writer = self.blobs.writer(item.key)
            try:
                await writer.write(item.data)
                await writer.commit()
            except BaseException:
                await writer.abort()
                raise
        url = await self.blobs.link(item.key, expires)
        assert url is not None, "a store without links"
        return url

    def files_from(self, job_id: str, records: list[dict[str, Any]]) -> list[ResultFile]:
        return [_file_of(job_id, r) for r in records]

    async def damaged(self, files: list[tuple[str, ResultFile]], linked: bool = False) -> set[str]:
        """Ids of the jobs among these (job id, file) whose stored files are gone or not of their
        recorded size: removed or cut short by other hands. A local folder is asked (a stat each,
        one trip to a thread); object storage only when links to them are to be handed out
        (`linked`: a HEAD each), as otherwise such a file fails its read."""
        stored = [(job_id, f) for job_id, f in files if f.data is None]
        sizes = await self.blobs.sizes([f.key for _, f in stored]) if stored else None
        if sizes is not None:
            return {job_id for job_id, f in stored if sizes.get(f.key) != f.size}
        if not linked or not stored:
            return set()
        found = await all_bounded((self.blobs.exists(f.key) for _, f in stored), LOOKS_AT_ONCE)
        return {job_id for (job_id, _), kept in zip(stored, found, strict=True) if not kept}

    async def missing(self, jobs: dict[str, list[ResultFile]]) -> set[str]:
        """Ids of the given jobs some of whose files are not in the store any more."""
        if all(f.data is not None for files in jobs.values() for f in files):
            return set()  # all inline: nothing to look for
        present = {key for key, _ in await self.blobs.keys()}
        return {
            job_id for job_id, files in jobs.items() if not all(f.data is not None or f.key in present for f in files)
        }

    def take_inline(self, job_id: str, size: int) -> bool:
        """Count `size` more inline bytes of the job being collected, if they fit the memory budget
        and the job's one commit; False (and nothing counted) if they do not."""
        job_bytes = self._collecting.get(job_id, 0)
        if self.inline_held + size > INLINE_BUDGET or job_bytes + size > JOB_INLINE_MAX:
            return False
        self._collecting[job_id] = job_bytes + size
        self.inline_held += size
        return True

    def add(self, job_id: str, client_id: str, seq: int, files: list[ResultFile], created: float | None = None) -> None:
        """Hand a finished job's files to its client; only now do they count as results."""
        self.inline_held += _inline_size(files) - self._collecting.pop(job_id, 0)  # counted once committed
        result = JobResult(job_id, client_id, seq, created or time.time(), files)
        results = self._by_client.setdefault(client_id, [])
        results.append(result)
        results.sort(key=lambda r: r.seq)

    def holds(self, client_id: str) -> bool:
        return bool(self._by_client.get(client_id))

    def claim(self, client_id: str, job_id: str | None = None) -> list[JobResult]:
        """The client's results (or only that job's) not already being sent by another request, now
        reserved for this one."""
        results = [
            r
            for r in self._by_client.get(client_id, [])
            if r.job_id not in self._claimed
            and r.job_id not in self._expiring
            and (job_id is None or r.job_id == job_id)
        ]
        self._claimed.update(r.job_id for r in results)
        return results

    def hold(self, results: list[JobResult]) -> None:
        """Reserve these results for the bridge itself (their expiry being written): no request gets
        them, and a request finds nothing rather than results busy elsewhere (they are past their TTL)."""
        self._expiring.update(r.job_id for r in results)

    def release(self, results: list[JobResult]) -> None:
        """A delivery (or an expiry) that did not complete: the results can be fetched again."""
        ids = {r.job_id for r in results}
        self._claimed -= ids
        self._expiring -= ids

    def being_sent(self, client_id: str) -> bool:
        """Whether some of the client's results are on their way to a request right now."""
        return any(r.job_id in self._claimed for r in self._by_client.get(client_id, []))

    def forget(self, client_id: str, results: list[JobResult]) -> None:
        """Delivered (or expired): no request gets them any more. Their files go with `delete`, once
        the journal no longer names them."""
        gone = {r.job_id for r in results}
        self._claimed -= gone
        self._expiring -= gone
        self.inline_held -= sum(_inline_size(r.files) for r in self._by_client.get(client_id, []) if r.job_id in gone)
        left = [r for r in self._by_client.get(client_id, []) if r.job_id not in gone]
        if left:
            self._by_client[client_id] = left
        else:
            self._by_client.pop(client_id, None)

    @staticmethod
    def keys_of(results: list[JobResult], linked: bool = False) -> list[str]:
        """The blob names of these results' files (those kept inline have none, unless `linked`
        put them in the blob store)."""
        return [item.key for result in results for item in result.files if linked or item.data is None]

    async def delete(self, keys: list[str]) -> None:
        """Remove fetched or expired results' files. Best effort: with the store away they stay, and
        a sweep removes them once no journal row names them."""
        if not keys:
            return
        try:
            await self.blobs.delete(keys)
        except StorageError as exc:
            self._undeleted.update(keys)  # the next sweep tries again (a local folder has no orphan sweep)
            log.warning("%d result files not removed now: %s", len(keys), exc)

    async def set_aside(self, keys: list[str]) -> list[str]:
        """Fetched results' files, before the journal forgets their jobs: each job's local folder is
        renamed `<job>.fetched`, so a crash between the forget and the deletion leaves what a start
        removes (the forget landed) or puts back (it did not), not folders that look like those of a
        lost journal. In object storage nothing changes (its sweep removes what no record names).
        The keys, as the files are named now."""
        if not keys or not isinstance(self.blobs, LocalBlobs):
            return keys
        return await asyncio.to_thread(_set_aside, self.blobs.root, keys)

    async def discard(self, job_id: str) -> None:
        """Remove the partial downloads of a job that did not finish. Best effort: with the store away
        they stay (a next try writes the same names; the sweep at start removes what is left)."""
        self.inline_held -= self._collecting.pop(job_id, 0)
        try:
            await self.blobs.delete_prefix(f"{job_id}/")
        except StorageError as exc:
            log.warning("job %s: partial results not removed now: %s", job_id, exc)

    def expired(self, ttl: float) -> list[JobResult]:
        """Results older than `ttl` that no request is sending, nor an expiry writing, right now."""
        cutoff = time.time() - ttl
        busy = self._claimed | self._expiring
        return [r for rs in self._by_client.values() for r in rs if r.created < cutoff and r.job_id not in busy]

    async def sweep_orphans(self, busy: set[str], older_than: float) -> int:
        """Remove the files a deletion was refused earlier; in object storage, also the objects older
        than `older_than` seconds that belong to no result held here and to no job in `busy` (being
        collected). A local folder is sorted out at start only (its orphans are moved aside, never
        deleted)."""
        if self._undeleted:
            left, self._undeleted = list(self._undeleted), set()
            await self.delete(left)
        if isinstance(self.blobs, LocalBlobs):
            return 0
        held = {r.job_id for rs in self._by_client.values() for r in rs} | busy
        cutoff = time.time() - older_than
        return await sweep(
            self.blobs,
            lambda key, modified: modified < cutoff and key.partition("/")[0] not in held,
            "result objects no record names",
        )

    # start-up --------------------------------------------------------------------------------
    async def sort_out(self, done: set[str], unfinished: set[str], orphan_age: float) -> None:
        """At start-up, before anything collects: a finished job's files stay; an unfinished job's are
        downloads a crash cut short (it collects again) and go. Files no journal row names: in a local
        folder they are moved aside into `orphans/`, never deleted (a journal lost or replaced by
        mistake must not take finished, unfetched results with it); in object storage they go once
        older than `orphan_age` (by then they would have expired, and their links too). Best effort:
        with the store away they wait for the next sweep."""
        blobs = self.blobs
        if isinstance(blobs, LocalBlobs):
            await asyncio.to_thread(_sort_out_folders, blobs.root, done, unfinished)
            return
        cutoff = time.time() - orphan_age

        def leftover(key: str, modified: float) -> bool:
            job_id = key.partition("/")[0]
            return job_id not in done and (job_id in unfinished or modified < cutoff)

        await sweep(
            blobs,
            leftover,
            f"result objects of unfinished jobs, or that no journal row names older than {orphan_age:g}s",
        )


class ResultWriter:
    """One output file on its way in (a `Sink` for the download): held in memory while it is no
    larger than the store's `inline_max`, then written to a blob instead."""

    def __init__(self, store: ResultStore, key: str) -> None:
        self.store = store
        self.key = key
        self._held = bytearray()
        self._blob: BlobWriter | None = None

    async def reserve(self, size: int | None) -> None:
        if size is not None and size > self.store.inline_max:
            await self._to_blob(size)

    async def write(self, chunk: bytes) -> None:
        if self._blob is not None:
            await self._blob.write(chunk)
            return
        self._held += chunk
        if len(self._held) > self.store.inline_max:
            await self._to_blob(None)

    async def _to_blob(self, size: int | None) -> None:
        self._blob = self.store.blobs.writer(self.key)
        await self._blob.reserve(size)
        if self._held:
            await self._blob.write(bytes(self._held))
            self._held.clear()

    async def commit(self, file_name: str, content_type: str) -> ResultFile:
        """The file, durable (a blob, synced or stored) or ready to ride in the job's end commit."""
        size = len(self._held)
        if self._blob is None and not self.store.take_inline(self.key.partition("/")[0], size):
            await self._to_blob(size)  # memory, or the job's one commit, is not the place for more
        if self._blob is not None:
            return ResultFile(file_name, self.key, content_type, await self._blob.commit())
        return ResultFile(file_name, self.key, content_type, size, bytes(self._held))

    async def abort(self) -> None:
        self._held.clear()
        if self._blob is not None:
            await self._blob.abort()


def _file_of(job_id: str, record: dict[str, Any]) -> ResultFile:
    inline = record.get("inline")
    data = base64.b64decode(inline) if inline is not None else None
    return ResultFile(
        record["file_name"], f"{job_id}/{record['path']}", record["content_type"], int(record["size"]), data
    )


def _inline_size(files: list[ResultFile]) -> int:
    return sum(len(f.data) for f in files if f.data is not None)


def _set_aside(root: Path, keys: list[str]) -> list[str]:
    renamed: dict[str, str] = {}
    for key in keys:
        job = key.partition("/")[0]
        if job not in renamed:
            try:
                os.replace(root / job, root / f"{job}{FETCHED}")
                renamed[job] = f"{job}{FETCHED}"
            except OSError:  # gone, or the disk refuses: deleted under its own name (best effort)
                renamed[job] = job
    return [f"{renamed[job]}/{rest}" for job, _, rest in (key.partition("/") for key in keys)]


def _sort_out_folders(root: Path, done: set[str], unfinished: set[str]) -> Path | None:
    root.mkdir(parents=True, exist_ok=True)
    aside = root.parent / "orphans" / time.strftime("results-%Y%m%d-%H%M%S")
    moved = 0
    for entry in sorted(root.iterdir()):
        if entry.name in done:
            continue
        if entry.name.endswith(FETCHED):  # fetched: forgotten (it goes), or the forget never landed (back)
            job = entry.name.removesuffix(FETCHED)
            if job in done:
                with contextlib.suppress(OSError):  # (best effort: the next start tries again)
                    os.replace(entry, root / job)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if entry.name in unfinished:
            shutil.rmtree(entry, ignore_errors=True)
            continue
        try:
            aside.mkdir(parents=True, exist_ok=True)
            shutil.move(entry, aside / entry.name)  # a rename, or a copy when results/ is another disk
        except OSError as exc:  # best effort: a read-only results/ keeps it where it is
            shutil.rmtree(aside / entry.name, ignore_errors=True)  # a copy cut short
            log.warning("result folder %s, which no journal row names, not moved aside: %s", entry, exc)
            continue
        moved += 1
    if not moved:
        return None
    log.warning(
        "moved %d result folders that no journal row names to %s: kept there until removed by hand", moved, aside
    )
    return aside


def stored_name(index: int, file_name: str) -> str:
    """The name a result file gets on the bridge's disk: ComfyUI's last path part with anything but
    letters, digits, `.`, `_` and `-` replaced, and cut (keeping its end, the extension) to a length
    any filesystem takes; the index keeps two outputs apart. The name clients see stays ComfyUI's."""
    last = file_name.replace("\\", "/").rpartition("/")[2]
    safe = _UNSAFE.sub("_", last)[-MAX_NAME:].lstrip(".")
    return f"{index:03d}-{safe or 'output'}"
