"""The application factory: settings in, a ready aiohttp Application out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import fields

import aiohttp
from aiohttp import web

from .config import Settings
from .emulator import Emulator
from .keys import BACKEND_URLS, HUB, RESULTS, SCHEDULER, SESSION, SETTINGS, STATE, UPLOADS, WORKFLOWS
from .results import ResultStore
from .routes import error_middleware, setup_routes
from .scheduler import Scheduler, SchedulerSettings
from .state import StateStore
from .uploads import UploadLimits, UploadStore
from .workflows import WorkflowStore
from .ws import SocketHub, heartbeat

log = logging.getLogger(__name__)
MB = 1024 * 1024


def create_app(settings: Settings) -> web.Application:
    """Load what must be valid before serving (workflows, state); start the rest with the app.

    Raises WorkflowConfigError or StateError for a folder or state file it cannot use.
    """
    workflows = WorkflowStore.load(settings.workflows)
    state = StateStore.load(settings.state_file)
    app = web.Application(middlewares=[error_middleware], client_max_size=int(settings.max_request_mb * MB))
    app[SETTINGS] = settings
    app[WORKFLOWS] = workflows
    app[STATE] = state
    app[UPLOADS] = UploadStore(
        settings.data_dir / "uploads",
        UploadLimits(
            max_file_bytes=int(settings.max_upload_mb * MB),
            max_request_bytes=int(settings.max_request_mb * MB),
            max_files=settings.max_upload_files,
            allowed_kinds=settings.allowed_media,
        ),
    )
    app[RESULTS] = ResultStore(settings.data_dir / "results")
    app[HUB] = SocketHub()
    app[BACKEND_URLS] = list(settings.backends)
    app.cleanup_ctx.extend([_stores, _emulators, _http_session, _scheduler, heartbeat])
    app.on_shutdown.append(_close_sockets)
    setup_routes(app)
    return app


async def _stores(app: web.Application) -> AsyncIterator[None]:
    app[UPLOADS].load()
    app[RESULTS].load()
    yield


async def _emulators(app: web.Application) -> AsyncIterator[None]:
    """With --emulate N: N built-in ComfyUI emulators on free loopback ports become the backends."""
    settings = app[SETTINGS]
    emulators = [Emulator(pace=settings.emulator_pace) for _ in range(settings.emulate)]
    for emulator in emulators:
        await emulator.start()
        log.info("started ComfyUI emulator at %s", emulator.url)
    if emulators:
        app[BACKEND_URLS][:] = [e.url for e in emulators]
    yield
    for emulator in emulators:
        await emulator.stop()


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SESSION] = session
        yield


async def _scheduler(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # The scheduler's settings are the same-named subset of the bridge's.
    own = SchedulerSettings(**{f.name: getattr(settings, f.name) for f in fields(SchedulerSettings)})
    scheduler = Scheduler(
        own,
        app[BACKEND_URLS],
        app[SESSION],
        app[WORKFLOWS],
        app[UPLOADS],
        app[RESULTS],
        app[STATE],
        app[HUB],
    )
    app[SCHEDULER] = scheduler
    await scheduler.start()
    yield
    await scheduler.close()


async def _close_sockets(app: web.Application) -> None:
    await app[HUB].close_all()
