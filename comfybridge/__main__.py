"""`python -m comfybridge`: read the settings, build the app, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys

from aiohttp import web

from . import logs
from .access import KeyFileError
from .app import create_app
from .config import ConfigError, load_settings
from .errors import WorkflowConfigError
from .journal import JournalError
from .state import StateError


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        logs.setup(settings.log_level, settings.log_format)
        logging.getLogger("comfybridge.access").disabled = not settings.access_log
        app = create_app(settings, reload=lambda: load_settings(argv))
    except (ConfigError, WorkflowConfigError, StateError, JournalError, KeyFileError) as exc:
        print(f"comfybridge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"comfybridge: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    backends = f"emulated x{settings.emulate}" if settings.emulate else ", ".join(settings.backends)
    banner = f"comfybridge on http://{settings.host}:{settings.port} -> ComfyUI {backends}"
    if not settings.keys_on and not _loopback(settings.host):
        print(
            f"comfybridge: WARNING: listening on {settings.host} with no API keys: anyone who can reach this "
            "address can run jobs and, knowing a clientId, fetch its results. Set --api-keys or --api-keys-file.",
            file=sys.stderr,
            flush=True,
        )
    # run_app turns SIGTERM/SIGINT into a graceful stop: no new connections, in-flight requests
    # get shutdown_timeout seconds, then every cleanup context runs (journal closed) and we exit 0.
    # The banner is printed once the port is bound: `print` is called then.
    try:
        web.run_app(
            app,
            loop=_event_loop(),
            host=settings.host,
            port=settings.port,
            shutdown_timeout=settings.shutdown_timeout,
            access_log=None,
            print=lambda _: print(banner, flush=True),
        )
    except OSError as exc:  # the port is taken, or the address is not ours
        print(f"comfybridge: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (the `fast` extra): the same code, less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
