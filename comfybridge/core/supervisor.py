"""The one owner of the core's tasks and timers: nothing runs that it does not hold, nothing starts once
it closes, and closing drains the short work before it cancels the rest."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)


class SupervisorClosed(RuntimeError):
    """Work was offered after the supervisor stopped accepting it."""


class Supervisor:
    """Holds every task (reaped and its failure logged when it ends) and every timer of its owner.

    A task is either work (a collection, a cancel, a write: drained at close, within a timeout) or a
    daemon (a loop that never ends by itself: a listener, the watchdog: cancelled at close). Once
    `stop_accepting()` is called, `spawn` refuses new work; `wait_and_close(within)` waits for the
    work, then cancels whatever is left, daemons and timers included."""

    def __init__(self) -> None:
        self._work: set[asyncio.Task[Any]] = set()
        self._daemons: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._accepting = True
        self._closed = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def work(self) -> int:
        """Tasks of work still running (not daemons)."""
        return len(self._work)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, daemon: bool = False) -> asyncio.Task[Any]:
        """Run `coro` as a task held here; SupervisorClosed (and the coroutine closed) once not accepting."""
        if not self._accepting:
            coro.close()
            raise SupervisorClosed(f"not accepting new work ({name})")
        task = asyncio.create_task(coro, name=name)
        held = self._daemons if daemon else self._work
        held.add(task)
        task.add_done_callback(lambda done: self._reap(done, held))
        return task

    def call_later(self, delay: float, callback: Callable[[], object]) -> None:
        """A timer held here: cancelled at close if it has not fired."""
        if not self._accepting:
            return
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            callback()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_and_close(self, within: float) -> None:
        """Refuse new work, let the running work end (up to `within` seconds), then cancel every task left."""
        self._accepting = False
        if self._work:
            await asyncio.wait(list(self._work), timeout=within)
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        left = list(self._work | self._daemons)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)  # each one's failure is logged by _reap
        self._closed = True

    @staticmethod
    def _reap(task: asyncio.Task[Any], held: set[asyncio.Task[Any]]) -> None:
        held.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())
