"""Results on their way out: `/history` as multipart or base64 JSON, streamed from the result store."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import fcntl
import socket
import struct
import termios
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import orjson
from aiohttp import web

from ..store.blobs import BlobGone
from ..store.files import SMALL_FILE
from ..store.results import ResultFile, ResultStore
from .replies import quoted_header_text

__all__ = ["ResultLost", "confirmed_later", "links_reply", "received", "write_base64", "write_multipart"]


CHUNK = 256 * 1024
# An answer up to this size leaves in one burst: written is as good as received. A larger one is
# counted handed over only once the peer's TCP has acknowledged its last byte (see `received`).
UNCONFIRMED = 256 * 1024
ACK_POLL_MAX = 0.1  # seconds between looks at the socket's unacknowledged bytes, at most
ACK_STALL = 60.0  # seconds a client may take nothing before its answer counts as handed over anyway
TCP_CLOSE = 7  # a tcp_info state: the connection is gone (reset, or its FIN exchange is over)
TCPI_BYTES_ACKED, TCP_INFO_BYTES = 120, 136  # where Linux (4.1 on) keeps tcpi_bytes_acked in tcp_info
B64_CHUNK = 3 * 64 * 1024  # a multiple of 3, so chunks encode without padding in between


class ResultLost(Exception):
    """A result file gone from the store, or not of its recorded size (removed or cut short by other
    hands). Raised once the answer has begun, it is cut off (`error_middleware`), never completed short."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(why)
        self.job_id = job_id


async def write_multipart(
    request: web.Request, store: ResultStore, files: list[tuple[str, ResultFile]]
) -> web.StreamResponse:
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
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
    whole = await _read_whole(store, files)
    if whole is not None:
        pieces = [piece for head, data in zip(heads, whole, strict=True) for piece in (head, data, b"\r\n")]
        return await _send_whole(request, headers, b"".join(pieces) + tail)
    first = await _opened(store, *files[0], CHUNK)  # a store away: 503, not a cut
    response = web.StreamResponse(headers=headers)
    async with contextlib.AsyncExitStack() as opened:
        chunks = await opened.enter_async_context(first)
        await response.prepare(request)
        for index, (head, (job_id, item)) in enumerate(zip(heads, files, strict=True)):
            await response.write(head)
            if index:
                chunks = await opened.enter_async_context(await _opened(store, job_id, item, CHUNK))
            async for chunk in chunks:
                await response.write(chunk)
            await response.write(b"\r\n")
    await response.write(tail)
    await response.write_eof()
    return response


async def write_base64(
    request: web.Request, store: ResultStore, files: list[tuple[str, ResultFile]]
) -> web.StreamResponse:
    """`{"files": [{"file_name", "content_type", "job_id", "content"}]}`, encoded while it streams."""
    pieces = []
    for job_id, item in files:
        meta = orjson.dumps({"file_name": item.file_name, "content_type": item.content_type, "job_id": job_id})
        pieces.append(meta[:-1] + b',"content":"')
    encoded = [4 * ((f.size + 2) // 3) for _, f in files]
    length = len(b'{"files":[') + sum(len(p) + n + 2 for p, n in zip(pieces, encoded, strict=True))
    length += max(0, len(files) - 1) + len(b"]}")
    headers = {"Content-Type": "application/json", "Content-Length": str(length)}
    whole = await _read_whole(store, files)
    if whole is not None:
        encoded_files = [piece + base64.b64encode(data) + b'"}' for piece, data in zip(pieces, whole, strict=True)]
        return await _send_whole(request, headers, b'{"files":[' + b",".join(encoded_files) + b"]}")
    first = await _opened(store, *files[0], B64_CHUNK)  # a store away: 503, not a cut
    response = web.StreamResponse(headers=headers)
    async with contextlib.AsyncExitStack() as opened:
        chunks = await opened.enter_async_context(first)
        await response.prepare(request)
        await response.write(b'{"files":[')
        for index, (piece, (job_id, item)) in enumerate(zip(pieces, files, strict=True)):
            await response.write((b"," if index else b"") + piece)
            if index:
                chunks = await opened.enter_async_context(await _opened(store, job_id, item, B64_CHUNK))
            async for chunk in chunks:
                await response.write(base64.b64encode(chunk))
            await response.write(b'"}')
    await response.write(b"]}")
    await response.write_eof()
    return response


async def _read_whole(store: ResultStore, files: list[tuple[str, ResultFile]]) -> list[bytes] | None:
    """Each file's bytes, when together they are small enough to go out in one write (results kept
    inline, the usual case: a write each would cost a system call each); None otherwise. A file lost
    fails here, before anything is sent."""
    if sum(f.size for _, f in files) > SMALL_FILE:
        return None
    whole = []
    for job_id, item in files:
        try:
            data = await store.read(item)
        except BlobGone:
            raise _gone(job_id, item) from None
        if len(data) != item.size:
            raise _cut(job_id, item)
        whole.append(data)
    return whole


async def _send_whole(request: web.Request, headers: dict[str, str], body: bytes) -> web.StreamResponse:
    """Headers and body in one write; complete once this returns, as a streamed answer is."""
    assert headers["Content-Length"] == str(len(body))
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    await response.write_eof(body)
    return response


def confirmed_later(response: web.StreamResponse) -> bool:
    """Whether a written answer is too large to count as received once written (see `received`)."""
    return (response.content_length or 0) > UNCONFIRMED


async def received(request: web.Request, response: web.StreamResponse) -> bool:
    """Whether a written answer reached the client. A large one is "written" once it sits in kernel
    (and a proxy's) buffers: megabytes that a client hanging up mid-download never gets. So it
    counts once the peer's TCP has acknowledged its every byte; not if the connection is reset
    first (the client did not take it all: its results can be fetched again). True where this
    cannot be told (not Linux TCP), or once the client has taken nothing more for ACK_STALL seconds
    (as if it had: never twice)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None or not confirmed_later(response):
        return True
    try:  # a copy of our own: readable after aiohttp closes the socket (the client's FIN, or a reset)
        own = socket.fromfd(sock.fileno(), sock.family, sock.type)
    except (OSError, ValueError):
        return True
    with own:
        try:
            acked_before, _ = _acked_and_state(own)
            owed = transport.get_write_buffer_size() + _unacknowledged(own)
        except (OSError, struct.error):  # not a TCP socket of Linux's
            return True
        pause, progress, progress_at = 0.001, 0, time.monotonic()
        while True:
            try:
                acked, state = _acked_and_state(own)
            except (OSError, struct.error):
                return True
            taken = acked - acked_before
            if taken >= owed:
                return True
            if state == TCP_CLOSE:
                return False  # reset (or timed out) before the last byte was acknowledged
            if taken > progress:
                progress, progress_at = taken, time.monotonic()
            elif time.monotonic() - progress_at > ACK_STALL:
                return True
            await asyncio.sleep(pause)
            pause = min(ACK_POLL_MAX, pause * 2)


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes in the socket's send queue: not sent yet, or sent and not acknowledged (TIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


def _acked_and_state(sock: socket.socket) -> tuple[int, int]:
    """Linux's tcp_info: bytes the peer has acknowledged so far (tcpi_bytes_acked), and the state."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    return struct.unpack_from("Q", info, TCPI_BYTES_ACKED)[0], info[0]


def _gone(job_id: str, item: ResultFile) -> ResultLost:
    return ResultLost(job_id, f"{item.file_name} of job {job_id} is gone from the bridge's storage")


def _cut(job_id: str, item: ResultFile) -> ResultLost:
    return ResultLost(job_id, f"{item.file_name} of job {job_id} is not of its recorded size ({item.size} bytes)")


async def _opened(
    store: ResultStore, job_id: str, item: ResultFile, size: int
) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
    """A file's chunks (see `_chunks`), the first already read: a store that cannot give the file
    fails here, before anything of it is sent. Enter it at once: however the answer ends, its exit
    closes the reader (a client that hangs up mid-download leaves no file open behind it)."""
    chunks = _checked(store, job_id, item, size)
    first = await anext(chunks, b"")
    return _reading(first, chunks)


@contextlib.asynccontextmanager
async def _reading(first: bytes, chunks: AsyncGenerator[bytes, None]) -> AsyncIterator[AsyncIterator[bytes]]:
    async def from_first() -> AsyncGenerator[bytes, None]:
        yield first
        async for chunk in chunks:
            yield chunk

    iterator = from_first()
    try:
        yield iterator
    finally:
        await iterator.aclose()
        await chunks.aclose()  # (a reader never iterated: its file is open all the same)


async def _checked(store: ResultStore, job_id: str, item: ResultFile, size: int) -> AsyncGenerator[bytes, None]:
    """`_chunks`, counted: ResultLost if the file is gone, or ends before or after its recorded size
    (a response completed short would be taken for whole, and the results forgotten)."""
    sent = 0
    try:
        async with contextlib.aclosing(_chunks(store, item, size)) as chunks:
            async for chunk in chunks:
                sent += len(chunk)
                if sent > item.size:
                    break
                yield chunk
    except BlobGone:
        raise _gone(job_id, item) from None
    if sent != item.size:
        raise _cut(job_id, item)


async def _chunks(store: ResultStore, item: ResultFile, size: int) -> AsyncGenerator[bytes, None]:
    """A file from the store in chunks of `size` (the last may be shorter: base64 needs every other
    one whole); a small file is read whole, in one trip."""
    if item.size <= SMALL_FILE:
        yield await store.read(item)
        return
    held = b""
    async with contextlib.aclosing(store.chunks(item, size)) as chunks:
        async for chunk in chunks:
            if not held and len(chunk) == size:  # a local file's chunks come whole: no copy
                yield chunk
                continue
            held += chunk
            while len(held) >= size:
                yield held[:size]
                held = held[size:]
    if held:
        yield held


async def links_reply(store: ResultStore, files: list[tuple[str, ResultFile]], ttl: float) -> web.Response:
    """`{"files": [{"file_name", "content_type", "job_id", "url", "expires_at"}]}`: presigned links."""
    expires = int(ttl)
    expires_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires)
    stamp = expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    listed = [
        {
            "file_name": item.file_name,
            "content_type": item.content_type,
            "job_id": job_id,
            "url": await store.link(item, expires),
            "expires_at": stamp,
        }
        for job_id, item in files
    ]
    return web.Response(body=orjson.dumps({"files": listed}), content_type="application/json")
