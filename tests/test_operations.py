"""Operating the bridge: health and readiness, metrics, logs, the workflow catalogue."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from comfybridge.core.workflows import WorkflowStore
from comfybridge.edge.appkeys import JOURNAL, SCHEDULER
from comfybridge.edge.logs import redact
from comfybridge.errors import WorkflowConfigError

from .conftest import FIXTURES, BridgeFactory, EmulatorFactory, wait_for
from .helpers import (
    Client,
    backends,
    bridge_process,
    frames_until,
    generate,
    poll_status,
    post_job,
    run_job,
    wait_closed,
)

KEY = "ops-key-0123456789abcdef"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def get_json(client: Client, path: str, **headers: str) -> tuple[int, Any]:
    resp = await client.get(path, headers=headers)
    return resp.status, await resp.json()


async def test_health_and_ready_tell_the_truth(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, ready_max_queue=1, pipeline_depth=1)
    status, health = await get_json(client, "/health")
    assert (status, health["status"]) == (200, "ok")
    [backend] = health["backends"]
    assert (backend["url"], backend["state"], backend["in_flight"]) == (emulator.url, "up", 0)
    assert (await get_json(client, "/ready"))[0] == 200

    emulator.engine.pause()  # one prompt held in ComfyUI, one waiting behind it there, the rest here
    for index in range(4):
        await generate(client, f"deep{index}", {"workflow": "solid", "1/batch_size": 1})
    status, body = await get_json(client, "/ready")
    assert status == 503
    assert body["detail"] == "2 jobs wait, more than ready_max_queue (1)"
    assert (body["queued"], body["backends"][0]["in_flight"]) == (2, 2)
    emulator.engine.resume()
    await eventually(lambda: _status_is(client, "/ready", 200))

    await emulator.stop()
    await eventually(lambda: _backend_state_is(client, "down"))
    status, body = await get_json(client, "/ready")
    assert (status, body["detail"]) == (503, "no ComfyUI backend is usable")
    assert (await get_json(client, "/health"))[0] == 200  # the process still serves


async def test_probes_need_no_key_but_show_addresses_only_with_one(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator(), api_keys=(KEY,))
    status, anonymous = await get_json(client, "/health")
    assert status == 200
    assert anonymous["backends"] == [{"state": "up"}]
    assert (await get_json(client, "/ready"))[0] == 200
    _, keyed = await get_json(client, "/health", Authorization=f"Bearer {KEY}")
    assert keyed["backends"][0]["url"].startswith("http://127.0.0.1:")
    assert (await get_json(client, "/workflow-list"))[0] == 401  # everything else still needs the key


async def _status_is(client: Client, path: str, wanted: int) -> bool:
    return (await client.get(path)).status == wanted


async def _backend_state_is(client: Client, wanted: str) -> bool:
    _, body = await get_json(client, "/health")
    return bool(body["backends"][0]["state"] == wanted)


async def test_access_log_has_a_line_per_request_refusals_included(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="comfybridge.access")
    client = await make_bridge(await make_emulator())
    await run_job(client, "logged", {"workflow": "solid", "1/batch_size": 1})
    await client.get("/nope")
    await generate(client, "logged", {"workflow": "missing"})
    lines = [r for r in caplog.records if r.name == "comfybridge.access"]
    seen = {(r.fields["method"], r.fields["route"], r.fields["status"], r.fields["client_id"]) for r in lines}  # type: ignore[attr-defined]
    assert ("POST", "/generate-based-workflow", 200, "logged") in seen
    assert ("GET", "/ws", 101, "logged") in seen  # logged when the socket closed
    assert ("GET", "/nope", 404, None) in seen
    assert ("POST", "/generate-based-workflow", 400, "logged") in seen
    assert all(r.fields["duration_ms"] >= 0 and r.levelno == logging.INFO for r in lines)  # type: ignore[attr-defined]


async def test_json_logs_carry_job_fields_and_failures_are_warnings(tmp_path: Path) -> None:
    workdir = tmp_path
    shutil.copytree(FIXTURES / "workflows", workdir / "workflows")
    async with (
        bridge_process(workdir, "--emulate", "1", "--log-format", "json") as (_, url),
        aiohttp.ClientSession() as session,
    ):
        for body in ({"workflow": "solid", "1/batch_size": 1}, {"workflow": "broken"}):
            async with session.ws_connect(f"{url}/ws", params={"clientId": "json"}) as ws:
                async with session.post(f"{url}/generate-based-workflow", params={"clientId": "json"}, json=body):
                    pass
                async for msg in ws:
                    if orjson.loads(msg.data)["status"] in ("closed", "error"):
                        break
    lines = [orjson.loads(line) for line in (workdir / "bridge.log").read_text().splitlines() if line.startswith("{")]
    assert lines
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    ends = [line for line in lines if line.get("outcome")]
    done = next(line for line in ends if line["outcome"] == "done")
    assert done["level"] == "INFO"
    assert done["backend"].startswith("http://127.0.0.1:")
    assert {"job_id", "waited_s", "ran_s", "collected_s"} <= set(done)
    failed = next(line for line in ends if line["outcome"] == "failed")
    assert failed["level"] == "WARNING"
    assert any(line["logger"] == "comfybridge.access" and line["route"] == "/ws" for line in lines)


async def test_catalogue_serves_descriptions_thumbnails_and_inputs(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, workflow_dir: Path
) -> None:
    client = await make_bridge(await make_emulator())
    assert "text-to-image" in (await get_json(client, "/workflow-list"))[1]  # the contract's plain list stays
    status, catalogue = await get_json(client, "/workflow-list?detail=1")
    assert status == 200
    entry = next(e for e in catalogue if e["name"] == "text-to-image")
    assert entry["description"] == "SD 1.5 text to image"
    assert entry["thumbnail"] == "/workflow-thumbnail?workflow=text-to-image"
    assert entry["inputs"] == (await get_json(client, "/workflow-info?workflow=text-to-image"))[1]
    resp = await client.get(entry["thumbnail"])
    assert (resp.status, resp.content_type) == (200, "image/png")
    assert await resp.read() == (workflow_dir / "thumbnails" / "text-to-image.png").read_bytes()
    for asked in ("bytes=5-2", "garbage", "bytes=0-3"):  # a Range is ignored: the picture is small
        ranged = await client.get(entry["thumbnail"], headers={"Range": asked})
        assert (ranged.status, await ranged.read()) == (200, await resp.read()), asked
    assert next(e for e in catalogue if e["name"] == "solid")["thumbnail"] is None
    status, body = await get_json(client, "/workflow-thumbnail?workflow=solid")
    assert (status, body) == (404, {"detail": "Workflow 'solid' has no thumbnail."})
    _, document = await get_json(client, "/openapi.json")
    schema = document["components"]["schemas"]["Generate_text-to-image"]
    assert schema["x-thumbnail"] == entry["thumbnail"]


def test_a_thumbnail_outside_the_folder_or_not_a_picture_is_refused_at_load(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "workflows" / "b_emptyimage_save.json", tmp_path / "b.json")
    (tmp_path / "notes.txt").write_text("hello")
    for thumbnail, problem in (("../etc.png", "is not a file in"), ("notes.txt", "must be")):
        entry = {"alias": "b", "fn": "b.json", "thumbnail": thumbnail}
        (tmp_path / "workflow_alias.json").write_bytes(orjson.dumps([entry]))
        with pytest.raises(WorkflowConfigError, match=problem):
            WorkflowStore.load(tmp_path)


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, parsed by prometheus_client's own parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_jobs_backends_requests_and_commits(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    async with client.ws_connect("/ws", params={"clientId": "watcher"}):
        for body in ({"workflow": "solid", "1/batch_size": 1}, {"workflow": "solid", "1/batch_size": 1}):
            assert (await run_job(client, "metered", body))[-1]["status"] == "closed"
        assert (await run_job(client, "metered", {"workflow": "broken"}))[-1]["status"] == "error"
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        samples = scrape(await resp.text())
    backend = (("backend", emulator.url),)
    assert samples[("comfybridge_jobs_accepted_total", (("workflow", "solid"),))] == 2
    assert samples[("comfybridge_jobs_ended_total", (("outcome", "done"), ("workflow", "solid")))] == 2
    assert samples[("comfybridge_jobs_ended_total", (("outcome", "failed"), ("workflow", "broken")))] == 1
    assert samples[("comfybridge_job_run_seconds_count", (*backend, ("workflow", "solid")))] == 2
    assert samples[("comfybridge_job_wait_seconds_count", (*backend, ("workflow", "solid")))] == 2
    assert samples[("comfybridge_backend_busy_seconds_total", backend)] > 0
    assert samples[("comfybridge_backend_up", backend)] == 1
    assert samples[("comfybridge_backend_in_flight", backend)] == 0
    assert samples[("comfybridge_queue_depth", ())] == 0
    assert samples[("comfybridge_open_sockets", ())] == 1  # the watcher's
    route = (("method", "POST"), ("route", "/generate-based-workflow"), ("status", "200"))
    assert samples[("comfybridge_request_duration_seconds_count", route)] == 3
    # Two commits a job: its accept, which records its hand-over too (an idle backend took it at once), and its end.
    assert samples[("comfybridge_journal_commit_seconds_count", ())] == 3 * 2


async def test_a_job_is_counted_as_ended_once_its_end_is_recorded_not_before(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """An end the journal has not taken may be collected and ended again (a restart, a new leader):
    counted when it is durable, it is counted once."""
    client = await make_bridge(await make_emulator())
    journal = client.app[JOURNAL]
    record, asked, gate = journal.update, asyncio.Event(), asyncio.Event()

    def held(job_id: str, fields: dict[str, Any], delivery: dict[str, Any] | None = None) -> asyncio.Future[None]:
        if fields.get("state") != "done":
            return record(job_id, fields, delivery)
        asked.set()
        return asyncio.ensure_future(_after(gate, record(job_id, fields, delivery)))

    journal.update = held
    ended = ("comfybridge_jobs_ended_total", (("outcome", "done"), ("workflow", "solid")))
    status, _ = await generate(client, "held", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200
    await asyncio.wait_for(asked.wait(), 15)
    assert scrape(await (await client.get("/metrics")).text()).get(ended, 0) == 0
    gate.set()
    await poll_status(client, "held", {"closed"})
    assert scrape(await (await client.get("/metrics")).text())[ended] == 1


async def _after(gate: asyncio.Event, write: Awaitable[None]) -> None:
    await gate.wait()
    await write


async def test_metrics_behind_a_key(make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path) -> None:
    limited = "limited-key-0123456789"
    key_file = tmp_path / "keys.json"
    key_file.write_bytes(orjson.dumps([{"name": "limited", "key": limited, "workflows": ["solid"]}]))
    keyed = await make_bridge(await make_emulator(), api_keys=(KEY,), api_keys_file=key_file)
    assert (await keyed.get("/metrics")).status == 401
    assert (await keyed.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})).status == 200
    narrow = await keyed.get("/metrics", headers={"Authorization": f"Bearer {limited}"})
    assert narrow.status == 403  # the figures name every workflow, those it may not use too
    assert "not limited to some" in (await narrow.json())["detail"]
    scraper = await make_bridge(
        await make_emulator(), api_keys=(KEY,), metrics_key="scrape-token", data_dir=tmp_path / "scraper"
    )
    assert (await scraper.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})).status == 401
    resp = await scraper.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
    assert resp.status == 200
    assert "comfybridge_queue_depth" in await resp.text()


async def test_the_playground_is_served_with_its_files(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator(), api_keys=(KEY,))  # public even with keys on
    page = await client.get("/playground")
    assert (page.status, page.content_type) == (200, "text/html")
    assert 'src="playground/app.js"' in await page.text()
    for name, kind in (("app.js", "application/javascript"), ("style.css", "text/css")):
        resp = await client.get(f"/playground/{name}")
        assert (resp.status, resp.content_type) == (200, kind)
    whole = await (await client.get("/playground/app.js")).read()
    for asked in ("bytes=5-2", "garbage", "bytes=0-3"):  # a Range is ignored: the files are small
        for path in ("/playground", "/playground/app.js"):
            ranged = await client.get(path, headers={"Range": asked})
            assert ranged.status == 200, (path, asked)
        assert await ranged.read() == whole
    for missing in ("nope.js", "playground/app.js", "..%2F..%2Fapp.py"):
        resp = await client.get(f"/playground/{missing}")
        assert (resp.status, resp.content_type) == (404, "application/json"), missing
        assert (await resp.json())["detail"]
    for page_again in ("/playground/", "/playground/index.html"):  # where its relative links would not work
        moved = await client.get(page_again, allow_redirects=False)
        assert (moved.status, moved.headers["Location"]) == (301, "../playground"), page_again
    samples = scrape(await (await client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})).text())
    redirect = (("method", "GET"), ("route", "/playground/"), ("status", "301"))
    assert samples[("comfybridge_request_duration_seconds_count", redirect)] == 1  # counted as what it was


async def test_idle_gaps_are_measured_between_prompts_already_handed_over(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, pipeline_depth=1)
    emulator.engine.pause()  # both prompts are inside ComfyUI before the first one starts
    for name in ("gap-a", "gap-b"):
        await generate(client, name, {"workflow": "solid", "1/batch_size": 1})
    await eventually(lambda: _in_flight_is(client, 2))
    emulator.engine.resume()
    for name in ("gap-a", "gap-b"):
        await eventually(lambda name=name: _status_is_closed(client, name))
    samples = scrape(await (await client.get("/metrics")).text())
    assert samples[("comfybridge_backend_idle_gap_seconds_count", (("backend", emulator.url),))] == 1


async def _in_flight_is(client: Client, count: int) -> bool:
    _, body = await get_json(client, "/health")
    return bool(body["backends"][0]["in_flight"] == count)


async def _status_is_closed(client: Client, client_id: str) -> bool:
    _, body = await get_json(client, f"/execution-info?clientId={client_id}")
    return bool(body["status"] == "closed")


async def test_a_backend_address_with_a_password_or_token_shows_neither(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    url = f"http://admin:hunter2pass@127.0.0.1:{emulator.port}/?token=s3cret-token"
    client = await make_bridge(url)
    await wait_for(lambda: client.app[SCHEDULER].health()["usable_backends"] == 1)
    for path in ("/health", "/metrics"):
        text = await (await client.get(path)).text()
        assert "hunter2pass" not in text
        assert "s3cret-token" not in text
        assert f"admin@127.0.0.1:{emulator.port}" in text
    assert redact(f"connected to ComfyUI {url}") == (
        f"connected to ComfyUI http://admin:[redacted]@127.0.0.1:{emulator.port}/?token=[redacted]"
    )


async def test_a_job_run_again_after_failover_is_one_wait(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """`comfybridge_job_wait_seconds`, "from acceptance to the start inside ComfyUI", took a sample at
    each start: a job run again on another backend counted as two waits, the second one long."""
    first, second = await make_emulator(pace=0.3), await make_emulator(pace=0.3)
    client = await make_bridge(first, backend_grace=0.1)
    async with client.ws_connect("/ws", params={"clientId": "moved"}) as ws:
        status, _ = await generate(client, "moved", {"workflow": "slow", "2/seed": 5})
        assert status == 200
        await frames_until(ws, "progress")  # it runs on the first
        client.app[SCHEDULER].set_backends([first.url, second.url])
        await first.stop()
        assert (await frames_until(ws, {"closed", "error"}, timeout=30))[-1]["status"] == "closed"
    assert len(second.engine.started) == 1  # it ran again there
    samples = scrape(await (await client.get("/metrics")).text())
    waits = [value for (name, _), value in samples.items() if name == "comfybridge_job_wait_seconds_count"]
    assert sum(waits) == 1


@pytest.mark.parametrize("finished_meanwhile", [True, False])
async def test_a_job_adopted_after_a_restart_states_no_wait_or_run_it_does_not_know(
    workdir: Path, make_emulator: EmulatorFactory, finished_meanwhile: bool
) -> None:
    """A job that started inside ComfyUI before the bridge was killed: the next process does not know
    when. Its end's log line said it waited from its accept to the restart (the run counted as a
    wait), its run time (log, `comfybridge_job_run_seconds`, the planner) was counted from the
    adoption: what is not known is now left out."""
    emulator = await make_emulator(pace=1.0)  # `slow`: several seconds
    flags = (*backends(emulator), "--log-format", "json")
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *flags) as (proc, url):
            job_id = await post_job(session, url, "adopted", {"workflow": "slow", "2/seed": 4})
            await wait_for(lambda: len(emulator.engine.started) == 1)
            proc.kill()
        if finished_meanwhile:
            await wait_for(lambda: len(emulator.engine.history) == 1, timeout=30)
        async with bridge_process(workdir, *flags) as (proc, url):
            await wait_closed(session, url, ["adopted"])
            samples = scrape(await (await session.get(f"{url}/metrics")).text())
    lines = (workdir / "bridge.log").read_text().splitlines()
    records = [orjson.loads(line) for line in lines if line.startswith("{")]
    ends = [r for r in records if r.get("job_id") == job_id and "outcome" in r]
    assert [r["outcome"] for r in ends] == ["done"]
    assert "waited_s" not in ends[0]
    assert "ran_s" not in ends[0]
    runs = [value for (name, _), value in samples.items() if name == "comfybridge_job_run_seconds_count"]
    assert sum(runs) == 0


async def test_a_backend_down_shows_no_comfyui_queue_it_cannot_know(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """/health kept a dead ComfyUI's last queue length (1 long after it died)."""
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    emulator.engine.pause()
    for index in range(2):
        assert (await generate(client, f"q{index}", {"workflow": "solid", "1/batch_size": 1}))[0] == 200

    async def backend() -> dict[str, Any]:
        return dict((await (await client.get("/health")).json())["backends"][0])

    async with asyncio.timeout(10):
        while (await backend())["comfyui_queue"] < 1:
            await asyncio.sleep(0.02)
    await emulator.stop()
    async with asyncio.timeout(10):
        while (now := await backend())["state"] != "down":
            await asyncio.sleep(0.02)
    assert now["comfyui_queue"] == 0


async def test_a_job_that_waited_out_a_stalled_queue_has_its_first_start_observed(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A job taken back from a stalled ComfyUI queue counts as a lost run though it never started:
    its real first start, after the longest of waits, must still be the wait observed."""
    dead = await make_emulator()
    dead.engine.pause()
    client = await make_bridge(dead, job_idle_timeout=1.0)
    backend = client.app[SCHEDULER].backends[dead.url]
    assert (await generate(client, "stalled", {"workflow": "solid", "1/width": 8}))[0] == 200
    await wait_for(lambda: backend.doubt > 0 and dead.engine.queue_remaining == 1, 30)  # taken back, sent again
    dead.engine.resume()
    assert (await poll_status(client, "stalled", {"closed", "error"}, timeout=30))["status"] == "closed"
    assert len(dead.engine.started) == 1  # it started once, ever
    samples = scrape(await (await client.get("/metrics")).text())
    assert sum(v for (name, _), v in samples.items() if name == "comfybridge_job_wait_seconds_count") == 1
