"""What the bridge really answers, held against what its own /openapi.json documents."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from jsonschema import Draft202012Validator

from comfybridge.edge import openapi
from comfybridge.edge.appkeys import JOURNAL, SCHEDULER, WORKFLOWS

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import TINY, Client, backends, bridge_process, fill, generate, post_job, slow_ends, small_disk, stored
from .test_relay import follower_of

SLOW = {"workflow": "slow", "2/seed": 1}
SOLID = {"workflow": "solid", "1/batch_size": 1}


def documented(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    responses: dict[str, Any] = doc["paths"][path][method.lower()]["responses"]
    return responses


def schema_errors(doc: dict[str, Any], schema: dict[str, Any], body: Any) -> list[str]:
    full = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "components": doc["components"]}
    return [f"{list(e.absolute_path)}: {e.message}" for e in Draft202012Validator(full).iter_errors(body)]


async def test_a_stuck_backend_in_health_and_ready_is_one_of_the_documented_states(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """README: /health shows each backend's state (`up`, `down`, `draining`, `resting`, `stuck` when
    its prompt shows no progress). The document's HEALTH schema lists only up/down/draining/resting,
    so a stuck backend's /health (and /ready's 503) break the document's own schema."""
    hung = await make_emulator(pace=0.05)
    hung.engine.faults.hang_after_nodes = 1
    client = await make_bridge(hung, job_idle_timeout=1.0)
    doc = await (await client.get("/openapi.json")).json()
    status, _ = await generate(client, "patient", SLOW)
    assert status == 200
    await wait_for(lambda: [b["state"] for b in client.app[SCHEDULER].health()["backends"]] == ["stuck"])
    try:
        for path in ("/health", "/ready"):
            resp = await client.get(path)
            response = documented(doc, "GET", path).get(str(resp.status))
            assert response is not None, (path, resp.status)
            schema = response["content"]["application/json"]["schema"]
            body = await resp.json()
            assert body["backends"][0]["state"] == "stuck"
            assert schema_errors(doc, schema, body) == [], (path, body)
    finally:
        hung.engine.release_hang()


async def test_a_metrics_refusal_for_a_key_limited_to_some_workflows_is_documented(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """GET /metrics with a key limited to some workflows is a 403; the document lists 200, 401, 429, 503."""
    full, limited = "full-key-0123456789abcdef", "limited-key-0123456789ab"
    key_file = tmp_path / "keys.json"
    key_file.write_bytes(orjson.dumps([{"name": "limited", "key": limited, "workflows": ["solid"]}]))
    client = await make_bridge(await make_emulator(), api_keys=(full,), api_keys_file=key_file)
    doc = await (await client.get("/openapi.json", headers={"X-API-Key": full})).json()
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {limited}"})
    assert resp.status == 403
    assert "403" in documented(doc, "GET", "/metrics"), list(documented(doc, "GET", "/metrics"))


async def test_the_routes_an_address_rate_limit_refuses_document_their_429(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """With ip_rate_limit on, every route (the probes and pages included) answers 429 with
    Retry-After once the address is over its rate; the document says 429 for most routes, but not
    for /health, /ready, /docs, /docs/, /playground and /playground/."""
    client = await make_bridge(await make_emulator(), ip_rate_limit=0.001, rate_burst=1)
    store = client.app[WORKFLOWS]
    # The document as /openapi.json serves it (asking the route would spend the address's one token).
    doc = orjson.loads(orjson.dumps(openapi.document(store, store.aliases())))
    assert (await client.get("/generation-count")).status == 200  # the address's one token
    undocumented = []
    for path in ("/health", "/ready", "/docs", "/docs/", "/playground", "/playground/"):
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 429, (path, resp.status)
        assert "Retry-After" in resp.headers
        if "429" not in documented(doc, "GET", path):
            undocumented.append(path)
    assert undocumented == []


async def test_a_body_with_a_webhook_the_bridge_accepts_is_valid_by_the_document(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """docs/API.md: with a webhook_secret, POST /generate-based-workflow accepts one more key,
    `_webhook`. The document's per-workflow schemas (additionalProperties: false) refuse it, so a
    client that builds or checks its request from /openapi.json cannot ask for a webhook."""
    client = await make_bridge(await make_emulator(), webhook_secret="whsec-probe", webhook_allow_private=True)
    doc = await (await client.get("/openapi.json")).json()
    body = {**SOLID, "_webhook": "http://127.0.0.1:9/hook"}
    status, answer = await generate(client, "hooked", body)
    assert status == 200, answer
    request_schema = documented_request(doc)
    assert schema_errors(doc, request_schema, body) == []


def documented_request(doc: dict[str, Any]) -> dict[str, Any]:
    post = doc["paths"]["/generate-based-workflow"]["post"]
    schema: dict[str, Any] = post["requestBody"]["content"]["application/json"]["schema"]
    return schema


async def test_an_interrupt_on_a_full_disk_answers_a_status_the_document_lists(
    workdir: Path, make_emulator: EmulatorFactory
) -> None:
    """README: an interrupt while the disk is full answers 507 (the jobs are stopped, their end not
    recorded). The document's POST /interrupt lists 200, 400, 401, 429, 503: no 507."""
    emulator = await make_emulator()
    emulator.engine.pause()
    with small_disk(workdir / "data", "4m") as data_dir:
        async with bridge_process(workdir, *backends(emulator)) as (_, url), aiohttp.ClientSession() as session:
            async with session.get(f"{url}/openapi.json") as resp:
                doc = await resp.json()
            await post_job(session, url, "x", TINY)
            filler = fill(data_dir)
            try:
                async with session.post(f"{url}/interrupt", params={"clientId": "x"}) as resp:
                    answered = resp.status
            finally:
                filler.unlink()
            assert answered == 507
            assert str(answered) in documented(doc, "POST", "/interrupt"), list(documented(doc, "POST", "/interrupt"))


async def test_a_waited_job_whose_result_file_was_lost_answers_a_status_the_document_lists(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """`?wait=1` hands results over as /history does, through the same delivery: a result file
    removed by other hands before it is sent is a 410 there too. The document's POST
    /generate-based-workflow lists 200, 204, 502, 400, 401, 403, 408, 413, 415, 417, 429, 503, 507:
    no 410."""
    client: Client = await make_bridge(await make_emulator(), inline_result_kb=0, storage="", s3_endpoint="")
    doc = await (await client.get("/openapi.json")).json()
    gate, held = slow_ends(client.app[JOURNAL])
    waiting = asyncio.ensure_future(
        client.post("/generate-based-workflow", params={"clientId": "lost", "wait": "1"}, json=SOLID)
    )
    await wait_for(lambda: bool(held))
    for path in stored(client, "results"):
        if held[0] in str(path):
            path.unlink()
    gate.set()
    resp = await waiting
    assert resp.status == 410, (resp.status, await resp.text())
    assert isinstance((await resp.json())["detail"], str)
    assert "410" in documented(doc, "POST", "/generate-based-workflow")


async def test_a_relayed_post_cut_off_after_reaching_the_leader_answers_a_status_the_document_lists(
    bridge: Client, aiohttp_client: Any
) -> None:
    """Cluster mode: a follower whose leader dies after a POST reached it answers 502 ("whether it
    was done is not known") for any POST it relays: /upload, /free and /interrupt too. The document
    lists 502 only for POST /generate-based-workflow (for a waited job's failure); docs/API.md
    mentions a relaying bridge's own 502 only there as well."""
    doc = await (await bridge.get("/openapi.json")).json()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request reached the leader, which then died
        writer.transport.abort()

    leader = await asyncio.start_server(swallow, "127.0.0.1", 0)
    follower, _ = await follower_of(aiohttp_client, f"http://127.0.0.1:{leader.sockets[0].getsockname()[1]}")
    undocumented = []
    try:
        form = aiohttp.FormData()
        form.add_field("file", b"\x89PNG", filename="a.png", content_type="image/png")
        for path, kwargs in (
            ("/upload", {"data": form}),
            ("/free", {}),
            ("/interrupt", {"params": {"clientId": "x"}}),
        ):
            resp = await follower.post(path, **kwargs)
            assert resp.status == 502, (path, resp.status)
            assert "whether it was done is not known" in (await resp.json())["detail"]
            if "502" not in documented(doc, "POST", path):
                undocumented.append(path)
    finally:
        leader.close()
        await leader.wait_closed()
    assert undocumented == []


async def test_the_thumbnail_token_the_bridge_takes_is_a_documented_parameter(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """With API keys on, GET /workflow-thumbnail takes the key as `?token=KEY` (an <img> sends no
    headers: the catalogue's thumbnail links are meant for one), as /ws does. The document describes
    `token` for /ws only, and neither the README nor docs/API.md mention it for thumbnails."""
    key = "thumb-key-0123456789abcdef"
    client = await make_bridge(await make_emulator(), api_keys=(key,))
    doc = await (await client.get("/openapi.json", headers={"X-API-Key": key})).json()
    resp = await client.get("/workflow-thumbnail", params={"workflow": "text-to-image", "token": key})
    assert resp.status == 200
    parameters = doc["paths"]["/workflow-thumbnail"]["get"]["parameters"]
    assert "token" in [parameter["name"] for parameter in parameters]
