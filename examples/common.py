"""What both example clients share: arguments, typed inputs, uploads, and saving results."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import aiofiles
import aiohttp


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the bridge (default %(default)s)")
    parser.add_argument("--workflow", default="solid-color", help="workflow alias (GET /workflow-list)")
    parser.add_argument("--input", action="append", default=[], metavar="KEY=VALUE", help="e.g. 6/text='a cat'")
    parser.add_argument("--file", action="append", default=[], metavar="KEY=PATH", help="upload PATH for input KEY")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for the results")
    parser.add_argument("--client-id", default=f"example-{uuid.uuid4()}", help="default: a fresh UUID")
    return parser.parse_args()


def pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def typed(value: str, kind: str) -> Any:
    """A command-line string as the type /workflow-info gives for the input."""
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return value.lower() in ("1", "true", "yes", "on")
    return value


async def check(resp: aiohttp.ClientResponse) -> Any:
    """The JSON body, or exit with the bridge's `detail`."""
    body = await resp.json() if resp.content_type == "application/json" else None
    if resp.status != 200:
        detail = body.get("detail") if isinstance(body, dict) else resp.reason
        sys.exit(f"{resp.method} {resp.url.path}: HTTP {resp.status}: {detail}")
    return body


async def prepare(session: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    """workflow-info -> upload files -> the body of /generate-based-workflow."""
    async with session.get(f"{args.url}/workflow-info", params={"workflow": args.workflow}) as resp:
        info = await check(resp)
    print(f"workflow {args.workflow}: inputs {', '.join(info) or 'none'}")
    body: dict[str, Any] = {"workflow": args.workflow}
    for key, value in pairs(args.input).items():
        if key not in info:
            sys.exit(f"{key} is not an input of {args.workflow}; it has {', '.join(info)}")
        body[key] = typed(value, info[key]["type"])
    files = pairs(args.file)
    if files:
        form = aiohttp.FormData()
        for key, path in files.items():
            async with aiofiles.open(path, "rb") as handle:
                form.add_field(key, await handle.read(), filename=Path(path).name)
        async with session.post(f"{args.url}/upload", params={"clientId": args.client_id}, data=form) as resp:
            names = await check(resp)
        print(f"uploaded {len(names)} file(s)")
        body.update(names)
    return body


def follow(status: dict[str, str]) -> int | None:
    """Show one status message; the exit code once the job has ended, else None."""
    if status["status"] == "progress":
        percent = float(status["detail"].rstrip("%"))
        print(f"\r[{'#' * int(percent / 4):<25}] {status['detail']:>7}", end="", flush=True)
    elif status["status"] == "closed":
        print(f"\n{status['detail']}")
        return 0
    elif status["status"] == "error":
        print(f"\nerror: {status['detail']}", file=sys.stderr)
        return 1
    return None


def free_path(path: Path) -> Path:
    """`path`, or `name-1.ext`, `name-2.ext`, ... if it exists: never overwrite an earlier result."""
    candidate, index = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1
    return candidate


async def save_results(session: aiohttp.ClientSession, args: argparse.Namespace) -> list[Path]:
    """GET /history: one multipart part per output file."""
    args.out.mkdir(parents=True, exist_ok=True)
    saved = []
    async with session.get(f"{args.url}/history", params={"clientId": args.client_id}) as resp:
        if resp.status == 204:
            print(f"no results: {resp.headers.get('X-Detail')}")
            return saved
        await check(resp)
        reader = aiohttp.MultipartReader.from_response(resp)
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            target = free_path(args.out / Path(part.filename or f"{part.name}.bin").name)
            async with aiofiles.open(target, "wb") as handle:
                while chunk := await part.read_chunk():
                    await handle.write(chunk)
            saved.append(target)
    for path in saved:
        print(f"saved {path}")
    return saved


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
