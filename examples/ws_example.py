"""A client that follows its job over the WebSocket, with comfybridge.sdk: inputs, upload,
generate, a progress bar, results.

python examples/ws_example.py --workflow solid-color --input 1/width=256 --out results/
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from common import advance, parse_args, progress_bar, typed_inputs, unreachable

from comfybridge.sdk import AsyncBridge, BridgeError, Event, JobFailed


async def main() -> int:
    args = parse_args(__doc__ or "")
    async with AsyncBridge(args.url, args.client_id, args.api_key) as bridge:
        try:
            inputs = typed_inputs(args, await bridge.inputs(args.workflow))
            done: list[str] = []  # the job's `closed` detail, said once the bar is closed
            with progress_bar() as bar:

                def show(event: Event) -> None:
                    if event.percent is not None:
                        advance(bar, event.percent)
                    elif event.status == "closed":
                        advance(bar, 100)
                        done.append(event.detail)

                await bridge.run(args.workflow, inputs, files=args.files, on_event=show)
            print(*done, sep="\n")
            saved = await bridge.save_results(args.out)
        except (BridgeError, JobFailed) as exc:
            print(f"error: {exc.detail}", file=sys.stderr)
            return 1
        except aiohttp.ClientConnectionError as exc:
            return unreachable(args.url, exc)
    for result in saved:
        print(f"saved {result.path}")
    return 0 if saved else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
