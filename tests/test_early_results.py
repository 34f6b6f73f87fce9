"""Results on their way before the prompt ends: an output is fetched as its node reports it, and a
prompt that succeeded is collected without waiting for ComfyUI to let go of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from comfybridge.core import care
from comfybridge.core.backend import Backend
from comfybridge.core.jobs import Job
from comfybridge.edge.appkeys import SCHEDULER
from comfybridge.emulator import Emulator

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import frames_until, generate, poll_status, read_results

SOLID = {"workflow": "solid", "1/width": 16, "1/height": 16, "1/batch_size": 1}
SOLID_NODES = 2  # EmptyImage, SaveImage


async def comfy_holding(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, at: str
) -> tuple[Emulator, TestClient[web.Request, web.Application]]:
    """An emulator whose next prompt stops until released: at "outcome" (every node has run, how it
    ended is not said yet) or at "end" (`execution_success` sent, the final `executing null` not);
    and a bridge in front of it."""
    emulator = await make_emulator()
    if at == "outcome":
        emulator.engine.faults.hang_after_nodes = SOLID_NODES
    else:
        emulator.engine.faults.hold_end = True
    return emulator, await make_bridge(emulator)


def only_output(root: Path) -> bytes:
    (path,) = [p for p in (root / "output").rglob("*.png") if p.is_file()]
    return path.read_bytes()


async def test_an_output_is_fetched_as_its_node_reports_it_and_only_once(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator, client = await comfy_holding(
        make_emulator, make_bridge, "outcome"
    )  # every node has run; the prompt has not ended
    async with client.ws_connect("/ws", params={"clientId": "eager"}) as ws:
        status, _ = await generate(client, "eager", SOLID)
        assert status == 200
        await wait_for(lambda: emulator.engine.requests["GET /view"] == 1)  # while the prompt still runs
        assert (await poll_status(client, "eager", {"progress", "connected"}))["status"] != "closed"
        emulator.engine.release_hang()
        await frames_until(ws, "closed")
    parts = await read_results(await client.get("/history", params={"clientId": "eager"}))
    assert [part[3] for part in parts] == [only_output(emulator.root)]
    assert emulator.engine.requests["GET /view"] == 1  # not downloaded again when the prompt ended
    assert client.app[SCHEDULER].core.early.held == 0


async def test_a_prompt_that_succeeded_is_collected_before_comfyui_lets_go_of_it(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator, client = await comfy_holding(
        make_emulator, make_bridge, "end"
    )  # `execution_success` is sent, the final `executing null` is not
    async with client.ws_connect("/ws", params={"clientId": "early"}) as ws:
        status, _ = await generate(client, "early", SOLID)
        assert status == 200
        await frames_until(ws, "closed", timeout=5)
        parts = await read_results(await client.get("/history", params={"clientId": "early"}))
        assert [part[3] for part in parts] == [only_output(emulator.root)]
        assert emulator.engine.queue_remaining == 1  # ComfyUI has not let go of it yet
        emulator.engine.release_hang()
        status, _ = await generate(client, "early", SOLID)  # the backend's slot is free again
        assert status == 200
        assert (await frames_until(ws, {"closed", "error"}))[-1]["status"] == "closed"


async def test_an_output_fetched_early_for_a_job_interrupted_meanwhile_is_dropped(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator, client = await comfy_holding(make_emulator, make_bridge, "outcome")
    async with client.ws_connect("/ws", params={"clientId": "fickle"}) as ws:
        status, _ = await generate(client, "fickle", SOLID)
        assert status == 200
        await wait_for(lambda: emulator.engine.requests["GET /view"] == 1)
        await client.post("/interrupt", params={"clientId": "fickle"})
        assert (await frames_until(ws, "error"))[-1]["detail"] == "interrupted"
        emulator.engine.release_hang()  # ComfyUI ends the prompt well after all: too late
        await wait_for(lambda: emulator.engine.queue_remaining == 0)
    core = client.app[SCHEDULER].core
    await wait_for(lambda: not core.by_prompt)
    assert core.early.held == 0
    assert (await client.get("/history", params={"clientId": "fickle"})).status == 204


async def test_a_prompt_collected_early_is_deleted_from_comfyui_history_once_it_leaves(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(care, "FORGET_DELAY", 0.0)  # a delete sent at delivery would go out at once
    emulator, client = await comfy_holding(
        make_emulator, make_bridge, "end"
    )  # ComfyUI writes its history only after the hold
    async with client.ws_connect("/ws", params={"clientId": "tidy"}) as ws:
        status, _ = await generate(client, "tidy", SOLID)
        assert status == 200
        await frames_until(ws, "closed", timeout=5)
        await read_results(await client.get("/history", params={"clientId": "tidy"}))
        (prompt_id,) = emulator.engine.started
        emulator.engine.release_hang()
        await wait_for(lambda: emulator.engine.queue_remaining == 0)
    await wait_for(lambda: prompt_id not in emulator.engine.history)


async def test_a_collect_stopped_before_its_first_step_gives_its_early_fetches_back(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator, client = await comfy_holding(make_emulator, make_bridge, "outcome")
    scheduler = client.app[SCHEDULER]
    core = scheduler.core
    status, _ = await generate(client, "quick", SOLID)
    assert status == 200
    await wait_for(lambda: core.early.held > 0)
    ((backend, job),) = [(b, j) for b in core.backends.values() for j in b.inflight]
    job.outcome = "success"  # as execution_success makes it, an interrupt already on its way
    interrupting = asyncio.ensure_future(scheduler.interrupt("quick"))
    scheduler.tracker._collect(backend, job)  # cancelled by the interrupt before it runs a step
    await interrupting
    emulator.engine.release_hang()
    await wait_for(lambda: not core.by_prompt and not core.collecting)
    assert core.early.held == 0


async def test_a_socket_lost_right_after_success_does_not_fail_the_job(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator, client = await comfy_holding(
        make_emulator, make_bridge, "end"
    )  # its history is not written yet when the socket goes
    scheduler = client.app[SCHEDULER]
    collect = scheduler.tracker._collect

    def collect_then_lose(backend: Backend, job: Job) -> None:
        collect(backend, job)
        scheduler.failover.lost(backend)  # the socket's end, read in the same step as execution_success

    scheduler.tracker._collect = collect_then_lose  # type: ignore[method-assign]
    async with client.ws_connect("/ws", params={"clientId": "steady"}) as ws:
        status, _ = await generate(client, "steady", SOLID)
        assert status == 200
        frames = await frames_until(ws, {"closed", "error"}, timeout=5)
        emulator.engine.release_hang()
    assert frames[-1]["status"] == "closed", frames[-1]


async def test_a_job_delivered_before_comfyui_lets_go_is_not_counted_ahead_in_line(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator, client = await comfy_holding(make_emulator, make_bridge, "end")
    async with client.ws_connect("/ws", params={"clientId": "next"}) as ws:
        assert (await generate(client, "next", SOLID))[0] == 200
        await frames_until(ws, "closed", timeout=5)  # still in ComfyUI, its end not yet reported
        status, answer = await generate(client, "next", SOLID)
        assert (status, answer["detail"]) == (200, "queued / 1")
        emulator.engine.release_hang()
        await frames_until(ws, "closed")
