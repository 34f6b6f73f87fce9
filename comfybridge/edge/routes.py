"""The HTTP edge: the contract's routes, and the middleware that turns every error into JSON."""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import urllib.parse
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import BodyPartReader, hdrs, web, web_urldispatcher
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..core.clients import SCOPE, check_client_id, unscoped
from ..core.scheduler import Fetch
from ..core.webhooks import check_public, check_url
from ..errors import (
    BadInput,
    BridgeError,
    Conflict,
    NoBackend,
    NotFound,
    RateLimited,
    RequestTimeout,
    TooLarge,
    Unauthorized,
    UnsupportedMedia,
)
from ..store.files import SMALL_FILE, open_off_loop
from ..store.media import content_type_for
from ..store.results import ResultFile
from ..store.uploads import IncomingFile
from . import openapi
from .access import KEY, scoped
from .appkeys import SCHEDULER, SETTINGS, WORKFLOWS
from .metrics import METRICS
from .ws import websocket_handler

__all__ = [
    "MB",
    "docs",
    "error_middleware",
    "free",
    "generate",
    "generation_count",
    "health",
    "history",
    "inflated",
    "interrupt",
    "metrics",
    "playground",
    "ready",
    "setup_routes",
    "upload",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

CHUNK = 256 * 1024
MB = 1024 * 1024
SLOW_RATE = 64 * 1024  # bytes a second a slow client's body earns beyond body_timeout
FRAMING = 64 * 1024  # multipart framing a request's parts may add to their files, each
HEADER_SAFE = " !\"#$&'()*+,-./:;<=>?@[]^_`{|}~"  # printable ASCII but %: kept as is in X-Detail
INFLATE_SLICE = 1024 * 1024  # bytes inflated at a time before other requests get a turn
ENCODINGS = {"identity", "gzip", "x-gzip", "deflate"}  # a JSON body's Content-Encodings, inflated here
B64_CHUNK = 3 * 64 * 1024  # a multiple of 3, so chunks encode without padding in between
WEBHOOK_KEY = "_webhook"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
NOT_SEEN = "The client ID has not been submitted to the server before. It is not recognized. / {}"
NO_CONTENT = "No contents with that client id / {}"


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
    """Every failure leaves as `{"detail": ...}` with the right status; never an HTML page."""
    try:
        return await handler(request)
    except BridgeError as exc:
        status = exc.status
        key = request.get(KEY)
        # The core names clients as it knows them, within their key; the caller knows them without.
        detail = exc.detail.replace(f"{key.name}{SCOPE}", "") if key is not None else exc.detail
        response = error_response(status, detail)
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            # A refused WebSocket handshake's body is not read by most WebSocket clients: say it here too.
            response.headers["X-Detail"] = urllib.parse.quote(detail, safe=HEADER_SAFE)
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
        elif isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="comfybridge"'
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
        return error_response(exc.status, detail)
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


def _client_id(request: web.Request, required: bool = True) -> str | None:
    """The request's clientId, checked, as the core knows it (within the caller's API key)."""
    value = request.query.get("clientId")
    if value is None and not required:
        return None
    return scoped(request, check_client_id(value))


def _allowed(request: web.Request, alias: str) -> None:
    key = request.get(KEY)
    if key is not None:
        key.check_workflow(alias)


def _aliases(request: web.Request) -> list[str]:
    """The workflows the caller may use."""
    key = request.get(KEY)
    aliases = request.app[WORKFLOWS].aliases()
    if key is not None and key.workflows is not None:
        aliases = [alias for alias in aliases if alias in key.workflows]
    return aliases


async def workflow_list(request: web.Request) -> web.Response:
    """The aliases, as the contract has it; `?detail=1`: the catalogue (description, thumbnail, inputs)."""
    aliases = _aliases(request)
    if request.query.get("detail") not in ("1", "true"):
        return json_response(aliases)
    store = request.app[WORKFLOWS]
    return json_response([store.get(alias).catalogue_entry() for alias in aliases])


async def workflow_thumbnail(request: web.Request) -> web.StreamResponse:
    workflow = request.app[WORKFLOWS].get(request.query.get("workflow"))
    _allowed(request, workflow.alias)
    if workflow.thumbnail is None:
        raise NotFound(f"Workflow {workflow.alias!r} has no thumbnail.")
    headers = {"Cache-Control": "max-age=300", "Content-Type": content_type_for(workflow.thumbnail.name)}
    return web.FileResponse(workflow.thumbnail, headers=headers)


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi.document(request.app[WORKFLOWS], _aliases(request)))


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=openapi.DOCS_PAGE, content_type="text/html")


async def workflow_info(request: web.Request) -> web.Response:
    workflow = request.app[WORKFLOWS].get(request.query.get("workflow"))
    _allowed(request, workflow.alias)
    return json_response(workflow.describe_inputs())


class BodyDeadline:
    """When a request body must have arrived: `body_timeout` seconds from the start, plus one more
    for every SLOW_RATE bytes received, so a large upload on a slow link is fine and a body that
    trickles in a byte a second (holding a connection and a handler forever) is not."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.start = asyncio.get_running_loop().time()
        self.received = 0

    async def read(self, reading: Awaitable[_T]) -> _T:
        """What `reading` gives (a chunk is counted), unless the deadline passes first: 408."""
        try:
            async with asyncio.timeout_at(self.start + self.timeout + self.received / SLOW_RATE):
                got = await reading
        except TimeoutError:
            raise RequestTimeout(
                f"The request body arrived too slowly: {self.received} bytes in {self.timeout:g} s and more "
                "(body_timeout)."
            ) from None
        if isinstance(got, bytes | bytearray):
            self.received += len(got)
        return got


def refuse_early(request: web.Request) -> None:
    """What a POST can be refused for before a byte of its body is read: its type, its encoding, its
    declared length. Called by the handlers, and before `100 Continue` is promised."""
    settings = request.app[SETTINGS]
    length = request.content_length
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if request.path == "/upload":
        if coding != "identity":
            raise UnsupportedMedia("Send uploads without a Content-Encoding: media files are compressed already.")
        limit = settings.max_request_mb * MB + FRAMING * settings.max_upload_files
        if length is not None and length > limit:
            raise TooLarge(f"The upload is larger than the limit of {settings.max_request_mb:g} MB.")
        return
    if request.content_type != "application/json" and not request.content_type.endswith("+json"):
        raise UnsupportedMedia('Send the body as JSON, with "Content-Type: application/json".')
    if coding not in ENCODINGS:
        raise UnsupportedMedia(f"Content-Encoding {coding!r} is not supported (use gzip or deflate, or none).")
    if length is not None and length > settings.max_json_mb * MB:
        raise TooLarge(f"The request body is larger than the limit of {settings.max_json_mb:.3g} MB.")


async def expect_continue(request: web.Request) -> None:
    """`Expect: 100-continue`: promise to read the body only when it will not be refused at once; the
    refusal itself (413, 415) is then the handler's answer, in JSON, before the body is sent."""
    try:
        refuse_early(request)
    except BridgeError:
        return
    await web_urldispatcher._default_expect_handler(request)


async def upload(request: web.Request) -> web.Response:
    client_id = _client_id(request, required=False)
    if not request.content_type.startswith("multipart/"):
        raise BadInput("Send files as multipart/form-data, one file per part.")
    refuse_early(request)
    scheduler = request.app[SCHEDULER]
    deadline = BodyDeadline(request.app[SETTINGS].body_timeout)

    async def parts() -> AsyncIterator[IncomingFile]:
        reader = await request.multipart()
        while (part := await deadline.read(reader.next())) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadInput("Nested multipart bodies are not supported.")
            yield IncomingFile(part.name or "", part.filename, _chunks(part, deadline))

    try:
        names = await scheduler.store_uploads(client_id, parts())
    except ValueError as exc:  # what aiohttp's multipart reader says of a malformed body
        raise BadInput(f"Malformed multipart body: {exc}") from None
    except HttpProcessingError as exc:  # a part header it cannot parse
        raise BadInput(f"Malformed multipart body: {exc.message.splitlines()[0]}") from None
    return json_response(names)


async def _chunks(part: BodyPartReader, deadline: BodyDeadline) -> AsyncIterator[bytes]:
    while chunk := await deadline.read(part.read_chunk(CHUNK)):
        yield chunk


async def _json_body(request: web.Request) -> Any:
    """The body as JSON, read in chunks within its deadline and refused (413) as soon as it passes the
    limit. A compressed body is inflated here, never more than the limit plus one byte: the server
    hands bodies over as sent (`auto_decompress` off), so a bomb costs one bounded inflate, and the
    rest of it, left unread, is drained as the few compressed bytes it is."""
    settings = request.app[SETTINGS]
    refuse_early(request)
    limit = int(settings.max_json_mb * MB)
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    deadline = BodyDeadline(settings.body_timeout)
    inflater: Any = None
    body = bytearray()
    while chunk := await deadline.read(request.content.readany()):
        if coding == "identity":
            body += chunk
        else:
            inflater = inflater or zlib.decompressobj(_window_bits(coding, chunk))
            for piece in inflated(inflater, chunk, limit + 1 - len(body)):
                body += piece
                await asyncio.sleep(0)  # other requests run between slices
        if len(body) > limit:
            raise TooLarge(f"The request body is larger than the limit of {limit / MB:.3g} MB.")
    if coding != "identity" and (inflater is None or not inflater.eof):
        raise BadInput(f"The request body could not be read: its {coding} data is cut short.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadInput('The body must be a JSON object, e.g. {"workflow": "text-to-image"}.') from None


def _window_bits(coding: str, first: bytes) -> int:
    """zlib's wbits for a body: gzip's header, or deflate with its zlib header or (as some clients
    send it) without one."""
    if coding != "deflate":
        return 16 + zlib.MAX_WBITS
    return zlib.MAX_WBITS if first[0] & 0x0F == 8 else -zlib.MAX_WBITS


def inflated(inflater: Any, chunk: bytes, room: int, size: int = INFLATE_SLICE) -> Iterator[bytes]:
    """What `chunk` inflates to, in slices of at most `size` bytes and `room` in all (past that the
    body is refused anyway; zlib's max_length of 0 would mean no limit, so it is never asked for).
    A slice that fills up may leave output inside zlib with no input left: it is asked again until
    a slice comes back short."""
    while room > 0:
        out = _inflate(inflater, chunk, min(size, room))
        room -= len(out)
        yield out
        chunk = inflater.unconsumed_tail
        if not chunk and (len(out) < size or inflater.eof):
            return


def _inflate(inflater: Any, chunk: bytes, room: int) -> bytes:
    """Inflate what `room` bytes of output allow of `chunk` (the rest stays in `unconsumed_tail`)."""
    try:
        out: bytes = inflater.decompress(chunk, room)
    except zlib.error:
        raise BadInput("The request body could not be read: it is not valid compressed data.") from None
    if inflater.unused_data:
        raise BadInput("The request body could not be read: there is data after its compressed stream.")
    return out


async def generate(request: web.Request) -> web.Response:
    client_id = _client_id(request)
    assert client_id is not None
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadInput('The body must be a JSON object, e.g. {"workflow": "text-to-image"}.')
    _allowed(request, request.app[WORKFLOWS].get(body.get("workflow")).alias)
    webhook = await _webhook(request, body.pop(WEBHOOK_KEY, None))
    job, position = await request.app[SCHEDULER].submit(client_id, body, webhook)
    return json_response({"detail": f"queued / {position}", "job_id": job.id})


async def _webhook(request: web.Request, asked: Any) -> str | None:
    """Where to tell of the job's end: the request's `_webhook` (a key no workflow input can have:
    inputs are `node/input`; it must be public unless `webhook_allow_private`), else its API key's
    (the operator's choice), else nowhere."""
    key = request.get(KEY)
    settings = request.app[SETTINGS]
    url = check_url(asked) if asked is not None else key.webhook if key is not None else None
    if url is not None and not settings.webhook_secret:
        raise BadInput("This bridge sends no webhooks: it has no webhook_secret to sign them with.")
    if asked is not None and not settings.webhook_allow_private:
        await check_public(url or "")
    return url


async def execution_info(request: web.Request) -> web.Response:
    client_id = _client_id(request)
    assert client_id is not None
    return json_response(request.app[SCHEDULER].status_of(client_id))


async def generation_count(request: web.Request) -> web.Response:
    return json_response(request.app[SCHEDULER].generation_count)


async def free(request: web.Request) -> web.Response:
    client_id = _client_id(request, required=False)
    if not await request.app[SCHEDULER].free(client_id):
        raise NoBackend("No ComfyUI backend is up to free its memory; try again shortly.")
    return json_response({"detail": f"server memory free now / {unscoped(client_id) if client_id else 'ALL'}"})


async def interrupt(request: web.Request) -> web.Response:
    client_id = _client_id(request)
    assert client_id is not None
    await request.app[SCHEDULER].interrupt(client_id)
    return json_response({"detail": f"interrupted that clientId will be ignored. / {unscoped(client_id)}"})


async def history(request: web.Request) -> web.StreamResponse:
    """Stream every finished result of the client, then forget them once the response is complete."""
    client_id = _client_id(request)
    assert client_id is not None
    scheduler = request.app[SCHEDULER]
    found, fetched = scheduler.claim_results(client_id)
    if found is Fetch.UNKNOWN:
        return web.Response(status=204, headers={"X-Detail": NOT_SEEN.format(unscoped(client_id))})
    if found is Fetch.BUSY:
        raise Conflict(
            "The results of this clientId are being fetched by another request right now; "
            "try again once that one has finished (they are forgotten only once it completes)."
        )
    if found is Fetch.NOTHING:
        return web.Response(status=204, headers={"X-Detail": NO_CONTENT.format(unscoped(client_id))})
    files = [(result.job_id, f) for result in fetched for f in result.files]
    try:
        if request.query.get("resType") == "base64":
            response = await _write_base64(request, files)
        else:
            response = await _write_multipart(request, files)
    except BaseException:
        scheduler.release_results(fetched)
        raise
    await scheduler.results_fetched(client_id, fetched)
    return response


async def _write_multipart(request: web.Request, files: list[tuple[str, ResultFile]]) -> web.StreamResponse:
    boundary = uuid.uuid4().hex
    heads = []
    for index, (job_id, item) in enumerate(files):
        name = quoted_header_text(item.file_name)
        heads.append(
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="result_{index}"; filename="{name}"\r\n'
                f"Content-Type: {item.content_type}\r\n"
                f"Content-Length: {item.size}\r\n"
                f"X-Job-Id: {job_id}\r\n\r\n"
            ).encode()
        )
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + f.size + 2 for h, (_, f) in zip(heads, files, strict=True)) + len(tail)
    response = web.StreamResponse(
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
    )
    await response.prepare(request)
    for head, (_, item) in zip(heads, files, strict=True):
        await response.write(head)
        await _send_file(response, item, CHUNK, bytes)
        await response.write(b"\r\n")
    await response.write(tail)
    await response.write_eof()
    return response


async def _write_base64(request: web.Request, files: list[tuple[str, ResultFile]]) -> web.StreamResponse:
    """`{"files": [{"file_name", "content_type", "job_id", "content"}]}`, encoded while it streams."""
    pieces = []
    for job_id, item in files:
        meta = orjson.dumps({"file_name": item.file_name, "content_type": item.content_type, "job_id": job_id})
        pieces.append(meta[:-1] + b',"content":"')
    encoded = [4 * ((f.size + 2) // 3) for _, f in files]
    length = len(b'{"files":[') + sum(len(p) + n + 2 for p, n in zip(pieces, encoded, strict=True))
    length += max(0, len(files) - 1) + len(b"]}")
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(length)})
    await response.prepare(request)
    await response.write(b'{"files":[')
    for index, (piece, (_, item)) in enumerate(zip(pieces, files, strict=True)):
        await response.write((b"," if index else b"") + piece)
        await _send_file(response, item, B64_CHUNK, base64.b64encode)
        await response.write(b'"}')
    await response.write(b"]}")
    await response.write_eof()
    return response


async def _send_file(
    response: web.StreamResponse, item: ResultFile, size: int, encode: Callable[[bytes], bytes]
) -> None:
    """Stream a file in chunks read off the event loop; closed even when the client goes away.
    A small file is read whole, in one trip to a thread."""
    if item.size <= SMALL_FILE:
        await response.write(encode(await asyncio.to_thread(item.path.read_bytes)))
        return
    async with open_off_loop(item.path, "rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, size):
            await response.write(encode(chunk))


def _health_report(request: web.Request) -> dict[str, Any]:
    """The scheduler's report; with API keys on, a caller without one sees no backend addresses."""
    report = request.app[SCHEDULER].health()
    settings = request.app[SETTINGS]
    if settings.keys_on and request.get(KEY) is None:
        report["backends"] = [{"state": b["state"]} for b in report["backends"]]
        report["journal"] = "ok" if report["journal"] == "ok" else "lost"  # not where it is
    return report


async def health(request: web.Request) -> web.Response:
    """The process serves: always 200 while it does, with what it knows of its backends."""
    return json_response({"status": "ok", **_health_report(request)})


async def ready(request: web.Request) -> web.Response:
    """Whether to send work here: 503 with the reason when no backend is usable, the queue is too
    deep, or the bridge is stopping."""
    report = _health_report(request)
    limit = request.app[SETTINGS].ready_max_queue
    if report["stopping"]:
        reason = "the bridge is stopping"
    elif report["journal"] != "ok":
        reason = f"the job journal {report['journal']}; restart the bridge"
    elif not report["usable_backends"]:
        reason = "no ComfyUI backend is usable"
    elif limit and report["queued"] > limit:
        reason = f"{report['queued']} jobs wait, more than ready_max_queue ({limit})"
    else:
        return json_response({"status": "ready", **report})
    return json_response({"status": "not ready", "detail": reason, **report}, 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition. With `metrics_key` set, only for `Authorization: Bearer <metrics_key>`;
    else, with API keys on, for any valid key; else open."""
    settings = request.app[SETTINGS]
    if settings.metrics_key:
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), settings.metrics_key.encode()):
            raise Unauthorized("GET /metrics needs `Authorization: Bearer <metrics_key>`.")
    elif settings.keys_on and request.get(KEY) is None:
        raise Unauthorized("GET /metrics needs a valid API key.")
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


PLAYGROUND = Path(__file__).parent / "playground"


async def playground(request: web.Request) -> web.StreamResponse:
    if request.path.endswith("/"):  # its links are relative to /playground, not /playground/
        raise web.HTTPMovedPermanently("../playground")
    return web.FileResponse(PLAYGROUND / "index.html", headers={"Cache-Control": "no-cache"})


def setup_routes(app: web.Application) -> None:
    # HEAD only where a GET changes nothing: /history hands results over (and forgets them).
    app.router.add_get("/ws", websocket_handler, allow_head=False)
    app.router.add_get("/workflow-list", workflow_list)
    app.router.add_get("/workflow-info", workflow_info)
    app.router.add_get("/workflow-thumbnail", workflow_thumbnail)
    app.router.add_post("/upload", upload, expect_handler=expect_continue)
    app.router.add_post("/generate-based-workflow", generate, expect_handler=expect_continue)
    app.router.add_get("/history", history, allow_head=False)
    app.router.add_get("/execution-info", execution_info)
    app.router.add_get("/generation-count", generation_count)
    app.router.add_post("/free", free)
    app.router.add_post("/interrupt", interrupt)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ready", ready)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/playground", playground)
    app.router.add_get("/playground/", playground)  # before its files, which would refuse a listing
    app.router.add_static("/playground/", PLAYGROUND, name="playground-files")
    app.router.add_get("/docs", docs)
