"""Durable bridge state in one JSON file: the generation counter and the known clients."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)
_temp_names = itertools.count()


class StateError(Exception):
    """The state file exists but cannot be trusted; start-up stops rather than reset the counter."""


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    """Write so that a crash leaves either the old file or the new one: temp, flush, fsync, rename.

    Without `sync` the rename still protects against a killed process (the page cache survives it),
    not against a power cut; that is for data that is not the counter."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_temp_names)}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if sync:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class StateStore:
    """`current_state.json`: read once at start-up, written after every change that must survive a crash.

    Writes run in a thread and coalesce: callers that arrive while a write is under way are all
    covered by the next single write, so a burst of accepted jobs costs a few fsyncs, not one each.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.generation_count = 0
        self.clients: dict[str, dict[str, Any]] = {}  # as loaded; later writes ask `describe_clients`
        self.describe_clients: Callable[[], dict[str, dict[str, Any]]] = lambda: self.clients
        self._changes = 0
        self._saved = 0
        self._lock = asyncio.Lock()

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
            clients = data.get("clients", {})
            if not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(clients, dict):
                raise ValueError("generation_count must be a whole number >= 0 and clients an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"state file {path} is unreadable or corrupt ({exc}); restore it from a backup or fix it by hand "
                "(the generation counter is never reset silently)"
            ) from None
        store.generation_count = count
        store.clients = clients
        return store

    async def save(self) -> None:
        """Return once a write that includes every change made before this call is on disk."""
        self._changes += 1
        wanted = self._changes
        async with self._lock:
            if self._saved >= wanted:
                return
            version = self._changes
            # One snapshot per write, however many callers it covers.
            data = orjson.dumps({"generation_count": self.generation_count, "clients": self.describe_clients()})
            write = asyncio.ensure_future(asyncio.to_thread(atomic_write, self.path, data))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # Hold the lock until the file is written: an older snapshot must never land last.
                await write
                raise
            self._saved = version
