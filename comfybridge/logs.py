"""Logging: text or JSON lines, an access log line per request, and quiet treatment of client faults."""

from __future__ import annotations

import asyncio
import datetime
import logging
import sys
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from .access import CALLER, unscoped
from .metrics import METRICS

access_log = logging.getLogger("comfybridge.access")
CLIENT_CLOSED = 499  # nginx's code for a request whose client hung up first
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields` (a job's id,
    backend and durations; a request's route, status and duration) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(quiet_bad_requests)


def quiet_bad_requests(record: logging.LogRecord) -> bool:
    """Garbage that aiohttp's parser refuses (a bad method, a line over 8190 bytes) is the client's
    fault: one line at INFO, not a traceback at ERROR."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, RequestPayloadError) and isinstance(error.__cause__, BadHttpMessage):
        error = error.__cause__
    if isinstance(error, BadHttpMessage):
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args, record.exc_info = "refused a malformed request: %s", (error.message,), None
    return True


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Times each request once, for its latency metric and its access log line (method, route,
    status, duration, clientId, caller). Outermost, so it sees every refusal too; a WebSocket is
    seen when it closes."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # a redirect, passed through the error middleware as aiohttp raises it
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # the client went away before its answer
        raise
    finally:
        seconds = time.perf_counter() - started
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"  # a pattern: no clientIds
        request.app[METRICS].request_done(route, request.method, status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            client_id = request.query.get("clientId")
            fields = {
                "method": request.method,
                "route": route if resource is not None else request.path,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "client_id": unscoped(client_id) if client_id else None,
                "caller": request.get(CALLER, request.remote),
            }
            access_log.info(
                "%s %s %d %.1fms client=%s from %s", request.method, fields["route"], status,
                fields["duration_ms"], fields["client_id"] or "-", fields["caller"], extra={"fields": fields},
            )  # fmt: skip
