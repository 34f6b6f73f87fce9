"""Known clientIds: their sockets, active jobs, backend binding and latest status message.

Nothing here is written to disk: a client that owns something (a job, an upload, a result) is known
again after a restart from the journal and the upload folder; one that only opened a socket costs
nothing once it is gone."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, UnknownClient

__all__ = [
    "CLIENT_ID",
    "CLOSED",
    "CONNECTED",
    "LISTENING",
    "SCOPE",
    "Client",
    "ClientRegistry",
    "Status",
    "about_job",
    "check_client_id",
    "key_pool",
    "scope_of",
    "status_message",
    "unscoped",
]

if TYPE_CHECKING:
    from .jobs import Job

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
SCOPE = "~"  # joins an API key's name and a clientId; never in a clientId, so scoped ids cannot collide


def unscoped(client_id: str) -> str:
    """A (scoped) clientId as its app knows it, without its API key's name."""
    return client_id.rpartition(SCOPE)[2]


def scope_of(client_id: str) -> str | None:
    """The API key a (scoped) clientId belongs to, if keys are in use."""
    scope, sep, _ = client_id.rpartition(SCOPE)
    return scope if sep else None


def key_pool(scope: str | None) -> str | None:
    """Who owns an upload made without a clientId: nobody, so any client may use it; with API keys,
    the key's pool, so any client of that key may, and no other key's."""
    return None if scope is None else scope + SCOPE


Status = dict[str, Any]


def status_message(status: str, detail: str) -> Status:
    """The contract's status shape; `details` repeats `detail` for clients written either way."""
    return {"status": status, "detail": detail, "details": detail}


def about_job(message: Status, job_id: str, jobs_left: int) -> Status:
    """The additive keys: which job a status is about, and how many of the client's jobs are unfinished."""
    return {**message, "job_id": job_id, "jobs_left": jobs_left}


LISTENING = status_message("listening", "server is listening")
CONNECTED = status_message("connected", "server connected")
CLOSED = status_message("closed", "Execution is done")


def check_client_id(value: str | None) -> str:
    if value is None or value == "":
        raise BadInput("clientId is required: 1-128 characters of A-Z a-z 0-9 _ . : -")
    if not CLIENT_ID.fullmatch(value):
        raise BadInput(f"Invalid clientId {value[:140]!r}: use 1-128 characters of A-Z a-z 0-9 _ . : -")
    return value


@dataclass(slots=True)  # one per known clientId: 100,000 of them must stay small
class Client:
    id: str
    status: Status = field(default_factory=lambda: dict(LISTENING))
    sockets: int = 0
    jobs: dict[str, Job] = field(default_factory=dict)  # active jobs, in the order accepted
    backend: str | None = None  # bound while it has jobs
    last_backend: str | None = None
    touched: float = field(default_factory=time.time)
    untold: list[str] = field(default_factory=list)  # jobs whose ending the client has not heard yet
    held: list[tuple[Status, bool]] = field(default_factory=list)  # frames about later jobs, waiting

    @property
    def in_line(self) -> bool:
        """It has jobs unfinished, or endings not yet told: an `error` now closes no socket."""
        return bool(self.jobs or self.untold)

    @property
    def running(self) -> bool:
        """A job of this client is executing on a backend, or its ending is being recorded (it has left
        `jobs` but the client has not heard it yet): no `listening` heartbeat between 100% and `closed`."""
        return any(job.executing for job in self.jobs.values()) or any(j not in self.jobs for j in self.untold)

    def jobs_left(self, message: Status) -> int:
        """`jobs_left` of a status about a job, counted now: the jobs whose ending the client has still
        to hear once it hears this one (an ending counts itself out)."""
        ending = message["status"] in ("closed", "error") and message["job_id"] in self.untold
        return len(self.untold) - ending

    def being_accepted(self) -> int:
        """Its jobs whose accept is still being written: not the client's yet (the accept may fail),
        so no count of what is left to hear includes them."""
        return sum(1 for job in self.jobs.values() if not job.recorded)

    def status_now(self) -> Status:
        """What /execution-info answers: the latest status, its `jobs_left` counted now (as a frame's
        is counted when sent), so a job accepted since that status was made counts."""
        status = self.status
        if "job_id" not in status or "jobs_left" not in status:
            return status
        left = self.jobs_left(status) - self.being_accepted()
        return status if left == status["jobs_left"] else {**status, "jobs_left": left}


class ClientRegistry:
    """Every clientId the bridge knows, and the rule for when it forgets one."""

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[Client]:
        return iter(list(self._clients.values()))

    def get(self, client_id: str) -> Client | None:
        return self._clients.get(client_id)

    def require(self, client_id: str) -> Client:
        client = self._clients.get(client_id)
        if client is None:
            raise UnknownClient(f"Unknown clientId {client_id!r}: it has no socket, upload, job or result here.")
        return client

    def touch(self, client_id: str) -> Client:
        """The client, made known if it was not."""
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = Client(id=client_id)
        client.touched = time.time()
        return client

    def forget_if_done(self, client: Client, owns_something: Callable[[str], bool], stale: bool = False) -> bool:
        """Forget a client with no socket, no job, no ending still to be told (a job's end being
        recorded: its results are not yet among what it owns), nothing left to fetch, and no error
        of its last job to tell `/execution-info` (kept until the sweep finds the client `stale`)."""
        if client.sockets or client.jobs or client.untold or owns_something(client.id):
            return False
        if client.status.get("status") == "error" and not stale:
            return False
        self._clients.pop(client.id, None)
        return True
