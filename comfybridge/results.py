"""Result store: each finished job's output files, held on the bridge's disk until fetched or expired."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .state import atomic_write

log = logging.getLogger(__name__)

META = "meta.json"


@dataclass(frozen=True)
class ResultFile:
    file_name: str  # the name ComfyUI gave the output
    path: Path
    content_type: str
    size: int


@dataclass
class JobResult:
    job_id: str
    client_id: str
    seq: int  # acceptance order, so results come back in job order
    created: float
    files: list[ResultFile]
    folder: Path

    def record(self) -> dict[str, Any]:
        files = [
            {"file_name": f.file_name, "path": f.path.name, "content_type": f.content_type, "size": f.size}
            for f in self.files
        ]
        return {
            "job_id": self.job_id,
            "client_id": self.client_id,
            "seq": self.seq,
            "created": self.created,
            "files": files,
        }


class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_client: dict[str, list[JobResult]] = {}
        self._claimed: set[str] = set()  # job ids being sent to a client right now

    def load(self) -> None:
        """Index results of earlier runs; a folder without meta.json never finished and is removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in self.root.iterdir():
            meta = folder / META
            try:
                record = orjson.loads(meta.read_bytes())
                files = [
                    ResultFile(f["file_name"], folder / f["path"], f["content_type"], int(f["size"]))
                    for f in record["files"]
                ]
                result = JobResult(
                    record["job_id"], record["client_id"], int(record["seq"]), float(record["created"]), files, folder
                )
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("removing incomplete result folder %s", folder)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._by_client.setdefault(result.client_id, []).append(result)
        for results in self._by_client.values():
            results.sort(key=lambda r: r.seq)

    def folder_for(self, job_id: str) -> Path:
        return self.root / job_id

    async def add(self, job_id: str, client_id: str, seq: int, files: list[ResultFile]) -> None:
        """Record a job's downloaded files; only now do they count as results."""
        result = JobResult(job_id, client_id, seq, time.time(), files, self.folder_for(job_id))
        await asyncio.to_thread(self._write_meta, result)
        results = self._by_client.setdefault(client_id, [])
        results.append(result)
        results.sort(key=lambda r: r.seq)

    def _write_meta(self, result: JobResult) -> None:
        result.folder.mkdir(parents=True, exist_ok=True)
        # The output files are not fsynced either: a killed bridge keeps them, a power cut may not.
        atomic_write(result.folder / META, orjson.dumps(result.record()), sync=False)

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

    async def remove(self, client_id: str, results: list[JobResult]) -> None:
        gone = {r.job_id for r in results}
        self._claimed -= gone
        left = [r for r in self._by_client.get(client_id, []) if r.job_id not in gone]
        if left:
            self._by_client[client_id] = left
        else:
            self._by_client.pop(client_id, None)
        for result in results:
            await asyncio.to_thread(shutil.rmtree, result.folder, True)

    async def discard(self, job_id: str) -> None:
        """Remove the partial downloads of a job that did not finish."""
        await asyncio.to_thread(shutil.rmtree, self.folder_for(job_id), True)

    async def expire(self, ttl: float) -> list[str]:
        """Drop results older than `ttl`; returns the clients that lost some."""
        cutoff = time.time() - ttl
        touched = []
        for client_id, results in list(self._by_client.items()):
            old = [r for r in results if r.created < cutoff]
            if old:
                await self.remove(client_id, old)
                touched.append(client_id)
                log.info("expired %d unfetched results of client %s", len(old), client_id)
        return touched
