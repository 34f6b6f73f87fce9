"""Typed application keys: every shared object of the app, declared in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ..config import Settings
from ..core.workflows import WorkflowStore
from ..store.counter import StateStore
from ..store.datadir import DataDirLock
from ..store.journal import JobStore
from ..store.results import ResultStore
from ..store.uploads import UploadStore

__all__ = [
    "ACCESS",
    "BACKEND_URLS",
    "CLUSTER",
    "DATA_LOCK",
    "HUB",
    "JOURNAL",
    "RELAY_SESSION",
    "RESULTS",
    "SCHEDULER",
    "SESSION",
    "SETTINGS",
    "STATE",
    "UPLOADS",
    "WORKFLOWS",
]

if TYPE_CHECKING:
    from ..core.scheduler import Scheduler
    from .access import AccessPolicy
    from .relay import ClusterView
    from .ws import SocketHub

SETTINGS = web.AppKey("settings", Settings)
DATA_LOCK = web.AppKey("data_lock", DataDirLock)
WORKFLOWS = web.AppKey("workflows", WorkflowStore)
STATE = web.AppKey("state", StateStore)
JOURNAL: web.AppKey[JobStore] = web.AppKey("journal")
UPLOADS = web.AppKey("uploads", UploadStore)
RESULTS = web.AppKey("results", ResultStore)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BACKEND_URLS = web.AppKey("backend_urls", list[str])
HUB: web.AppKey[SocketHub] = web.AppKey("hub")
ACCESS: web.AppKey[AccessPolicy] = web.AppKey("access")
SCHEDULER: web.AppKey[Scheduler] = web.AppKey("scheduler")
CLUSTER: web.AppKey[ClusterView] = web.AppKey("cluster")  # cluster mode only
RELAY_SESSION = web.AppKey("relay_session", aiohttp.ClientSession)  # cluster mode only
