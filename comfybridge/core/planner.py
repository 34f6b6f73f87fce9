"""Where a job should run: learned run times per workflow and backend, and earliest-finish placement."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson

__all__ = ["PLAN_HORIZON", "Lane", "RunTimes", "plan_for"]

PLAN_HORIZON = 1000  # waiting jobs looked at per decision: enough to see past any realistic head of line


class RunTimes:
    """An exponentially weighted mean of each workflow's run time on each backend, learned from real runs,
    kept apart for warm runs (the backend ran the same workflow just before: models loaded, nodes
    cached) and cold ones, so the cost of switching models is learned rather than guessed.

    An unseen case borrows what is known: the other warmth on the same backend, else the workflow's
    time elsewhere scaled by how fast this backend is relative to the others, else the typical time
    of any job anywhere scaled the same way, else the prior. A backend with no history counts as
    average (factor 1), never as slow: so no backend is starved because it has not run yet.
    """

    def __init__(self, prior: float = 5.0, alpha: float = 0.3) -> None:
        self.prior = prior
        self.alpha = alpha
        self._mean: dict[tuple[str, str, bool], float] = {}
        self.changes = 0  # observations so far: a keeper saves the table when this moved

    def observe(self, workflow: str, backend: str, seconds: float, warm: bool = False) -> None:
        key = (workflow, backend, warm)
        old = self._mean.get(key)
        self._mean[key] = seconds if old is None else old + self.alpha * (seconds - old)
        self.changes += 1

    def dumps(self) -> str:
        """What was learned, as JSON text: [[workflow, backend, warm, seconds], ...]."""
        return orjson.dumps([[w, b, h, v] for (w, b, h), v in self._mean.items()]).decode()

    def restore(self, text: str) -> int:
        """Take back what `dumps` gave (a restart, or a new leader, places well from its first job);
        entries of any other shape are skipped, never trusted. Returns how many were taken."""
        try:
            entries = orjson.loads(text) if text else []
        except orjson.JSONDecodeError:
            return 0
        taken = 0
        for entry in entries if isinstance(entries, list) else []:
            match entry:
                case [str(workflow), str(backend), bool(warm), int(seconds) | float(seconds)] if 0 < seconds < 1e7:
                    self._mean.setdefault((workflow, backend, warm), float(seconds))
                    taken += 1
        return taken

    def estimate(self, workflow: str, backend: str, warm: bool = False) -> float:
        for key in ((workflow, backend, warm), (workflow, backend, not warm)):
            known = self._mean.get(key)
            if known is not None:
                return known
        elsewhere = [v for (w, b, _), v in self._mean.items() if w == workflow and b != backend]
        if elsewhere:
            return statistics.fmean(elsewhere) * self.speed_factor(backend)
        typical = statistics.fmean(self._mean.values()) if self._mean else self.prior
        return typical * self.speed_factor(backend)

    def known(self, workflow: str, backend: str) -> float | None:
        """What this workflow was seen to take on this backend (either warmth), or None: no guess."""
        for warm in (False, True):
            seen = self._mean.get((workflow, backend, warm))
            if seen is not None:
                return seen
        return None

    def speed_factor(self, backend: str) -> float:
        """How much longer this backend takes than the others on the workflows both have run (1.0 unknown)."""
        ratios = []
        for (workflow, name, warm), mine in self._mean.items():
            if name != backend:
                continue
            others = [v for (w, b, h), v in self._mean.items() if w == workflow and b != backend and h == warm]
            if others:
                ratios.append(mine / statistics.fmean(others))
        return statistics.geometric_mean(ratios) if ratios else 1.0

    def typical(self, backend: str) -> float:
        own = [v for (_, b, _), v in self._mean.items() if b == backend]
        return statistics.fmean(own) if own else self.prior


@dataclass
class Lane:
    """A backend as the planner sees it: when it could start a new job and what it ran last."""

    name: str
    free_in: float  # seconds until the work already on it is done
    last_workflow: str | None


def plan_for(
    backend: str,
    waiting: Iterable[tuple[str, str, str | None]],
    lanes: list[Lane],
    estimate: Callable[[str, str, bool], float],
    warm_slack: float,
) -> int | None:
    """Index of the first waiting job that earliest-finish list scheduling gives to `backend`, or None.

    `waiting` yields (job key, workflow, preferred backend or None) in the order jobs are served. Each
    job goes where it would finish first by the learned estimates (which already know warm runs apart
    from cold ones). The backend its client's work is on (uploads there, caches warm) is preferred,
    and so is one that last ran the same workflow, but only while it finishes within `warm_slack` (a
    fraction of the job's own length) of the best: affinity never leaves a GPU idle while a job it
    would finish sooner waits. Ties go to the backend that is free sooner, never to whichever worker
    asked. A backend whose turn never comes stays idle: the others finish sooner.
    """
    free = {lane.name: lane.free_in for lane in lanes}
    last = {lane.name: lane.last_workflow for lane in lanes}
    if backend not in free:
        return None
    for index, (_, workflow, preferred) in enumerate(waiting):
        if index >= PLAN_HORIZON:
            return None
        cost = {name: estimate(workflow, name, last[name] == workflow) for name in free}
        finish = {name: free[name] + cost[name] for name in free}
        target = min(finish, key=lambda name: (finish[name], free[name], name))
        slack = warm_slack * cost[target]
        if preferred in finish and finish[preferred] <= finish[target] + slack:
            target = preferred
        else:
            warm = [n for n in free if last[n] == workflow and finish[n] <= finish[target] + slack]
            if warm and last[target] != workflow:
                target = min(warm, key=lambda name: (finish[name], free[name], name))
        if target == backend:
            return index
        free[target] += cost[target]
        last[target] = workflow
    return None
