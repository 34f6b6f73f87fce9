"""`python -m comfybridge.emulator`: run one ComfyUI emulator until interrupted."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from aiohttp import web

from ..comfy.client import DIALECTS
from .server import create_emulator_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m comfybridge.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--pace", type=float, default=0.005, help="seconds each node takes (default 0.005)")
    parser.add_argument(
        "--dialect", choices=DIALECTS, default=DIALECTS[0], help="which ComfyUI to speak like (default 0.3.64)"
    )
    parser.add_argument("--root", type=Path, help="folder for input/, output/ and temp/ (default: a temp folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="comfy-emulator-") as tmp:
        root = args.root or Path(tmp)
        print(f"ComfyUI emulator on http://{args.host}:{args.port} (files in {root})", flush=True)
        web.run_app(create_emulator_app(root, args.pace, args.dialect), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
