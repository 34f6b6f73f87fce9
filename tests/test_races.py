"""Answers that come after a job moved on: a late answer to an old hand-over, a reconcile's slow
question, a cancel ComfyUI refused once, a socket back while its jobs are being cancelled. Each is
taken for what it is now, never for the job's current state."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from comfybridge.edge.appkeys import SCHEDULER

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .fake_comfy import FakeComfy
from .helpers import Client, generate, poll_status

REFUSED = '{"error": {"message": "x"}, "node_errors": {}}'


async def _moved_while_posting(
    make_fake: Any, make_emulator: EmulatorFactory, make_bridge: BridgeFactory, answer: int
) -> tuple[Client, Any]:
    """A job whose POST /prompt to A hangs is moved to B (A's socket went away for longer than the
    grace) and runs there; then A answers the old POST with `answer`."""
    fake: FakeComfy = await make_fake(pace=0.05)
    spare = await make_emulator(pace=0.3)
    client = await make_bridge(fake.url, backend_grace=0.2)
    release = fake.hold("POST /prompt")
    status, _ = await generate(client, "c", {"workflow": "slow", "2/seed": 1})
    assert status == 200
    await wait_for(lambda: "POST /prompt" in fake.seen)
    fake.replace("GET /prompt", 500, "{}", times=10_000)  # its socket cannot come back
    client.app[SCHEDULER].set_backends([fake.url, spare.url])
    await fake.drop_sockets()
    await wait_for(lambda: len(spare.engine.started) == 1)
    fake.replace("POST /prompt", answer, REFUSED)
    release.set()
    return client, spare


@pytest.mark.parametrize("answer", [500, 400])
async def test_a_late_answer_from_the_old_backend_leaves_a_moved_job_alone(
    make_fake: Any, make_emulator: EmulatorFactory, make_bridge: BridgeFactory, answer: int
) -> None:
    """A 500 used to take the job back from B and send it again (it ran twice); a 400 failed it while
    it ran fine on B."""
    client, spare = await _moved_while_posting(make_fake, make_emulator, make_bridge, answer)
    info = await poll_status(client, "c", {"error", "closed"})
    assert info["status"] == "closed", info
    await asyncio.sleep(0.5)  # time for a wrong second hand-over to reach B
    assert len(spare.engine.started) == 1, f"the job ran {len(spare.engine.started)} times on B"
    assert not client.app[SCHEDULER].backends[spare.url].inflight, "the ended job still holds a place on B"


async def test_a_reconcile_that_outlives_the_grace_leaves_a_moved_job_alone(
    make_fake: Any, make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    fake: FakeComfy = await make_fake(pace=0.3)
    spare = await make_emulator(pace=0.3)
    client = await make_bridge(fake.url, backend_grace=0.3)
    status, _ = await generate(client, "r", {"workflow": "slow", "2/seed": 1})
    assert status == 200
    await wait_for(lambda: len(fake.upstream.engine.started) == 1)
    release = fake.hold("GET /history/*")  # the reconcile's question about the prompt hangs
    fake.replace("GET /queue", 200, '{"queue_running": [], "queue_pending": []}')
    await fake.drop_sockets()  # back at once: its reconcile asks /history, and waits
    await wait_for(lambda: "GET /history/*" in fake.seen)
    client.app[SCHEDULER].set_backends([fake.url, spare.url])
    await wait_for(lambda: len(spare.engine.started) == 1)  # the grace ran out: the job moved to B
    release.set()  # "no such prompt": about A's prompt, not B's
    info = await poll_status(client, "r", {"error", "closed"})
    assert info["status"] == "closed", info
    await asyncio.sleep(0.5)
    assert len(spare.engine.started) == 1, "the job ran twice on B"


async def test_a_prompt_whose_cancel_failed_is_stopped_as_it_starts(make_fake: Any, make_bridge: BridgeFactory) -> None:
    fake: FakeComfy = await make_fake(pace=0.2)
    client = await make_bridge(fake.url, pipeline_depth=1, job_idle_timeout=60)
    await generate(client, "hog", {"workflow": "slow", "2/seed": 1})
    await generate(client, "victim", {"workflow": "slow", "2/seed": 2})
    engine = fake.upstream.engine
    await wait_for(lambda: engine.queue_remaining == 2)  # the victim waits inside ComfyUI behind the hog
    (job,) = client.app[SCHEDULER].clients.get("victim").jobs.values()
    for route in ("POST /queue", "GET /queue", "POST /interrupt"):
        fake.replace(route, 500, "{}")  # one bad moment of ComfyUI's REST side
    await client.post("/interrupt", params={"clientId": "victim"})
    await poll_status(client, "victim", {"error"})
    await wait_for(lambda: engine.queue_remaining == 0, timeout=20)
    last = engine.history[job.prompt_id]["status"]["messages"][-1][0]
    assert last == "execution_interrupted", "the interrupted job's prompt ran to its end"


async def test_a_socket_back_while_its_jobs_are_cancelled_does_not_cut_the_cancel_short(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    fake: FakeComfy = await make_fake(pace=0.2)
    client = await make_bridge(fake.url, job_idle_timeout=60, disconnect_grace=0.1)
    engine = fake.upstream.engine
    ws = await client.ws_connect("/ws", params={"clientId": "flaky"})
    await generate(client, "flaky", {"workflow": "slow", "2/seed": 1})
    (job,) = client.app[SCHEDULER].clients.get("flaky").jobs.values()
    await wait_for(lambda: job.prompt_id in engine.started)
    held = fake.hold("POST /queue")  # the cancel's first request (0.3.64 deletes from the queue first)
    await ws.close()
    await wait_for(lambda: job.ended)  # the grace ran out: the job ended, its cancel is under way
    ws = await client.ws_connect("/ws", params={"clientId": "flaky"})
    held.set()
    await wait_for(lambda: engine.queue_remaining == 0, timeout=20)
    await ws.close()
    last = engine.history[job.prompt_id]["status"]["messages"][-1][0]
    assert last == "execution_interrupted", "the cancelled job's prompt ran to its end"
