"""The bridge's queue of waiting jobs: each client's jobs in order, clients served round-robin."""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator

from .jobs import Job

__all__ = ["FairQueue"]

TURNS_KEPT = 4096  # clients whose last turn is remembered; one forgotten counts as never served


class FairQueue:
    """One client with a thousand jobs waits its turn like everyone else: the order of service takes
    one job from each client in rotation, clients served longest ago (or never) first. A turn is
    remembered beyond the client's waiting jobs: jobs handed to ComfyUI the moment they came (a deep
    pipeline takes several at once) are turns too, so that client does not keep the front."""

    def __init__(self) -> None:
        self._jobs: dict[str, deque[Job]] = {}
        # Clients with waiting jobs in order of service: (last turn, arrival, client id).
        self._line: list[tuple[int, int, str]] = []
        self._places: dict[str, tuple[int, int, str]] = {}
        self._turns: OrderedDict[str, int] = OrderedDict()  # client id -> its last turn, oldest first
        self._clock = itertools.count(1)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, job: Job) -> bool:
        return job in self._jobs.get(job.client_id, ())

    def push(self, job: Job) -> None:
        """Append in acceptance order (concurrent submits may arrive slightly out of order)."""
        jobs = self._jobs.get(job.client_id)
        if jobs is None:
            jobs = self._jobs[job.client_id] = deque()
            self._place(job.client_id, self._turns.get(job.client_id, 0))
        index = len(jobs)
        while index > 0 and jobs[index - 1].seq > job.seq:
            index -= 1
        jobs.insert(index, job)
        self._size += 1

    def push_front(self, job: Job) -> None:
        """A job that must be sent again goes first: first of its client, its client first in turn."""
        self._jobs.setdefault(job.client_id, deque()).appendleft(job)
        self._place(job.client_id, -next(self._clock))
        self._size += 1

    def remove(self, job: Job) -> bool:
        jobs = self._jobs.get(job.client_id)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        self._size -= 1
        if not jobs:
            del self._jobs[job.client_id]
            self._unplace(job.client_id)
        return True

    def take(self, job: Job) -> None:
        """Remove a job that is being served: its client's turn."""
        if self.remove(job):
            self.served(job.client_id)

    def served(self, client_id: str) -> None:
        """The client had a turn (a job taken from here, or handed to ComfyUI as it came): it goes
        behind every client served before."""
        turn = next(self._clock)
        self._turns[client_id] = turn
        self._turns.move_to_end(client_id)
        if len(self._turns) > TURNS_KEPT:
            self._turns.popitem(last=False)
        if client_id in self._places:
            self._place(client_id, turn)

    def order(self) -> Iterator[Job]:
        """Every waiting job in the order they will be served."""
        queues = [list(self._jobs[client_id]) for _, _, client_id in self._line]
        depth = 0
        while queues:
            for jobs in queues:
                if depth < len(jobs):
                    yield jobs[depth]
            depth += 1
            queues = [jobs for jobs in queues if depth < len(jobs)]

    def _place(self, client_id: str, turn: int) -> None:
        self._unplace(client_id)
        place = (turn, next(self._clock), client_id)
        bisect.insort(self._line, place)
        self._places[client_id] = place

    def _unplace(self, client_id: str) -> None:
        place = self._places.pop(client_id, None)
        if place is not None:
            del self._line[bisect.bisect_left(self._line, place)]
