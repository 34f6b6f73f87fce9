"""A Python client for comfybridge, async (`AsyncBridge`) and blocking (`Bridge`).

    async with AsyncBridge("http://127.0.0.1:8000") as bridge:
        job = await bridge.run("text-to-image", {"6/text": "a red fox"}, on_event=print)
        paths = await bridge.save_results("results/")

    with Bridge("http://127.0.0.1:8000") as bridge:
        for event in bridge.follow(bridge.generate("invert", {}, files={"1/image": "cat.png"})):
            print(event.percent)

Every refusal raises `BridgeError` with the bridge's `detail`; a job that ends in error raises
`JobFailed`. Results are streamed to files, never held whole in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiofiles
import aiohttp
import orjson

T = TypeVar("T")
log = logging.getLogger(__name__)
# Downloads and jobs waited for take as long as they take; only connecting is bounded.
NO_TOTAL = aiohttp.ClientTimeout(total=None, sock_connect=30)
FileSource = str | Path | bytes | tuple[str, bytes]  # a path, raw bytes, or (file name, bytes)
# A follower whose socket closed (the bridge restarting, a network drop, the bridge's 1011 racing a
# next job) opens it again for this long at the most, counted from the loss.
RECONNECT_FOR = 120.0
# The pause before the second attempt, doubling up to a second: well inside the bridge's disconnect
# grace (5 s by default), past which a client's jobs are cancelled.
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 1.0
# One reconnect attempt's bound: an address that swallows packets (a host gone, a firewall) would
# hold the attempt for aiohttp's 30 s connect timeout, far past the bridge's grace.
RECONNECT_TRY = 2.5
RETRIED = frozenset({408, 429, 502, 503, 504})  # a refused handshake that a later attempt may pass
ENDINGS_KEPT = 1024  # endings seen, for a job followed only once it ended
BACKLOG = 1024  # frames kept while nobody listens (a job queued, then followed)
HEARTBEAT = 30.0  # seconds between pings: a connection dropped without a word is found out
UNKNOWN_KINDS_WARNED = 64  # kinds of unknown frame warned about per client; the rest go to debug


__all__ = ["AsyncBridge", "Bridge", "BridgeError", "Event", "Job", "JobFailed", "ResultFile"]


class BridgeError(Exception):
    """The bridge refused a request; `detail` is its reason, `status` the HTTP status, and
    `retry_after` the seconds its `Retry-After` asks to wait (429, 503), if it gave one."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class JobFailed(Exception):
    """A job ended with an `error` status (ComfyUI's error, `interrupted`, a time-out, ...)."""

    def __init__(self, job_id: str, detail: str) -> None:
        super().__init__(detail)
        self.job_id = job_id
        self.detail = detail


@dataclass(frozen=True)
class Event:
    """One status message: `status` is connected, listening, progress, closed or error."""

    status: str
    detail: str
    job_id: str | None = None
    jobs_left: int | None = None

    @property
    def percent(self) -> float | None:
        """The progress of a `progress` event, 0 to 100."""
        return float(self.detail.rstrip("%")) if self.status == "progress" else None

    @property
    def ended(self) -> bool:
        return self.status in ("closed", "error") and self.job_id is not None


@dataclass(frozen=True)
class Job:
    job_id: str
    place: int  # 1 + the jobs ahead of it when it was accepted ("queued / N")


@dataclass(frozen=True)
class ResultFile:
    path: Path
    job_id: str | None
    content_type: str


class AsyncBridge:
    """One clientId's view of a bridge. Open a socket before generating to see every event:
    `run` and `follow` do."""

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        api_key: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.client_id = client_id or str(uuid.uuid4())
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # sent with every request
        self._api_key = api_key
        self._session = session
        self._own_session = session is None
        # The client's one socket, read by one task that hands each frame to every waiting
        # `follow` and `events` (a queue each; None: the socket ended).
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._listeners: set[asyncio.Queue[Event | BridgeError | None]] = set()
        self._backlog: deque[Event | BridgeError] = deque(maxlen=BACKLOG)  # for the next listener
        self._ended: OrderedDict[str, Event] = OrderedDict()  # job_id -> its closed or error
        self._lost_at: float | None = None  # monotonic time the socket was lost, until one is open again
        self._closed = asyncio.Event()
        self._unknown_kinds: set[str] = set()  # kinds of frame not understood, warned about once each

    async def __aenter__(self) -> AsyncBridge:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket and the session; a `follow` or `events` waiting raises BridgeError."""
        self._closed.set()  # no socket is opened from now on (a follower reconnecting gives up)
        for frames in tuple(self._listeners):  # before the reader's end (None) says less
            frames.put_nowait(BridgeError(0, "the client was closed"))
        if self._reader is not None:  # first, or it would take the close for a lost socket
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    # catalogue -------------------------------------------------------------------------------
    async def workflows(self) -> list[str]:
        listed: list[str] = await self._json("GET", "/workflow-list")
        return listed

    async def catalogue(self) -> list[dict[str, Any]]:
        """Each workflow's name, description, thumbnail link and inputs."""
        entries: list[dict[str, Any]] = await self._json("GET", "/workflow-list", params={"detail": "1"})
        return entries

    async def inputs(self, workflow: str) -> dict[str, dict[str, Any]]:
        described: dict[str, dict[str, Any]] = await self._json("GET", "/workflow-info", params={"workflow": workflow})
        return described

    # a job -----------------------------------------------------------------------------------
    async def upload(self, files: Mapping[str, FileSource]) -> dict[str, str]:
        """Upload files under their identifiers; returns the stored name of each."""
        form = aiohttp.FormData()
        for key, source in files.items():
            name, data = await _read_source(source)
            form.add_field(key, data, filename=name)
        stored: dict[str, str] = await self._json("POST", "/upload", data=form, client=True)
        return stored

    async def generate(
        self, workflow: str, inputs: Mapping[str, Any] | None = None, files: Mapping[str, FileSource] | None = None
    ) -> Job:
        """Queue a job (uploading `files` first, as inputs of the same names)."""
        body: dict[str, Any] = {"workflow": workflow, **(inputs or {})}
        if files:
            body.update(await self.upload(files))
        answer = await self._json("POST", "/generate-based-workflow", json=body, client=True)
        place = int(str(answer["detail"]).rsplit("/", 1)[-1])
        return Job(answer["job_id"], place)

    async def events(self) -> AsyncIterator[Event]:
        """Every status message of this client, from a socket opened on first use, until it closes."""
        await self._socket()
        with self._listening() as frames:
            while (item := await frames.get()) is not None:
                if isinstance(item, BridgeError):
                    raise item
                yield item

    async def follow(self, job: Job, on_event: Callable[[Event], Any] | None = None) -> Event:
        """Wait for the job's end, passing each of its events to `on_event`; raises JobFailed.
        Several jobs may be followed at once, in any order; a socket that closes before the job
        ends is opened again (the bridge says its frames again), for up to RECONNECT_FOR."""
        async for event in self._job_events(job):
            if on_event is not None:
                on_event(event)
            if event.ended and event.job_id == job.job_id:
                if event.status == "error":
                    raise JobFailed(job.job_id, event.detail)
                return event
        raise AssertionError("unreachable: a job's events end with its end")

    async def _job_events(self, job: Job) -> AsyncIterator[Event]:
        """The job's frames (and those that name no job) up to its `closed` or `error`."""
        opened = self._ws is None or self._ws.closed  # its frames may have gone to no socket
        await self._socket()
        with self._listening() as frames:
            ended = self._ended.get(job.job_id)  # it ended before anyone followed it
            if ended is None and opened:
                ended = await self._ended_meanwhile(job)
            while True:
                if ended is not None and frames.empty():
                    yield ended  # its frames went to other followers, or came before the backlog's
                    return
                item = await frames.get()
                if item is None:
                    await self._socket(reconnect=True)
                    ended = ended or await self._ended_meanwhile(job)
                    continue
                if isinstance(item, BridgeError):
                    raise item
                if item.job_id not in (None, job.job_id):
                    if item.ended and item.jobs_left == 0 and ended is None:
                        # Nothing left as that was sent: this job ended unheard, or was accepted since
                        # (the count is of that moment); the status now tells which.
                        ended = await self._ended_meanwhile(job)
                    continue
                yield item
                if item.ended:
                    return

    async def _ended_meanwhile(self, job: Job) -> Event | None:
        """On a socket just opened: the job's end, if it came while no socket was open and the bridge
        holds it no more (an outage longer than its disconnect grace cancelled the job; a job
        followed only once it ended). `/execution-info` names the client's last job only: an earlier
        one of a client with nothing left ended too, and how is not known any more (BridgeError)."""
        unknown = f"job {job.job_id}: the bridge does not know this client, or no job of it: its end is not known"
        try:
            now = await self.status()
        except BridgeError as exc:
            if exc.status == 400:  # an unknown clientId
                raise BridgeError(400, unknown) from None
            return None  # the frames will tell
        except (aiohttp.ClientError, OSError):
            return None  # the frames will tell
        if now.job_id is None and job.job_id not in self._ended:
            # No trace of any job of this client (a bridge on another data folder; or all of them
            # ended and forgotten): no frame of this one will come.
            raise BridgeError(0, unknown)
        if not now.ended or now.jobs_left:
            return None
        if now.job_id == job.job_id and job.job_id not in self._ended:
            return now
        return self._unheard_end(job)

    def _unheard_end(self, job: Job) -> Event:
        """A job known to have ended (its client has nothing left): its end if heard (the bridge held it
        and said it on the new socket), else BridgeError, since the bridge keeps only the last one's."""
        told = self._ended.get(job.job_id)
        if told is not None:
            return told
        raise BridgeError(
            0,
            f"job {job.job_id} ended while this client had no socket open, and its end is not kept any more: "
            "its results, if any, are at /history",
        )

    @contextlib.contextmanager
    def _listening(self) -> Iterator[asyncio.Queue[Event | BridgeError | None]]:
        """A queue of every frame from now on, and of those that came while nobody listened."""
        frames: asyncio.Queue[Event | BridgeError | None] = asyncio.Queue()
        while self._backlog:
            frames.put_nowait(self._backlog.popleft())
        self._listeners.add(frames)
        try:
            yield frames
        finally:
            self._listeners.discard(frames)

    async def run(
        self,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        files: Mapping[str, FileSource] | None = None,
        on_event: Callable[[Event], Any] | None = None,
    ) -> Job:
        """Generate and wait for the end: socket first, so no event is missed."""
        await self._socket()
        job = await self.generate(workflow, inputs, files)
        await self.follow(job, on_event)
        return job

    async def status(self) -> Event:
        """`/execution-info`: the client's status now (for clients that poll instead of listening)."""
        frame = await self._json("GET", "/execution-info", client=True)
        return Event(frame["status"], frame["detail"], frame.get("job_id"), frame.get("jobs_left"))

    async def save_results(self, folder: str | Path) -> list[ResultFile]:
        """Fetch every finished result of this client into `folder` (streamed), then the bridge
        forgets them. An existing file is never overwritten: `name-1.png`, ..."""
        params = {"clientId": self.client_id}
        url = f"{self.url}/history"
        async with self.session.get(url, params=params, headers=self._headers, timeout=NO_TOTAL) as resp:
            return await _save_parts(resp, Path(folder))

    async def generate_and_save(
        self,
        workflow: str,
        folder: str | Path,
        inputs: Mapping[str, Any] | None = None,
        files: Mapping[str, FileSource] | None = None,
    ) -> list[ResultFile]:
        """One job in one request (`?wait=1`): its results saved into `folder` as `save_results`
        does; raises JobFailed. No socket: for scripts that need no progress."""
        body: dict[str, Any] = {"workflow": workflow, **(inputs or {})}
        if files:
            body.update(await self.upload(files))
        params = {"clientId": self.client_id, "wait": "1"}
        url = f"{self.url}/generate-based-workflow"
        async with self.session.post(url, params=params, json=body, headers=self._headers, timeout=NO_TOTAL) as resp:
            if resp.status == 502:  # the job's own failure names it; a proxy's 502 does not
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                    failed = orjson.loads(await resp.read())
                    raise JobFailed(failed["job_id"], failed["detail"])
            return await _save_parts(resp, Path(folder))

    async def interrupt(self) -> str:
        answer = await self._json("POST", "/interrupt", client=True)
        return str(answer["detail"])

    async def free(self) -> str:
        answer = await self._json("POST", "/free", client=True)
        return str(answer["detail"])

    async def generation_count(self) -> int:
        return int(await self._json("GET", "/generation-count"))

    # plumbing --------------------------------------------------------------------------------
    async def _socket(self, reconnect: bool = False) -> aiohttp.ClientWebSocketResponse:
        """The open socket, or a new one. With `reconnect`, a refusal that may pass later (the
        bridge restarting, a proxy without it yet) is tried again, until RECONNECT_FOR after the
        loss (the same limit for every follower of the lost socket)."""
        async with self._connecting:  # several followers that lost the socket open one
            if self._ws is not None and not self._ws.closed:
                return self._ws
            give_up = (self._lost_at or time.monotonic()) + RECONNECT_FOR
            pause = RECONNECT_FIRST
            while True:
                if self._closed.is_set():
                    raise BridgeError(0, "the client was closed")
                try:
                    attempt: Awaitable[aiohttp.ClientWebSocketResponse] = self._connect()
                    if reconnect:  # bounded, so that the next attempt comes within the bridge's grace
                        attempt = asyncio.wait_for(attempt, max(0.0, min(RECONNECT_TRY, give_up - time.monotonic())))
                    ws = await attempt
                    break
                except (BridgeError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    status = exc.status if isinstance(exc, BridgeError) else 0
                    if not reconnect or (status and status not in RETRIED) or time.monotonic() >= give_up:
                        raise exc if isinstance(exc, BridgeError) else BridgeError(0, f"no socket: {exc!r}") from None
                with contextlib.suppress(TimeoutError):  # a close() ends the wait
                    await asyncio.wait_for(self._closed.wait(), pause)
                pause = min(pause * 2, RECONNECT_MAX)
            self._ws, self._lost_at = ws, None
            self._reader = asyncio.ensure_future(self._read(ws))
            return ws

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        params = {"clientId": self.client_id}
        if self._api_key:
            params["token"] = self._api_key
        ws_url = self.url.replace("http", "ws", 1) + "/ws"
        try:
            return await self.session.ws_connect(ws_url, params=params, heartbeat=HEARTBEAT)
        except aiohttp.WSServerHandshakeError as exc:
            # The bridge says why in X-Detail: a handshake's refusal body is not readable here.
            told = exc.headers.get("X-Detail") if exc.headers else None
            wait = exc.headers.get("Retry-After", "") if exc.headers else ""
            detail = urllib.parse.unquote(told) if told else exc.message
            raise BridgeError(exc.status, detail, _seconds(wait)) from None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The socket's one reader: each frame to every listener, and its end (None) once it closes
        (whatever ended it: a follower must never wait on a reader that is gone)."""
        try:
            await self._read_frames(ws)
        finally:
            if self._ws is ws:
                self._ws, self._lost_at = None, time.monotonic()
            for frames in tuple(self._listeners):
                frames.put_nowait(None)
            await ws.close()

    async def _read_frames(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                try:
                    frame = orjson.loads(msg.data)
                    item = Event(frame["status"], frame["detail"], frame.get("job_id"), frame.get("jobs_left"))
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    # A frame of a kind this client does not know (a newer bridge's, a proxy's): the
                    # status frames around it still tell every job's story.
                    self._ignored(msg.data)
                    continue
                if item.ended:
                    self._ended[str(item.job_id)] = item
                    while len(self._ended) > ENDINGS_KEPT:
                        self._ended.popitem(last=False)
                if not self._listeners:
                    self._backlog.append(item)
                for frames in tuple(self._listeners):
                    frames.put_nowait(item)

    def _ignored(self, data: str) -> None:
        """Log a frame that is not a status: a warning for the first of its kind, debug after that,
        so that a stream of them (a proxy's keep-alives) does not flood the log."""
        kind = _frame_kind(data)
        if kind in self._unknown_kinds or len(self._unknown_kinds) >= UNKNOWN_KINDS_WARNED:
            log.debug("ignored a frame that is not a status (%s): %r", kind, data[:200])
            return
        self._unknown_kinds.add(kind)
        log.warning("ignored a frame that is not a status (%s; more of its kind: debug level): %r", kind, data[:200])

    async def _json(self, method: str, path: str, client: bool = False, **kwargs: Any) -> Any:
        params = dict(kwargs.pop("params", {}))
        if client:
            params["clientId"] = self.client_id
        request = self.session.request(method, self.url + path, params=params, headers=self._headers, **kwargs)
        async with request as resp:
            await _raise_for(resp)
            return orjson.loads(await resp.read())


def _frame_kind(data: str) -> str:
    """What kind of frame this is: its `type` or `kind` (as ComfyUI's and most others say it), else
    its keys, else that it is no JSON object."""
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(frame, dict):
        return f"JSON {type(frame).__name__}"
    named = frame.get("type", frame.get("kind"))
    return named[:100] if isinstance(named, str) else ",".join(sorted(frame))[:100]


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        detail = str(orjson.loads(await resp.read()).get("detail"))
    except (orjson.JSONDecodeError, AttributeError):
        detail = resp.reason or "error"
    raise BridgeError(resp.status, detail, _seconds(resp.headers.get("Retry-After", "")))


def _seconds(retry_after: str) -> float | None:
    """A Retry-After in seconds (the bridge's form; an HTTP date is left unread)."""
    return float(retry_after) if retry_after.isdigit() else None


async def _save_parts(resp: aiohttp.ClientResponse, target: Path) -> list[ResultFile]:
    """A multipart answer of results, each part streamed into a file of `target` of its own."""
    saved: list[ResultFile] = []
    if resp.status == 204:
        return saved
    await _raise_for(resp)
    await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
    reader = aiohttp.MultipartReader.from_response(resp)
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        name = Path(part.filename or "").name
        if name in ("", ".", ".."):  # nothing of a name that is only a folder's
            name = f"{part.name}.bin"
        path = await asyncio.to_thread(_free_path, target / name)
        async with aiofiles.open(path, "wb") as handle:
            while chunk := await part.read_chunk():
                await handle.write(chunk)
        content_type = part.headers.get("Content-Type", "application/octet-stream")
        saved.append(ResultFile(path, part.headers.get("X-Job-Id"), content_type))
    return saved


async def _read_source(source: FileSource) -> tuple[str, bytes]:
    if isinstance(source, tuple):
        return source
    if isinstance(source, bytes):
        return "upload.bin", source
    path = Path(source)
    return path.name, await asyncio.to_thread(path.read_bytes)


def _free_path(path: Path) -> Path:
    candidate, index = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1
    return candidate


class Bridge:
    """The blocking face of AsyncBridge, for scripts and notebooks: the same methods, run on a
    private event loop in a background thread."""

    def __init__(self, url: str, client_id: str | None = None, api_key: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="comfybridge-client", daemon=True)
        self._thread.start()
        self._async = AsyncBridge(url, client_id, api_key)
        self.client_id = self._async.client_id

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result()

    def workflows(self) -> list[str]:
        return self._call(self._async.workflows())

    def catalogue(self) -> list[dict[str, Any]]:
        return self._call(self._async.catalogue())

    def inputs(self, workflow: str) -> dict[str, dict[str, Any]]:
        return self._call(self._async.inputs(workflow))

    def upload(self, files: Mapping[str, FileSource]) -> dict[str, str]:
        return self._call(self._async.upload(files))

    def generate(
        self,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        files: Mapping[str, FileSource] | None = None,
        listen: bool = True,
    ) -> Job:
        """Queue a job, the socket opened first so that `follow` misses nothing. `listen=False`
        for a client that only polls (`status`): with no socket ever opened, its jobs are never
        cancelled by a disconnect (the contract's REST-only clients)."""
        if listen:
            self._call(self._async._socket())
        return self._call(self._async.generate(workflow, inputs, files))

    def follow(self, job: Job) -> Iterator[Event]:
        """The job's events as they come, ending with its `closed`; raises JobFailed on `error`.
        They are read on the client's loop and passed here: nothing of the loop's is touched from
        this thread, also when the caller stops iterating early."""
        events: queue.SimpleQueue[Event | BaseException | None] = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for event in self._async._job_events(job):
                    events.put(event)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # raised in the caller's thread
                events.put(exc)
            else:
                events.put(None)

        pumping: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := events.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.ended and item.status == "error":
                    raise JobFailed(job.job_id, item.detail)
        finally:
            pumping.cancel()  # thread-safe: the task is cancelled on its loop

    def run(
        self,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        files: Mapping[str, FileSource] | None = None,
        on_event: Callable[[Event], Any] | None = None,
    ) -> Job:
        return self._call(self._async.run(workflow, inputs, files, on_event))

    def status(self) -> Event:
        return self._call(self._async.status())

    def save_results(self, folder: str | Path) -> list[ResultFile]:
        return self._call(self._async.save_results(folder))

    def generate_and_save(
        self,
        workflow: str,
        folder: str | Path,
        inputs: Mapping[str, Any] | None = None,
        files: Mapping[str, FileSource] | None = None,
    ) -> list[ResultFile]:
        return self._call(self._async.generate_and_save(workflow, folder, inputs, files))

    def interrupt(self) -> str:
        return self._call(self._async.interrupt())

    def free(self) -> str:
        return self._call(self._async.free())

    def generation_count(self) -> int:
        return self._call(self._async.generation_count())
