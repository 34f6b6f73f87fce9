"""Scheduler: the bridge's queue, one worker per ComfyUI backend, client affinity, and job endings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from .clients import CLOSED, CONNECTED, LISTENING, Client, ClientRegistry, Status, status_message
from .comfy import (
    BackendUnavailable,
    ComfyClient,
    OutputRef,
    PromptRefused,
    describe_execution_error,
    outputs_of,
)
from .errors import NoBackend, ShuttingDown
from .jobs import Job, JobState
from .media import content_type_for
from .results import ResultFile, ResultStore
from .state import StateStore
from .uploads import UploadStore
from .workflows import WorkflowStore

log = logging.getLogger(__name__)

INTERRUPTED = status_message("error", "interrupted")
DISCONNECTED = "server disconnected"
SUBMIT_RETRIES = 2


class Notifier(Protocol):
    """Where status messages go; the WebSocket edge implements it."""

    def publish(self, client_id: str, message: Status, close: bool = False) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    heartbeat: float = 1.0
    disconnect_grace: float = 5.0
    job_idle_timeout: float = 60.0
    result_ttl: float = 86400.0
    upload_ttl: float = 3600.0
    pipeline_depth: int = 1


@dataclass
class Backend:
    """One ComfyUI and the bridge's view of it."""

    client: ComfyClient
    waiting: deque[Job] = field(default_factory=deque)  # assigned here, not yet sent
    inflight: list[Job] = field(default_factory=list)  # sent to ComfyUI, oldest (running) first
    healthy: bool = False
    queue_remaining: int = 0  # ComfyUI's own count: ours and anyone else's
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    object_info_loaded: bool = False
    first_attempt: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.client.name

    def load(self) -> int:
        """Outstanding work: the bridge's jobs here plus prompts others queued on this ComfyUI."""
        others = max(0, self.queue_remaining - len(self.inflight))
        return len(self.waiting) + len(self.inflight) + others


def format_seconds(value: float) -> str:
    return f"{value:g}"


class Scheduler:
    """Accepts jobs, sends them to backends, turns ComfyUI's events into client status messages.

    Knows nothing of HTTP: the edge calls its methods and receives status through a Notifier.
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
        self.workflows = workflows
        self.uploads = uploads
        self.results = results
        self.state = state
        self.notifier = notifier
        self.clients = ClientRegistry(state.clients)
        self.bridge_id = f"comfybridge-{uuid.uuid4().hex[:12]}"
        self.backends = {url: Backend(ComfyClient(url, session, self.bridge_id)) for url in backend_urls}
        self._by_prompt: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._grace: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    # lifecycle -------------------------------------------------------------------------------
    async def start(self, connect_timeout: float = 3.0) -> None:
        """Start workers and event sockets; wait briefly so the first requests find backends up."""
        for backend in self.backends.values():
            self._spawn(self._listen(backend), f"listen {backend.name}")
            self._spawn(self._worker(backend), f"worker {backend.name}")
        self._spawn(self._watchdog(), "watchdog")
        self._spawn(self._sweeper(), "sweeper")
        waits = [asyncio.ensure_future(b.first_attempt.wait()) for b in self.backends.values()]
        _, late = await asyncio.wait(waits, timeout=connect_timeout)
        for task in late:
            task.cancel()

    async def close(self) -> None:
        """Refuse new work, stop every task, and save the state."""
        self._closing = True
        tasks = list(self._tasks) + list(self._grace.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.state.clients = self.clients.snapshot()
        await self.state.save()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

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
        client.ever_socket = True
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

    # submitting ------------------------------------------------------------------------------
    async def submit(self, client_id: str, body: dict[str, Any]) -> tuple[Job, int]:
        """Accept one job: check it, count it durably, queue it; returns it and its place in line."""
        if self._closing:
            raise ShuttingDown("The bridge is shutting down and accepts no new jobs.")
        workflow = self.workflows.get(body.get("workflow"))
        values = workflow.check_request(body, lambda name: self.uploads.usable(name, client_id))
        client = self.clients.touch(client_id)
        backend = self._choose_backend(client)
        uploads = {
            spec.key: values[spec.key]
            for spec in workflow.file_inputs()
            if values.get(spec.key, spec.default) != spec.default
        }
        self.state.generation_count += 1
        job = Job(client_id, workflow.alias, workflow.build(values), self.state.generation_count, uploads)
        client.jobs[job.id] = job
        client.backend = client.last_backend = backend.name
        if not any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in client.jobs.values()):
            client.status = dict(LISTENING)
        self.state.clients = self.clients.snapshot()
        try:
            await asyncio.shield(self.state.save())
        except BaseException:
            client.jobs.pop(job.id, None)
            raise
        # Concurrent submits finish their save in any order; the queue stays in acceptance order.
        index = len(backend.waiting)
        while index > 0 and backend.waiting[index - 1].seq > job.seq:
            index -= 1
        backend.waiting.insert(index, job)
        position = len(backend.inflight) + index + 1
        log.info(
            "job %s client %s: accepted (%s) for %s, place %d",
            job.id,
            client_id,
            workflow.alias,
            backend.name,
            position,
        )
        backend.wakeup.set()
        return job, position

    def _choose_backend(self, client: Client) -> Backend:
        """A bound client stays on its backend; a new one goes where it will be served soonest."""
        healthy = [b for b in self.backends.values() if b.healthy]
        if not healthy:
            raise NoBackend("No ComfyUI backend is available right now; try again shortly.")
        bound = self.backends.get(client.backend or "")
        if bound is not None and bound.healthy and (client.jobs or self.uploads.owns_any(client.id)):
            return bound
        return min(healthy, key=lambda b: (b.load(), b.name != client.last_backend))

    def bind_for_upload(self, client_id: str) -> None:
        """Uploads with a clientId may pick the client's backend early, so its files live in one place."""
        client = self.clients.touch(client_id)
        with contextlib.suppress(NoBackend):
            backend = self._choose_backend(client)
            client.backend = client.last_backend = backend.name

    # the worker ------------------------------------------------------------------------------
    async def _worker(self, backend: Backend) -> None:
        """Keep ComfyUI fed: up to `pipeline_depth` prompts wait inside it behind the running one."""
        while True:
            while not (backend.healthy and backend.waiting and len(backend.inflight) <= self.settings.pipeline_depth):
                backend.wakeup.clear()
                await backend.wakeup.wait()
            job = backend.waiting.popleft()
            await self._dispatch(backend, job)

    async def _dispatch(self, backend: Backend, job: Job) -> None:
        job.state = JobState.SUBMITTING
        job.backend = backend.name
        job.attempts += 1
        backend.inflight.append(job)
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
        except (BackendUnavailable, KeyError) as exc:
            self._drop_inflight(backend, job)
            if job.cancel_requested:
                return
            if isinstance(exc, BackendUnavailable) and job.attempts <= SUBMIT_RETRIES:
                log.warning("job %s client %s: %s; will retry", job.id, job.client_id, exc)
                job.new_attempt()
                backend.waiting.appendleft(job)
                await asyncio.sleep(0.2 * job.attempts)
                return
            if isinstance(exc, KeyError):
                reason = "an uploaded file of the job is gone"
            else:
                reason = "ComfyUI did not accept the job" if backend.client.connected else DISCONNECTED
            self._end(job, JobState.FAILED, reason)
            return
        job.last_event = time.monotonic()
        if job.state is JobState.SUBMITTING:
            job.state = JobState.QUEUED
            client = self.clients.get(job.client_id)
            if client is not None and not job.cancel_requested and not client.running:
                client.status = dict(CONNECTED)
        log.info("job %s client %s: queued on %s as %s", job.id, job.client_id, backend.name, job.prompt_id)
        if job.cancel_requested:
            # The cancel raced the hand-over; now ComfyUI has named the prompt, take it back.
            self._spawn(self._cancel_on_backend(backend, job), f"cancel {job.id}")

    def _drop_inflight(self, backend: Backend, job: Job) -> None:
        if job in backend.inflight:
            backend.inflight.remove(job)
            if backend.inflight:
                backend.inflight[0].last_event = time.monotonic()
        self._by_prompt.pop(job.prompt_id, None)
        backend.wakeup.set()

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
        job.last_event = time.monotonic()
        progress = job.progress
        if event == "execution_start":
            if not job.ended:
                job.state = JobState.RUNNING
        elif event == "execution_cached":
            progress.cached([str(n) for n in data.get("nodes", [])])
        elif event == "executing":
            node = data.get("node")
            if node is None:
                self._prompt_finished(backend, job)
                return
            progress.executing(str(node))
        elif event == "progress":
            value, maximum = data.get("value"), data.get("max")
            if isinstance(value, int | float) and isinstance(maximum, int | float):
                progress.step(str(data.get("node")), float(value), float(maximum))
        elif event == "progress_state":
            for node_id, node in (data.get("nodes") or {}).items():
                if isinstance(node, dict) and node.get("state") == "finished":
                    progress.node_finished(str(node_id))
        elif event == "execution_success":
            job.outcome = "success"
        elif event == "execution_error":
            job.outcome = "error"
            job.error = describe_execution_error(data)
        elif event == "execution_interrupted":
            job.outcome = "interrupted"
        if job.state is JobState.RUNNING:
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
        self._drop_inflight(backend, job)
        if job.ended:
            return
        self._spawn(self._collect(backend, job), f"collect {job.id}")

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
        client = self.clients.get(job.client_id)
        if client is None:
            return
        client.jobs.pop(job.id, None)
        if client.jobs:
            client.backend = next(iter(client.jobs.values())).backend or client.backend
        else:
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
        self.state.clients = self.clients.snapshot()
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
            if state is JobState.WAITING:
                for candidate in self.backends.values():
                    if job in candidate.waiting:
                        candidate.waiting.remove(job)
            elif state in (JobState.QUEUED, JobState.RUNNING) and backend is not None:
                await self._cancel_on_backend(backend, job)
            # SUBMITTING: _dispatch sees cancel_requested once ComfyUI answers and cancels there.
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
            if not backend.healthy:
                log.warning("free: skipping %s, it is down", backend.name)
                continue
            try:
                await backend.client.free()
            except BackendUnavailable as exc:
                log.warning("free: %s failed: %s", backend.name, exc)

    # health and reconciliation ---------------------------------------------------------------
    async def _listen(self, backend: Backend) -> None:
        async def connected() -> None:
            await self._reconcile(backend)
            if not backend.object_info_loaded:
                self.workflows.apply_object_info(await backend.client.object_info())
                backend.object_info_loaded = True
            backend.healthy = True
            backend.wakeup.set()

        def disconnected() -> None:
            backend.healthy = False
            log.warning(
                "backend %s is down; %d jobs wait for it", backend.name, len(backend.inflight) + len(backend.waiting)
            )

        await backend.client.listen(
            lambda event, data: self._on_event(backend, event, data), connected, disconnected, backend.first_attempt
        )

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
                status = (entry.get("status") or {}).get("status_str")
                messages = [m[0] for m in (entry.get("status") or {}).get("messages", []) if m]
                job.outcome = (
                    "interrupted"
                    if "execution_interrupted" in messages
                    else "success"
                    if status == "success"
                    else "error"
                )
                if job.outcome == "error" and job.error is None:
                    job.error = next(
                        (
                            describe_execution_error(m[1])
                            for m in entry["status"]["messages"]
                            if m[0] == "execution_error"
                        ),
                        None,
                    )
                self._prompt_finished(backend, job)
            elif not job.ended:
                log.warning("job %s client %s: lost by %s, sending it again", job.id, job.client_id, backend.name)
                self._drop_inflight(backend, job)
                job.new_attempt()
                backend.waiting.appendleft(job)
            else:
                self._drop_inflight(backend, job)

    async def _watchdog(self) -> None:
        """Fail the running job of a backend that has said nothing about it for job_idle_timeout."""
        limit = self.settings.job_idle_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for backend in self.backends.values():
                head = next((j for j in backend.inflight if j.state is not JobState.SUBMITTING), None)
                if head is None or now - head.last_event < limit:
                    continue
                self._drop_inflight(backend, head)
                if head.ended:
                    continue
                reason = f"time out error: exceed {format_seconds(limit)}s" if backend.healthy else DISCONNECTED
                log.warning("job %s client %s: %s", head.id, head.client_id, reason)
                self._end(head, JobState.FAILED, reason)
                if backend.healthy:
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
