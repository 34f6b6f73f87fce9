"""Following jobs inside ComfyUI: its events become client progress, a finished prompt's files become results."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..comfy import shapes
from ..comfy.client import MISSED, BackendUnavailable, OutputGone, ResultTooLarge
from ..comfy.folders import LocalOutputs
from ..comfy.shapes import Finished, OutputRef
from ..errors import StorageError, StorageUnavailable
from ..store.media import content_type_for
from ..store.results import ResultFile
from . import care
from .backend import Backend
from .early import Fetch
from .jobs import Job, JobState, job_folder
from .shared import DISCONNECTED, Core

log = logging.getLogger(__name__)

__all__ = ["RESUMED", "Tracker"]

FIRST_RETRY = 1.0  # seconds before collecting a finished job's results again; doubles each time
MAX_RETRY_DELAY = 60.0
RESUMED = "resumed after a restart; progress counts again from here"
MB = 1024 * 1024


class Tracker:
    def __init__(self, core: Core) -> None:
        self.core = core
        # Events of prompts sent while their jobs' accept records are written, by job id: a client
        # must hear nothing of a job before its answer says it is accepted, and nothing ends first.
        self.held: dict[str, list[tuple[Backend, str, dict[str, Any]]]] = {}

    def on_event(self, backend: Backend, event: str, data: dict[str, Any]) -> None:
        """One event of the backend's socket, already checked for shape (`shapes.event`)."""
        if event == "status":
            backend.queue_remaining = data["queue_remaining"]
            backend.statuses += 1
            return
        if backend.stuck_prompt is not None:
            self.core.unstuck(backend, f"it sent {event} again")
        backend.doubt = 0.0  # its worker runs prompts
        if data["prompt_id"] in backend.abandoned:
            self.core.retake_abandoned(backend)  # a prompt that could not be taken back before runs
        job = self.core.by_prompt.get(data["prompt_id"])
        if job is None:
            return  # an ended job still follows its prompt: its slot is free only once ComfyUI is done
        if job.accepting is not None:
            self.hold(backend, job, event, data)
            return
        self._apply(backend, job, event, data)

    def hold(self, backend: Backend, job: Job, event: str, data: dict[str, Any]) -> None:
        """Keep an event of a job whose accept record is being written, until `accept_decided`."""
        self.held.setdefault(job.id, []).append((backend, event, data))

    def accept_decided(self, job: Job, recorded: bool) -> None:
        """The accept record of a job sent meanwhile is written (`recorded`), or failed: the events
        its ComfyUI sent meanwhile are taken now, in order, or dropped with the job."""
        for backend, event, data in self.held.pop(job.id, ()):
            if recorded and self.core.by_prompt.get(data["prompt_id"]) is job:
                self._apply(backend, job, event, data)

    def _apply(self, backend: Backend, job: Job, event: str, data: dict[str, Any]) -> None:
        if event == MISSED:
            job.seen_outputs = None  # not everything was seen: its outcome will be read from /history
            return
        if event == "execution_start":
            job.warm = backend.last_workflow == job.workflow
            backend.last_workflow = job.workflow
        elif event == "executed" and job.seen_outputs is not None and not job.ended:
            limit = min(self.core.results.inline_max, int(self.core.settings.max_result_mb * MB))
            refs = shapes.outputs_of({data["node"]: data["output"]})
            self.core.early.start(backend.client, job.id, job.prompt_id, refs, limit)
        if job.apply_event(event, data):
            self.prompt_finished(backend, job)
        elif event == "execution_start":
            # Its first start only (a run after a lost one waited for nothing new), if none went unseen.
            first = None
            if job.waited is None and not job.started_unseen:
                job.waited = first = job.last_event - job.accepted_mono  # execution_start's moment
            self.core.metrics.job_started(job.workflow, backend.client.shown, first, job.handed_at)
        elif event == "execution_success" and job.seen_outputs is not None:
            self._collect(backend, job)  # its outputs are known and written: no need to wait for its end
        elif job.state is JobState.RUNNING:
            self.publish_progress(job)

    def publish_progress(self, job: Job, final: bool = False) -> None:
        """A progress frame when the percent rises: never lower than what the client heard, even when
        the job runs again elsewhere, and at most one every `progress_every` seconds (a fast sampler
        makes dozens of steps a second): a rise within it is told when it is over, the latest one
        only. The `final` frame (100%, just before `closed`) goes at once. A job resumed after a
        restart says so before its first frame, since what the last process told is not known."""
        percent = job.progress.update()
        if percent <= job.told_percent:
            return
        now, every = time.monotonic(), self.core.settings.progress_every
        if not final and now - job.told_at < every:
            if job.progress_due is None:
                job.progress_due = asyncio.get_running_loop().call_later(
                    job.told_at + every - now, self._progress_due, job
                )
            return
        if job.progress_due is not None:
            job.progress_due.cancel()
            job.progress_due = None
        if job.resumed:
            job.resumed = False
            self.core.tell(job, "listening", RESUMED)
        job.told_percent, job.told_at = percent, now
        self.core.tell(job, "progress", f"{percent:.2f}%")

    def _progress_due(self, job: Job) -> None:
        job.progress_due = None
        if not job.ended:
            self.publish_progress(job)

    def prompt_finished(self, backend: Backend, job: Job) -> None:
        """ComfyUI's final `executing null` (or its history, after a lost socket): the prompt has left
        ComfyUI, and only now is it in /history. Its results are collected unless they already are."""
        core = self.core
        if job.started_at is not None and job.start_heard:  # (a start only guessed would cut the run short)
            ran = time.monotonic() - job.started_at
            core.metrics.job_finished(job.workflow, backend.client.shown, ran)
            if job.outcome == "success":
                core.runtimes.observe(job.workflow, backend.name, ran, job.warm)
        self.let_go_of_ended(backend, job)
        self._collect(backend, job)
        self.left(backend, job)

    def left(self, backend: Backend, job: Job) -> None:
        """The job's prompt has left ComfyUI: its place there is free (and its history, once
        delivered, may go)."""
        self.core.take_back(backend, job)
        if job.forget_on_leave:
            care.forget_later(backend, job.prompt_id, self.core.spawn)

    def _collect(self, backend: Backend, job: Job) -> None:
        """Collect the job's results once: at `execution_success` when every event of its prompt was
        seen (ComfyUI's history write and final `executing null` are not waited for), else once the
        prompt has left ComfyUI. What the events said is taken now: a socket lost a moment later
        must not send the collection to a /history not yet written."""
        core = self.core
        if job.ended or job.id in core.collecting:
            return
        seen = None
        if job.seen_outputs is not None and job.outcome is not None:
            seen = Finished(job.outcome, job.reported, job.seen_outputs)
        fetched = core.early.take(job.prompt_id)
        task = core.collect(job, self.collect(backend, job, fetched, seen))
        if task is None:
            core.early.drop(fetched)
        else:  # given back even if the task is cancelled before its first step
            task.add_done_callback(lambda _: core.early.drop(fetched))

    async def collect(self, backend: Backend, job: Job, fetched: list[Fetch], seen: Finished | None) -> None:
        """Take the finished prompt's outcome (`seen` in its events, else read), copy its output files
        here and sync them, then journal the ending; only after that may ComfyUI forget the prompt.
        Whatever fails, the job ends: a trouble that may pass (ComfyUI away, the disk full) is tried
        again a bounded number of times, one that will not (a file over the size limit) fails it at
        once."""
        core = self.core
        job.collected = True
        ended = None
        refs: list[OutputRef] = []
        finished = seen
        try:
            if finished is None:
                finished = await self._retrying(job, "read its outcome", lambda: self._outcome(backend, job))
            if finished is not None:  # (what nodes saved before an error or an interrupt goes too, below)
                refs = shapes.outputs_of(finished.outputs)
            if finished is None:
                ended = core.end(job, JobState.FAILED, "ComfyUI has no record of how the prompt ended")
            elif finished.outcome == "success":
                early = await core.early.results_for(fetched, refs)
                files = await self._retrying(
                    job, "store its results", lambda: self._store_results(backend, job, refs, early)
                )
                if not job.ended:  # (else interrupted meanwhile: its outputs go below, as a delivered job's)
                    job.progress.complete()
                    self.publish_progress(job, final=True)
                    ended = core.end(job, JobState.DONE, files=files)
            elif finished.outcome == "interrupted":
                ended = core.end(job, JobState.CANCELLED, "interrupted")
            else:
                ended = core.end(job, JobState.FAILED, finished.error or "ComfyUI reported an error without details")
        except ResultTooLarge as exc:
            core.end(job, JobState.FAILED, f"The result cannot be kept: {exc}.")
            return
        except OutputGone as exc:  # removed from ComfyUI's folder by other hands: no try brings it back
            log.warning("job %s client %s: results lost: %s", job.id, job.client_id, exc)
            core.end(job, JobState.FAILED, f"{exc}: removed from its output folder before the bridge copied it.")
            return
        except BackendUnavailable as exc:
            log.warning("job %s client %s: results lost: %s", job.id, job.client_id, exc)
            reason = f"ComfyUI did not give the results ({exc})" if backend.healthy else DISCONNECTED
            core.end(job, JobState.FAILED, reason)
            return
        except StorageError as exc:
            if not job.ended:
                core.end(job, JobState.FAILED, f"The results could not be stored: {exc}.")
                return  # ComfyUI keeps the outputs: the one copy of the results
            # Interrupted while they could not be stored: nothing is kept, so its outputs go below.
        except asyncio.CancelledError:
            if job.state is JobState.CANCELLED:  # interrupted, its copying stopped: none kept
                if finished is None:  # (interrupted while its outcome was read: the prompt had left)
                    core.spawn(self._let_go_of_ended(backend, job), f"let go of prompt {job.prompt_id}")
                else:
                    self._let_go(backend, job, refs)
            raise
        except Exception:  # a fault of the bridge's own: the job still ends, and it is logged
            log.exception("job %s client %s: collecting its results failed", job.id, job.client_id)
            core.end(job, JobState.FAILED, "The bridge failed to collect the results; the fault is in its log.")
            return
        finally:
            if job.state is not JobState.DONE:
                await core.results.discard(job.id)  # partial downloads of a job that has no results
        if ended is not None:
            try:
                await asyncio.shield(ended)  # an interrupt arriving now stops nothing already recorded
            except StorageError:
                return  # logged by the journal; ComfyUI keeps the prompt, so a restart can collect it again
        self._let_go(backend, job, refs)
        await care.after_job(backend, job.prompt_id, core.settings)

    def let_go_of_ended(self, backend: Backend, job: Job) -> None:
        """A job that ended before its prompt left ComfyUI (interrupted as it finished, timed out):
        what the prompt left there goes. Not if a collection ran: it decides for itself (it keeps
        the one copy of results it could not store)."""
        core = self.core
        if job.ended and not job.collected and job.id not in core.collecting:
            core.spawn(self._let_go_of_ended(backend, job), f"let go of prompt {job.prompt_id}")

    async def _let_go_of_ended(self, backend: Backend, job: Job) -> None:
        """What the prompt left in ComfyUI goes, as ComfyUI's history names it (a history that cannot
        be read keeps it: ComfyUI's history is bounded; none: it never ran)."""
        try:
            entry = await backend.client.history(job.prompt_id)
        except BackendUnavailable as exc:
            log.debug("job %s: prompt %s left in ComfyUI: %s", job.id, job.prompt_id, exc)
            return
        if entry is not None and not job.let_go:
            self._let_go(backend, job, shapes.outputs_of(shapes.finished(entry).outputs))

    def _let_go(self, backend: Backend, job: Job, refs: list[OutputRef]) -> None:
        """ComfyUI may forget the ended job's prompt: its own output files and its history entry go."""
        core = self.core
        job.let_go = True
        outputs = backend.client.outputs
        if refs and outputs is not None and outputs.usable and core.settings.delete_outputs:
            self._remove_outputs(outputs, job, refs)
        if core.settings.delete_history:
            if job.prompt_id in core.by_prompt:  # collected before ComfyUI let go: it writes its history later
                job.forget_on_leave = True
            else:
                care.forget_later(backend, job.prompt_id, core.spawn)

    def _remove_outputs(self, outputs: LocalOutputs, job: Job, refs: list[OutputRef]) -> None:
        """Delete the job's own output files and folder from ComfyUI's: kept here now, so ComfyUI's
        disk need not fill up with copies. Nothing that is not the job's own (`job_folder`)."""
        own: dict[str, list[OutputRef]] = {}
        for ref in refs:
            folder = job_folder(job.id, ref)
            if folder is not None:
                own.setdefault(folder, []).append(ref)
        for folder, files in own.items():
            outputs.remove_later(files, folder, self.core.spawn)

    async def _outcome(self, backend: Backend, job: Job) -> Finished | None:
        """How the prompt ended, when its events did not say it all: from ComfyUI's history (None:
        ComfyUI has no entry for it)."""
        entry = await backend.client.history(job.prompt_id)
        if entry is None:
            return None
        finished = shapes.finished(entry)
        if job.outcome is None:
            return finished
        return Finished(job.outcome, job.reported or finished.error, finished.outputs)  # the events it saw decide

    async def _retrying(self, job: Job, what: str, attempt: Any) -> Any:
        """Run `attempt` until it works, the job ends (an interrupt), or `result_retries` tries have
        failed with a trouble that may pass: ComfyUI not answering, or no room on the disk. Object
        storage away is waited for however long it takes (the results are safe in ComfyUI
        meanwhile, and a job accepted is not given up for a store's outage). Each failure discards
        what it wrote, and the waits double, so a full disk costs little."""
        delay, tries, failed = FIRST_RETRY, self.core.settings.result_retries, 0
        while True:
            try:
                return await attempt()
            except (BackendUnavailable, StorageError) as exc:
                await self.core.results.discard(job.id)
                waits = isinstance(exc, StorageUnavailable) and self.core.results.links
                failed += not waits  # a wait for object storage uses none of the tries
                if job.ended or failed >= tries:
                    raise
                log.warning(
                    "job %s client %s: could not %s (%s); %s in %gs",
                    job.id, job.client_id, what, exc,
                    "again once object storage is back" if waits else f"try {failed + 1} of {tries}", delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY_DELAY, delay * 2)

    async def _store_results(
        self, backend: Backend, job: Job, refs: list[OutputRef], early: list[bytes | None]
    ) -> list[ResultFile]:
        """Store each output: the bytes fetched early if there are some (`EarlyFetches`), else downloaded now."""
        results = self.core.results
        limit = int(self.core.settings.max_result_mb * MB)
        files = []
        for index, (ref, data) in enumerate(zip(refs, early, strict=True)):
            writer = results.writer(results.key_for(job.id, index, ref.filename))
            try:
                if data is not None:
                    await writer.write(data)
                else:
                    await backend.client.download(ref, writer, limit, job_folder(job.id, ref) is not None)
                files.append(await writer.commit(ref.filename, content_type_for(ref.filename)))  # size checked
            except BaseException:
                await writer.abort()
                raise
        # The files' names in their folder, and the folder in its parent, survive a power cut.
        await results.seal(job.id, files)
        return files
