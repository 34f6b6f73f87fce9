"""Answers that come after a job moved on: a late answer to an old hand-over, a reconcile's slow
question (and a hand-over landing meanwhile), a cancel ComfyUI refused once, a socket back while its
jobs are being cancelled, an interrupt before a restarted bridge reaches ComfyUI. Each is taken for
what it is now, never for the job's current state."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from comfybridge.core.jobs import JobState
from comfybridge.edge.appkeys import SCHEDULER

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .fake_comfy import FakeComfy
from .helpers import TINY, Client, generate, poll_status

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


@pytest.mark.both_dialects
async def test_interrupt_after_a_restart_before_its_backend_reconnects_stops_the_prompt(
    make_fake: Any, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """A job handed over by the last process comes back as SUBMITTING (QUEUED/RUNNING are not
    journaled) with no hand-over in flight. Interrupted before its backend's socket connects,
    `interrupt` left it to a send that does not exist; the reconcile then found a CANCELLED job in
    ComfyUI's queue and left it there: the cancelled prompt ran to its end."""
    fake: FakeComfy = await make_fake()
    engine = fake.upstream.engine
    engine.pause()  # the prompt waits in ComfyUI's queue
    first = await make_bridge(fake.url)
    status, body = await generate(first, "late", TINY)
    assert status == 200, body
    await wait_for(lambda: engine.queue_remaining == 1)
    (prompt_id,) = first.app[SCHEDULER].core.by_prompt
    await first.close()

    fake.replace("GET /prompt", 500, "{}", times=10_000)  # the next bridge cannot connect yet
    second = await make_bridge(fake.url, backend_grace=30)
    scheduler = second.app[SCHEDULER]
    (job,) = scheduler.clients.get("late").jobs.values()
    assert job.state is JobState.SUBMITTING  # recovered: QUEUED is not journaled
    assert job.sending is None  # and no hand-over of it is in flight
    resp = await second.post("/interrupt", params={"clientId": "late"})
    assert resp.status == 200
    assert (await poll_status(second, "late", {"error", "closed"}))["detail"] == "interrupted"

    fake.answers["GET /prompt"].clear()  # ComfyUI reachable again: the socket connects, reconciles
    await wait_for(lambda: all(b.healthy for b in scheduler.backends.values()))
    engine.resume()
    await wait_for(lambda: engine.queue_remaining == 0)
    assert prompt_id not in engine.started, "the interrupted job's prompt ran on ComfyUI after all"


@pytest.mark.both_dialects
async def test_a_hand_over_that_lands_during_a_reconcile_is_not_taken_for_lost(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """`reconcile` read ComfyUI's queue once, then awaited /history for each prompt missing from it.
    A hand-over (skipped while in flight) that landed during such an await was then judged against
    the stale listing: its prompt, queued fine, looked unknown, was abandoned and sent again, and
    started in ComfyUI before it was taken back: one job, two prompts run."""
    fake: FakeComfy = await make_fake()
    engine = fake.upstream.engine
    engine.pause()
    client = await make_bridge(fake.url, backend_grace=30, job_idle_timeout=60)
    scheduler = client.app[SCHEDULER]
    (backend,) = scheduler.backends.values()
    assert (await generate(client, "a", TINY))[0] == 200
    await wait_for(lambda: engine.queue_remaining == 1)
    posted = fake.hold("POST /prompt")  # B's hand-over hangs
    assert (await generate(client, "b", {**TINY, "1/width": 9}))[0] == 200
    (b_job,) = scheduler.clients.get("b").jobs.values()
    await wait_for(lambda: b_job.handing_over)
    await wait_for(lambda: fake.seen.count("POST /prompt") == 2)

    fake.replace("GET /prompt", 500, "{}", times=10_000)  # the socket drops and cannot come back yet
    await fake.drop_sockets()
    await wait_for(lambda: not backend.healthy)
    engine.clear_pending()  # ComfyUI restarted meanwhile: A's prompt is gone
    asked = fake.hold("GET /history/*")
    fake.answers["GET /prompt"].clear()  # back: its reconcile asks about A, and waits
    await wait_for(lambda: "GET /history/*" in fake.seen)
    b_prompt = b_job.prompt_id
    posted.set()  # B's hand-over lands now, while the reconcile waits
    await wait_for(lambda: b_job.state is JobState.QUEUED)
    assert engine.queue_remaining == 1  # B's prompt is in ComfyUI's queue, as it should be
    asked.set()
    await wait_for(lambda: backend.healthy)
    engine.resume()
    for client_id in ("a", "b"):
        assert (await poll_status(client, client_id, {"error", "closed"}))["status"] == "closed"
    assert len(engine.started) == 2, f"2 jobs, {len(engine.started)} prompts started: {engine.started}"
    assert b_job.prompt_id == b_prompt, "B's prompt, queued in ComfyUI, was taken for lost and sent again"


@pytest.mark.both_dialects
async def test_a_backend_is_not_up_while_prompts_moved_off_it_during_its_reconcile_are_still_there(
    make_fake: Any, make_emulator: Any, make_bridge: BridgeFactory
) -> None:
    """`connected()` took the abandoned prompts back only *before* it reconciled. A reconcile that
    outlives backend_grace (a slow /history) lets the failover move the jobs meanwhile and abandon
    their prompts here; the backend was then declared up with them still in its queue: the old
    prompt of a job now run elsewhere started here too."""
    fake: FakeComfy = await make_fake()
    engine = fake.upstream.engine
    spare = await make_emulator()
    client = await make_bridge(fake.url, backend_grace=1.0, job_idle_timeout=60)
    scheduler = client.app[SCHEDULER]
    (backend,) = scheduler.backends.values()
    engine.pause()
    assert (await generate(client, "x", TINY))[0] == 200
    assert (await generate(client, "y", {**TINY, "1/width": 9}))[0] == 200
    await wait_for(lambda: engine.queue_remaining == 2)
    x_prompt, y_prompt = (j.prompt_id for j in backend.inflight)

    gate = fake.hold("GET /prompt")  # its socket drops; the reconnect hangs until the gate opens
    await fake.drop_sockets()
    await wait_for(lambda: not backend.healthy)
    engine.delete_pending([x_prompt])  # someone cleared X from ComfyUI's queue meanwhile; Y still waits there
    asked = fake.hold("GET /history/*")  # the reconcile's question about X is slow (it outlives the grace)
    scheduler.set_backends([fake.url, spare.url])
    gate.set()
    await wait_for(lambda: "GET /history/*" in fake.seen)
    await wait_for(lambda: len(spare.engine.started) == 2)  # the grace ran out: both jobs moved to the spare
    assert y_prompt in backend.abandoned
    asked.set()
    await wait_for(lambda: backend.healthy)
    for client_id in ("x", "y"):
        assert (await poll_status(client, client_id, {"error", "closed"}))["status"] == "closed"
    engine.resume()
    await wait_for(lambda: engine.queue_remaining == 0)
    assert y_prompt not in engine.started, "Y ran on the spare, and its old prompt started here as well"


@pytest.mark.both_dialects
async def test_a_prompt_reconcile_found_unknown_stays_kept_to_take_back_once_the_backend_is_up(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """A prompt a reconcile finds unknown is kept to take back should it show up later (a hand-over
    still on its way from a paused leader must not run beside the job's next prompt): the take-back
    after the reconcile, meant for prompts moved off the backend meanwhile, must leave it listed."""
    fake: FakeComfy = await make_fake(pace=0.05)
    engine = fake.upstream.engine
    engine.pause()
    client = await make_bridge(fake.url, backend_grace=30, job_idle_timeout=60)
    scheduler = client.app[SCHEDULER]
    (backend,) = scheduler.backends.values()
    assert (await generate(client, "a", {"workflow": "slow", "2/seed": 1}))[0] == 200
    await wait_for(lambda: engine.queue_remaining == 1)
    (job,) = scheduler.clients.get("a").jobs.values()
    old_prompt = job.prompt_id

    fake.replace("GET /prompt", 500, "{}", times=10_000)  # its socket drops and cannot come back yet
    await fake.drop_sockets()
    await wait_for(lambda: not backend.healthy)
    engine.clear_pending()  # ComfyUI restarted meanwhile: the prompt is unknown to it now
    fake.answers["GET /prompt"].clear()
    await wait_for(lambda: backend.healthy)
    await wait_for(lambda: job.prompt_id != old_prompt)  # unknown: sent again under a new prompt id
    assert old_prompt in backend.abandoned, "the unknown prompt is no longer kept to take back"
