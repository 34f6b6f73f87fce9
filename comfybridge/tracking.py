"""Following jobs inside ComfyUI: its events become client progress, a finished prompt's files become results."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from . import care
from .backend import Backend
from .comfy import BackendUnavailable, OutputRef, outputs_of
from .core import DISCONNECTED, Core
from .errors import StorageFull
from .jobs import Job, JobState
from .media import content_type_for
from .results import ResultFile, sync_folders

log = logging.getLogger(__name__)

ROOM_RETRY = 5.0  # seconds between attempts to store results while the disk is full


class Tracker:
    def __init__(self, core: Core) -> None:
        self.core = core

    def on_event(self, backend: Backend, event: str, data: dict[str, Any]) -> None:
        if event == "status":
            exec_info = (data.get("status") or {}).get("exec_info") or {}
            if isinstance(exec_info.get("queue_remaining"), int):
                backend.queue_remaining = exec_info["queue_remaining"]
            return
        job = self.core.by_prompt.get(str(data.get("prompt_id")))
        if job is None:
            return  # an ended job still follows its prompt: its slot is free only once ComfyUI is done
        if event == "execution_start":
            job.warm = backend.last_workflow == job.workflow
            backend.last_workflow = job.workflow
        if job.apply_event(event, data):
            self.prompt_finished(backend, job)
        elif event == "execution_start":
            waited = job.last_event - job.accepted_mono  # execution_start's moment
            self.core.metrics.job_started(job.workflow, backend.name, waited, job.handed_at)
        elif job.state is JobState.RUNNING:
            self.publish_progress(job)

    def publish_progress(self, job: Job) -> None:
        detail = f"{job.progress.update():.2f}%"
        if job.told_progress == detail:
            return
        job.told_progress = detail
        self.core.tell(job, "progress", detail)

    def prompt_finished(self, backend: Backend, job: Job) -> None:
        """ComfyUI's final `executing null` (or its history, after a lost socket): only now is the
        prompt in /history."""
        core = self.core
        if job.started_at is not None:
            ran = time.monotonic() - job.started_at
            core.metrics.job_finished(job.workflow, backend.name, ran)
            if job.outcome == "success":
                core.runtimes.observe(job.workflow, backend.name, ran, job.warm)
        core.drop_inflight(backend, job)
        if job.ended:
            return
        core.collecting.add(core.spawn(self.collect(backend, job), f"collect {job.id}"))

    async def collect(self, backend: Backend, job: Job) -> None:
        """Read the finished prompt's outcome, copy its output files here and sync them, then journal
        the ending; only after that may ComfyUI forget the prompt."""
        core = self.core
        try:
            if job.seen_outputs is not None and job.outcome is not None:
                entry: dict[str, Any] | None = {"outputs": job.seen_outputs}  # the socket told everything
            else:
                entry = await backend.client.history(job.prompt_id)
            if entry is not None and job.outcome is None:
                job.outcome = "success" if (entry.get("status") or {}).get("status_str") == "success" else "error"
            if job.outcome == "success":
                files = await self._store_results_when_room(backend, job, outputs_of(entry or {}))
                if job.ended:
                    await core.results.discard(job.id)
                    return
                job.progress.complete()
                self.publish_progress(job)
                ended = core.end(job, JobState.DONE, files=files)
            elif job.outcome == "interrupted":
                ended = core.end(job, JobState.CANCELLED, "interrupted")
            else:
                ended = core.end(job, JobState.FAILED, job.error or "ComfyUI reported an error without details")
        except BackendUnavailable as exc:
            log.warning("job %s client %s: results lost: %s", job.id, job.client_id, exc)
            await core.results.discard(job.id)
            core.end(job, JobState.FAILED, DISCONNECTED)
            return
        if ended is not None:
            try:
                await ended
            except StorageFull:
                return  # logged by the journal; ComfyUI keeps the prompt, so a restart can collect it again
        if core.settings.delete_history:
            care.forget_later(backend, job.prompt_id, core.spawn)
        await care.after_job(backend, job.prompt_id, core.settings)

    async def _store_results_when_room(self, backend: Backend, job: Job, refs: list[OutputRef]) -> list[ResultFile]:
        """A full disk is the bridge's trouble, not the job's: keep trying until there is room (the
        prompt stays in ComfyUI's history meanwhile)."""
        while True:
            try:
                return await self._store_results(backend, job, refs)
            except StorageFull as exc:
                log.error("job %s client %s: %s; trying again in %gs", job.id, job.client_id, exc, ROOM_RETRY)
                await self.core.results.discard(job.id)
                await asyncio.sleep(ROOM_RETRY)

    async def _store_results(self, backend: Backend, job: Job, refs: list[OutputRef]) -> list[ResultFile]:
        folder = self.core.results.folder_for(job.id)
        files = []
        for index, ref in enumerate(refs):
            target = folder / f"{index:03d}-{ref.filename.replace('/', '_')}"
            size = await backend.client.download(ref, target)  # written and fsynced
            files.append(ResultFile(ref.filename, target, content_type_for(ref.filename), size))
        if files:  # the files' names in their folder, and the folder in its parent, survive a power cut
            await asyncio.to_thread(sync_folders, folder)
        return files
