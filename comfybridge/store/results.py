"""Result store: each finished job's output files, held on the bridge's disk until fetched or expired.

The journal records which files a finished job has; this store keeps the files and, in memory, which
client may fetch them."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import fsync_path

__all__ = ["JobResult", "ResultFile", "ResultStore", "stored_name", "sync_folders"]

log = logging.getLogger(__name__)

MAX_NAME = 100  # characters of ComfyUI's name kept in a stored file's name
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ResultFile:
    file_name: str  # the name ComfyUI gave the output
    path: Path
    content_type: str
    size: int

    def record(self) -> dict[str, Any]:
        return {
            "file_name": self.file_name,
            "path": self.path.name,
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
    folder: Path


def _delete(results: list[JobResult]) -> None:
    """Remove fetched results: their known files, then their folders (all at once, in one thread)."""
    for result in results:
        try:
            for item in result.files:
                item.path.unlink(missing_ok=True)
            result.folder.rmdir()
        except OSError:  # something else in the folder (a partial download): remove it all
            shutil.rmtree(result.folder, ignore_errors=True)


def sync_folders(folder: Path) -> None:
    """fsync a job's result folder and the folder that holds it (the files themselves are synced as
    they are written), so a power cut after `closed` loses nothing."""
    fsync_path(folder)
    fsync_path(folder.parent)


class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_client: dict[str, list[JobResult]] = {}
        self._claimed: set[str] = set()  # job ids being sent to a client right now

    def clear(self) -> None:
        """Forget every result (they are added again from the journal as its jobs are recovered)."""
        self._by_client.clear()
        self._claimed.clear()

    def folder_for(self, job_id: str) -> Path:
        return self.root / job_id

    def files_from(self, job_id: str, records: list[dict[str, Any]]) -> list[ResultFile]:
        folder = self.folder_for(job_id)
        return [ResultFile(r["file_name"], folder / r["path"], r["content_type"], int(r["size"])) for r in records]

    def add(self, job_id: str, client_id: str, seq: int, files: list[ResultFile], created: float | None = None) -> None:
        """Hand a finished job's files to its client; only now do they count as results."""
        result = JobResult(job_id, client_id, seq, created or time.time(), files, self.folder_for(job_id))
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
        await asyncio.to_thread(_delete, results)

    async def discard(self, job_id: str) -> None:
        """Remove the partial downloads of a job that did not finish."""
        await asyncio.to_thread(shutil.rmtree, self.folder_for(job_id), True)

    def expired(self, ttl: float) -> list[JobResult]:
        """Results older than `ttl` that no request is sending right now."""
        cutoff = time.time() - ttl
        return [
            r for rs in self._by_client.values() for r in rs if r.created < cutoff and r.job_id not in self._claimed
        ]

    # start-up --------------------------------------------------------------------------------
    def sort_out_folders(self, done: set[str], unfinished: set[str]) -> Path | None:
        """At start-up, before anything collects: a finished job's folder stays; an unfinished job's
        holds downloads a crash cut short (it collects again) and goes; anything no journal row names
        is moved aside into `orphans/`, never deleted, since a journal lost or replaced by mistake must
        not take finished, unfetched results with it. Returns where strays were moved, if any.
        Blocking: run it in a thread."""
        self.root.mkdir(parents=True, exist_ok=True)
        aside = self.root.parent / "orphans" / time.strftime("results-%Y%m%d-%H%M%S")
        moved = 0
        for entry in sorted(self.root.iterdir()):
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
