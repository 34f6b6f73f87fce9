"""`python -m comfybridge`: read the settings, build the app, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from .app import create_app
from .config import ConfigError, load_settings
from .errors import WorkflowConfigError
from .journal import JournalError
from .state import StateError


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        app = create_app(settings, reload=lambda: load_settings(argv))
    except (ConfigError, WorkflowConfigError, StateError, JournalError) as exc:
        print(f"comfybridge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"comfybridge: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    backends = f"emulated x{settings.emulate}" if settings.emulate else ", ".join(settings.backends)
    print(f"comfybridge on http://{settings.host}:{settings.port} -> ComfyUI {backends}", flush=True)
    # run_app turns SIGTERM/SIGINT into a graceful stop: no new connections, in-flight requests
    # get shutdown_timeout seconds, then every cleanup context runs (state saved) and we exit 0.
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        access_log=None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
