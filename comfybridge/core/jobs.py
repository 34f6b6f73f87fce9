"""The job model: one accepted request, its lifecycle, and its progress through ComfyUI's events."""

from __future__ import annotations

import asyncio
import datetime
import enum
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from ..comfy.shapes import OutputRef
from .progress import Progress

__all__ = ["ENDED", "InvalidStep", "Job", "JobState", "job_folder", "name_outputs"]

OUTPUTS_FOLDER = "comfybridge"  # in ComfyUI's output folder: comfybridge/<day>/<job id[:12]>/...


def name_outputs(prompt: dict[str, Any], job_id: str) -> None:
    """Give the job's output files a folder of their own and names that carry the job id:
    `comfybridge/<day>/<job>/<prefix>_<job id>`, so ComfyUI saves `<prefix>_<job id>_00001_.png`.

    SaveImage lists its output folder on every save, so a shared folder of thousands of files
    slows every job; bridges sharing a ComfyUI never collide on names; and a client can match
    each file of `/history` to its job by name alone."""
    day = datetime.date.today().isoformat()
    for node in prompt.values():
        prefix = node.get("inputs", {}).get("filename_prefix")
        if isinstance(prefix, str):
            node["inputs"]["filename_prefix"] = f"{OUTPUTS_FOLDER}/{day}/{job_id[:12]}/{prefix}_{job_id}"


def job_folder(job_id: str, ref: OutputRef) -> str | None:
    """The job's own folder (`comfybridge/<day>/<job>`) if this output is one `name_outputs` named
    for it, else None: a name ComfyUI reports for another reason (a cached node's earlier file, a
    prefix wired from another node, a custom node's own naming) is another prompt's, or nobody's."""
    names = ref.subfolder.split("/")
    if len(names) >= 3 and names[0] == OUTPUTS_FOLDER and names[2] == job_id[:12] and job_id in ref.filename:
        return "/".join(names[:3])
    return None


class JobState(enum.StrEnum):
    WAITING = "waiting"  # in the bridge's queue for its backend
    SUBMITTING = "submitting"  # uploads and POST /prompt in flight
    QUEUED = "queued"  # in ComfyUI's queue, not started
    RUNNING = "running"  # ComfyUI sent execution_start
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = {JobState.DONE, JobState.FAILED, JobState.CANCELLED}
# Every step a job may take. SUBMITTING may jump ahead: ComfyUI can start (even finish) a prompt
# before its answer to POST /prompt arrives. Any live state may go back to WAITING, to be sent again.
STEPS: dict[JobState, set[JobState]] = {
    JobState.WAITING: {JobState.SUBMITTING} | ENDED,
    JobState.SUBMITTING: {JobState.QUEUED, JobState.RUNNING, JobState.WAITING} | ENDED,
    JobState.QUEUED: {JobState.RUNNING, JobState.WAITING} | ENDED,
    JobState.RUNNING: {JobState.WAITING} | ENDED,
    JobState.DONE: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


# Steps kept in memory only: after a restart the bridge asks ComfyUI where a handed-over prompt is
# (queued, running or finished) anyway, so recording them would cost two commits per job for nothing.
UNRECORDED = {JobState.QUEUED, JobState.RUNNING}


class InvalidStep(Exception):
    """A state change the job model does not allow: a bug in the caller, never a client's doing."""


class Recorder(Protocol):
    """Where a job's state changes are written (the journal); the future is done once it is durable."""

    def update(
        self, job_id: str, fields: dict[str, Any], delivery: dict[str, Any] | None = None
    ) -> asyncio.Future[None]: ...


@dataclass
class Job:
    client_id: str
    workflow: str
    prompt: bytes  # the API-format graph as JSON: compact while it waits (a dict is many times larger)
    seq: int  # generation count at acceptance: the job's place in acceptance order
    uploads: dict[str, str] = field(default_factory=dict)  # "node/input" -> upload name to send at dispatch
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_id: str = field(default_factory=lambda: str(uuid.uuid4()))  # chosen here, so a cancel always has it
    state: JobState = JobState.WAITING
    backend: str | None = None
    error: str | None = None
    outcome: str | None = None  # what ComfyUI said: success, error or interrupted
    reported: str | None = None  # ComfyUI's error text for this run (the job's `error` is set as it ends)
    attempts: int = 0  # hand-overs that failed before ComfyUI took the prompt
    retries: int = 0  # runs lost (its backend died under it, or its queue stalled), sent again
    started_at: float | None = None  # monotonic time of ComfyUI's execution_start
    start_heard: bool = False  # `started_at` is its execution_start as heard, not a reconcile's "running now"
    waited: float | None = None  # seconds from its accept to its first start inside ComfyUI, when heard
    # It may have started inside ComfyUI unseen by this process (handed over, or run and lost, by an
    # earlier one; found running after missed events): its wait is not known.
    started_unseen: bool = False
    finished_at: float | None = None  # monotonic time of ComfyUI's final `executing null`
    handed_at: float | None = None  # monotonic time its POST /prompt began
    queued_at_status: int = 0  # its backend's `statuses` when ComfyUI answered its POST /prompt
    warm: bool = False  # its backend ran the same workflow just before it
    accepted_at: float = field(default_factory=time.time)
    accepted_mono: float = field(default_factory=time.monotonic)  # for the wait and run times it logs
    ended_at: float | None = None
    results: list[dict[str, Any]] | None = None  # the stored result files, once done
    last_event: float = field(default_factory=time.monotonic)
    # ComfyUI's queue showed its prompt running before any word of its start came: its silence counts from then.
    found_running: bool = False
    sending: str | None = None  # the prompt id whose POST /prompt is in flight from this process
    # Its accept record while it is written, for a job sent meanwhile: what ComfyUI says waits for it.
    accepting: asyncio.Future[int] | None = field(default=None, repr=False, compare=False)
    refused: bool = False  # its accept record failed: its client got an error, and hears nothing more of it
    told_percent: float = 0.0  # the highest percent its client heard: frames only ever rise from it
    told_at: float = -math.inf  # monotonic time of its last progress frame (none yet: the first goes at once)
    progress_due: asyncio.TimerHandle | None = field(default=None, repr=False, compare=False)  # a held frame
    resumed: bool = False  # recovered after a restart: it says so before its next progress frame
    # The outputs ComfyUI's `executed` events announced, while every event since execution_start
    # has been seen (None otherwise): then its /history need not be read.
    seen_outputs: dict[str, Any] | None = None
    webhook: str | None = None  # where to tell of its end (the request's `_webhook`, or its key's)
    forget_on_leave: bool = False  # delivered before ComfyUI let go of its prompt: delete its history then
    let_go: bool = False  # ComfyUI's copy of its prompt (own output files, history entry) is being removed
    collected: bool = False  # a collection ran: it decided what of the prompt ComfyUI keeps (let go, or kept)
    uploads_released: bool = False  # its uploads no longer pinned by it (its end is durable, or it was refused)
    # A request waiting for its end (`?wait=1`): resolved once its end is durable and its results held.
    awaited: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)
    journal: Recorder | None = field(default=None, repr=False, compare=False)
    _progress: Progress | None = field(default=None, init=False, repr=False, compare=False)
    _last_record: tuple[dict[str, Any], dict[str, Any] | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def progress(self) -> Progress:
        """Made when first needed: a job that waits holds no per-node state."""
        if self._progress is None:
            self._progress = Progress(self.graph())
        return self._progress

    def graph(self) -> dict[str, Any]:
        """A fresh copy of the prompt to send (the caller may patch it)."""
        graph: dict[str, Any] = orjson.loads(self.prompt)
        return graph

    @classmethod
    def restore(cls, row: dict[str, Any], journal: Recorder) -> Job:
        """A job as the journal last recorded it."""
        job = cls(row["client_id"], row["workflow"], row["prompt"], row["seq"], row["uploads"], id=row["id"])
        job.prompt_id, job.state, job.backend = row["prompt_id"], JobState(row["state"]), row["backend"]
        job.error, job.attempts, job.retries = row["error"], row["attempts"], row["retries"]
        job.accepted_at, job.ended_at, job.results = row["accepted_at"], row["ended_at"], row["results"]
        # Its wait counts from its accept (by this process, a killed one, or another bridge), not from now.
        job.accepted_mono -= max(0.0, time.time() - job.accepted_at)
        job.webhook = row.get("webhook")
        job.journal = journal
        return job

    def move(self, to: JobState, delivery: dict[str, Any] | None = None, **changes: Any) -> asyncio.Future[None]:
        """The one place a job changes state: the step is checked, applied here at once (so every later
        decision sees it) and recorded in the journal, with the webhook `delivery` that tells of it if
        any; the future is done when the record is durable."""
        if to not in STEPS[self.state]:
            raise InvalidStep(f"job {self.id}: {self.state.value} -> {to.value}")
        for name, value in changes.items():
            if name not in _RECORDED_CHANGES:
                raise InvalidStep(f"job {self.id}: {name} is not part of a step")
            setattr(self, name, value)
        self.state = to
        record: dict[str, Any] = {"state": to.value, **changes}
        if to in ENDED:
            self.ended_at = record["ended_at"] = time.time()
        if self.journal is None or to in UNRECORDED:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self._last_record = (record, delivery)
        return self.journal.update(self.id, record, delivery)

    def record_again(self) -> asyncio.Future[None]:
        """Write the last recorded change once more (its first write failed: a full disk)."""
        assert self.journal is not None
        assert self._last_record is not None
        record, delivery = self._last_record
        return self.journal.update(self.id, record, delivery)

    @property
    def handing_over(self) -> bool:
        """Its current prompt's POST /prompt is in flight: its answer decides where it is."""
        return self.sending is not None and self.sending == self.prompt_id

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def executing(self) -> bool:
        return self.state is JobState.RUNNING

    def apply_event(self, event: str, data: dict[str, Any]) -> bool:
        """Follow one ComfyUI event of this job's prompt (checked by `shapes.event`); True for the final
        `executing` with node null, after which (and only after which) ComfyUI has the prompt in its
        history."""
        self.last_event = time.monotonic()
        progress = self.progress
        if event == "execution_start":
            if self.started_at is None:
                self.started_at, self.start_heard = self.last_event, True
                self.seen_outputs = {}
            else:  # twice in one run (no real ComfyUI does it): what was seen is kept, and /history asked
                self.seen_outputs = None
            self.finished_at = None
            if self.state in (JobState.SUBMITTING, JobState.QUEUED):
                self.move(JobState.RUNNING)
        elif event == "execution_cached":
            progress.cached(data["nodes"])
        elif event == "executing":
            if data["node"] is None:
                self.finished_at = self.last_event
                return True
            progress.executing(data["node"])
        elif event == "progress":
            progress.step(data["node"], data["value"], data["max"])
        elif event == "progress_state":
            for node_id in data["finished"]:
                progress.node_finished(node_id)
        elif event == "executed":
            if self.seen_outputs is not None:
                self.seen_outputs[data["node"]] = data["output"]
        elif event == "execution_success":
            self.outcome = "success"
            if not self.seen_outputs:  # no output announced (none made, or its event lost): /history says
                self.seen_outputs = None
        elif event == "execution_error":
            self.outcome = "error"
            self.reported = data["error"]
        elif event == "execution_interrupted":
            self.outcome = "interrupted"
        return False

    def retry(self, because: str | None = None) -> asyncio.Future[None]:
        """Back to the bridge's queue, to be sent again under a fresh prompt_id, so that a late event
        of the old one cannot be mistaken for it. `because` counts why, in the record: "hand-over"
        (ComfyUI did not take it) or "lost run" (its backend died while it ran, or ran nothing)."""
        attempts = self.attempts + (because == "hand-over")
        retries = self.retries + (because == "lost run")
        self.outcome = self.reported = None
        self.started_at, self.start_heard = None, False
        self.seen_outputs = None
        self._progress = None
        return self.move(
            JobState.WAITING, prompt_id=str(uuid.uuid4()), backend=None, attempts=attempts, retries=retries
        )

    @property
    def recorded(self) -> bool:
        """Its accept is durable: the journal gave it its place in acceptance order (from 1)."""
        return self.seq > 0

    def record(self) -> dict[str, Any]:
        """Everything needed to resume the job, as the journal keeps it (seq is given by the journal)."""
        return {
            "id": self.id,
            "client_id": self.client_id,
            "workflow": self.workflow,
            "prompt": self.prompt,
            "uploads": self.uploads,
            "prompt_id": self.prompt_id,
            "state": self.state.value,
            "backend": self.backend,
            "error": self.error,
            "attempts": self.attempts,
            "retries": self.retries,
            "accepted_at": self.accepted_at,
            "webhook": self.webhook,
        }


_RECORDED_CHANGES = {"backend", "prompt_id", "error", "results", "attempts", "retries"}
