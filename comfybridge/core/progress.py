"""A job's percent: executed nodes weighted by their work, sampler steps from `progress` events."""

from __future__ import annotations

from typing import Any

__all__ = ["Progress"]


class Progress:
    """Percent of a job: executed nodes weighted by their work, sampler steps from `progress` events.

    Cached nodes never run, so they leave the total; the percent never goes down and stays below
    100 until ComfyUI says the job succeeded.
    """

    def __init__(self, prompt: dict[str, Any]) -> None:
        self.weights = {node_id: _weight(node) for node_id, node in prompt.items()}
        self.finished: set[str] = set()
        self.current: str | None = None
        self.fraction = 0.0
        self.percent = 0.0

    def cached(self, nodes: list[str]) -> None:
        for node_id in nodes:
            self.weights.pop(node_id, None)

    def executing(self, node_id: str) -> None:
        if self.current is not None:
            self.finished.add(self.current)
        self.current, self.fraction = node_id, 0.0

    def step(self, node_id: str, value: float, maximum: float) -> None:
        if node_id != self.current:
            self.executing(node_id)
        self.fraction = min(1.0, value / maximum) if maximum > 0 else 0.0

    def node_finished(self, node_id: str) -> None:
        self.finished.add(node_id)
        if node_id == self.current:
            self.current, self.fraction = None, 0.0

    def update(self) -> float:
        total = sum(self.weights.values())
        if total <= 0:
            return self.percent
        done = float(sum(self.weights.get(n, 0) for n in self.finished))
        if self.current is not None and self.current not in self.finished:
            done += self.weights.get(self.current, 0) * self.fraction
        self.percent = max(self.percent, min(99.99, 100.0 * done / total))
        return self.percent

    def complete(self) -> float:
        self.percent = 100.0
        return self.percent


def _weight(node: dict[str, Any]) -> int:
    """A sampler's steps dominate a job's time; every other node counts once."""
    steps = (node.get("inputs") or {}).get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        return steps
    return 1
