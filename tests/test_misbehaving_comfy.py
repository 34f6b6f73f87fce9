"""Whatever ComfyUI (or a proxy before it) sends, no listener dies and every job ends: malformed events and
answers are skipped or fail only their job, a backend that hangs is taken out of service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from comfybridge.comfy import client as comfy_client
from comfybridge.core import tracking
from comfybridge.edge.appkeys import SCHEDULER, WORKFLOWS
from comfybridge.emulator import Emulator
from comfybridge.emulator.server import SOCKETS

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .fake_comfy import FakeComfy
from .helpers import Client, frames_until, generate, png, poll_status, read_results, upload, without_job_id
from .test_scheduling import held_journal, refuse_next_accept

SOLID = {"workflow": "solid", "1/batch_size": 1}
PROXY_PAGE = "<html><body><h1>502 Bad Gateway</h1></body></html>"


def backend_states(client: Client) -> list[str]:
    return [b["state"] for b in client.app[SCHEDULER].health()["backends"]]


async def run_one(client: Client, client_id: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Submit, wait for the end, and fetch: the last status and the result files."""
    status, answer = await generate(client, client_id, body or SOLID)
    assert status == 200, answer
    info = await poll_status(client, client_id, {"closed", "error"}, timeout=30)
    resp = await client.get("/history", params={"clientId": client_id})
    files = [part[1] for part in await read_results(resp)] if resp.status == 200 else []
    return {"status": info["status"], "detail": info["detail"], "files": files}


MALFORMED_EVENTS = [
    '{"type": "status", "data": {"status": "busy"}}',
    '{"type": "status", "data": {"status": {"exec_info": [1, 2]}}}',
    '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": "many"}}}}',
    '{"type": "status", "data": []}',
    '{"type": "execution_cached", "data": {"nodes": null, "prompt_id": "p"}}',
    '{"type": "execution_cached", "data": {"nodes": {"1": true}, "prompt_id": "p"}}',
    '{"type": "executing", "data": {"node": {"id": 1}, "prompt_id": "p"}}',
    '{"type": "executing", "data": {"node": "1", "prompt_id": 7}}',
    '{"type": "progress", "data": {"value": "3", "max": 10, "node": "1", "prompt_id": "p"}}',
    '{"type": "progress_state", "data": {"nodes": [1, 2], "prompt_id": "p"}}',
    '{"type": "executed", "data": {"node": "1", "output": ["x"], "prompt_id": "p"}}',
    '{"type": "execution_error", "data": "boom"}',
    '{"type": 5, "data": {}}',
    '["status", {}]',
    "not json at all",
    '{"type": "status"}',
]


async def test_a_cached_output_told_again_without_ui_output_is_not_a_malformed_event(
    make_fake: Any, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """ComfyUI tells a cached output node's result again as `executed` with `"output": null` when the
    node has no UI output (execution.py: `cached_output.get("output", None)`): that is no fault."""
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    await wait_for(lambda: backend_states(client) == ["up"])
    fake.upstream.engine.faults.start_delay = 0.3
    status, _ = await generate(client, "cached", SOLID)
    assert status == 200
    await wait_for(lambda: bool(fake.upstream.engine.started))
    prompt_id = orjson.dumps(fake.upstream.engine.started[0]).decode()
    await fake.push(f'{{"type": "executed", "data": {{"node": "9", "output": null, "prompt_id": {prompt_id}}}}}')
    assert (await poll_status(client, "cached", {"closed", "error"}, timeout=30))["status"] == "closed"
    assert not [r for r in caplog.records if "malformed" in r.getMessage()]


async def test_malformed_events_are_skipped_and_the_listener_lives(
    make_fake: Any, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    await wait_for(lambda: backend_states(client) == ["up"])
    for frame in MALFORMED_EVENTS:
        await fake.push(frame)
    # The same garbage about the very prompt that runs, while it runs.
    fake.upstream.engine.faults.start_delay = 0.3
    status, _ = await generate(client, "garbage", SOLID)
    assert status == 200
    await wait_for(lambda: bool(fake.upstream.engine.started))
    prompt_id = fake.upstream.engine.started[0]
    for frame in MALFORMED_EVENTS:
        await fake.push(frame.replace('"p"', orjson.dumps(prompt_id).decode()))
    info = await poll_status(client, "garbage", {"closed", "error"}, timeout=30)
    assert info["status"] == "closed"
    assert backend_states(client) == ["up"]
    fake.upstream.engine.faults.start_delay = 0
    assert (await run_one(client, "after"))["status"] == "closed"  # still listening
    complaints = [r.getMessage() for r in caplog.records if "sent a malformed" in r.getMessage()]
    assert any("status.status is str, not an object" in line for line in complaints)
    assert any("execution_cached.nodes is dict, not a list" in line for line in complaints)
    assert any("not JSON" in line for line in complaints)
    # Rate-limited: the second round of each kind within a minute is counted, not logged again.
    assert len(complaints) < 2 * len(MALFORMED_EVENTS)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("GET /queue", PROXY_PAGE),
        ("GET /queue", '{"queue_running": {"a": 1}, "queue_pending": []}'),
        ("GET /queue", '{"queue_running": [[1]], "queue_pending": []}'),
        ("GET /queue", "[]"),
        ("GET /history/*", PROXY_PAGE),
        ("GET /history/*", '{"p": ["not", "an", "entry"]}'),
    ],
)
async def test_malformed_answers_at_reconnect_delay_the_backend_not_kill_it(
    make_fake: Any, make_bridge: BridgeFactory, route: str, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake: FakeComfy = await make_fake(pace=0.1)
    client = await make_bridge(fake.url, backend_grace=30)
    status, _ = await generate(client, "reconnect", {"workflow": "slow", "2/seed": 1})
    assert status == 200
    await wait_for(lambda: bool(fake.upstream.engine.started))
    prompt_id = fake.upstream.engine.started[0]
    fake.replace(route, 200, body.replace('"p"', orjson.dumps(prompt_id).decode()), times=3)
    fake.replace("GET /prompt", 502, PROXY_PAGE)  # and a first reconnect that fails outright
    await fake.drop_sockets()
    await wait_for(lambda: backend_states(client) == ["down"])
    info = await poll_status(client, "reconnect", {"closed", "error"}, timeout=30)
    assert info["status"] == "closed", info
    assert backend_states(client) == ["up"]
    assert len(fake.upstream.engine.started) == 1  # adopted, never sent twice
    assert not fake.answers[route]  # every bad answer was met, and outlived
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # refused as malformed, not a crash


async def test_a_non_json_200_from_prompt_is_asked_about_never_sent_blindly(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    await wait_for(lambda: backend_states(client) == ["up"])
    fake.replace("POST /prompt", 200, PROXY_PAGE)
    outcome = await run_one(client, "prompt-page")
    assert outcome["status"] == "closed"
    assert len(fake.upstream.engine.started) == 1
    assert fake.seen.count("POST /prompt") == 2  # unanswered once, asked about, then sent again


async def test_a_web_page_in_place_of_an_output_file_is_never_delivered_as_it(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """ComfyUI serves no output as a web page (an .html output is sent as a download): one is a proxy's
    page with 200. Tried again; for good, the job fails saying so, and no page is handed over."""
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url, result_retries=2)
    await wait_for(lambda: backend_states(client) == ["up"])
    fake.replace("GET /view", 200, PROXY_PAGE, content_type="text/html")
    await generate(client, "once", SOLID)
    assert (await poll_status(client, "once", {"closed", "error"}))["status"] == "closed"
    parts = await read_results(await client.get("/history", params={"clientId": "once"}))
    assert [part[3][:8] for part in parts] == [b"\x89PNG\r\n\x1a\n"]  # the file, fetched again
    assert fake.seen.count("GET /view") == 2
    fake.replace("GET /view", 200, PROXY_PAGE, times=10, content_type="text/html")
    outcome = await run_one(client, "always")
    assert outcome["status"] == "error"
    assert "answered a web page (text/html), not the file" in outcome["detail"]
    assert outcome["files"] == []


async def test_a_second_execution_start_in_one_run_costs_no_output(
    make_fake: Any, make_bridge: BridgeFactory, workflow_dir: Path
) -> None:
    """No real ComfyUI says it twice; a fork or a proxy that repeats it between two outputs must not
    make the bridge forget the first: the outputs are read from /history then."""
    two_saves = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "first"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "second"}},
    }
    (workflow_dir / "two_saves.json").write_bytes(orjson.dumps(two_saves))
    aliases = orjson.loads((workflow_dir / "workflow_alias.json").read_bytes())
    aliases.append({"alias": "two-saves", "fn": "two_saves.json", "inputs": []})
    (workflow_dir / "workflow_alias.json").write_bytes(orjson.dumps(aliases))
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    await wait_for(lambda: backend_states(client) == ["up"])
    fake.upstream.engine.faults.hang_after_nodes = 2  # inside the second SaveImage: the first one has said so
    await generate(client, "twice", {"workflow": "two-saves"})
    await wait_for(lambda: fake.seen.count("GET /view") == 1)  # the first output, announced and fetched
    prompt_id = orjson.dumps(fake.upstream.engine.started[0]).decode()
    await fake.push(f'{{"type": "execution_start", "data": {{"prompt_id": {prompt_id}, "timestamp": 1}}}}')
    fake.upstream.engine.release_hang()
    info = await poll_status(client, "twice", {"closed", "error"})
    assert info["status"] == "closed"
    parts = await read_results(await client.get("/history", params={"clientId": "twice"}))
    assert sorted(without_job_id(part[1]).split("_")[0] for part in parts) == ["first", "second"]


async def test_a_success_with_no_output_announced_asks_history(make_fake: Any, make_bridge: BridgeFactory) -> None:
    """`executed` lost on the way (a proxy, a fork): a job that succeeded is not taken for one
    without files; /history has the outputs."""
    fake: FakeComfy = await make_fake()

    def without_executed(text: str) -> str:
        return "" if orjson.loads(text).get("type") == "executed" else text

    fake.rewrite = without_executed
    client = await make_bridge(fake.url)
    outcome = await run_one(client, "unannounced")
    assert outcome["status"] == "closed"
    assert len(outcome["files"]) == 1
    assert "GET /history/*" in fake.seen


async def test_history_malformed_for_good_fails_only_that_job(make_fake: Any, make_bridge: BridgeFactory) -> None:
    fake: FakeComfy = await make_fake(pace=0.1)
    client = await make_bridge(fake.url, result_retries=2, backend_grace=30)
    status, _ = await generate(client, "unlucky", {"workflow": "slow", "2/seed": 2})
    assert status == 200
    await wait_for(lambda: bool(fake.upstream.engine.started))
    fake.replace("GET /history/*", 200, PROXY_PAGE, times=10)
    await fake.drop_sockets()  # its events are missed now: the outcome must come from /history
    info = await poll_status(client, "unlucky", {"closed", "error"}, timeout=30)
    assert info["status"] == "error"
    assert info["detail"].startswith("ComfyUI did not give the results (")
    assert "answered 200 with 50 bytes that are not JSON" in info["detail"]
    fake.answers.clear()
    assert (await run_one(client, "next"))["status"] == "closed"
    assert backend_states(client) == ["up"]


async def test_object_info_that_is_not_json_keeps_no_backend_out(make_fake: Any, make_bridge: BridgeFactory) -> None:
    fake: FakeComfy = await make_fake()
    fake.replace("GET /object_info/*", 200, PROXY_PAGE, times=1000)
    client = await make_bridge(fake.url)
    assert (await run_one(client, "limits-later"))["status"] == "closed"
    asked = fake.seen.count("GET /object_info/*")
    assert 0 < asked <= len(client.app[WORKFLOWS].node_classes())  # once each, not again and again


async def test_only_the_node_classes_of_exposed_inputs_are_asked_about(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """The whole /object_info runs to tens of MB with many custom nodes, and parsing it held the
    event loop (every request) for a good part of a second per backend, at each connect and reload.
    The bridge asks /object_info/{class} for the few classes its workflows' inputs belong to, and
    still learns their limits."""
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    classes = client.app[WORKFLOWS].node_classes()
    await wait_for(lambda: fake.seen.count("GET /object_info/*") == len(classes))
    assert "GET /object_info" not in fake.seen
    assert "KSampler" in classes
    info = await (await client.get("/workflow-info", params={"workflow": "text-to-image"})).json()
    assert (info["3/steps"]["min"], info["3/steps"]["max"]) == (1, 10000)  # ComfyUI's own limits, learned


async def test_a_listener_that_fails_is_started_again_and_down_meanwhile(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    failover = client.app[SCHEDULER].failover
    await wait_for(lambda: backend_states(client) == ["up"])
    real_lost, faults = failover.lost, []

    def lost_with_a_bug(backend: Any) -> None:
        if not faults:  # the first call fails, as a bug in a handler would: the listener dies of it
            faults.append(backend.name)
            raise RuntimeError("a bug in the listener")
        real_lost(backend)

    failover.lost = lost_with_a_bug  # type: ignore[method-assign]
    await _drop_bridge_sockets(emulator)
    await wait_for(lambda: backend_states(client) == ["down"])
    assert faults
    await wait_for(lambda: backend_states(client) == ["up"])
    assert (await run_one(client, "restarted"))["status"] == "closed"
    assert any("its listener failed; starting it again" in r.getMessage() for r in caplog.records)


async def test_a_socket_back_mid_run_hears_the_running_node_without_a_complaint(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """ComfyUI tells a socket that comes back while its prompt runs which node runs, with no
    prompt_id: that is its protocol, not a malformed event, and the job still ends with its file."""
    emulator = await make_emulator(pace=0.3)
    client = await make_bridge(emulator, backend_grace=30)
    status, _ = await generate(client, "back", {"workflow": "slow", "2/seed": 1})
    assert status == 200
    await wait_for(lambda: bool(emulator.engine.started))
    await _drop_bridge_sockets(emulator)
    await wait_for(lambda: backend_states(client) == ["down"])
    await wait_for(lambda: backend_states(client) == ["up"])
    result = await run_one(client, "back")
    assert result["status"] == "closed"
    assert result["files"]
    assert not [r for r in caplog.records if "sent a malformed" in r.getMessage()]


async def test_a_closing_scheduler_lets_go_of_comfyuis_socket_before_its_collects_end(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """The event socket closes first: the next leader of a cluster connects with the same ComfyUI
    clientId, and ComfyUI forgets a clientId, the newer socket included, when an older one closes."""
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    await wait_for(lambda: backend_states(client) == ["up"])
    release = fake.hold("GET /view")  # the job's result is being fetched, and stays so
    status, _ = await generate(client, "collecting", SOLID)
    assert status == 200
    scheduler = client.app[SCHEDULER]
    await wait_for(lambda: bool(scheduler.core.collecting))
    closing = asyncio.create_task(scheduler.close(collect_timeout=60))
    await wait_for(lambda: not fake.sockets)
    assert not closing.done()  # the collect still runs
    release.set()
    await closing


async def _drop_bridge_sockets(emulator: Emulator) -> None:
    for ws in list(emulator.app[SOCKETS].values()):
        await ws.close()


async def test_a_socket_comfyui_forgot_is_opened_again_and_its_job_ends(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another socket with the bridge's clientId comes and goes (a frozen bridge of a cluster that
    wakes or dies after the next leader connected): ComfyUI forgets the clientId, and the bridge's
    socket, still open, hears nothing more. The next prompt's missing `status` broadcast gives it
    away; the bridge connects again and its job ends, not at job_idle_timeout."""
    monkeypatch.setattr(comfy_client, "DEAF_AFTER", 0.5)
    emulator = await make_emulator(pace=0.0)
    client = await make_bridge(emulator, job_idle_timeout=600)
    await wait_for(lambda: backend_states(client) == ["up"])
    (sid,) = emulator.app[SOCKETS]
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{emulator.url}/ws", params={"clientId": sid}):
        pass
    assert sid not in emulator.app[SOCKETS]  # the bridge's socket is open, and deaf
    result = await run_one(client, "deaf")
    assert result["status"] == "closed"
    assert result["files"]
    assert [r for r in caplog.records if "heard nothing" in r.getMessage()]


async def test_frames_over_the_limit_are_refused_unread(make_fake: Any, make_bridge: BridgeFactory) -> None:
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url, max_event_mb=0.01, backend_grace=30)
    await wait_for(lambda: backend_states(client) == ["up"])
    await fake.push('{"type": "status", "data": {"pad": "' + "x" * 20_000 + '"}}')
    await wait_for(lambda: backend_states(client) == ["down"])
    await wait_for(lambda: backend_states(client) == ["up"])  # it reconnects
    assert (await run_one(client, "small-frames"))["status"] == "closed"


async def test_a_hung_comfyui_is_stuck_its_jobs_move_and_it_comes_back(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    hung = await make_emulator(pace=0.05)
    spare = await make_emulator(pace=0.05)
    hung.engine.faults.hang_after_nodes = 1
    client = await make_bridge(hung, job_idle_timeout=1.0)
    scheduler = client.app[SCHEDULER]
    async with client.ws_connect("/ws", params={"clientId": "patient"}) as ws:
        for seed in (1, 2, 3):
            status, _ = await generate(client, "patient", {"workflow": "slow", "2/seed": seed})
            assert status == 200
        await wait_for(lambda: hung.engine.queue_remaining == 2)  # one hung, one queued behind it
        scheduler.set_backends([hung.url, spare.url])
        first = await frames_until(ws, "error")
        assert first[-1]["detail"] == "time out error: exceed 1s"
        assert backend_states(client) == ["stuck", "up"]
        assert (await client.get("/health")).status == 200
        second = await frames_until(ws, "closed")
        third = await frames_until(ws, "closed")
    assert second[-1]["job_id"] != third[-1]["job_id"]
    assert len(spare.engine.started) == 2  # the jobs behind the hung prompt ran elsewhere
    assert hung.engine.queue_remaining == 1  # only the hung one is left there
    metrics = await (await client.get("/metrics")).text()
    assert f'comfybridge_backend_stuck{{backend="{hung.url}"}} 1.0' in metrics
    hung.engine.release_hang()  # it moves again (its prompt was interrupted meanwhile)
    await wait_for(lambda: backend_states(client) == ["up", "up"])
    assert (await run_one(client, "later"))["status"] == "closed"


async def test_a_worker_that_fails_is_started_again_and_its_backend_stays_up(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    dispatcher = client.app[SCHEDULER].dispatcher
    await wait_for(lambda: backend_states(client) == ["up"])
    real_next, faults = dispatcher.next_for, []

    def next_with_a_bug(backend: Any) -> Any:
        if not faults:
            faults.append(backend.name)
            raise RuntimeError("a bug in the worker")
        return real_next(backend)

    dispatcher.next_for = next_with_a_bug  # type: ignore[method-assign]
    outcome = await run_one(client, "after-a-worker-bug")
    assert faults
    assert outcome["status"] == "closed"
    assert backend_states(client) == ["up"]  # its socket was fine all along: never marked down
    assert any("its worker failed; starting it again" in r.getMessage() for r in caplog.records)


async def test_limits_are_learned_from_the_classes_comfyui_can_describe(
    make_fake: Any, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """ComfyUI's /object_info/{class} answers 500 for a node whose definition raises (the whole list
    leaves it out): that class is left out, and every other class's limits are learned."""
    fake: FakeComfy = await make_fake()
    fake.replace("GET /object_info/ImageAddNoise", 500, "500 Internal Server Error", 1000, "text/plain")
    client = await make_bridge(fake.url)
    await wait_for(lambda: "GET /object_info/ImageAddNoise answered HTTP 500" in caplog.text)
    info = await (await client.get("/workflow-info", params={"workflow": "text-to-image"})).json()
    assert (info["3/steps"]["min"], info["3/steps"]["max"]) == (1, 10000)


async def test_a_comfyui_without_the_per_class_route_is_asked_for_the_whole_list(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """A fork, or a proxy that lets through only the paths it knows, answers 404 there."""
    fake: FakeComfy = await make_fake()
    fake.replace("GET /object_info/*", 404, "404: Not Found", 1000, "text/plain")
    client = await make_bridge(fake.url)
    await wait_for(lambda: "GET /object_info" in fake.seen)
    await wait_for(lambda: client.app[SCHEDULER].core.backends[fake.url].object_info_loaded)
    info = await (await client.get("/workflow-info", params={"workflow": "text-to-image"})).json()
    assert (info["3/steps"]["min"], info["3/steps"]["max"]) == (1, 10000)


@pytest.mark.parametrize(
    "body",
    [
        '{"EmptyImage": {"input": []}}',
        '{"EmptyImage": {"input": {"required": [1, 2]}}}',
        '{"EmptyImage": {"input": {"required": {"width": ["INT", {"min": "zero", "max": [1]}]}}}}',
        '{"EmptyImage": {"input": {"required": {"color": [[{"a": 1}], {}]}}}}',
    ],
)
async def test_object_info_of_a_wrong_shape_keeps_no_backend_out(
    make_fake: Any, make_bridge: BridgeFactory, body: str
) -> None:
    fake: FakeComfy = await make_fake()
    fake.replace("GET /object_info/*", 200, body, times=1000)
    client = await make_bridge(fake.url)
    assert (await run_one(client, "odd-object-info"))["status"] == "closed"
    assert backend_states(client) == ["up"]


async def test_waiting_behind_other_users_long_prompts_is_not_being_stuck(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Another user's prompts report their progress only to that user: a job queued behind them waits,
    however long they take, and the backend is never taken for stuck."""
    shared = await make_emulator(pace=0.6)
    client = await make_bridge(shared, job_idle_timeout=1.0)
    await wait_for(lambda: backend_states(client) == ["up"])
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "other"}}}  # fmt: skip
    for _ in range(3):  # about 1.2 s each, queued by someone else
        shared.engine.submit({"prompt": prompt, "client_id": "someone-else"})
    outcome = await run_one(client, "behind-others")
    assert outcome["status"] == "closed"
    assert "stuck" not in backend_states(client)


async def test_a_prompt_sent_while_its_backend_was_taken_for_stuck_does_not_run_there_too(
    make_fake: Any, make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    fake: FakeComfy = await make_fake(pace=0.05)
    hung = fake.upstream
    spare = await make_emulator(pace=0.05)
    hung.engine.faults.hang_after_nodes = 1
    client = await make_bridge(fake.url, job_idle_timeout=1.0)
    scheduler = client.app[SCHEDULER]
    status, _ = await generate(client, "first", {"workflow": "slow", "2/seed": 1})
    assert status == 200
    await wait_for(lambda: len(hung.engine.started) == 1)  # it hangs there
    late = fake.hold("POST /prompt")  # the next hand-over reaches ComfyUI only later
    status, _ = await generate(client, "second", {"workflow": "slow", "2/seed": 2})
    assert status == 200
    await wait_for(lambda: fake.seen.count("POST /prompt") == 2)
    scheduler.set_backends([fake.url, spare.url])
    assert (await poll_status(client, "first", {"error"}))["detail"] == "time out error: exceed 1s"
    assert (await poll_status(client, "second", {"closed", "error"}, timeout=30))["status"] == "closed"
    assert len(spare.engine.started) == 1  # the second ran on the spare GPU
    late.set()  # now its first hand-over arrives at the stuck ComfyUI, and is answered
    await wait_for(lambda: fake.seen.count("POST /queue") >= 2)  # ... and taken back at once
    await wait_for(lambda: hung.engine.queue_remaining == 1)
    hung.engine.release_hang()
    await wait_for(lambda: backend_states(client) == ["up", "up"])
    assert len(hung.engine.started) == 1  # only the one that hung ever ran on it


async def test_a_comfyui_whose_queue_does_not_move_is_stuck_and_its_jobs_go_elsewhere(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Nothing runs while prompts wait (a dead worker): waiting behind someone else's prompt is not
    waiting at all then."""
    dead = await make_emulator()
    spare = await make_emulator()
    dead.engine.pause()
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "other"}}}  # fmt: skip
    dead.engine.submit({"prompt": prompt, "client_id": "someone-else"})
    client = await make_bridge(dead, job_idle_timeout=1.0)
    status, _ = await generate(client, "waits", SOLID)
    assert status == 200
    await wait_for(lambda: dead.engine.queue_remaining == 2)
    client.app[SCHEDULER].set_backends([dead.url, spare.url])
    info = await poll_status(client, "waits", {"closed", "error"}, timeout=30)
    assert info["status"] == "closed"  # moved, not failed: the wait was not its fault
    assert len(spare.engine.started) == 1
    assert backend_states(client) == ["stuck", "up"]
    dead.engine.resume()  # it runs again: back in service
    await wait_for(lambda: backend_states(client) == ["up", "up"])


async def test_with_no_comfyui_that_runs_anything_a_job_still_ends(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A dead worker and nowhere else to go: the job's prompt stalls, is taken back and tried once
    more (the prompts in that queue may all have been ours), stalls again and fails with the time-out,
    instead of going back and forth for ever. The backend is then tried with one prompt at a time,
    and trusted again once one starts."""
    # The dead one would win a tie (the planner breaks them by name): only the doubt sends work past it.
    dead, spare = sorted([await make_emulator(), await make_emulator()], key=lambda emulator: emulator.url)
    dead.engine.pause()
    spare.engine.pause()  # joins later, as idle as the dead one looks
    client = await make_bridge(dead, job_idle_timeout=1.0)
    assert (await generate(client, "stranded", SOLID))[0] == 200
    info = await poll_status(client, "stranded", {"closed", "error"}, timeout=30)
    assert (info["status"], info["detail"]) == ("error", "time out error: exceed 1s")
    await wait_for(lambda: backend_states(client) == ["up"] and dead.engine.queue_remaining == 0)
    # Still in doubt: with another backend about, a new job goes there, not to the dead one.
    client.app[SCHEDULER].set_backends([dead.url, spare.url])
    await wait_for(lambda: backend_states(client) == ["up", "up"])
    assert (await generate(client, "next", SOLID))[0] == 200
    await wait_for(lambda: spare.engine.queue_remaining == 1)
    assert dead.engine.queue_remaining == 0
    spare.engine.resume()
    assert (await poll_status(client, "next", {"closed", "error"}))["status"] == "closed"
    dead.engine.resume()  # it runs again: a job sent there starts, and the doubt is gone
    client.app[SCHEDULER].set_backends([dead.url])
    assert (await generate(client, "later", SOLID))[0] == 200
    assert (await poll_status(client, "later", {"closed", "error"}, timeout=30))["status"] == "closed"
    assert client.app[SCHEDULER].backends[dead.url].doubt == 0.0


async def test_a_prompt_comfyui_never_says_it_left_frees_its_place_once_gone_from_the_queue(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """No final `executing null` (a fork of ComfyUI, a proxy that dropped it): the job ends at its
    `execution_success` all the same, and its place in ComfyUI, held until the prompt leaves, is
    freed once ComfyUI's queue no longer has it, instead of being held for good."""
    fake: FakeComfy = await make_fake()

    def without_the_last_word(text: str) -> str:
        message = orjson.loads(text)
        if message.get("type") == "executing" and message["data"].get("node") is None:
            return orjson.dumps({"type": "dropped", "data": {}}).decode()
        return text

    fake.rewrite = without_the_last_word
    client = await make_bridge(fake.url, job_idle_timeout=1.0, pipeline_depth=0)
    for name in ("first", "second", "third"):  # one place only: each waits for the one before to leave
        assert (await generate(client, name, SOLID))[0] == 200
    for name in ("first", "second", "third"):
        assert (await poll_status(client, name, {"closed", "error"}, timeout=30))["status"] == "closed"
    await wait_for(lambda: not client.app[SCHEDULER].backends[fake.url].inflight)


async def test_jobs_behind_a_cancelled_prompt_that_ignores_the_interrupt_move_off(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A job ends at its interrupt, but a node deaf to it keeps its prompt running: the job queued
    behind it on that ComfyUI moves to another, as behind any prompt that shows no progress."""
    held = await make_emulator()
    client = await make_bridge(held, job_idle_timeout=1.0, pipeline_depth=1)
    held.engine.faults.hang_after_nodes = 1  # a node deaf to interrupts
    assert (await generate(client, "a", SOLID))[0] == 200
    assert (await generate(client, "b", SOLID))[0] == 200
    scheduler = client.app[SCHEDULER]
    await wait_for(lambda: len(held.engine.started) == 1 and len(scheduler.backends[held.url].inflight) == 2)
    assert (await client.post("/interrupt", params={"clientId": "a"})).status == 200
    await poll_status(client, "a", {"error"})
    spare = await make_emulator()
    scheduler.set_backends([held.url, spare.url])
    assert (await poll_status(client, "b", {"closed", "error"}, timeout=15))["status"] == "closed"
    assert len(spare.engine.started) == 1
    held.engine.release_hang()


async def test_a_backend_in_doubt_after_a_stall_takes_one_prompt_at_a_time(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Back from a stall with nothing to show that its queue moves, a ComfyUI gets one prompt, not as
    many as pipelining would give it: the next job waits in the bridge until one starts there."""
    dead = await make_emulator()
    dead.engine.pause()
    client = await make_bridge(dead, job_idle_timeout=1.0, pipeline_depth=1)  # two in flight when trusted
    backend = client.app[SCHEDULER].backends[dead.url]
    assert (await generate(client, "first", SOLID))[0] == 200
    await wait_for(lambda: backend.doubt > 0 and dead.engine.queue_remaining == 1)  # taken back, sent again
    assert (await generate(client, "second", SOLID))[0] == 200  # a backend with room takes it as accepted
    assert [job.client_id for job in backend.inflight] == ["first"]
    dead.engine.resume()
    for name in ("first", "second"):
        assert (await poll_status(client, name, {"closed", "error"}))["status"] == "closed"
    assert backend.doubt == 0.0


async def test_an_upload_comfyui_refuses_fails_only_its_job_with_comfyuis_reason(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """ComfyUI answers `413` to an upload over its --max-upload-size (which counts the whole form, so
    a file just under the bridge's own max_upload_mb of the same 100 gets it too): the job fails
    with ComfyUI's reason, the file is not sent three times, and the backend is not rested (which
    would turn every other client away with 503)."""
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    await wait_for(lambda: backend_states(client) == ["up"])
    fake.replace(
        "POST /upload/image", 413, "Maximum request body size 104857600 exceeded.", times=5, content_type="text/plain"
    )
    status, stored = await upload(client, {"image": ("a.png", png())}, client_id="big")
    assert status == 200, stored
    status, answer = await generate(client, "big", {"workflow": "invert", "1/image": stored["image"]})
    assert status == 200, answer
    info = await poll_status(client, "big", {"closed", "error"}, timeout=30)
    assert info["status"] == "error"
    assert "(413): Maximum request body size 104857600 exceeded." in info["detail"], info["detail"]
    assert fake.seen.count("POST /upload/image") == 1
    backend = next(iter(client.app[SCHEDULER].backends.values()))
    assert (backend.submit_failures, backend.usable) == (0, True)
    assert (await run_one(client, "other"))["status"] == "closed"  # nobody else waits


async def test_a_prompt_deleted_from_comfyuis_queue_behind_other_users_work_is_sent_again(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Someone else deletes the bridge's queued prompt from a ComfyUI busy with other users' work
    (POST /queue {"delete": [...]}): while something runs there, the watchdog took the wait for a
    wait, for as long as other users kept ComfyUI busy. Now it sees the prompt gone from the queue
    and reconciles: the job is sent again and ends."""
    emulator = await make_emulator(pace=0.01)
    client = await make_bridge(emulator, job_idle_timeout=1.0)
    engine = emulator.engine
    other = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "other"}},
    }
    async with aiohttp.ClientSession() as session:

        async def post(body: dict[str, Any]) -> None:
            async with session.post(f"{emulator.url}/prompt", json=body) as resp:
                assert resp.status == 200

        engine.faults.hang_after_nodes = 0  # another user's prompt runs for a long time
        await post({"prompt": other, "client_id": "other-user"})
        await wait_for(lambda: engine.running_client() == "other-user")
        await post({"prompt": other, "client_id": "other-user"})  # and one more of theirs waits
        try:
            status, answer = await generate(client, "victim", SOLID)
            assert status == 200, answer
            core = client.app[SCHEDULER].core
            await wait_for(lambda: any(j.id == answer["job_id"] for j in core.by_prompt.values()), timeout=10)
            job = next(j for j in core.by_prompt.values() if j.id == answer["job_id"])
            lost = job.prompt_id
            await wait_for(lambda: any(i[1] == lost for i in engine.queue_snapshot()["queue_pending"]), timeout=10)
            async with session.post(f"{emulator.url}/queue", json={"delete": [lost]}) as resp:
                assert resp.status == 200
            await wait_for(lambda: job.prompt_id != lost, timeout=30)  # sent again under a new prompt id
        finally:
            engine.release_hang()
        info = await poll_status(client, "victim", {"closed", "error"}, timeout=30)
        assert info["status"] == "closed", info


@pytest.mark.parametrize("status", [429, 401])
async def test_a_proxys_answer_about_the_line_to_post_prompt_does_not_fail_the_job(
    make_fake: Any, make_bridge: BridgeFactory, status: int
) -> None:
    """A proxy's 401 or 429 before ComfyUI (or a 404/405: not a ComfyUI) is about the line, not
    the prompt: the hand-over is tried again, as for any backend trouble; only ComfyUI's own
    refusals (400, 413, ...) fail the job."""
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url)
    await wait_for(lambda: backend_states(client) == ["up"])
    fake.replace("POST /prompt", status, "Too Many Requests" if status == 429 else "Unauthorized",
                 content_type="text/plain")  # fmt: skip
    status_, answer = await generate(client, "line", SOLID)
    assert status_ == 200, answer
    info = await poll_status(client, "line", {"closed", "error"}, timeout=30)
    assert info["status"] == "closed", info["detail"]


async def test_a_healthy_socket_is_not_taken_for_deaf_while_its_connect_is_reconciled(
    make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames are read once `on_connect` (the reconcile) has returned: a prompt ComfyUI takes
    meanwhile (a hand-over answered across the reconnect) must not have its `status`, unread in
    the socket, taken for silence."""
    monkeypatch.setattr(comfy_client, "DEAF_AFTER", 0.5)
    emulator = await make_emulator(pace=0.0)
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "deaf"}},
    }
    connects = 0
    async with aiohttp.ClientSession() as session:
        comfy = comfy_client.ComfyClient(emulator.url, session, "bridge-probe")

        async def on_connect() -> None:
            nonlocal connects
            connects += 1
            if connects == 1:
                await comfy.submit(graph, str(uuid.uuid4()))  # ComfyUI takes it, and tells every socket
                await asyncio.sleep(1.5)  # the rest of a slow reconcile

        listening = asyncio.create_task(comfy.listen(lambda e, d: None, on_connect, lambda: None, asyncio.Event()))
        try:
            await wait_for(lambda: connects >= 1)
            await asyncio.sleep(3.0)
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
    assert connects == 1, [r.getMessage() for r in caplog.records if "heard nothing" in r.getMessage()]


PARTLY_REFUSED = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "good"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing-model.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bad"}},
}


async def test_a_prompt_comfyui_refuses_in_part_fails_with_its_reason_and_is_taken_back(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, workflow_dir: Path
) -> None:
    """A workflow with two outputs, one needing a checkpoint that is not there: ComfyUI answers 200
    with node_errors and would run the other output. The contract: ComfyUI's refusal (node_errors)
    reaches the client as an `error` with ComfyUI's text. It used to end `closed` with the good
    output's file alone; now the job fails with the node's reason, and its prompt, queued all the
    same, is taken back from ComfyUI (here it had started: it is interrupted, and keeps no output)."""
    (workflow_dir / "partial.json").write_bytes(orjson.dumps(PARTLY_REFUSED))
    emulator = await make_emulator(pace=1.0)  # what ComfyUI accepted starts at once, and takes seconds
    engine = emulator.engine
    client = await make_bridge(emulator)
    status, answer = await generate(client, "partial", {"workflow": "partial"})
    assert status == 200, answer
    info = await poll_status(client, "partial", {"closed", "error"}, timeout=30)
    assert info["status"] == "error", info
    assert "ComfyUI refused part of the prompt: node 4 (CheckpointLoaderSimple)" in info["detail"], info
    assert "missing-model.safetensors" in info["detail"], info
    await wait_for(lambda: engine.running_client() is None and engine.history, timeout=15)
    assert [entry.get("outputs") for entry in engine.history.values()] == [{}]


async def one_running_one_waiting(client: Client, engine: Any) -> dict[str, Any]:
    """A slow job of "runner" running in ComfyUI, and one of "victim" waiting behind it; the
    victim's answer."""
    status, first = await generate(client, "runner", {"workflow": "slow", "2/seed": 1})
    assert status == 200, first
    status, second = await generate(client, "victim", SOLID)
    assert status == 200, second
    await wait_for(lambda: len(engine.queue_snapshot()["queue_pending"]) == 1 and engine.running_client() is not None)
    return second


async def test_a_prompt_cleared_from_the_queue_behind_the_bridges_own_is_sent_again_not_stuck(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen on a real ComfyUI 0.3.64: someone clears its queue (`POST /queue {"clear": true}`) while it
    runs a prompt of the bridge's with the next one waiting behind it. ComfyUI finishes the first and
    goes idle. With no other user's work there, the watchdog took the idle ComfyUI for a dead worker
    after job_idle_timeout: "stuck", out of service, the job's wait counted as a lost run (a second
    clear would fail it). Now it asks first, finds the prompt gone, and sends it again."""
    emulator = await make_emulator(pace=0.3)
    client = await make_bridge(emulator, job_idle_timeout=1.0)
    core = client.app[SCHEDULER].core
    engine = emulator.engine
    second = await one_running_one_waiting(client, engine)
    job = next(j for j in core.by_prompt.values() if j.id == second["job_id"])
    async with aiohttp.ClientSession() as session, session.post(f"{emulator.url}/queue", json={"clear": True}) as resp:
        assert resp.status == 200
    info = await poll_status(client, "victim", {"closed", "error"}, timeout=30)
    assert info["status"] == "closed", info
    assert not [r.getMessage() for r in caplog.records if "is stuck" in r.getMessage()]
    assert job.retries == 0  # not a lost run: nothing of it ever ran


async def test_a_partly_refused_prompt_whose_accept_fails_is_taken_back(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, workflow_dir: Path
) -> None:
    """The job goes to an idle ComfyUI at once, while its accept record is written; ComfyUI answers
    200 with node_errors (it queued the prompt, to run the outputs it did not refuse); then the
    journal refuses the accept (503 to the client: "nothing of the job stays"). `Dispatcher.send`
    takes back a prompt of a refused accept only when the POST answered cleanly (`failure is None`)
    or not at all: a PartlyRefused, which ComfyUI *did* queue, is left to run there, for nobody."""
    (workflow_dir / "partial.json").write_bytes(orjson.dumps(PARTLY_REFUSED))
    emulator = await make_emulator(pace=0.5)  # what ComfyUI accepted takes seconds
    engine = emulator.engine
    client = await make_bridge(emulator)
    go = held_journal(client)
    refuse_next_accept(client)
    answer = asyncio.ensure_future(generate(client, "partial", {"workflow": "partial"}))
    await wait_for(lambda: engine.requests["POST /prompt"] == 1)
    await asyncio.sleep(0.2)  # its answer (200, node_errors) is back at the bridge
    go.set()
    status, body = await answer
    assert status == 503, body  # not accepted: nothing of the job may stay
    assert await (await client.get("/generation-count")).json() == 0
    # ComfyUI queued it all the same: it must be taken back, not run to its end for nobody.
    await wait_for(lambda: engine.running_client() is None and not engine.queue_snapshot()["queue_pending"], 20)
    outputs = [entry.get("outputs") for entry in engine.history.values()]
    assert all(not o for o in outputs), f"the refused job's prompt ran in ComfyUI: {outputs}"
    assert not client.app[SCHEDULER].core.by_prompt


async def test_a_job_whose_start_went_unheard_and_that_runs_silent_times_out(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every word of a prompt's run is lost (malformed on the way), and the prompt hangs in ComfyUI,
    silent. The job still looks queued; ComfyUI's queue shows its prompt running. It is stuck on
    that prompt: it fails with the contract's time-out after job_idle_timeout, not waited for ever
    as if it were behind someone's work."""
    emulator = await make_emulator()
    engine = emulator.engine
    engine.faults.hang_after_nodes = 0
    client = await make_bridge(emulator, job_idle_timeout=1.0)
    checked = comfy_client.shapes.event
    monkeypatch.setattr(
        comfy_client.shapes, "event", lambda kind, data: checked(kind, data) if kind == "status" else None
    )
    try:
        status, answer = await generate(client, "unheard", SOLID)
        assert status == 200, answer
        info = await poll_status(client, "unheard", {"closed", "error"}, timeout=30)
        assert info["status"] == "error", info
        assert info["detail"].startswith("time out error"), info
    finally:
        engine.release_hang()


async def test_a_frozen_comfyui_is_logged_as_silent_not_as_having_closed_its_socket(
    make_fake: Any, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A ComfyUI that freezes (a hung process, a paused VM) closes nothing: the bridge's heartbeat
    finds it out. The log said "closed its socket" next, sending an operator to look for a restart."""
    monkeypatch.setattr(comfy_client, "HEARTBEAT", 0.2)
    fake: FakeComfy = await make_fake()
    fake.pongs = False
    caplog.set_level(logging.INFO, logger="comfybridge")
    await make_bridge(fake.url)
    await wait_for(lambda: any("event socket failed" in r.getMessage() for r in caplog.records))
    assert not [r.getMessage() for r in caplog.records if "closed its socket" in r.getMessage()]


NOISE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
    "2": {
        "class_type": "ImageAddNoise",
        "inputs": {"image": ["1", 0], "seed": 1, "strength": 0},  # a FLOAT that "Save (API Format)" wrote as 0
        "_meta": {"apiinput": "strength"},
    },
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "noise"}},
}


async def test_input_limits_a_backend_failed_to_describe_once_are_learned_at_its_next_connect(
    make_fake: Any, make_bridge: BridgeFactory, workflow_dir: Path
) -> None:
    """README: the type of `cfg` written as 8 "is a float once a backend is connected", and min/max/
    choices are learned from /object_info/{class}; the code says an /object_info that cannot be read
    "is asked again at the next connect". A class whose route answered a passing 502 (a proxy in front
    of a ComfyUI that restarts) is never asked again: for the bridge's whole life, and in its
    /openapi.json, the FLOAT input stays an integer (0.5 refused with a 400) and has no limits."""
    (workflow_dir / "noise.json").write_bytes(orjson.dumps(NOISE))
    fake = await make_fake()
    fake.replace("GET /object_info/*", 502, "<html>502 Bad Gateway</html>", times=100, content_type="text/html")
    client = await make_bridge(fake.url)
    scheduler = client.app[SCHEDULER]
    await wait_for(lambda: [b["state"] for b in scheduler.health()["backends"]] == ["up"])
    fake.answers.clear()  # ComfyUI describes its nodes again
    await fake.drop_sockets()  # and the bridge connects to it anew
    await wait_for(lambda: [b["state"] for b in scheduler.health()["backends"]] == ["down"])
    await wait_for(lambda: [b["state"] for b in scheduler.health()["backends"]] == ["up"])
    status, answer = await generate(client, "noisy", {"workflow": "noise", "2/strength": 0.5})
    assert status == 200, answer
    doc = await (await client.get("/openapi.json")).json()
    assert doc["components"]["schemas"]["Generate_noise"]["properties"]["2/strength"]["type"] == "number"


@pytest.mark.parametrize("how", ["clear", "delete"])
async def test_a_bridge_prompt_removed_from_comfyui_queue_is_sent_again_when_comfyui_goes_idle(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, how: str
) -> None:
    """Real ComfyUI 0.3.64: another user clears the queue (`POST /queue {"clear": true}`) or deletes
    the bridge's pending prompt (`{"delete": [id]}`) while a prompt of the bridge's runs. ComfyUI
    tells every socket at once (`status` queue_remaining 1: only the running prompt is left), and
    again when that prompt ends (queue_remaining 0) while the bridge still counts its own prompt as
    queued there. The bridge ignores both and notices only after `job_idle_timeout` (60 s by default)
    of an idle ComfyUI: seen live, the GPU idled 60 s and the job waited 74 s for a 7 s run. The
    contract: "Each backend has a worker that keeps ComfyUI fed ..., so a GPU never idles while
    work waits". With a long job_idle_timeout (as for long video jobs) the victim waits that long."""
    emulator = await make_emulator(pace=0.3)
    client = await make_bridge(emulator, job_idle_timeout=300.0)
    core = client.app[SCHEDULER].core
    engine = emulator.engine
    second = await one_running_one_waiting(client, engine)
    victim = next(j for j in core.by_prompt.values() if j.id == second["job_id"])
    body = {"clear": True} if how == "clear" else {"delete": [victim.prompt_id]}
    async with aiohttp.ClientSession() as session, session.post(f"{emulator.url}/queue", json=body) as resp:
        assert resp.status == 200
    info = await poll_status(client, "runner", {"closed", "error"}, timeout=30)
    assert info["status"] == "closed", info
    # ComfyUI is idle now and has said so (queue_remaining 0); the victim's prompt is not there.
    # It must be sent again, not left until job_idle_timeout (300 s here) runs out.
    info = await poll_status(client, "victim", {"closed", "error"}, timeout=30)
    assert info["status"] == "closed", info


async def test_a_comfyui_back_within_backend_grace_is_found_before_its_jobs_move(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    tmp_path: Path,
    dialect: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real ComfyUI 0.3.64, `kill -9` then started again: it answered again about 8 s after the kill,
    within backend_grace (10 s), yet the bridge moved its jobs "down for 10s" and found it only at
    11.2 s. The event socket's reconnect backs off 0.2, 0.4, 0.8, 1.6, 3.2, then 5 s: after the try at
    6.2 s the next is at 11.2 s, past a 10 s grace, so a ComfyUI back between 6.2 s and 10 s (a
    usual restart time) is never seen within the grace. README: "If it is back within
    `backend_grace` seconds, the bridge reconciles every prompt it had there ... If not, its prompts
    move". Here: grace 5 s, the ComfyUI back after the bridge's 4th failed try (~3 s)."""
    caplog.set_level(logging.DEBUG, logger="comfybridge.comfy.client")
    home = await make_emulator(pace=0.2)
    client = await make_bridge(home, backend_grace=5.0)
    status, answer = await generate(client, "phoenix", {"workflow": "slow", "2/seed": 4})
    assert status == 200, answer
    await wait_for(lambda: len(home.engine.started) == 1)
    port = home.port
    await home.stop()

    def failed_tries() -> int:
        return sum("unreachable" in r.getMessage() and str(port) in r.getMessage() for r in caplog.records)

    await wait_for(lambda: failed_tries() >= 4, timeout=10)
    reborn = Emulator(root=tmp_path / "reborn", pace=0.01, port=port, dialect=dialect)
    await reborn.start()  # back ~3 s after it went, within the 5 s grace
    try:
        info = await poll_status(client, "phoenix", {"closed", "error"}, timeout=30)
        assert info["status"] == "closed", info
        moved = [r.getMessage() for r in caplog.records if "moving its jobs" in r.getMessage()]
        assert not moved, moved
        assert len(reborn.engine.started) == 1
    finally:
        await reborn.stop()


async def test_interrupt_answers_without_waiting_on_a_comfyui_that_does_not_answer(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """Real ComfyUI 0.3.64 frozen (SIGSTOP: an overloaded or swapping host) while a job of the client
    runs there. `POST /interrupt?clientId=` ended the job at once (the socket heard `error`
    "interrupted" within milliseconds), but the HTTP answer came only after 31 s: the bridge awaits
    its own `POST /queue {"delete"}` to ComfyUI for up to comfy_timeout (30 s), job after job (a
    client with jobs on such a backend waits comfy_timeout for each; behind nginx's default 60 s
    read time-out that is a 504). When the cancel fails the bridge already keeps the prompt to take
    back at the next connect, so nothing needs the client to wait. Here ComfyUI's `POST /queue` is
    held; the answer must not wait for it."""
    fake: FakeComfy = await make_fake(pace=0.3)
    engine = fake.upstream.engine
    client = await make_bridge(fake.url, comfy_timeout=30.0)
    status, answer = await generate(client, "quitter", {"workflow": "slow", "2/seed": 3})
    assert status == 200, answer
    await wait_for(lambda: engine.running_client() is not None)
    gate = fake.hold("POST /queue")
    try:
        task = asyncio.ensure_future(client.post("/interrupt", params={"clientId": "quitter"}))
        info = await poll_status(client, "quitter", {"closed", "error"})
        assert info["detail"] == "interrupted", info  # the job ended at once
        await wait_for(task.done, timeout=10)  # ... and so may the answer (it took comfy_timeout: 30 s)
        resp = task.result()
        assert resp.status == 200, await resp.text()
    finally:
        gate.set()


TWO_OUTPUTS = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "first"}},
    "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "second"}},
}


async def test_an_output_removed_from_comfyui_before_it_is_copied_ends_the_job_promptly(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, workflow_dir: Path
) -> None:
    """Real ComfyUI 0.3.64: a workflow saves an output, then runs on; someone (a cleanup script, an
    admin) removes that file from ComfyUI's output folder before the prompt ends. ComfyUI's
    `GET /view` answers 404 for it, which will not pass; yet the bridge tried it result_retries (8)
    times with doubling pauses (1+2+...+64 s): the client sat at `progress` 99.99% with no word for
    over two minutes (live: still 99.99% at 110 s), far past job_idle_timeout. The bridge's own rule
    (`Tracker.collect`): "a trouble that may pass (ComfyUI away, the disk full) is tried again ..., one
    that will not ... fails it at once"."""
    (workflow_dir / "two_outputs.json").write_bytes(orjson.dumps(TWO_OUTPUTS))
    emulator = await make_emulator(pace=0.4)
    client = await make_bridge(emulator, inline_result_kb=0)  # every output is copied at the end
    status, answer = await generate(client, "tidy", {"workflow": "two_outputs"})
    assert status == 200, answer

    def first_output() -> list[Path]:
        return list(emulator.engine.output_dir.rglob("first_*.png"))

    await wait_for(lambda: bool(first_output()), timeout=15)
    for path in first_output():
        path.unlink()
    info = await poll_status(client, "tidy", {"closed", "error"}, timeout=20)
    assert info["status"] == "error", info
    assert "404" in info["detail"] or "first" in info["detail"], info


async def test_a_404_for_an_output_from_something_that_is_not_comfyui_is_tried_again(
    make_fake: Any, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy in front of a ComfyUI that restarts may answer 404 for everything (an ingress's default
    backend): that 404 is no word of ComfyUI's that the output is gone, and is tried again. Only
    when ComfyUI itself answers (its /queue) is a 404 for an output final."""
    monkeypatch.setattr(tracking, "FIRST_RETRY", 0.05)
    fake: FakeComfy = await make_fake()
    client = await make_bridge(fake.url, inline_result_kb=0)
    page = "<html><body>404 default backend</body></html>"
    for route in ("GET /view", "GET /queue"):
        fake.replace(route, 404, page, times=3, content_type="text/html")
    status, answer = await generate(client, "behind-a-proxy", SOLID)
    assert status == 200, answer
    info = await poll_status(client, "behind-a-proxy", {"closed", "error"})
    assert info["status"] == "closed", info
