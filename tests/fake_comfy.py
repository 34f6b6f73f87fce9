"""A small fake ComfyUI for the misbehaviours a real one (and so the emulator) only shows when broken.

It stands in front of an emulator and passes every request and every event through, except the
answers a test replaces (a proxy's error page with 200, an array where an object belongs) and the
frames a test pushes into the event sockets. The emulator stays faithful; the lies live here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import Callable

import aiohttp
from aiohttp import web

from comfybridge.emulator import Emulator

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "host"}


class FakeComfy:
    def __init__(self, upstream: Emulator) -> None:
        self.upstream = upstream
        self.answers: dict[str, deque[tuple[int, bytes, str]]] = defaultdict(deque)
        self.sockets: set[web.WebSocketResponse] = set()
        self.seen: list[str] = []  # "GET /queue", ... every request, in order
        self.rewrite: Callable[[str], str] = lambda text: text  # applied to every event ComfyUI sends; "" drops it
        self.held: dict[str, asyncio.Event] = {}  # requests of these routes wait for their event first
        self.trickled: dict[str, float] = {}  # answers of these routes come a KB at a time, this many s apart
        self.pongs = True  # its event sockets answer pings (False, for sockets opened after: a frozen ComfyUI)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def replace(
        self, route: str, status: int, body: bytes | str, times: int = 1, content_type: str = "application/json"
    ) -> None:
        """The next `times` requests of `route` ("GET /queue", "GET /history/{id}" as "GET /history/*", the
        same for /object_info/{class})
        get this answer instead of ComfyUI's."""
        data = body.encode() if isinstance(body, str) else body
        self.answers[route].extend([(status, data, content_type)] * times)

    def hold(self, route: str) -> asyncio.Event:
        """Requests of `route` reach ComfyUI only once the returned event is set (a slow network)."""
        self.held[route] = asyncio.Event()
        return self.held[route]

    async def push(self, text: str) -> None:
        """A text frame, as is, to every event socket."""
        for ws in list(self.sockets):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(text)

    async def drop_sockets(self) -> None:
        for ws in list(self.sockets):
            await ws.close()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/ws", self._socket)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _route(self, request: web.Request) -> str:
        path = request.path.removeprefix("/api") if request.path.startswith("/api/") else request.path
        if path.startswith("/history/"):
            path = "/history/*"
        elif path.startswith("/object_info/"):
            path = "/object_info/*"
        elif path.startswith("/jobs/"):  # "/jobs/{id}/cancel" as "/jobs/*/cancel"
            parts = path.split("/")
            path = "/".join(["", "jobs", "*", *parts[3:]])
        return f"{request.method} {path}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request)
        self.seen.append(route)
        if route in self.held:
            await self.held[route].wait()
        exact = f"{request.method} {request.path}"  # ("GET /object_info/KSampler" before "GET /object_info/*")
        canned = self.answers.get(exact) or self.answers.get(route)
        if canned:
            status, body, content_type = canned.popleft()
            return web.Response(status=status, body=body, content_type=content_type)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream.url + request.rel_url.human_repr(), headers=headers, data=await request.read()
        ) as resp:
            body = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        if route not in self.trickled:
            return web.Response(status=resp.status, body=body, headers=kept)
        slow = web.StreamResponse(status=resp.status, headers={**kept, "Content-Length": str(len(body))})
        await slow.prepare(request)
        for start in range(0, len(body), 1024):
            await asyncio.sleep(self.trickled[route])
            await slow.write(body[start : start + 1024])
        return slow

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append("GET /ws")
        assert self._session is not None
        ws = web.WebSocketResponse(max_msg_size=0, autoping=self.pongs)
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            async with self._session.ws_connect(f"{self.upstream.url}/ws?{request.query_string}") as upstream:
                relay = asyncio.create_task(self._relay(upstream, ws))
                try:
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            await upstream.send_str(msg.data)
                finally:
                    relay.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await relay
        finally:
            self.sockets.discard(ws)
        return ws

    async def _relay(self, upstream: aiohttp.ClientWebSocketResponse, ws: web.WebSocketResponse) -> None:
        with contextlib.suppress(ConnectionResetError):  # the bridge's socket dropped (drop_sockets): no one to tell
            async for msg in upstream:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    text = self.rewrite(msg.data)
                    if text:  # rewritten to nothing: the frame is dropped
                        await ws.send_str(text)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            await ws.close()
