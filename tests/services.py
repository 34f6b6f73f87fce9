"""The real services some tests (and `make cluster-demo`, and the benchmarks) run beside the bridge:
a throwaway PostgreSQL cluster, an nginx config, a free port. No pytest here: the demo runs with what
the bridge runs with."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "POSTGRES_MISSING",
    "ROOT",
    "PostgresServer",
    "ServiceMissing",
    "nginx_config",
    "postgres_binaries",
    "throwaway_postgres",
    "unused_port",
]

ROOT = Path(__file__).parent.parent
POSTGRES_MISSING = "PostgreSQL is not installed: apt-get install postgresql (CI installs .ci/system-packages)"


class ServiceMissing(Exception):
    """A program a service needs is not installed; the message says which package brings it."""


def unused_port() -> int:
    """A port nothing listens on now: for a program that cannot bind port 0 and say which it got
    (nginx), or for an address that must refuse connections. Bridges and emulators bind port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nginx_config(root: Path, port: int, bridges: list[int], shipped: str = "nginx-comfybridge.conf") -> str:
    """A shipped config/nginx-*.conf, pointed at these two bridges' ports and listening on `port`,
    inside a minimal nginx.conf whose files all go under `root`."""
    site = (ROOT / "config" / shipped).read_text()
    site = site.replace("server 127.0.0.1:8001", f"server 127.0.0.1:{bridges[0]}")
    site = site.replace("server 127.0.0.1:8002", f"server 127.0.0.1:{bridges[1]}")
    site = site.replace("listen 80 ", f"listen 127.0.0.1:{port} ")
    user = "user root;" if os.geteuid() == 0 else ""
    return (
        f"worker_processes 1;\n{user}\npid {root}/nginx.pid;\nerror_log {root}/error.log;\ndaemon off;\n"
        "events { worker_connections 256; }\nhttp {\n    access_log off;\n"
        + "".join(
            f"    {kind}_temp_path {root}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + site
        + "}\n"
    )


class PostgresServer:
    def __init__(self, root: Path, bindir: Path, port: int, as_postgres: list[str], options: str = "") -> None:
        self.root = root
        self.options = options  # more server settings (-c name=value ...)
        self.bindir = bindir
        self.port = port
        self.as_postgres = as_postgres
        self.url = f"postgresql://postgres@127.0.0.1:{port}"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_postgres, *args], capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        options += f" {self.options}"  # later settings win
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-o", options,
                 "-l", str(self.root / "log"), "-w", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "stop", check=False)

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        self.run(str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                 "-c", f"CREATE DATABASE {name}")  # fmt: skip
        return f"{self.url}/{name}"


def postgres_binaries() -> Path | None:
    """Debian's folder of PostgreSQL's programs (the newest version installed), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@contextlib.contextmanager
def throwaway_postgres(options: str = "") -> Iterator[PostgresServer]:
    """A PostgreSQL cluster made with initdb in a temporary folder (about a second), on a free loopback
    port, stopped and removed at the end. ServiceMissing where PostgreSQL is not installed."""
    bindir = postgres_binaries()
    if bindir is None:
        raise ServiceMissing(POSTGRES_MISSING)
    root = Path(tempfile.mkdtemp(prefix="comfybridge-pg-"))  # not under pytest's 0700 folders: postgres reads it
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(root, bindir, unused_port(), as_postgres, options)
    try:
        server.run(str(bindir / "initdb"), "-D", str(root / "data"), "--auth=trust", "-U", "postgres", "-E", "UTF8",
                   "--no-sync")  # fmt: skip
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
