"""Scheduler: the bridge's fair queue, one worker per ComfyUI backend, placement, failover, job endings."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from . import care
from .backend import Backend
from .clients import CLOSED, CONNECTED, LISTENING, Client, ClientRegistry, Status, status_message
from .comfy import (
    BackendUnavailable,
    ComfyClient,
    OutputRef,
    PromptRefused,
    describe_execution_error,
    outputs_of,
)
from .errors import NoBackend, ShuttingDown, TooManyJobs
from .fairqueue import FairQueue
from .jobs import Job, JobState
from .media import content_type_for
from .planner import PLAN_HORIZON, RunTimes, plan_for
from .results import ResultFile, ResultStore
from .state import StateStore
from .uploads import UploadStore
from .workflows import WorkflowStore

log = logging.getLogger(__name__)

INTERRUPTED = status_message("error", "interrupted")
DISCONNECTED = "server disconnected"
NOT_ACCEPTED = "ComfyUI did not accept the job"
MAX_ATTEMPTS = 3  # hand-overs of one job that may fail before it does


class Notifier(Protocol):
    """Where status messages go; the WebSocket edge implements it."""

    def publish(self, client_id: str, message: Status, close: bool = False) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    """What the scheduler needs of the bridge's settings (same names; defaults live in config.Settings)."""

    heartbeat: float
    disconnect_grace: float
    job_idle_timeout: float
    result_ttl: float
    upload_ttl: float
    pipeline_depth: int
    backend_grace: float
    comfy_timeout: float
    max_jobs_per_client: int
    warm_slack: float
    free_idle_after: float
    free_every_jobs: int
    free_below_vram_mb: float
    free_below_ram_mb: float
    delete_history: bool
    output_subfolder: bool


class Scheduler:
    """Accepts jobs, places them on backends, turns ComfyUI's events into client status messages.

    Knows nothing of HTTP: the edge calls its methods and receives status through a Notifier.
    Jobs wait in one fair queue; each backend's worker takes the job that earliest-finish
    placement gives it, so fast backends take more, and no GPU idles while work it should do waits.
    """

    def __init__(
        self,
        settings: SchedulerSettings,
        backend_urls: list[str],
        session: aiohttp.ClientSession,
        workflows: WorkflowStore,
        uploads: UploadStore,
        results: ResultStore,
        state: StateStore,
        notifier: Notifier,
    ) -> None:
        self.settings = settings
        self.session = session
        self.workflows = workflows
        self.uploads = uploads
        self.results = results
        self.state = state
        self.notifier = notifier
        self.clients = ClientRegistry(state.clients)
        state.describe_clients = self.clients.snapshot
        self.queue = FairQueue()
        self.runtimes = RunTimes()
        self.bridge_id = f"comfybridge-{uuid.uuid4().hex[:12]}"
        self.backends: dict[str, Backend] = {}
        self._initial = list(backend_urls)
        self._by_prompt: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._collecting: set[asyncio.Task[Any]] = set()  # jobs whose results are being copied
        self._grace: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    # lifecycle -------------------------------------------------------------------------------
    async def start(self, connect_timeout: float = 3.0) -> None:
        """Start workers and event sockets; wait briefly so the first requests find backends up."""
        for url in self._initial:
            self._add_backend(url)
        self._spawn(self._watchdog(), "watchdog")
        self._spawn(self._sweeper(), "sweeper")
        waits = [asyncio.ensure_future(b.first_attempt.wait()) for b in self.backends.values()]
        if waits:
            _, late = await asyncio.wait(waits, timeout=connect_timeout)
            for task in late:
                task.cancel()

    async def close(self, collect_timeout: float = 10.0) -> None:
        """Refuse new work, let results being copied land (bounded), stop every task, save the state."""
        self._closing = True
        self._collecting = {t for t in self._collecting if not t.done()}
        if self._collecting:
            await asyncio.wait(self._collecting, timeout=collect_timeout)
        tasks = list(self._tasks) + list(self._grace.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.state.save()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._collecting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _wake_all(self) -> None:
        for backend in self.backends.values():
            backend.wakeup.set()

    # backends at run time --------------------------------------------------------------------
    def _add_backend(self, url: str) -> Backend:
        client = ComfyClient(url, self.session, self.bridge_id, request_timeout=self.settings.comfy_timeout)
        backend = self.backends[url] = Backend(client)
        backend.tasks = [
            self._spawn(self._listen(backend), f"listen {url}"),
            self._spawn(self._worker(backend), f"worker {url}"),
        ]
        return backend

    def set_backends(self, urls: list[str]) -> None:
        """Apply a new backend list: new ones join, removed ones finish their prompts and leave."""
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
                self._unbind_clients_of(backend)
                self._spawn(self._drain(backend), f"drain {backend.name}")
        self._wake_all()

    async def _drain(self, backend: Backend) -> None:
        while backend.inflight and backend.draining:
            backend.wakeup.clear()
            await backend.wakeup.wait()
        if backend.draining:
            for task in backend.tasks:
                task.cancel()
            self.backends.pop(backend.name, None)
            log.info("backend %s drained and removed", backend.name)

    def _unbind_clients_of(self, backend: Backend) -> None:
        for client in self.clients:
            if client.backend == backend.name:
                client.backend = None

    # clients ---------------------------------------------------------------------------------
    async def remember(self, client_id: str) -> Client:
        """Make a client known and save it, so it stays known across a restart."""
        known = self.clients.get(client_id) is not None
        client = self.clients.touch(client_id)
        if not known:
            await self._save()
        return client

    def status_of(self, client_id: str) -> Status:
        return self.clients.require(client_id).status

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

    def socket_closed(self, client_id: str) -> None:
        client = self.clients.get(client_id)
        if client is None:
            return
        client.sockets -= 1
        if client.sockets == 0 and client.jobs and not self._closing:
            self._grace[client_id] = asyncio.create_task(self._cancel_after_grace(client), name=f"grace {client_id}")

    async def _cancel_after_grace(self, client: Client) -> None:
        try:
            await asyncio.sleep(self.settings.disconnect_grace)
            if client.sockets == 0:
                log.info(
                    "client %s: socket gone for %ss, cancelling its jobs", client.id, self.settings.disconnect_grace
                )
                await self.interrupt(client.id)
        finally:
            if self._grace.get(client.id) is asyncio.current_task():
                del self._grace[client.id]

    def _bound_of(self, client_id: str) -> str | None:
        """The backend a client's jobs must run on, if it is bound to one that can still take them."""
        client = self.clients.get(client_id)
        if client is None or client.backend is None:
            return None
        backend = self.backends.get(client.backend)
        if backend is None or backend.draining or (not backend.healthy and backend.down_since is None):
            return None
        return client.backend

    # submitting ------------------------------------------------------------------------------
    async def submit(self, client_id: str, body: dict[str, Any]) -> tuple[Job, int]:
        """Accept one job: check it, count it durably, queue it; returns it and its place in line."""
        if self._closing:
            raise ShuttingDown("The bridge is shutting down and accepts no new jobs.")
        workflow = self.workflows.get(body.get("workflow"))
        values = workflow.check_request(body, lambda name: self.uploads.usable(name, client_id))
        known = self.clients.get(client_id)
        limit = self.settings.max_jobs_per_client
        if limit and known is not None and len(known.jobs) >= limit:
            raise TooManyJobs(
                f"clientId {client_id!r} already has {len(known.jobs)} jobs in line, the limit; "
                "wait for one to finish or interrupt them."
            )
        if not any(b.usable for b in self.backends.values()):
            raise NoBackend("No ComfyUI backend is available right now; try again shortly.")
        client = self.clients.touch(client_id)
        uploads = {
            spec.key: values[spec.key]
            for spec in workflow.file_inputs()
            if values.get(spec.key, spec.default) != spec.default
        }
        self.state.generation_count += 1
        job = Job(client_id, workflow.alias, workflow.build(values), self.state.generation_count, uploads)
        if self.settings.output_subfolder:
            _prefix_outputs(job)
        client.jobs[job.id] = job
        if not any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in client.jobs.values()):
            client.status = dict(LISTENING)
        try:
            await asyncio.shield(self.state.save())
        except BaseException:
            client.jobs.pop(job.id, None)
            raise
        if job.ended:  # interrupted while its acceptance was being written
            return job, 1
        self.queue.push(job)
        position = self._position(job)
        log.info("job %s client %s: accepted (%s), place %d", job.id, client_id, workflow.alias, position)
        self._wake_all()
        return job, position

    def _position(self, job: Job) -> int:
        """One plus the jobs that run before it: on its backend if bound, else in the bridge queue."""
        bound = self._bound_of(job.client_id)
        ahead = 0
        for other in itertools.islice(self.queue.order(), PLAN_HORIZON):
            if other is job:
                break
            if bound is None or self._bound_of(other.client_id) == bound:
                ahead += 1
        if bound is not None:
            return len(self.backends[bound].inflight) + ahead + 1
        running = [len(b.inflight) for b in self.backends.values() if b.usable]
        return min(running, default=0) + ahead + 1

    # the worker ------------------------------------------------------------------------------
    async def _worker(self, backend: Backend) -> None:
        """Keep ComfyUI fed: up to `pipeline_depth` prompts wait inside it behind the running one."""
        while True:
            job = self._next_for(backend)
            if job is None:
                backend.wakeup.clear()
                await backend.wakeup.wait()
                continue
            self.queue.take(job)
            if not job.ended:
                await self._dispatch(backend, job)

    def _next_for(self, backend: Backend) -> Job | None:
        if not (self.queue and backend.usable and len(backend.inflight) <= self.settings.pipeline_depth):
            return None
        lanes = [b.lane(self.runtimes) for b in self.backends.values() if b.usable]
        jobs = list(itertools.islice(self.queue.order(), PLAN_HORIZON))
        waiting = ((j.id, j.workflow, self._bound_of(j.client_id)) for j in jobs)
        index = plan_for(backend.name, waiting, lanes, self.runtimes.estimate, self.settings.warm_slack)
        return None if index is None else jobs[index]

    async def _dispatch(self, backend: Backend, job: Job) -> None:
        job.state = JobState.SUBMITTING
        job.backend = backend.name
        client = self.clients.get(job.client_id)
        if client is not None:
            client.backend = client.last_backend = backend.name
        backend.inflight.append(job)
        backend.idle_since = None
        self._by_prompt[job.prompt_id] = job
        try:
            prompt = job.prompt
            for key, name in job.uploads.items():
                node_id, _, input_name = key.partition("/")
                remote = await backend.client.upload(self.uploads.path_of(name), name)
                prompt[node_id]["inputs"][input_name] = remote
            await backend.client.submit(prompt, job.prompt_id)
        except PromptRefused as exc:
            self._drop_inflight(backend, job)
            self._end(job, JobState.FAILED, str(exc))
            return
        except KeyError:
            self._drop_inflight(backend, job)
            self._end(job, JobState.FAILED, "an uploaded file of the job is gone")
            return
        except BackendUnavailable as exc:
            if not (exc.maybe_done and await self._took_it_after_all(backend, job)):
                self._hand_over_failed(backend, job, exc)
                return
        backend.submit_failures = 0
        job.last_event = time.monotonic()
        if job.state is JobState.SUBMITTING:
            job.state = JobState.QUEUED
            if client is not None and not job.cancel_requested and not client.running:
                client.status = dict(CONNECTED)
        log.info("job %s client %s: queued on %s as %s", job.id, job.client_id, backend.name, job.prompt_id)
        if job.cancel_requested:
            # The cancel raced the hand-over; now ComfyUI has named the prompt, take it back.
            self._spawn(self._cancel_on_backend(backend, job), f"cancel {job.id}")

    async def _took_it_after_all(self, backend: Backend, job: Job) -> bool:
        """A hand-over without an answer: ask ComfyUI before sending the prompt anywhere again."""
        try:
            return await backend.client.knows(job.prompt_id)
        except BackendUnavailable:
            return False

    def _hand_over_failed(self, backend: Backend, job: Job, exc: BackendUnavailable) -> None:
        """POST /prompt failed: try elsewhere, and give a backend that keeps refusing a rest."""
        self._drop_inflight(backend, job)
        if exc.maybe_done:
            # ComfyUI may have queued it without answering: remove it there once it answers again.
            backend.abandoned.add(job.prompt_id)
        backend.submit_failures += 1
        if backend.submit_failures >= 2:
            pause = min(30.0, 0.5 * 2.0 ** (backend.submit_failures - 2))
            backend.sick_until = time.monotonic() + pause
            asyncio.get_running_loop().call_later(pause, self._wake_all)
            log.warning(
                "backend %s refused %d hand-overs: no new work for %gs", backend.name, backend.submit_failures, pause
            )
        if job.cancel_requested:
            return
        job.attempts += 1
        if job.attempts >= MAX_ATTEMPTS:
            self._end(job, JobState.FAILED, NOT_ACCEPTED if backend.healthy else DISCONNECTED)
            return
        log.warning("job %s client %s: %s; will send it again", job.id, job.client_id, exc)
        client = self.clients.get(job.client_id)
        if (
            client is not None
            and client.backend == backend.name
            and not any(j in backend.inflight for j in client.jobs.values())
        ):
            client.backend = None
        job.new_attempt()
        self.queue.push_front(job)
        self._wake_all()

    def _drop_inflight(self, backend: Backend, job: Job) -> None:
        if job in backend.inflight:
            backend.inflight.remove(job)
            if backend.inflight:
                backend.inflight[0].last_event = time.monotonic()
            else:
                backend.idle_since = time.monotonic()
                backend.freed_while_idle = False
        self._by_prompt.pop(job.prompt_id, None)
        self._wake_all()

    # ComfyUI events --------------------------------------------------------------------------
    def _on_event(self, backend: Backend, event: str, data: dict[str, Any]) -> None:
        if event == "status":
            exec_info = (data.get("status") or {}).get("exec_info") or {}
            if isinstance(exec_info.get("queue_remaining"), int):
                backend.queue_remaining = exec_info["queue_remaining"]
            return
        job = self._by_prompt.get(str(data.get("prompt_id")))
        if job is None:
            return
        if event == "execution_start":
            job.warm = backend.last_workflow == job.workflow
            backend.last_workflow = job.workflow
        if job.apply_event(event, data):
            self._prompt_finished(backend, job)
        elif job.state is JobState.RUNNING:
            self._publish_progress(job)

    def _publish_progress(self, job: Job) -> None:
        client = self.clients.get(job.client_id)
        if client is None:
            return
        before = client.status
        detail = f"{job.progress.update():.2f}%"
        if before.get("status") == "progress" and before.get("detail") == detail:
            return
        client.status = status_message("progress", detail)
        self.notifier.publish(client.id, client.status)

    def _prompt_finished(self, backend: Backend, job: Job) -> None:
        """ComfyUI's final `executing null`: only now is the prompt in /history."""
        if job.outcome == "success" and job.started_at is not None:
            self.runtimes.observe(job.workflow, backend.name, time.monotonic() - job.started_at, job.warm)
        self._drop_inflight(backend, job)
        if job.ended:
            return
        self._collecting.add(self._spawn(self._collect(backend, job), f"collect {job.id}"))

    async def _collect(self, backend: Backend, job: Job) -> None:
        """Read the finished prompt's outcome and copy its output files into the result store."""
        try:
            entry = await backend.client.history(job.prompt_id)
            if entry is not None and job.outcome is None:
                job.outcome = "success" if (entry.get("status") or {}).get("status_str") == "success" else "error"
            if job.outcome == "success":
                await self._store_results(backend, job, outputs_of(entry or {}))
                if not job.ended:
                    job.progress.complete()
                    self._publish_progress(job)
                    self._end(job, JobState.DONE, None)
            elif job.outcome == "interrupted":
                self._end(job, JobState.CANCELLED, "interrupted")
            else:
                self._end(job, JobState.FAILED, job.error or "ComfyUI reported an error without details")
        except BackendUnavailable as exc:
            log.warning("job %s client %s: results lost: %s", job.id, job.client_id, exc)
            await self.results.discard(job.id)
            self._end(job, JobState.FAILED, DISCONNECTED)
            return
        await care.after_job(backend, job.prompt_id, self.settings)

    async def _store_results(self, backend: Backend, job: Job, refs: list[OutputRef]) -> None:
        folder = self.results.folder_for(job.id)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        files = []
        for index, ref in enumerate(refs):
            target = folder / f"{index:03d}-{ref.filename.replace('/', '_')}"
            size = await backend.client.download(ref, target)
            files.append(ResultFile(ref.filename, target, content_type_for(ref.filename), size))
        if not job.ended:
            await self.results.add(job.id, job.client_id, job.seq, files)

    def _end(self, job: Job, state: JobState, error: str | None, notify: bool = True) -> None:
        """A job ends exactly once: its client is told (unless the caller tells it), its slot is freed."""
        if job.ended:
            return
        job.state = state
        job.error = error
        self.queue.remove(job)
        client = self.clients.get(job.client_id)
        if client is None:
            return
        client.jobs.pop(job.id, None)
        if not client.jobs:
            client.backend = None
        log.info("job %s client %s: %s%s", job.id, client.id, state.value, f" ({error})" if error else "")
        if not notify:
            pass
        elif state is JobState.DONE:
            client.status = dict(CLOSED)
            self.notifier.publish(client.id, client.status)
        else:
            client.status = status_message("error", error or "error")
            self.notifier.publish(client.id, client.status, close=not client.jobs)
        self._spawn(self._save(), "save state")

    async def _save(self) -> None:
        await self.state.save()

    # control ---------------------------------------------------------------------------------
    async def interrupt(self, client_id: str) -> None:
        """Cancel every job of the client: drop waiting ones, delete queued ones, stop the running one."""
        client = self.clients.require(client_id)
        jobs = list(client.jobs.values())
        for job in jobs:
            job.cancel_requested = True
            backend = self.backends.get(job.backend or "")
            state = job.state
            self._end(job, JobState.CANCELLED, "interrupted", notify=False)
            if state in (JobState.QUEUED, JobState.RUNNING) and backend is not None:
                await self._cancel_on_backend(backend, job)
            # WAITING: _end took it out of the queue. SUBMITTING: _dispatch cancels it once ComfyUI answers.
        if jobs:
            client.status = dict(INTERRUPTED)
            self.notifier.publish(client_id, client.status, close=True)
            await self._save()

    async def _cancel_on_backend(self, backend: Backend, job: Job) -> None:
        try:
            await backend.client.delete_queued([job.prompt_id])
            await backend.client.interrupt(job.prompt_id)
        except BackendUnavailable as exc:
            log.warning("job %s client %s: cancel on %s failed: %s", job.id, job.client_id, backend.name, exc)
        # If it never started, ComfyUI sends nothing more about it: free its slot now.
        if job in backend.inflight:
            running, pending = await self._queue_or_empty(backend)
            if job.prompt_id not in running and job.prompt_id not in pending:
                self._drop_inflight(backend, job)

    async def _queue_or_empty(self, backend: Backend) -> tuple[list[str], list[str]]:
        try:
            return await backend.client.queue()
        except BackendUnavailable:
            return [], []

    async def free(self, client_id: str | None) -> None:
        """POST /free on the client's backend (or every one); a backend that is down is skipped."""
        targets = list(self.backends.values())
        if client_id is not None:
            client = self.clients.require(client_id)
            chosen = self.backends.get(client.backend or client.last_backend or "")
            targets = [chosen] if chosen is not None else targets
        for backend in targets:
            await care.free(backend, "asked by a client")

    # health, failover and reconciliation -----------------------------------------------------
    async def _listen(self, backend: Backend) -> None:
        async def connected() -> None:
            await self._remove_abandoned(backend)
            await self._reconcile(backend)
            if not backend.object_info_loaded:
                self.workflows.apply_object_info(await backend.client.object_info())
                backend.object_info_loaded = True
            backend.healthy = True
            backend.down_since = None
            log.info("backend %s is up", backend.name)
            self._wake_all()

        def disconnected() -> None:
            backend.healthy = False
            backend.down_since = since = time.monotonic()
            log.warning("backend %s is down; %d prompts wait for it", backend.name, len(backend.inflight))
            self._spawn(self._fail_over_later(backend, since), f"failover {backend.name}")

        await backend.client.listen(
            lambda event, data: self._on_event(backend, event, data), connected, disconnected, backend.first_attempt
        )

    async def _fail_over_later(self, backend: Backend, since: float) -> None:
        """A backend gone for backend_grace seconds loses its prompts to the healthy ones."""
        await asyncio.sleep(self.settings.backend_grace)
        if backend.healthy or backend.down_since != since:
            return
        log.warning("backend %s down for %gs: moving its jobs", backend.name, self.settings.backend_grace)
        for job in reversed(list(backend.inflight)):
            self._drop_inflight(backend, job)
            backend.abandoned.add(job.prompt_id)
            if job.ended:
                continue
            if job.started_at is not None:
                if job.retries >= 1:
                    self._end(job, JobState.FAILED, DISCONNECTED)
                    continue
                job.retries += 1
            log.warning("job %s client %s: moving off %s", job.id, job.client_id, backend.name)
            job.new_attempt()
            self.queue.push_front(job)
        backend.down_since = None  # its clients are no longer held for it
        self._unbind_clients_of(backend)
        self._wake_all()

    async def _remove_abandoned(self, backend: Backend) -> None:
        """Prompts moved elsewhere while this backend was away must not run here too."""
        if not backend.abandoned:
            return
        gone = list(backend.abandoned)
        await backend.client.delete_queued(gone)
        running, _ = await backend.client.queue()
        for prompt_id in running:
            if prompt_id in backend.abandoned:
                await backend.client.interrupt(prompt_id)
        backend.abandoned.difference_update(gone)

    async def _reconcile(self, backend: Backend) -> None:
        """After a lost socket: ask ComfyUI about every prompt the bridge had there."""
        if not backend.inflight:
            return
        running, pending = await backend.client.queue()
        for job in list(backend.inflight):
            if job.state is JobState.SUBMITTING or job.prompt_id in running or job.prompt_id in pending:
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
                self._prompt_finished(backend, job)
            elif not job.ended:
                log.warning("job %s client %s: lost by %s, sending it again", job.id, job.client_id, backend.name)
                self._drop_inflight(backend, job)
                job.new_attempt()
                self.queue.push_front(job)
            else:
                self._drop_inflight(backend, job)

    async def _watchdog(self) -> None:
        """Fail a running job that ComfyUI has said nothing about for job_idle_timeout; free idle backends."""
        limit = self.settings.job_idle_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for backend in list(self.backends.values()):
                if care.idle_free_due(backend, now, self.settings.free_idle_after):
                    self._spawn(care.free(backend, "idle"), f"free {backend.name}")
                if not backend.healthy:
                    continue  # a backend that is away is handled by failover
                head = next((j for j in backend.inflight if j.state is not JobState.SUBMITTING), None)
                if head is None or now - head.last_event < limit:
                    continue
                if head.state is JobState.QUEUED and backend.queue_remaining > len(backend.inflight):
                    head.last_event = now  # still behind other users' prompts inside ComfyUI: waiting, not idle
                    continue
                self._drop_inflight(backend, head)
                if head.ended:
                    continue
                reason = f"time out error: exceed {limit:g}s"
                log.warning("job %s client %s: %s", head.id, head.client_id, reason)
                self._end(head, JobState.FAILED, reason)
                self._spawn(self._cancel_on_backend(backend, head), f"cancel {head.id}")

    async def _sweeper(self) -> None:
        """Expire old uploads, results and finished clients."""
        settings = self.settings
        while True:
            await asyncio.sleep(min(60.0, settings.upload_ttl / 10, settings.result_ttl / 10))
            await self.uploads.expire(settings.upload_ttl)
            await self.results.expire(settings.result_ttl)
            cutoff = time.time() - settings.result_ttl
            forgot = [
                c.id
                for c in self.clients
                if c.touched < cutoff and self.clients.forget_if_done(c, self.results.holds, True)
            ]
            if forgot:
                await self._save()

    async def results_fetched(self, client_id: str) -> None:
        """After a full /history download: a client with nothing left is forgotten."""
        client = self.clients.get(client_id)
        if client is not None and self.clients.forget_if_done(client, self.results.holds):
            await self._save()


def _prefix_outputs(job: Job) -> None:
    """Give the job's output files a folder of their own: `comfybridge/<day>/<job>/<prefix>`.

    SaveImage lists its output folder on every save, so a shared folder of thousands of files
    slows every job; and bridges sharing a ComfyUI never collide on names."""
    day = datetime.date.today().isoformat()
    for node in job.prompt.values():
        prefix = node.get("inputs", {}).get("filename_prefix")
        if isinstance(prefix, str):
            node["inputs"]["filename_prefix"] = f"comfybridge/{day}/{job.id[:12]}/{prefix}"
