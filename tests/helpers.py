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
import sys
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from comfybridge.edge.appkeys import SETTINGS
from comfybridge.emulator import Emulator
from comfybridge.emulator.png import solid_png
from comfybridge.store.s3 import parse_storage_url

from .services import ROOT

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
OGG = b"OggS\x00\x02" + b"\0" * 20 + b"\x01\x0d" + b"\x01vorbis" + b"\0" * 6  # one page: its header and a segment
FLAC = b"fLaC\x80\x00\x00\x22" + b"\0" * 34 + b"\xff\xf8" + b"\0" * 8  # STREAMINFO, the last block; a frame


async def upload(client: Client, files: dict[str, tuple[str, bytes]], client_id: str | None = None) -> Any:
    form = aiohttp.FormData()
    for field, (filename, data) in files.items():
        body = io.BytesIO(data) if len(data) > LARGE else data  # aiohttp warns of large bytes bodies
        form.add_field(field, body, filename=filename, content_type="application/octet-stream")
    params = {"clientId": client_id} if client_id else {}
    resp = await client.post("/upload", data=form, params=params)
    return resp.status, await resp.json()


async def generate(
    client: Client, client_id: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    resp = await client.post("/generate-based-workflow", params={"clientId": client_id}, json=body, headers=headers)
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


def slow_ends(journal: Any) -> tuple[asyncio.Event, list[str]]:
    """From now on each job's end record (state done) is written only once the returned event is set,
    as under a slow commit; the list names the jobs whose end waits so."""
    gate, held = asyncio.Event(), []
    update = journal.update

    def slow_end(job_id: str, fields: dict[str, Any], delivery: Any = None) -> asyncio.Future[None]:
        written = update(job_id, fields, delivery)
        if fields.get("state") != "done":
            return written
        held.append(job_id)

        async def later() -> None:
            await gate.wait()
            await written

        return asyncio.ensure_future(later())

    journal.update = slow_end
    return gate, held


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


async def wait_until_up(
    url: str, proc: asyncio.subprocess.Process, log: Path, timeout: float = 20, status: int = 200
) -> None:
    """Wait until a server we started answers `url` with `status`; fail with its log if it exits instead."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == status:
                        return
            except aiohttp.ClientConnectionError:
                if proc.returncode is not None:
                    raise AssertionError(await asyncio.to_thread(_tail, log)) from None
                await asyncio.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text()[-4000:] if log.exists() else "it exited"


def system_binary(name: str, package: str) -> str:
    """The path of a system program a test runs for real. `.ci/run` installs them (the list is
    `.ci/system-packages`) before the tests; under CI=true a missing one fails the test, elsewhere
    it is skipped saying how to get it. The tests never install anything themselves."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        why = f"{name} is not installed: apt-get install {package} (CI installs .ci/system-packages)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
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


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` mounted read-only over itself (a disk remounted read-only) until the block ends;
    skipped where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    for args in (["--bind", str(folder), str(folder)], ["-o", "remount,ro,bind", str(folder)]):
        done = subprocess.run(["mount", *args], capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)
            pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=False)


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


def files_under(folder: Path) -> list[Path] | None:
    """Every file under `folder`, or None while a folder in it was being removed as it was listed
    (a bridge tidying up): look again."""
    try:
        return [p for p in folder.rglob("*") if p.is_file()]
    except FileNotFoundError:
        return None


def run_cli(args: list[str], cwd: Path, prefix: Sequence[str] = (), **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    if "--port" not in args:  # any free port: the port is bound before anything else is done
        args = [*args, "--port", "0"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "comfybridge", *args],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def bound_by_file_modes() -> list[str]:
    """A command prefix under which file modes count: as root, root's power to read and search
    whatever the modes say is dropped (setpriv); nothing for an ordinary user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (Debian's util-linux) to run the bridge as root bound by file modes")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


@asynccontextmanager
async def bridge_process(
    workdir: Path, *args: str, ready: str = "/generation-count", prefix: Sequence[str] = ()
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m comfybridge` on port 0 (the port it binds is read from its banner), its stderr in
    workdir/bridge.log; up once `ready` answers 200 (with API keys on, name a path that needs none).
    `prefix`: a command it runs under (`bound_by_file_modes()`)."""
    args = args or ("--emulate", "1")
    if "--stop-grace" not in args:  # stop at once on SIGTERM, unless the test is about the grace
        args = (*args, "--stop-grace", "0")
    if "--port" not in args:
        args = (*args, "--port", "0")
    log = await asyncio.to_thread(open, workdir / "bridge.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "comfybridge", *args,
        cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=log,
    )  # fmt: skip
    try:
        url = await _listening_url(proc, workdir / "bridge.log")
        await wait_until_up(f"{url}{ready}", proc, workdir / "bridge.log")
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()


async def _listening_url(proc: asyncio.subprocess.Process, log: Path) -> str:
    """The address in the banner the bridge prints once its port is bound."""
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = await proc.stdout.readline()
    found = re.match(rb"comfybridge on (http://\S+) ->", line)
    if found is None:
        await proc.wait()
        raise AssertionError(f"no banner ({line!r}): {await asyncio.to_thread(_tail, log)}")
    return found.group(1).decode()


async def submit(url: str, client_id: str, headers: dict[str, str] | None = None) -> str:
    """A small job; its id."""
    async with aiohttp.ClientSession() as session:
        body = {"workflow": "solid", "1/width": 8}
        params = {"clientId": client_id}
        async with session.post(f"{url}/generate-based-workflow", params=params, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            job_id: str = (await resp.json())["job_id"]
            return job_id


async def count(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/generation-count") as resp:
        value: int = await resp.json()
        return value


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("comfybridge: error: ")]
    assert len(lines) == 1, result.stderr
    assert result.stderr.strip().endswith(lines[0])
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


TINY = {"workflow": "solid", "1/width": 8, "1/height": 8, "1/batch_size": 1}


def backends(*emulators: Emulator, database: str = "", storage: dict[str, str] | None = None) -> tuple[str, ...]:
    """A bridge process's flags for these emulators (and this database, "" for the SQLite journal,
    and this storage, the `storage` fixture's settings: none for folders under the data dir)."""
    flags: tuple[str, ...] = ("--backends", ",".join(e.url for e in emulators), "--job-idle-timeout", "60")
    if database:
        flags += ("--database", database)
    if storage:
        flags += ("--storage", storage["storage"], "--s3-endpoint", storage["s3_endpoint"])
    return flags


async def post_job(session: aiohttp.ClientSession, url: str, client_id: str, body: dict[str, Any]) -> str:
    async with session.post(f"{url}/generate-based-workflow", params={"clientId": client_id}, json=body) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        job_id: str = answer["job_id"]
        return job_id


async def status_of(session: aiohttp.ClientSession, url: str, client_id: str) -> Any:
    async with session.get(f"{url}/execution-info", params={"clientId": client_id}) as resp:
        return await resp.json()


async def wait_closed(session: aiohttp.ClientSession, url: str, client_ids: list[str], timeout: float = 90) -> None:
    """Poll like a REST client until every client says `closed` (the guard only stops a hang)."""
    async with asyncio.timeout(timeout):
        for client_id in client_ids:
            while (info := await status_of(session, url, client_id))["status"] != "closed":
                assert info["status"] != "error", (client_id, info)
                await asyncio.sleep(0.05)


async def fetch_results(session: aiohttp.ClientSession, url: str, client_id: str) -> list[tuple[str, str]]:
    """(job id, file name) of every part /history returns."""
    async with session.get(f"{url}/history", params={"clientId": client_id}) as resp:
        if resp.status == 204:
            return []
        assert resp.status == 200
        reader = aiohttp.MultipartReader.from_response(resp)
        parts = []
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            await part.read()
            parts.append((part.headers["X-Job-Id"], part.filename or ""))
        return parts


def gzip_bomb(megabytes: int) -> bytes:
    """A JSON body that inflates to `megabytes` MB, made without ever holding it inflated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    chunk = b"x" * (1024 * 1024)
    pieces = [packer.compress(b'{"workflow": "')]
    pieces += [packer.compress(chunk) for _ in range(megabytes)]
    return b"".join([*pieces, packer.compress(b'"}'), packer.flush()])


def stored(client: Client, area: str = "uploads") -> list[Path]:
    """Every file the in-process bridge keeps in `area` (see `kept`)."""
    settings = client.app[SETTINGS]
    return kept(settings.data_dir, area, {"storage": settings.storage, "s3_endpoint": settings.s3_endpoint})


def kept(data_dir: Path, area: str, storage: dict[str, str]) -> list[Path]:
    """Every file in a bridge's `area` folder (uploads or results), and with object storage every
    object there, as if it were in that folder (`<prefix>uploads/c-x/name` as `data/uploads/c-x/name`)."""
    root = data_dir / area
    while True:
        try:
            found = [p for p in root.rglob("*") if p.is_file()]  # with object storage: only a spool left behind
            break
        except FileNotFoundError:  # a folder the bridge removed while it was walked: look again
            continue
    if storage.get("storage"):
        import boto3

        bucket, prefix = parse_storage_url(storage["storage"])
        s3 = boto3.client("s3", endpoint_url=storage["s3_endpoint"], region_name="us-east-1")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}{area}/")
        found += [root / item["Key"].removeprefix(f"{prefix}{area}/") for p in pages for item in p.get("Contents", ())]
    return sorted(found)
