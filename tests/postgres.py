"""A real PostgreSQL for the tests: a throwaway cluster made with initdb/pg_ctl in a temporary folder
(about a second), on a loopback port, stopped and removed at the end; a fresh database per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .services import POSTGRES_MISSING, PostgresServer, ServiceMissing, postgres_binaries, throwaway_postgres

__all__ = ["PostgresServer", "require_postgres", "running_postgres"]


def _missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def require_postgres() -> None:
    """For a test that starts PostgreSQL its own way: skipped where it is not installed (a failure under CI)."""
    if postgres_binaries() is None:
        _missing(POSTGRES_MISSING)


def running_postgres(options: str = "") -> Iterator[PostgresServer]:
    """The server for a test session; skipped where PostgreSQL is not installed (a failure under CI)."""
    try:
        with throwaway_postgres(options) as server:
            yield server
    except ServiceMissing as missing:
        _missing(str(missing))
