"""Every REST endpoint of the contract, through real HTTP, against the ComfyUI emulator."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from pathlib import Path

import orjson
import pytest

from comfybridge.edge import openapi
from comfybridge.edge.appkeys import RESULTS, STATE, WORKFLOWS
from comfybridge.emulator import Emulator
from comfybridge.emulator.png import png_size
from comfybridge.store.results import ResultFile

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import TINY, Client, generate, png, poll_status, read_results, run_job, seed, upload

ALIASES = ["bad_ckpt", "broken", "image-to-image", "invert", "size-preview", "slow", "solid", "text-to-image"]

pytestmark = pytest.mark.both_dialects  # every test here runs against both ComfyUI dialects


# /workflow-list, /workflow-info ------------------------------------------------------------------
async def test_workflow_list_is_every_alias_sorted(bridge: Client) -> None:
    resp = await bridge.get("/workflow-list")
    assert resp.status == 200
    assert await resp.json() == ALIASES


async def test_unaliased_file_is_listed_under_its_stem(
    make_bridge: BridgeFactory, emulator: Emulator, workflow_dir: Path
) -> None:
    (workflow_dir / "extra_flow.json").write_bytes((workflow_dir / "b_emptyimage_save.json").read_bytes())
    client = await make_bridge(emulator)
    assert await (await client.get("/workflow-list")).json() == sorted([*ALIASES, "extra_flow"])


async def test_workflow_info_from_markers_with_object_info_limits(bridge: Client) -> None:
    resp = await bridge.get("/workflow-info", params={"workflow": "text-to-image"})
    assert resp.status == 200
    info = await resp.json()
    assert list(info) == ["3/seed", "3/steps", "5/width", "5/height", "5/batch_size", "6/text"]
    assert info["6/text"] == {
        "type": "str",
        "title": "CLIP Text Encode (Prompt)",
        "class": "CLIPTextEncode",
        "default": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
        "description": "The text to be encoded.",
    }
    assert info["3/steps"]["type"] == "int"
    assert (info["3/steps"]["min"], info["3/steps"]["max"], info["3/steps"]["default"]) == (1, 10000, 20)


async def test_the_catalogue_and_openapi_are_built_once_and_again_when_limits_are_learned(
    bridge: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Describing every workflow costs tens of ms with thousands of them: /openapi.json and the
    catalogue are built once, and built again once a backend tells new limits (a reconnect)."""
    built: list[int] = []
    document = openapi.document
    monkeypatch.setattr(openapi, "document", lambda *args: built.append(1) or document(*args))

    async def steps_max() -> tuple[int, int]:
        spec = await (await bridge.get("/openapi.json")).json()
        catalogue = await (await bridge.get("/workflow-list", params={"detail": "1"})).json()
        entry = next(e for e in catalogue if e["name"] == "text-to-image")
        return spec["components"]["schemas"]["Generate_text-to-image"]["properties"]["3/steps"]["maximum"], entry[
            "inputs"
        ]["3/steps"]["max"]

    assert await steps_max() == (10000, 10000)
    assert await steps_max() == (10000, 10000)
    assert len(built) == 1
    bridge.app[WORKFLOWS].apply_object_info({"KSampler": {"input": {"required": {"steps": ["INT", {"max": 50}]}}}})
    assert await steps_max() == (50, 50)
    assert len(built) == 2


async def test_workflow_info_from_alias_inputs_marks_uploads(bridge: Client) -> None:
    info = await (await bridge.get("/workflow-info", params={"workflow": "invert"})).json()
    assert info == {
        "1/image": {"type": "str", "title": "LoadImage", "class": "LoadImage", "default": "test.png", "upload": "image"}
    }
    slow = await (await bridge.get("/workflow-info", params={"workflow": "slow"})).json()
    assert slow["3/upscale_method"]["choices"] == ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    assert slow["2/seed"]["type"] == "int"


async def test_workflow_info_unknown_or_missing_alias_is_400(bridge: Client) -> None:
    resp = await bridge.get("/workflow-info", params={"workflow": "nope"})
    assert resp.status == 400
    assert (await resp.json())["detail"].startswith("Unknown workflow 'nope'. Available workflows: bad_ckpt, broken")
    resp = await bridge.get("/workflow-info")
    assert resp.status == 400
    assert "'workflow' field is required" in (await resp.json())["detail"]


# /generate-based-workflow and /history -----------------------------------------------------------
async def test_generate_then_history_returns_the_patched_images(bridge: Client) -> None:
    frames = await run_job(bridge, "c1", {"workflow": "solid", "1/width": 40, "1/height": 24, "1/batch_size": 2})
    assert seed(frames[-1]) == {"status": "closed", "detail": "Execution is done", "details": "Execution is done"}
    resp = await bridge.get("/history", params={"clientId": "c1"})
    assert resp.status == 200
    assert resp.content_type == "multipart/form-data"
    parts = await read_results(resp)
    job_id = frames[-1]["job_id"]  # each file's name carries the job it belongs to
    assert [(p[0], p[1], p[2]) for p in parts] == [
        ("result_0", f"wf_b_empty_{job_id}_00001_.png", "image/png"),
        ("result_1", f"wf_b_empty_{job_id}_00002_.png", "image/png"),
    ]
    assert [png_size(p[3]) for p in parts] == [(40, 24), (40, 24)]


async def test_each_job_gets_its_own_copy_of_the_workflow(bridge: Client, workflow_dir: Path) -> None:
    before = (workflow_dir / "b_emptyimage_save.json").read_bytes()
    await run_job(bridge, "copy", {"workflow": "solid", "1/width": 16, "1/batch_size": 1})
    await run_job(bridge, "copy", {"workflow": "solid", "1/batch_size": 1})
    parts = await read_results(await bridge.get("/history", params={"clientId": "copy"}))
    assert [png_size(p[3]) for p in parts] == [(16, 384), (512, 384)]
    assert (workflow_dir / "b_emptyimage_save.json").read_bytes() == before


async def test_history_in_job_order_then_forgets(bridge: Client) -> None:
    await run_job(bridge, "order", {"workflow": "solid", "1/width": 10, "1/batch_size": 2})
    await run_job(bridge, "order", {"workflow": "solid", "1/width": 20, "1/batch_size": 1})
    parts = await read_results(await bridge.get("/history", params={"clientId": "order"}))
    assert [p[0] for p in parts] == ["result_0", "result_1", "result_2"]
    assert [png_size(p[3])[0] for p in parts if png_size(p[3])] == [10, 10, 20]
    again = await bridge.get("/history", params={"clientId": "order"})
    assert again.status == 204
    assert again.headers["X-Detail"] == (
        "The client ID has not been submitted to the server before. It is not recognized. / order"
    )


async def test_history_base64(bridge: Client) -> None:
    frames = await run_job(bridge, "b64", {"workflow": "solid", "1/width": 8, "1/height": 8, "1/batch_size": 1})
    resp = await bridge.get("/history", params={"clientId": "b64", "resType": "base64"})
    assert resp.status == 200
    body = await resp.json()
    name = f"wf_b_empty_{frames[-1]['job_id']}_00001_.png"
    assert [(f["file_name"], f["content_type"]) for f in body["files"]] == [(name, "image/png")]
    assert png_size(base64.b64decode(body["files"][0]["content"])) == (8, 8)


async def test_history_unknown_res_type_is_400_and_keeps_the_results(bridge: Client) -> None:
    await run_job(bridge, "typo", {"workflow": "solid", "1/width": 8, "1/height": 8, "1/batch_size": 1})
    for res_type in ("xml", "BASE64", "base64 ", "multipart"):
        resp = await bridge.get("/history", params={"clientId": "typo", "resType": res_type})
        assert resp.status == 400, res_type
        assert "resType must be base64 or url" in (await resp.json())["detail"]
    resp = await bridge.get("/history", params={"clientId": "typo", "resType": ""})  # empty: the default
    assert (resp.status, resp.content_type) == (200, "multipart/form-data")
    assert len(await read_results(resp)) == 1


async def test_history_204_texts(bridge: Client) -> None:
    resp = await bridge.get("/history", params={"clientId": "never-seen"})
    assert resp.status == 204
    assert resp.headers["X-Detail"].endswith("It is not recognized. / never-seen")
    assert await resp.read() == b""
    async with bridge.ws_connect("/ws", params={"clientId": "known"}):
        resp = await bridge.get("/history", params={"clientId": "known"})
        assert resp.status == 204
        assert resp.headers["X-Detail"] == "No contents with that client id / known"


async def make_big(bridge: Client, client_id: str) -> int:
    """Grow a stored result past what socket buffers hold, so a response is surely mid-way for a while."""
    store = bridge.app[RESULTS]
    (result,) = store.claim(client_id)
    store.release([result])
    small = result.files[0]
    writer = store.blobs.writer(small.key)
    await writer.write(png() + b"\0" * (40 * 1024 * 1024))
    size = await writer.commit()
    result.files[0] = ResultFile(small.file_name, small.key, small.content_type, size)
    return size


async def test_history_kept_when_download_breaks_off(bridge: Client, caplog: pytest.LogCaptureFixture) -> None:
    await run_job(bridge, "big", {"workflow": "solid", "1/width": 8, "1/batch_size": 1})
    size = await make_big(bridge, "big")
    resp = await bridge.get("/history", params={"clientId": "big"})
    assert resp.status == 200
    await resp.content.read(1024)
    resp.close()  # the client goes away mid-download
    async with asyncio.timeout(10):
        # 409 ("being fetched") only until the bridge has seen the broken download end and released them.
        while (full := await bridge.get("/history", params={"clientId": "big"})).status == 409:
            await asyncio.sleep(0.01)
    assert full.status == 200
    parts = await read_results(full)
    assert len(parts[0][3]) == size
    assert (await bridge.get("/history", params={"clientId": "big"})).status == 204
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a client going away is no error


async def test_generate_place_in_line(make_emulator: object, make_bridge: BridgeFactory) -> None:
    slow = await make_emulator(pace=0.2)  # type: ignore[operator]
    client = await make_bridge(slow)
    places = []
    for _ in range(3):
        status, body = await generate(client, "line", {"workflow": "solid", "1/batch_size": 1})
        assert status == 200
        places.append(body["detail"])
    assert places == ["queued / 1", "queued / 2", "queued / 3"]
    await client.post("/interrupt", params={"clientId": "line"})


async def test_generate_bad_inputs_are_400_and_change_nothing(bridge: Client) -> None:
    cases = [
        ({"1/width": 8}, "The 'workflow' field is required"),
        ({"workflow": "nope"}, "Unknown workflow 'nope'"),
        (
            {"workflow": "solid", "9/x": 1},
            "Unknown input '9/x' for workflow 'solid'. Allowed inputs: 1/width, 1/height",
        ),
        ({"workflow": "solid", "1/width": True}, "Input '1/width' must be an int, got bool."),
        ({"workflow": "solid", "1/width": 1.5}, "Input '1/width' must be an int, got float."),
        ({"workflow": "solid", "1/width": float(2**53 + 2)}, "Input '1/width' must be an int, got float."),
        ({"workflow": "solid", "1/width": "8"}, "Input '1/width' must be an int, got str."),
        (
            {"workflow": "solid", "1/width": 2**64},
            "Input '1/width' must be an int, got a whole number over 64 bits.",
        ),
        ({"workflow": "solid", "1/width": 0}, "Input '1/width' must be at least 1, got 0."),
        ({"workflow": "solid", "1/color": 16777216}, "Input '1/color' must be at most 16777215"),
        ({"workflow": "text-to-image", "6/text": 5}, "Input '6/text' must be a str, got int."),
        ({"workflow": "slow", "3/upscale_method": "magic"}, "Input '3/upscale_method' must be one of: nearest-exact"),
        ({"workflow": "invert", "1/image": "nothere.png"}, "Input '1/image' names no uploaded file: 'nothere.png'"),
    ]
    for body, detail in cases:
        status, answer = await generate(bridge, "bad", body)
        assert status == 400, body
        assert answer["detail"].startswith(detail), answer
    for raw, start in ((b"not json", "The body is not valid JSON"), (b"[1, 2]", "The body must be a JSON object")):
        json_type = {"Content-Type": "application/json"}
        resp = await bridge.post("/generate-based-workflow", params={"clientId": "bad"}, data=raw, headers=json_type)
        assert resp.status == 400
        assert (await resp.json())["detail"].startswith(start)
    # JSON sent as a form or as text/plain (what a web page may send without a CORS preflight): 415.
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {}
        body = b'{"workflow": "solid"}'
        resp = await bridge.post("/generate-based-workflow", params={"clientId": "bad"}, data=body, headers=headers)
        assert resp.status == 415, kind
        assert await resp.json() == {"detail": 'Send the body as JSON, with "Content-Type: application/json".'}
    assert await (await bridge.get("/generation-count")).json() == 0
    assert (await bridge.get("/execution-info", params={"clientId": "bad"})).status == 400


async def test_float_input_accepts_int(bridge: Client) -> None:
    status, body = await generate(bridge, "f", {"workflow": "image-to-image", "3/denoise": 1})
    assert (status, body["detail"], len(body["job_id"])) == (200, "queued / 1", 32)


async def test_client_id_is_checked_everywhere(bridge: Client) -> None:
    for method, path in [
        ("POST", "/generate-based-workflow"),
        ("GET", "/history"),
        ("GET", "/execution-info"),
        ("POST", "/interrupt"),
        ("GET", "/ws"),
    ]:
        for params in ({}, {"clientId": "bad id!"}, {"clientId": "x" * 129}):
            resp = await bridge.request(method, path, params=params, json={"workflow": "solid"})
            assert resp.status == 400, (path, params)
            assert "clientId" in (await resp.json())["detail"]
    for method, path in [("POST", "/upload"), ("POST", "/free")]:
        resp = await bridge.request(method, path, params={"clientId": "a/b"})
        assert resp.status == 400


async def test_uploaded_file_feeds_a_file_input(bridge: Client) -> None:
    status, names = await upload(bridge, {"photo": ("my photo.png", png(30, 20))}, client_id="up")
    assert status == 200
    assert re.fullmatch(r"[0-9a-f]{12}-my_photo\.png", names["photo"])
    frames = await run_job(bridge, "up", {"workflow": "invert", "1/image": names["photo"]})
    assert frames[-1]["status"] == "closed"
    parts = await read_results(await bridge.get("/history", params={"clientId": "up"}))
    assert png_size(parts[0][3]) == (30, 20)


async def test_upload_of_another_client_is_not_usable(bridge: Client) -> None:
    _, names = await upload(bridge, {"file": ("a.png", png())}, client_id="owner")
    status, body = await generate(bridge, "thief", {"workflow": "invert", "1/image": names["file"]})
    assert status == 400
    assert "names no uploaded file" in body["detail"]
    _, shared = await upload(bridge, {"file": ("a.png", png())})
    status, _ = await generate(bridge, "anyone", {"workflow": "invert", "1/image": shared["file"]})
    assert status == 200


# /execution-info, /generation-count ------------------------------------------------------------
async def test_execution_info_follows_the_job(bridge: Client) -> None:
    resp = await bridge.get("/execution-info", params={"clientId": "poll"})
    assert resp.status == 400
    assert (await resp.json())["detail"].startswith("Unknown clientId 'poll'")
    await upload(bridge, {"file": ("a.png", png())}, client_id="poll")
    info = await (await bridge.get("/execution-info", params={"clientId": "poll"})).json()
    assert seed(info) == {"status": "listening", "detail": "server is listening", "details": "server is listening"}
    await run_job(bridge, "poll", {"workflow": "solid", "1/batch_size": 1})
    info = await (await bridge.get("/execution-info", params={"clientId": "poll"})).json()
    assert seed(info) == {"status": "closed", "detail": "Execution is done", "details": "Execution is done"}


async def test_a_failed_jobs_error_outlives_the_fetch_of_an_earlier_jobs_results(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """API.md: "A clientId is known while ... the error of a job that failed (kept result_ttl, as it has no
    results to fetch)". A REST client whose first job finished and whose second was interrupted
    fetches the first one's results: it used to be forgotten at once (400), never learning how its
    second job ended."""
    client = await make_bridge(await make_emulator(pace=0.3))
    await run_job(client, "poller", TINY)  # done, its results kept; the socket is closed after
    status, second = await generate(client, "poller", TINY)
    assert status == 200
    assert (await client.post("/interrupt", params={"clientId": "poller"})).status == 200
    info = await poll_status(client, "poller", {"error"})
    assert info["job_id"] == second["job_id"]
    resp = await client.get("/history", params={"clientId": "poller", "resType": "base64"})
    assert (resp.status, len((await resp.json())["files"])) == (200, 1)
    resp = await client.get("/execution-info", params={"clientId": "poller"})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == info


async def test_generation_count_counts_accepted_jobs(bridge: Client) -> None:
    assert await (await bridge.get("/generation-count")).json() == 0
    await run_job(bridge, "count", {"workflow": "solid", "1/batch_size": 1})
    await generate(bridge, "count", {"workflow": "nope"})
    await run_job(bridge, "count", {"workflow": "solid", "1/batch_size": 1})
    resp = await bridge.get("/generation-count")
    assert await resp.text() == "2"
    # The file follows the journal within a second (writes are spaced out under load).
    path = bridge.app[STATE].path
    await wait_for(lambda: path.exists() and orjson.loads(path.read_bytes())["generation_count"] == 2)


# /free, /interrupt -----------------------------------------------------------------------------
async def test_free_all_and_by_client(make_emulator: object, make_bridge: BridgeFactory) -> None:
    first = await make_emulator()  # type: ignore[operator]
    second = await make_emulator()  # type: ignore[operator]
    client = await make_bridge(first, second)
    resp = await client.post("/free")
    assert await resp.json() == {"detail": "server memory free now / ALL"}
    expected = {"unload_models": True, "free_memory": True}
    assert first.engine.free_requests == [expected]
    assert second.engine.free_requests == [expected]
    resp = await client.post("/free", params={"clientId": "ghost"})
    assert resp.status == 400
    await run_job(client, "freer", {"workflow": "solid", "1/batch_size": 1})
    resp = await client.post("/free", params={"clientId": "freer"})
    assert await resp.json() == {"detail": "server memory free now / freer"}
    ran_on = first if first.engine.started else second
    other = second if ran_on is first else first
    assert (len(ran_on.engine.free_requests), len(other.engine.free_requests)) == (2, 1)


async def test_free_skips_a_backend_that_is_down(make_emulator: object, make_bridge: BridgeFactory) -> None:
    up = await make_emulator()  # type: ignore[operator]
    down = await make_emulator()  # type: ignore[operator]
    client = await make_bridge(up, down)
    await down.stop()
    resp = await client.post("/free")
    assert resp.status == 200
    assert len(up.engine.free_requests) == 1


async def test_interrupt_unknown_and_idle_client(bridge: Client) -> None:
    resp = await bridge.post("/interrupt", params={"clientId": "ghost"})
    assert resp.status == 400
    await upload(bridge, {"file": ("a.png", png())}, client_id="idle")
    resp = await bridge.post("/interrupt", params={"clientId": "idle"})
    assert resp.status == 200
    assert await resp.json() == {"detail": "interrupted that clientId will be ignored. / idle"}


# the edge --------------------------------------------------------------------------------------
async def test_no_raw_comfyui_route_is_reachable(bridge: Client) -> None:
    for method, path in [
        ("GET", "/prompt"),
        ("POST", "/prompt"),
        ("GET", "/view"),
        ("GET", "/queue"),
        ("GET", "/system_stats"),
        ("GET", "/object_info"),
        ("POST", "/upload/image"),
        ("GET", "/api/prompt"),
    ]:
        resp = await bridge.request(method, path)
        assert resp.status == 404, path
        assert await resp.json() == {"detail": f"Not found: {path}"}


async def test_wrong_method_is_json_405(bridge: Client) -> None:
    resp = await bridge.get("/interrupt", params={"clientId": "x"})
    assert resp.status == 405
    assert await resp.json() == {"detail": "Method GET is not allowed for /interrupt"}
    assert resp.headers["Allow"] == "POST"
    put = await bridge.put("/workflow-list")
    assert (put.status, set(put.headers["Allow"].split(","))) == (405, {"GET", "HEAD"})


async def test_no_backend_is_503(make_bridge: BridgeFactory) -> None:
    client = await make_bridge("http://127.0.0.1:1")  # nothing listens there
    resp = await client.post("/generate-based-workflow", params={"clientId": "lonely"}, json={"workflow": "solid"})
    assert resp.status == 503
    assert await resp.json() == {"detail": "No ComfyUI backend is available right now; try again shortly."}
    assert resp.headers["Retry-After"] == "5"  # the longest pause between the bridge's tries to reconnect
    assert await (await client.get("/generation-count")).json() == 0


async def test_a_second_history_request_does_not_get_what_the_first_is_sending(bridge: Client) -> None:
    await run_job(bridge, "twice", {"workflow": "solid", "1/width": 8, "1/batch_size": 1})
    await make_big(bridge, "twice")
    first = await bridge.get("/history", params={"clientId": "twice"})
    assert first.status == 200  # headers are in; the 40 MB body is still on its way
    second = await bridge.get("/history", params={"clientId": "twice"})
    assert second.status == 409  # not "no contents": they exist, and are on their way elsewhere
    assert await second.json() == {
        "detail": "The results of this clientId are being fetched by another request right now; try again "
        "once that one has finished (they are forgotten only once it completes)."
    }
    assert len((await read_results(first))[0][3]) > 40 * 1024 * 1024


async def test_a_whole_seed_within_the_documented_maximum_is_not_called_over_64_bits(bridge: Client) -> None:
    """The document gives 3/seed `maximum: 18446744073709551615` (2**64 - 1). `1e19` is that whole
    number 10**19, inside it; docs/API.md says whole floats are taken only up to 2**53, so a refusal is
    expected, but its detail says the value is "a whole number over 64 bits", which it is not."""
    seed = bridge.app[WORKFLOWS].get("text-to-image").inputs["3/seed"]
    await wait_for(lambda: seed.maximum is not None)  # learned from the backend's /object_info
    doc = await (await bridge.get("/openapi.json")).json()
    assert doc["components"]["schemas"]["Generate_text-to-image"]["properties"]["3/seed"]["maximum"] == 2**64 - 1
    resp = await bridge.post(
        "/generate-based-workflow",
        params={"clientId": "seeded"},
        data=b'{"workflow": "text-to-image", "3/seed": 1e19}',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    detail = (await resp.json())["detail"]
    assert "over 64 bits" not in detail, detail
