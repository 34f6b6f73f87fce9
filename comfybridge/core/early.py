"""Output files fetched as soon as ComfyUI announces them (`executed`), while the prompt goes on.

A prompt's last node is often its output node: by the time ComfyUI says the prompt is over, its
files have long been written. Fetching each one as its node reports it takes the download off the
path between the prompt's end and the client's `closed`. Files up to `EARLY_FILE_MAX` are fetched
early, into memory, `EARLY_BUDGET` in all: each counts a small file's worth as it starts, its real
size once ComfyUI says it (a file the budget cannot take then is left). They are stored when the
prompt has ended well (small ones inline, the others as blobs, as a download would be), and only
if the outputs it ended with are exactly those announced. Anything else (a larger file, a failed
fetch, outputs that changed) is downloaded when the prompt ends, as always.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..comfy.client import ComfyClient
from ..comfy.shapes import OutputRef
from ..store.files import SMALL_FILE

__all__ = ["EARLY_BUDGET", "EARLY_FILE_MAX", "EarlyFetches", "Fetch"]

log = logging.getLogger(__name__)

EARLY_BUDGET = 64 * 1024 * 1024  # bytes early fetches may hold in all (each counts its share until dropped)
EARLY_FILE_MAX = 8 * 1024 * 1024  # the largest file fetched early: a big image, not a video


@dataclass
class Fetch:
    ref: OutputRef
    task: asyncio.Task[bytes | None] | None  # None: not fetched early (over the budget)
    reserved: int = 0  # bytes of the budget it holds until it is dropped


Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any] | None"]


class OverBudget(Exception):
    """A file the early fetches' budget cannot take now: it is downloaded when the prompt ends."""


class _Held:
    """A download's bytes, in memory (a `Sink`). It starts counting a small file's worth of the
    budget; a larger file counts its size (or its limit, unsaid) once the download reserves it."""

    def __init__(self, early: EarlyFetches, fetch: Fetch, limit: int) -> None:
        self.early = early
        self.fetch = fetch
        self.limit = limit
        self.data = bytearray()

    async def reserve(self, size: int | None) -> None:
        want = self.limit if size is None else size  # (never more: the download refuses a larger file first)
        if self.early.held + want - self.fetch.reserved > EARLY_BUDGET:
            raise OverBudget(f"{self.fetch.ref.filename}: {want} bytes, more than early fetches may hold now")
        self.early.count(self.fetch, want)

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


class EarlyFetches:
    def __init__(self, spawn: Spawn) -> None:
        self.spawn = spawn
        self.held = 0  # bytes of the budget taken by fetches not yet dropped
        self._by_prompt: dict[str, list[Fetch]] = {}

    def start(self, client: ComfyClient, prompt_id: str, refs: list[OutputRef], limit: int) -> None:
        """Fetch these files of the prompt now (those of one `executed` event), each if it is at most
        `limit` bytes and the budget can take it."""
        fetches = self._by_prompt.setdefault(prompt_id, [])
        for ref in refs:
            fetch = Fetch(ref, None)
            first = min(limit, SMALL_FILE)  # a file up to this is read whole, without a reserve
            if 0 < first <= EARLY_BUDGET - self.held:
                fetch.task = self.spawn(self._fetch(client, fetch, limit), f"early fetch {ref.filename}")
                if fetch.task is not None:
                    self.count(fetch, first)
            fetches.append(fetch)

    def count(self, fetch: Fetch, size: int) -> None:
        """What `fetch` holds of the budget from now on."""
        self.held += size - fetch.reserved
        fetch.reserved = size

    async def _fetch(self, client: ComfyClient, fetch: Fetch, limit: int) -> bytes | None:
        held = _Held(self, fetch, limit)
        try:
            await client.download(fetch.ref, held, limit)
        except Exception as exc:  # too large to hold, or not given now: fetched when the prompt ends
            log.debug("%s not fetched early: %s", fetch.ref.filename, exc)
            self.count(fetch, 0)
            return None
        self.count(fetch, len(held.data))
        return bytes(held.data)

    def take(self, prompt_id: str) -> list[Fetch]:
        """The prompt's fetches, for its collection (which must `drop` them once done)."""
        return self._by_prompt.pop(prompt_id, [])

    def forget(self, prompt_id: str) -> None:
        """The prompt left its backend without being collected: its fetches are of no use."""
        self.drop(self.take(prompt_id))

    def drop(self, fetches: list[Fetch]) -> None:
        """Stop what still runs and give the budget back (once: the list is emptied)."""
        for fetch in fetches:
            if fetch.task is not None and not fetch.task.done():
                fetch.task.cancel()
            self.held -= fetch.reserved
        fetches.clear()

    @staticmethod
    async def results_for(fetches: list[Fetch], refs: list[OutputRef]) -> list[bytes | None]:
        """Each of the prompt's final outputs' bytes if it was fetched early (None: download it). Used
        only when the outputs are exactly those announced, in the same order (a node that ran twice
        may have replaced its files)."""
        if [fetch.ref for fetch in fetches] != refs:
            return [None] * len(refs)
        return [await fetch.task if fetch.task is not None else None for fetch in fetches]
