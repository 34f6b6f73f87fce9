"""Scheduler: the bridge's core as the edge sees it. Accepts, cancels and frees; owns the backends'
tasks; recovers the journal's jobs at start-up; expires what is old.

Knows nothing of HTTP: the edge calls its methods and receives status through a Notifier. The work
itself is done by its parts: `dispatch` (per-backend workers), `tracking` (ComfyUI events and
results), `failover` (health and reconciliation), `core` (shared state and job endings).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from ..comfy.client import BackendUnavailable, ComfyClient, shown
from ..comfy.folders import InputFolders
from ..errors import NoBackend, RateLimited, ShuttingDown, StorageError, StorageUnavailable, TooManyJobs
from ..store.counter import StateStore
from ..store.journal import ENDED_STATES, JobStore
from ..store.results import JobResult, ResultStore
from ..store.uploads import IncomingFile, UploadStore
from . import care
from .backend import Backend
from .clients import Client, Status, key_pool, scope_of
from .dispatch import Dispatcher
from .failover import Failover
from .jobs import Job, JobState, name_outputs
from .observer import JobObserver
from .planner import PLAN_HORIZON
from .recovery import missing_results, recover
from .shared import Core, Notifier, SchedulerSettings, open_status
from .tracking import Tracker
from .webhooks import Webhooks
from .workflows import WorkflowStore

log = logging.getLogger(__name__)

RESTART_FIRST = 0.5  # seconds before a failed listener or worker starts again; doubles up to RESTART_MAX
RESTART_MAX = 30.0
FORGET_RETRY_MAX = 30.0  # seconds at most between asks to journal a fetch the journal could not take (from 1 s)
JOURNAL_CHECK = 0.5  # seconds between looks at the journal file when no commit looks (a kill meanwhile loses it)
LEARNED_EVERY = 10.0  # seconds between saves of the learned run times, when they changed
SWEEP_BATCH = 1000  # expired results, and expired uploads, removed per sweep at most (the rest: next sweep)
INTERRUPT_WAIT = 2.0  # seconds an interrupt's answer waits for ComfyUI to give its prompts back, at most
ORPHANS_EVERY = 3600.0  # at most: seconds between sweeps of object storage for objects nothing names
__all__ = ["Fetch", "Notifier", "Scheduler", "SchedulerSettings"]


class Scheduler:
    """Jobs wait in one fair queue; each backend's worker takes the job that earliest-finish placement
    gives it, so fast backends take more, and no GPU idles while work it should do waits. Every step
    of a job is journaled, so a restart picks up where the last process stopped."""

    def __init__(
        self,
        settings: SchedulerSettings,
        backend_urls: list[str],
        session: aiohttp.ClientSession,
        workflows: WorkflowStore,
        uploads: UploadStore,
        results: ResultStore,
        journal: JobStore,
        state: StateStore,
        notifier: Notifier,
        metrics: JobObserver | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self._parts = (settings, session, workflows, uploads, results, journal, notifier, metrics)
        self._initial = list(backend_urls)
        # Each backend's output and input folder as this machine sees them (`comfy_outputs`, `comfy_inputs`).
        self._folders = (dict(settings.comfy_outputs), dict(settings.comfy_inputs))
        self._input_folders = InputFolders()  # uploads to delete, per input folder: backends may share one
        self.may_send: Callable[[], bool] = lambda: True  # see Core.may_send; kept across reset()
        self.running = False  # between start and close
        self.stopping = False  # told to stop (SIGTERM's grace): kept across reset()
        self._build()

    def _build(self) -> None:
        self.core = core = Core(*self._parts)
        core.may_send = lambda: self.may_send()
        self.clients = core.clients
        self.backends = core.backends
        self.dispatcher = Dispatcher(core)
        self.tracker = Tracker(core)
        self.failover = Failover(core, self.tracker)
        self._grace: dict[str, asyncio.Task[Any]] = {}  # clients whose socket is gone, until they cancel
        self._state_changed = asyncio.Event()
        self._learned_saved = 0  # core.runtimes.changes when they were last kept
        self._linked: set[str] = set()  # jobs whose results were handed out as links that still work
        # Jobs a request waits for (`?wait=1`) until their end is durable: a stop answers each, also
        # one whose end is still being written (it has left its client's jobs by then).
        self._waited: dict[str, Job] = {}

    def reset(self) -> None:
        """After `close`: forget everything, as a new process would, so `start` can run again (a bridge
        of a cluster that stopped leading and leads again). The stores are the caller's to reload.
        A bridge that was told to stop (SIGTERM's grace) still refuses new jobs; the end of a term
        (`close`) alone is no such word."""
        self._build()
        self.core.accepting = not self.stopping

    # lifecycle -------------------------------------------------------------------------------
    async def start(self, rows: list[dict[str, Any]], connect_timeout: float = 3.0) -> None:
        """Recover the journal's jobs, start workers and event sockets; wait briefly so the first
        requests find backends up (and adopted jobs reconciled)."""
        core = self.core
        self.running = True
        # The data folder first, while no task can be collecting into it.
        gone = await missing_results(core, rows)
        done = {r["id"] for r in rows if r["state"] == JobState.DONE.value and r["id"] not in gone}
        unfinished = {r["id"] for r in rows if r["state"] not in ENDED_STATES}
        await core.results.sort_out(done, unfinished, self.orphan_age)
        for url in self._initial:
            self._add_backend(url)
        taken = core.runtimes.restore(core.journal.learned)
        if taken:
            log.info("%d run times learned before taken back (per workflow and backend)", taken)
        self._learned_saved = core.runtimes.changes
        abandoned = core.restore_abandoned()  # taken back as each backend connects, before it is reconciled
        if abandoned:
            log.info("%d prompts sent before are to be taken back from their ComfyUI", abandoned)
        summary = recover(core, rows, gone)
        if gone:
            core.journal.forget(gone)
        if rows:
            log.info(
                "recovered %d jobs: %d waiting, %d handed to a backend, %d finished",
                len(rows) - len(gone),
                summary.waiting,
                summary.handed_over,
                summary.finished,
            )
        for backend in self.backends.values():
            if backend.inflight:
                self.failover.watch_absence(backend)  # until its socket connects and reconciles
        core.spawn(self.failover.watchdog(), "watchdog", daemon=True)
        core.spawn(self._sweeper(), "sweeper", daemon=True)
        core.spawn(self._watch_journal(), "journal watch", daemon=True)
        core.spawn(self._keep_state_file(), "state file", daemon=True)
        core.spawn(self._keep_learned(), "learned run times", daemon=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(connect_timeout):
                for backend in self.backends.values():
                    await backend.first_attempt.wait()

    @property
    def accepting(self) -> bool:
        """Whether new jobs are taken."""
        return self.core.accepting and not self.core.closing

    def stop_accepting(self) -> None:
        """Refuse new jobs (503 stopping) and say so in /ready; everything else goes on."""
        self.stopping = True
        self.core.accepting = False

    def stop_dispatching(self) -> None:
        """Nothing more is handed to ComfyUI: what waits stays in the journal for the next start."""
        self.core.stop_dispatching()

    def use_webhooks(self, webhooks: Webhooks, owed: list[dict[str, Any]]) -> None:
        """Tell job ends to webhooks once journaled; `owed`: calls a previous run left unacknowledged."""
        webhooks.spawn = lambda coro, name: self.core.spawn(coro, name, daemon=True)
        self.core.on_delivery = webhooks.send
        for delivery in owed:
            webhooks.send(delivery)

    def workflows_reloaded(self) -> None:
        """The workflow folder was read again: learn the inputs' limits again from the backends."""
        for backend in self.backends.values():
            backend.object_info_loaded = False
            if backend.healthy:
                self.core.spawn(self.failover.learn_object_info(backend), f"object_info {backend.name}")

    async def drain(self, within: float) -> None:
        """Stop handing out work and wait (bounded) for the jobs already inside ComfyUI to finish."""
        core = self.core
        core.stop_dispatching()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while any(b.inflight for b in self.backends.values()) or core.collecting:
                    core.settled.clear()
                    await core.settled.wait()

    async def close(self, collect_timeout: float = 5.0) -> None:
        """Refuse new work, let results being copied land (bounded), stop every task.

        Nothing is failed or cancelled: jobs stay in the journal as they are and a restart resumes them;
        prompts inside ComfyUI keep running there and are adopted then."""
        self.running = False
        self.core.stop_dispatching()
        self.stop_waiting()
        # The event sockets close first, at once: the next leader of a cluster connects with the same
        # ComfyUI clientId, and ComfyUI forgets a clientId (the newer socket too) when an older socket
        # of it closes. Nothing that is still collected needs them.
        listeners = [backend.listener for backend in self.backends.values() if backend.listener is not None]
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await self.core.supervisor.wait_and_close(collect_timeout)
        with contextlib.suppress(RuntimeError):  # a journal already closed (its file lost) keeps nothing
            self._remember_learned()  # lands before the journal closes

    def stop_waiting(self) -> None:
        """Requests waiting for a job's end are answered now (503): the job ends once a bridge runs again."""
        for job in list(self._waited.values()):
            if job.awaited is not None and not job.awaited.done():
                job.awaited.set_exception(
                    ShuttingDown(
                        f"This bridge stopped before job {job.id} ended; the job stays journaled and ends "
                        "once a bridge runs again (in a cluster, the next to lead): fetch its results with "
                        "/history then."
                    )
                )
                job.awaited.add_done_callback(lambda done: done.exception())  # said to no one if none waits

    # backends at run time --------------------------------------------------------------------
    def _add_backend(self, url: str) -> Backend:
        core = self.core
        journal = core.journal
        client = ComfyClient(
            url,
            core.session,
            journal.bridge_id,
            request_timeout=self.settings.comfy_timeout,
            max_event_bytes=int(self.settings.max_event_mb * 1024 * 1024),
            outputs=self._folders[0].get(url),
            inputs=self._folders[1].get(url),
            input_folders=self._input_folders,
        )
        backend = self.backends[url] = Backend(client)
        backend.listener = core.supervisor.spawn(
            self._keep_running(backend, "listener", self.failover.listen), f"listen {url}", True
        )
        backend.worker = core.supervisor.spawn(
            self._keep_running(backend, "worker", self.dispatcher.work), f"worker {url}", True
        )
        return backend

    async def _keep_running(self, backend: Backend, role: str, run: Callable[[Backend], Awaitable[None]]) -> None:
        """A backend's listener and worker never stay dead: one that fails (a fault of the bridge's own;
        nothing ComfyUI sends should do it) is logged and started again, and meanwhile the backend is
        down, never `up` with no one listening."""
        delay = RESTART_FIRST
        while True:
            try:
                await run(backend)
                return
            except Exception:
                log.exception("backend %s: its %s failed; starting it again in %gs", backend.name, role, delay)
            if role == "listener":  # nobody hears its events now: down until the new listener connects
                backend.client.connected = False
                self.failover.lost(backend)
            await asyncio.sleep(delay)
            delay = min(RESTART_MAX, delay * 2)

    def set_backends(self, urls: list[str], folders: tuple[dict[str, Path], dict[str, Path]] | None = None) -> None:
        """Apply a new backend list (and their folders, `comfy_outputs` and `comfy_inputs`): new ones
        join, removed ones finish their prompts and leave. Not running (a cluster's bridge that does
        not lead now): kept for the next `start`."""
        self._initial = list(urls)
        if folders is not None:
            self._folders = folders
        if not self.running:
            return
        for url, backend in self.backends.items():
            if backend.client.use_folders(self._folders[0].get(url), self._folders[1].get(url)):
                self.core.spawn(self._check_folders(backend), f"check folders of {url}")
        for url in urls:
            existing = self.backends.get(url)
            if existing is None:
                log.info("backend %s added", url)
                self._add_backend(url)
            elif existing.draining:
                existing.draining = False
        for backend in list(self.backends.values()):
            if backend.name not in urls and not backend.draining:
                log.info("backend %s removed: draining %d prompts", backend.name, len(backend.inflight))
                backend.draining = True
                self.core.unbind_clients_of(backend)
                self.core.spawn(self._retire(backend), f"retire {backend.name}", daemon=True)
        self.core.wake_all()

    @staticmethod
    async def _check_folders(backend: Backend) -> None:
        with contextlib.suppress(BackendUnavailable):  # checked again at the next connect
            await backend.client.check_folders()

    async def _retire(self, backend: Backend) -> None:
        while backend.inflight and backend.draining:
            backend.wakeup.clear()
            await backend.wakeup.wait()
        if backend.draining:
            for task in (backend.listener, backend.worker):
                if task is not None:
                    task.cancel()
            self.backends.pop(backend.name, None)
            log.info("backend %s drained and removed", backend.name)

    # clients ---------------------------------------------------------------------------------
    def remember(self, client_id: str) -> Client:
        """Make a client known (in memory: it is on disk only once it owns something)."""
        return self.clients.touch(client_id)

    async def store_uploads(
        self, client_id: str | None, parts: AsyncIterator[IncomingFile], scope: str | None = None
    ) -> dict[str, str]:
        """Store an upload request's files (all or none); with a clientId they are its own, and it is
        known; without, they are for any client of the caller's API key (`scope`), or of none."""
        if self.core.journal_lost is not None:  # no job could use them: the folder is not ours any more
            raise StorageUnavailable(f"The bridge cannot take uploads: its journal {self.core.journal_lost}.")
        owner = client_id if client_id is not None else key_pool(scope)
        names = await self.core.uploads.receive(owner, parts)
        if client_id is not None:
            self.remember(client_id)
        return names

    def status_of(self, client_id: str) -> Status:
        return self.clients.require(client_id).status_now()

    def is_running(self, client_id: str) -> bool:
        client = self.clients.get(client_id)
        return client is not None and client.running

    def socket_opened(self, client_id: str) -> Client:
        client = self.clients.touch(client_id)
        client.sockets += 1
        grace = self._grace.pop(client_id, None)
        if grace is not None:
            grace.cancel()
        return client

    def socket_closed(self, client_id: str) -> bool:
        """True if that was the client's last socket and its jobs go on for `disconnect_grace`: a socket
        back within it hears what was told meanwhile."""
        client = self.clients.get(client_id)
        if client is None:
            return False
        client.sockets -= 1
        if client.sockets:
            return False
        if client.jobs and not self.core.closing:
            grace = self.core.spawn(self._cancel_after_grace(client), f"grace {client_id}", daemon=True)
            if grace is not None:
                self._grace[client_id] = grace
                return True
        elif client.untold:
            return True  # a job's end is being recorded: its ending waits for a socket back, as in a grace
        elif not self.running:
            pass  # the term or the bridge has ended (its journal closing): the next start knows what to forget
        elif self.clients.forget_if_done(client, self.core.owns_something) and "job_id" in client.status:
            # Nothing left to tell it or to keep (its last results fetched while this socket was open,
            # or it only ever had a socket): once gone it costs nothing, and its ended jobs go too.
            self.core.journal.forget_client(client_id, later=True)
        return False

    async def _cancel_after_grace(self, client: Client) -> None:
        try:
            await asyncio.sleep(self.settings.disconnect_grace)
            if client.sockets == 0 and client.jobs:  # its jobs may all have ended meanwhile
                log.info(
                    "client %s: socket gone for %ss, cancelling its %d jobs",
                    client.id, self.settings.disconnect_grace, len(client.jobs),
                )  # fmt: skip
                # From here the cancels go through: a socket back now must not cut them half-way.
                self._grace.pop(client.id, None)
                await self.interrupt(client.id)
        finally:
            if self._grace.get(client.id) is asyncio.current_task():
                del self._grace[client.id]

    # submitting ------------------------------------------------------------------------------
    async def submit(
        self, client_id: str, body: dict[str, Any], webhook: str | None = None, wait: bool = False
    ) -> tuple[Job, int]:
        """Accept one job: check it, journal it durably (which counts it), queue it; returns it and its
        place in line. Raises StorageFull if the journal cannot record it (nothing is changed then).
        With `wait`, the job's `awaited` is resolved once its end is durable (see `ended`)."""
        core = self.core
        if not self.accepting:
            raise ShuttingDown(
                "The bridge is shutting down and accepts no new jobs; try again in a moment."
                if self.stopping
                else "The bridge takes no new jobs now (it stops, or its cluster changes leader); try again shortly."
            )
        if core.journal_lost is not None:
            raise StorageUnavailable(f"The bridge cannot record new jobs: its journal {core.journal_lost}.")
        workflow = core.workflows.get(body.get("workflow"))
        pool = key_pool(scope_of(client_id))
        values = workflow.check_request(
            body, lambda name: core.uploads.kind_for(name, client_id, pool), int(self.settings.max_text_kb * 1024)
        )
        known = self.clients.get(client_id)
        limit = self.settings.max_jobs_per_client
        if limit and known is not None and len(known.jobs) >= limit:
            raise TooManyJobs(
                f"clientId {client_id!r} already has {len(known.jobs)} jobs in line, the limit; "
                "wait for one to finish or interrupt them."
            )
        key, per_key = scope_of(client_id), self.settings.max_jobs_per_key
        if key is not None and per_key and core.open_jobs_by_key[key] >= per_key:
            raise RateLimited(f"This API key already has {per_key} unfinished jobs, its limit; wait for one to end.")
        if not any(b.usable for b in self.backends.values()):
            raise NoBackend("No ComfyUI backend is available right now; try again shortly.")
        uploads = {
            spec.key: values[spec.key]
            for spec in workflow.file_inputs()
            if values.get(spec.key, spec.default) != spec.default
        }
        job_id = uuid.uuid4().hex
        prompt = workflow.build(values)
        if self.settings.output_subfolder:
            name_outputs(prompt, job_id)
        job = Job(client_id, workflow.alias, orjson.dumps(prompt), 0, uploads, id=job_id, webhook=webhook)
        job.journal = core.journal
        if wait:
            job.awaited = asyncio.get_running_loop().create_future()
            self._waited[job.id] = job
            job.awaited.add_done_callback(lambda _: self._waited.pop(job.id, None))
        core.opened(job)
        new_client = known is None
        taker = self.dispatcher.taker_at_once(job)
        if taker is not None:
            self.dispatcher.hand_over_at_once(taker, job)  # sent while its accept is written
        try:
            accepted = core.journal.accept(job.record())
        except BaseException:  # a journal closing under the request: nothing of the job stays
            self._unaccept(job, new_client)
            raise
        if taker is None:
            core.pending_accepts += 1
        else:
            job.accepting = accepted
        place = [1]  # taken when it joins the queue, before any worker can move it

        def joined(done: asyncio.Future[int]) -> None:
            if taker is None:
                core.pending_accepts -= 1
            job.accepting = None
            if self._accepted(job, done, new_client, queue=taker is None):
                place[0] = self._position(job)
            if taker is not None:  # what its ComfyUI said of it meanwhile is heard now, or never
                self.tracker.accept_decided(job, not done.cancelled() and done.exception() is None)

        # Queued by the journal's answer, not by this request: a client that hangs up mid-way
        # cannot leave a recorded job behind that nothing runs.
        accepted.add_done_callback(joined)
        await asyncio.shield(accepted)
        log.info("job %s client %s: accepted (%s) as #%d, place %d", job.id, client_id, job.workflow, job.seq, place[0])
        return job, place[0]

    def _accepted(self, job: Job, accepted: asyncio.Future[int], new_client: bool, queue: bool) -> bool:
        """The journal answered: the job is recorded (True), and joins the queue if `queue` (not if it
        was handed over in its accept record); if it is not recorded, undo every trace."""
        core = self.core
        if accepted.cancelled() or accepted.exception() is not None:
            self._unaccept(job, new_client)
            return False
        core.metrics.job_accepted(job.workflow)
        job.seq = accepted.result()
        self.state.generation_count = core.journal.count
        self._state_changed.set()
        if job.ended:  # interrupted while its acceptance was being written
            return False
        if not any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in self._client_jobs(job)):
            client = self.clients.get(job.client_id)
            if client is not None and not client.held:
                core.set_status(client, open_status(client))
        if queue:
            core.queue.push(job)
            core.wake_all()
        return True

    def _unaccept(self, job: Job, new_client: bool) -> None:
        # A job handed over at once may have been moved meanwhile (its backend went away): wherever it
        # is now, it goes. A prompt of it already sent is taken back from ComfyUI by its send.
        job.refused = True
        self._waited.pop(job.id, None)
        self.core.queue.remove(job)
        backend = self.backends.get(job.backend or "")
        if backend is not None and job in backend.inflight:
            job.sending = None
            self.core.take_back(backend, job)
        self.core.closed(job)
        self.core.release_uploads(job)  # (also when it ended while its accept was written: never recorded)
        client = self.clients.get(job.client_id)
        if client is not None:
            self.core.told_ending(client, job.id)
        if client is not None and new_client:
            self.clients.forget_if_done(client, self.core.owns_something)

    def _client_jobs(self, job: Job) -> list[Job]:
        client = self.clients.get(job.client_id)
        return list(client.jobs.values()) if client is not None else []

    def _position(self, job: Job) -> int:
        """One plus the jobs that run before it: those ahead of it (waiting, and inside ComfyUI), shared
        among the usable backends, since affinity never keeps a job off an idle one."""
        core = self.core
        backend = self.backends.get(job.backend or "")
        if backend is not None and job in backend.inflight:  # handed over already
            return sum(not j.ended for j in backend.inflight[: backend.inflight.index(job)]) + 1
        ahead = 0
        for other in itertools.islice(core.queue.order(), PLAN_HORIZON):
            if other is job:
                break
            ahead += 1
        # A job that ended (its results collected) may stay in flight until ComfyUI lets go of it.
        running = [sum(not j.ended for j in b.inflight) for b in self.backends.values() if b.usable]
        return (sum(running) + ahead) // max(1, len(running)) + 1

    @property
    def generation_count(self) -> int:
        """Jobs ever accepted, as far as the journal has made durable."""
        return self.core.journal.count

    def health(self) -> dict[str, Any]:
        """What an operator (or a load balancer) needs to know: each backend's state, the queue."""
        core = self.core
        backends = []
        for backend in self.backends.values():
            factor = core.runtimes.speed_factor(backend.name)
            backends.append(
                {
                    "url": shown(backend.name),
                    "state": backend.state,
                    "in_flight": len(backend.inflight),
                    "comfyui_queue": backend.queue_remaining,
                    "relative_speed": round(1 / factor, 3) if factor else None,  # > 1: faster than the others
                    "jobs_api": backend.client.jobs_api,
                }
            )
        return {
            "backends": backends,
            "usable_backends": sum(1 for b in self.backends.values() if b.usable),
            "queued": len(core.queue),
            "stopping": not self.accepting,
            "journal": core.journal_lost or core.journal.write_trouble or "ok",
            "generation_count": core.journal.count,
        }

    # control ---------------------------------------------------------------------------------
    async def interrupt(self, client_id: str) -> None:
        """Cancel every job of the client: drop waiting ones, delete queued ones, stop the running one.
        The client hears each one's `error` "interrupted", job by job, once its end is recorded (and
        its socket closes after the last)."""
        core = self.core
        client = self.clients.require(client_id)
        ended = []
        handed_over: list[tuple[Backend, Job]] = []
        for job in list(client.jobs.values()):
            backend = self.backends.get(job.backend or "")
            state = job.state
            ending = core.end(job, JobState.CANCELLED, "interrupted")
            if ending is None:
                continue  # it ended meanwhile (its results are being recorded): nothing to stop
            ended.append(ending)
            core.stop_collecting(job)
            # A SUBMITTING job with no hand-over in flight was handed over by an earlier process (or
            # its send is past ComfyUI's answer): ComfyUI may have its prompt, so it is taken back
            # (at the backend's next connect, if it is away).
            handed = state in (JobState.QUEUED, JobState.RUNNING) or (
                state is JobState.SUBMITTING and not job.handing_over
            )
            if handed and backend is not None:
                handed_over.append((backend, job))
            # WAITING: end took it out of the queue. Handing over: its send cancels it once ComfyUI answers.
        if handed_over:
            # Taken back from ComfyUI in a task of its own: a ComfyUI that does not answer (frozen,
            # swapping) must not hold the answer for comfy_timeout a job; a cancel that fails keeps
            # the prompt to take back at its next connect. One that answers is waited for.
            taking_back = core.spawn(self._take_back_all(handed_over), f"interrupt {client_id}")
            if taking_back is not None:
                await asyncio.wait([taking_back], timeout=INTERRUPT_WAIT)
            else:  # the bridge is stopping: no task outlives it, so the answer waits
                await self._take_back_all(handed_over)
        outcomes = await asyncio.gather(*ended, return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:  # stopped, and told once recorded; a restart before that runs them again
            refusal = type(failed) if isinstance(failed, StorageError) else StorageUnavailable
            told = refusal(
                f"The jobs are stopped, but their cancellation is not recorded yet: {failed} Until it is (the "
                "bridge keeps trying), a restart of the bridge, or another bridge of its cluster taking over, "
                "would run them again."
            )
            if isinstance(told, StorageUnavailable):
                told.retry_after = getattr(failed, "retry_after", None)
            raise told

    async def _take_back_all(self, handed_over: list[tuple[Backend, Job]]) -> None:
        for backend, job in handed_over:
            await self.core.cancel_on_backend(backend, job)
            if job not in backend.inflight:  # gone from ComfyUI's queue before its last event came
                self.tracker.let_go_of_ended(backend, job)

    async def free(self, client_id: str | None) -> bool:
        """POST /free on every backend that holds the client's work, or the one it used last (every
        backend without a client, or for one that never had a backend); a backend that is down is
        skipped. False if not one backend could be freed."""
        targets = list(self.backends.values())
        if client_id is not None:
            client = self.clients.require(client_id)
            names = {job.backend for job in client.jobs.values() if job.backend} | {client.last_backend}
            holding = [self.backends[name] for name in names if name in self.backends]
            targets = holding or targets
        freed = [await care.free(backend, "asked by a client") for backend in targets]
        return any(freed)

    # results and expiry ----------------------------------------------------------------------
    @property
    def result_store(self) -> ResultStore:
        """Where finished jobs' files are read from (as bytes, or as links when it has them)."""
        return self.core.results

    def claim_results(self, client_id: str) -> tuple[Fetch, list[JobResult]]:
        """The client's finished results, reserved for one request to send (a second request at the
        same time gets none of them). Hand them back with `results_fetched` once sent whole, or
        `release_results` if the sending broke off."""
        results = self.core.results
        if self.clients.get(client_id) is None and not results.holds(client_id):
            return Fetch.UNKNOWN, []
        fetched = results.claim(client_id)
        if fetched:
            return Fetch.READY, fetched
        return (Fetch.BUSY if results.being_sent(client_id) else Fetch.NOTHING), []

    async def ended(self, job: Job) -> list[JobResult]:
        """Wait for a job submitted with `wait` to end; then its results (none if it failed, or if
        another request fetched them first), reserved as `claim_results` does. A bridge that stops
        first raises ShuttingDown: the job stays journaled, and ends once a bridge runs again."""
        assert job.awaited is not None, "submitted without wait"
        await asyncio.shield(job.awaited)  # a request that goes away must not cancel it for the core
        return self.core.results.claim(job.client_id, job.id)

    def release_results(self, fetched: list[JobResult]) -> None:
        """A delivery that did not complete: the results can be fetched again."""
        self.core.results.release(fetched)

    def results_fetched(self, client_id: str, fetched: list[JobResult], keep_for: float = 0) -> None:
        """After a full /history download: gone at once for the next request (and a client with
        nothing left forgotten); journaled, sharing the next commit, then the files removed (after
        `keep_for` seconds: links to them were handed out), without holding up the client's connection."""
        core = self.core
        core.results.forget(client_id, fetched)
        client = self.clients.get(client_id)
        done = client is not None and self.clients.forget_if_done(client, core.owns_something)
        ids = [r.job_id for r in fetched]
        keys = core.results.keys_of(fetched, linked=bool(keep_for))  # the keys only: no inline bytes held
        core.spawn(self._forget_fetched(client_id, ids, keys, done, keep_for), f"forget fetched {client_id}")

    def results_lost(self, client_id: str, lost: list[JobResult], why: str) -> None:
        """Results that can never be delivered (their files removed or cut short by other hands):
        forgotten as if fetched, and said loudly, since a client lost them."""
        if lost:
            log.error("client %s: results of job %s lost (%s); forgotten", client_id,
                      ", ".join(r.job_id for r in lost), why)  # fmt: skip
            self.results_fetched(client_id, lost)

    async def _forget_fetched(
        self, client_id: str, ids: list[str], keys: list[str], client_done: bool, keep_for: float, retry: float = 0
    ) -> None:
        """Journal the fetch of these jobs before their files (`keys`) go. A journal that cannot take
        it now (a database away) is asked again until it does: until then a restart, or the next
        leader, would serve the results once more (at least once, never lost)."""
        core = self.core
        if retry:
            await asyncio.sleep(retry)
        else:  # before the journal forgets them: a crash in between leaves no folder that looks orphaned
            keys = await core.results.set_aside(keys)
        # A client with nothing left: all its ended jobs go, these with them (one write, not two). Asked
        # again, only these: a job the clientId got meanwhile may have ended since, unfetched.
        if client_done and not retry:
            forgotten = core.journal.forget_client(client_id, later=True)
        else:
            forgotten = core.journal.forget(ids, later=True)
        try:
            await forgotten
        except StorageError as exc:
            if not retry:
                log.warning("client %s: %d results delivered, but not yet forgotten in the journal (%s); "
                            "asking it again until it is", client_id, len(ids), exc)  # fmt: skip
            delay = min(2 * retry or 1.0, FORGET_RETRY_MAX)
            again = self._forget_fetched(client_id, ids, keys, client_done, keep_for, delay)
            core.spawn(again, f"forget fetched {client_id} again", daemon=True)  # a stop does not wait for it
            return
        if keep_for:  # a stop cuts this short: the objects are then orphans, which the sweep removes
            linked = set(ids)  # kept from the sweep while the links work
            self._linked |= linked
            core.spawn(self._delete_later(keys, linked, keep_for), f"delete linked {client_id}", daemon=True)
        else:
            await core.results.delete(keys)

    async def _delete_later(self, keys: list[str], linked: set[str], delay: float) -> None:
        await asyncio.sleep(delay)
        await self.core.results.delete(keys)
        self._linked -= linked

    async def _keep_state_file(self) -> None:
        """`current_state.json` follows the journal's count: one writer, woken by accepted jobs (its
        writes coalesce, at most one a second)."""
        while True:
            await self._state_changed.wait()
            self._state_changed.clear()
            await self.state.save()

    async def _keep_learned(self) -> None:
        """What the planner learned is kept in the journal every LEARNED_EVERY seconds it changed, so
        a restart (or the next leader of a cluster) places jobs well from its first one."""
        while True:
            await asyncio.sleep(LEARNED_EVERY)
            saving = self._remember_learned()
            if saving is not None:
                with contextlib.suppress(Exception):  # the journal's trouble is logged and answered elsewhere
                    await saving

    def _remember_learned(self) -> asyncio.Future[None] | None:
        """Keep the run times if they changed since last kept; the write's future, or None."""
        runtimes = self.core.runtimes
        if runtimes.changes == self._learned_saved:
            return None
        self._learned_saved = runtimes.changes
        return self.core.journal.remember(runtimes.dumps())

    async def _watch_journal(self) -> None:
        """Look after the journal file now and then, busy or idle: one deleted under the running bridge
        is written back; one replaced by another file, or that cannot be written back, takes no new jobs
        (accepted into a file the next start will not find, they would be lost)."""
        core = self.core
        while True:
            await asyncio.sleep(JOURNAL_CHECK)
            reason = await core.journal.ensure_in_place()
            if reason != core.journal_lost:
                core.journal_lost = reason
                if reason is not None:
                    log.error("the job journal %s: accepting no new jobs", reason)
                else:
                    log.warning("the job journal is in place again: accepting new jobs")

    @property
    def orphan_age(self) -> float:
        """Seconds after which a result object no record names is surely nobody's: an unfetched one
        expires after result_ttl, a fetched one's links outlive the fetch by link_ttl."""
        return self.settings.result_ttl + self.settings.link_ttl

    async def _sweeper(self) -> None:
        """Expire old uploads, results and finished clients; now and then, remove the objects that no
        record names (a deletion refused or cut short by a stop, an upload whose answer was lost)."""
        settings = self.settings
        orphans_due = time.monotonic() + min(ORPHANS_EVERY, settings.result_ttl)
        while True:
            await asyncio.sleep(min(60.0, settings.upload_ttl / 10, settings.result_ttl / 10))
            orphans = time.monotonic() >= orphans_due
            if orphans:
                orphans_due = time.monotonic() + min(ORPHANS_EVERY, settings.result_ttl)
            await self._sweep(orphans)

    async def _sweep(self, orphans: bool) -> None:
        """Each step on its own: one that fails (a folder removed, a full disk) is tried again at the
        next sweep, and leaves the others to run."""
        core, settings = self.core, self.settings
        if orphans:
            await _tried(
                "objects no record names",
                core.results.sweep_orphans(set(core.collecting) | self._linked, self.orphan_age),
            )
            await _tried("upload objects no record names", core.uploads.sweep_orphans(settings.upload_ttl))
        await _tried("expired uploads", core.uploads.expire(settings.upload_ttl, SWEEP_BATCH))
        await _tried("expired results", self._expire_results())
        await _tried("finished clients", self._forget_old_clients())

    async def _expire_results(self) -> None:
        core = self.core
        old = core.results.expired(self.settings.result_ttl)[:SWEEP_BATCH]
        if not old:
            return
        core.results.hold(old)  # no request takes them while their end is written
        try:
            await core.journal.forget(r.job_id for r in old)
        finally:
            core.results.release(old)
        for result in old:
            core.results.forget(result.client_id, [result])
        await core.results.delete(core.results.keys_of(old))
        log.info("expired %d unfetched results", len(old))

    async def _forget_old_clients(self) -> None:
        core = self.core
        cutoff = time.time() - self.settings.result_ttl
        core.journal.forget_ended_before(cutoff)
        for client in self.clients:
            # Its results and uploads expire on their own clocks: until they have, it is still known.
            if client.touched < cutoff and self.clients.forget_if_done(client, core.owns_something, stale=True):
                core.journal.forget_client(client.id)


async def _tried(what: str, step: Awaitable[Any]) -> None:
    """One step of the sweep; its failure is logged, never the sweeper's end."""
    try:
        await step
    except (StorageError, OSError) as exc:  # a full disk, a folder removed: the next sweep tries again
        log.error("sweeping %s failed; trying again at the next sweep: %s", what, exc)
    except Exception:  # a fault of ours
        log.exception("sweeping %s failed; trying again at the next sweep", what)


class Fetch(enum.Enum):
    """What a client's request for its results finds."""

    UNKNOWN = "unknown"  # a clientId the bridge has never seen (or has forgotten)
    NOTHING = "nothing"  # known, with no finished results now
    BUSY = "busy"  # every result is being sent to another request right now
    READY = "ready"
