"""What the scheduler's parts share: the backends, the waiting queue, the clients, and how a job ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from ..comfy.client import BackendUnavailable
from ..errors import StorageError
from ..store.journal import JobStore
from ..store.results import ResultFile, ResultStore
from ..store.uploads import UploadStore
from .backend import Backend
from .clients import (
    CLOSED,
    CONNECTED,
    LISTENING,
    Client,
    ClientRegistry,
    Status,
    about_job,
    scope_of,
    status_message,
)
from .early import EarlyFetches
from .fairqueue import FairQueue
from .jobs import Job, JobState
from .observer import JobObserver, NullObserver
from .planner import RunTimes
from .supervisor import Supervisor
from .webhooks import delivery_for
from .workflows import WorkflowStore

__all__ = ["DISCONNECTED", "Core", "Notifier", "SchedulerSettings", "open_status"]

log = logging.getLogger(__name__)

DISCONNECTED = "server disconnected"
END_RETRY_FIRST = 1.0  # seconds before a job's end that could not be recorded is tried again; doubles
END_RETRY_MAX = 30.0


class Notifier(Protocol):
    """Where status messages go; the WebSocket edge implements it."""

    def publish(self, client_id: str, message: Status, close: bool = False) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    """What the scheduler needs of the bridge's settings (same names; defaults live in config.Settings)."""

    heartbeat: float
    progress_every: float
    disconnect_grace: float
    job_idle_timeout: float
    result_ttl: float
    link_ttl: float  # with object storage: seconds a handed-out link to a result works
    upload_ttl: float
    pipeline_depth: int
    backend_grace: float
    comfy_timeout: float
    max_jobs_per_client: int
    max_jobs_per_key: int
    warm_slack: float
    free_idle_after: float
    free_every_jobs: int
    free_below_vram_mb: float
    free_below_ram_mb: float
    delete_history: bool
    output_subfolder: bool
    comfy_outputs: tuple[tuple[str, Path], ...]  # (backend URL, its output folder as seen here)
    delete_outputs: bool  # and delete each job's outputs there once stored
    comfy_inputs: tuple[tuple[str, Path], ...]  # (backend URL, its input folder as seen here)
    delete_inputs: bool  # and delete uploads written there once no unfinished job needs them
    max_result_mb: float
    result_retries: int
    max_event_mb: float
    max_text_kb: float
    root_path: str  # the path a proxy serves the bridge under: links given out start with it


def _where_and_how_long(job: Job) -> dict[str, Any]:
    """Where a job ran and how long it waited, ran, and took to collect (what is known of it), for
    the log line of its end; JSON logs carry these as fields."""
    now = time.monotonic()
    facts: dict[str, Any] = {"job_id": job.id, "client_id": job.client_id, "workflow": job.workflow}
    started, finished = job.started_at, job.finished_at
    facts["backend"] = job.backend
    if job.waited is not None:
        facts["waited_s"] = round(job.waited, 3)
    elif started is None and not job.started_unseen:  # it never started: it waited all along
        facts["waited_s"] = round(now - job.accepted_mono, 3)
    if started is not None and job.start_heard:  # what is not known (a start before this process) is left out
        facts["ran_s"] = round((finished if finished is not None else now) - started, 3)
    if finished is not None:
        facts["collected_s"] = round(now - finished, 3)
    return facts


def _describe(facts: dict[str, Any]) -> str:
    text = f" on {facts['backend']}" if facts["backend"] else ""
    text += ", " + ", ".join(f"{k[:-2]} {facts[k]:.2f}s" for k in ("waited_s", "ran_s", "collected_s") if k in facts)
    return text


def open_status(client: Client, told: str | None = None) -> Status:
    """The status of a client's unfinished jobs: `connected` once one is inside ComfyUI; about the
    first of them. With none, a job whose ending it has still to hear (being recorded; `told`: the
    one told now) is still under way for the client: `connected`, about it."""
    jobs = list(client.jobs.values())
    if jobs:
        handed = any(job.state is not JobState.WAITING for job in jobs)
        return about_job(CONNECTED if handed else LISTENING, jobs[0].id, len(jobs))
    ending = [job_id for job_id in client.untold if job_id != told]
    return about_job(CONNECTED, ending[0], len(ending)) if ending else dict(LISTENING)


class Core:
    def __init__(
        self,
        settings: SchedulerSettings,
        session: aiohttp.ClientSession,
        workflows: WorkflowStore,
        uploads: UploadStore,
        results: ResultStore,
        journal: JobStore,
        notifier: Notifier,
        metrics: JobObserver | None = None,
    ) -> None:
        self.settings = settings
        self.metrics: JobObserver = metrics or NullObserver()
        # Sends a webhook call once the job's end (which records it) is durable; set by the app.
        self.on_delivery: Callable[[dict[str, Any]], object] = lambda delivery: None
        self.session = session
        self.workflows = workflows
        self.uploads = uploads
        self.results = results
        self.journal = journal
        self.notifier = notifier
        self.clients = ClientRegistry()
        self.queue = FairQueue()
        self.runtimes = RunTimes()
        self.backends: dict[str, Backend] = {}
        self.by_prompt: dict[str, Job] = {}
        self.supervisor = Supervisor()  # every task and timer of the core
        self.collecting: dict[str, asyncio.Task[Any]] = {}  # job id -> the task copying its results
        self.early = EarlyFetches(self.spawn)  # output files fetched while their prompts go on
        self.pending_accepts = 0  # jobs whose accept is being written, to join the queue then
        self._closing = False
        self.accepting = True  # new jobs are taken (False from SIGTERM on, during its grace)
        self.journal_lost: str | None = None  # why the journal cannot be trusted any more, once it cannot
        self.open_jobs_by_key: Counter[str] = Counter()  # unfinished jobs of each API key
        self.settled = asyncio.Event()  # set whenever a prompt leaves a backend or a collection ends
        # Asked just before a prompt goes to ComfyUI: False once this bridge may no longer be the one
        # that sends (a cluster's leader that lost touch with its database); the journal keeps the
        # hand-over, and whichever bridge leads next reconciles it by prompt_id.
        self.may_send: Callable[[], bool] = lambda: True

    # tasks -----------------------------------------------------------------------------------
    @property
    def closing(self) -> bool:
        """No more hand-overs: the bridge stops (what waits stays in the journal for the next start)."""
        return self._closing

    def stop_dispatching(self) -> None:
        self._closing = True
        self.accepting = False
        self.wake_all()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, daemon: bool = False) -> asyncio.Task[Any] | None:
        """Run `coro` under the supervisor; None once it is closing (the work is left as the journal
        records it, for the next start)."""
        if not self.supervisor.accepting:
            coro.close()
            log.debug("not started, the bridge is stopping: %s", name)
            return None
        return self.supervisor.spawn(coro, name, daemon)

    def collect(self, job: Job, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        """Copy a finished job's results in a task of its own, which an interrupt can stop."""
        task = self.spawn(coro, f"collect {job.id}")
        if task is None:
            return None  # stopping: ComfyUI keeps the prompt, the next start collects it
        self.collecting[job.id] = task
        task.add_done_callback(lambda _: self._collected(job.id, task))
        return task

    def _collected(self, job_id: str, task: asyncio.Task[Any]) -> None:
        if self.collecting.get(job_id) is task:
            del self.collecting[job_id]
        self.settled.set()

    def stop_collecting(self, job: Job) -> None:
        """The job was interrupted while its results were being copied: stop copying (and retrying)."""
        task = self.collecting.get(job.id)
        if task is not None:
            task.cancel()

    def unstuck(self, backend: Backend, why: str) -> None:
        """A stuck backend shows progress again: it takes work again, once the prompts moved off it
        meanwhile are gone from it (they run elsewhere)."""
        log.warning("backend %s is no longer stuck: %s", backend.name, why)
        backend.stuck_prompt = None
        self.spawn(self.remove_abandoned(backend), f"take back abandoned on {backend.name}")
        self.wake_all()

    def abandon(self, backend: Backend, prompt_id: str) -> None:
        """A prompt sent to this backend must not run there (its job moved elsewhere, or ended): taken
        back when it can be (`remove_abandoned`), and journaled until then, so that a restart, or
        the next leader of a cluster, takes it back too."""
        if prompt_id not in backend.abandoned:
            backend.abandoned.add(prompt_id)
            self._keep_abandoned()

    def restore_abandoned(self) -> int:
        """At start: the prompts the last process had still to take back, each to its backend."""
        try:
            kept = orjson.loads(self.journal.abandoned or "{}")
        except orjson.JSONDecodeError:
            kept = None
        if not isinstance(kept, dict):
            log.warning("the journal's list of prompts to take back is unreadable; it is dropped")
            return 0
        taken = 0
        for name, prompt_ids in kept.items():
            if not isinstance(prompt_ids, list) or not all(isinstance(p, str) for p in prompt_ids):
                continue
            backend = self.backends.get(name)
            if backend is None:
                log.warning(
                    "%d prompts to take back from %s are dropped: it is no longer a backend", len(prompt_ids), name
                )
                continue
            backend.abandoned.update(prompt_ids)
            taken += len(prompt_ids)
        return taken

    def _keep_abandoned(self) -> None:
        kept = {name: sorted(b.abandoned) for name, b in self.backends.items() if b.abandoned}
        with contextlib.suppress(RuntimeError):  # a journal closed (a stop, a lost term): nothing to keep
            self.journal.keep_abandoned(orjson.dumps(kept).decode() if kept else "")

    async def remove_abandoned(self, backend: Backend, only: Collection[str] | None = None) -> None:
        """Prompts moved elsewhere while this backend was away or stuck must not run here too (all
        of them, or `only` these); one that cannot be cancelled now stays listed, for its next connect."""
        removed = False
        try:
            for prompt_id in [p for p in backend.abandoned if only is None or p in only]:
                try:
                    await backend.client.cancel(prompt_id)
                except BackendUnavailable as exc:
                    log.warning("backend %s: prompt %s not taken back yet: %s", backend.name, prompt_id, exc)
                    return
                backend.abandoned.discard(prompt_id)
                removed = True
        finally:
            if removed:
                self._keep_abandoned()

    def retake_abandoned(self, backend: Backend) -> None:
        """A prompt of `abandoned` sends events (its cancel failed, or it was moved while the backend
        seemed away): try again to take it back, one try at a time, for as long as it runs."""
        if backend.retaking:
            return
        backend.retaking = True

        async def once() -> None:
            try:
                await self.remove_abandoned(backend)
            finally:
                backend.retaking = False

        if self.spawn(once(), f"take back abandoned on {backend.name}") is None:
            backend.retaking = False  # the bridge is stopping: the journal keeps them for the next start

    def wake_all(self) -> None:
        self.settled.set()
        for backend in self.backends.values():
            backend.wakeup.set()

    # placement facts -------------------------------------------------------------------------
    def preferred_of(self, client_id: str) -> str | None:
        """The backend a client's work is on (its uploads there, caches warm), if it can take more:
        the planner prefers it while it would not finish a job later than another backend."""
        client = self.clients.get(client_id)
        if client is None or client.backend is None:
            return None
        backend = self.backends.get(client.backend)
        return client.backend if backend is not None and backend.usable else None

    def unbind_clients_of(self, backend: Backend) -> None:
        for client in self.clients:
            if client.backend == backend.name:
                client.backend = None

    def hand_over(self, backend: Backend, job: Job) -> None:
        """The job goes into the backend's in-flight list (sent, or being sent, to its ComfyUI); its
        client's work is on that backend from now on. `take_back` is the way out."""
        backend.inflight.append(job)
        backend.idle_since = None
        self.by_prompt[job.prompt_id] = job
        client = self.clients.get(job.client_id)
        if client is not None:
            client.backend = client.last_backend = backend.name

    def take_back(self, backend: Backend, job: Job) -> None:
        """The job leaves the backend's in-flight list (its prompt ended there, or never will). A job
        no longer there (moved elsewhere meanwhile, under another prompt_id) is left as it is: its
        new backend's events must still find it."""
        if job in backend.inflight:
            backend.inflight.remove(job)
            if backend.inflight:
                backend.inflight[0].last_event = time.monotonic()
            else:
                backend.idle_since = time.monotonic()
                backend.freed_while_idle = False
            client = self.clients.get(job.client_id)
            if (
                client is not None
                and client.backend == backend.name
                and not any(j in backend.inflight for j in client.jobs.values())
            ):
                client.backend = None  # nothing of it is there any more
            self.by_prompt.pop(job.prompt_id, None)
            self.early.forget(job.prompt_id)
        self.wake_all()

    def send_again(self, job: Job, because: str | None = None) -> None:
        """Back to the head of the bridge's queue, under a fresh prompt_id (`Job.retry` says why)."""
        job.retry(because)
        self.queue.push_front(job)
        self.wake_all()

    def set_status(self, client: Client, status: Status) -> None:
        """The one place a client's latest status (what /execution-info answers) changes."""
        client.status = status

    def owns_something(self, client_id: str) -> bool:
        """Results to fetch or uploads: what keeps a client without jobs or sockets known."""
        return self.results.holds(client_id) or self.uploads.owns(client_id)

    def opened(self, job: Job) -> None:
        """A job joins its client's unfinished jobs (accepted, or recovered at start-up)."""
        client = self.clients.touch(job.client_id)
        client.jobs[job.id] = job
        client.untold.append(job.id)
        self.uploads.pin(job.uploads.values())
        key = scope_of(job.client_id)
        if key is not None:
            self.open_jobs_by_key[key] += 1

    def inputs_unneeded(self, names: list[str]) -> None:
        """Uploads no unfinished job needs any more: deleted from every ComfyUI input folder the bridge
        writes (`delete_inputs`), wherever a hand-over, of this run or an earlier one, put them."""
        if names and self.settings.delete_inputs:
            for backend in self.backends.values():
                if backend.client.inputs is not None:
                    backend.client.inputs.remove_later(names, self.spawn)

    def closed(self, job: Job, uploads: bool = True) -> None:
        """A job leaves its client's unfinished jobs (ended, or never accepted); with `uploads`, its
        uploads are released too (an ending releases them once it is durable: a restart before
        that runs the job again, with them)."""
        client = self.clients.get(job.client_id)
        if client is not None and client.jobs.pop(job.id, None) is not None:
            if uploads:
                self.release_uploads(job)
            key = scope_of(job.client_id)
            if key is not None:
                self.open_jobs_by_key[key] -= 1
                if self.open_jobs_by_key[key] <= 0:
                    del self.open_jobs_by_key[key]

    def release_uploads(self, job: Job) -> None:
        """The job no longer needs its uploads: their time to expire runs (once no other job pins them)."""
        if not job.uploads_released:
            job.uploads_released = True
            self.inputs_unneeded(self.uploads.unpin(job.uploads.values()))

    # endings ---------------------------------------------------------------------------------
    def end(
        self,
        job: Job,
        state: JobState,
        error: str | None = None,
        files: list[ResultFile] | None = None,
        notify: bool = True,
    ) -> asyncio.Future[None] | None:
        """A job ends exactly once: journaled, its slot and uploads released, and once the record is
        durable its results become fetchable and its client is told (unless the caller tells it).
        Returns the journal write, or None if the job had already ended."""
        if job.ended:
            return None
        delivery = None
        if job.webhook is not None:
            told = [{"file_name": f.file_name, "content_type": f.content_type, "size": f.size} for f in files or []]
            detail = CLOSED["detail"] if state is JobState.DONE else error or "error"
            root = self.settings.root_path
            delivery = delivery_for(job.id, job.client_id, job.workflow, state.value, detail, told, job.webhook, root)
        if files is not None:
            committed = job.move(state, delivery, error=error, results=[f.record() for f in files])
        else:
            committed = job.move(state, delivery, error=error)
        self.queue.remove(job)
        self.closed(job, uploads=False)  # released once the end is durable (`_ended`)
        facts = {**_where_and_how_long(job), "outcome": state.value}
        log.log(
            logging.WARNING if state is JobState.FAILED else logging.INFO,
            "job %s client %s: %s%s%s", job.id, job.client_id, state.value, _describe(facts),
            f" ({error})" if error else "", extra={"fields": facts},
        )  # fmt: skip
        committed.add_done_callback(lambda done: self._end_recorded(job, done, files, notify, delivery))
        return committed

    def _end_recorded(
        self,
        job: Job,
        done: asyncio.Future[None],
        files: list[ResultFile] | None,
        notify: bool,
        delivery: dict[str, Any] | None,
    ) -> None:
        """Only a durable end is told: one a restart would not find is recorded again until it lands."""
        if job.refused:  # ended (interrupted) while its accept was written, which then failed
            self.release_uploads(job)
            return
        if done.cancelled() or done.exception() is not None:
            self.spawn(self._record_end_again(job, files, notify, delivery), f"record end {job.id}")
            return
        self._ended(job, files, notify)
        if delivery is not None:
            self.on_delivery(delivery)

    async def _record_end_again(
        self, job: Job, files: list[ResultFile] | None, notify: bool, delivery: dict[str, Any] | None
    ) -> None:
        delay = END_RETRY_FIRST
        while True:
            log.error("job %s client %s: its end is not recorded; trying again in %gs", job.id, job.client_id, delay)
            await asyncio.sleep(delay)
            delay = min(END_RETRY_MAX, delay * 2)
            if job.refused:
                self.release_uploads(job)
                return
            try:
                await job.record_again()
            except StorageError:
                continue
            break
        log.info("job %s client %s: its end is recorded now", job.id, job.client_id)
        self._ended(job, files, notify)
        if delivery is not None:
            self.on_delivery(delivery)

    def _ended(self, job: Job, files: list[ResultFile] | None, notify: bool) -> None:
        self.metrics.job_ended(job.workflow, job.state.value)  # durable: a next term will not end it again
        self.release_uploads(job)
        if files is not None:
            self.results.add(job.id, job.client_id, job.seq, files)
            job.results = None  # recorded; its encoded copy of inline files would double their memory
        if job.awaited is not None and not job.awaited.done():
            job.awaited.set_result(None)
        client = self.clients.get(job.client_id)
        if client is None:
            return
        if not notify:
            self.told_ending(client, job.id)  # its caller tells the client
            return
        if job.state is JobState.DONE:
            ending = about_job(CLOSED, job.id, len(client.jobs))
        else:
            ending = about_job(status_message("error", job.error or "error"), job.id, len(client.jobs))
        if self._may_send(client, ending):
            self._send(client, ending, may_close=True)
            self.told_ending(client, job.id)
        else:  # an earlier job has not been told its ending yet: this one waits behind it
            client.held.append((ending, True))

    # what clients are told ---------------------------------------------------------------------
    def tell(self, job: Job, status: str, detail: str) -> None:
        """A status frame about one job. A client hears about its jobs in order: while an earlier
        job's ending is being recorded, frames about later ones wait for it."""
        client = self.clients.get(job.client_id)
        if client is None or job.accepting is not None:  # not a word before its client's answer
            return
        self._tell(client, about_job(status_message(status, detail), job.id, len(client.jobs)))

    def tell_ending_again(self, client: Client, message: Status) -> None:
        """The ending of a job recovered as finished (among the client's untold ones), told again;
        held behind the endings of the client's earlier jobs."""
        if self._may_send(client, message):
            self._send(client, message)  # (an ending said again never closes a socket)
            self.told_ending(client, message["job_id"])
        else:
            client.held.append((message, False))

    def _tell(self, client: Client, message: Status) -> None:
        """Send now if the frame is about the client's oldest job whose ending it has not heard;
        frames about later jobs wait for that ending."""
        if self._may_send(client, message):
            self._send(client, message)
        else:
            client.held.append((message, False))

    @staticmethod
    def _may_send(client: Client, message: Status) -> bool:
        job_id = message.get("job_id")
        return not client.untold or job_id == client.untold[0] or job_id not in client.untold

    def _send(self, client: Client, message: Status, may_close: bool = False) -> None:
        """`may_close`: a job's ending as it happens (not one said again after a restart)."""
        close = False
        if "job_id" in message:
            # Counted as it is sent, not as it was made: a frame that waited behind an earlier job's
            # ending would otherwise miscount the jobs whose ending the client has still to hear.
            message = {**message, "jobs_left": client.jobs_left(message)}
            # The contract: an `error` closes the socket (1011) unless the client has further jobs
            # in line; decided as it is sent, since endings can be told in another order than made.
            close = may_close and message["status"] == "error" and not message["jobs_left"]
        if message["status"] == "closed" and message.get("jobs_left"):
            # /execution-info says `closed` only once nothing of the client is left to run.
            self.set_status(client, open_status(client, told=message["job_id"]))
        else:
            self.set_status(client, message)
        self.notifier.publish(client.id, message, close)

    def told_ending(self, client: Client, job_id: str) -> None:
        """The job's ending has been told (or never will be): frames of the next job may go."""
        if job_id in client.untold:
            client.untold.remove(job_id)
        while True:
            ready = next((i for i, (m, _) in enumerate(client.held) if self._may_send(client, m)), None)
            if ready is None:
                return
            message, may_close = client.held.pop(ready)
            self._send(client, message, may_close)
            if message["status"] in ("closed", "error") and message.get("job_id") in client.untold:
                client.untold.remove(message["job_id"])  # a held ending, told now

    async def cancel_on_backend(self, backend: Backend, job: Job) -> None:
        """Take a prompt back from ComfyUI: delete it from the queue, or interrupt it if it runs."""
        try:
            await backend.client.cancel(job.prompt_id)
        except BackendUnavailable as exc:
            log.warning("job %s client %s: cancel on %s failed: %s", job.id, job.client_id, backend.name, exc)
            # Still to be taken back: at its next connect, or as it starts (`Tracker.on_event`).
            self.abandon(backend, job.prompt_id)
        # If it never started, ComfyUI sends nothing more about it: free its slot now.
        if job in backend.inflight:
            try:
                running, pending = await backend.client.queue()
            except BackendUnavailable:
                running, pending = [], []
            if job.prompt_id not in running and job.prompt_id not in pending:
                self.take_back(backend, job)
