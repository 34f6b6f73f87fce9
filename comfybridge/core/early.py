"""Output files fetched as soon as ComfyUI announces them (`executed`), while the prompt goes on.

A prompt's last node is often its output node: by the time ComfyUI says the prompt is over, its
files have long been written. Fetching each one as its node reports it takes the download off the
path between the prompt's end and the client's `closed`. Only small files are fetched early, into
memory (at most `inline_max` each, `EARLY_BUDGET` in all, counted as each starts); they are stored when the prompt has
ended well, and only if the outputs it ended with are exactly those announced. Anything else (a
larger file, a failed fetch, outputs that changed) is downloaded when the prompt ends, as always.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..comfy.client import ComfyClient, ResultTooLarge
from ..comfy.shapes import OutputRef
from .jobs import job_folder

__all__ = ["EARLY_BUDGET", "EarlyFetches", "Fetch"]

log = logging.getLogger(__name__)

EARLY_BUDGET = 64 * 1024 * 1024  # bytes early fetches may hold in all (each counts its limit until dropped)


@dataclass
class Fetch:
    ref: OutputRef
    task: asyncio.Task[bytes | None] | None  # None: not fetched early (over the budget)
    reserved: int = 0  # bytes of the budget it holds until it is dropped


Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any] | None"]


class _Held:
    """A download's bytes, in memory (a `Sink`)."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def reserve(self, size: int | None) -> None:
        pass  # the download's own limit keeps it small

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


class EarlyFetches:
    def __init__(self, spawn: Spawn) -> None:
        self.spawn = spawn
        self.held = 0  # bytes of the budget taken by fetches not yet dropped
        self._by_prompt: dict[str, list[Fetch]] = {}

    def start(self, client: ComfyClient, job_id: str, prompt_id: str, refs: list[OutputRef], limit: int) -> None:
        """Fetch these files of the prompt now (those of one `executed` event), each if it is at most
        `limit` bytes and the budget has `limit` left for it (the job's own from ComfyUI's folder when
        this machine sees it)."""
        fetches = self._by_prompt.setdefault(prompt_id, [])
        for ref in refs:
            fetch = Fetch(ref, None)
            if 0 < limit <= EARLY_BUDGET - self.held:
                local = job_folder(job_id, ref) is not None
                fetch.task = self.spawn(self._fetch(client, ref, limit, local), f"early fetch {ref.filename}")
                fetch.reserved = limit if fetch.task is not None else 0
                self.held += fetch.reserved
            fetches.append(fetch)

    @staticmethod
    async def _fetch(client: ComfyClient, ref: OutputRef, limit: int, local: bool) -> bytes | None:
        held = _Held()
        try:
            await client.download(ref, held, limit, local)
        except Exception as exc:  # too large to hold, or not given now: fetched when the prompt ends
            why = f"over {limit} bytes, the most fetched early" if isinstance(exc, ResultTooLarge) else exc
            log.debug("%s not fetched early (%s): fetched when the prompt ends", ref.filename, why)
            return None
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
