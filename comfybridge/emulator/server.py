"""The emulator's HTTP and WebSocket surface: ComfyUI's routes, shapes and status codes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import platform
import tempfile
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Handler

from ..comfy.client import DIALECTS
from .engine import Engine, PromptRejected

__all__ = ["SOCKETS", "Emulator", "create_emulator_app"]

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", Engine)
SOCKETS = web.AppKey("sockets", dict[str, web.WebSocketResponse])
MAX_UPLOAD_SIZE = 104857600


DOWNLOAD_ONLY = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class Emulator:
    """A ComfyUI stand-in on a loopback port: `await start()`, `url`, `await stop()`."""

    def __init__(
        self,
        root: Path | None = None,
        pace: float = 0.005,
        host: str = "127.0.0.1",
        port: int = 0,
        dialect: str = DIALECTS[0],
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="comfy-emulator-") if root is None else None
        self.root = Path(self._tmp.name) if self._tmp else Path(root or ".")
        self.host = host
        self.port = port
        self.pace = pace
        self.dialect = dialect
        self.app = create_emulator_app(self.root, pace, dialect)
        self._runner: web.AppRunner | None = None

    @property
    def engine(self) -> Engine:
        return self.app[ENGINE]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def create_emulator_app(root: Path, pace: float, dialect: str = DIALECTS[0]) -> web.Application:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown ComfyUI dialect {dialect!r}; one of {', '.join(DIALECTS)}")
    # As ComfyUI's --max-upload-size: a limit on the whole request body, a form's framing included.
    app = web.Application(client_max_size=MAX_UPLOAD_SIZE, middlewares=[_count_requests])
    sockets: dict[str, web.WebSocketResponse] = {}
    app[SOCKETS] = sockets
    pending_sends: set[asyncio.Future[Any]] = set()

    def send_text(event: str, data: dict[str, Any], sid: str | None) -> None:
        payload = orjson.dumps({"type": event, "data": data}).decode()
        _deliver(sockets, sid, lambda ws: ws.send_str(payload), pending_sends)

    def send_binary(data: bytes, sid: str | None) -> None:
        _deliver(sockets, sid, lambda ws: ws.send_bytes(data), pending_sends)

    def drop_sockets() -> None:
        for ws in list(sockets.values()):
            task = asyncio.ensure_future(ws.close(code=WSCloseCode.GOING_AWAY))
            pending_sends.add(task)
            task.add_done_callback(pending_sends.discard)

    engine = Engine(root, pace, send_text, send_binary, jobs_api=dialect == "jobs")
    app[ENGINE] = engine

    async def lifecycle(app: web.Application) -> Any:
        engine.start(drop_sockets)
        yield
        await engine.stop()
        if pending_sends:
            await asyncio.gather(*pending_sends, return_exceptions=True)

    async def close_sockets(app: web.Application) -> None:
        # Before the server waits for open handlers: a socket handler ends only when its socket does.
        engine.stopping.set()
        for ws in list(sockets.values()):
            await ws.close(code=WSCloseCode.GOING_AWAY)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_sockets)
    routes = _routes()
    app.router.add_routes(routes)
    # ComfyUI registers every route a second time under /api.
    for route in routes:
        if isinstance(route, web.RouteDef):
            app.router.add_route(route.method, "/api" + route.path, route.handler)
    if engine.jobs_api:
        app.router.add_routes(_jobs_routes())
    return app


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Not ComfyUI behaviour: counts requests by route (`GET /history/{prompt_id}`), so a test can see
    which calls the bridge makes."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    request.app[ENGINE].requests[f"{request.method} {route}"] += 1
    return await handler(request)


def _deliver(
    sockets: dict[str, web.WebSocketResponse],
    sid: str | None,
    send: Any,
    pending: set[asyncio.Future[Any]],
) -> None:
    targets = list(sockets.values()) if sid is None else [sockets[sid]] if sid in sockets else []
    for ws in targets:
        if ws.closed:
            continue
        task = asyncio.ensure_future(send(ws))
        pending.add(task)
        task.add_done_callback(_reap(pending))


def _reap(pending: set[asyncio.Future[Any]]) -> Any:
    def done(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("emulator send failed: %s", task.exception())

    return done


def _routes() -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/ws")
    async def websocket(request: web.Request) -> web.WebSocketResponse:
        engine = request.app[ENGINE]
        sockets = request.app[SOCKETS]
        sid = request.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        # As ComfyUI does: a socket of the same clientId is forgotten, not closed (it just hears nothing
        # more), and the end of any socket forgets its clientId, so a stale socket that ends after a
        # newer one connected leaves the newer one deaf too.
        sockets.pop(sid, None)
        sockets[sid] = ws
        try:
            await ws.send_str(
                orjson.dumps({"type": "status", "data": {**engine.status_message(), "sid": sid}}).decode()
            )
            if engine.running_client() == sid:
                # ComfyUI tells a socket that reconnects mid-run which node runs (no prompt_id here).
                await ws.send_str(orjson.dumps({"type": "executing", "data": {"node": engine.last_node_id}}).decode())
            async for msg in ws:
                if msg.type.name != "TEXT":
                    continue
                with contextlib.suppress(orjson.JSONDecodeError):
                    message = orjson.loads(msg.data)
                    if isinstance(message, dict) and message.get("type") == "feature_flags":
                        flags = _features(engine)
                        await ws.send_str(orjson.dumps({"type": "feature_flags", "data": flags}).decode())
        finally:
            sockets.pop(sid, None)
        return ws

    @routes.get("/prompt")
    async def get_prompt(request: web.Request) -> web.Response:
        return _json({"exec_info": {"queue_remaining": request.app[ENGINE].queue_remaining}})

    @routes.post("/prompt")
    async def post_prompt(request: web.Request) -> web.Response:
        engine = request.app[ENGINE]
        faults = engine.faults
        if faults.prompt_hang:
            await engine.stopping.wait()
            return web.Response(status=503)
        if faults.prompt_413 > 0:
            faults.prompt_413 -= 1
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_UPLOAD_SIZE, actual_size=MAX_UPLOAD_SIZE + 1)
        if faults.prompt_500 > 0:
            faults.prompt_500 -= 1
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        try:
            answer = engine.submit(body)
        except PromptRejected as exc:
            return _json(exc.body, status=400)
        if faults.answer_delay:
            await asyncio.sleep(faults.answer_delay)
        return _json(answer)

    @routes.get("/queue")
    async def get_queue(request: web.Request) -> web.Response:
        return _json(request.app[ENGINE].queue_snapshot())

    @routes.post("/queue")
    async def post_queue(request: web.Request) -> web.Response:
        body = await request.json()
        engine = request.app[ENGINE]
        if body.get("clear"):
            engine.clear_pending()
        if "delete" in body:
            engine.delete_pending(list(body["delete"]))
        return web.Response()

    @routes.post("/interrupt")
    async def interrupt(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read() or b"{}")
        request.app[ENGINE].interrupt(body.get("prompt_id") if isinstance(body, dict) else None)
        return web.Response()

    @routes.post("/free")
    async def free(request: web.Request) -> web.Response:
        raw = await request.read()
        if not raw:
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        request.app[ENGINE].free(orjson.loads(raw))
        return web.Response()

    @routes.get("/history")
    async def history(request: web.Request) -> web.Response:
        entries = list(request.app[ENGINE].history.items())
        offset = int(request.query.get("offset", "-1"))
        if "max_items" in request.query:
            count = int(request.query["max_items"])
            entries = entries[offset : offset + count] if offset >= 0 else entries[-count:] if count else []
        return _json(dict(entries))

    @routes.get("/history/{prompt_id}")
    async def history_one(request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = request.app[ENGINE].history.get(prompt_id)
        return _json({prompt_id: entry} if entry else {})

    @routes.post("/history")
    async def post_history(request: web.Request) -> web.Response:
        body = await request.json()
        history = request.app[ENGINE].history
        if body.get("clear"):
            history.clear()
        for prompt_id in body.get("delete", []):
            history.pop(prompt_id, None)
        return web.Response()

    @routes.get("/view")
    async def view(request: web.Request) -> web.StreamResponse:
        engine = request.app[ENGINE]
        filename = request.query.get("filename", "")
        if not filename:
            return web.Response(status=404)
        file_type = request.query.get("type", "output")
        if filename.endswith("]") and " [" in filename:
            filename, _, annotated = filename[:-1].rpartition(" [")
            file_type = annotated
        if filename.startswith("/") or ".." in filename:
            return web.Response(status=400)
        base = {"output": engine.output_dir, "input": engine.input_dir, "temp": engine.temp_dir}.get(file_type)
        if base is None:
            return web.Response(status=400)
        folder = (base / request.query.get("subfolder", "")).resolve()
        if not folder.is_relative_to(base.resolve()):
            return web.Response(status=403)
        path = folder / filename
        if not path.is_file():
            return web.Response(status=404)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in DOWNLOAD_ONLY:  # as ComfyUI does, "for security": a download, never a page
            content_type = "application/octet-stream"
        headers = {"Content-Disposition": f'filename="{filename}"', "Content-Type": content_type}
        return web.FileResponse(path, headers=headers)

    @routes.post("/upload/image")
    async def upload_image(request: web.Request) -> web.Response:
        engine = request.app[ENGINE]
        form = await request.post()
        image = form.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        base = {"input": engine.input_dir, "temp": engine.temp_dir, "output": engine.output_dir}.get(
            str(form.get("type") or "input"), engine.input_dir
        )
        subfolder = str(form.get("subfolder") or "")
        folder = (base / subfolder).resolve()
        if not folder.is_relative_to(base.resolve()) or "/" in image.filename or ".." in image.filename:
            return web.Response(status=400)
        folder.mkdir(parents=True, exist_ok=True)
        data = image.file.read()
        name = _free_name(folder, image.filename, data, str(form.get("overwrite", "")).lower() in ("true", "1"))
        (folder / name).write_bytes(data)
        return _json({"name": name, "subfolder": subfolder, "type": str(form.get("type") or "input")})

    @routes.get("/system_stats")
    async def system_stats(request: web.Request) -> web.Response:
        gib = 1 << 30
        system = {
            "os": "posix",
            "ram_total": 24 * gib,
            "ram_free": 20 * gib,
            "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.94",
            "required_templates_version": "0.1.94",
            "python_version": platform.python_version(),
            "pytorch_version": "emulated",
            "embedded_python": False,
            "argv": ["main.py", "--emulated"],
        }
        device = {
            "name": "emulated",
            "type": "cpu",
            "index": None,
            "vram_total": 24 * gib,
            "vram_free": 20 * gib,
            "torch_vram_total": 24 * gib,
            "torch_vram_free": 20 * gib,
        }
        return _json({"system": system, "devices": [device]})

    @routes.get("/features")
    async def features(request: web.Request) -> web.Response:
        return _json(_features(request.app[ENGINE]))

    @routes.get("/object_info")
    async def object_info(request: web.Request) -> web.Response:
        return _json(request.app[ENGINE].object_info)

    @routes.get("/object_info/{node_class}")
    async def object_info_one(request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        info = request.app[ENGINE].object_info.get(name)
        return _json({name: info} if info else {})

    @routes.get("/embeddings")
    async def embeddings(request: web.Request) -> web.Response:
        return _json([])

    @routes.get("/models")
    async def models(request: web.Request) -> web.Response:
        return _json(["checkpoints", "loras", "vae", "upscale_models"])

    @routes.get("/emulator/timeline")
    async def timeline(request: web.Request) -> web.Response:
        """Not a ComfyUI route: when each prompt ran (monotonic clock), for benchmarks in another process."""
        return _json(request.app[ENGINE].timeline)

    @routes.get("/emulator/faults")
    async def get_faults(request: web.Request) -> web.Response:
        return _json(vars(request.app[ENGINE].faults))

    @routes.post("/emulator/faults")
    async def set_faults(request: web.Request) -> web.Response:
        """Not a ComfyUI route: lets a benchmark inject failures into an emulator in another process."""
        faults = request.app[ENGINE].faults
        for key, value in (await request.json()).items():
            if hasattr(faults, key):
                setattr(faults, key, value)
        return _json(vars(faults))

    return routes


def _features(engine: Engine) -> dict[str, Any]:
    flags: dict[str, Any] = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
    if engine.jobs_api:
        flags.update(supports_model_type_tags=True, extension={"manager": {"supports_v4": True}})
        flags.update(node_replacements=True, assets=True)
    return flags


def _jobs_routes() -> web.RouteTableDef:
    """The jobs API of releases after 0.3.64 (only under /api, as ComfyUI declares it)."""
    routes = web.RouteTableDef()

    @routes.get("/api/jobs")
    async def jobs(request: web.Request) -> web.Response:
        listed = request.app[ENGINE].jobs()
        try:
            offset = max(0, int(request.query.get("offset", "0")))
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            return _json({"error": "limit must be an integer"}, status=400)
        if limit is not None and limit <= 0:
            return _json({"error": "limit must be a positive integer"}, status=400)
        page = listed[offset:][:limit] if limit is not None else listed[offset:]
        more = offset + len(page) < len(listed)
        pagination = {"offset": offset, "limit": limit, "total": len(listed), "has_more": more}
        return _json({"jobs": page, "pagination": pagination})

    @routes.get("/api/jobs/{job_id}")
    async def job(request: web.Request) -> web.Response:
        found = request.app[ENGINE].job(request.match_info["job_id"])
        return _json(found) if found else _json({"error": "Job not found"}, status=404)

    @routes.post("/api/jobs/{job_id}/cancel")
    async def cancel(request: web.Request) -> web.Response:
        return _json({"cancelled": request.app[ENGINE].cancel(request.match_info["job_id"])})

    return routes


def _free_name(folder: Path, filename: str, data: bytes, overwrite: bool) -> str:
    """ComfyUI's naming: the same content keeps its name, other content becomes `name (1).ext`."""
    if overwrite:
        return filename
    stem, dot, ext = filename.rpartition(".")
    if not dot:
        stem, ext = filename, ""
    digest = hashlib.sha256(data).digest()
    candidate, index = filename, 1
    while (folder / candidate).exists():
        if hashlib.sha256((folder / candidate).read_bytes()).digest() == digest:
            return candidate
        candidate = f"{stem} ({index}){dot}{ext}"
        index += 1
    return candidate
