"""How the edge answers: JSON bodies, and the middleware that turns every error into `{"detail": ...}`."""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from ..core.clients import SCOPE
from ..errors import BridgeError, Relayed, Unauthorized
from .access import KEY

CLIENT_CLOSED = 499  # nginx's code for a request whose client hung up first

__all__ = ["error_middleware", "error_response", "json_response", "quoted_header_text"]

log = logging.getLogger(__name__)

HEADER_SAFE = " !\"#$&'()*+,-./:;<=>?@[]^_`{|}~"  # printable ASCII but %: kept as is in X-Detail
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def quoted_header_text(text: str) -> str:
    """Text for a quoted header parameter (a part's `filename`): backslash and quote escaped as
    quoted-string does it, every control character (CR, LF, NUL, ESC, DEL, ...) percent-encoded, so
    no name ComfyUI makes can end the header or add one."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return _CONTROL.sub(lambda found: f"%{ord(found.group()):02X}", escaped)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, detail: str) -> web.Response:
    return json_response({"detail": detail}, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as `{"detail": ...}` with the right status; never an HTML page. One after
    the answer began cuts the connection instead: a new answer would land inside the body, and a
    body cut short could pass for whole (a result file lost mid-download)."""
    try:
        return await handler(request)
    except Exception as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise  # a redirect, not an error
        if request.writer is None or request.writer.output_size == 0:
            return _detailed(request, exc)
        if isinstance(exc, ConnectionError):  # the client went away mid-download: a normal event
            log.info("%s %s: the client went away (%s)", request.method, request.path, exc)
            status = CLIENT_CLOSED
        else:
            log.warning("%s %s: cut off after its answer began: %s: %s", request.method, request.path,
                        exc.__class__.__name__, exc, exc_info=not isinstance(exc, BridgeError))  # fmt: skip
            status = exc.status if isinstance(exc, BridgeError) else 500
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=status)  # written nowhere (the connection is closed): for the access log


def _detailed(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The error as `{"detail": ...}` with its status."""
    try:
        raise exc
    except BridgeError as exc:
        status = exc.status
        key = request.get(KEY)
        # The core names clients as it knows them, within their key; the caller knows them without.
        detail = exc.detail.replace(f"{key.name}{SCOPE}", "") if key is not None else exc.detail
        response = error_response(status, detail)
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            # A refused WebSocket handshake's body is not read by most WebSocket clients: say it here too.
            response.headers["X-Detail"] = urllib.parse.quote(detail, safe=HEADER_SAFE)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="comfybridge"'
        if isinstance(exc, Relayed):
            response.headers.update(exc.headers)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        path = request.path.encode("utf-8", "replace").decode()  # a path may not be valid UTF-8
        if exc.status == 404:
            detail = f"Not found: {path}"
        elif exc.status == 405:
            detail = f"Method {request.method} is not allowed for {path}"
        elif exc.status == 413:
            detail = "The request body is too large"
        else:
            detail = exc.text or exc.reason
        response = error_response(exc.status, detail)
        if hdrs.ALLOW in exc.headers:  # a 405 names the methods that are (RFC 9110 §15.5.6)
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        return response
    except RequestPayloadError as exc:  # a body aiohttp cannot decode (e.g. "gzip" that is not)
        cause = exc.__cause__ or exc.__context__
        reason = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
        return error_response(400, f"The request body could not be read: {reason.splitlines()[0] if reason else exc}")
    except ConnectionError as exc:
        # The client went away mid-request (an upload or a download cut off): a normal event, and
        # this answer reaches no one.
        log.info("%s %s: the client went away (%s)", request.method, request.path, exc)
        return error_response(400, "The connection was lost before the request was complete.")
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "Internal error in the bridge; it has been logged.")
