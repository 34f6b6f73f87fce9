"""The WebSocket edge: `/ws?clientId=`, the registry of open sockets, and the `listening` heartbeat."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterable
from typing import cast

import orjson
from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from ..core.clients import Status, status_message
from ..core.supervisor import Supervisor
from ..errors import BadInput, RateLimited
from .access import CALLER, client_id_of
from .appkeys import HUB, SCHEDULER, SETTINGS

__all__ = ["HIGH_WATER", "MAX_CLIENT_MESSAGE", "Outbox", "SocketHub", "heartbeat", "text_frame", "websocket_handler"]

log = logging.getLogger(__name__)

CONNECTED_FRAME = orjson.dumps(status_message("connected", "server connected"))
LISTENING_FRAME = orjson.dumps(status_message("listening", "server is listening"))


# Frames wait in an outbox (drained by a task through aiohttp's flow control) once this much is
# unsent to a socket; below it they go straight to the socket.
HIGH_WATER = 64 * 1024
MAX_HELD = 4096  # frames kept for one client whose socket is expected back; past it, only endings
# Frames waiting in one outbox at most: a socket that falls this far behind reads too slowly or not
# at all (a client that talks but never reads is never pinged out), and is cut rather than let grow.
MAX_BEHIND = 1024
# Bytes of a message a client may send (closed with 1009 beyond): the bridge uses none of them, and a
# message is gathered in memory until whole (aiohttp's 4 MB default, on 256 sockets of one address,
# would let it pin a GB).
MAX_CLIENT_MESSAGE = 64 * 1024
GRACE_MARGIN = 1.0  # seconds frames stay held past a disconnect grace (the cancels' own frames, if it ran out)


def text_frame(payload: bytes) -> bytes:
    """A whole, unmasked WebSocket text frame (RFC 6455 §5.2), as a server sends it. Valid whatever
    extensions were agreed: a frame without RSV1 is uncompressed under permessage-deflate too."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


class Outbox:
    """One socket's outgoing frames, in order. With nothing waiting and the client reading, a frame is
    written at once, pre-encoded, with no task and no queue (10,000 idle sockets hear a heartbeat every
    second); otherwise frames wait here and one task sends them, awaiting a slow client, so the
    scheduler that publishes is never blocked. None means: close with 1011 after what is before it."""

    __slots__ = ("replayed", "sender", "supervisor", "transport", "waiting", "ws")

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None, supervisor: Supervisor
    ) -> None:
        self.ws = ws
        self.supervisor = supervisor  # the hub's: it holds the sender task while one runs
        # Not isinstance(transport, asyncio.WriteTransport): uvloop's have its methods, not its class,
        # and every frame would go through a task.
        writable = hasattr(transport, "get_write_buffer_size")
        self.transport = cast(asyncio.WriteTransport, transport) if writable else None
        self.waiting: collections.deque[bytes | None] = collections.deque()
        self.sender: asyncio.Task[None] | None = None
        self.replayed = 0  # held frames given at once: the cut allows for them

    def put(self, frame: bytes | None, held: bool = False) -> None:
        """`held`: a frame held while the client had no socket, replayed at once (at most MAX_HELD of
        them): it counts toward no cut, since the client had no time to read it yet."""
        if self.ws.closed:
            return  # nothing after a Close frame (RFC 6455 §5.5.1)
        transport = self.transport
        if (
            frame is not None
            and self.sender is None
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() < HIGH_WATER
        ):
            transport.write(text_frame(frame))
            return
        if transport is not None and transport.is_closing():
            return  # the connection is going: nothing more reaches it
        if held:
            self.replayed += 1
        elif len(self.waiting) >= MAX_BEHIND + self.replayed:
            self._cut()
            return
        self.waiting.append(frame)
        if self.sender is None and self.supervisor.accepting:
            self.sender = self.supervisor.spawn(self._send_waiting(), "ws sender")

    def _cut(self) -> None:
        """Drop the connection of a socket that stopped reading: its handler ends as for any lost
        socket (the client's disconnect grace starts), and what waited here goes."""
        log.warning("a socket %d frames behind is cut: its client reads too slowly or not at all", len(self.waiting))
        self.waiting.clear()
        if self.transport is not None:
            self.transport.abort()
        elif self.sender is not None:
            self.sender.cancel()  # (no transport to cut: the handler's own close ends it)

    async def _send_waiting(self) -> None:
        try:
            while self.waiting and not self.ws.closed:
                frame = self.waiting.popleft()
                if frame is None:
                    await self.ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"job failed")
                    return
                await self.ws.send_frame(frame, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("socket send failed: %s", exc)
        finally:
            self.sender = None

    async def close(self) -> None:
        sender = self.sender
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


EVERY_SOCKET = 1 << 30  # `hold`'s sockets when it is not known how many will come back: all that open in time


class SocketHub:
    """Open sockets per clientId, each with its outbox. Only a socket's handler reads it."""

    def __init__(self) -> None:
        self._outboxes: dict[str, dict[web.WebSocketResponse, Outbox]] = {}
        self._by_address: dict[str, int] = {}
        self._held: dict[str, list[bytes | None]] = {}  # frames for clients expected back, until they are
        self._expected: dict[str, int] = {}  # how many of a held client's sockets are expected back
        self._closed_at: dict[str, list[float]] = {}  # when sockets of a client with others open closed
        self._let_go_at: dict[str, asyncio.TimerHandle] = {}
        self._hold_all_until = -math.inf  # loop time until which every client without a socket is held for
        self.supervisor = Supervisor()  # the heartbeat, and the sender of each socket that is behind

    def count(self, client_id: str) -> int:
        return len(self._outboxes.get(client_id, ()))

    def from_address(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def opened_from(self, address: str, change: int) -> None:
        left = self._by_address.get(address, 0) + change
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)

    def client_ids(self) -> list[str]:
        return list(self._outboxes)

    def open_sockets(self) -> int:
        return sum(len(sockets) for sockets in self._outboxes.values())

    def add(self, client_id: str, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None) -> Outbox:
        outbox = Outbox(ws, transport, self.supervisor)
        self._outboxes.setdefault(client_id, {})[ws] = outbox
        return outbox

    def remove(self, client_id: str, ws: web.WebSocketResponse) -> list[float]:
        """Forget a closed socket. Returns, when it was the client's last, when its others closed (loop
        time; the latest 16): sockets lost together (two tabs on one link) are all expected back."""
        sockets = self._outboxes.get(client_id)
        if sockets is None:
            return []
        sockets.pop(ws, None)
        if not sockets:
            del self._outboxes[client_id]
            return self._closed_at.pop(client_id, [])
        closed = self._closed_at.setdefault(client_id, [])
        closed.append(asyncio.get_running_loop().time())
        del closed[:-16]
        return []

    def publish(self, client_id: str, message: Status, close: bool = False) -> None:
        self.send_frame(client_id, orjson.dumps(message), close, _is_ending(message))

    def beat(self, client_id: str) -> None:
        """A `listening` heartbeat to the client's open sockets: never held, it is said again soon."""
        for outbox in self._outboxes.get(client_id, {}).values():
            outbox.put(LISTENING_FRAME)

    def send_frame(self, client_id: str, frame: bytes, close: bool = False, ending: bool = False) -> None:
        outboxes = self._outboxes.get(client_id)
        held = self._held.get(client_id)
        if outboxes is None and held is None:
            left = self._hold_all_until - asyncio.get_running_loop().time()
            if left > 0:  # how many of its sockets are on their way back is not known: each hears it
                self.hold((client_id,), left, sockets=EVERY_SOCKET)
                held = self._held[client_id]
        # Held while no socket is back, and while one is but others lost with it are still expected.
        # Past MAX_HELD only a job's ending is (progress is said again; an ending never is), up to twice it.
        if held is not None and (len(held) < MAX_HELD or (ending and len(held) < 2 * MAX_HELD)):
            held += (frame, None) if close else (frame,)
        if outboxes is None:
            return
        for outbox in outboxes.values():
            outbox.put(frame)
            if close:
                outbox.put(None)  # after an error frame: close with 1011

    def hold(self, client_ids: Iterable[str], seconds: float, sockets: int = 1) -> None:
        """These clients' sockets are expected back (their jobs were taken over after a restart, or by
        another bridge of a cluster; or a socket closed within its disconnect grace): what is told to
        them meanwhile waits, for `seconds`, and a socket that opens hears it first, in order; each of
        the first `sockets` that open does."""
        loop = asyncio.get_running_loop()
        for client_id in client_ids:
            if client_id in self._outboxes:
                continue
            self._held.setdefault(client_id, [])
            # Added to those still expected: a tab back and lost again while another is still away
            self._expected[client_id] = self._expected.get(client_id, 0) + sockets
            earlier = self._let_go_at.pop(client_id, None)
            if earlier is not None:
                earlier.cancel()
            self._let_go_at[client_id] = loop.call_later(seconds, self._let_go, client_id)

    def hold_all(self, seconds: float) -> None:
        """For `seconds`, what is told to any client without a socket waits for one (see `hold`): after
        a restart, or a change of leader, sockets are on their way back, and a job accepted meanwhile
        (through another bridge, or over REST) must not speak to no one."""
        self._hold_all_until = asyncio.get_running_loop().time() + seconds

    def replay(self, client_id: str, outbox: Outbox, untold: int) -> None:
        """What was held for the client, to its socket back, in order. A frame's `jobs_left` is counted
        as it is sent, now: the endings held after it, and the `untold` jobs whose ending the client
        has not been told (a job submitted meanwhile among them). So an `error` that closed the socket
        when it was told closes it now only if nothing is left to hear."""
        held = self._held.get(client_id)
        expected = self._expected.get(client_id, 1) - 1
        if expected > 0:  # more of its sockets to come back: they hear this too, and what follows
            self._expected[client_id] = expected
            held = list(held or ())
        else:
            self._let_go(client_id)
        if not held:
            return
        frames = [(frame, held[i + 1 : i + 2] == [None]) for i, frame in enumerate(held) if frame is not None]
        statuses = [orjson.loads(frame) for frame, _ in frames]  # (rare: a socket back after a loss)
        endings = sum(map(_is_ending, statuses))
        for (frame, closing), status in zip(frames, statuses, strict=True):
            if "job_id" in status:
                endings -= _is_ending(status)
                left = endings + untold
                if status.get("jobs_left") != left:
                    frame = orjson.dumps({**status, "jobs_left": left})
                closing = closing and not left
            outbox.put(frame, held=True)
            if closing:
                outbox.put(None, held=True)

    def _let_go(self, client_id: str) -> None:
        timer = self._let_go_at.pop(client_id, None)
        if timer is not None:
            timer.cancel()  # (a no-op when it is the timer that calls)
        self._held.pop(client_id, None)
        self._expected.pop(client_id, None)

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY, message: bytes = b"server shutdown") -> None:
        for sockets in list(self._outboxes.values()):
            for ws in list(sockets):
                await ws.close(code=code, message=message)


def _is_ending(status: Status) -> bool:
    return "job_id" in status and status["status"] in ("closed", "error")


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    client_id = client_id_of(request)
    assert client_id is not None
    hub = request.app[HUB]
    scheduler = request.app[SCHEDULER]
    settings = request.app[SETTINGS]
    address = request.get(CALLER, request.remote or "")
    if hub.count(client_id) >= settings.max_sockets_per_client:
        raise RateLimited(f"This clientId already has {settings.max_sockets_per_client} sockets open, the limit.")
    if hub.from_address(address) >= settings.max_sockets_per_ip:
        raise RateLimited(f"Your address already has {settings.max_sockets_per_ip} sockets open, the limit.")
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":  # a browser or curl, not a socket
        raise BadInput("This is the WebSocket endpoint: connect to it with a WebSocket client (Upgrade: websocket).")
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_CLIENT_MESSAGE)
    await ws.prepare(request)
    hub.opened_from(address, +1)
    scheduler.remember(client_id)
    outbox = hub.add(client_id, ws, request.transport)
    client = scheduler.socket_opened(client_id)
    outbox.put(CONNECTED_FRAME)
    hub.replay(client_id, outbox, len(client.untold) - client.being_accepted())
    log.debug("client %s: socket open", client_id)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                break
    finally:
        hub.opened_from(address, -1)
        others_closed = hub.remove(client_id, ws)
        if scheduler.socket_closed(client_id):  # its jobs go on for the grace: so do their frames, held
            window = settings.disconnect_grace + GRACE_MARGIN
            since = asyncio.get_running_loop().time() - window
            lost = 1 + sum(1 for at in others_closed if at > since)  # this one, and those lost with it
            hub.hold((client_id,), window, sockets=lost)
        await outbox.close()
        log.debug("client %s: socket closed", client_id)
    return ws


async def heartbeat(app: web.Application) -> AsyncIterator[None]:
    """Every `heartbeat` seconds, a `listening` frame to each socket whose client has no job running."""
    hub, scheduler = app[HUB], app[SCHEDULER]
    interval = scheduler.settings.heartbeat

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            for client_id in hub.client_ids():
                if not scheduler.is_running(client_id):
                    hub.beat(client_id)

    hub.supervisor.spawn(beat(), "heartbeat", daemon=True)
    yield
    await hub.supervisor.wait_and_close(0)
