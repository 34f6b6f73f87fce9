"""A burst: N clients each submit one job at the same moment, then wait for it; one line per job.

Against `make demo` (two emulated GPUs) the bridge's log shows each job's backend ("done on ...");
here each client sees how long it waited in line and how long its job ran."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import urllib.parse
import uuid

import aiohttp
import orjson
from common import answer_of, bridge_parser, unreachable


class Refused(Exception):
    """The bridge refused a job: said in one line once every client is done."""


async def one_job(session: aiohttp.ClientSession, url: str, workflow: str, index: int) -> tuple[str, float, float]:
    """(job id, seconds until it started, seconds it ran) for one client with one job."""
    client_id = f"burst-{index}-{uuid.uuid4().hex[:6]}"
    try:
        socket = await session.ws_connect(f"{url}/ws", params={"clientId": client_id})
    except aiohttp.WSServerHandshakeError as exc:  # the bridge says why in X-Detail: the body is not readable here
        told = urllib.parse.unquote(exc.headers.get("X-Detail", "")) if exc.headers else ""
        raise Refused(f"job {index}: HTTP {exc.status}: {told or exc.message}") from None
    async with socket as ws:
        body = {"workflow": workflow, "3/seed": random.randrange(1 << 32)}
        submitted = time.monotonic()
        params = {"clientId": client_id}
        for _ in range(10):  # a 503 accepted nothing (a cluster changing leader): ask again when it says
            async with session.post(f"{url}/generate-based-workflow", params=params, json=body) as resp:
                answer = await answer_of(resp)
            if resp.status != 503:
                break
            await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
        if resp.status != 200:
            raise Refused(f"job {index}: HTTP {resp.status}: {answer.get('detail')}")
        started = None
        async for msg in ws:
            frame = orjson.loads(msg.data)
            if started is None and frame["status"] == "progress":
                started = time.monotonic()
            if frame["status"] in ("closed", "error"):
                break
        ended = time.monotonic()
        async with session.get(f"{url}/history", params=params) as resp:  # fetched whole, the results are forgotten
            await resp.read()
    started = started or ended
    return answer["job_id"], started - submitted, ended - started


def at_least_one(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of clients, 1 or more")
    return number


async def main() -> None:
    parser = bridge_parser(__doc__ or "")
    parser.add_argument("--clients", type=at_least_one, default=6, help="how many (default %(default)s)")
    parser.add_argument("--workflow", default="text-to-image", help="one with a 3/seed input (default %(default)s)")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None  # the socket's too
    async with aiohttp.ClientSession(headers=headers) as session:
        began = time.monotonic()
        try:
            jobs = await asyncio.gather(*(one_job(session, args.url, args.workflow, i) for i in range(args.clients)))
        except aiohttp.ClientConnectionError as exc:
            raise SystemExit(unreachable(args.url, exc)) from None
        except Refused as exc:
            raise SystemExit(str(exc)) from None
        total = time.monotonic() - began
    print(f"{'job':<34} {'waited':>8} {'ran':>8}")
    for job_id, waited, ran in jobs:
        print(f"{job_id:<34} {waited:>7.2f}s {ran:>7.2f}s")
    print(f"{args.clients} jobs in {total:.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
