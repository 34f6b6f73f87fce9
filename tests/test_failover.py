"""Backends of different speeds that die, restart, hang or refuse: every job ends once, or clearly fails."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import pytest

from comfybridge.edge.appkeys import SCHEDULER
from comfybridge.emulator import Emulator

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import Client, frames_until, generate, poll_status, read_results, without_job_id

pytestmark = pytest.mark.both_dialects  # every test here runs against both ComfyUI dialects


def scheduler_of(client: Client) -> Any:
    return client.app[SCHEDULER]


def active(client: Client, client_id: str) -> list[Any]:
    known = scheduler_of(client).clients.get(client_id)
    return list(known.jobs.values()) if known else []


async def outcome(client: Client, client_id: str) -> list[str]:
    """Wait for the client's jobs to end; the names of the files it gets back."""
    await wait_for(lambda: not active(client, client_id), timeout=20)
    await poll_status(client, client_id, {"closed", "error"})  # told once the ending is journaled
    resp = await client.get("/history", params={"clientId": client_id})
    return [without_job_id(part[1]) for part in await read_results(resp)] if resp.status == 200 else []


async def test_fast_backend_takes_more_work(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    fast = await make_emulator(pace=0.005)
    slow = await make_emulator(pace=0.08)
    client = await make_bridge(fast, slow)
    for index in range(12):
        status, _ = await generate(client, f"user{index}", {"workflow": "solid", "1/batch_size": 1})
        assert status == 200
    for index in range(12):
        assert await outcome(client, f"user{index}") == ["wf_b_empty_00001_.png"]
    assert len(fast.engine.started) + len(slow.engine.started) == 12
    assert len(fast.engine.started) > 2 * len(slow.engine.started)


async def test_backend_killed_mid_job_moves_its_jobs(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    first = await make_emulator(pace=0.2)
    second = await make_emulator(pace=0.2)
    client = await make_bridge(first, backend_grace=0.2)
    await generate(client, "pair", {"workflow": "slow", "2/seed": 1})
    await generate(client, "pair", {"workflow": "slow", "2/seed": 2})
    await wait_for(lambda: first.engine.queue_remaining == 2)  # one running, one waiting inside ComfyUI
    scheduler_of(client).set_backends([first.url, second.url])
    await first.stop()
    assert await outcome(client, "pair") == ["wf_c_slow_00001_.png", "wf_c_slow_00001_.png"]
    assert len(second.engine.started) == 2


async def test_running_job_is_retried_only_once(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    first = await make_emulator(pace=0.3)
    second = await make_emulator(pace=0.3)
    client = await make_bridge(first, second, backend_grace=0.1)
    await generate(client, "unlucky", {"workflow": "slow", "2/seed": 3})
    await wait_for(lambda: len(first.engine.started) + len(second.engine.started) == 1)
    one, two = (first, second) if first.engine.started else (second, first)
    await one.stop()
    await wait_for(lambda: len(two.engine.started) == 1)
    await two.stop()
    info = await poll_status(client, "unlucky", {"error", "closed"})
    assert info["detail"] == "server disconnected"


async def test_progress_never_goes_down_when_a_job_runs_again_elsewhere(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    first = await make_emulator(pace=0.6)
    second = await make_emulator(pace=0.6)
    client = await make_bridge(first, second, backend_grace=0.1)
    async with client.ws_connect("/ws", params={"clientId": "steady"}) as ws:
        await generate(client, "steady", {"workflow": "text-to-image", "3/steps": 10})
        frames = await frames_until(ws, "progress")
        while float(frames[-1]["detail"].rstrip("%")) < 40:  # well into the sampler
            frames += await frames_until(ws, "progress")
        victim = first if first.engine.started else second
        await victim.stop()
        frames += await frames_until(ws, {"closed", "error"}, timeout=30)
    assert frames[-1]["status"] == "closed"
    values = [float(f["detail"].rstrip("%")) for f in frames if f["status"] == "progress"]
    assert values == sorted(values)
    assert values[-1] == 100.0
    assert any(f["status"] == "listening" and "ComfyUI" in f["detail"] for f in frames)  # it said why it paused


async def test_restarted_backend_gets_lost_prompts_again(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path, dialect: str
) -> None:
    emulator = await make_emulator(pace=0.2)
    client = await make_bridge(emulator, backend_grace=30)
    await generate(client, "phoenix", {"workflow": "slow", "2/seed": 4})
    await wait_for(lambda: len(emulator.engine.started) == 1)
    port = emulator.port
    await emulator.stop()
    reborn = Emulator(root=tmp_path / "reborn", pace=0.01, port=port, dialect=dialect)
    await reborn.start()
    try:
        assert await outcome(client, "phoenix") == ["wf_c_slow_00001_.png"]
        assert len(reborn.engine.started) == 1
    finally:
        await reborn.stop()


async def test_a_prompt_its_comfyui_loses_twice_while_running_fails_not_sent_for_ever(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path, dialect: str
) -> None:
    """A ComfyUI that dies under a prompt and is back within backend_grace, twice (a prompt that
    crashes it, say): the job fails as one whose backends died twice does, instead of being sent
    again at every return."""
    emulator = await make_emulator(pace=0.2)
    client = await make_bridge(emulator, backend_grace=30)
    await generate(client, "poison", {"workflow": "slow", "2/seed": 4})
    port, current = emulator.port, emulator

    def running_on(here: Emulator) -> bool:  # sent there and started, as the bridge knows it
        return bool(here.engine.started) and any(job.started_at is not None for job in active(client, "poison"))

    for life in range(2):
        await wait_for(functools.partial(running_on, current))
        await current.stop()
        current = Emulator(root=tmp_path / f"life{life}", pace=0.2, port=port, dialect=dialect)
        await current.start()
    try:
        info = await poll_status(client, "poison", {"error", "closed"})
        assert info["detail"] == "server disconnected"
        assert current.engine.started == []  # not sent a third time
    finally:
        await current.stop()


async def test_hanging_prompt_goes_elsewhere(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="comfybridge")
    stuck = await make_emulator()
    fine = await make_emulator()
    client = await make_bridge(stuck, fine, comfy_timeout=0.3)
    stuck.engine.faults.prompt_hang = True
    for index in range(4):
        await generate(client, f"h{index}", {"workflow": "solid", "1/batch_size": 1})
    for index in range(4):
        assert await outcome(client, f"h{index}") == ["wf_b_empty_00001_.png"]
    assert len(fine.engine.started) == 4
    assert stuck.engine.started == []
    # Said as what it was (a time-out's own text is empty: "TimeoutError: ; will send it again")
    assert any("no answer within 0.3s; will send it again" in r.getMessage() for r in caplog.records)


async def test_round_robin_between_clients(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator(pace=0.01)
    client = await make_bridge(emulator, pipeline_depth=0)
    owner: dict[str, str] = {}

    async def submit(client_id: str) -> None:
        status, _ = await generate(client, client_id, {"workflow": "solid", "1/batch_size": 1})
        assert status == 200
        owner[active(client, client_id)[-1].prompt_id] = client_id

    emulator.engine.pause()  # everyone is in line before the first job starts
    for _ in range(30):
        await submit("heavy")
    for index in range(19):
        await submit(f"light{index}")
    emulator.engine.resume()
    await wait_for(lambda: len(emulator.engine.started) == 49, timeout=30)
    order = [owner[prompt_id] for prompt_id in emulator.engine.started]
    last_light = max(i for i, who in enumerate(order) if who != "heavy")
    # The heavy client's first job, handed over as it came, was its turn: every light client has
    # one before the heavy client's next.
    assert order[: last_light + 1].count("heavy") == 1, order


async def test_per_client_limit_is_429(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator(pace=0.2)
    client = await make_bridge(emulator, max_jobs_per_client=2)
    for _ in range(2):
        assert (await generate(client, "greedy", {"workflow": "solid"}))[0] == 200
    resp = await client.post("/generate-based-workflow", params={"clientId": "greedy"}, json={"workflow": "solid"})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"  # every 429 of the contract says when to come back
    assert await resp.json() == {
        "detail": "clientId 'greedy' already has 2 jobs in line, the limit; wait for one to finish or interrupt them."
    }
    assert (await generate(client, "other", {"workflow": "solid"}))[0] == 200
    assert await (await client.get("/generation-count")).json() == 3
    for client_id in ("greedy", "other"):
        await client.post("/interrupt", params={"clientId": client_id})


async def test_backends_change_at_run_time(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    old = await make_emulator(pace=0.2)
    new = await make_emulator(pace=0.01)
    client = await make_bridge(old)
    async with client.ws_connect("/ws", params={"clientId": "leaving"}) as ws:
        await generate(client, "leaving", {"workflow": "slow", "2/seed": 5})
        await frames_until(ws, "progress")
        scheduler_of(client).set_backends([new.url])
        assert (await frames_until(ws, {"closed", "error"}))[-1]["status"] == "closed"  # drained, not cut
    await wait_for(lambda: old.url not in scheduler_of(client).backends)
    await wait_for(lambda: scheduler_of(client).backends[new.url].healthy)
    assert await outcome(client, "leaving") == ["wf_c_slow_00001_.png"]
    await generate(client, "arriving", {"workflow": "solid", "1/batch_size": 1})
    assert await outcome(client, "arriving") == ["wf_b_empty_00001_.png"]
    assert len(new.engine.started) == 1


async def test_resource_care(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, free_every_jobs=2, free_idle_after=0.3)
    for index in range(2):
        await generate(client, f"care{index}", {"workflow": "solid", "1/batch_size": 1})
        await outcome(client, f"care{index}")
    expected = {"unload_models": True, "free_memory": True}
    await wait_for(lambda: len(emulator.engine.free_requests) >= 1)
    assert emulator.engine.free_requests[0] == expected  # every 2 jobs
    await wait_for(lambda: len(emulator.engine.free_requests) == 2)  # then idle for 0.3 s
    watchdog = scheduler_of(client).failover
    seen = watchdog.ticks
    await wait_for(lambda: watchdog.ticks >= seen + 3)  # three more rounds, each past free_idle_after
    assert len(emulator.engine.free_requests) == 2  # once per idle spell, not again and again
    assert emulator.engine.history == {}  # delivered prompts are deleted from ComfyUI's history
    saved = sorted(p.relative_to(emulator.engine.output_dir) for p in emulator.engine.output_dir.rglob("*.png"))
    assert len(saved) == 2
    assert all(p.parts[0] == "comfybridge" and len(p.parts) == 4 for p in saved)  # comfybridge/<day>/<job>/file


async def test_free_when_memory_runs_low(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, free_below_ram_mb=10**9)  # the emulator reports 20 GiB free: "low"
    await generate(client, "tight", {"workflow": "solid", "1/batch_size": 1})
    await outcome(client, "tight")
    await wait_for(lambda: emulator.engine.free_requests == [{"unload_models": True, "free_memory": True}])


async def test_injected_node_error_reaches_the_client(emulator: Emulator, bridge: Client) -> None:
    emulator.engine.faults.node_error = 1
    status, _ = await generate(bridge, "refused", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200
    info = await poll_status(bridge, "refused", {"error", "closed"})
    assert info["detail"] == (
        "Prompt outputs failed validation: node 1 (EmptyImage): Custom validation failed for node: injected failure"
    )
