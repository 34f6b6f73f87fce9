"""Shared fixtures: ComfyUI emulators and bridges on free loopback ports, always stopped."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from comfybridge.app import create_app
from comfybridge.comfy import DIALECTS
from comfybridge.config import Settings
from comfybridge.edge.appkeys import DATA_LOCK, SETTINGS
from comfybridge.emulator import Emulator

from .fake_comfy import FakeComfy
from .postgres import PostgresServer, running_postgres
from .s3 import S3Server, running_s3

FIXTURES = Path(__file__).parent / "fixtures"

EmulatorFactory = Callable[..., Awaitable[Emulator]]
BridgeFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With COMFYBRIDGE_TEST_STORAGE=s3 only the tests whose bridges keep files run (again, on S3)."""
    if os.environ.get("COMFYBRIDGE_TEST_STORAGE") != "s3":
        return
    kept = [item for item in items if "storage" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_dialects` run once per ComfyUI dialect the emulator speaks; those marked
    `both_stores` once with the SQLite journal and once with PostgreSQL."""
    if metafunc.definition.get_closest_marker("both_dialects") and "dialect" in metafunc.fixturenames:
        metafunc.parametrize("dialect", DIALECTS, indirect=True)
    if metafunc.definition.get_closest_marker("both_stores") and "store" in metafunc.fixturenames:
        metafunc.parametrize("store", ["sqlite", "postgres"], indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from running_postgres()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    yield from running_s3()


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """Where jobs are kept: "" for the SQLite journal, or a fresh PostgreSQL database's URL."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return ""
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def storage(request: pytest.FixtureRequest) -> dict[str, str]:
    """Where the in-process bridges keep uploads and results: folders under the data dir, or with
    COMFYBRIDGE_TEST_STORAGE=s3 (`make test` runs the contract's tests so too) a fresh bucket of a
    real S3 API server (the settings that say so)."""
    if getattr(request, "param", os.environ.get("COMFYBRIDGE_TEST_STORAGE", "folders")) == "folders":
        return {}
    server: S3Server = request.getfixturevalue("s3")
    return {"storage": f"s3://{server.new_bucket()}/t", "s3_endpoint": server.url}


@pytest.fixture
def dialect(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", DIALECTS[0]))


@pytest.fixture
async def make_emulator(tmp_path: Path, dialect: str) -> AsyncIterator[EmulatorFactory]:
    started: list[Emulator] = []

    async def make(pace: float = 0.002, port: int = 0, speaks: str | None = None) -> Emulator:
        root = tmp_path / f"comfy{len(started)}"
        emulator = Emulator(root=root, pace=pace, port=port, dialect=speaks or dialect)
        await emulator.start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        await emulator.stop()


@pytest.fixture
async def emulator(make_emulator: EmulatorFactory) -> Emulator:
    return await make_emulator()


@pytest.fixture
async def make_fake(make_emulator: EmulatorFactory) -> AsyncIterator[Callable[..., Awaitable[FakeComfy]]]:
    """Fake ComfyUIs (each in front of its own emulator) that misbehave as a test says; always stopped."""
    started: list[FakeComfy] = []

    async def make(pace: float = 0.002) -> FakeComfy:
        fake = FakeComfy(await make_emulator(pace=pace))
        await fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    target = tmp_path / "workflows"
    shutil.copytree(FIXTURES / "workflows", target)
    return target


@pytest.fixture
def base_settings(tmp_path: Path, workflow_dir: Path, store: str, storage: dict[str, str]) -> Settings:
    return Settings(
        **storage,
        database=store,
        workflows=workflow_dir,
        data_dir=tmp_path / "data",
        heartbeat=0.05,
        disconnect_grace=0.3,
        job_idle_timeout=5.0,
    )


@pytest.fixture
async def make_bridge(make_emulator: EmulatorFactory, aiohttp_client: Any, base_settings: Settings) -> BridgeFactory:
    """Bridges are stopped before the emulators (this fixture needs make_emulator, so it ends first)."""

    made: list[TestClient[web.Request, web.Application]] = []

    async def make(*backends: Emulator | str, **overrides: Any) -> TestClient[web.Request, web.Application]:
        urls = tuple(b if isinstance(b, str) else b.url for b in backends) or base_settings.backends
        if "data_dir" not in overrides and any(
            c.app[SETTINGS].data_dir == base_settings.data_dir and c.app[DATA_LOCK].held for c in made
        ):  # one bridge per data folder: a second one at the same time gets its own
            overrides["data_dir"] = base_settings.data_dir.with_name(f"data-{len(made)}")
        settings = replace(base_settings, backends=urls, **overrides)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(create_app(settings))
        made.append(client)
        return client

    return make


@pytest.fixture
async def bridge(make_bridge: BridgeFactory, emulator: Emulator) -> TestClient[web.Request, web.Application]:
    return await make_bridge(emulator)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition driven by pushed events (never a timing assertion: the timeout only guards hangs)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working folder for a bridge process, with every test workflow."""
    shutil.copytree(FIXTURES / "workflows", tmp_path / "workflows")
    return tmp_path
