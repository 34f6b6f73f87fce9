"""Scheduling basics: two backends, affinity, cancel at every stage, time-outs, lost sockets."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

import aiohttp
import pytest

from comfybridge.core.backend import Backend
from comfybridge.core.jobs import Job
from comfybridge.edge.appkeys import SCHEDULER
from comfybridge.emulator import Emulator

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import frames_until, generate, poll_status, read_results, run_job, seed, without_job_id

pytestmark = pytest.mark.both_dialects  # every test here runs against both ComfyUI dialects

SOLID = {"workflow": "solid", "1/width": 16, "1/height": 16, "1/batch_size": 1}


def prompts_of(emulator: Emulator) -> list[str]:
    """Every prompt ComfyUI ever took: started, or still pending."""
    pending = [item[1] for item in emulator.engine.queue_snapshot()["queue_pending"]]
    return emulator.engine.started + pending


def job_prompt_ids(client: object, client_id: str) -> list[str]:
    scheduler = client.app[SCHEDULER]  # type: ignore[attr-defined]
    known = scheduler.clients.get(client_id)
    return [job.prompt_id for job in known.jobs.values()] if known else []


async def test_new_clients_go_to_the_least_loaded_backend(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    first = await make_emulator(pace=0.2)
    second = await make_emulator(pace=0.2)
    client = await make_bridge(first, second)
    await generate(client, "a", {"workflow": "slow", "2/seed": 1})
    await generate(client, "b", {"workflow": "slow", "2/seed": 2})
    await wait_for(lambda: len(prompts_of(first)) == 1 and len(prompts_of(second)) == 1)
    for client_id in ("a", "b"):
        await client.post("/interrupt", params={"clientId": client_id})


async def test_one_clients_burst_uses_every_idle_gpu_and_is_told_job_by_job(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    first = await make_emulator(pace=0.05)
    second = await make_emulator(pace=0.05)
    client = await make_bridge(first, second)
    async with client.ws_connect("/ws", params={"clientId": "burst"}) as ws:
        job_ids = []
        for _ in range(20):
            status, body = await generate(client, "burst", {"workflow": "solid", "1/batch_size": 1})
            assert status == 200
            job_ids.append(body["job_id"])
        await wait_for(lambda: bool(prompts_of(first)) and bool(prompts_of(second)))
        await client.post("/free", params={"clientId": "burst"})  # frees both: the client's work is on both
        assert len(first.engine.free_requests) == len(second.engine.free_requests) == 1
        frames = await frames_until(ws, "closed")
        while frames[-1].get("jobs_left"):
            frames += await frames_until(ws, "closed")
    assert len(prompts_of(first)) + len(prompts_of(second)) == 20
    assert prompts_of(first)  # affinity left neither GPU idle
    assert prompts_of(second)
    told = [f["job_id"] for f in frames if f["status"] == "closed"]
    assert told == job_ids, [
        (f["status"], f.get("job_id", "")[:6], f.get("jobs_left")) for f in frames
    ]  # job by job, in order, whichever GPU finished first
    about = [f["job_id"] for f in frames if "job_id" in f]
    assert about == sorted(about, key=job_ids.index)  # no frame of a later job before an earlier one's end
    parts = await read_results(await client.get("/history", params={"clientId": "burst"}))
    assert len(parts) == 20


async def test_interrupt_waiting_job_never_reaches_comfyui(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator(pace=0.2)
    client = await make_bridge(emulator, pipeline_depth=0)
    async with client.ws_connect("/ws", params={"clientId": "first"}) as ws:
        await generate(client, "first", {"workflow": "slow", "2/seed": 3})
        await frames_until(ws, "progress")
        _, body = await generate(client, "first", {"workflow": "solid", "1/batch_size": 1})
        assert body["detail"] == "queued / 2"
        waiting = job_prompt_ids(client, "first")[1]
        await client.post("/interrupt", params={"clientId": "first"})
        assert (await frames_until(ws, "error"))[-1]["detail"] == "interrupted"
    await wait_for(lambda: emulator.engine.queue_remaining == 0)
    assert waiting not in prompts_of(emulator)


async def test_interrupt_job_queued_inside_comfyui(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, dialect: str
) -> None:
    emulator = await make_emulator(pace=0.2)
    client = await make_bridge(emulator, pipeline_depth=1)
    await generate(client, "deep", {"workflow": "slow", "2/seed": 4})
    await generate(client, "deep", {"workflow": "solid", "1/batch_size": 1})
    running, queued = job_prompt_ids(client, "deep")
    # Pipelining: the second prompt waits inside ComfyUI behind the first.
    await wait_for(lambda: [i[1] for i in emulator.engine.queue_snapshot()["queue_pending"]] == [queued])
    await client.post("/interrupt", params={"clientId": "deep"})
    await wait_for(lambda: emulator.engine.queue_remaining == 0)
    assert queued not in prompts_of(emulator)
    messages = [m[0] for m in emulator.engine.history[running]["status"]["messages"]]
    assert messages[-1] == "execution_interrupted"
    # Where ComfyUI has the atomic per-job cancel, the bridge uses it instead of delete + interrupt.
    assert sorted(emulator.engine.cancel_requests) == (sorted([running, queued]) if dialect == "jobs" else [])


async def test_next_client_starts_when_running_job_is_interrupted(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator(pace=0.2)
    client = await make_bridge(emulator, pipeline_depth=0, job_idle_timeout=60)  # no rescue by the watchdog
    await generate(client, "hog", {"workflow": "slow", "2/seed": 5})
    await generate(client, "next", {"workflow": "solid", "1/batch_size": 1})
    await wait_for(lambda: emulator.engine.queue_remaining == 1)
    await client.post("/interrupt", params={"clientId": "hog"})
    assert (await poll_status(client, "next", {"closed", "error"}))["status"] == "closed"
    assert (await poll_status(client, "hog", {"error"}))["detail"] == "interrupted"


async def test_idle_job_times_out_and_is_interrupted(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator(pace=2.0)
    client = await make_bridge(emulator, job_idle_timeout=0.3)
    frames = await run_job(client, "sleepy", {"workflow": "slow", "2/seed": 6})
    assert seed(frames[-1]) == {
        "status": "error",
        "detail": "time out error: exceed 0.3s",
        "details": "time out error: exceed 0.3s",
    }
    await wait_for(lambda: emulator.engine.queue_remaining == 0)
    (entry,) = emulator.engine.history.values()
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


async def test_lost_comfyui_socket_is_reconciled(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = await make_emulator(pace=0.05)
    client = await make_bridge(emulator)
    emulator.engine.faults.drop_socket_after_nodes = 2
    frames = await run_job(client, "dropped", {"workflow": "slow", "2/seed": 10})
    assert frames[-1]["status"] == "closed"
    parts = await read_results(await client.get("/history", params={"clientId": "dropped"}))
    assert [without_job_id(p[1]) for p in parts] == ["wf_c_slow_00001_.png"]
    assert len(emulator.engine.started) == 1  # reconciled, not submitted twice
    assert "closed its socket" in caplog.text
    assert emulator.engine.requests["GET /history/{prompt_id}"] >= 1  # events were missed: history tells


async def test_results_come_from_the_socket_without_reading_history(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Every `executed` event was seen, so the outputs are known without a GET /history."""
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    frames = await run_job(client, "told", {"workflow": "solid", "1/batch_size": 2})
    assert frames[-1]["status"] == "closed"
    parts = await read_results(await client.get("/history", params={"clientId": "told"}))
    assert [without_job_id(p[1]) for p in parts] == ["wf_b_empty_00001_.png", "wf_b_empty_00002_.png"]
    assert emulator.engine.requests["GET /history/{prompt_id}"] == 0
    assert emulator.engine.requests["GET /view"] == 2


async def test_prompt_500_is_retried(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    emulator.engine.faults.prompt_500 = 1
    frames = await run_job(client, "retry", {"workflow": "solid", "1/batch_size": 1})
    assert frames[-1]["status"] == "closed"
    emulator.engine.faults.prompt_500 = 10
    frames = await run_job(client, "retry", {"workflow": "solid", "1/batch_size": 1})
    assert seed(frames[-1]) == {
        "status": "error",
        "detail": "ComfyUI did not accept the job",
        "details": "ComfyUI did not accept the job",
    }


async def test_cancel_racing_the_hand_over_wins(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator(pace=0.3)
    client = await make_bridge(emulator)
    emulator.engine.faults.answer_delay = 0.5  # ComfyUI has the prompt, the bridge has no answer yet
    await generate(client, "racer", {"workflow": "slow", "2/seed": 11})
    (prompt_id,) = job_prompt_ids(client, "racer")
    await wait_for(lambda: emulator.engine.queue_remaining == 1)
    await client.post("/interrupt", params={"clientId": "racer"})
    assert (await poll_status(client, "racer", {"error", "closed"}))["detail"] == "interrupted"
    await wait_for(lambda: emulator.engine.queue_remaining == 0 and prompt_id in emulator.engine.history)
    assert emulator.engine.history[prompt_id]["status"]["messages"][-1][0] == "execution_interrupted"


async def test_slow_model_load_still_delivers(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, job_idle_timeout=5)
    emulator.engine.faults.start_delay = 0.3
    frames = await run_job(client, "loading", {"workflow": "solid", "1/batch_size": 1})
    assert frames[-1]["status"] == "closed"


async def test_waiting_behind_other_users_is_not_idle(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator(pace=0.15)
    client = await make_bridge(emulator, job_idle_timeout=0.5)
    foreign = {"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "test.png"}}}}
    foreign["prompt"].update(  # someone else's ~1 s prompt, queued straight into ComfyUI
        {str(n): {"class_type": "ImageInvert", "inputs": {"image": [str(n - 1), 0]}} for n in range(2, 8)}
    )
    foreign["prompt"]["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "other"}}
    async with client.session.post(f"{emulator.url}/prompt", json=foreign) as resp:
        assert resp.status == 200
    await wait_for(lambda: emulator.engine.queue_remaining == 1)
    frames = await run_job(client, "patient", {"workflow": "solid", "1/batch_size": 1})
    assert frames[-1]["status"] == "closed"


async def test_place_in_line_counts_every_idle_backend(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator(pace=0.2), await make_emulator(pace=0.2))
    places = []
    for index in range(4):
        status, body = await generate(client, f"line-{index}", {"workflow": "slow", "2/seed": index})
        assert status == 200
        places.append(body["detail"])
    assert places == ["queued / 1", "queued / 1", "queued / 2", "queued / 2"]
    for index in range(4):
        await client.post("/interrupt", params={"clientId": f"line-{index}"})


async def test_no_prompt_is_sent_while_the_bridge_may_not_send(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A cluster's leader that lost touch with its database says it may not send: a job handed over
    then is taken back and waits (nothing reaches ComfyUI), and goes once sending is allowed again."""
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    scheduler = client.app[SCHEDULER]
    allowed = {"send": False}
    scheduler.may_send = lambda: allowed["send"]
    asked: list[bool] = []
    original = scheduler.core.may_send
    scheduler.core.may_send = lambda: asked.append(True) or original()
    status, _ = await generate(client, "fenced", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200
    await wait_for(lambda: len(asked) >= 2)  # refused, taken back, handed over and refused again
    assert prompts_of(emulator) == []
    assert (await poll_status(client, "fenced", {"listening"}))["jobs_left"] == 1
    allowed["send"] = True
    assert (await poll_status(client, "fenced", {"closed"}))["jobs_left"] == 0
    assert len(prompts_of(emulator)) == 1


def held_journal(client: object) -> threading.Event:
    """Hold the journal's writer, as a slow disk would: every write waits, in order, until set."""
    journal = client.app[SCHEDULER].core.journal  # type: ignore[attr-defined]
    go = threading.Event()
    journal._submit(lambda conn, batch: go.wait(10))
    return go


def refuse_next_accept(client: object) -> None:
    """The next accept fails in the journal (an I/O error), in its turn among the other writes."""
    journal = client.app[SCHEDULER].core.journal  # type: ignore[attr-defined]

    def accept(record: dict[str, Any]) -> asyncio.Future[int]:
        journal.accept = original

        def write(conn: sqlite3.Connection, batch: Any) -> int:
            raise sqlite3.OperationalError("disk I/O error")

        return journal._submit(write)  # type: ignore[no-any-return]

    original, journal.accept = journal.accept, accept


async def accept_held(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, client_id: str, refused: bool
) -> tuple[Emulator, Any, aiohttp.ClientWebSocketResponse, threading.Event]:
    """An emulator, a bridge in front (heartbeat 0.2 s), a socket for `client_id`, and the bridge's
    journal held (`go` releases it) and, if `refused`, failing its next accept."""
    emulator = await make_emulator()
    client = await make_bridge(emulator, heartbeat=0.2)
    ws = await client.ws_connect("/ws", params={"clientId": client_id})
    go = held_journal(client)
    if refused:
        refuse_next_accept(client)
    return emulator, client, ws, go


async def test_a_job_handed_over_at_once_never_overtakes_one_still_being_accepted(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    emulator.engine.faults.hang_after_nodes = 1  # the first job holds the only slot
    client = await make_bridge(emulator, pipeline_depth=0)
    scheduler = client.app[SCHEDULER]
    sent: list[str] = []
    send = scheduler.dispatcher.send

    async def noted(backend: Backend, job: Job, prompt_id: str) -> None:
        sent.append(job.id)
        await send(backend, job, prompt_id)

    scheduler.dispatcher.send = noted  # type: ignore[method-assign]
    assert (await generate(client, "line", SOLID))[0] == 200
    await wait_for(lambda: len(emulator.engine.started) == 1)
    go = held_journal(client)
    earlier = asyncio.ensure_future(generate(client, "line", SOLID))  # no room: it will join the queue
    await wait_for(lambda: scheduler.core.pending_accepts == 1)
    emulator.engine.release_hang()  # the slot frees while its accept is still being written
    await wait_for(lambda: not any(b.inflight for b in scheduler.core.backends.values()))
    later = asyncio.ensure_future(generate(client, "line", SOLID))  # the queue is empty, a backend free
    await wait_for(lambda: scheduler.core.pending_accepts == 2)  # it waits its turn too
    go.set()
    (_, first), (_, second) = await earlier, await later
    await poll_status(client, "line", {"closed"})
    assert sent[1:] == [first["job_id"], second["job_id"]]


@pytest.mark.parametrize("accepted", [True, False])
async def test_a_job_moved_while_its_accept_is_written_runs_once_or_not_at_all(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, accepted: bool
) -> None:
    emulator = await make_emulator()
    emulator.engine.pause()  # what is sent waits in ComfyUI's queue, where it can still be taken back
    client = await make_bridge(emulator)
    core = client.app[SCHEDULER].core
    (backend,) = core.backends.values()
    go = held_journal(client)
    if not accepted:
        refuse_next_accept(client)
    answer = asyncio.ensure_future(generate(client, "moved", SOLID))
    await wait_for(lambda: emulator.engine.requests["POST /prompt"] == 1)  # sent at once; its accept waits
    (job,) = backend.inflight
    first = job.prompt_id
    core.take_back(backend, job)  # what a failover does to a job not started on a backend gone too long
    core.send_again(job)  # it waits in the queue under a new prompt id
    go.set()
    status, _ = await answer
    await wait_for(lambda: first not in prompts_of(emulator))  # the first prompt is taken back from ComfyUI
    if accepted:
        assert status == 200
        await wait_for(lambda: prompts_of(emulator) == [job.prompt_id])
        emulator.engine.resume()
        await poll_status(client, "moved", {"closed"})
        assert emulator.engine.started == [job.prompt_id]  # the second one only
    else:
        assert status == 503
        await wait_for(lambda: not backend.inflight and not core.queue)
        emulator.engine.resume()
        assert emulator.engine.requests["POST /prompt"] == 1
        assert prompts_of(emulator) == []
        assert (await client.get("/execution-info", params={"clientId": "moved"})).status == 400


@pytest.mark.parametrize("accepted", [True, False])
async def test_a_prompt_runs_while_its_accept_is_written_and_its_client_hears_of_it_only_after(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, accepted: bool
) -> None:
    emulator, client, ws, go = await accept_held(make_emulator, make_bridge, "early", refused=not accepted)
    tracker = client.app[SCHEDULER].tracker
    answer = asyncio.ensure_future(generate(client, "early", SOLID))

    def heard_its_end() -> bool:  # ComfyUI ran it and said so, and the bridge holds what it said
        return any(event == "execution_success" for held in tracker.held.values() for _, event, _ in held)

    await wait_for(heard_its_end)
    assert len(emulator.engine.started) == 1
    assert not answer.done()
    before = await frames_until(ws, "listening")  # a heartbeat: the job is not heard of yet
    go.set()
    status, body = await answer
    if accepted:
        assert status == 200
        frames = await frames_until(ws, "closed")
        assert [f["status"] for f in frames if f.get("job_id") == body["job_id"]][-2:] == ["progress", "closed"]
        resp = await client.get("/history", params={"clientId": "early"})
        assert resp.status == 200
        assert len(await read_results(resp)) == 1
        cancels = emulator.engine.requests["POST /queue"] + emulator.engine.requests["POST /api/jobs/{job_id}/cancel"]
        assert cancels == 0  # a prompt that ran to its end is not taken back
    else:
        assert status == 503
        await wait_for(lambda: not tracker.held)
        frames = await frames_until(ws, "listening")
        assert all("job_id" not in f for f in frames)  # a job not accepted is never heard of
        assert await (await client.get("/generation-count")).json() == 0
    assert all("job_id" not in f for f in before)
    assert all(f["status"] in ("connected", "listening", "progress", "closed") for f in before + frames)
    assert emulator.engine.requests["POST /prompt"] == 1


@pytest.mark.parametrize("accepted", [True, False])
async def test_a_socket_lost_while_the_accept_is_written_leaves_the_results_to_comfyuis_history(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, accepted: bool
) -> None:
    emulator, client, ws, go = await accept_held(make_emulator, make_bridge, "gap", refused=not accepted)
    (backend,) = client.app[SCHEDULER].core.backends.values()
    emulator.engine.faults.drop_socket_after_nodes = 1  # the SaveImage's `executed` is never heard
    answer = asyncio.ensure_future(generate(client, "gap", SOLID))
    await wait_for(lambda: len(emulator.engine.timeline) == 1)  # the prompt ran to its end meanwhile
    await wait_for(lambda: emulator.engine.requests["GET /ws"] == 2 and backend.healthy)  # back, still accepting
    go.set()
    status, _ = await answer
    if accepted:
        assert status == 200
        await poll_status(client, "gap", {"closed"})
        resp = await client.get("/history", params={"clientId": "gap"})
        assert resp.status == 200
        assert len(await read_results(resp)) == 1  # read from ComfyUI's /history, not the events before the gap
    else:
        assert status == 503
        await wait_for(lambda: not backend.inflight)
        frames = await frames_until(ws, "listening")
        assert all("job_id" not in f for f in frames)
        assert emulator.engine.requests["GET /history/{prompt_id}"] == 0  # a job that is not, is not collected


async def test_a_job_interrupted_while_its_accept_is_written_and_then_refused_is_never_heard_of(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator, client, ws, go = await accept_held(make_emulator, make_bridge, "gone", refused=True)
    emulator.engine.pause()
    answer = asyncio.ensure_future(generate(client, "gone", SOLID))
    await wait_for(lambda: emulator.engine.requests["POST /prompt"] == 1)
    interrupt = asyncio.ensure_future(client.post("/interrupt", params={"clientId": "gone"}))
    await wait_for(lambda: client.app[SCHEDULER].core.clients.get("gone").jobs == {})  # type: ignore[union-attr]
    go.set()
    assert (await answer)[0] == 503
    (await interrupt).release()
    frames = await frames_until(ws, "listening")
    assert all("job_id" not in f for f in frames)  # no `error` "interrupted" about a job it was refused
    assert emulator.engine.queue_snapshot()["queue_pending"] == []  # and its prompt is taken back


def pending_inside(emulator: Emulator) -> int:
    return len(emulator.engine.queue_snapshot()["queue_pending"])


async def queued_in_bridge(client: Any) -> int:
    return int((await (await client.get("/health")).json())["queued"])


def learned(client: Any, workflow: str, seconds: float) -> None:
    """What the bridge has seen `workflow` take on its one backend."""
    core = client.app[SCHEDULER].core
    (name,) = core.backends
    core.runtimes.observe(workflow, name, seconds)


async def hold_the_gpu(client: Any, emulator: Emulator, seed: int) -> None:
    emulator.engine.faults.hang_after_nodes = 0  # the next prompt runs until released
    await generate(client, f"holder-{seed}", {"workflow": "slow", "2/seed": seed})
    await wait_for(lambda: emulator.engine.queue_remaining == 1)


async def test_prompts_known_to_be_tiny_are_queued_deeper_inside_comfyui(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A GPU must not wait for the bridge's turnaround between prompts of a few milliseconds: those
    are queued inside ComfyUI beyond `pipeline_depth`; no other prompt is: one of a workflow not seen
    there yet, or known to take longer than what is left of the 20 ms."""
    emulator = await make_emulator(pace=0)
    client = await make_bridge(emulator, pipeline_depth=1)
    learned(client, "solid", 0.001)
    await hold_the_gpu(client, emulator, 1)
    for index in range(5):
        await generate(client, f"tiny-{index}", dict(SOLID, **{"1/width": 20 + index}))
    await wait_for(lambda: pending_inside(emulator) == 5)  # all of them, not one
    assert await queued_in_bridge(client) == 0
    await generate(client, "unseen", {"workflow": "invert"})  # never run here: it waits in the bridge
    assert await queued_in_bridge(client) == 1
    emulator.engine.release_hang()
    for index in range(5):
        await poll_status(client, f"tiny-{index}", {"closed"})
    await poll_status(client, "unseen", {"closed", "error"})
    learned(client, "slow", 60.0)  # known, but far over what is left
    await hold_the_gpu(client, emulator, 2)
    await generate(client, "tiny", SOLID)  # the pipeline_depth place
    await wait_for(lambda: pending_inside(emulator) == 1)
    await generate(client, "long", {"workflow": "slow", "2/seed": 3})
    assert await queued_in_bridge(client) == 1
    assert pending_inside(emulator) == 1
    emulator.engine.release_hang()
    await poll_status(client, "long", {"closed"})


async def test_jobs_that_went_straight_into_comfyui_were_turns(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A client whose tiny jobs a deep pipeline took as they came has had its turns: its next job
    waits behind one of a client that came later and has had none."""
    emulator = await make_emulator(pace=0)
    client = await make_bridge(emulator, pipeline_depth=1)
    learned(client, "solid", 0.001)
    learned(client, "slow", 60.0)
    await hold_the_gpu(client, emulator, 1)
    for index in range(3):
        await generate(client, "eager", dict(SOLID, **{"1/width": 20 + index}))
    await wait_for(lambda: pending_inside(emulator) == 3)
    await generate(client, "eager", {"workflow": "slow", "2/seed": 7})
    await generate(client, "patient", dict(SOLID, **{"1/width": 40}))
    eager_slow, patient = (job_prompt_ids(client, name)[-1] for name in ("eager", "patient"))
    emulator.engine.release_hang()
    await poll_status(client, "eager", {"closed"}, timeout=30)
    started = emulator.engine.started
    assert started.index(patient) < started.index(eager_slow)
