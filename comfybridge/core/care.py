"""Resource care: between jobs, forget delivered prompts in ComfyUI and free its memory when a policy says so.

ComfyUI applies POST /free between prompts, never under a running one, so these are safe at any time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..comfy.client import BackendUnavailable
from .backend import Backend

__all__ = ["MB", "after_job", "forget_later", "free", "idle_free_due"]

if TYPE_CHECKING:
    from .shared import SchedulerSettings

log = logging.getLogger(__name__)
MB = 1024 * 1024
FORGET_DELAY = 0.25  # seconds delivered prompts wait, to be forgotten together in one request
Spawn = Callable[[Coroutine[Any, Any, None], str], object]


async def free(backend: Backend, why: str) -> bool:
    """POST /free on one backend; one that is down is skipped and named in the log. True if freed."""
    if not backend.healthy:
        log.warning("free: skipping %s, it is down", backend.name)
        return False
    try:
        await backend.client.free()
    except BackendUnavailable as exc:
        log.warning("free: %s failed: %s", backend.name, exc)
        return False
    backend.jobs_since_free = 0
    log.info("freed memory on %s (%s)", backend.name, why)
    return True


def forget_later(backend: Backend, prompt_id: str, spawn: Spawn) -> None:
    """Delete a delivered prompt from ComfyUI's history, together with the others of the next
    FORGET_DELAY seconds: one request for many jobs under load."""
    backend.delivered.append(prompt_id)
    if len(backend.delivered) == 1:
        spawn(_forget_delivered(backend), f"forget prompts on {backend.name}")


async def _forget_delivered(backend: Backend) -> None:
    await asyncio.sleep(FORGET_DELAY)
    prompt_ids, backend.delivered = backend.delivered, []
    try:
        await backend.client.delete_history(prompt_ids)
    except BackendUnavailable as exc:  # ComfyUI keeps a bounded history anyway
        log.debug("could not delete %d prompts from %s's history: %s", len(prompt_ids), backend.name, exc)


async def after_job(backend: Backend, prompt_id: str, settings: SchedulerSettings) -> None:
    try:
        backend.jobs_since_free += 1
        if settings.free_every_jobs and backend.jobs_since_free >= settings.free_every_jobs:
            await free(backend, f"every {settings.free_every_jobs} jobs")
        elif settings.free_below_vram_mb or settings.free_below_ram_mb:
            vram, ram = await backend.client.free_memory()
            low_vram = vram is not None and vram < settings.free_below_vram_mb * MB
            if low_vram or ram < settings.free_below_ram_mb * MB:
                await free(backend, "memory low")
    except BackendUnavailable as exc:
        log.debug("care after prompt %s on %s skipped: %s", prompt_id, backend.name, exc)


def idle_free_due(backend: Backend, now: float, idle_for: float) -> bool:
    """True once per idle spell, when a healthy backend has had nothing to do for `idle_for` seconds."""
    if not idle_for or backend.idle_since is None or backend.freed_while_idle or not backend.healthy:
        return False
    if now - backend.idle_since < idle_for:
        return False
    backend.freed_while_idle = True
    return True
