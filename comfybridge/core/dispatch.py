"""The per-backend worker: keeps one ComfyUI fed with the jobs placement gives it, and hands them over."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from ..comfy.client import BackendUnavailable, PartlyRefused, PromptRefused
from ..errors import StorageError
from ..store.uploads import UploadGone
from .backend import Backend
from .clients import CONNECTED, about_job
from .jobs import Job, JobState
from .planner import PLAN_HORIZON, Lane, plan_for
from .shared import DISCONNECTED, Core

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

NOT_ACCEPTED = "ComfyUI did not accept the job"
MAX_ATTEMPTS = 3  # hand-overs of one job that may fail before it does
STORE_PAUSE_MAX = 30.0  # seconds: the longest pause between tries of a hand-over whose upload the store cannot give
JOURNAL_PAUSE = 1.0  # seconds a worker waits after a hand-over it could not record, send, or read the uploads of
NOT_SENT = object()  # what `_deliver` returns when this bridge may not send now
# Prompts known to take less than this are queued deeper than `pipeline_depth` inside a ComfyUI, up
# to this much queued work: the bridge's own turnaround between prompts (an event in, the next prompt
# out, on a busy loop) must not leave a GPU idle. Bounded: a cancel then has that many to remove.
COVER = 0.02
MAX_DEPTH = 8


class Dispatcher:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._store_pause = 0.0  # seconds, doubling while the store cannot give the uploads of hand-overs

    async def work(self, backend: Backend) -> None:
        """Keep ComfyUI fed: prompts wait inside it behind the running one (see `_room`)."""
        core = self.core
        while True:
            if backend.at_once:  # handed over as they were accepted: sent first, in that order
                await self.send(backend, *backend.at_once.popleft())
                continue
            job = self.next_for(backend)
            if job is None or core.closing:
                backend.wakeup.clear()
                await backend.wakeup.wait()
                continue
            core.queue.take(job)
            if not job.ended:
                await self.dispatch(backend, job)

    def next_for(self, backend: Backend) -> Job | None:
        core = self.core
        room = self._room(backend) if core.queue else None
        if room is None:
            return None
        jobs = list(itertools.islice(core.queue.order(), PLAN_HORIZON))
        index = self._plan(backend, jobs, self._lanes())
        if index is None or not self._fits(backend, jobs[index], room):
            return None  # (not a later job that fits instead: it would overtake this one)
        return jobs[index]

    def taker_at_once(self, job: Job) -> Backend | None:
        """The backend a job just arriving goes to without waiting in the bridge's queue: only when
        nothing waits there (so it overtakes no one), and only the one a worker would give it to.
        Its hand-over is then part of its accept record, and it is sent while that is written."""
        core = self.core
        if core.queue or core.pending_accepts or core.closing or not core.may_send():
            return None  # (a job whose accept is being written joins the queue next: it goes first)
        lanes = self._lanes()  # once: each backend's plan reads them all
        for backend in core.backends.values():
            room = self._room(backend)
            if room is not None and self._plan(backend, [job], lanes) == 0 and self._fits(backend, job, room):
                return backend
        return None

    def _room(self, backend: Backend) -> float | None:
        """Whether one more prompt may go inside this ComfyUI: None if not; infinite for one of the
        `pipeline_depth` places behind the running one; beyond them (up to MAX_DEPTH), the seconds
        of work still under COVER, which only a prompt known to take no longer may fill (`_fits`)."""
        if not backend.usable:
            return None
        if backend.doubt:  # one prompt at a time until its queue is seen to move
            return None if backend.inflight else math.inf
        queued = len(backend.inflight) - 1  # behind the running one
        depth = self.core.settings.pipeline_depth
        if queued < depth:
            return math.inf
        if depth == 0 or queued >= MAX_DEPTH:
            return None
        work = 0.0
        for job in backend.inflight[1:]:
            seconds = self.core.runtimes.known(job.workflow, backend.name)
            if seconds is None:  # not seen there yet: no guess makes the queue deeper
                return None
            work += seconds
        return COVER - work if work < COVER else None

    def _fits(self, backend: Backend, job: Job, room: float) -> bool:
        if room == math.inf:
            return True
        seconds = self.core.runtimes.known(job.workflow, backend.name)
        return seconds is not None and seconds <= room

    def _lanes(self) -> list[Lane]:
        core = self.core
        return [b.lane(core.runtimes) for b in core.backends.values() if b.usable]

    def _plan(self, backend: Backend, jobs: list[Job], lanes: list[Lane]) -> int | None:
        core = self.core
        waiting = ((j.id, j.workflow, core.preferred_of(j.client_id)) for j in jobs)
        return plan_for(backend.name, waiting, lanes, core.runtimes.estimate, core.settings.warm_slack)

    def hand_over_at_once(self, backend: Backend, job: Job) -> None:
        """The job goes to `backend` as it is accepted: its accept record says so (`Job.record`), and
        the backend's worker sends it while that record is written (`send` waits for it after)."""
        self.core.hand_over(backend, job)
        self.core.queue.served(job.client_id)  # a turn, though it never waited
        job.state, job.backend = JobState.SUBMITTING, backend.name
        job.sending = job.prompt_id  # in flight from here: a reconcile meanwhile leaves it to the send
        job.handed_at = time.monotonic()
        backend.at_once.append((job, job.prompt_id))
        backend.wakeup.set()

    async def dispatch(self, backend: Backend, job: Job) -> None:
        """Journal the hand-over first (so a crash mid-way is reconciled by prompt_id, never sent twice
        blindly), then send the job's uploads and its prompt."""
        core = self.core
        core.hand_over(backend, job)
        sent = job.sending = job.prompt_id
        job.handed_at = time.monotonic()
        try:
            await job.move(JobState.SUBMITTING, backend=backend.name, prompt_id=job.prompt_id)
        except StorageError as exc:
            log.error("job %s client %s: hand-over not recorded (%s); waiting", job.id, job.client_id, exc)
            job.sending = None
            if _still_on(backend, job, sent):  # (failover may have moved it meanwhile)
                core.take_back(backend, job)
                if not job.ended:
                    core.send_again(job)
            await asyncio.sleep(JOURNAL_PAUSE)
            return
        await self.send(backend, job, sent)

    async def send(self, backend: Backend, job: Job, sent: str) -> None:
        """Send a job handed over to this backend as prompt `sent`: its uploads, then its prompt. One
        handed over at once is sent while its accept record is written: whatever ComfyUI answers
        waits for that record, and a job the journal refused is taken back from ComfyUI. Taken back
        meanwhile (its backend went away) or cancelled, it is not sent."""
        core = self.core
        accepting = job.accepting
        try:
            if not _still_on(backend, job, sent):
                return  # taken back meanwhile (its backend went away): it waits in the queue again
            if job.ended:  # cancelled before its prompt went out
                core.take_back(backend, job)
                return
            failure = await self._deliver(backend, job, sent)
        finally:
            if job.sending == sent:
                job.sending = None
                job.queued_at_status = backend.statuses
        if job.accepting is not None:  # (None once the scheduler has taken its answer)
            await asyncio.wait((job.accepting,))
        if accepting is not None and (accepting.cancelled() or accepting.exception() is not None):
            # Not accepted (the client is told so): it was taken back; ComfyUI may have it.
            queued = failure is None or isinstance(failure, PartlyRefused)  # (ComfyUI queues those too)
            if queued or (isinstance(failure, BackendUnavailable) and failure.maybe_done):
                self._abandon(backend, sent)
            return
        unanswered = isinstance(failure, BackendUnavailable) and failure.maybe_done
        if unanswered and _still_on(backend, job, sent) and await self._took_it_after_all(backend, sent):
            failure = None
        if not _still_on(backend, job, sent):
            # Taken off this backend while its hand-over was in flight (it went away, got stuck, or the
            # job was cancelled): what ComfyUI answered is no longer the job's. A prompt it may have
            # must not run here as well, unless it already ran to its end (its events came while its
            # accept record was written).
            maybe_here = failure is None or unanswered
            if maybe_here and (job.prompt_id != sent or job.outcome is None):
                self._abandon(backend, sent)
            return
        if failure is NOT_SENT:  # the journal keeps the hand-over for the next leader to reconcile
            log.warning("job %s client %s: not sent, this bridge may no longer lead", job.id, job.client_id)
            core.take_back(backend, job)
            if not job.ended:
                core.send_again(job)  # should it lead on after all
            await asyncio.sleep(JOURNAL_PAUSE)
            return
        if isinstance(failure, StorageError):
            # Its upload cannot be read now: it waits for the store, as results do, however long that
            # takes; not counted against the job nor the backend. Asked again after doubling pauses
            # (each try is a journal write).
            log.warning("job %s client %s: not sent, its upload cannot be read: %s", job.id, job.client_id, failure)
            core.take_back(backend, job)
            if not job.ended:
                core.send_again(job)
            self._store_pause = min(STORE_PAUSE_MAX, max(JOURNAL_PAUSE, 2 * self._store_pause))
            await asyncio.sleep(self._store_pause)
            return
        if isinstance(failure, (PromptRefused, UploadGone)):
            core.take_back(backend, job)
            if isinstance(failure, PartlyRefused):  # queued all the same, to run what was not refused
                self._abandon(backend, sent)
            core.end(job, JobState.FAILED, str(failure))
            return
        if isinstance(failure, BackendUnavailable):
            self._hand_over_failed(backend, job, failure)
            return
        backend.submit_failures = 0
        self._store_pause = 0.0
        job.last_event = time.monotonic()
        if job.state is JobState.SUBMITTING:
            job.move(JobState.QUEUED)
            client = core.clients.get(job.client_id)
            if client is not None and not job.ended and not client.running and not client.held:
                core.set_status(client, about_job(CONNECTED, job.id, len(client.jobs)))  # polled, never sent
        log.info("job %s client %s: queued on %s as %s", job.id, job.client_id, backend.name, job.prompt_id)
        if job.state is JobState.CANCELLED:
            # The cancel raced the hand-over; now ComfyUI has named the prompt, take it back.
            core.spawn(core.cancel_on_backend(backend, job), f"cancel {job.id}")

    async def _deliver(self, backend: Backend, job: Job, sent: str) -> object:
        """POST the job's uploads and prompt to ComfyUI: None once it has the prompt, NOT_SENT if this
        bridge may not send now, else the exception that says why the hand-over failed."""
        core = self.core
        try:
            prompt = job.graph()
            for key, name in job.uploads.items():
                node_id, _, input_name = key.partition("/")
                try:
                    source = await core.uploads.source_of(name)
                    failed: list[StorageError] = []
                    if not isinstance(source, Path):
                        source = _watched(source, failed)
                    try:
                        remote = await backend.client.upload(source, name)
                    except BackendUnavailable:
                        if failed:  # the store broke off mid-stream (aiohttp wraps it): not ComfyUI's fault
                            raise failed[0] from None
                        raise
                except FileNotFoundError:
                    raise UploadGone(f"the uploaded file {name!r} of the job is gone") from None
                if job.ended and not core.uploads.pinned(name):
                    core.inputs_unneeded([name])  # cancelled while it was written: its deletion may have run first
                prompt[node_id]["inputs"][input_name] = remote
            if not core.may_send():
                return NOT_SENT
            await backend.client.submit(prompt, sent)
        except (PromptRefused, UploadGone, BackendUnavailable) as exc:
            return exc
        except StorageError as exc:  # the bridge's own store is away (object storage down): not ComfyUI's fault
            return exc
        except Exception as exc:  # a fault of the bridge's own: the job is handed over again, never lost
            log.exception("job %s client %s: hand-over to %s failed", job.id, job.client_id, backend.name)
            return BackendUnavailable(f"the hand-over failed ({exc.__class__.__name__})", maybe_done=True)
        return None

    def _abandon(self, backend: Backend, prompt_id: str) -> None:
        """A prompt sent to this backend that must not run there: taken back from its ComfyUI."""
        self.core.abandon(backend, prompt_id)
        self.core.spawn(self.core.remove_abandoned(backend), f"take back {prompt_id}")

    async def _took_it_after_all(self, backend: Backend, prompt_id: str) -> bool:
        """A hand-over without an answer: ask ComfyUI before sending the prompt anywhere again."""
        try:
            return await backend.client.knows(prompt_id)
        except BackendUnavailable:
            return False

    def _hand_over_failed(self, backend: Backend, job: Job, exc: BackendUnavailable) -> None:
        """POST /prompt failed: try elsewhere, and give a backend that keeps refusing a rest."""
        core = self.core
        core.take_back(backend, job)
        if exc.maybe_done:
            # ComfyUI may have queued it without answering: remove it there once it answers again.
            core.abandon(backend, job.prompt_id)
        backend.submit_failures += 1
        if backend.submit_failures >= 2:
            pause = min(30.0, 0.5 * 2.0 ** (backend.submit_failures - 2))
            backend.sick_until = time.monotonic() + pause
            core.supervisor.call_later(pause, core.wake_all)
            log.warning("backend %s did not take %d hand-overs: no new work for %gs", backend.name,
                        backend.submit_failures, pause)  # fmt: skip
        if job.ended:
            return
        if job.attempts + 1 >= MAX_ATTEMPTS:
            core.end(job, JobState.FAILED, NOT_ACCEPTED if backend.healthy else DISCONNECTED)
            return
        log.warning("job %s client %s: %s; will send it again", job.id, job.client_id, exc)
        core.send_again(job, "hand-over")


def _still_on(backend: Backend, job: Job, sent: str) -> bool:
    """The job is still handed over to this backend as prompt `sent`: not moved elsewhere (under
    another prompt_id) nor taken back since. Asked again after every await of a hand-over."""
    return job.prompt_id == sent and job in backend.inflight


async def _watched(chunks: AsyncIterator[bytes], failed: list[StorageError]) -> AsyncGenerator[bytes, None]:
    """An upload's bytes from the bridge's store, on their way into ComfyUI; a failure of the store is
    noted in `failed` (the HTTP client wraps what its body raises)."""
    try:
        async for chunk in chunks:
            yield chunk
    except StorageError as exc:
        failed.append(exc)
        raise
