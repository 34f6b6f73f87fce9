"""Backend health: the event socket's ups and downs, moving jobs off a dead backend, reconciling with
one that comes back (or with every backend after a restart), and the idle-job watchdog."""

from __future__ import annotations

import asyncio
import logging
import time

from . import care
from .backend import Backend
from .comfy import describe_execution_error
from .core import DISCONNECTED, Core
from .jobs import JobState
from .tracking import Tracker

log = logging.getLogger(__name__)


class Failover:
    def __init__(self, core: Core, tracker: Tracker) -> None:
        self.core = core
        self.tracker = tracker

    async def listen(self, backend: Backend) -> None:
        core = self.core

        async def connected() -> None:
            await self._remove_abandoned(backend)
            await self.reconcile(backend)
            if not backend.object_info_loaded:
                core.workflows.apply_object_info(await backend.client.object_info())
                backend.object_info_loaded = True
            backend.healthy = True
            backend.down_since = None
            log.info("backend %s is up", backend.name)
            core.wake_all()

        def disconnected() -> None:
            backend.healthy = False
            log.warning("backend %s is down; %d prompts wait for it", backend.name, len(backend.inflight))
            grace = core.settings.backend_grace
            for job in backend.inflight:
                job.seen_outputs = None  # events may be missed now: its /history will tell
                if not job.ended:  # no stale percent while nothing runs: say what it waits for
                    core.tell(job, "listening", f"waiting for its ComfyUI to come back (up to {grace:g}s)")
            self.watch_absence(backend)

        await backend.client.listen(
            lambda event, data: self.tracker.on_event(backend, event, data),
            connected,
            disconnected,
            backend.first_attempt,
        )

    def watch_absence(self, backend: Backend) -> None:
        """From now on the backend is away: if it stays away for backend_grace, its jobs move."""
        backend.down_since = since = time.monotonic()
        self.core.spawn(self._fail_over_later(backend, since), f"failover {backend.name}")

    async def _fail_over_later(self, backend: Backend, since: float) -> None:
        """A backend gone for backend_grace seconds loses its prompts to the healthy ones."""
        core = self.core
        await asyncio.sleep(core.settings.backend_grace)
        if backend.healthy or backend.down_since != since:
            return
        log.warning("backend %s down for %gs: moving its jobs", backend.name, core.settings.backend_grace)
        for job in reversed(list(backend.inflight)):
            core.drop_inflight(backend, job)
            backend.abandoned.add(job.prompt_id)
            if job.ended:
                continue
            if job.started_at is not None or job.state is JobState.RUNNING:
                if job.retries >= 1:
                    core.end(job, JobState.FAILED, DISCONNECTED)
                    continue
                job.retries += 1
            log.warning("job %s client %s: moving off %s", job.id, job.client_id, backend.name)
            core.send_again(job)
            core.tell(job, "listening", "its ComfyUI is gone; waiting for another one")
        backend.down_since = None  # its clients are no longer held for it
        core.unbind_clients_of(backend)
        core.wake_all()

    async def _remove_abandoned(self, backend: Backend) -> None:
        """Prompts moved elsewhere while this backend was away must not run here too."""
        if not backend.abandoned:
            return
        gone = list(backend.abandoned)
        for prompt_id in gone:
            await backend.client.cancel(prompt_id)
        backend.abandoned.difference_update(gone)

    async def reconcile(self, backend: Backend) -> None:
        """After a lost socket or a restart: ask ComfyUI about every prompt the bridge had there.
        Still queued or running: adopted. Finished: collected. Unknown: sent again."""
        core = self.core
        if not backend.inflight:
            return
        running, pending = await backend.client.queue()
        for job in list(backend.inflight):
            if job.handing_over:
                continue  # its POST /prompt is still in flight; its answer decides
            if job.prompt_id in running or job.prompt_id in pending:
                if job.state is JobState.SUBMITTING:
                    job.move(JobState.QUEUED)
                if job.prompt_id in running and job.state is JobState.QUEUED:
                    job.started_at = time.monotonic()
                    job.move(JobState.RUNNING)
                continue
            entry = await backend.client.history(job.prompt_id)
            if entry is not None:
                messages = (entry.get("status") or {}).get("messages", [])
                kinds = [m[0] for m in messages if m]
                if "execution_interrupted" in kinds:
                    job.outcome = "interrupted"
                elif (entry.get("status") or {}).get("status_str") == "success":
                    job.outcome = "success"
                else:
                    job.outcome = "error"
                    errors = [describe_execution_error(m[1]) for m in messages if m and m[0] == "execution_error"]
                    job.error = job.error or (errors[0] if errors else None)
                self.tracker.prompt_finished(backend, job)
            elif not job.ended:
                log.warning("job %s client %s: unknown to %s, sending it again", job.id, job.client_id, backend.name)
                core.drop_inflight(backend, job)
                core.send_again(job)
            else:
                core.drop_inflight(backend, job)

    async def watchdog(self) -> None:
        """Fail a running job that ComfyUI has said nothing about for job_idle_timeout; free idle backends."""
        core = self.core
        limit = core.settings.job_idle_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for backend in list(core.backends.values()):
                if care.idle_free_due(backend, now, core.settings.free_idle_after):
                    core.spawn(care.free(backend, "idle"), f"free {backend.name}")
                if not backend.healthy:
                    continue  # a backend that is away is handled by failover
                head = next((j for j in backend.inflight if j.state is not JobState.SUBMITTING), None)
                if head is None or now - head.last_event < limit:
                    continue
                if head.state is JobState.QUEUED and backend.queue_remaining > len(backend.inflight):
                    head.last_event = now  # still behind other users' prompts inside ComfyUI: waiting, not idle
                    continue
                core.drop_inflight(backend, head)
                if head.ended:
                    continue
                reason = f"time out error: exceed {limit:g}s"
                log.warning("job %s client %s: %s", head.id, head.client_id, reason)
                core.end(head, JobState.FAILED, reason)
                core.spawn(core.cancel_on_backend(backend, head), f"cancel {head.id}")
