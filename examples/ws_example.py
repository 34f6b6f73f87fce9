"""A client that follows its job over the WebSocket: workflow-info, upload, generate, progress, results.

python examples/ws_example.py --workflow solid-color --input 1/width=256 --out results/
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from common import check, dumps, follow, parse_args, prepare, save_results


async def main() -> int:
    args = parse_args(__doc__ or "")
    async with aiohttp.ClientSession() as session:
        body = await prepare(session, args)
        async with session.ws_connect(
            f"{args.url.replace('http', 'ws', 1)}/ws", params={"clientId": args.client_id}
        ) as ws:
            async with session.post(
                f"{args.url}/generate-based-workflow", params={"clientId": args.client_id}, json=body
            ) as resp:
                print(f"sent {dumps(body)}: {(await check(resp))['detail']}")
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                ended = follow(msg.json())
                if ended is not None:
                    break
            else:
                print("\nthe bridge closed the socket", file=sys.stderr)
                return 1
            if ended:
                return ended
        return 0 if await save_results(session, args) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
