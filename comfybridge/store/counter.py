"""The state file, `current_state.json`: the generation counter, written atomically, and durable writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import orjson

from .files import atomic_write

__all__ = ["StateError", "StateStore"]

log = logging.getLogger(__name__)

WRITE_INTERVAL = 1.0  # seconds between writes of the file under steady load


class StateError(Exception):
    """The state file exists but cannot be trusted; start-up stops rather than reset the counter."""


class StateStore:
    """`current_state.json`: the generation counter as a plain file an operator can read or back up.

    The journal is the source of truth; this file follows it (written after the journal commits) and
    at start-up the larger of the two counts wins, so neither can lose the other's increments.
    Writes run in a thread and coalesce: callers that arrive while a write is under way are all
    covered by the next single write, and writes come at most every WRITE_INTERVAL seconds (the
    journal already holds every increment durably; this file only mirrors it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.generation_count = 0
        self._changes = 0
        self._saved = 0
        self._lock = asyncio.Lock()
        self._last_write = -WRITE_INTERVAL

    @classmethod
    def load(cls, path: Path) -> StateStore:
        store = cls(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # a write that a crash cut short; the real file is intact
        if not path.exists():
            return store
        try:
            data = orjson.loads(path.read_bytes())
            count = data["generation_count"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError("generation_count must be a whole number >= 0")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"state file {path} is unreadable or corrupt ({exc}); restore it from a backup or fix it by hand "
                "(the generation counter is never reset silently)"
            ) from None
        store.generation_count = count
        return store

    async def save(self, promptly: bool = False) -> None:
        """Return once a write that includes every change made before this call is on disk."""
        self._changes += 1
        wanted = self._changes
        loop = asyncio.get_running_loop()
        if not promptly and (delay := self._last_write + WRITE_INTERVAL - loop.time()) > 0:
            await asyncio.sleep(delay)  # callers meanwhile join the same write
        async with self._lock:
            if self._saved >= wanted:
                return
            version = self._changes
            # One snapshot per write, however many callers it covers.
            data = orjson.dumps({"generation_count": self.generation_count})
            write = asyncio.ensure_future(asyncio.to_thread(atomic_write, self.path, data))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # Hold the lock until the file is written: an older snapshot must never land last.
                with contextlib.suppress(OSError):
                    await write
                raise
            except OSError as exc:  # the journal holds every count; this file catches up at the next write
                log.warning("state file %s not written: %s", self.path, exc.strerror)
                self._last_write = loop.time()
                return
            self._saved = version
            self._last_write = loop.time()
