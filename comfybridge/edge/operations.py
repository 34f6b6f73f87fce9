"""The routes for operators and browsers: health, readiness, Prometheus metrics, the docs page, the playground."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import Forbidden, Unauthorized
from . import openapi
from .access import KEY
from .appkeys import CLUSTER, SCHEDULER, SETTINGS
from .metrics import METRICS
from .replies import json_response

__all__ = ["docs", "health", "metrics", "playground", "playground_file", "ready"]


def schedule_report(app: web.Application) -> dict[str, Any]:
    """The scheduler's report. A bridge of a cluster that does not lead has no schedule of its own
    to report (its scheduler is idle, or still holds a past term's figures): it says whose it is."""
    view = app.get(CLUSTER)
    if view is not None and not view.leading:
        return {"backends": [], "schedule": "kept by the leading bridge: see its /health"}
    return app[SCHEDULER].health()


def _health_report(request: web.Request) -> dict[str, Any]:
    """The schedule's report; with API keys on, a caller without one sees no backend addresses."""
    report = schedule_report(request.app)
    view = request.app.get(CLUSTER)
    if view is not None:
        report["cluster"] = view.report()
    settings = request.app[SETTINGS]
    if settings.keys_on and request.get(KEY) is None:
        report["backends"] = [{"state": b["state"]} for b in report["backends"]]
        if "journal" in report:
            report["journal"] = "ok" if report["journal"] == "ok" else "failing"  # not where it is
        if "cluster" in report:
            report["cluster"] = {"role": report["cluster"]["role"]}  # nor where the other bridges are
    return report


async def health(request: web.Request) -> web.Response:
    """The process serves: always 200 while it does, with what it knows of its backends."""
    return json_response({"status": "ok", **_health_report(request)})


async def ready(request: web.Request) -> web.Response:
    """Whether to send work here: 503 with the reason when no backend is usable, the queue is too
    deep, or the bridge is stopping."""
    report = _health_report(request)
    limit = request.app[SETTINGS].ready_max_queue
    view = request.app.get(CLUSTER)
    if view is not None and not view.leading:  # it relays: ready while a leader is known to relay to
        if view.role == "follower" and view.leader_url not in (None, view.own_url):
            return json_response({"status": "ready", **report})
        reason = "the bridge is stopping" if view.role == "stepping down" else "no bridge of the cluster leads"
        return json_response({"status": "not ready", "detail": reason, **report}, 503)
    if report["stopping"]:
        reason = "the bridge is stopping"
    elif report["journal"] != "ok":
        reason = f"the job journal {report['journal']}"
    elif not report["usable_backends"]:
        reason = "no ComfyUI backend is usable"
    elif limit and report["queued"] > limit:
        reason = f"{report['queued']} jobs wait, more than ready_max_queue ({limit})"
    else:
        return json_response({"status": "ready", **report})
    return json_response({"status": "not ready", "detail": reason, **report}, 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition. With `metrics_key` set, only for `Authorization: Bearer <metrics_key>`;
    else, with API keys on, for a valid key that may use every workflow (the figures name them all);
    else open."""
    settings = request.app[SETTINGS]
    key = request.get(KEY)
    if settings.metrics_key:
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), settings.metrics_key.encode()):
            raise Unauthorized("GET /metrics needs `Authorization: Bearer <metrics_key>`.")
    elif settings.keys_on and key is None:
        raise Unauthorized("GET /metrics needs a valid API key.")
    elif key is not None and key.workflows is not None:
        raise Forbidden("GET /metrics names every workflow: it needs a key not limited to some, or the metrics_key.")
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


PLAYGROUND_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css"}
# The playground's few small files, read once: they ship with the bridge. Served from memory, whole
# (a Range is ignored, as RFC 9110 allows: aiohttp's file answer made a malformed one an empty 416).
PLAYGROUND = {
    path.name: (path.read_bytes(), PLAYGROUND_TYPES[path.suffix])
    for path in (Path(__file__).parent / "playground").iterdir()
    if path.suffix in PLAYGROUND_TYPES
}


# The pages run only their own files (the docs page: its one inline script and style, by hash) and
# talk only to this bridge: text a hostile caller slipped into one could run nothing, nor be framed.
PAGE_GUARDS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
PLAYGROUND_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_POLICY = (
    f"default-src 'none'; script-src {openapi.DOCS_HASHES['script']}; style-src {openapi.DOCS_HASHES['style']}; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def _playground_file(name: str) -> web.Response:
    if name not in PLAYGROUND:
        raise web.HTTPNotFound()
    body, content_type = PLAYGROUND[name]
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": PLAYGROUND_POLICY, **PAGE_GUARDS}
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)


def _unslashed(request: web.Request, page: str) -> None:
    """A page's links are relative to /page, not /page/: from there it moves to /page, its query kept
    (the docs page reads its `token` from it)."""
    if request.path.endswith("/"):
        query = request.rel_url.raw_query_string
        raise web.HTTPMovedPermanently(f"../{page}" + (f"?{query}" if query else ""))


async def playground(request: web.Request) -> web.StreamResponse:
    _unslashed(request, "playground")
    return _playground_file("index.html")


async def playground_file(request: web.Request) -> web.StreamResponse:
    """One of the playground's own files; any other name is a 404 with `{"detail"}`."""
    name = request.match_info["name"]
    if name == "index.html":  # the page itself, at the address its relative links are made for
        raise web.HTTPMovedPermanently("../playground")
    return _playground_file(name)


async def docs(request: web.Request) -> web.Response:
    _unslashed(request, "docs")
    headers = {"Content-Security-Policy": DOCS_POLICY, **PAGE_GUARDS}
    return web.Response(text=openapi.DOCS_PAGE, content_type="text/html", headers=headers)
