"""Backend health: the event socket's ups and downs, moving jobs off a dead backend, reconciling with
one that comes back (or with every backend after a restart), and the idle-job watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from ..comfy import shapes
from ..comfy.client import MISSED, BackendUnavailable
from . import care
from .backend import Backend
from .jobs import Job, JobState
from .shared import DISCONNECTED, Core
from .tracking import Tracker

__all__ = ["Failover"]

log = logging.getLogger(__name__)
STALLED = ""  # what a backend is stuck on when nothing runs there while prompts wait


class Failover:
    def __init__(self, core: Core, tracker: Tracker) -> None:
        self.core = core
        self.tracker = tracker
        self.ticks = 0  # rounds the watchdog has made, so a test can wait for the next one

    async def listen(self, backend: Backend) -> None:
        core = self.core

        async def connected() -> None:
            await self.take_back_abandoned(backend)
            unknown = await self.reconcile(backend)
            # Moved elsewhere during the reconcile (its grace ran out); not those it found unknown:
            # kept to take back should they show up later (`reconcile`).
            await self.take_back_abandoned(backend, only=set(backend.abandoned) - unknown)
            if not backend.object_info_loaded:
                await self.learn_object_info(backend)
            backend.healthy = True
            backend.down_since = None
            log.info("backend %s is up", backend.name)
            core.wake_all()

        await backend.client.listen(
            lambda event, data: self._heard(backend, event, data),
            connected,
            lambda: self.lost(backend),
            backend.first_attempt,
        )

    def _heard(self, backend: Backend, event: str, data: dict[str, Any]) -> None:
        self.tracker.on_event(backend, event, data)
        # ComfyUI says its queue is empty while prompts of the bridge's should be in it: someone
        # deleted them, or cleared the queue. Asked about at once, not after job_idle_timeout of an
        # idle GPU. Only prompts not started that ComfyUI has told a `status` of since it queued them
        # count: an earlier word, read after a POST /prompt's answer, said nothing of that prompt yet.
        if event != "status" or data["queue_remaining"] or not backend.healthy or backend.checking:
            return
        if _told_of(backend):
            self._ask(backend, self._told_empty(backend))

    async def _told_empty(self, backend: Backend) -> None:
        running, pending = await backend.client.queue()
        await self._reconcile_if_gone(backend, _told_of(backend), {*running, *pending})

    async def _reconcile_if_gone(self, backend: Backend, jobs: list[Job], queued: set[str]) -> bool:
        """Whether a prompt of these jobs is missing from ComfyUI's `queued` prompts (running or
        pending): then the backend is reconciled, as after a reconnect."""
        if all(job.prompt_id in queued for job in jobs):
            return False
        log.warning("backend %s: prompts of the bridge's are gone from its queue; asking about them", backend.name)
        await self.reconcile(backend)
        return True

    async def take_back_abandoned(self, backend: Backend, only: set[str] | None = None) -> None:
        """A backend is not up until the prompts moved elsewhere (all, or `only` these) are gone from it."""
        await self.core.remove_abandoned(backend, only)
        left = backend.abandoned if only is None else backend.abandoned & only
        if left:
            raise BackendUnavailable(f"{backend.name}: {len(left)} moved prompts not taken back yet")

    def lost(self, backend: Backend) -> None:
        """Its event socket is gone (or whoever listened to it failed): down until it reconnects."""
        if not backend.healthy:
            return
        core = self.core
        backend.healthy = False
        backend.queue_remaining = 0  # not known while away: ComfyUI says it again as its socket opens
        log.warning("backend %s is down; %d prompts wait for it", backend.name, len(backend.inflight))
        grace = core.settings.backend_grace
        for job in backend.inflight:
            if job.accepting is not None:  # its client hears nothing of it yet: the gap is kept in its place
                self.tracker.hold(backend, job, MISSED, {"prompt_id": job.prompt_id})
                continue
            job.seen_outputs = None  # events may be missed now: its /history will tell
            if not job.ended:  # no stale percent while nothing runs: say what it waits for
                core.tell(job, "listening", f"waiting for its ComfyUI to come back (up to {grace:g}s)")
        self.watch_absence(backend)

    async def learn_object_info(self, backend: Backend) -> None:
        """Input limits from /object_info; what cannot be read (all of it, or a class that failed) is
        asked again at the next connect, and keeps no backend out meanwhile."""
        try:
            workflows = self.core.workflows
            classes = workflows.node_classes()
            found, whole = await backend.client.object_info(classes) if classes else ({}, True)
            workflows.apply_object_info(found)
        except (BackendUnavailable, ValueError, TypeError, AttributeError) as exc:  # unreachable, or a bad shape
            log.warning("backend %s: /object_info not read (%s); input limits are learned later", backend.name, exc)
            return
        backend.object_info_loaded = whole

    def watch_absence(self, backend: Backend) -> None:
        """From now on the backend is away: if it stays away for backend_grace, its jobs move."""
        backend.down_since = since = time.monotonic()
        self.core.spawn(self._fail_over_later(backend, since), f"failover {backend.name}", daemon=True)

    async def _fail_over_later(self, backend: Backend, since: float) -> None:
        """A backend gone for backend_grace seconds loses its prompts to the healthy ones."""
        core = self.core
        await asyncio.sleep(core.settings.backend_grace)
        if backend.healthy or backend.down_since != since:
            return
        log.warning("backend %s down for %gs: moving its jobs", backend.name, core.settings.backend_grace)
        for job in reversed(list(backend.inflight)):
            core.take_back(backend, job)
            core.abandon(backend, job.prompt_id)
            if job.ended or job.id in core.collecting:  # its prompt succeeded: its results are being fetched
                continue
            if self._send_again(job, _ran(job)):
                log.warning("job %s client %s: moving off %s", job.id, job.client_id, backend.name)
                core.tell(job, "listening", "its ComfyUI is gone; waiting for another one")
        backend.down_since = None  # its clients are no longer held for it
        core.unbind_clients_of(backend)
        core.wake_all()

    def _send_again(self, job: Job, lost: bool, failure: str = DISCONNECTED) -> bool:
        """A job whose prompt its ComfyUI lost or will not run goes back to the queue. A `lost` run
        (it ran, or waited job_idle_timeout in a queue that never moved) counts, and a second one fails
        it with `failure`: a prompt that kills ComfyUI (which comes back and forgets it), or ComfyUIs
        that run nothing, must not keep it going for ever. Returns whether it is sent again."""
        if lost and job.retries >= 1:
            self.core.end(job, JobState.FAILED, failure)
            return False
        self.core.send_again(job, "lost run" if lost else None)
        return True

    async def reconcile(self, backend: Backend) -> set[str]:
        """After a lost socket or a restart: ask ComfyUI about every prompt the bridge had there.
        Still queued or running: adopted. Finished: collected. Unknown: sent again (the prompt ids
        it found unknown are returned)."""
        core = self.core
        if not backend.inflight:
            return set()
        running, pending = await backend.client.queue()
        missing: list[tuple[Job, str]] = []  # neither queued nor in the history when asked about
        for job in list(backend.inflight):
            if job not in backend.inflight:
                continue  # moved off this backend (its grace ran out) while an earlier one was asked about
            if job.handing_over:
                continue  # its POST /prompt is still in flight; its answer decides
            if job.accepting is not None:  # sent while its accept is written: asked about once it is
                job.accepting.add_done_callback(lambda _: core.spawn(self._reconcile_again(backend), "reconcile"))
                continue
            if _adopted(job, running, pending):
                continue
            asked = job.prompt_id
            entry = await backend.client.history(asked)
            if job.prompt_id != asked or job not in backend.inflight:
                continue  # moved meanwhile: what this ComfyUI says of the prompt is no longer the job's
            if entry is not None:
                finished = shapes.finished(entry)
                job.outcome, job.reported = finished.outcome, job.reported or finished.error
                self.tracker.prompt_finished(backend, job)
            else:
                missing.append((job, asked))
        if missing:  # the queue read first may be stale: a hand-over in flight then may have landed since
            running, pending = await backend.client.queue()
        unknown: list[Job] = []
        kept: set[str] = set()  # their prompt ids, kept to take back
        for job, asked in missing:
            if job.prompt_id != asked or job not in backend.inflight or _adopted(job, running, pending):
                continue
            core.take_back(backend, job)
            # Kept to take back should it show up later: a hand-over still on its way (sent by the
            # last leader of a cluster, paused mid-send, then woken) must not run beside the job's
            # next prompt.
            core.abandon(backend, asked)
            kept.add(asked)
            unknown.append(job)
        for job in reversed(unknown):  # each goes to the head of the queue: the earliest must end up first
            if not job.ended and self._send_again(job, _ran(job)):
                log.warning("job %s client %s: unknown to %s, sending it again", job.id, job.client_id, backend.name)
        return kept

    async def _reconcile_again(self, backend: Backend) -> None:
        with contextlib.suppress(BackendUnavailable):  # away again: its next connect reconciles
            await self.reconcile(backend)

    async def watchdog(self) -> None:
        """Fail a running job that ComfyUI has said nothing about for job_idle_timeout; take a backend
        whose prompt shows no progress at all out of service; free idle backends."""
        core = self.core
        limit = core.settings.job_idle_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            self.ticks += 1
            if core.closing:  # its event sockets are closed: a silence now says nothing of ComfyUI
                continue
            now = time.monotonic()
            for backend in list(core.backends.values()):
                if care.idle_free_due(backend, now, core.settings.free_idle_after):
                    core.spawn(care.free(backend, "idle"), f"free {backend.name}")
                if not backend.healthy or backend.checking:
                    continue  # a backend that is away is handled by failover; one being asked, by its answer
                if backend.stuck_prompt is not None:
                    self._ask(backend, self._still_stuck(backend))
                    continue
                head = next((j for j in backend.inflight if j.state is not JobState.SUBMITTING), None)
                if head is None or now - head.last_event < limit:
                    continue
                if head.ended:  # it ended, and its prompt's final `executing null` never came
                    self._ask(backend, self._left_unsaid(backend, head))
                    continue
                if head.state is JobState.QUEUED:  # asked first: a prompt someone deleted is no dead worker
                    behind_others = backend.queue_remaining > len(backend.inflight)
                    self._ask(backend, self._not_started(backend, head, behind_others))
                    continue
                if head.state is JobState.RUNNING:  # it runs, and has said nothing for job_idle_timeout
                    self._stuck(backend, head, head.prompt_id)
                else:  # ComfyUI has not started it, with nothing of anyone's ahead: its queue is dead
                    self._stuck(backend, None, STALLED)

    async def _left_unsaid(self, backend: Backend, job: Job) -> None:
        """An ended job still holds its place until ComfyUI says its prompt left (`executing null`),
        for job_idle_timeout now. Gone from ComfyUI's queue (the word lost: a fork of ComfyUI, a proxy
        that dropped it), the place is free. Still running there (ended by an interrupt that a node
        ignores, say), the backend is stuck on it, and the jobs behind it move."""
        running, pending = await backend.client.queue()
        if job not in backend.inflight:
            return
        if job.prompt_id in running:
            self._stuck(backend, job, job.prompt_id)
        elif job.prompt_id in pending:
            self._stuck(backend, None, STALLED)
        else:
            log.warning("job %s: %s never said its prompt left, but it has", job.id, backend.name)
            self.tracker.left(backend, job)
            self.core.wake_all()

    def _ask(self, backend: Backend, question: Coroutine[Any, Any, None]) -> None:
        """One question to a backend's /queue at a time, in a task of its own (the watchdog never waits)."""
        backend.checking = True

        async def asking() -> None:
            try:
                await question
            except BackendUnavailable as exc:
                log.debug("backend %s: /queue not read: %s", backend.name, exc)
            finally:
                backend.checking = False

        self.core.spawn(asking(), f"watch {backend.name}")

    async def _not_started(self, backend: Backend, head: Job, behind_others: bool) -> None:
        """A job ComfyUI has not started for job_idle_timeout. A prompt of the bridge's gone from the
        queue (someone deleted it, or cleared the queue) is asked about and sent again, as after a
        reconnect. Behind other users' prompts, whose progress only their owners hear, it waits as
        long as ComfyUI runs something. Nothing running at all while prompts wait (with nothing of
        anyone's ahead, already for job_idle_timeout) is no progress at all (a dead worker): the
        backend is stuck."""
        running, pending = await backend.client.queue()
        if head.ended or head not in backend.inflight or head.state is not JobState.QUEUED:
            return  # it moved on while ComfyUI was asked
        waiting = [job for job in backend.inflight if job.state is JobState.QUEUED and job.sending is None]
        if await self._reconcile_if_gone(backend, waiting, {*running, *pending}):
            return
        if head.prompt_id in running:  # it runs, its start unheard (not come yet, or a malformed word)
            if head.found_running:  # and silent for job_idle_timeout since it was found so
                self._stuck(backend, head, head.prompt_id)
            head.found_running, head.last_event = True, time.monotonic()
            return
        now = time.monotonic()
        if running:
            backend.stalled_since = None
            head.last_event = now  # waiting, not idle
        elif not behind_others:
            self._stuck(backend, None, STALLED)
        elif backend.stalled_since is None:
            backend.stalled_since = now
        elif now - backend.stalled_since >= self.core.settings.job_idle_timeout:
            self._stuck(backend, None, STALLED)  # the wait was no job's fault: they all move

    def _stuck(self, backend: Backend, silent: Job | None, prompt_id: str) -> None:
        """No progress at all for job_idle_timeout: the `silent` job (no event of its own for that
        long) fails, as the contract's time-out says, and is taken back; the backend takes no work
        until it moves again; its other jobs go elsewhere. `prompt_id` is what it is stuck on (the
        prompt that runs, or STALLED: nothing runs while prompts wait)."""
        core = self.core
        limit = core.settings.job_idle_timeout
        reason = f"time out error: exceed {limit:g}s"
        backend.stuck_prompt = prompt_id
        backend.stalled_since = None
        what = f"prompt {prompt_id} shows" if prompt_id != STALLED else "its queue, with nothing running, shows"
        log.error(
            "backend %s is stuck: %s no progress for %gs; no new work there until it moves", backend.name, what, limit
        )
        if silent is not None:
            core.take_back(backend, silent)
            if not silent.ended:
                log.warning("job %s client %s: %s", silent.id, silent.client_id, reason)
                core.end(silent, JobState.FAILED, reason)
            core.spawn(core.cancel_on_backend(backend, silent), f"cancel {silent.id}")
        # Not yet started there, handed over or on the way (dispatch takes back a prompt whose POST
        # answers after its job was moved): all go elsewhere. A stall counts against a job that waited
        # it out, as a lost run does (with no ComfyUI that runs anything, every job still ends); not
        # against one handed over a moment ago.
        stalled_since = time.monotonic() - limit if prompt_id == STALLED else None
        for job in [j for j in backend.inflight if j.started_at is None]:
            core.take_back(backend, job)
            core.spawn(backend.client.delete_queued([job.prompt_id]), f"take back {job.id}")
            core.abandon(backend, job.prompt_id)  # in case the delete does not reach it: removed at reconnect
            if job.ended:
                continue
            waited = stalled_since is not None and job.handed_at is not None and job.handed_at <= stalled_since
            if self._send_again(job, waited, reason):
                log.warning("job %s client %s: moving off stuck %s", job.id, job.client_id, backend.name)
                core.tell(job, "listening", "its ComfyUI does not run it; waiting for another one")
        core.unbind_clients_of(backend)
        core.wake_all()

    async def _still_stuck(self, backend: Backend) -> None:
        """A stuck backend is asked, once a tick, whether the prompt it was stuck on still runs."""
        running, pending = await backend.client.queue()
        if backend.stuck_prompt == STALLED:
            if running:
                self.core.unstuck(backend, "its queue moves again")
            elif not pending:  # our prompts were taken back: only a prompt sent there can tell
                backend.doubt = self.core.settings.job_idle_timeout
                self.core.unstuck(backend, "its queue is empty; trying it with one prompt")
        elif backend.stuck_prompt is not None and backend.stuck_prompt not in running:
            self.core.unstuck(backend, f"prompt {backend.stuck_prompt} no longer runs")


def _adopted(job: Job, running: list[str], pending: list[str]) -> bool:
    """Whether ComfyUI has the job's prompt, queued or running: then the job follows what it does."""
    if job.prompt_id in running or job.prompt_id in pending:
        if job.state is JobState.SUBMITTING:
            job.move(JobState.QUEUED)
        if job.prompt_id in running and job.state is JobState.QUEUED:
            job.started_at, job.started_unseen = time.monotonic(), True  # (when, exactly, is not known)
            job.move(JobState.RUNNING)
        elif job.prompt_id in pending and job.retries == 0:
            job.started_unseen = False  # handed over by an earlier process, yet to start: its start is heard
        return True
    return False


def _ran(job: Job) -> bool:
    return job.started_at is not None or job.state is JobState.RUNNING


def _told_of(backend: Backend) -> list[Job]:
    """The backend's jobs whose prompts wait in ComfyUI's queue (its POST /prompt answered, not
    started) and that ComfyUI has told a `status` of since, before the last one. (A prompt that ran
    is no such job: its `executing null` comes after the `status` that follows its end.)"""
    last = backend.statuses - 1
    return [
        job
        for job in backend.inflight
        if job.state is JobState.QUEUED and job.sending is None and job.queued_at_status < last
    ]
