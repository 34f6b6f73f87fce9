"""Shared fixtures: ComfyUI emulators and bridges on free loopback ports, always stopped."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from comfybridge.app import create_app
from comfybridge.config import Settings
from comfybridge.emulator import Emulator

FIXTURES = Path(__file__).parent / "fixtures"

EmulatorFactory = Callable[..., Awaitable[Emulator]]
BridgeFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_emulator(tmp_path: Path) -> AsyncIterator[EmulatorFactory]:
    started: list[Emulator] = []

    async def make(pace: float = 0.002, port: int = 0) -> Emulator:
        emulator = Emulator(root=tmp_path / f"comfy{len(started)}", pace=pace, port=port)
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
def workflow_dir(tmp_path: Path) -> Path:
    target = tmp_path / "workflows"
    shutil.copytree(FIXTURES / "workflows", target)
    return target


@pytest.fixture
def base_settings(tmp_path: Path, workflow_dir: Path) -> Settings:
    return Settings(
        workflows=workflow_dir,
        data_dir=tmp_path / "data",
        heartbeat=0.05,
        disconnect_grace=0.3,
        job_idle_timeout=5.0,
    )


@pytest.fixture
async def make_bridge(make_emulator: EmulatorFactory, aiohttp_client: Any, base_settings: Settings) -> BridgeFactory:
    """Bridges are stopped before the emulators (this fixture needs make_emulator, so it ends first)."""

    async def make(*backends: Emulator | str, **overrides: Any) -> TestClient[web.Request, web.Application]:
        urls = tuple(b if isinstance(b, str) else b.url for b in backends) or base_settings.backends
        settings = replace(base_settings, backends=urls, **overrides)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(create_app(settings))
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
