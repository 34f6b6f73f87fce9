"""Request bodies read within their limits: declared sizes, types and encodings refused before a byte is
read, a deadline that only a trickle misses, JSON inflated here in bounded slices."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import orjson
from aiohttp import BodyPartReader, HttpVersion11, hdrs, web, web_urldispatcher
from aiohttp.helpers import parse_mimetype

from ..errors import BadInput, BridgeError, RequestTimeout, TooLarge, UnsupportedMedia
from .access import client_id_of
from .appkeys import ACCESS, SETTINGS

__all__ = ["BodyDeadline", "expect_continue", "expect_nothing", "inflated", "json_body", "part_chunks", "refuse_early"]


_T = TypeVar("_T")
CHUNK = 256 * 1024
MB = 1024 * 1024
SLOW_RATE = 64 * 1024  # bytes a second a slow client's body earns beyond body_timeout
FRAMING = 64 * 1024  # multipart framing a request's parts may add to their files, each
INFLATE_SLICE = 1024 * 1024  # bytes inflated at a time before other requests get a turn
ENCODINGS = {"identity", "gzip", "x-gzip", "deflate"}  # a JSON body's Content-Encodings, inflated here


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
                f"The request body arrived too slowly: it may take {self.timeout:g} s (body_timeout), and 1 s "
                f"more for every {SLOW_RATE // 1024} KB."
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
        if not request.content_type.startswith("multipart/"):
            raise BadInput("Send files as multipart/form-data, one file per part.")
        if not parse_mimetype(request.headers.get(hdrs.CONTENT_TYPE, "")).parameters.get("boundary"):
            raise BadInput("Malformed multipart body: its Content-Type names no boundary.")
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


async def expect_continue(
    request: web.Request, checks: Callable[[web.Request], object] = lambda request: None
) -> web.Response | None:
    """`Expect: 100-continue`: promise to read the body only when it will not be refused at once (its
    key, its rates, its type and size, its clientId, the route's own `checks` of its query); the
    refusal itself is then the answer, in JSON, before the body is sent."""
    try:
        refuse_early(request)
        client_id_of(request, required=request.path != "/upload")  # /upload's is optional
        checks(request)
    except BridgeError:
        return None
    if not request.app[ACCESS].admits(request):
        return None
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == HttpVersion11 and expect.strip().lower() != "100-continue":
        # aiohttp's own answer would be a text/plain 417; every error here is JSON.
        return web.json_response(
            {"detail": f"Expect: {expect[:80]!r} is not understood; send Expect: 100-continue, or none."}, status=417
        )
    await web_urldispatcher._default_expect_handler(request)
    return None


async def expect_nothing(request: web.Request) -> None:
    """For the routes that read no body (/free, /interrupt): never promise to read one."""


async def part_chunks(part: BodyPartReader, deadline: BodyDeadline) -> AsyncIterator[bytes]:
    while chunk := await deadline.read(part.read_chunk(CHUNK)):
        yield chunk


async def json_body(request: web.Request) -> Any:
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
    except orjson.JSONDecodeError as exc:  # (NaN and Infinity are not JSON, nor numbers past a double)
        raise BadInput(
            f'The body is not valid JSON ({exc}); it must be a JSON object, e.g. {{"workflow": "text-to-image"}}.'
        ) from None


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
