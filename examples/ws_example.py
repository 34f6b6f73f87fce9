"""A client that follows its job over the WebSocket, with comfybridge.sdk: inputs, upload,
generate, a progress bar, results.

python examples/ws_example.py --workflow solid-color --input 1/width=256 --out results/
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from common import parse_args, progress_bar, typed_inputs, unreachable

from comfybridge.sdk import AsyncBridge, BridgeError, Event, JobFailed


async def main() -> int:
    args = parse_args(__doc__ or "")
    async with AsyncBridge(args.url, args.client_id, args.api_key) as bridge:
        try:
            inputs = typed_inputs(args, await bridge.inputs(args.workflow))
            with progress_bar() as bar:

                def show(event: Event) -> None:
                    if event.percent is not None:
                        bar.update(event.percent - bar.n)
                    elif event.status == "closed":
                        bar.write(event.detail)

                await bridge.run(args.workflow, inputs, files=args.files, on_event=show)
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
