"""Results on their way out: `/history` as multipart or base64 JSON, streamed from the result store."""

from __future__ import annotations

import base64
import contextlib
import datetime
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import orjson
from aiohttp import web

from ..store.blobs import BlobGone
from ..store.files import SMALL_FILE
from ..store.results import ResultFile, ResultStore
from .replies import quoted_header_text

__all__ = ["ResultLost", "links_reply", "write_base64", "write_multipart"]


CHUNK = 256 * 1024
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
