"""An S3 API server that misbehaves on demand: a proxy in front of moto's that passes every request
through until a test sets `fault`, then answers as a troubled S3 does (5xx, wrong credentials, a
bucket gone) or not at all (a timeout). moto itself stays faithful; the faults live here."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .fake_comfy import HOP_HEADERS

__all__ = ["FAULTS", "FaultyS3", "faulty_s3"]

# fault -> (status, S3 error code); "hang" reads the request and answers nothing at all; "silent"
# (a server paused, or overloaded: its socket takes the connection) does not even read it
FAULTS = {
    "503": (503, "SlowDown"),
    "500": (500, "InternalError"),
    "403": (403, "InvalidAccessKeyId"),
    "no-bucket": (404, "NoSuchBucket"),
    "hang": (0, ""),
    "silent": (0, ""),
}


class FaultyS3:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fault: str | None = None
        self.refuse_deletes = ""  # with an S3 error code: a bulk delete answers 200 naming each key in its Errors
        self.refused = 0  # requests answered with a fault
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault
        body = b"" if fault == "silent" else await request.read()  # (reading says "100 Continue")
        if self.refuse_deletes and request.method == "POST" and "delete" in request.query:
            self.refused += 1
            kept = "".join(
                f"<Error><Key>{key}</Key><Code>{self.refuse_deletes}</Code><Message>refused</Message></Error>"
                for key in re.findall(r"<Key>(.*?)</Key>", body.decode())
            )
            return web.Response(body=f"<DeleteResult>{kept}</DeleteResult>".encode(), content_type="application/xml")
        if fault is not None:
            self.refused += 1
            status, code = FAULTS[fault]
            while not status and self.fault == fault:
                await asyncio.sleep(0.05)  # its client has long given up: it is never done
            return _error(*FAULTS["503"]) if not status else _error(status, code)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body or None
        ) as answer:
            kept = HOP_HEADERS - {"content-length"} if request.method == "HEAD" else HOP_HEADERS  # HEAD's size
            return web.Response(
                status=answer.status,
                body=await answer.read() or None,
                headers={k: v for k, v in answer.headers.items() if k.lower() not in kept},
            )


def _error(status: int, code: str) -> web.Response:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


@contextlib.asynccontextmanager
async def faulty_s3(upstream: str) -> AsyncIterator[FaultyS3]:
    proxy = FaultyS3(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
