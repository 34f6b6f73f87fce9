"""`POST /generate-based-workflow?wait=1`: one request for the whole job, answered with its results
once its end is durable; the socket, /execution-info and /history still behave as with any job."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from comfybridge.edge.appkeys import SCHEDULER
from comfybridge.errors import StorageFull

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import frames_until, generate, poll_status, read_results

Client = TestClient[web.Request, web.Application]
SOLID = {"workflow": "solid", "1/width": 16, "1/height": 16, "1/batch_size": 1}
GENERATE = "/generate-based-workflow"


async def count(client: Client) -> int:
    return int(await (await client.get("/generation-count")).json())


async def test_the_answer_is_the_jobs_results_which_count_as_fetched(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator())
    async with client.ws_connect("/ws", params={"clientId": "sync"}) as ws:
        resp = await client.post(GENERATE, params={"clientId": "sync", "wait": "1"}, json=SOLID)
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "multipart/form-data"
        parts = await read_results(resp)
        frames = await frames_until(ws, "closed")  # the socket heard of it as of any job
        assert (await client.get("/history", params={"clientId": "sync"})).status == 204  # handed over already
        assert (await (await client.get("/execution-info", params={"clientId": "sync"})).json())["status"] == "closed"
    assert [(name, kind) for name, _, kind, _ in parts] == [("result_0", "image/png")]
    assert parts[0][3].startswith(b"\x89PNG")
    job_id = frames[-1]["job_id"]
    assert job_id in parts[0][1]  # its own file
    # Its results fetched and its socket gone: nothing keeps the clientId known (the contract).
    await wait_for(lambda: client.app[SCHEDULER].clients.get("sync") is None)
    assert await count(client) == 1


async def test_base64_and_only_the_awaited_jobs_results(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator())
    async with client.ws_connect("/ws", params={"clientId": "both"}) as ws:
        status, first = await generate(client, "both", dict(SOLID, **{"1/width": 24}))
        assert status == 200
        await frames_until(ws, "closed")
        resp = await client.post(GENERATE, params={"clientId": "both", "wait": "true", "resType": "base64"}, json=SOLID)
        assert resp.status == 200, await resp.text()
        answer = orjson.loads(await resp.read())
    (item,) = answer["files"]
    assert item["job_id"] != first["job_id"]
    assert base64.b64decode(item["content"]).startswith(b"\x89PNG")
    # The earlier job's results were not its to take: they are still there for /history.
    left = await read_results(await client.get("/history", params={"clientId": "both"}))
    assert [first["job_id"] in filename for _, filename, _, _ in left] == [True]


async def test_a_failed_job_answers_502_with_its_error(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    emulator.engine.faults.runtime_error = 1
    resp = await client.post(GENERATE, params={"clientId": "sad", "wait": "1"}, json=SOLID)
    assert resp.status == 502
    answer = await resp.json()
    assert answer["status"] == "error"
    assert answer["job_id"]
    info = await (await client.get("/execution-info", params={"clientId": "sad"})).json()
    assert answer["detail"] == info["detail"]  # what the socket and /execution-info say


async def test_bad_wait_or_res_type_accepts_nothing(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, storage: dict[str, str]
) -> None:
    client = await make_bridge(await make_emulator())
    bad = [{"wait": "yes"}, {"wait": "1", "resType": "zip"}, {"resType": "zip"}]
    if not storage:  # links need object storage
        bad.append({"wait": "1", "resType": "url"})
    for params in bad:
        resp = await client.post(GENERATE, params={"clientId": "typo", **params}, json=SOLID)
        assert resp.status == 400, params
        assert (await resp.json())["detail"]
    assert await count(client) == 0


@pytest.mark.parametrize("res_type", ["", "url"])
async def test_a_caller_that_hangs_up_loses_nothing(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, storage: dict[str, str], res_type: str
) -> None:
    if res_type == "url" and not storage:
        pytest.skip("results as links need object storage: the S3 pass of `make test` runs this")
    emulator = await make_emulator()
    emulator.engine.faults.hang_after_nodes = 2  # every node has run; how it ended is not said yet
    client = await make_bridge(emulator)
    url = str(client.make_url(GENERATE))
    params = {"clientId": "gone", "wait": "1", "resType": res_type}
    async with aiohttp.ClientSession() as session:
        call = asyncio.ensure_future(session.post(url, params=params, json=SOLID))
        await wait_for(lambda: emulator.engine.requests["POST /prompt"] == 1)
        call.cancel()  # the caller hangs up while its job runs
    emulator.engine.release_hang()
    await poll_status(client, "gone", {"closed"})
    parts = await read_results(await client.get("/history", params={"clientId": "gone"}))
    assert len(parts) == 1
    assert parts[0][3].startswith(b"\x89PNG")


async def test_links_when_results_are_in_object_storage(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, storage: dict[str, str]
) -> None:
    if not storage:
        pytest.skip("results as links need object storage: the S3 pass of `make test` runs this")
    client = await make_bridge(await make_emulator())
    resp = await client.post(GENERATE, params={"clientId": "linked", "wait": "1", "resType": "url"}, json=SOLID)
    assert resp.status == 200, await resp.text()
    (item,) = (await resp.json())["files"]
    async with aiohttp.ClientSession() as session, session.get(item["url"]) as got:
        assert got.status == 200
        assert (await got.read()).startswith(b"\x89PNG")
    assert (await client.get("/history", params={"clientId": "linked"})).status == 204


async def test_a_job_without_output_files_is_a_204_and_leaves_nothing_behind(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, workflow_dir: Path
) -> None:
    (workflow_dir / "preview_only.json").write_bytes(
        orjson.dumps(
            {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            }
        )
    )
    aliases = orjson.loads((workflow_dir / "workflow_alias.json").read_bytes())
    aliases.append({"alias": "preview-only", "fn": "preview_only.json", "inputs": ["1/width"]})
    (workflow_dir / "workflow_alias.json").write_bytes(orjson.dumps(aliases))
    client = await make_bridge(await make_emulator())
    resp = await client.post(GENERATE, params={"clientId": "bare", "wait": "1"}, json={"workflow": "preview-only"})
    assert resp.status == 204
    assert "no results" in resp.headers["X-Detail"]
    after = await client.get("/history", params={"clientId": "bare"})
    assert after.status == 204  # not an empty multipart answer later


async def test_a_stop_answers_a_request_whose_jobs_end_is_still_being_written(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """The job has left its client's jobs while its end is written (here: never, a full disk); a
    stop must answer its request all the same."""
    client = await make_bridge(await make_emulator())
    scheduler = client.app[SCHEDULER]
    journal = scheduler.core.journal
    write = journal.update
    refused: list[str] = []

    def update(job_id: str, fields: dict[str, Any], delivery: Any = None) -> asyncio.Future[None]:
        if fields.get("state") not in ("done", "failed", "cancelled"):
            return write(job_id, fields, delivery)
        refused.append(job_id)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_exception(StorageFull("the bridge's disk is full"))
        return future

    journal.update = update  # type: ignore[method-assign]
    call = asyncio.ensure_future(client.post(GENERATE, params={"clientId": "w", "wait": "1"}, json=SOLID))
    await wait_for(lambda: bool(refused))
    scheduler.stop_waiting()  # what a SIGTERM does first
    async with asyncio.timeout(30):  # unanswered, it would wait forever
        resp = await call
    assert resp.status == 503
    assert "stays journaled" in (await resp.json())["detail"]
