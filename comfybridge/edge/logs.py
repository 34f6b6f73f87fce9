"""Logging: text or JSON lines, redacted, one record a line; an access log line per request; quiet client faults."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import orjson
from aiohttp import BadContentDispositionHeader, BadContentDispositionParam, web
from aiohttp.http_exceptions import BadHttpMessage, InvalidHeader, LineTooLong
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from ..core.clients import unscoped
from .access import CALLER
from .metrics import METRICS
from .replies import CLIENT_CLOSED

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "TextFormatter",
    "one_line",
    "quiet_bad_requests",
    "redact",
    "refusal",
    "request_middleware",
    "setup",
]

access_log = logging.getLogger("comfybridge.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
MAX_REFUSAL = 200  # characters of a parser's complaint in its log line

# Secrets as log text may carry them: a query parameter (token=, api_key=, key=, ...secret=,
# ...password=); an Authorization header, whose scheme is kept; an X-API-Key header; a bare
# `Bearer <credentials>`. Each as plain text, inside the repr of raw bytes that aiohttp's parser
# quotes (b'Authorization: Bearer abc\x01'), in raw headers joined by CR LF (real or escaped), and in
# a dict or JSON of headers ('X-API-Key': 'abc'). A query value ends at &, #, a space or a quote; a
# header value runs to the end of its line (a real or an escaped CR or LF) or to the quote that
# closes it. A backslash escape (\x01, \\, \') is part of a value. A name starts a word, or follows an
# escaped CR, LF or TAB.
_QUERY_VALUE = r"(?:[^\s&#'\"\\]|\\[^rn])+"
_HEADER_VALUE = r"(?:[^\r\n'\"\\]|\\[^rn]|['\"](?![\s,;)}\]>]|\Z))+"
_SCHEME = r"(?:bearer|basic|digest|token|negotiate|ntlm|apikey)[ \t]+"
_SECRETS = re.compile(
    rf"(?:(?<![\w.-])|(?<=\\[rnt]))(?:((?:[\w.-]*(?:token|secret|password|api[-_]?key)|key)=['\"]?){_QUERY_VALUE}"
    rf"|((?:proxy-)?authorization|(?:x[-_])?api[-_]?key)(['\"]?[ \t]*:[ \t]*['\"]?(?:{_SCHEME})?){_HEADER_VALUE}"
    rf"|(bearer[ \t]+){_HEADER_VALUE})",
    re.IGNORECASE,
)
_KEEP = rf"\g<1>\g<2>\g<3>\g<4>{REDACTED}"  # the name, and the scheme of an Authorization
_USERINFO = re.compile(r"(//[^/@\s:'\"]*:)[^/@\s'\"]+@")  # the password of a URL's user

# Shown escaped in a text line: C0 controls (CR, LF, ESC among them), DEL, C1 controls, the line and
# paragraph separators (str.splitlines breaks at them too) and the bidirectional overrides and
# isolates (they reorder what a terminal shows), and lone surrogates (bytes of a path that are not
# UTF-8, which the pure Python parser keeps so). TAB too: no message of the bridge's own holds one,
# so a tab can only be a client's, and it moves the cursor (pushing what follows off screen) and
# splits a field for tools that cut lines at tabs. A traceback keeps its own line feeds.
_OTHER_CONTROLS = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_CONTROL = re.compile(rf"[\x00-\x1f{_OTHER_CONTROLS}]")
_CONTROL_BUT_LF = re.compile(rf"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def redact(text: str) -> str:
    """`text` with every secret it carries replaced by [redacted]. Cheap when none can be there
    (the access log calls it for every request): every shape holds one of a few words."""
    if "@" in text:  # a URL's password: http://user:password@host
        text = _USERINFO.sub(rf"\g<1>{REDACTED}@", text)
    lowered = text.lower()
    if not (
        "token" in lowered or "key" in lowered or "uthorization" in lowered or "bearer" in lowered
        or "secret" in lowered or "password" in lowered
    ):  # fmt: skip
        return text
    return _SECRETS.sub(_KEEP, text)


def one_line(text: str, keep_line_feeds: bool = False) -> str:
    """`text` with its control characters as visible escapes (\\r, \\n, \\t, \\x1b, \\u2028): a client's
    CR LF cannot start a forged line, nor its ESC recolour or rewrite the terminal."""
    return (_CONTROL_BUT_LF if keep_line_feeds else _CONTROL).sub(_visible, text)


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def _each_text(value: object, change: Callable[[str], str]) -> object:
    """A JSON value with `change` applied to its strings, however deep."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {name: _each_text(item, change) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_each_text(item, change) for item in value]
    return value


def _utf8(text: str) -> str:
    """`text` with its lone surrogates as \\udcff escapes: JSON in UTF-8 cannot hold them."""
    return text.encode("utf-8", "backslashreplace").decode()


def _as_text(value: object) -> str:
    """What JSON cannot hold natively, as its text, redacted."""
    return redact(str(value))


class SafeFormatter(logging.Formatter):
    """The base of both formats: a record's traceback and stack, redacted. Formatted afresh, not
    taken from the record's cache, which another handler's formatter may have filled unredacted."""

    def exception_text(self, record: logging.LogRecord) -> str:
        text = self.formatException(record.exc_info) if record.exc_info else record.exc_text or ""
        return redact(text)

    def stack_text(self, record: logging.LogRecord) -> str:
        return redact(self.formatStack(record.stack_info)) if record.stack_info else ""


class TextFormatter(SafeFormatter):
    """`time LEVEL logger: message`, the message redacted and on one line whatever a client put in it
    (a path, a header); a traceback follows on lines of its own, redacted, its controls escaped."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatException(self, ei: ExcInfo) -> str:
        """The traceback keeps its lines, but each exception's own text (its message, which may quote
        a client) is put on one: no line of a traceback can pass for a record."""
        text = super().formatException(ei)
        error = ei[1]
        seen: set[int] = set()
        while error is not None and id(error) not in seen:  # the chain of causes, as the traceback shows it
            seen.add(id(error))
            told = "".join(traceback.format_exception_only(error)).rstrip("\n")
            if "\n" in told:
                text = text.replace(told, one_line(told))
            error = error.__cause__ if error.__cause__ is not None else error.__context__
        return text

    def format(self, record: logging.LogRecord) -> str:
        record.message = one_line(redact(record.getMessage()))
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        details = "\n".join(text for text in (self.exception_text(record), self.stack_text(record)) if text)
        return f"{line}\n{one_line(details, keep_line_feeds=True)}" if details else line


class JsonFormatter(SafeFormatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields` (a job's id,
    backend and durations; a request's route, status and duration) as keys of their own; every string
    redacted. JSON escapes control characters itself."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({name: _each_text(value, redact) for name, value in fields.items()})
        if exception := self.exception_text(record):
            line["exception"] = exception
        if stack := self.stack_text(record):
            line["stack"] = stack
        try:
            return orjson.dumps(line, default=_as_text).decode()
        except orjson.JSONEncodeError:  # a lone surrogate: a client's bytes that are not UTF-8
            return orjson.dumps(_each_text(line, _utf8), default=_as_text).decode()


def setup(level: str, fmt: str) -> None:
    """One handler on the root logger, so every record (aiohttp's too) leaves through a formatter
    that redacts it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(quiet_bad_requests)
    # Python's warnings leave through the same formatter, not as raw lines on stderr. A malformed
    # Content-Disposition is the client's fault, answered 400 (the part has no name): aiohttp's
    # warning of it, each text distinct, would be kept in the warnings registry for good.
    logging.captureWarnings(True)
    for category in (BadContentDispositionHeader, BadContentDispositionParam):
        warnings.filterwarnings("ignore", category=category)


def quiet_bad_requests(record: logging.LogRecord) -> bool:
    """Garbage that aiohttp's parser refuses (a bad method, a line over 8190 bytes) is the client's
    fault: one line at INFO, not a traceback at ERROR, naming the fault (see refusal)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, RequestPayloadError) and isinstance(error.__cause__, BadHttpMessage):
        error = error.__cause__
    if isinstance(error, BadHttpMessage):
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "refused a malformed request: %s", (refusal(error),)
        record.exc_info, record.exc_text = None, None
    return True


def refusal(error: BadHttpMessage) -> str:
    """What the parser found wrong: the first line of its message, redacted. The lines after it quote
    the raw bytes, which may be a key no pattern can recognise: a header sent in two packets is quoted
    from mid-value, its name in the other packet. A line too long or an invalid header is quoted in
    the first line, after a colon, and may be a header's bare value: cut there."""
    first = error.message.partition("\n")[0]
    if isinstance(error, LineTooLong | InvalidHeader):
        first = first.partition(": ")[0]
    first = redact(first.rstrip(": "))
    return first if len(first) <= MAX_REFUSAL else first[:MAX_REFUSAL] + "..."


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
        # A method is the caller's word (any token, to aiohttp's Python parser): one series each at most.
        method = request.method if request.method in METHODS else "other"
        request.app[METRICS].request_done(route, method, status, seconds)
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
