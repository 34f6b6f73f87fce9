"""A client that only speaks REST and polls /execution-info: workflow-info, upload, generate, results.

python examples/rest_example.py --workflow invert --file 1/image=photo.png --out results/
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from common import check, dumps, follow, parse_args, prepare, save_results

POLL_SECONDS = 0.25


async def main() -> int:
    args = parse_args(__doc__ or "")
    async with aiohttp.ClientSession() as session:
        body = await prepare(session, args)
        async with session.post(
            f"{args.url}/generate-based-workflow", params={"clientId": args.client_id}, json=body
        ) as resp:
            print(f"sent {dumps(body)}: {(await check(resp))['detail']}")
        while True:
            async with session.get(f"{args.url}/execution-info", params={"clientId": args.client_id}) as resp:
                status = await check(resp)
            ended = follow(status)
            if ended is not None:
                break
            await asyncio.sleep(POLL_SECONDS)
        if ended:
            return ended
        return 0 if await save_results(session, args) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
