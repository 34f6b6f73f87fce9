"""A real PostgreSQL for the tests: a throwaway cluster made with initdb/pg_ctl in a temporary folder
(about a second), on a loopback port, stopped and removed at the end; a fresh database per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import unused_port

__all__ = ["PostgresServer", "running_postgres"]


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


def _binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def running_postgres(options: str = "") -> Iterator[PostgresServer]:
    """The server for a test session (or a benchmark); skipped where PostgreSQL is not installed (a
    failure under CI)."""
    bindir = _binaries()
    if bindir is None:
        why = "PostgreSQL is not installed: apt-get install postgresql (CI installs .ci/system-packages)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="comfybridge-pg-"))  # not under pytest's 0700 folders: postgres reads it
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(root, bindir, unused_port(), as_postgres, options)
    server.run(str(bindir / "initdb"), "-D", str(root / "data"), "--auth=trust", "-U", "postgres", "-E", "UTF8",
               "--no-sync")  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
