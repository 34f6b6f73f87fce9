"""The WebSocket edge: `/ws?clientId=`, the registry of open sockets, and the `listening` heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from .access import CALLER, scoped
from .clients import Status, check_client_id, status_message
from .errors import RateLimited
from .keys import HUB, SCHEDULER, SETTINGS

log = logging.getLogger(__name__)

CONNECTED_FRAME = orjson.dumps(status_message("connected", "server connected"))
LISTENING_FRAME = orjson.dumps(status_message("listening", "server is listening"))


class SocketHub:
    """Open sockets per clientId. Only a socket's handler reads it; its sender task alone writes it,
    in order, so a slow client never blocks the scheduler that publishes to it."""

    def __init__(self) -> None:
        self._queues: dict[str, dict[web.WebSocketResponse, asyncio.Queue[bytes | None]]] = {}
        self._by_address: dict[str, int] = {}

    def count(self, client_id: str) -> int:
        return len(self._queues.get(client_id, ()))

    def from_address(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def opened_from(self, address: str, change: int) -> None:
        left = self._by_address.get(address, 0) + change
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)

    def client_ids(self) -> list[str]:
        return list(self._queues)

    def add(self, client_id: str, ws: web.WebSocketResponse) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queues.setdefault(client_id, {})[ws] = queue
        return queue

    def remove(self, client_id: str, ws: web.WebSocketResponse) -> None:
        sockets = self._queues.get(client_id)
        if sockets is not None:
            sockets.pop(ws, None)
            if not sockets:
                del self._queues[client_id]

    def publish(self, client_id: str, message: Status, close: bool = False) -> None:
        self.send_frame(client_id, orjson.dumps(message), close)

    def send_frame(self, client_id: str, frame: bytes, close: bool = False) -> None:
        for queue in self._queues.get(client_id, {}).values():
            queue.put_nowait(frame)
            if close:
                queue.put_nowait(None)  # after an error frame: close with 1011

    async def close_all(self) -> None:
        for sockets in list(self._queues.values()):
            for ws in list(sockets):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    client_id = scoped(request, check_client_id(request.query.get("clientId")))
    hub = request.app[HUB]
    scheduler = request.app[SCHEDULER]
    settings = request.app[SETTINGS]
    address = request.get(CALLER, request.remote or "")
    if hub.count(client_id) >= settings.max_sockets_per_client:
        raise RateLimited(f"This clientId already has {settings.max_sockets_per_client} sockets open, the limit.")
    if hub.from_address(address) >= settings.max_sockets_per_ip:
        raise RateLimited(f"Your address already has {settings.max_sockets_per_ip} sockets open, the limit.")
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    hub.opened_from(address, +1)
    scheduler.remember(client_id)
    queue = hub.add(client_id, ws)
    scheduler.socket_opened(client_id)
    sender = asyncio.create_task(_send_frames(ws, queue), name=f"ws sender {client_id}")
    queue.put_nowait(CONNECTED_FRAME)
    log.info("client %s: socket open", client_id)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                break
    finally:
        hub.opened_from(address, -1)
        hub.remove(client_id, ws)
        scheduler.socket_closed(client_id)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        log.info("client %s: socket closed", client_id)
    return ws


async def _send_frames(ws: web.WebSocketResponse, queue: asyncio.Queue[bytes | None]) -> None:
    try:
        while True:
            frame = await queue.get()
            if frame is None:
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"job failed")
                return
            await ws.send_frame(frame, WSMsgType.TEXT)
    except (ConnectionError, RuntimeError) as exc:
        log.debug("socket send failed: %s", exc)


async def heartbeat(app: web.Application) -> AsyncIterator[None]:
    """Every `heartbeat` seconds, a `listening` frame to each socket whose client has no job running."""
    hub, scheduler = app[HUB], app[SCHEDULER]
    interval = scheduler.settings.heartbeat

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            for client_id in hub.client_ids():
                if not scheduler.is_running(client_id):
                    hub.send_frame(client_id, LISTENING_FRAME)

    task = asyncio.create_task(beat(), name="heartbeat")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
