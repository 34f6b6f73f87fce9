"""What the example clients share: their arguments, inputs typed as the bridge describes them, and
a progress bar."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import yarl
from tqdm import tqdm


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, as the examples' other errors (argparse would print its whole usage first)."""
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


def bridge_url(text: str) -> str:
    """--url: an http:// or https:// address (aiohttp takes nothing else; the scheme is easily left out)."""
    try:
        url = yarl.URL(text)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// address, e.g. http://127.0.0.1:8000")
    return text.rstrip("/")


def bridge_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every example takes: where the bridge is, and its API key."""
    parser = Parser(description=description)
    parser.add_argument(
        "--url", type=bridge_url, default="http://127.0.0.1:8000", help="the bridge (default %(default)s)"
    )
    parser.add_argument("--api-key", help="when the bridge has API keys")
    return parser


def parse_args(description: str) -> argparse.Namespace:
    parser = bridge_parser(description)
    parser.add_argument("--workflow", default="solid-color", help="workflow alias (GET /workflow-list)")
    parser.add_argument("--input", action="append", default=[], metavar="KEY=VALUE", help="e.g. 6/text='a cat'")
    parser.add_argument("--file", action="append", default=[], metavar="KEY=PATH", help="upload PATH for input KEY")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for the results")
    parser.add_argument("--client-id", default=f"example-{uuid.uuid4()}", help="default: a fresh UUID")
    args = parser.parse_args()
    args.files = {key: Path(path) for key, path in pairs(args.file).items()}
    for key, path in args.files.items():
        if not path.is_file():
            sys.exit(f"error: {path} (for {key}) is not a file")
    # Said now, not once the job has run: the results would stay at the bridge.
    made = next((folder for folder in (args.out, *args.out.parents) if folder.exists()), None)
    if made is not None and not made.is_dir():
        sys.exit(f"error: --out {args.out} is not a folder" + ("" if made == args.out else f" ({made} is a file)"))
    return args


def unreachable(url: str, exc: aiohttp.ClientConnectionError | OSError) -> int:
    """The one line a client says when the bridge does not answer at all (the connection refused, or
    closed unanswered: aiohttp's ServerDisconnectedError is no OSError)."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    print(f"error: cannot reach the bridge at {url} ({reason}); is it running (make demo)?", file=sys.stderr)
    return 1


async def answer_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """A JSON answer; anything else (a proxy's own page) as its first line, for `detail`."""
    if resp.content_type == "application/json":
        answer: dict[str, Any] = await resp.json()
        return answer
    text = (await resp.text(errors="replace")).strip()
    return {"detail": text.splitlines()[0] if text else resp.reason}


def pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def typed_inputs(args: argparse.Namespace, info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The --input values as the types /workflow-info gives."""
    inputs = {}
    for key, value in pairs(args.input).items():
        if key not in info:
            sys.exit(f"{key} is not an input of {args.workflow}; it has {', '.join(info) or 'none'}")
        try:
            inputs[key] = typed(value, info[key]["type"])
        except ValueError:
            kind = info[key]["type"]
            sys.exit(f"{key} takes {'an' if kind[:1] in 'aeiou' else 'a'} {kind}, got {value!r}")
    return inputs


def typed(value: str, kind: str) -> Any:
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return value.lower() in ("1", "true", "yes", "on")
    return value


def progress_bar() -> tqdm:  # type: ignore[type-arg]
    return tqdm(total=100.0, unit="%", bar_format="{l_bar}{bar}| {n:.2f}% [{elapsed}]", file=sys.stderr)


def advance(bar: tqdm, percent: float) -> None:  # type: ignore[type-arg]
    """Move the bar to `percent`. Its 100% is left to its close, which always draws the last state:
    drawn here too, it would be printed twice."""
    if percent >= 100:
        bar.n = 100.0
    else:
        bar.update(percent - bar.n)
