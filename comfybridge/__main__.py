"""`python -m comfybridge`: read the settings, build the app, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import sys
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from .app import create_app
from .comfy.client import shown
from .config import ConfigError, Settings, load_settings
from .edge import logs
from .edge.access import KeyFileError
from .errors import WorkflowConfigError
from .store.counter import StateError
from .store.datadir import DataDirLocked
from .store.journal import JournalError
from .store.s3 import ObjectStoreError


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
    except ConfigError as exc:
        return _refuse(str(exc))
    if not settings.keys_on and not _loopback(settings.host):
        print(
            f"comfybridge: WARNING: listening on {settings.host} with no API keys: anyone who can reach this "
            "address can run jobs and, knowing a clientId, fetch its results. Set --api-keys or --api-keys-file.",
            file=sys.stderr,
            flush=True,
        )
    # The port first: a bridge that cannot serve must not have recovered jobs or swept folders.
    try:
        sockets = listen(settings.host, settings.port)
    except OSError as exc:  # the port is taken, or the address is not ours
        return _refuse(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}")
    asked_port, settings = settings.port, replace(settings, port=sockets[0].getsockname()[1])

    def reload() -> Settings:  # the settings read again; the port as bound while it is the one asked for (0: any)
        fresh = load_settings(argv)
        return replace(fresh, port=settings.port) if fresh.port == asked_port else fresh

    try:
        logs.setup(settings.log_level, settings.log_format)
        logging.getLogger("comfybridge.access").disabled = not settings.access_log
        app = create_app(settings, reload=reload, handle_signals=True)
    except (ConfigError, WorkflowConfigError, StateError, JournalError, KeyFileError, DataDirLocked) as exc:
        _close(sockets)
        return _refuse(str(exc))
    except OSError as exc:
        _close(sockets)
        return _refuse(_unusable(exc, settings.data_dir))
    backends = f"emulated x{settings.emulate}" if settings.emulate else ", ".join(map(shown, settings.backends))
    banner = f"comfybridge on http://{settings.host}:{settings.port} -> ComfyUI {backends}"
    # run_app turns SIGTERM/SIGINT into a graceful stop: no new connections, in-flight requests
    # get shutdown_timeout seconds, then every cleanup context runs (journal closed) and we exit 0.
    # The banner is printed once the port is bound: `print` is called then.
    try:
        web.run_app(
            app,
            loop=_event_loop(),
            sock=sockets,
            shutdown_timeout=settings.shutdown_timeout,
            access_log=None,
            print=lambda _: print(banner, flush=True),
        )
    except (JournalError, ObjectStoreError) as exc:  # the journal, the database, the bucket: opened at start
        return _refuse(str(exc))
    except OSError as exc:  # the data folder's uploads or results, read at start (a folder that is a file)
        return _refuse(_unusable(exc, settings.data_dir))
    return 0


def _unusable(exc: OSError, data_dir: Path) -> str:
    where = exc.filename or data_dir
    return f"the data folder cannot be used: {exc.strerror or exc}: {where}"


def _refuse(reason: str) -> int:
    print(f"comfybridge: error: {reason}", file=sys.stderr)
    return 2


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` names (both of `localhost`), all on one port (the first
    one's, when `port` is 0); not listening yet, so a connection before the bridge serves is refused,
    not left hanging. An address family this host cannot use (IPv6 turned off) is skipped, as
    asyncio's own servers do. Raises OSError when none can be bound, or one that could is taken."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if sockets[1:]:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.setblocking(False)
    except BaseException:
        _close(sockets)
        raise
    if not sockets:
        raise OSError(errno.EAFNOSUPPORT, "no address of it can be used here")
    return sockets


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (the `fast` extra): the same code, less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
