"""What the core tells whoever counts its work (the edge's Prometheus metrics), without knowing who."""

from __future__ import annotations

from typing import Protocol

__all__ = ["JobObserver", "NullObserver"]


class JobObserver(Protocol):
    def job_accepted(self, workflow: str) -> None: ...

    def job_started(self, workflow: str, backend: str, waited: float | None, handed_over: float | None) -> None: ...

    def job_finished(self, workflow: str, backend: str, ran: float) -> None: ...

    def job_ended(self, workflow: str, outcome: str) -> None: ...


class NullObserver:
    """Counts nothing: a core without metrics (tests, tools)."""

    def job_accepted(self, workflow: str) -> None:
        pass

    def job_started(self, workflow: str, backend: str, waited: float | None, handed_over: float | None) -> None:
        pass

    def job_finished(self, workflow: str, backend: str, ran: float) -> None:
        pass

    def job_ended(self, workflow: str, outcome: str) -> None:
        pass
