"""A client that only speaks REST and polls /execution-info, with comfybridge.sdk's blocking
face: inputs, upload, generate, a progress bar, results.

python examples/rest_example.py --workflow invert --file 1/image=photo.png --out results/
"""

from __future__ import annotations

import sys
import time

import aiohttp
from common import advance, parse_args, progress_bar, typed_inputs, unreachable

from comfybridge.sdk import Bridge, BridgeError

POLL_SECONDS = 0.25


def main() -> int:
    args = parse_args(__doc__ or "")
    with Bridge(args.url, args.client_id, args.api_key) as bridge:
        try:
            inputs = typed_inputs(args, bridge.inputs(args.workflow))
            stored = bridge.upload(args.files) if args.files else {}
            job = bridge.generate(args.workflow, {**inputs, **stored}, listen=False)
            with progress_bar() as bar:
                while True:
                    status = bridge.status()
                    if status.job_id == job.job_id and status.percent is not None:
                        advance(bar, status.percent)
                    if status.status in ("closed", "error") and status.jobs_left == 0:
                        if status.status == "closed":
                            advance(bar, 100)
                        break
                    time.sleep(POLL_SECONDS)
            if status.status == "error":
                print(f"error: {status.detail}", file=sys.stderr)
                return 1
            print(status.detail)
            saved = bridge.save_results(args.out)
        except BridgeError as exc:
            print(f"error: {exc.detail}", file=sys.stderr)
            return 1
        except aiohttp.ClientConnectionError as exc:
            return unreachable(args.url, exc)
    for result in saved:
        print(f"saved {result.path}")
    return 0 if saved else 1


if __name__ == "__main__":
    sys.exit(main())
