"""The bridge's queue of waiting jobs: each client's jobs in order, clients served round-robin."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from .jobs import Job

__all__ = ["FairQueue"]


class FairQueue:
    """One client with a thousand jobs waits its turn like everyone else: the order of service takes
    one job from each client in rotation, and a client that was just served goes to the back."""

    def __init__(self) -> None:
        self._clients: OrderedDict[str, deque[Job]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, job: Job) -> bool:
        return job in self._clients.get(job.client_id, ())

    def push(self, job: Job) -> None:
        """Append in acceptance order (concurrent submits may arrive slightly out of order)."""
        jobs = self._clients.setdefault(job.client_id, deque())
        index = len(jobs)
        while index > 0 and jobs[index - 1].seq > job.seq:
            index -= 1
        jobs.insert(index, job)
        self._size += 1

    def push_front(self, job: Job) -> None:
        """A job that must be sent again goes first: first of its client, its client first in turn."""
        self._clients.setdefault(job.client_id, deque()).appendleft(job)
        self._clients.move_to_end(job.client_id, last=False)
        self._size += 1

    def remove(self, job: Job) -> bool:
        jobs = self._clients.get(job.client_id)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        self._size -= 1
        if not jobs:
            del self._clients[job.client_id]
        return True

    def take(self, job: Job) -> None:
        """Remove a job that is being served; its client goes to the back of the rotation."""
        if self.remove(job) and job.client_id in self._clients:
            self._clients.move_to_end(job.client_id)

    def order(self) -> Iterator[Job]:
        """Every waiting job in the order they will be served."""
        queues = [list(jobs) for jobs in self._clients.values()]
        depth = 0
        while queues:
            for jobs in queues:
                if depth < len(jobs):
                    yield jobs[depth]
            depth += 1
            queues = [jobs for jobs in queues if depth < len(jobs)]
