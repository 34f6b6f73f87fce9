"""Result store: each finished job's output files, held in the blob store (a local folder, or object
storage) until fetched or expired.

The journal records which files a finished job has; this store keeps the files and, in memory, which
client may fetch them. A job's files are named `<job id>/<index>-<name>`."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StorageError
from .blobs import BlobStore, BlobWriter, LocalBlobs, sweep

__all__ = ["JobResult", "ResultFile", "ResultStore", "stored_name"]

log = logging.getLogger(__name__)

MAX_NAME = 100  # characters of ComfyUI's name kept in a stored file's name
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ResultFile:
    file_name: str  # the name ComfyUI gave the output
    key: str  # its name in the blob store: <job id>/<stored name>
    content_type: str
    size: int

    def record(self) -> dict[str, Any]:
        return {
            "file_name": self.file_name,
            "path": self.key.rpartition("/")[2],
            "content_type": self.content_type,
            "size": self.size,
        }


@dataclass
class JobResult:
    job_id: str
    client_id: str
    seq: int  # acceptance order, so results come back in job order
    created: float
    files: list[ResultFile]


class ResultStore:
    def __init__(self, blobs: BlobStore | Path) -> None:
        self.blobs: BlobStore = LocalBlobs(blobs) if isinstance(blobs, Path) else blobs
        self._by_client: dict[str, list[JobResult]] = {}
        self._claimed: set[str] = set()  # job ids being sent to a client right now

    def clear(self) -> None:
        """Forget every result (they are added again from the journal as its jobs are recovered)."""
        self._by_client.clear()
        self._claimed.clear()

    @staticmethod
    def key_for(job_id: str, index: int, file_name: str) -> str:
        return f"{job_id}/{stored_name(index, file_name)}"

    def writer(self, key: str) -> BlobWriter:
        return self.blobs.writer(key)

    async def seal(self, job_id: str) -> None:
        """A job's files are all written: their names, too, survive a power cut."""
        await self.blobs.seal(job_id)

    def chunks(self, item: ResultFile, size: int) -> AsyncIterator[bytes]:
        return self.blobs.chunks(item.key, size)

    async def read(self, item: ResultFile) -> bytes:
        return await self.blobs.read(item.key)

    @property
    def links(self) -> bool:
        """Whether results can be handed out as links (object storage), not only as bytes."""
        return self.blobs.links

    async def link(self, item: ResultFile, expires: int) -> str:
        url = await self.blobs.link(item.key, expires)
        assert url is not None, "a store without links"
        return url

    def files_from(self, job_id: str, records: list[dict[str, Any]]) -> list[ResultFile]:
        return [ResultFile(r["file_name"], f"{job_id}/{r['path']}", r["content_type"], int(r["size"])) for r in records]

    async def missing(self, jobs: dict[str, list[ResultFile]]) -> set[str]:
        """Ids of the given jobs some of whose files are not in the store any more."""
        present = {key for key, _ in await self.blobs.keys()}
        return {job_id for job_id, files in jobs.items() if not all(f.key in present for f in files)}

    def add(self, job_id: str, client_id: str, seq: int, files: list[ResultFile], created: float | None = None) -> None:
        """Hand a finished job's files to its client; only now do they count as results."""
        result = JobResult(job_id, client_id, seq, created or time.time(), files)
        results = self._by_client.setdefault(client_id, [])
        results.append(result)
        results.sort(key=lambda r: r.seq)

    def holds(self, client_id: str) -> bool:
        return bool(self._by_client.get(client_id))

    def claim(self, client_id: str) -> list[JobResult]:
        """The client's results not already being sent by another request, now reserved for this one."""
        results = [r for r in self._by_client.get(client_id, []) if r.job_id not in self._claimed]
        self._claimed.update(r.job_id for r in results)
        return results

    def release(self, results: list[JobResult]) -> None:
        """A delivery that did not complete: the results can be fetched again."""
        self._claimed.difference_update(r.job_id for r in results)

    def being_sent(self, client_id: str) -> bool:
        """Whether some of the client's results are on their way to a request right now."""
        return any(r.job_id in self._claimed for r in self._by_client.get(client_id, []))

    def forget(self, client_id: str, results: list[JobResult]) -> None:
        """Delivered (or expired): no request gets them any more. Their files go with `delete`, once
        the journal no longer names them."""
        gone = {r.job_id for r in results}
        self._claimed -= gone
        left = [r for r in self._by_client.get(client_id, []) if r.job_id not in gone]
        if left:
            self._by_client[client_id] = left
        else:
            self._by_client.pop(client_id, None)

    async def delete(self, results: list[JobResult]) -> None:
        """Remove fetched or expired results' files. Best effort: with the store away they stay, and
        the sweep at start removes them once no journal row names them."""
        try:
            await self.blobs.delete([item.key for result in results for item in result.files])
        except StorageError as exc:
            log.warning("%d results' files not removed now: %s", len(results), exc)

    async def discard(self, job_id: str) -> None:
        """Remove the partial downloads of a job that did not finish. Best effort: with the store away
        they stay (a next try writes the same names; the sweep at start removes what is left)."""
        try:
            await self.blobs.delete_prefix(f"{job_id}/")
        except StorageError as exc:
            log.warning("job %s: partial results not removed now: %s", job_id, exc)

    def expired(self, ttl: float) -> list[JobResult]:
        """Results older than `ttl` that no request is sending right now."""
        cutoff = time.time() - ttl
        return [
            r for rs in self._by_client.values() for r in rs if r.created < cutoff and r.job_id not in self._claimed
        ]

    async def sweep_orphans(self, busy: set[str], older_than: float) -> int:
        """In object storage, delete the objects older than `older_than` seconds that belong to no
        result held here and to no job in `busy` (being collected). A local folder is sorted out
        at start only (its orphans are moved aside, never deleted)."""
        if isinstance(self.blobs, LocalBlobs):
            return 0
        held = {r.job_id for rs in self._by_client.values() for r in rs} | busy
        cutoff = time.time() - older_than
        return await sweep(
            self.blobs, lambda key, modified: modified < cutoff and key.partition("/")[0] not in held, "result objects"
        )

    # start-up --------------------------------------------------------------------------------
    async def sort_out(self, done: set[str], unfinished: set[str], orphan_age: float) -> None:
        """At start-up, before anything collects: a finished job's files stay; an unfinished job's are
        downloads a crash cut short (it collects again) and go. Files no journal row names: in a local
        folder they are moved aside into `orphans/`, never deleted (a journal lost or replaced by
        mistake must not take finished, unfetched results with it); in object storage they go once
        older than `orphan_age` (the result TTL: they would have expired by then)."""
        blobs = self.blobs
        if isinstance(blobs, LocalBlobs):
            await asyncio.to_thread(_sort_out_folders, blobs.root, done, unfinished)
            return
        partial, orphans = [], []
        cutoff = time.time() - orphan_age
        for key, modified in await blobs.keys():
            job_id = key.partition("/")[0]
            if job_id in done:
                continue
            if job_id in unfinished:
                partial.append(key)
            elif modified < cutoff:
                orphans.append(key)
        await blobs.delete(partial + orphans)
        if orphans:
            log.warning("removed %d result objects no journal row names, older than %gs", len(orphans), orphan_age)


def _sort_out_folders(root: Path, done: set[str], unfinished: set[str]) -> Path | None:
    root.mkdir(parents=True, exist_ok=True)
    aside = root.parent / "orphans" / time.strftime("results-%Y%m%d-%H%M%S")
    moved = 0
    for entry in sorted(root.iterdir()):
        if entry.name in done:
            continue
        if entry.name in unfinished:
            shutil.rmtree(entry, ignore_errors=True)
            continue
        aside.mkdir(parents=True, exist_ok=True)
        shutil.move(entry, aside / entry.name)  # a rename, or a copy when results/ is another disk
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
