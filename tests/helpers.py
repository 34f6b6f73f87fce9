"""Small client-side helpers for the tests: what an app using the bridge would write."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from comfybridge.emulator.png import solid_png

Client = TestClient[web.Request, web.Application]
LARGE = 1024 * 1024


def without_job_id(file_name: str) -> str:
    """A result's file name with the job id the bridge puts in it taken out: `wf_x_<id>_00001_.png`
    -> `wf_x_00001_.png`."""
    return re.sub(r"_[0-9a-f]{32}_", "_", file_name)


def seed(message: dict[str, Any]) -> dict[str, Any]:
    """A status message as the seed contract knows it, without the additive keys (job_id, jobs_left)."""
    return {k: v for k, v in message.items() if k in ("status", "detail", "details")}


def png(width: int = 8, height: int = 8, colour: int = 0x336699) -> bytes:
    return solid_png(width, height, colour)


def jpeg(width: int, height: int) -> bytes:
    """A JPEG's headers (JFIF, a baseline frame header of this size) and its end: what the bridge
    reads of one, with no pixel data behind them."""
    jfif = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    frame = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + jfif + frame + b"\xff\xd9"


# The smallest files of other kinds that are whole by their format's own rules.
JPEG = jpeg(8, 8)
WAV = b"RIFF" + struct.pack("<I", 28) + b"WAVEfmt " + b"\0" * 20
MP4 = b"\0\0\0\x18ftypisom" + b"\0" * 12
OGG = b"OggS" + b"\0" * 40


async def upload(client: Client, files: dict[str, tuple[str, bytes]], client_id: str | None = None) -> Any:
    form = aiohttp.FormData()
    for field, (filename, data) in files.items():
        body = io.BytesIO(data) if len(data) > LARGE else data  # aiohttp warns of large bytes bodies
        form.add_field(field, body, filename=filename, content_type="application/octet-stream")
    params = {"clientId": client_id} if client_id else {}
    resp = await client.post("/upload", data=form, params=params)
    return resp.status, await resp.json()


async def generate(client: Client, client_id: str, body: dict[str, Any]) -> tuple[int, Any]:
    resp = await client.post("/generate-based-workflow", params={"clientId": client_id}, json=body)
    return resp.status, await resp.json()


async def frames_until(ws: aiohttp.ClientWebSocketResponse, status: str | set[str], timeout: float = 15) -> list[Any]:
    """Every status frame up to and including the first whose status is `status`."""
    wanted = {status} if isinstance(status, str) else status
    seen = []
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frame = orjson.loads(msg.data)
            seen.append(frame)
            if frame["status"] in wanted:
                return seen
    raise AssertionError(f"socket closed before {wanted}: {seen[-5:]}")


async def read_results(resp: aiohttp.ClientResponse) -> list[tuple[str, str, str, bytes]]:
    """(part name, filename, content type, bytes) of a multipart /history answer."""
    reader = aiohttp.MultipartReader.from_response(resp)
    parts = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        parts.append((part.name or "", part.filename or "", part.headers["Content-Type"], await part.read()))
    return parts


async def run_job(client: Client, client_id: str, body: dict[str, Any]) -> list[Any]:
    """Submit with a socket open and return the frames up to the job's end."""
    async with client.ws_connect("/ws", params={"clientId": client_id}) as ws:
        status, answer = await generate(client, client_id, body)
        assert status == 200, answer
        return await frames_until(ws, {"closed", "error"})


async def poll_status(client: Client, client_id: str, wanted: set[str], timeout: float = 15) -> Any:
    """Poll /execution-info like a REST-only client until the status is one of `wanted`."""
    async with asyncio.timeout(timeout):
        while True:
            info = await (await client.get("/execution-info", params={"clientId": client_id})).json()
            if info.get("status") in wanted:
                return info
            await asyncio.sleep(0.02)


async def wait_until_up(url: str, proc: asyncio.subprocess.Process, log: Path, timeout: float = 20) -> None:
    """Wait until a server we started answers `url` with 200; fail with its log if it exits instead."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                if proc.returncode is not None:
                    raise AssertionError(await asyncio.to_thread(_tail, log)) from None
                await asyncio.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text()[-4000:] if log.exists() else "it exited"


def system_binary(name: str, package: str) -> str:
    """The path of a system program a test needs. When missing, it is installed from Debian's
    packages only if CI or COMFYBRIDGE_TEST_INSTALL=1 allows it (and we are root with apt-get);
    otherwise the test is skipped, saying why. `make test` never changes the host unasked."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    allowed = os.environ.get("COMFYBRIDGE_TEST_INSTALL") == "1" or bool(os.environ.get("CI"))
    if found is None and allowed and os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "timeout": 600}
        subprocess.run(["apt-get", "update", "-qq"], check=False, **quiet)  # type: ignore[call-overload]
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False, **quiet)  # type: ignore[call-overload]
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        why = "as root with apt-get" if allowed else "set COMFYBRIDGE_TEST_INSTALL=1 to let the tests install it"
        pytest.skip(f"{name} is not installed ({package}); {why}")
    return found


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real, small filesystem (tmpfs) at `path`; skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler
