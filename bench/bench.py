"""Benchmarks: the bridge and ComfyUI emulators as separate processes on loopback, measured from outside.

    python bench/bench.py                 # every benchmark, a table
    python bench/bench.py --only overhead --json

`--json` prints one JSON object per benchmark, each on its own line (the last line of its output).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "tests" / "fixtures" / "workflows"
SOLID = {"workflow": "solid", "1/width": 64, "1/height": 64, "1/batch_size": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_up(url: str, path: str) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            try:
                async with session.get(url + path) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


@asynccontextmanager
async def process(args: list[str], url: str, ready_path: str) -> AsyncIterator[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_up(url, ready_path)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


@asynccontextmanager
async def stack(emulators: int, pace: float = 0.0, **bridge: Any) -> AsyncIterator[tuple[str, list[str]]]:
    """`emulators` ComfyUI emulators and one bridge in front of them, all in their own processes."""
    data = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        async with AsyncExitStack() as exits:
            comfy = []
            for _ in range(emulators):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                args = ["-m", "comfybridge.emulator", "--port", str(port), "--pace", str(pace)]
                comfy.append(await exits.enter_async_context(process(args, url, "/system_stats")))
            port = free_port()
            args = ["-m", "comfybridge", "--port", str(port), "--backends", ",".join(comfy)]
            args += ["--workflows", str(WORKFLOWS), "--data-dir", str(data), "--log-level", "WARNING"]
            for key, value in bridge.items():
                args += ["--" + key.replace("_", "-"), str(value)]
            url = f"http://127.0.0.1:{port}"
            yield await exits.enter_async_context(process(args, url, "/generation-count")), comfy
    finally:
        shutil.rmtree(data, ignore_errors=True)


async def bridge_job(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    """One job as a WebSocket client does it: socket, submit, wait for `closed`, fetch the results."""
    client_id = uuid.uuid4().hex
    ws_url = url.replace("http", "ws", 1) + "/ws"
    async with session.ws_connect(ws_url, params={"clientId": client_id}) as ws:
        async with session.post(f"{url}/generate-based-workflow", params={"clientId": client_id}, json=body) as resp:
            assert resp.status == 200, await resp.text()
        async for msg in ws:
            status = orjson.loads(msg.data)["status"]
            if status == "closed":
                break
            assert status != "error", msg.data
    async with session.get(f"{url}/history", params={"clientId": client_id}) as resp:
        return len(await resp.read())


async def direct_job(session: aiohttp.ClientSession, url: str, prompt: dict[str, Any]) -> int:
    """The same job straight against ComfyUI: socket, POST /prompt, wait for executing null, /history, /view."""
    client_id = uuid.uuid4().hex
    async with session.ws_connect(f"{url}/ws", params={"clientId": client_id}) as ws:
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
            prompt_id = (await resp.json())["prompt_id"]
        async for msg in ws:
            message = orjson.loads(msg.data)
            if message["type"] == "executing" and message["data"]["node"] is None:
                break
    async with session.get(f"{url}/history/{prompt_id}") as resp:
        entry = (await resp.json())[prompt_id]
    size = 0
    for output in entry["outputs"].values():
        for image in output["images"]:
            async with session.get(f"{url}/view", params=image) as resp:
                size += len(await resp.read())
    return size


def solid_prompt() -> dict[str, Any]:
    prompt: dict[str, Any] = orjson.loads((WORKFLOWS / "b_emptyimage_save.json").read_bytes())
    prompt["1"]["inputs"].update(width=64, height=64, batch_size=1)
    return prompt


async def timed(job: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await job()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def bench_overhead(jobs: int) -> dict[str, Any]:
    """Latency of one small job through the bridge against the same job sent to ComfyUI directly."""
    async with stack(1) as (url, comfy), aiohttp.ClientSession() as session:
        prompt = solid_prompt()
        await timed(lambda: direct_job(session, comfy[0], prompt), 20)  # warm up both paths
        await timed(lambda: bridge_job(session, url, SOLID), 20)
        direct = await timed(lambda: direct_job(session, comfy[0], prompt), jobs)
        bridged = await timed(lambda: bridge_job(session, url, SOLID), jobs)
    direct_ms, bridge_ms = statistics.median(direct), statistics.median(bridged)
    return {
        "name": "overhead",
        "jobs": jobs,
        "direct_median_ms": round(direct_ms, 2),
        "bridge_median_ms": round(bridge_ms, 2),
        "added_median_ms": round(bridge_ms - direct_ms, 2),
        "bridge_p95_ms": round(statistics.quantiles(bridged, n=20)[18], 2),
    }


async def bench_throughput(jobs: int, clients: int = 20) -> dict[str, Any]:
    """Jobs per second through the bridge: `clients` concurrent clients, two emulated backends."""
    async with stack(2) as (url, _), aiohttp.ClientSession() as session:
        await asyncio.gather(*(bridge_job(session, url, SOLID) for _ in range(10)))
        queue: asyncio.Queue[None] = asyncio.Queue()
        for _ in range(jobs):
            queue.put_nowait(None)

        async def client() -> None:
            while not queue.empty():
                queue.get_nowait()
                await bridge_job(session, url, SOLID)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"name": "throughput", "jobs": jobs, "clients": clients, "seconds": round(elapsed, 2),
            "jobs_per_s": round(jobs / elapsed, 1)}  # fmt: skip


BENCHMARKS: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "overhead": lambda args: bench_overhead(args.jobs),
    "throughput": lambda args: bench_throughput(args.jobs * 2),
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these")
    parser.add_argument("--jobs", type=int, default=200, help="jobs per measurement (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per benchmark")
    args = parser.parse_args()
    for name in args.only or list(BENCHMARKS):
        result = await BENCHMARKS[name](args)
        if args.json:
            print(orjson.dumps(result).decode(), flush=True)
        else:
            print(f"{name:12} " + "  ".join(f"{k}={v}" for k, v in result.items() if k != "name"), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
