"""Cluster mode's edge: a bridge that does not lead passes each request on to the one that does.

One bridge of a cluster leads (it holds the database's lock): it runs the scheduler, so the fair
queue, placement and every limit are the whole cluster's. The others serve /health, /ready and
/metrics themselves and relay everything else, bodies streamed both ways, unchanged: a client may use
any bridge for anything. A relayed WebSocket outlives a change of leader: when the leader's socket
goes away (it stopped, or died), the relay connects to the next leader and the client's socket stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict

from ..errors import NoLeader, Relayed
from .access import CALLER
from .appkeys import RELAY_SESSION
from .metrics import METRICS
from .ws import CONNECTED_FRAME, MAX_CLIENT_MESSAGE

__all__ = ["CALLER_HEADER", "LOCAL_PATHS", "RELAY_HEADER", "ClusterView", "relay_middleware", "relay_session"]

log = logging.getLogger(__name__)

LOCAL_PATHS = frozenset({"/health", "/ready", "/metrics"})  # about this bridge: never relayed
RELAY_HEADER = "X-Comfybridge-Relay"  # the cluster's secret: the leader believes CALLER_HEADER then
CALLER_HEADER = "X-Comfybridge-Caller"
# Not passed on: they describe one connection (RFC 9110 §7.6.1), or are the relay's own to set.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Expect", RELAY_HEADER, CALLER_HEADER,
        "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Accept",
    )
)  # fmt: skip
CHUNK = 64 * 1024
PASSED_BACK = ("Retry-After", "WWW-Authenticate")  # of a socket's refusal, told to the client as they were
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # asking again changes nothing
RELAY_READ_TIMEOUT = 90.0  # seconds a relayed request may wait for the leader's next bytes (but ?wait=1's)
HANDSHAKE_TIMEOUT = 10.0  # seconds the leader may take to accept a relayed socket
UPSTREAM_FIRST_FRAME = 10.0  # seconds a next leader's socket may take to say `connected`
UNREACHABLE = "The bridge that leads could not be reached (it may be changing); try again shortly."
# A relayed socket whose leader went away waits this long for the next one before it gives up.
FOLLOW_PATIENCE = 60.0
# Close codes after which the relay connects to the next leader: it stopped, restarted, or vanished.
LEADER_GONE = frozenset({WSCloseCode.GOING_AWAY, WSCloseCode.SERVICE_RESTART, WSCloseCode.ABNORMAL_CLOSURE, None})


@dataclass
class ClusterView:
    """What this bridge knows of its cluster: whether it leads, and where the leader is."""

    own_url: str
    role: str = "candidate"  # candidate (not yet known), follower, leader, stepping down
    leader_url: str | None = None
    generation: int = 0
    secret: str = ""
    sockets: set[web.WebSocketResponse] = field(default_factory=set)  # clients' sockets relayed now
    # While leading: until when (wall clock) it may send prompts without another answer from the
    # database: its hold on every backend, renewed by each heartbeat.
    lease_until: float | None = None

    async def close_sockets(self) -> None:
        """This bridge stops: its relayed sockets close as the leader's own would (1001)."""
        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    @property
    def leading(self) -> bool:
        return self.role == "leader"

    def follow(self, url: str | None, generation: int) -> None:
        if (url, generation) != (self.leader_url, self.generation) and url is not None:
            log.info("the cluster's leader is %s (generation %d)", url, generation)
        self.leader_url, self.generation = url, generation

    def trusts(self, request: web.Request) -> bool:
        """A request another bridge of the cluster relayed (so its caller header is believed)."""
        presented = request.headers.get(RELAY_HEADER)
        return bool(self.secret and presented and hmac.compare_digest(presented.encode(), self.secret.encode()))

    def caller_of(self, request: web.Request) -> str | None:
        """The address of the client a relayed request came from, as the relaying bridge saw it."""
        return request.headers.get(CALLER_HEADER) if self.trusts(request) else None

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"role": self.role, "leader": self.leader_url, "generation": self.generation}
        if self.leading and self.lease_until is not None:
            report["lease_expires_in"] = round(max(0.0, self.lease_until - time.time()), 3)
        return report

    def upstream(self) -> str:
        """The leader's URL, or NoLeader: none known, or it is this bridge, which is not ready to lead."""
        url = self.leader_url
        if url is None or url == self.own_url:
            raise NoLeader("No bridge of the cluster leads right now (a new one is taking over); try again shortly.")
        return url


def relay_session() -> aiohttp.ClientSession:
    """Bodies pass as they are (no decompression); no total timeout: the leader bounds its own replies."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def relay_middleware(view: ClusterView, caller: Callable[[web.Request], str]) -> Middleware:
    """`caller(request)`: the client's address as this bridge sees it (behind its trusted proxies)."""

    @web.middleware
    async def relay(request: web.Request, handler: Handler) -> web.StreamResponse:
        if view.leading or request.path in LOCAL_PATHS:
            return await handler(request)
        if view.trusts(request):  # relayed to a bridge that led then, and leads no more: never twice
            raise NoLeader("The bridge that led has just stopped leading; try again shortly.")
        upstream = view.upstream()
        session = request.app[RELAY_SESSION]
        headers = _passed_on(request.headers)
        headers[RELAY_HEADER] = view.secret
        headers[CALLER_HEADER] = request[CALLER] = caller(request)  # (this bridge's log line says it too)
        # Only what the leader would take as a socket is relayed as one: an Upgrade header elsewhere is noise.
        upgrade = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        socket = upgrade and request.method == "GET" and request.path == "/ws"
        request.app[METRICS].relayed.labels("websocket" if socket else "http").inc()
        if socket:
            return await _relay_socket(request, view, session, headers)
        return await _relay_http(request, upstream, session, headers)

    return relay


def _passed_on(headers: Any) -> CIMultiDict[str]:
    # Repeated headers stay repeated: the leader must see the request as this bridge did (two API
    # keys are two keys, not one joined by a comma).
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in HOP_BY_HOP)


async def _relay_http(
    request: web.Request, upstream: str, session: aiohttp.ClientSession, headers: CIMultiDict[str]
) -> web.StreamResponse:
    body = request.content.iter_chunked(CHUNK) if request.body_exists else None
    response: web.StreamResponse | None = None
    try:
        # A frozen leader must not hold the request forever (its read starts once the body is sent); a
        # request that waits for its job's end (?wait=1) is silent for as long as the job runs.
        waits = request.query.get("wait", "").lower() in ("1", "true")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=None if waits else RELAY_READ_TIMEOUT)
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=body, allow_redirects=False,
            timeout=timeout,
        ) as answer:  # fmt: skip
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
        if response is not None and response.prepared:
            # Cut off mid-answer: the client must see a broken reply, never a shorter one that looks whole.
            log.warning("relay from %s cut off mid-answer: %s", upstream, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        log.info("relay to %s failed: %s", upstream, exc)
        never_sent = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
        if never_sent or request.method in SAFE_METHODS:
            raise NoLeader(UNREACHABLE) from None
        # Sent, then cut off: the leader may have done it (a job accepted), so "try again" could do it twice.
        raise Relayed(
            502,
            "The bridge that leads stopped answering after the request reached it: whether it was done is not "
            "known; see /execution-info before trying again.",
        ) from None


async def _open_upstream(
    session: aiohttp.ClientSession, url: str, request: web.Request, headers: CIMultiDict[str]
) -> aiohttp.ClientWebSocketResponse:
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):  # a frozen leader takes the connection, says nothing
            return await session.ws_connect(
                url + request.path_qs, headers=headers, autoping=True, heartbeat=30, max_msg_size=0, compress=0
            )
    except aiohttp.WSServerHandshakeError as exc:
        said = CIMultiDict(exc.headers or {})
        detail = urllib.parse.unquote(said.get("X-Detail", "")) or exc.message
        kept = {name: said[name] for name in PASSED_BACK if name in said}
        raise Relayed(exc.status, detail, kept) from None
    except (aiohttp.ClientConnectionError, TimeoutError):
        raise NoLeader(UNREACHABLE) from None


async def _relay_socket(
    request: web.Request, view: ClusterView, session: aiohttp.ClientSession, headers: CIMultiDict[str]
) -> web.WebSocketResponse:
    """The client's socket here, one to the leader behind it; frames pass on as they come. When the
    leader's socket goes away, the next leader's is opened (its `connected` frame, said once already,
    is not repeated); a close the leader means (an error frame's 1011) is passed on."""
    upstream: aiohttp.ClientWebSocketResponse | None = await _open_upstream(session, view.upstream(), request, headers)
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_CLIENT_MESSAGE)
    try:
        await ws.prepare(request)
    except BaseException:  # the client left during the handshake: the leader's socket must not linger
        assert upstream is not None
        await upstream.close()
        raise
    view.sockets.add(ws)
    reader = asyncio.ensure_future(_drain_client(ws))
    code: int | None = WSCloseCode.TRY_AGAIN_LATER
    message = b"no bridge leads"
    try:
        while upstream is not None:
            code, message = await _pump(upstream, ws, reader)
            if ws.closed or code not in LEADER_GONE:
                break
            upstream = await _next_leader(session, view, request, headers, ws)
            code, message = WSCloseCode.TRY_AGAIN_LATER, b"no bridge leads"
        if not ws.closed:
            await ws.close(code=code or WSCloseCode.GOING_AWAY, message=message)
    finally:
        view.sockets.discard(ws)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        if upstream is not None and not upstream.closed:
            await upstream.close()
    return ws


async def _drain_client(ws: web.WebSocketResponse) -> None:
    """Read the client's socket (it sends nothing the bridge uses) so its close and pings are seen."""
    async for _ in ws:
        pass


async def _pump(
    upstream: aiohttp.ClientWebSocketResponse, ws: web.WebSocketResponse, client_gone: asyncio.Future[None]
) -> tuple[int | None, bytes]:
    """Pass the leader's frames on until either side closes; the leader's close code and reason."""
    while True:
        receive = asyncio.ensure_future(upstream.receive())
        await asyncio.wait((receive, client_gone), return_when=asyncio.FIRST_COMPLETED)
        if not receive.done():
            receive.cancel()
            return WSCloseCode.OK, b""
        msg = receive.result()
        if msg.type is WSMsgType.TEXT:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(msg.data)
            continue
        if msg.type is WSMsgType.BINARY:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(msg.data)
            continue
        extra = msg.extra if isinstance(msg.extra, str) else ""
        if msg.type is WSMsgType.CLOSE:  # the code the leader's Close said: aiohttp's close_code turns
            return msg.data, extra.encode()  # to 1006 when its reply finds the leader already gone
        return upstream.close_code, extra.encode()


async def _next_leader(
    session: aiohttp.ClientSession,
    view: ClusterView,
    request: web.Request,
    headers: CIMultiDict[str],
    ws: web.WebSocketResponse,
) -> aiohttp.ClientWebSocketResponse | None:
    """The socket of whichever bridge leads next (this one, once it leads, included); None if none
    does within FOLLOW_PATIENCE or the client left meanwhile."""
    deadline = time.monotonic() + FOLLOW_PATIENCE
    while time.monotonic() < deadline and not ws.closed:
        url = view.own_url if view.leading else view.leader_url
        if url is not None and (view.leading or url != view.own_url):
            try:
                upstream = await _open_upstream(session, url, request, headers)
            except (NoLeader, Relayed):
                pass
            else:
                try:
                    async with asyncio.timeout(UPSTREAM_FIRST_FRAME):
                        first = await upstream.receive()
                except TimeoutError:
                    await upstream.close()
                    continue
                if first.type is WSMsgType.TEXT and first.data.encode() != CONNECTED_FRAME:
                    # The client may have just left: the pump that follows sees it, and closes this socket.
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.send_str(first.data)
                log.info("relayed socket now through %s", url)
                return upstream
        await asyncio.sleep(0.5)
    return None
