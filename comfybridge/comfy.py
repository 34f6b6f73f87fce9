"""ComfyUI client: one backend's REST calls and its event WebSocket, with automatic reconnect."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from yarl import URL

from .errors import StorageFull
from .files import SMALL_FILE, open_off_loop, sync_handle, write_synced

log = logging.getLogger(__name__)

EventHandler = Callable[[str, dict[str, Any]], None]
ConnectHandler = Callable[[], Awaitable[None]]
DisconnectHandler = Callable[[], None]

CHUNK = 256 * 1024
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
JSON_HEADERS = {"Content-Type": "application/json"}
RESULT_KINDS_SKIPPED = {"animated", "text"}  # keys of an output that are not file lists


class BackendUnavailable(Exception):
    """The backend could not be reached, did not answer in time, or answered with an error status."""

    def __init__(self, message: str, maybe_done: bool = False) -> None:
        super().__init__(message)
        self.maybe_done = maybe_done  # no answer came: the request may still have taken effect


class PromptRefused(Exception):
    """ComfyUI refused the prompt (HTTP 400, or another error status); the message is readable."""


@dataclass(frozen=True)
class OutputRef:
    """One output file of a prompt, as ComfyUI lists it in history."""

    filename: str
    subfolder: str
    type: str


def outputs_of(entry: dict[str, Any]) -> list[OutputRef]:
    """Every result file (images, gifs, videos, audio, ...) with type "output", in ComfyUI's order."""
    refs = []
    for node_output in (entry.get("outputs") or {}).values():
        for kind, items in node_output.items():
            if kind in RESULT_KINDS_SKIPPED or not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and item.get("type") == "output" and item.get("filename"):
                    refs.append(OutputRef(item["filename"], item.get("subfolder") or "", "output"))
    return refs


def describe_refusal(body: Any) -> str:
    """ComfyUI's validation answer as one readable sentence: the error, then each node's errors."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return "ComfyUI refused the prompt"
    error = body["error"]
    text = str(error.get("message") or "ComfyUI refused the prompt")
    if error.get("details"):
        text += f" ({error['details']})"
    parts = []
    for node_id, node in (body.get("node_errors") or {}).items():
        for item in node.get("errors", []):
            detail = f": {item['details']}" if item.get("details") else ""
            parts.append(f"node {node_id} ({node.get('class_type', '?')}): {item.get('message', 'error')}{detail}")
    return text + (": " + "; ".join(parts) if parts else "")


def describe_execution_error(data: dict[str, Any]) -> str:
    message = str(data.get("exception_message") or "").strip()
    kind = data.get("exception_type") or "error"
    return f"node {data.get('node_id')} ({data.get('node_type')}): {kind}: {message}"


class ComfyClient:
    """Talks to one ComfyUI. The socket runs under the bridge's own client id, so ComfyUI sends it
    the events of every prompt the bridge queued there; the owner matches them to jobs by prompt_id."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        client_id: str,
        request_timeout: float = 30.0,
    ) -> None:
        self.url = URL(base_url)
        self.name = base_url
        self.session = session
        self.client_id = client_id
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.connected = False
        # Releases after 0.3.64 have /api/jobs and an atomic per-job cancel; asked at every connect,
        # since a ComfyUI may come back upgraded. None until the first answer.
        self.jobs_api: bool | None = None

    # REST ------------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        try:
            async with self.session.request(
                method, self.url / path.lstrip("/"), timeout=self.timeout, **kwargs
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            refused = isinstance(exc, aiohttp.ClientConnectorError)
            raise BackendUnavailable(f"{self.name}: {exc.__class__.__name__}: {exc}", not refused) from exc

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        status, body = await self._request(method, path, **kwargs)
        if status != 200:
            raise BackendUnavailable(f"{self.name}: {method} {path} answered HTTP {status}")
        return orjson.loads(body) if body else None

    async def _post(self, path: str, payload: Any) -> Any:
        return await self._json("POST", path, data=orjson.dumps(payload), headers=JSON_HEADERS)

    async def submit(self, prompt: dict[str, Any], prompt_id: str) -> None:
        payload = orjson.dumps({"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id})
        status, body = await self._request("POST", "/prompt", data=payload, headers=JSON_HEADERS)
        if status == 200:
            answer = orjson.loads(body)
            if answer.get("node_errors"):
                # Some outputs were refused; ComfyUI runs the rest.
                log.warning("%s: prompt %s partly refused: %s", self.name, prompt_id, describe_refusal(answer))
            return
        if 400 <= status < 500:
            # About this prompt (invalid, too large, ...): the job's error, never the backend's health.
            try:
                raise PromptRefused(describe_refusal(orjson.loads(body)))
            except orjson.JSONDecodeError:
                text = body[:200].decode(errors="replace").strip() or f"HTTP {status}"
                raise PromptRefused(f"ComfyUI refused the prompt ({status}): {text}") from None
        raise BackendUnavailable(f"{self.name}: POST /prompt answered HTTP {status}")

    async def upload(self, path: Path, name: str) -> str:
        """Send a file into the backend's input folder; returns the name ComfyUI gave it."""
        form = aiohttp.FormData()
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        async with open_off_loop(path, "rb") as handle:
            form.add_field("image", handle, filename=name)
            answer = await self._json("POST", "/upload/image", data=form)
        return str(answer["name"])

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        answer = await self._json("GET", f"/history/{prompt_id}")
        entry = answer.get(prompt_id) if isinstance(answer, dict) else None
        return entry if isinstance(entry, dict) else None

    async def queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids running and pending in ComfyUI's queue."""
        answer = await self._json("GET", "/queue")
        running = [item[1] for item in answer.get("queue_running", [])]
        pending = [item[1] for item in answer.get("queue_pending", [])]
        return running, pending

    async def detect_dialect(self) -> None:
        """Whether this ComfyUI offers the jobs API: newer releases list jobs, 0.3.64 answers 404."""
        self.jobs_api = await self._exists("/api/jobs", params={"limit": "1"})

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        """GET `path`: True for 200, False for 404 (an answer too), BackendUnavailable otherwise."""
        status, _ = await self._request("GET", path, **kwargs)
        if status not in (200, 404):
            raise BackendUnavailable(f"{self.name}: GET {path} answered HTTP {status}")
        return status == 200

    async def cancel(self, prompt_id: str) -> None:
        """Take a prompt back, queued or running. The jobs API does it atomically; on 0.3.64 it is
        a delete from the queue, then an interrupt only if that prompt is the one running."""
        if self.jobs_api:
            await self._post(f"/api/jobs/{prompt_id}/cancel", {})
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
        stats = await self._json("GET", "/system_stats")
        devices = stats.get("devices") or []
        vram = devices[0].get("vram_free") if devices and isinstance(devices[0], dict) else None
        return (int(vram) if isinstance(vram, int | float) else None), int(stats["system"]["ram_free"])

    async def knows(self, prompt_id: str) -> bool:
        """Whether ComfyUI has this prompt: queued, running, or in its history."""
        if self.jobs_api:
            return await self._exists(f"/api/jobs/{prompt_id}")
        running, pending = await self.queue()
        return prompt_id in running or prompt_id in pending or await self.history(prompt_id) is not None

    async def object_info(self) -> dict[str, Any]:
        answer = await self._json("GET", "/object_info")
        return answer if isinstance(answer, dict) else {}

    async def download(self, ref: OutputRef, target: Path) -> int:
        """Copy one output file to `target`, fsynced (its folder too is created if needed). A small file
        is written in one go; a large one streams, never held whole in memory."""
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        size = 0
        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=self.timeout.total)
            async with self.session.get(self.url / "view", params=params, timeout=timeout) as resp:
                if resp.status != 200:
                    raise BackendUnavailable(f"{self.name}: GET /view {ref.filename} answered HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length <= SMALL_FILE:
                    data = await resp.read()
                    await asyncio.to_thread(write_synced, target, data)
                    return len(data)
                await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
                async with open_off_loop(target, "wb") as handle:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        await asyncio.to_thread(handle.write, chunk)
                    await asyncio.to_thread(sync_handle, handle)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailable(f"{self.name}: download of {ref.filename} failed: {exc}") from exc
        except OSError as exc:  # writing here, not ComfyUI, failed
            full = exc.errno in NO_SPACE
            raise StorageFull(f"the bridge {'disk is full' if full else 'could not write'}: {exc}") from exc
        return size

    # events ----------------------------------------------------------------------------------
    async def listen(
        self,
        on_event: EventHandler,
        on_connect: ConnectHandler,
        on_disconnect: DisconnectHandler,
        first_attempt: asyncio.Event,
        max_backoff: float = 5.0,
    ) -> None:
        """Keep the event socket open forever, reconnecting with backoff; runs until cancelled.

        `first_attempt` is set once the first try has connected or failed."""
        backoff = 0.2
        ws_url = self.url.with_scheme("wss" if self.url.scheme == "https" else "ws") / "ws"
        while True:
            try:
                async with self.session.ws_connect(
                    ws_url.with_query(clientId=self.client_id), heartbeat=10, max_msg_size=0
                ) as ws:
                    await self._json("GET", "/prompt")  # its REST side answers too, not only the socket
                    await self.detect_dialect()
                    self.connected = True
                    backoff = 0.2
                    dialect = "with the jobs API" if self.jobs_api else "0.3.64 dialect"
                    log.info("connected to ComfyUI %s (%s)", self.name, dialect)
                    await on_connect()
                    first_attempt.set()
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            try:
                                message = orjson.loads(msg.data)
                            except orjson.JSONDecodeError:
                                continue
                            if isinstance(message, dict) and isinstance(message.get("data"), dict):
                                on_event(str(message.get("type")), message["data"])
                        elif msg.type is aiohttp.WSMsgType.ERROR:
                            break
                    log.warning("ComfyUI %s closed its socket", self.name)
            except (aiohttp.ClientError, TimeoutError, OSError, BackendUnavailable) as exc:
                # Say it once per outage, not at every retry.
                level = logging.WARNING if self.connected or not first_attempt.is_set() else logging.DEBUG
                log.log(level, "ComfyUI %s unreachable (%s); retrying", self.name, exc)
            first_attempt.set()
            if self.connected:
                self.connected = False
                on_disconnect()
            await asyncio.sleep(backoff)
            backoff = min(max_backoff, backoff * 2)
