"""Benchmarks: the bridge and ComfyUI emulators as separate processes on loopback, measured from outside.

    python bench/bench.py                 # every benchmark, a table
    python bench/bench.py --only overhead --json

`--json` prints one JSON object per benchmark, each on its own line (the last line of its output).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import itertools
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from comfybridge.emulator.png import png_from_rows, solid_png

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "tests" / "fixtures" / "workflows"
SOLID = {"workflow": "solid", "1/width": 64, "1/height": 64, "1/batch_size": 1}
PROCESSES: dict[str, asyncio.subprocess.Process] = {}  # by URL, so a benchmark can kill a backend
DATA_DIRS: dict[str, Path] = {}  # a bridge's data folder, by URL
EVERY_BRIDGE: dict[str, Any] = {}  # settings every bridge started here gets (--database)


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
async def process(args: list[str], url: str, ready_path: str, root: Path = ROOT) -> AsyncIterator[str]:
    """`python ARGS` with the comfybridge of the checkout at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, cwd=root, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    PROCESSES[url] = proc
    try:
        await wait_up(url, ready_path)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # a graceful stop at once (SIGTERM would drain for stop_grace)
        await proc.wait()


@asynccontextmanager
async def emulators(paces: list[float], root: Path | None = None) -> AsyncIterator[list[str]]:
    """ComfyUI emulators in their own processes, one per pace (with `root`, each in `root/<index>`,
    its outputs in `root/<index>/output`)."""
    async with AsyncExitStack() as exits:
        urls = []
        for index, pace in enumerate(paces):
            port = free_port()
            args = ["-m", "comfybridge.emulator", "--port", str(port), "--pace", str(pace)]
            args += ["--root", str(root / str(index))] if root else []
            urls.append(await exits.enter_async_context(process(args, f"http://127.0.0.1:{port}", "/system_stats")))
        yield urls


@asynccontextmanager
async def bridge_for(
    comfy: list[str], root: Path = ROOT, home: Path | None = None, **bridge: Any
) -> AsyncIterator[str]:
    """One bridge process (of the checkout at `root`) in front of the given ComfyUI servers, with a
    data folder of its own; with `home` (one ComfyUI's folder), reading its outputs from
    home/output and writing uploads into home/input."""
    if home is not None:
        bridge |= {"comfy_outputs": f"{comfy[0]}={home / 'output'}", "comfy_inputs": f"{comfy[0]}={home / 'input'}"}
    data = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        DATA_DIRS[url] = data
        async with process(bridge_args(port, comfy, data, **bridge), url, "/generation-count", root):
            yield url
    finally:
        shutil.rmtree(data, ignore_errors=True)


@asynccontextmanager
async def stack(paces: list[float], **bridge: Any) -> AsyncIterator[tuple[str, list[str]]]:
    """Emulators (one per pace) and one bridge in front of them, all in their own processes."""
    async with emulators(paces) as comfy, bridge_for(comfy, **bridge) as url:
        yield url, comfy


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


async def bridge_wait_job(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    """One job in one request (`?wait=1`), as a client of a synchronous wrapper does it."""
    params = {"clientId": uuid.uuid4().hex, "wait": "1"}
    async with session.post(f"{url}/generate-based-workflow", params=params, json=body) as resp:
        data = await resp.read()
        assert resp.status == 200, data[:300]
        return len(data)


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
    return await comfy_outputs(session, url, prompt_id)


async def comfy_outputs(session: aiohttp.ClientSession, comfy: str, prompt_id: str) -> int:
    """A finished prompt's outputs as a direct client fetches them: its /history entry, then each
    image by /view; their bytes."""
    async with session.get(f"{comfy}/history/{prompt_id}") as resp:
        entry = (await resp.json())[prompt_id]
    size = 0
    for output in entry["outputs"].values():
        for image in output["images"]:
            async with session.get(f"{comfy}/view", params=image) as resp:
                size += len(await resp.read())
    return size


def fresh_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    """`solid_prompt` with a name of its own, as the bridge and the peer give each prompt: ComfyUI's
    cache would otherwise skip the SaveImage of a prompt it has just run."""
    mine: dict[str, Any] = orjson.loads(orjson.dumps(prompt))
    mine["2"]["inputs"]["filename_prefix"] = f"direct/{uuid.uuid4().hex}/x"  # a folder each, as the bridge
    return mine


def solid_prompt() -> dict[str, Any]:
    prompt: dict[str, Any] = orjson.loads((WORKFLOWS / "b_emptyimage_save.json").read_bytes())
    prompt["1"]["inputs"].update(width=64, height=64, batch_size=1)
    return prompt


def cpu_seconds(url: str) -> float:
    """User + system CPU time the process behind `url` has used so far."""
    with open(f"/proc/{PROCESSES[url].pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def in_parallel(job: Callable[[], Awaitable[Any]], count: int, concurrency: int) -> list[float]:
    """Run `count` jobs, `concurrency` at a time; each one's latency in ms."""
    left = itertools.count()
    samples: list[float] = []

    async def worker() -> None:
        while next(left) < count:
            start = time.perf_counter()
            await job()
            samples.append((time.perf_counter() - start) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100)[q - 1]


async def bridges_beside(exits: AsyncExitStack, before: Path | None) -> tuple[list[str], dict[str, str]]:
    """A pace-0 emulator, and in front of it this checkout's bridge, the same using the emulator's
    folders (`comfy_outputs`, `comfy_inputs`) and, with `before`, one of that checkout: (the emulator's URL
    list, {"bridge": url, "local": url, "before": url})."""
    root = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="bench-comfy-")))
    comfy = await exits.enter_async_context(emulators([0.0], root))
    bridges = {"bridge": await exits.enter_async_context(bridge_for(comfy))}
    bridges["local"] = await exits.enter_async_context(bridge_for(comfy, home=root / "0"))
    if before:
        bridges["before"] = await exits.enter_async_context(bridge_for(comfy, before))
    return comfy, bridges


async def bench_cpu_per_job(jobs: int, before: Path | None = None) -> dict[str, Any]:
    """The bridge's own CPU time per job (user + sys of its process ÷ jobs), full flow (socket,
    generate, `closed`, `/history`; and `wait_`: one `?wait=1` request), one job at a time and 32 at
    a time; pace-0 emulator. With
    `before`, a bridge of that checkout is measured in turn beside it, on the same emulator."""
    result: dict[str, Any] = {"name": "cpu_per_job", "jobs": jobs}
    async with AsyncExitStack() as exits:
        _, bridges = await bridges_beside(exits, before)
        session = await exits.enter_async_context(aiohttp.ClientSession())
        for url in bridges.values():
            await in_parallel(functools.partial(bridge_job, session, url, SOLID), 50, 8)  # warm up
        for concurrency in (1, 32):
            for name, url in bridges.items():
                spent = cpu_seconds(url)
                await in_parallel(functools.partial(bridge_job, session, url, SOLID), jobs, concurrency)
                result[f"{name}_cpu_ms_c{concurrency}"] = round((cpu_seconds(url) - spent) * 1000 / jobs, 2)
            for name in ("bridge", "local"):  # and the same job in one request (`?wait=1`)
                url, prefix = bridges[name], "" if name == "bridge" else f"{name}_"
                spent = cpu_seconds(url)
                await in_parallel(functools.partial(bridge_wait_job, session, url, SOLID), jobs, concurrency)
                result[f"{prefix}wait_cpu_ms_c{concurrency}"] = round((cpu_seconds(url) - spent) * 1000 / jobs, 2)
    return result


async def bench_overhead(jobs: int, before: Path | None = None) -> dict[str, Any]:
    """Latency of one small job through the bridge against the same steps sent to ComfyUI directly,
    alone (c1) and with 64 clients at once (c64); pace-0 emulator. With `before`, a bridge of that
    checkout is measured in turn beside it (its figures prefixed `before_`)."""
    result: dict[str, Any] = {"name": "overhead", "jobs": jobs}
    async with AsyncExitStack() as exits:
        comfy, bridges = await bridges_beside(exits, before)
        session = await exits.enter_async_context(aiohttp.ClientSession())
        prompt = solid_prompt()

        def direct() -> Awaitable[int]:
            return direct_job(session, comfy[0], prompt)

        await in_parallel(direct, 20, 1)  # warm up every path
        for url in bridges.values():
            await in_parallel(functools.partial(bridge_job, session, url, SOLID), 20, 1)
        for concurrency in (1, 64):
            count = jobs if concurrency == 1 else max(jobs, 4 * concurrency)
            tag = f"c{concurrency}"
            for name, url in bridges.items():
                prefix = "" if name == "bridge" else f"{name}_"
                straight = await in_parallel(direct, count, concurrency)
                through = await in_parallel(functools.partial(bridge_job, session, url, SOLID), count, concurrency)
                result[f"{prefix}direct_p50_ms_{tag}"] = round(statistics.median(straight), 2)
                result[f"{prefix}bridge_p50_ms_{tag}"] = round(statistics.median(through), 2)
                added = statistics.median(through) - statistics.median(straight)
                result[f"{prefix}added_p50_ms_{tag}"] = round(added, 2)
                if concurrency == 1:
                    added_p99 = percentile(through, 99) - percentile(straight, 99)
                    result[f"{prefix}added_p99_ms_c1"] = round(added_p99, 2)
                    if name != "before":  # the same job in one request (`?wait=1`)
                        wait = functools.partial(bridge_wait_job, session, url, SOLID)
                        waited = await in_parallel(wait, count, 1)
                        added = statistics.median(waited) - statistics.median(straight)
                        result[f"{prefix}wait_added_p50_ms_c1"] = round(added, 2)
                        added_p99 = percentile(waited, 99) - percentile(straight, 99)
                        result[f"{prefix}wait_added_p99_ms_c1"] = round(added_p99, 2)
    return result


async def bench_paired(jobs: int, before: Path | None, rounds: int = 3) -> dict[str, Any]:
    """The socket flow's latency, this checkout's bridge against `before`'s, both on one pace-0
    emulator, jobs alternating between them one at a time (the order swapped every time): no drift
    of the machine favours either, as it can between `overhead`'s blocks. p50 difference per round."""
    if before is None:
        return {"name": "paired", "skipped": "no --before DIR given"}
    result: dict[str, Any] = {"name": "paired", "jobs": jobs}
    async with AsyncExitStack() as exits:
        _, bridges = await bridges_beside(exits, before)
        session = await exits.enter_async_context(aiohttp.ClientSession())
        now, then = bridges["bridge"], bridges["before"]
        for url in (now, then):
            await in_parallel(functools.partial(bridge_job, session, url, SOLID), 50, 1)  # warm up
        for round_ in range(rounds):
            took: dict[str, list[float]] = {now: [], then: []}
            for n in range(jobs):
                for url in (now, then) if n % 2 == 0 else (then, now):
                    took[url] += await in_parallel(functools.partial(bridge_job, session, url, SOLID), 1, 1)
            p50_now, p50_then = statistics.median(took[now]), statistics.median(took[then])
            result[f"round{round_}_p50_ms"] = round(p50_now, 2)
            result[f"round{round_}_before_p50_ms"] = round(p50_then, 2)
            result[f"round{round_}_diff_ms"] = round(p50_now - p50_then, 2)
    return result


async def bench_throughput(jobs: int, clients: int = 20, backends: int = 4) -> dict[str, Any]:
    """Jobs per second from `clients` concurrent clients on `backends` pace-0 emulators: through the
    bridge, and a direct client doing the same steps (client i on emulator i mod `backends`)."""
    async with stack([0.0] * backends) as (url, comfy), aiohttp.ClientSession() as session:
        prompt = solid_prompt()
        await in_parallel(lambda: bridge_job(session, url, SOLID), 40, clients)  # warm up both paths
        for index in range(backends):
            await direct_job(session, comfy[index], prompt)
        workers = itertools.count()

        async def direct_worker() -> None:
            target = comfy[next(workers) % backends]
            while next(left) < jobs:
                await direct_job(session, target, prompt)

        left = itertools.count()
        start = time.perf_counter()
        await asyncio.gather(*(direct_worker() for _ in range(clients)))
        direct = jobs / (time.perf_counter() - start)
        start = time.perf_counter()
        await in_parallel(lambda: bridge_job(session, url, SOLID), jobs, clients)
        bridged = jobs / (time.perf_counter() - start)
    return {"name": "throughput", "jobs": jobs, "clients": clients, "backends": backends,
            "bridge_jobs_s": round(bridged, 1), "direct_jobs_s": round(direct, 1),
            "ratio": round(bridged / direct, 2)}  # fmt: skip


def memory_mb(url: str, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak so far (VmHWM), in MB."""
    with open(f"/proc/{PROCESSES[url].pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


async def bench_websockets(sockets: int, seconds: float = 10.0) -> dict[str, Any]:
    """`sockets` idle WebSocket clients (one clientId each) with the default 1 s `listening`
    heartbeat: the bridge's memory per 1,000 sockets and its share of one core while they idle."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * sockets + 1000)), hard))
    limits = {"max_sockets_per_ip": sockets + 10}
    connector = aiohttp.TCPConnector(limit=0)
    async with stack([0.0], **limits) as (url, _), aiohttp.ClientSession(connector=connector) as session:
        ws_url = url.replace("http", "ws", 1) + "/ws"
        before = memory_mb(url)
        frames = 0
        opened = asyncio.Event()
        count = itertools.count(1)

        async def idle(index: int) -> None:
            nonlocal frames
            async with session.ws_connect(ws_url, params={"clientId": f"idle-{index}"}) as ws:
                if next(count) == sockets:
                    opened.set()
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    frames += 1

        tasks = []
        for index in range(sockets):
            tasks.append(asyncio.create_task(idle(index)))
            if index % 200 == 199:
                await asyncio.sleep(0.05)  # a connection storm is not what this measures
        await asyncio.wait_for(opened.wait(), 300)
        await asyncio.sleep(2)  # settle
        rss = memory_mb(url)
        cpu_before, frames_before, started = cpu_seconds(url), frames, time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - started
        cpu_share = (cpu_seconds(url) - cpu_before) / elapsed
        heard = (frames - frames_before) / elapsed
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"name": "websockets", "clients": sockets, "rss_mb_before": round(before, 1),
            "rss_mb_with_sockets": round(rss, 1), "rss_mb_per_1k": round((rss - before) * 1000 / sockets, 2),
            "cpu_share": round(cpu_share, 3), "frames_heard_per_s": round(heard)}  # fmt: skip


def sparse_mp4(path: Path, size: int) -> None:
    """An MP4 the bridge accepts as whole (ftyp, then one mdat of zeros to the end), made in no time."""
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + (512).to_bytes(4, "big") + b"isomiso2"
    with path.open("wb") as handle:
        handle.write(ftyp + (size - len(ftyp)).to_bytes(4, "big") + b"mdat")
        handle.truncate(size)


async def bench_streaming(download_mb: int = 1024, upload_mb: int = 200) -> dict[str, Any]:
    """The bridge's peak memory growth while a job's `download_mb` video output goes from ComfyUI to
    the bridge and on to the client, and while a client uploads a `upload_mb` file."""
    size_mb = max(download_mb, upload_mb) + 50
    limits = {"max_upload_mb": size_mb, "max_request_mb": size_mb, "job_idle_timeout": 600}
    async with stack([0.0], **limits) as (url, comfy), aiohttp.ClientSession() as session:
        await bridge_job(session, url, SOLID)  # warm up
        async with session.post(f"{comfy[0]}/emulator/faults", json={"video_mb": download_mb}) as resp:
            assert resp.status == 200
        before = memory_mb(url)
        client_id = uuid.uuid4().hex
        ws_url = url.replace("http", "ws", 1) + "/ws"
        async with session.ws_connect(ws_url, params={"clientId": client_id}) as ws:
            params = {"clientId": client_id}
            async with session.post(f"{url}/generate-based-workflow", params=params, json=SOLID) as resp:
                assert resp.status == 200, await resp.text()
            async for msg in ws:
                if orjson.loads(msg.data)["status"] in ("closed", "error"):
                    break
        received = 0
        async with session.get(f"{url}/history", params={"clientId": client_id}) as resp:
            async for chunk in resp.content.iter_chunked(1 << 20):
                received += len(chunk)
        download_peak = memory_mb(url, "VmHWM")
        with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
            big = Path(tmp) / "big.mp4"
            sparse_mp4(big, upload_mb << 20)
            rss_before_upload = memory_mb(url)
            with big.open("rb") as handle:
                form = aiohttp.FormData()
                form.add_field("file", handle, filename="big.mp4", content_type="video/mp4")
                async with session.post(f"{url}/upload", params={"clientId": "uploader"}, data=form) as resp:
                    assert resp.status == 200, await resp.text()
        upload_peak = memory_mb(url, "VmHWM")
    return {"name": "streaming", "download_mb": download_mb, "received_mb": round(received / 2**20),
            "download_rss_growth_mb": round(download_peak - before, 1), "upload_mb": upload_mb,
            "upload_rss_growth_mb": round(max(0.0, upload_peak - max(rss_before_upload, download_peak)), 1),
            "rss_mb_before": round(before, 1)}  # fmt: skip


async def timeline(session: aiohttp.ClientSession, comfy: str) -> list[tuple[str, float, float]]:
    async with session.get(f"{comfy}/emulator/timeline") as resp:
        return [tuple(item) for item in await resp.json()]  # type: ignore[misc]


async def submit_all(session: aiohttp.ClientSession, url: str | list[str], bodies: list[dict[str, Any]]) -> list[str]:
    """Each job from a client of its own, all at once (job i through bridge i mod n, given several);
    returns the client ids."""
    urls = [url] if isinstance(url, str) else url
    ids = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(bodies))]

    async def one(index: int, client_id: str, body: dict[str, Any]) -> None:
        params = {"clientId": client_id}
        async with session.post(f"{urls[index % len(urls)]}/generate-based-workflow", params=params, json=body) as r:
            assert r.status == 200, await r.text()

    await asyncio.gather(*(one(i, c, b) for i, (c, b) in enumerate(zip(ids, bodies, strict=True))))
    return ids


async def wait_prompts(session: aiohttp.ClientSession, comfy: list[str], count: int) -> list[list[Any]]:
    """Poll the emulators' timelines until `count` prompts ran (only the benchmark polls, never the bridge)."""
    async with asyncio.timeout(600):
        while True:
            lines = [await timeline(session, c) for c in comfy]
            if sum(len(line) for line in lines) >= count:
                return lines  # type: ignore[return-value]
            await asyncio.sleep(0.1)


async def bench_idle_gap(jobs: int) -> dict[str, Any]:
    """Median idle time of a backend between two jobs while work waits, with and without pipelining."""
    result: dict[str, Any] = {"name": "idle_gap", "jobs": jobs}
    for label, depth in (("pipelined", 1), ("unpipelined", 0)):
        async with stack([0.01], pipeline_depth=depth) as (url, comfy), aiohttp.ClientSession() as session:
            gaps = await idle_gaps(session, [url], comfy[0], jobs)
        result[f"{label}_median_ms"] = round(statistics.median(gaps), 3)
        result[f"{label}_p95_ms"] = round(statistics.quantiles(gaps, n=20)[18], 3)
    return result


async def idle_gaps(session: aiohttp.ClientSession, urls: list[str], comfy: str, jobs: int) -> list[float]:
    """`jobs` small jobs submitted at once (over `urls`) to one backend: each gap (ms) between one
    prompt's end and the next one's start inside it."""
    await submit_all(session, urls, [dict(SOLID, **{"1/width": 32 + i}) for i in range(jobs)])
    (line,) = await wait_prompts(session, [comfy], jobs)
    line.sort(key=lambda item: item[1])
    return [(nxt[1] - prev[2]) * 1000 for prev, nxt in itertools.pairwise(line)]


SPEEDS = [1, 2, 4]  # relative speeds of the three emulated GPUs in the makespan benchmark
BASE_PACE = 0.06  # seconds per node on the 1x backend


def mixed_jobs(count: int) -> list[dict[str, Any]]:
    kinds = [
        lambda i: {"workflow": "solid", "1/width": 64 + i, "1/height": 64, "1/batch_size": 1},
        lambda i: {"workflow": "slow", "2/seed": i},
        lambda i: {"workflow": "text-to-image", "3/seed": i, "3/steps": 10, "5/width": 64, "5/height": 64},
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


def as_prompt(body: dict[str, Any]) -> dict[str, Any]:
    """The prompt the bridge would send for `body` (for the baselines that talk to ComfyUI directly)."""
    files = {
        "solid": "b_emptyimage_save.json",
        "slow": "c_slow_scale_blur.json",
        "text-to-image": "sd15_text_to_image.json",
    }
    prompt: dict[str, Any] = orjson.loads((WORKFLOWS / files[body["workflow"]]).read_bytes())
    for key, value in body.items():
        if key != "workflow":
            node, _, name = key.partition("/")
            prompt[node]["inputs"][name] = value
    return prompt


def makespan_of(lines: list[list[Any]], t0: float) -> tuple[float, float]:
    """(makespan, ideal): last end after t0, and the work in 1x-seconds spread over the total speed."""
    end = max(item[2] for line in lines for item in line)
    work = sum((item[2] - item[1]) * speed for line, speed in zip(lines, SPEEDS, strict=True) for item in line)
    return end - t0, work / sum(SPEEDS)


async def direct_run(bodies: list[dict[str, Any]], route: Callable[[int, list[int]], int]) -> tuple[float, float]:
    """A baseline: every job sent straight to the ComfyUI `route` picks, all at once."""
    async with emulators([BASE_PACE / s for s in SPEEDS]) as comfy, aiohttp.ClientSession() as session:
        counts = [0] * len(comfy)
        t0 = time.monotonic()
        for index, body in enumerate(bodies):
            target = route(index, counts)
            counts[target] += 1
            payload = {"prompt": as_prompt(body), "client_id": "baseline"}
            async with session.post(f"{comfy[target]}/prompt", json=payload) as resp:
                assert resp.status == 200, await resp.text()
        return makespan_of(await wait_prompts(session, comfy, len(bodies)), t0)


async def bench_makespan(jobs: int) -> dict[str, Any]:
    """Mixed jobs on three GPUs of speeds 1x, 2x, 4x: the bridge against round-robin and least-queue routing."""
    bodies = mixed_jobs(jobs)
    rr, _ = await direct_run(bodies, lambda index, counts: index % len(counts))
    lq, _ = await direct_run(bodies, lambda index, counts: counts.index(min(counts)))
    async with (
        stack([BASE_PACE / s for s in SPEEDS]) as (url, comfy),
        aiohttp.ClientSession() as session,
    ):
        t0 = time.monotonic()
        await submit_all(session, url, bodies)
        bridge, ideal = makespan_of(await wait_prompts(session, comfy, jobs), t0)
        shares = [len(line) for line in await asyncio.gather(*(timeline(session, c) for c in comfy))]
    return {
        "name": "makespan",
        "jobs": jobs,
        "bridge_s": round(bridge, 2),
        "round_robin_s": round(rr, 2),
        "least_queue_s": round(lq, 2),
        "ideal_s": round(ideal, 2),
        "bridge_vs_round_robin": f"{100 * (1 - bridge / rr):.0f}% shorter",
        "bridge_vs_ideal": f"{100 * (bridge / ideal - 1):.0f}% over",
        "jobs_per_backend_1x_2x_4x": shares,
    }


async def bench_failover(jobs: int) -> dict[str, Any]:
    """Three backends, one killed mid-run: does every job end exactly once?"""
    async with stack([0.03, 0.03, 0.03], backend_grace=1) as (url, comfy), aiohttp.ClientSession() as session:
        bodies = [{"workflow": "slow", "2/seed": i} for i in range(jobs)]
        ids = [f"fo-{i}" for i in range(jobs)]
        endings: dict[str, list[str]] = {client_id: [] for client_id in ids}
        sockets = [await session.ws_connect(url.replace("http", "ws", 1) + "/ws", params={"clientId": c}) for c in ids]

        async def follow(client_id: str, ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                status = orjson.loads(msg.data)["status"]
                if status in ("closed", "error"):
                    endings[client_id].append(status)

        followers = [asyncio.create_task(follow(c, ws)) for c, ws in zip(ids, sockets, strict=True)]
        for client_id, body in zip(ids, bodies, strict=True):
            async with session.post(f"{url}/generate-based-workflow", params={"clientId": client_id}, json=body) as r:
                assert r.status == 200
        await wait_prompts(session, comfy, jobs // 3)
        PROCESSES[comfy[0]].kill()  # kill -9 one ComfyUI mid-run
        async with asyncio.timeout(120):
            while sum(1 for e in endings.values() if e) < jobs:
                await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # a late duplicate would show up here
        fetched = 0
        for client_id in ids:
            async with session.get(f"{url}/history", params={"clientId": client_id}) as resp:
                fetched += resp.status == 200
        for ws in sockets:
            await ws.close()
        for task in followers:
            task.cancel()
    return {
        "name": "failover",
        "jobs": jobs,
        "ended_once": sum(1 for e in endings.values() if len(e) == 1),
        "ended_well": sum(1 for e in endings.values() if e == ["closed"]),
        "results_fetched": fetched,
        "lost": sum(1 for e in endings.values() if not e),
        "duplicated": sum(1 for e in endings.values() if len(e) > 1),
    }


def bridge_args(port: int, comfy: list[str], data: Path, **settings: Any) -> list[str]:
    args = ["-m", "comfybridge", "--port", str(port), "--backends", ",".join(comfy)]
    args += ["--workflows", str(WORKFLOWS), "--data-dir", str(data), "--log-level", "WARNING"]
    for key, value in {**EVERY_BRIDGE, **settings}.items():
        args += ["--" + key.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return args


async def hold_prompts(session: aiohttp.ClientSession, comfy: list[str]) -> None:
    """Make the emulators hold every prompt (a long model load), so only the bridge's side is measured."""
    for url in comfy:
        async with session.post(f"{url}/emulator/faults", json={"start_delay": 3600}) as resp:
            assert resp.status == 200


async def accept_rate(session: aiohttp.ClientSession, url: str, jobs: int, clients: int) -> float:
    """Accepted jobs per second: `clients` concurrent REST clients posting `jobs` jobs in all."""
    left = itertools.count()

    async def client(index: int) -> None:
        params = {"clientId": f"rate-{index}"}
        while next(left) < jobs:
            async with session.post(f"{url}/generate-based-workflow", params=params, json=SOLID) as resp:
                assert resp.status == 200, await resp.text()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return jobs / (time.perf_counter() - start)


async def bench_counter(jobs: int, clients: int = 32) -> dict[str, Any]:
    """Accept rate with the journal fsynced at every (group) commit vs with durability off, same run."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    async with emulators([0.0]) as comfy, aiohttp.ClientSession() as session:
        await hold_prompts(session, comfy)
        for sync in (True, False, True, False):  # interleaved, so drift hits both alike
            data = Path(tempfile.mkdtemp(prefix="bench-"))
            try:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                async with process(bridge_args(port, comfy, data, journal_sync=sync), url, "/generation-count"):
                    await accept_rate(session, url, 100, clients)  # warm up
                    rates[sync].append(await accept_rate(session, url, jobs, clients))
            finally:
                shutil.rmtree(data, ignore_errors=True)
    durable, off = statistics.median(rates[True]), statistics.median(rates[False])
    return {
        "name": "counter",
        "jobs": jobs,
        "clients": clients,
        "durable_jobs_s": round(durable, 1),
        "sync_off_jobs_s": round(off, 1),
        "ratio": round(durable / off, 2),
    }


async def generate_p50(session: aiohttp.ClientSession, url: str, count: int) -> float:
    params = {"clientId": "scale-probe"}

    async def one() -> None:
        async with session.post(f"{url}/generate-based-workflow", params=params, json=SOLID) as resp:
            assert resp.status == 200, await resp.text()

    return statistics.median(await in_parallel(one, count, 1))


async def bench_clients_scale(ids: int, concurrency: int = 64) -> dict[str, Any]:
    """Generate latency before and after `ids` distinct clientIds opened a socket and uploaded a file."""
    image = solid_png(4, 4, 0x808080)
    async with stack([0.0]) as (url, comfy), aiohttp.ClientSession() as session:
        await hold_prompts(session, comfy)
        before = await generate_p50(session, url, 200)
        rss_before = memory_mb(url)
        ws_url = url.replace("http", "ws", 1) + "/ws"
        counter = itertools.count()
        start = time.perf_counter()

        async def visitor() -> None:
            while (index := next(counter)) < ids:
                client_id = f"visitor-{index}"
                async with session.ws_connect(ws_url, params={"clientId": client_id}):
                    pass
                form = aiohttp.FormData()
                form.add_field("file", image, filename="a.png", content_type="image/png")
                async with session.post(f"{url}/upload", params={"clientId": client_id}, data=form) as resp:
                    assert resp.status == 200, await resp.text()

        await asyncio.gather(*(visitor() for _ in range(concurrency)))
        visiting = time.perf_counter() - start
        after = await generate_p50(session, url, 200)
        rss_after = memory_mb(url)
        data = DATA_DIRS[url]
        sizes = {name: _size(data / name) for name in ("current_state.json", "journal.sqlite3")}
    return {
        "name": "clients_scale",
        "ids": ids,
        "p50_ms_before": round(before, 2),
        "p50_ms_after": round(after, 2),
        "after_vs_before": round(after / before, 2),
        "rss_mb_before": round(rss_before),
        "rss_mb_after": round(rss_after),
        "state_file_bytes": sizes["current_state.json"],
        "journal_bytes": sizes["journal.sqlite3"],
        "seconds_to_visit": round(visiting, 1),
    }


def _size(path: Path) -> int:
    """A file's size with its SQLite write-ahead log, if it has one."""
    wal = path.with_name(path.name + "-wal")
    return (path.stat().st_size if path.exists() else 0) + (wal.stat().st_size if wal.exists() else 0)


async def bench_recovery(jobs: int, clients: int = 32) -> dict[str, Any]:
    """Start-up time with `jobs` unfinished jobs in the journal, after a kill -9, vs with an empty one."""
    data = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        async with emulators([0.0]) as comfy, aiohttp.ClientSession() as session:
            await hold_prompts(session, comfy)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            async with process(bridge_args(port, comfy, data / "empty"), url, "/generation-count"):
                empty = time.perf_counter() - started
            async with process(bridge_args(port, comfy, data / "full"), url, "/generation-count"):
                await accept_rate(session, url, jobs, clients)
                PROCESSES[url].kill()  # kill -9: nothing is saved on the way out
            started = time.perf_counter()
            async with process(bridge_args(port, comfy, data / "full"), url, "/generation-count"):
                full = time.perf_counter() - started
                async with session.get(f"{url}/execution-info", params={"clientId": "rate-0"}) as resp:
                    status = (await resp.json())["status"]
        return {
            "name": "recovery",
            "jobs": jobs,
            "seconds": round(full, 2),
            "seconds_empty_journal": round(empty, 2),
            "journal_bytes": _size(data / "full" / "journal.sqlite3"),
            "a_recovered_client_says": status,
        }
    finally:
        shutil.rmtree(data, ignore_errors=True)


async def bench_spread(clients: int = 6) -> dict[str, Any]:
    """Two idle backends, one of which has only run short jobs; then `clients` clients submit one job
    each of a workflow no backend has run. A job 'waited while idle' when it started after a moment at
    which some backend sat idle with that job still waiting."""
    async with stack([0.1, 0.1]) as (url, comfy), aiohttp.ClientSession() as session:
        for index in range(3):  # the bias: short jobs known on whichever backend took them
            await bridge_job(session, url, dict(SOLID, **{"1/width": 16 + index}))
        before = [len(await timeline(session, c)) for c in comfy]
        t0 = time.monotonic()
        await submit_all(session, url, [{"workflow": "slow", "2/seed": i} for i in range(clients)])
        lines = await wait_prompts(session, comfy, sum(before) + clients)
    runs = [line[skip:] for line, skip in zip(lines, before, strict=True)]
    waited = 0
    for line in runs:
        for _, start, _ in line:
            for other in runs:  # was another backend idle at some moment between t0 and this start?
                busy = sorted((s, e) for _, s, e in other)
                free_from = t0
                for s, e in busy:
                    if s > free_from + 0.02 and free_from < start - 0.02:
                        waited += 1
                        break
                    free_from = max(free_from, e)
                else:
                    continue
                break
    return {
        "name": "spread",
        "clients": clients,
        "waited_while_idle": waited,
        "jobs_per_backend": [len(r) for r in runs],
    }


def spans_of(history: dict[str, Any], prompt_ids: set[str]) -> list[tuple[float, float]]:
    """(start, end) in ComfyUI's own clock (ms) of each of these prompts, by start."""
    spans = []
    for prompt_id in prompt_ids:
        events = dict((name, data) for name, data in history[prompt_id]["status"]["messages"])
        spans.append((events["execution_start"]["timestamp"], events["execution_success"]["timestamp"]))
    return sorted(spans)


def busy_fraction(spans: list[tuple[float, float]]) -> float:
    """Share of the wall time (first start to last end) ComfyUI spent running these prompts."""
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return sum(end - start for start, end in spans) / wall if wall > 0 else 1.0


async def comfy_history(session: aiohttp.ClientSession, comfy: str) -> dict[str, Any]:
    async with session.get(f"{comfy}/history", params={"max_items": 100000}) as resp:
        history: dict[str, Any] = await resp.json()
        return history


async def count_ran_dry(session: aiohttp.ClientSession, comfy: str, count: list[int]) -> None:
    """Count ComfyUI's `status` broadcasts saying its queue is empty: at a prompt's end, it ran dry
    (nothing queued behind it), whoever was to feed it."""
    async with session.ws_connect(f"{comfy}/ws", params={"clientId": f"watcher-{uuid.uuid4().hex}"}) as ws:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                message = orjson.loads(msg.data)
                if message["type"] == "status" and message["data"]["status"]["exec_info"]["queue_remaining"] == 0:
                    count[0] += 1


async def peer_job(session: aiohttp.ClientSession, peer: str, prompt: dict[str, Any]) -> int:
    """The same job through another wrapper of one ComfyUI: SaladTechnologies/comfyui-api's
    synchronous `POST /prompt`, which answers with the outputs base64-encoded."""
    async with session.post(f"{peer}/prompt", json={"prompt": prompt}) as resp:
        body = await resp.read()
        assert resp.status == 200, body[:300]
        return len(body)


async def bench_real(
    target: str | None,
    jobs: int,
    clients: int = 8,
    peer: str | None = None,
    before: Path | None = None,
    home: Path | None = None,
) -> dict[str, Any]:
    """Against a real ComfyUI (`--real HOST:PORT`): added latency per tiny job, throughput,
    ComfyUI's busy fraction and its idle gap between prompts with `clients` clients, through the
    bridge vs a direct client, and through another wrapper (`--peer URL`), a bridge of another
    checkout (`--before DIR`) and a bridge reading ComfyUI's output folder (`--real-home DIR`:
    `comfy_outputs`, as the peer reads it) in the same run. The paths take turns: job by job for
    the latency, then two rounds of load, each path in turn within a round."""
    if not target:
        return {"name": "real", "skipped": "no --real HOST:PORT given"}
    comfy = target if "://" in target else f"http://{target}"
    async with AsyncExitStack() as exits:
        url = await exits.enter_async_context(bridge_for([comfy], delete_history=False))
        session = await exits.enter_async_context(aiohttp.ClientSession())
        earlier = await exits.enter_async_context(bridge_for([comfy], before, delete_history=False)) if before else ""
        prompt = solid_prompt()
        paths: dict[str, Callable[[], Awaitable[int]]] = {
            "direct": lambda: direct_job(session, comfy, fresh_prompt(prompt)),
            "bridge": lambda: bridge_job(session, url, SOLID),
            "bridge_wait": lambda: bridge_wait_job(session, url, SOLID),  # one request, as the peer's clients
        }
        if peer:
            paths["peer"] = lambda: peer_job(session, peer, prompt)
        if earlier:
            paths["before"] = lambda: bridge_job(session, earlier, SOLID)
        if home:
            local = await exits.enter_async_context(bridge_for([comfy], home=home, delete_history=False))
            paths["local"] = lambda: bridge_job(session, local, SOLID)
            paths["local_wait"] = lambda: bridge_wait_job(session, local, SOLID)
        for job in paths.values():  # warm up every path
            await in_parallel(job, 10, 1)
        ran_dry = [0]
        watcher = asyncio.create_task(count_ran_dry(session, comfy, ran_dry))
        dry: dict[str, int] = dict.fromkeys(paths, 0)
        latency: dict[str, list[float]] = {name: [] for name in paths}
        rates: dict[str, list[float]] = {name: [] for name in paths}
        rounds: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in paths}  # spans, per round
        for _ in range(jobs):  # one job of each path in turn: ComfyUI's drift (its history grows) hits all alike
            for name, job in paths.items():
                latency[name] += await in_parallel(job, 1, 1)
                await asyncio.sleep(0.02)  # what one job leaves behind settles before the next path's
        for _ in range(2):
            for name, job in paths.items():
                known = set(await comfy_history(session, comfy))
                ran_dry[0] = 0
                start = time.perf_counter()
                await in_parallel(job, jobs, clients)
                rates[name].append(jobs / (time.perf_counter() - start))
                dry[name] += ran_dry[0]
                history = await comfy_history(session, comfy)
                rounds[name].append(spans_of(history, set(history) - known))
        watcher.cancel()
    p50 = {name: statistics.median(values) for name, values in latency.items()}
    rate = {name: statistics.mean(values) for name, values in rates.items()}
    result: dict[str, Any] = {"name": "real", "comfyui": comfy, "jobs": jobs, "clients": clients}
    for name in paths:
        result[f"{name}_p50_ms"] = round(p50[name], 2)
        result[f"{name}_jobs_s"] = round(rate[name], 1)
        result[f"{name}_busy"] = round(statistics.mean(busy_fraction(spans) for spans in rounds[name]), 3)
        gaps = [max(0.0, b[0] - a[1]) for spans in rounds[name] for a, b in itertools.pairwise(spans)]
        result[f"{name}_idle_gap_p50_ms"] = round(statistics.median(gaps), 2)
        # ComfyUI stamps whole milliseconds: over hundreds of gaps the mean resolves what the median cannot.
        result[f"{name}_idle_gap_mean_ms"] = round(statistics.mean(gaps), 2)
        result[f"{name}_ran_dry_pct"] = round(100 * dry[name] / (2 * jobs), 1)  # of prompt ends, under load
        if name != "direct":
            result[f"{name}_added_p50_ms"] = round(p50[name] - p50["direct"], 2)
            result[f"{name}_throughput_ratio"] = round(rate[name] / rate["direct"], 2)
    return result


async def kept_bridge_job(
    session: aiohttp.ClientSession, url: str, ws: aiohttp.ClientWebSocketResponse, client_id: str, body: dict[str, Any]
) -> tuple[float, float]:
    """One job as the client library does it, its socket open from job to job: ms to the submit's
    answer, and to the results fetched."""
    start = time.perf_counter()
    async with session.post(f"{url}/generate-based-workflow", params={"clientId": client_id}, json=body) as resp:
        assert resp.status == 200, await resp.text()
        job_id = (await resp.json())["job_id"]
    answered = time.perf_counter()
    async for msg in ws:
        frame = orjson.loads(msg.data)
        assert frame["status"] != "error", msg.data
        if frame["status"] == "closed" and frame.get("job_id") == job_id:
            break
    async with session.get(f"{url}/history", params={"clientId": client_id}) as resp:
        await resp.read()
    return (answered - start) * 1000, (time.perf_counter() - start) * 1000


async def kept_direct_job(
    session: aiohttp.ClientSession, comfy: str, ws: aiohttp.ClientWebSocketResponse, client_id: str, prompt: Any
) -> tuple[float, float]:
    """The same straight against ComfyUI, its socket open from job to job: POST /prompt, its final
    `executing null`, /history, /view."""
    start = time.perf_counter()
    async with session.post(f"{comfy}/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
        prompt_id = (await resp.json())["prompt_id"]
    answered = time.perf_counter()
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            continue  # previews
        message = orjson.loads(msg.data)
        data = message["data"]
        if message["type"] == "executing" and data["node"] is None and data.get("prompt_id") == prompt_id:
            break
    await comfy_outputs(session, comfy, prompt_id)
    return (answered - start) * 1000, (time.perf_counter() - start) * 1000


async def bench_real_kept(
    target: str | None,
    jobs: int,
    peer: str | None = None,
    before: Path | None = None,
    noise: int = 0,
    home: Path | None = None,
) -> dict[str, Any]:
    """Against a real ComfyUI (`--real`), one job at a time, each path in turn, every client's socket
    open from job to job (as the client library keeps it): the submit's answer and the whole job,
    p50, through the bridge, a direct client, `--peer`, `--before` and `--real-home` (`local`). With
    `--noise SIDE`, a SIDE x SIDE noise PNG through `invert` instead of a tiny prompt (bridges only:
    a large upload and a large result)."""
    if not target:
        return {"name": "real_kept", "skipped": "no --real HOST:PORT given"}
    comfy = target if "://" in target else f"http://{target}"
    async with AsyncExitStack() as exits:
        session = await exits.enter_async_context(aiohttp.ClientSession())
        bridges = {"bridge": await exits.enter_async_context(bridge_for([comfy], delete_history=False))}
        if before:
            bridges["before"] = await exits.enter_async_context(bridge_for([comfy], before, delete_history=False))
        if home:
            bridges["local"] = await exits.enter_async_context(bridge_for([comfy], home=home, delete_history=False))
        ids = {name: uuid.uuid4().hex for name in [*bridges, "direct"]}
        paths: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {}
        for name, url in bridges.items():
            body: dict[str, Any] = SOLID
            if noise:
                form = aiohttp.FormData()
                rows = [os.urandom(noise * 3) for _ in range(noise)]
                form.add_field("file", png_from_rows(noise, noise, rows), filename="noise.png")
                async with session.post(f"{url}/upload", params={"clientId": ids[name]}, data=form) as resp:
                    body = {"workflow": "invert", "1/image": (await resp.json())["file"]}
            ws = await exits.enter_async_context(
                session.ws_connect(url.replace("http", "ws", 1) + "/ws", params={"clientId": ids[name]})
            )
            paths[name] = functools.partial(kept_bridge_job, session, url, ws, ids[name], body)
        if not noise:
            prompt = solid_prompt()

            async def direct(ws: aiohttp.ClientWebSocketResponse) -> tuple[float, float]:
                return await kept_direct_job(session, comfy, ws, ids["direct"], fresh_prompt(prompt))

            ws = await exits.enter_async_context(session.ws_connect(f"{comfy}/ws", params={"clientId": ids["direct"]}))
            paths["direct"] = functools.partial(direct, ws)
            if peer:

                async def through_peer() -> tuple[float, float]:
                    start = time.perf_counter()
                    await peer_job(session, peer, prompt)
                    whole = (time.perf_counter() - start) * 1000
                    return whole, whole

                paths["peer"] = through_peer
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for round_ in range(jobs + 5):  # five to warm up
            for name, job in paths.items():
                sample = await job()
                if round_ >= 5:
                    samples[name].append(sample)
                await asyncio.sleep(0.02)  # what one job leaves behind settles before the next path's
    result: dict[str, Any] = {"name": "real_kept", "comfyui": comfy, "jobs": jobs, "noise": noise}
    for name, values in samples.items():
        result[f"{name}_submit_p50_ms"] = round(statistics.median(v[0] for v in values), 2)
        result[f"{name}_p50_ms"] = round(statistics.median(v[1] for v in values), 2)
    if "direct" in samples:
        for name in sorted(samples.keys() - {"direct"}):
            result[f"{name}_added_p50_ms"] = round(result[f"{name}_p50_ms"] - result["direct_p50_ms"], 2)
    return result


def gzip_bomb(megabytes: int) -> bytes:
    """A JSON body of `megabytes` MB once inflated, made without ever holding it inflated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"x" * (1024 * 1024)
    pieces = [packer.compress(b'{"workflow": "')] + [packer.compress(chunk) for _ in range(megabytes)]
    return b"".join([*pieces, packer.compress(b'"}'), packer.flush()])


async def for_seconds(job: Callable[[], Awaitable[Any]], seconds: float, concurrency: int) -> list[float]:
    """Run `job` from `concurrency` clients for `seconds`; each call's latency in ms."""
    samples: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while (start := time.perf_counter()) < stop:
            await job()
            samples.append((time.perf_counter() - start) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def bench_bomb(seconds: float = 10.0, concurrency: int = 8, every: float = 0.2) -> dict[str, Any]:
    """Latency of small requests (GET /generation-count) from `concurrency` clients for `seconds`,
    alone and while another client posts a 2 MB gzip body that would inflate to 2 GB every `every`
    seconds: how much a compressed bomb costs everyone else."""
    bomb = gzip_bomb(2048)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    result: dict[str, Any] = {"name": "bomb", "seconds": seconds, "bomb_kb": len(bomb) // 1024, "every_s": every}
    async with stack([0.0]) as (url, _), aiohttp.ClientSession() as session:

        async def small() -> None:
            async with session.get(f"{url}/generation-count") as resp:
                await resp.read()

        await for_seconds(small, 1.0, concurrency)  # warm up
        quiet = await for_seconds(small, seconds, concurrency)
        bombs = 0

        async def bomber() -> None:
            nonlocal bombs
            async with aiohttp.ClientSession() as own:
                while True:
                    try:
                        async with own.post(
                            f"{url}/generate-based-workflow", params={"clientId": "bomb"},
                            data=io.BytesIO(bomb), headers=headers,
                        ) as resp:  # fmt: skip
                            await resp.read()
                    except aiohttp.ClientError:
                        pass  # the bridge may hang up on the rest of a refused bomb
                    bombs += 1
                    await asyncio.sleep(every)

        task = asyncio.create_task(bomber())
        try:
            loud = await for_seconds(small, seconds, concurrency)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for tag, samples in (("quiet", quiet), ("bombed", loud)):
        result[f"{tag}_requests"] = len(samples)
        result[f"{tag}_p50_ms"] = round(statistics.median(samples), 2)
        result[f"{tag}_p99_ms"] = round(percentile(samples, 99), 2)
        result[f"{tag}_max_ms"] = round(max(samples), 2)
    result["bombs_sent"] = bombs
    return result


@contextlib.contextmanager
def postgres_server(url: str | None) -> Iterator[Callable[[], str]]:
    """Fresh databases (a function that makes one and returns its URL): on the server at `url`
    (--database), else on a throwaway PostgreSQL made here as the tests make theirs, with fsync on
    and pg_stat_statements loaded so database round trips can be counted."""
    if url:
        yield lambda: url  # the caller's database: no statement counts, one database for every cluster
        return
    sys.path.insert(0, str(ROOT))
    from tests.services import throwaway_postgres

    options = "-c fsync=on -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on"
    with throwaway_postgres(options) as server:

        def new_database() -> str:
            database = server.new_database()
            psql = [str(server.bindir / "psql"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"]
            server.run(*psql, "-d", database.rsplit("/", 1)[1], "-c", "CREATE EXTENSION pg_stat_statements")
            return database

        yield new_database


async def statements_run(database: str) -> int | None:
    """Statements the server ran in `database` so far (each one a round trip for the bridge's driver,
    BEGIN and COMMIT included); None without pg_stat_statements."""
    import asyncpg

    conn = await asyncpg.connect(database)
    try:
        return int(await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '%pg_stat_statements%'"
        ))  # fmt: skip
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()


@asynccontextmanager
async def cluster_of(size: int, comfy: list[str], database: str, **settings: Any) -> AsyncIterator[list[str]]:
    """`size` bridges on one database and one data folder, started one after the other: the first
    leads (checked), the others relay to it."""
    data = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        async with AsyncExitStack() as exits, aiohttp.ClientSession() as session:
            urls = []
            for _ in range(size):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                args = bridge_args(port, comfy, data, database=database, **settings)
                urls.append(await exits.enter_async_context(process(args, url, "/ready")))
            async with session.get(f"{urls[0]}/health") as resp:
                assert (await resp.json())["cluster"]["role"] == "leader"
            yield urls
    finally:
        shutil.rmtree(data, ignore_errors=True)


async def frame_delays(session: aiohttp.ClientSession, leader: str, follower: str, jobs: int) -> list[float]:
    """One client with a socket on the leader and one on a follower, `jobs` jobs one after another:
    for every frame, how much later (ms) it came through the follower than straight from the leader."""
    client_id = uuid.uuid4().hex
    arrivals: dict[str, dict[bytes, float]] = {"leader": {}, "follower": {}}
    sockets = {
        name: await session.ws_connect(url.replace("http", "ws", 1) + "/ws", params={"clientId": client_id})
        for name, url in (("leader", leader), ("follower", follower))
    }

    ended = {"leader": asyncio.Event(), "follower": asyncio.Event()}

    async def listen(name: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            arrivals[name][msg.data.encode()] = time.perf_counter()  # each frame is unique: job id, percent
            if orjson.loads(msg.data)["status"] in ("closed", "error"):
                ended[name].set()

    listeners = [asyncio.create_task(listen(name, ws)) for name, ws in sockets.items()]
    try:
        for seed in range(jobs):
            params = {"clientId": client_id}
            body = {"workflow": "slow", "2/seed": seed}
            async with session.post(f"{leader}/generate-based-workflow", params=params, json=body) as resp:
                assert resp.status == 200, await resp.text()
            for event in ended.values():
                await event.wait()
                event.clear()
            async with session.get(f"{leader}/history", params=params) as resp:
                await resp.read()
    finally:
        for ws in sockets.values():
            await ws.close()
        for task in listeners:
            task.cancel()
    return [
        (arrivals["follower"][frame] - at) * 1000
        for frame, at in arrivals["leader"].items()
        if frame in arrivals["follower"] and b'"connected"' not in frame
    ]


async def bench_cluster(jobs: int, database: str | None) -> dict[str, Any]:
    """Cluster mode: several bridges on one PostgreSQL, against a single SQLite bridge in the same run."""
    result: dict[str, Any] = {"name": "cluster", "jobs": jobs}
    with postgres_server(database) as new_database:
        async with emulators([0.0] * 4) as comfy, aiohttp.ClientSession() as session:
            # throughput: jobs/s with 1, 2 and 3 bridges, clients spread over them
            for size in (1, 2, 3):
                async with cluster_of(size, comfy, new_database()) as urls:
                    await in_parallel(lambda: bridge_job(session, urls[0], SOLID), 40, 8)  # warm up
                    next_url = itertools.cycle(urls).__next__
                    started = time.perf_counter()
                    await in_parallel(lambda turn=next_url: bridge_job(session, turn(), SOLID), jobs * 2, 20)
                    result[f"jobs_per_s_{size}_bridges"] = round(jobs * 2 / (time.perf_counter() - started), 1)
            # added latency of one job: a single SQLite bridge, the leader, a follower relaying to it
            async with bridge_for(comfy) as single:
                await in_parallel(lambda: bridge_job(session, single, SOLID), 20, 1)
                sqlite_p50 = statistics.median(await in_parallel(lambda: bridge_job(session, single, SOLID), jobs, 1))
            db = new_database()
            async with cluster_of(2, comfy, db) as (leader, follower):
                await in_parallel(lambda: bridge_job(session, leader, SOLID), 20, 1)
                before = await statements_run(db)
                leader_p50 = statistics.median(await in_parallel(lambda: bridge_job(session, leader, SOLID), jobs, 1))
                after = await statements_run(db)
                relayed_p50 = statistics.median(
                    await in_parallel(lambda: bridge_job(session, follower, SOLID), jobs, 1)
                )
                delays = await frame_delays(session, leader, follower, max(10, jobs // 10))
            result["sqlite_bridge_p50_ms"] = round(sqlite_p50, 2)
            result["postgres_leader_p50_ms"] = round(leader_p50, 2)
            result["through_follower_p50_ms"] = round(relayed_p50, 2)
            result["postgres_added_p50_ms"] = round(leader_p50 - sqlite_p50, 2)
            result["relay_added_p50_ms"] = round(relayed_p50 - leader_p50, 2)
            if before is not None and after is not None:  # heartbeats and the follower's polls included
                result["db_round_trips_per_job"] = round((after - before) / jobs, 1)
            result["relayed_frame_delay_p50_ms"] = round(statistics.median(delays), 2)
            result["relayed_frame_delay_p99_ms"] = round(percentile(delays, 99), 2)
            result["relayed_frames"] = len(delays)
            # takeover: kill -9 of the leader, then submit through a follower until it is accepted
            async with cluster_of(3, comfy, new_database()) as urls:
                await bridge_job(session, urls[1], SOLID)
                PROCESSES[urls[0]].kill()
                killed = time.perf_counter()
                while True:
                    async with session.post(
                        f"{urls[1]}/generate-based-workflow", params={"clientId": "after"}, json=SOLID
                    ) as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.01)
                result["takeover_s"] = round(time.perf_counter() - killed, 2)
        # pipelining: the idle gap of one backend behind one SQLite bridge, then behind a cluster of two
        for size in (1, 2):
            async with AsyncExitStack() as exits:
                (comfy,) = await exits.enter_async_context(emulators([0.01]))
                session = await exits.enter_async_context(aiohttp.ClientSession())
                if size == 1:
                    urls = [await exits.enter_async_context(bridge_for([comfy]))]
                else:
                    urls = await exits.enter_async_context(cluster_of(size, [comfy], new_database()))
                gaps = await idle_gaps(session, urls, comfy, jobs)
            label = "sqlite_bridge" if size == 1 else "cluster"
            result[f"idle_gap_{label}_median_ms"] = round(statistics.median(gaps), 3)
        # one schedule: the makespan benchmark's pool behind one bridge, then behind three
        bodies = mixed_jobs(jobs)
        spans = {}
        for size in (1, 3):
            async with AsyncExitStack() as exits:
                comfy = await exits.enter_async_context(emulators([BASE_PACE / s for s in SPEEDS]))
                session = await exits.enter_async_context(aiohttp.ClientSession())
                if size == 1:  # today's bridge, its journal in SQLite
                    urls = [await exits.enter_async_context(bridge_for(comfy))]
                else:
                    urls = await exits.enter_async_context(cluster_of(size, comfy, new_database()))
                t0 = time.monotonic()
                await submit_all(session, urls, bodies)
                spans[size], _ = makespan_of(await wait_prompts(session, comfy, jobs), t0)
        result["makespan_sqlite_bridge_s"] = round(spans[1], 2)
        result["makespan_3_bridges_s"] = round(spans[3], 2)
        result["makespan_ratio"] = round(spans[3] / spans[1], 3)
    return result


async def bench_storage(jobs: int, database: str | None) -> dict[str, Any]:
    """The same bridge with its jobs in SQLite (the default), in PostgreSQL (`--database`, else a
    throwaway server made here) and with its files in S3 (moto, in a process of its own), side by
    side on one pace-0 emulator: added latency of one job, and CPU per job one at a time and 32 at
    a time, each beside SQLite's. The paths take turns (job by job for the latency, block by block
    for the CPU), so the machine's slow phases hit all alike. `--s3` and `--database` do not reach
    the SQLite bridge."""
    jobs = max(jobs, 8)
    result: dict[str, Any] = {"name": "storage", "jobs": jobs}
    plain = {"database": "", "storage": "", "s3_endpoint": ""}  # whatever --s3 / --database set for others
    with postgres_server(database) as new_database:
        async with AsyncExitStack() as exits:
            endpoint = await exits.enter_async_context(s3_server())
            bucket = await new_bucket(endpoint)
            comfy = await exits.enter_async_context(emulators([0.0]))
            settings = {
                "sqlite": plain,
                "postgres": {**plain, "database": new_database()},
                "s3": {**plain, "s3_endpoint": endpoint, "storage": bucket},
            }
            bridges = {name: await exits.enter_async_context(bridge_for(comfy, **s)) for name, s in settings.items()}
            session = await exits.enter_async_context(aiohttp.ClientSession())
            prompt = solid_prompt()
            paths: dict[str, Callable[[], Awaitable[int]]] = {"direct": lambda: direct_job(session, comfy[0], prompt)}
            for name, url in bridges.items():
                paths[name] = functools.partial(bridge_job, session, url, SOLID)
            for job in paths.values():  # warm up every path
                await in_parallel(job, 20, 1)
            latency: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(jobs):
                for name, job in paths.items():
                    latency[name] += await in_parallel(job, 1, 1)
                    await asyncio.sleep(0.02)  # what one job leaves behind settles before the next path's
            cpu: dict[tuple[str, int], float] = {}
            for concurrency in (1, 32):
                for _ in range(4):  # four blocks each, in turn
                    for name, url in bridges.items():
                        spent = cpu_seconds(url)
                        await in_parallel(paths[name], jobs // 4, concurrency)
                        used = (cpu_seconds(url) - spent) / (4 * (jobs // 4))
                        cpu[name, concurrency] = cpu.get((name, concurrency), 0.0) + used
    p50 = {name: statistics.median(samples) for name, samples in latency.items()}
    added = {name: p50[name] - p50["direct"] for name in bridges}
    result["direct_p50_ms"] = round(p50["direct"], 2)
    for name in bridges:
        result[f"{name}_added_p50_ms"] = round(added[name], 2)
        for concurrency in (1, 32):
            result[f"{name}_cpu_ms_c{concurrency}"] = round(cpu[name, concurrency] * 1000, 2)
        if name != "sqlite":
            ratio = added[name] / added["sqlite"] if added["sqlite"] > 0 else None
            result[f"{name}_added_p50_ratio"] = None if ratio is None else round(ratio, 2)
            for concurrency in (1, 32):
                ratio = cpu[name, concurrency] / cpu["sqlite", concurrency]
                result[f"{name}_cpu_c{concurrency}_ratio"] = round(ratio, 2)
    return result


@asynccontextmanager
async def s3_server() -> AsyncIterator[str]:
    """moto's S3 server in a process of its own, with throwaway credentials every bridge inherits."""
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    port = free_port()
    args = ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    async with process(args, f"http://127.0.0.1:{port}", "/moto-api/") as url:
        yield url


async def new_bucket(endpoint: str) -> str:
    from aiobotocore.session import get_session

    name = f"bench-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=name)
    return f"s3://{name}"


BENCHMARKS: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "cpu_per_job": lambda args: bench_cpu_per_job(max(args.jobs, 500), args.before),
    "overhead": lambda args: bench_overhead(args.jobs, args.before),
    "paired": lambda args: bench_paired(args.jobs, args.before),
    "throughput": lambda args: bench_throughput(args.jobs * 2),
    "websockets": lambda args: bench_websockets(args.sockets),
    "streaming": lambda args: bench_streaming(),
    "idle_gap": lambda args: bench_idle_gap(args.jobs),
    "makespan": lambda args: bench_makespan(args.jobs),
    "failover": lambda args: bench_failover(min(args.jobs, 60)),
    "counter": lambda args: bench_counter(args.jobs * 10),
    "clients_scale": lambda args: bench_clients_scale(args.ids),
    "recovery": lambda args: bench_recovery(args.recovery_jobs),
    "spread": lambda args: bench_spread(),
    "real": lambda args: bench_real(args.real, args.jobs, peer=args.peer, before=args.before, home=args.real_home),
    "real_kept": lambda args: bench_real_kept(
        args.real, min(args.jobs, 100), args.peer, args.before, args.noise, args.real_home
    ),
    "bomb": lambda args: bench_bomb(),
    "cluster": lambda args: bench_cluster(args.jobs, args.database),
    "storage": lambda args: bench_storage(args.jobs, args.database),
}
OWN_DATABASE = {"cluster", "storage"}  # these take --database as the server they make databases on


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these")
    parser.add_argument("--jobs", type=int, default=200, help="jobs per measurement (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per benchmark")
    parser.add_argument("--real", metavar="HOST:PORT", help="a real ComfyUI for the `real` benchmark")
    parser.add_argument(
        "--peer", metavar="URL", help="`real` also through SaladTechnologies/comfyui-api in front of that ComfyUI"
    )
    parser.add_argument(
        "--real-home", metavar="DIR", type=Path, help="`real` and `real_kept` also through a bridge that reads "
        "that ComfyUI's DIR/output (`comfy_outputs`) and writes uploads into DIR/input (`comfy_inputs`)",
    )  # fmt: skip
    parser.add_argument(
        "--before", metavar="DIR", type=Path, help="real, overhead, paired and cpu_per_job also through a bridge "
        "run from this checkout (e.g. `git worktree add DIR <commit>`: the code before a change), in the same run",
    )  # fmt: skip
    parser.add_argument(
        "--noise", metavar="SIDE", type=int, default=0, help="real_kept: a SIDE x SIDE noise PNG through `invert`"
    )
    parser.add_argument("--sockets", type=int, default=10_000, help="idle sockets for websockets (default %(default)s)")
    parser.add_argument("--ids", type=int, default=100_000, help="clientIds for clients_scale (default %(default)s)")
    parser.add_argument(
        "--recovery-jobs", type=int, default=10_000, help="unfinished jobs for recovery (default %(default)s)"
    )
    parser.add_argument(
        "--database", metavar="URL", help="run every bridge with its jobs in this PostgreSQL (cluster, storage: else a "
        "throwaway one, made here)",
    )  # fmt: skip
    parser.add_argument(
        "--s3", action="store_true", help="every bridge keeps uploads and results in object storage: a throwaway "
        "S3 server (moto's, in a process of its own) made here",
    )  # fmt: skip
    parser.add_argument(
        "--bridge", metavar="SETTING=VALUE", action="append", default=[],
        help="a setting for every bridge, as its flag without dashes (e.g. inline_result_kb=0)",
    )  # fmt: skip
    args = parser.parse_args()
    for setting in args.bridge:
        key, _, value = setting.partition("=")
        EVERY_BRIDGE[key] = value
    if args.database and not set(args.only or BENCHMARKS) <= OWN_DATABASE:
        EVERY_BRIDGE["database"] = args.database
    async with AsyncExitStack() as exits:
        if args.s3:
            EVERY_BRIDGE["s3_endpoint"] = endpoint = await exits.enter_async_context(s3_server())
            EVERY_BRIDGE["storage"] = await new_bucket(endpoint)
        for name in args.only or list(BENCHMARKS):
            result = await BENCHMARKS[name](args)
            if args.s3:
                result["storage"] = "s3"
            if args.json:
                print(orjson.dumps(result).decode(), flush=True)
            else:
                print(f"{name:12} " + "  ".join(f"{k}={v}" for k, v in result.items() if k != "name"), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
