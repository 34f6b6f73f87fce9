"""One ComfyUI backend as the scheduler sees it: health, the prompts it holds, and how busy it is."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

from ..comfy.client import ComfyClient
from .jobs import Job
from .planner import Lane, RunTimes

__all__ = ["Backend"]


@dataclass
class Backend:
    client: ComfyClient
    inflight: list[Job] = field(default_factory=list)  # sent to ComfyUI, oldest (running) first
    healthy: bool = False  # its event socket is open
    draining: bool = False  # removed from the config: finishes what it has, takes nothing new
    sick_until: float = 0.0  # after repeated refusals of POST /prompt: no new work until then
    stuck_prompt: str | None = None  # the prompt ComfyUI runs without a sign of progress: no work until it moves
    checking: bool = False  # the watchdog is asking its /queue
    stalled_since: float | None = None  # when its /queue was first seen with prompts waiting and none running
    # Back from a stall with nothing to show that its queue moves: seconds added to its lane, and one
    # prompt at a time there, until a prompt starts (a dead worker takes one job, not all, each time).
    doubt: float = 0.0
    submit_failures: int = 0
    queue_remaining: int = 0  # ComfyUI's own count, including prompts of other users
    statuses: int = 0  # `status` words heard from it: which of them came after a prompt was queued
    last_workflow: str | None = None  # what it ran last, so its models are likely loaded
    delivered: list[str] = field(default_factory=list)  # prompt ids to delete from its history, together
    abandoned: set[str] = field(default_factory=set)  # prompt ids moved elsewhere, to remove when it is back
    retaking: bool = False  # an abandoned prompt showed up running: a take-back of it is under way
    # Jobs handed over as they were accepted, with their prompt ids: its worker sends them first.
    at_once: collections.deque[tuple[Job, str]] = field(default_factory=collections.deque)
    down_since: float | None = None
    idle_since: float | None = field(default_factory=time.monotonic)
    freed_while_idle: bool = False
    jobs_since_free: int = 0
    object_info_loaded: bool = False
    first_attempt: asyncio.Event = field(default_factory=asyncio.Event)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    listener: asyncio.Task[None] | None = None  # holds the event socket
    worker: asyncio.Task[None] | None = None  # sends the prompts

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def usable(self) -> bool:
        return self.healthy and not self.draining and self.stuck_prompt is None and time.monotonic() >= self.sick_until

    @property
    def state(self) -> str:
        """What /health and /metrics say of it."""
        if self.draining:
            return "draining"
        if not self.healthy:
            return "down"
        if self.stuck_prompt is not None:
            return "stuck"  # its web server answers, but the prompt it runs shows no progress
        return "up" if self.usable else "resting"  # resting: it refused prompts lately

    def lane(self, runtimes: RunTimes) -> Lane:
        """When this backend could start one more job: the rest of its work, ours and other users'."""
        now = time.monotonic()
        busy = self.doubt
        for job in self.inflight:
            estimate = runtimes.estimate(job.workflow, self.name, job.warm)
            busy += max(0.0, estimate - (now - job.started_at)) if job.started_at is not None else estimate
        others = max(0, self.queue_remaining - len(self.inflight))
        busy += others * runtimes.typical(self.name)
        return Lane(self.name, busy, self.last_workflow)
