"""ComfyUI client: one backend's REST calls and its event WebSocket, with automatic reconnect."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from yarl import URL

from ..store.files import SMALL_FILE, all_bounded, in_thread, open_off_loop
from . import shapes
from .folders import InputFolders, LocalInputs, LocalOutputs, LocalReadFailed, LocalTooLarge, Sink
from .shapes import Complaints, Malformed, OutputRef, describe_refusal

__all__ = [
    "CHUNK",
    "DIALECTS",
    "MB",
    "MISSED",
    "BackendUnavailable",
    "ComfyClient",
    "MalformedAnswer",
    "OutputGone",
    "PartlyRefused",
    "PromptRefused",
    "ResultTooLarge",
    "shown",
]

log = logging.getLogger(__name__)

EventHandler = Callable[[str, dict[str, Any]], None]
ConnectHandler = Callable[[], Awaitable[None]]
DisconnectHandler = Callable[[], None]

CHUNK = 256 * 1024
MB = 1024 * 1024
OBJECT_INFO_AT_ONCE = 8  # node classes asked about at a time
MAX_ANSWER = 128 * MB  # the largest REST answer read (/object_info with many custom nodes: tens of MB)
SLOW_RATE = 64 * 1024  # bytes a second an output file's download earns beyond comfy_timeout
HEARTBEAT = 10.0  # seconds between pings on the event socket: a frozen ComfyUI is found out within twice that
JSON_HEADERS = {"Content-Type": "application/json"}
# 4xx answers about the line to ComfyUI, not about what was sent: no such route (not a ComfyUI), a
# proxy's login, timeout or rate limit.
NOT_ABOUT_THE_REQUEST = frozenset({401, 403, 404, 405, 407, 408, 421, 429})
# What /view never answers (ComfyUI sends HTML-like outputs as downloads): a proxy's page in its place.
WEB_PAGES = frozenset({"text/html", "application/xhtml+xml"})
# "0.3.64": the recorded release. "jobs": later releases, which add GET /api/jobs, GET /api/jobs/{id},
# an atomic POST /api/jobs/{id}/cancel, canonical-UUID prompt ids, and asset ids on outputs.
DIALECTS = ("0.3.64", "jobs")
MISSED = "missed"  # the event handed on for a prompt one of whose events was skipped as malformed
# ComfyUI tells every socket of its queue (a `status` broadcast) as it takes a prompt. A socket that
# hears nothing this long after a prompt was taken is no longer ComfyUI's: another socket with the
# bridge's clientId connected and closed (an older bridge's, frozen, then gone), and ComfyUI
# forgot the clientId. It is opened again: a socket too many costs a reconnect and a reconcile.
DEAF_AFTER = 5.0


class BackendUnavailable(Exception):
    """The backend could not be reached, did not answer in time, or answered with an error status."""

    def __init__(self, message: str, maybe_done: bool = False) -> None:
        super().__init__(message)
        self.maybe_done = maybe_done  # no answer came: the request may still have taken effect


class MalformedAnswer(BackendUnavailable):
    """The backend answered 200 with something the bridge cannot use (not JSON, or a wrong shape):
    a proxy's error page, or a ComfyUI that is not what it seems."""


class PromptRefused(Exception):
    """ComfyUI refused the prompt or one of its uploads (a 4xx); the message is readable."""


class PartlyRefused(PromptRefused):
    """ComfyUI queued the prompt but refused some of its outputs (200 with node_errors): it would run
    the rest, and the job's results would be silently short."""


class ResultTooLarge(Exception):
    """An output file over the bridge's limit (max_result_mb)."""


class OutputGone(Exception):
    """ComfyUI does not have an output it named (GET /view answered 404): removed from its output
    folder before it was copied. Asking again will not bring it back."""


class ComfyClient:
    """Talks to one ComfyUI. The socket runs under the bridge's own client id, so ComfyUI sends it
    the events of every prompt the bridge queued there; the owner matches them to jobs by prompt_id.

    Every answer and event is checked for shape (`shapes`): a malformed answer raises
    MalformedAnswer (a BackendUnavailable), a malformed event is logged and skipped."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        client_id: str,
        request_timeout: float = 30.0,
        max_event_bytes: int = 16 << 20,
        outputs: Path | None = None,
        inputs: Path | None = None,
        input_folders: InputFolders | None = None,
    ) -> None:
        self.url = URL(base_url)
        self.name = base_url  # who it is (the config's URL): a key in the journal and the planner
        self.shown = shown(base_url)  # how it is named in messages, logs and metrics: no password
        self.session = session
        self.client_id = client_id
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.max_event_bytes = max_event_bytes
        self.connected = False
        self.complaints = Complaints(base_url, log)
        self._socket: aiohttp.ClientWebSocketResponse | None = None  # the event socket, while open
        self._heard = 0  # frames the event sockets received, in all
        self._hearing_check: asyncio.TimerHandle | None = None
        self._reopening: asyncio.Task[bool] | None = None
        # Releases after 0.3.64 have /api/jobs and an atomic per-job cancel; asked at every connect,
        # since a ComfyUI may come back upgraded. None until the first answer.
        self.jobs_api: bool | None = None
        # Its folders, when this machine can reach them: outputs are read there, not over /view;
        # uploads written there, not sent over /upload/image.
        self.outputs: LocalOutputs | None = None
        self.inputs: LocalInputs | None = None
        self.input_folders = input_folders  # what deletes uploads, per folder, shared with other backends
        self.use_folders(outputs, inputs)

    # REST ------------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        try:
            async with self.session.request(
                method, self.url / path.lstrip("/"), timeout=self.timeout, **kwargs
            ) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > MAX_ANSWER:  # files come from /view, streamed; answers are small
                        raise MalformedAnswer(f"{self.shown}: {method} {path} answered more than {MAX_ANSWER >> 20} MB")
                return resp.status, bytes(body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            refused = isinstance(exc, aiohttp.ClientConnectorError)
            why = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, TimeoutError):  # (its own text says nothing, or little)
                why = f"no answer within {self.timeout.total:g}s"
            raise BackendUnavailable(f"{self.shown}: {why}", not refused) from exc

    async def _json(self, method: str, path: str, refused: str = "", **kwargs: Any) -> Any:
        """The JSON of a 200 answer. With `refused` (what is asked for, e.g. "the upload 'a.png'"),
        a 4xx is ComfyUI's refusal of that: PromptRefused, the job's error, never the backend's."""
        status, body = await self._request(method, path, **kwargs)
        if status != 200:
            if refused and 400 <= status < 500 and status not in NOT_ABOUT_THE_REQUEST:
                raise PromptRefused(f"ComfyUI refused {refused} ({status}): {_said(body, status)}")
            raise BackendUnavailable(f"{self.shown}: {method} {path} answered HTTP {status}")
        try:
            return orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise MalformedAnswer(f"{self.shown}: {method} {path} answered 200 with {_glimpse(body)}") from None

    async def _checked(self, parse: Callable[[Any], _T], method: str, path: str, **kwargs: Any) -> _T:
        """A JSON answer read by its shape's parser; a wrong shape is a MalformedAnswer."""
        answer = await self._json(method, path, **kwargs)  # (`refused` passes through)
        try:
            return parse(answer)
        except Malformed as exc:
            raise MalformedAnswer(f"{self.shown}: {method} {path}: {exc}") from None

    async def _post(self, path: str, payload: Any) -> Any:
        return await self._json("POST", path, data=orjson.dumps(payload), headers=JSON_HEADERS)

    async def submit(self, prompt: dict[str, Any], prompt_id: str) -> None:
        payload = orjson.dumps({"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id})
        heard = self._heard  # before: its `status` broadcast may come before the answer
        status, body = await self._request("POST", "/prompt", data=payload, headers=JSON_HEADERS)
        if status == 200:
            self._expect_word(heard)
            try:
                answer = orjson.loads(body)
            except orjson.JSONDecodeError:
                answer = None
            if not isinstance(answer, dict):
                # Not ComfyUI's answer (a proxy's page?): whether it took the prompt is unknown.
                raise MalformedAnswer(f"{self.shown}: POST /prompt answered 200 with {_glimpse(body)}", True)
            if answer.get("node_errors"):
                raise PartlyRefused(describe_refusal(answer, "part of the prompt"))
            return
        if 400 <= status < 500 and status not in NOT_ABOUT_THE_REQUEST:
            # About this prompt (invalid, too large, ...): the job's error, never the backend's health.
            try:
                raise PromptRefused(describe_refusal(orjson.loads(body)))
            except orjson.JSONDecodeError:
                raise PromptRefused(f"ComfyUI refused the prompt ({status}): {_said(body, status)}") from None
        # A 408 (a proxy's timeout) may come after ComfyUI took it: asked about before it is sent again.
        raise BackendUnavailable(f"{self.shown}: POST /prompt answered HTTP {status}", status == 408)

    async def upload(self, source: Path | AsyncIterator[bytes], name: str) -> str:
        """Send a file (a local one, or bytes as they come) into the backend's input folder; returns
        the name ComfyUI gave it."""
        if self.inputs is not None:
            await self.inputs.settle(name)  # a deletion of its last copy there must not hit this one
        if self.inputs is not None and self.inputs.usable:
            try:
                if await self.inputs.place(source, name):
                    return name
            except FileNotFoundError:
                if isinstance(source, Path):
                    raise  # the upload is gone: the dispatcher says so
                raise BackendUnavailable(f"{self.shown}: writing {name!r} into its input folder failed") from None
            except OSError as exc:  # a stream broke off part-way: the hand-over is tried again
                raise BackendUnavailable(f"{self.shown}: writing {name!r} into its input folder failed") from exc
        # A 4xx is about the file (over ComfyUI's --max-upload-size, which counts the whole form): the
        # job fails with ComfyUI's reason, and no other job waits for this backend.
        refused = f"the job's upload {name!r}"
        form = aiohttp.FormData()
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        if not isinstance(source, Path):
            form.add_field("image", source, filename=name, content_type="application/octet-stream")
            return await self._checked(shapes.upload_name, "POST", "/upload/image", refused=refused, data=form)
        async with open_off_loop(source, "rb") as handle:
            form.add_field("image", handle, filename=name)
            return await self._checked(shapes.upload_name, "POST", "/upload/image", refused=refused, data=form)

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        def entry(answer: Any) -> dict[str, Any] | None:
            return shapes.history_entry(answer, prompt_id)

        return await self._checked(entry, "GET", f"/history/{prompt_id}")

    async def queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids running and pending in ComfyUI's queue."""
        return await self._checked(shapes.queue_ids, "GET", "/queue")

    async def detect_dialect(self) -> None:
        """Whether this ComfyUI offers the jobs API: newer releases list jobs, 0.3.64 answers 404."""
        self.jobs_api = await self._exists("/api/jobs", params={"limit": "1"})

    def use_folders(self, outputs: Path | None, inputs: Path | None) -> bool:
        """Its output and input folders as this machine sees them (None: over HTTP). True when one
        is new: it is used once `check_folders` has found ComfyUI using it."""
        new = False
        if (self.outputs.folder if self.outputs else None) != outputs:
            self.outputs = LocalOutputs(outputs, self.shown) if outputs is not None else None
            new = outputs is not None
        if (self.inputs.folder if self.inputs else None) != inputs:
            self.inputs = LocalInputs(inputs, self.shown, self.input_folders) if inputs is not None else None
            new = new or inputs is not None
        return new

    async def check_folders(self) -> None:
        """Whether ComfyUI uses the folders set for it: it must serve back a file written there.
        Asked at every connect (a ComfyUI may come back with other folders)."""
        if self.outputs is not None:
            await self._check_folder(self.outputs, "outputs are fetched over /view")
        if self.inputs is not None:
            await self._check_folder(self.inputs, "uploads go over HTTP")

    async def _check_folder(self, folder: LocalOutputs | LocalInputs, otherwise: str) -> None:
        was, folder.usable = folder.usable, False
        try:
            name, data = await in_thread(folder.write_probe)
        except OSError as exc:
            read_only = exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            if read_only and isinstance(folder, LocalOutputs):  # it still serves reads, each one checked
                folder.usable = True
                log.info("ComfyUI %s: its output folder %s is read-only here, so it was not checked", self.shown,
                         folder.folder)  # fmt: skip
                return
            log.warning("ComfyUI %s: its %s folder %s cannot be written (%s); %s", self.shown, folder.kind,
                        folder.folder, exc.strerror or exc, otherwise)  # fmt: skip
            return
        try:
            status, body = await self._request("GET", "/view", params={"filename": name, "type": folder.kind})
        finally:
            await in_thread(folder.remove_probe, name)
        folder.usable = status == 200 and body == data
        if not folder.usable:
            log.warning("ComfyUI %s does not use %s as its %s folder (it did not serve back a file written there); %s",
                        self.shown, folder.folder, folder.kind, otherwise)  # fmt: skip
        elif not was:
            log.info("ComfyUI %s: its %s folder is %s, used directly", self.shown, folder.kind, folder.folder)

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        """GET `path`: True for 200, False for 404 (an answer too), BackendUnavailable otherwise."""
        status, _ = await self._request("GET", path, **kwargs)
        if status not in (200, 404):
            raise BackendUnavailable(f"{self.shown}: GET {path} answered HTTP {status}")
        return status == 200

    async def cancel(self, prompt_id: str) -> None:
        """Take a prompt back, queued or running. The jobs API does it atomically; on 0.3.64 it is
        a delete from the queue, then an interrupt only if that prompt is the one running."""
        if self.jobs_api:
            path = f"/api/jobs/{prompt_id}/cancel"
            status, _ = await self._request("POST", path, data=b"{}", headers=JSON_HEADERS)
            if status not in (200, 404):  # 404: no such job (long gone): nothing to take back
                raise BackendUnavailable(f"{self.shown}: POST {path} answered HTTP {status}")
            return
        await self.delete_queued([prompt_id])
        await self.interrupt(prompt_id)

    async def interrupt(self, prompt_id: str) -> None:
        """Stop `prompt_id` only if it is the running one (older ComfyUI ignores the id, so look first)."""
        running, _ = await self.queue()
        if prompt_id in running:
            await self._post("/interrupt", {"prompt_id": prompt_id})

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        await self._post("/queue", {"delete": prompt_ids})

    async def free(self) -> None:
        await self._post("/free", {"unload_models": True, "free_memory": True})

    async def delete_history(self, prompt_ids: list[str]) -> None:
        await self._post("/history", {"delete": prompt_ids})

    async def free_memory(self) -> tuple[int | None, int]:
        """Free VRAM of the first device (None without one) and free RAM, in bytes, from /system_stats."""
        return await self._checked(shapes.memory_free, "GET", "/system_stats")

    async def knows(self, prompt_id: str) -> bool:
        """Whether ComfyUI has this prompt: queued, running, or in its history."""
        if self.jobs_api:
            return await self._exists(f"/api/jobs/{prompt_id}")
        running, pending = await self.queue()
        return prompt_id in running or prompt_id in pending or await self.history(prompt_id) is not None

    async def object_info(self, classes: Collection[str]) -> tuple[dict[str, Any], bool]:
        """The definitions of these node classes, each asked on its own: the whole /object_info runs
        to tens of MB with many custom nodes, and parsing it holds the event loop for a good part of a
        second. A class ComfyUI cannot describe (its route fails for a node whose definition raises;
        the whole list skips it) or does not know is left out. A ComfyUI without that route (older,
        forked, or behind a proxy that lets through only the paths it knows) is asked for the whole.
        With whether every class was answered: one that failed (a 5xx: a node that raises, or a
        proxy's passing 502) is worth asking again later."""
        names = sorted(classes)
        if any("/" in name for name in names):  # not a path segment
            return await self._described_in_whole(names), True
        asked = await all_bounded((self._request("GET", f"/object_info/{name}") for name in names), OBJECT_INFO_AT_ONCE)
        if any(status == 404 for status, _ in asked):
            return await self._described_in_whole(names), True
        found: dict[str, Any] = {}
        for name, (status, body) in zip(names, asked, strict=True):
            try:
                said = orjson.loads(body) if status == 200 else None
            except orjson.JSONDecodeError:
                said = None
            if isinstance(said, dict) and isinstance(said.get(name), dict):
                found[name] = said[name]
            elif said != {}:  # ({}: a class it does not have)
                what = f"HTTP {status}" if status != 200 else _glimpse(body)
                log.warning("%s: GET /object_info/%s answered %s: its limits are not known", self.shown, name, what)
        return found, all(status < 500 for status, _ in asked)

    async def _described_in_whole(self, names: list[str]) -> dict[str, Any]:
        whole = await self._json("GET", "/object_info")
        return {name: whole[name] for name in names if name in whole} if isinstance(whole, dict) else {}

    async def download(self, ref: OutputRef, target: Sink, max_bytes: int, local: bool = False) -> int:
        """Copy one output file into `target` (the caller commits or aborts it). A small file is
        read in one go; a large one streams, never held whole in memory, once the store has said it
        can take it (a full disk costs no download). With `local` (the caller's word that the file
        is its job's own), it is read from ComfyUI's output folder when this machine sees it.
        Raises ResultTooLarge past `max_bytes`, StorageError when the bridge cannot store it,
        BackendUnavailable when ComfyUI cannot give it."""
        if local and self.outputs is not None and self.outputs.usable:
            try:
                copied = await self.outputs.copy(ref, target, max_bytes)
            except LocalTooLarge as exc:
                raise ResultTooLarge(_too_large(ref, exc.size, max_bytes)) from None
            except LocalReadFailed as exc:
                raise BackendUnavailable(f"{self.shown}: {exc}") from None
            if copied is not None:
                return copied
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        size = 0
        # A file that trickles (a byte now and then, each read in time) must still arrive: comfy_timeout
        # plus a second for every SLOW_RATE bytes, or the try fails (and is tried again, a bounded
        # number of times).
        start = asyncio.get_running_loop().time()

        def deadline() -> float:
            return start + self.timeout.total + size / SLOW_RATE  # type: ignore[operator]

        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=self.timeout.total)
            async with self.session.get(self.url / "view", params=params, timeout=timeout) as resp:
                if resp.status == 404:
                    await self.queue()  # ComfyUI itself answers (not a proxy's 404 while it restarts)
                    raise OutputGone(f"ComfyUI no longer has the output {ref.filename!r} (GET /view answered 404)")
                if resp.status != 200:
                    raise BackendUnavailable(f"{self.shown}: GET /view {ref.filename!r} answered HTTP {resp.status}")
                if resp.content_type in WEB_PAGES:  # ComfyUI serves even an .html output as a download
                    raise BackendUnavailable(
                        f"{self.shown}: GET /view {ref.filename!r} answered a web page ({resp.content_type}), "
                        "not the file: a proxy in front of ComfyUI?"
                    )
                length = resp.content_length
                if length is not None and length > max_bytes:
                    raise ResultTooLarge(_too_large(ref, length, max_bytes))
                if length is not None and length <= SMALL_FILE:
                    size = length
                    async with asyncio.timeout_at(deadline()):
                        data = await resp.read()
                    await target.write(data)
                    return len(data)
                await target.reserve(length)
                while True:
                    async with asyncio.timeout_at(deadline()):
                        chunk = await resp.content.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise ResultTooLarge(_too_large(ref, size, max_bytes))
                    await target.write(chunk)
        except TimeoutError:
            raise BackendUnavailable(
                f"{self.shown}: download of {ref.filename!r} too slow ({size} bytes, past its deadline)"
            ) from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"{self.shown}: download of {ref.filename!r} failed: {exc}") from exc
        return size

    # events ----------------------------------------------------------------------------------
    async def listen(
        self,
        on_event: EventHandler,
        on_connect: ConnectHandler,
        on_disconnect: DisconnectHandler,
        first_attempt: asyncio.Event,
        max_backoff: float = 1.0,
    ) -> None:
        """Keep the event socket open forever, reconnecting with backoff; runs until cancelled.

        Nothing ComfyUI sends ends it: a malformed event is skipped, a malformed answer while
        connecting counts as a failed connect, an oversized frame closes the socket before it is
        read (then it reconnects). `first_attempt` is set once the first try has connected or failed.
        Tries come at least every `max_backoff` seconds: a ComfyUI restarting takes 5-15 s, and one back
        within backend_grace must be seen within it (a refused connect costs next to nothing)."""
        backoff = 0.2
        ws_url = self.url.with_scheme("wss" if self.url.scheme == "https" else "ws") / "ws"
        while True:
            try:
                async with self.session.ws_connect(
                    ws_url.with_query(clientId=self.client_id), heartbeat=HEARTBEAT, max_msg_size=self.max_event_bytes
                ) as ws:
                    await self._json("GET", "/prompt")  # its REST side answers too, not only the socket
                    await self.detect_dialect()
                    await self.check_folders()
                    self.connected = True
                    dialect = "with the jobs API" if self.jobs_api else "0.3.64 dialect"
                    log.info("connected to ComfyUI %s (%s)", self.shown, dialect)
                    await on_connect()
                    backoff = 0.2  # only a connect that went through: a failing one backs off
                    first_attempt.set()
                    self._socket = ws  # heard from now on (`_expect_word`): what came meanwhile is read next
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            self._heard += 1
                            self._receive(msg.data, on_event)
                        elif msg.type is aiohttp.WSMsgType.ERROR:
                            # e.g. no pong to the heartbeat: a ComfyUI frozen (or a network gone), which closed nothing
                            log.warning("ComfyUI %s: event socket failed: %s", self.shown, msg.data or ws.exception())
                            break
                    else:
                        log.warning("ComfyUI %s closed its socket", self.shown)
            except (aiohttp.ClientError, TimeoutError, OSError, BackendUnavailable) as exc:
                # Say it once per outage, not at every retry.
                level = logging.WARNING if self.connected or not first_attempt.is_set() else logging.DEBUG
                log.log(level, "ComfyUI %s unreachable (%s); retrying", self.shown, exc)
            except Exception:  # a fault of the bridge's own: logged, and listening goes on
                log.exception("ComfyUI %s: the event socket failed unexpectedly; reconnecting", self.shown)
            self._socket = None
            first_attempt.set()
            if self.connected:
                self.connected = False
                on_disconnect()
            await asyncio.sleep(backoff)
            backoff = min(max_backoff, backoff * 2)

    def _expect_word(self, heard: int) -> None:
        """ComfyUI took a prompt: its socket should hear of it within DEAF_AFTER (one check at a time)."""
        socket = self._socket
        if socket is not None and self._hearing_check is None:
            loop = asyncio.get_running_loop()
            self._hearing_check = loop.call_later(DEAF_AFTER, self._check_hearing, socket, heard)

    def _check_hearing(self, socket: aiohttp.ClientWebSocketResponse, heard: int) -> None:
        self._hearing_check = None
        if socket is self._socket and self._heard == heard and not socket.closed:
            log.warning(
                "ComfyUI %s: its socket heard nothing for %gs after a prompt was taken (another socket with "
                "this bridge's clientId came and went, and ComfyUI forgot it); connecting again",
                self.shown, DEAF_AFTER,
            )  # fmt: skip
            self._reopening = asyncio.ensure_future(socket.close())

    def _receive(self, text: str, on_event: EventHandler) -> None:
        """One text frame: checked for shape, then handed over; a bad one is skipped, never fatal."""
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.complaints.note("event", f"not JSON: {_glimpse(text.encode())}")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.complaints.note("event", f"not an event object: {_glimpse(text.encode())}")
            return
        kind = message["type"]
        try:
            checked = shapes.event(kind, message.get("data"))
        except Malformed as exc:
            self.complaints.note(f"{kind} event", str(exc))
            data = message.get("data")
            if isinstance(data, dict) and isinstance(data.get("prompt_id"), str):
                checked, kind = {"prompt_id": data["prompt_id"]}, MISSED  # its prompt missed an event
            else:
                return
        if checked is None:
            return  # an event the bridge does not follow
        try:
            on_event(kind, checked)
        except Exception:  # a fault of the bridge's own must not end the listening
            log.exception("ComfyUI %s: handling a %s event failed", self.shown, kind)


_T = TypeVar("_T")


def shown(url: str) -> str:
    """A backend's address as it may be shown (/health, /metrics, the banner): no password, no query."""
    parsed = URL(url)
    return str(parsed.with_password(None).with_query(None)) if parsed.password or parsed.query_string else url


def _said(body: bytes, status: int) -> str:
    """What a refusal's body says, as text, in short."""
    return body[:200].decode(errors="replace").strip() or f"HTTP {status}"


def _glimpse(body: bytes) -> str:
    """What a body that is not JSON starts with, for a log line or an error."""
    text = body[:80].decode(errors="replace").strip()
    return f"{len(body)} bytes that are not JSON ({text!r}...)" if text else "an empty body"


def _too_large(ref: OutputRef, size: int, limit: int) -> str:
    return f"the output {ref.filename!r} is larger than the limit of {limit / MB:g} MB (max_result_mb)"
