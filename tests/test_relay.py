"""Cluster mode's relay against leaders that misbehave: unreachable, frozen (the connection taken,
nothing said), refusing. Each answer is bounded, and says what the leader said."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from comfybridge.edge import relay as relay_module
from comfybridge.edge.appkeys import RELAY_SESSION
from comfybridge.edge.metrics import METRICS, Metrics
from comfybridge.edge.relay import ClusterView, relay_middleware, relay_session
from comfybridge.edge.replies import error_middleware
from comfybridge.errors import NoLeader, Unauthorized

from .conftest import wait_for
from .helpers import TINY
from .services import unused_port


def follower_app(leader_url: str) -> tuple[web.Application, ClusterView]:
    """A follower's app, relaying everything to `leader_url`."""
    view = ClusterView("http://127.0.0.1:1", role="follower", secret="s")
    view.leader_url = leader_url
    app = web.Application(middlewares=[error_middleware, relay_middleware(view, lambda request: "127.0.0.1")])
    app[METRICS] = Metrics()

    async def session(app: web.Application) -> AsyncIterator[None]:
        async with relay_session() as relayed:
            app[RELAY_SESSION] = relayed
            yield

    app.cleanup_ctx.append(session)
    return app, view


async def follower_of(aiohttp_client: Any, leader_url: str) -> tuple[Any, ClusterView]:
    """An in-process follower whose leader is `leader_url`, and a client of it."""
    app, view = follower_app(leader_url)
    return await aiohttp_client(app), view


async def test_a_post_that_never_reached_an_unreachable_leader_is_503_not_502(aiohttp_client: Any) -> None:
    """A leader host that does not answer SYNs (crashed host, partition): the connect times out
    (sock_connect=3) and nothing was sent, so the answer is 503 + Retry-After, not 502 "unknown"."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)  # never accepted: once its queue is full, Linux drops further SYNs
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    await asyncio.sleep(0.2)
    client, _ = await follower_of(aiohttp_client, f"http://127.0.0.1:{port}")
    try:
        resp = await client.post("/generate-based-workflow", params={"clientId": "x"}, json=TINY)
        assert resp.status == 503, (resp.status, await resp.text())
        assert resp.headers.get("Retry-After") == "1"
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


class Frozen:
    """A leader that accepts connections and reads requests but never answers (SIGSTOP, a blocked loop)."""

    async def start(self) -> str:
        self.writers: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            with contextlib.suppress(Exception):
                await reader.read(-1)

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.server.close()


async def test_a_relayed_socket_handshake_to_a_frozen_leader_is_bounded(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader that takes the connection and says nothing (SIGSTOP, a blocked loop): a GET is cut
    after RELAY_READ_TIMEOUT, and a WebSocket's handshake after HANDSHAKE_TIMEOUT."""
    monkeypatch.setattr(relay_module, "RELAY_READ_TIMEOUT", 1.0)
    monkeypatch.setattr(relay_module, "HANDSHAKE_TIMEOUT", 1.0)
    server = Frozen()
    client, _ = await follower_of(aiohttp_client, await server.start())
    try:
        resp = await client.get("/execution-info", params={"clientId": "x"})
        assert resp.status == 503
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with asyncio.timeout(10):  # (only a guard against a hang)
                await client.ws_connect("/ws", params={"clientId": "x"})
        assert refused.value.status == 503
    finally:
        server.close()


async def test_a_relayed_post_to_a_frozen_leader_is_bounded(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POST with a body is bounded too (only ?wait=1, silent while its job runs, is not): the body
    reached the leader, so whether it was done is unknown (502)."""
    monkeypatch.setattr(relay_module, "RELAY_READ_TIMEOUT", 1.0)
    server = Frozen()
    client, _ = await follower_of(aiohttp_client, await server.start())
    try:
        async with asyncio.timeout(30):  # (only a guard against a hang)
            resp = await client.post("/generate-based-workflow", params={"clientId": "x"}, json=TINY)
        assert resp.status == 502
    finally:
        server.close()


async def test_a_relayed_socket_whose_next_leader_is_frozen_gives_up_after_follow_patience(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader goes away (1012); the next one takes the connection and is frozen: the client's
    socket is closed after FOLLOW_PATIENCE (here 2 s), not left open and deaf."""
    monkeypatch.setattr(relay_module, "FOLLOW_PATIENCE", 2.0)
    monkeypatch.setattr(relay_module, "HANDSHAKE_TIMEOUT", 1.0)

    async def leader_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('{"status":"connected","detail":"server connected","details":"server connected"}')
        await ws.close(code=aiohttp.WSCloseCode.SERVICE_RESTART, message=b"the cluster's leader changed")
        return ws

    leader_app = web.Application()
    leader_app.router.add_get("/ws", leader_ws)
    leader = await aiohttp_client(leader_app)
    server = Frozen()
    frozen = await server.start()
    client, view = await follower_of(aiohttp_client, str(leader.make_url("")).rstrip("/"))
    try:
        ws = await client.ws_connect("/ws", params={"clientId": "x"})
        await ws.receive()  # connected
        view.leader_url = frozen  # the next leader, as the follower's campaign learns it
        async with asyncio.timeout(15):
            msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        server.close()


async def test_a_refused_relayed_socket_keeps_retry_after(aiohttp_client: Any) -> None:
    """The leader refuses a socket with 503 + Retry-After (it stopped leading): the follower tells
    the same, its headers too."""

    async def leader_ws(request: web.Request) -> web.StreamResponse:
        if request.query["clientId"] == "busy":
            raise NoLeader("The bridge that led has just stopped leading; try again shortly.")
        raise Unauthorized("An API key is required.")

    leader_app = web.Application(middlewares=[error_middleware])
    leader_app.router.add_get("/ws", leader_ws)
    leader = await aiohttp_client(leader_app)
    client, _ = await follower_of(aiohttp_client, str(leader.make_url("")).rstrip("/"))
    direct = await leader.get("/ws", params={"clientId": "busy"}, headers={"Upgrade": "websocket"})
    assert (direct.status, direct.headers["Retry-After"]) == (503, "1")  # what the leader says
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", params={"clientId": "busy"})
    assert refused.value.status == 503
    assert refused.value.headers is not None
    assert refused.value.headers.get("Retry-After") == "1"


async def test_a_relayed_socket_refused_401_keeps_www_authenticate(aiohttp_client: Any) -> None:
    async def leader_ws(request: web.Request) -> web.StreamResponse:
        raise Unauthorized("An API key is required.")

    leader_app = web.Application(middlewares=[error_middleware])
    leader_app.router.add_get("/ws", leader_ws)
    leader = await aiohttp_client(leader_app)
    client, _ = await follower_of(aiohttp_client, str(leader.make_url("")).rstrip("/"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", params={"clientId": "k"})
    assert refused.value.status == 401
    assert refused.value.headers is not None
    assert "WWW-Authenticate" in refused.value.headers


async def test_a_request_cut_off_after_reaching_the_leader_is_not_called_safe_to_retry(
    aiohttp_client: Any,
) -> None:
    """The leader dies after a job's request reached it (it may have accepted the job): the follower
    says the outcome is unknown (502), never "try again" (503 with Retry-After), which would submit
    it twice. A GET asks again at no cost, and one never sent may be sent again: 503 for both."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request reached the leader, which then died
        writer.transport.abort()

    leader = await asyncio.start_server(swallow, "127.0.0.1", 0)
    client, view = await follower_of(aiohttp_client, f"http://127.0.0.1:{leader.sockets[0].getsockname()[1]}")
    try:
        resp = await client.post("/generate-based-workflow", params={"clientId": "x"}, json=TINY)
        assert resp.status == 502
        assert "whether it was done is not known" in (await resp.json())["detail"]
        assert "Retry-After" not in resp.headers
        resp = await client.get("/execution-info", params={"clientId": "x"})
        assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
        view.leader_url = f"http://127.0.0.1:{unused_port()}"  # nothing listens: nothing was sent
        resp = await client.post("/generate-based-workflow", params={"clientId": "x"}, json=TINY)
        assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
    finally:
        leader.close()
        await leader.wait_closed()


async def test_a_client_gone_during_a_relayed_handshake_leaves_no_socket_at_the_leader(aiohttp_client: Any) -> None:
    """The client hangs up while the follower is still opening the leader's socket for it: once the
    follower finds it gone, it closes the leader's socket too (which would otherwise count against
    the client's socket limits, and keep it 'connected', for ever)."""
    client_gone = asyncio.Event()
    at_leader: list[str] = []  # "open", then "closed"

    async def leader_ws(request: web.Request) -> web.WebSocketResponse:
        await client_gone.wait()  # the leader answers the handshake only after the client left
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        at_leader.append("open")
        await ws.send_str('{"status":"connected","detail":"server connected","details":"server connected"}')
        async for _ in ws:
            pass
        at_leader.append("closed")
        return ws

    leader_app = web.Application()
    leader_app.router.add_get("/ws", leader_ws)
    leader = await aiohttp_client(leader_app)
    app = follower_app(str(leader.make_url("")).rstrip("/"))[0]
    runner = web.AppRunner(app, handler_cancellation=False)  # as python -m comfybridge runs (run_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(
            b"GET /ws?clientId=gone HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        await wait_for(lambda: len(app[RELAY_SESSION].connector._acquired) > 0)  # type: ignore[attr-defined]
        writer.close()
        await writer.wait_closed()
        client_gone.set()
        await wait_for(lambda: at_leader == ["open", "closed"])
    finally:
        await runner.cleanup()
