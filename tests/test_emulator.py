"""The emulator against recordings of a real ComfyUI 0.3.64 (fixtures copied from its transcripts)."""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import statistics
import struct
import tracemalloc
import uuid
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from comfybridge.edge.appkeys import SCHEDULER
from comfybridge.emulator import Emulator, pictures
from comfybridge.emulator.png import Thumbnail, png_first_pixel, png_from_rows, png_size, png_thumbnail
from comfybridge.emulator.server import SOCKETS

from .conftest import FIXTURES, EmulatorFactory, wait_for
from .helpers import JPEG, png, read_results, run_job, upload

SCENARIOS: dict[str, list[dict[str, Any]]] = orjson.loads((FIXTURES / "ws_scenarios-0.3.64.json").read_bytes())
WORKFLOWS = FIXTURES / "workflows"


def recorded(scenario: str, to: str = "A") -> list[dict[str, Any]]:
    """The messages one socket received in a recorded scenario; truncated frames are parsed enough for their type."""
    out = []
    for entry in SCENARIOS[scenario]:
        if entry.get("to") != to or entry.get("kind") != "TEXT":
            continue
        if "msg" in entry:
            out.append(entry["msg"])
        else:
            out.append({"type": entry["raw"].split('"type": "', 1)[1].split('"', 1)[0], "data": None})
    return out


def workflow(name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((WORKFLOWS / name).read_bytes())
    return data


class Listener:
    """A ComfyUI WebSocket client that records what it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.binary: list[bytes] = []

    async def until(self, predicate: Any, timeout: float = 10) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self.binary.append(msg.data)
                    continue
                assert msg.type is aiohttp.WSMsgType.TEXT, msg
                self.messages.append(orjson.loads(msg.data))
                if predicate(self.messages[-1]):
                    return self.messages


def is_final(message: dict[str, Any]) -> bool:
    return bool(message["type"] == "executing" and message["data"]["node"] is None)


async def post_prompt(session: aiohttp.ClientSession, emulator: Emulator, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(f"{emulator.url}/prompt", json=body) as resp:
        return resp.status, await resp.json() if resp.content_type == "application/json" else await resp.text()


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_run_events_match_the_recording(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    """Scenario S1: workflow c with LoadImage cached from an earlier run, as recorded."""
    async with session.ws_connect(f"{emulator.url}/ws?clientId=ws-client-A") as ws:
        listener = Listener(ws)
        first = await listener.until(lambda m: m["type"] == "status")
        assert first[0] == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "ws-client-A"},
        }
        await post_prompt(session, emulator, {"prompt": workflow("c_slow_scale_blur.json"), "client_id": "ws-client-A"})
        await listener.until(is_final)
        listener.messages.clear()
        prompt = workflow("c_slow_scale_blur.json")
        prompt["2"]["inputs"]["seed"] = 2  # a fresh seed: only LoadImage is cached, as in S1
        status, answer = await post_prompt(session, emulator, {"prompt": prompt, "client_id": "ws-client-A"})
        assert status == 200
        assert set(answer) == {"prompt_id", "number", "node_errors"}
        got = await listener.until(is_final)
    want = recorded("S1 slow workflow c (fresh seed, not cached)")
    assert [m["type"] for m in got] == [m["type"] for m in want]
    cached = next(m for m in got if m["type"] == "execution_cached")
    assert cached["data"]["nodes"] == ["1"]
    for mine, theirs in zip(got, want, strict=True):
        if theirs["data"] is not None and mine["type"] != "progress_state":
            assert set(mine["data"]) == set(theirs["data"]), mine["type"]
    executed = next(m for m in got if m["type"] == "executed")
    assert executed["data"]["output"]["images"] == [
        {"filename": "wf_c_slow_00002_.png", "subfolder": "", "type": "output"}
    ]


async def test_history_entry_has_the_recorded_shape(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    recording = orjson.loads((FIXTURES / "history_b_emptyimage_save-0.3.64.json").read_bytes())
    (want,) = recording.values()
    async with session.ws_connect(f"{emulator.url}/ws?clientId=probe") as ws:
        _, answer = await post_prompt(
            session, emulator, {"prompt": workflow("b_emptyimage_save.json"), "client_id": "probe"}
        )
        await Listener(ws).until(is_final)
    async with session.get(f"{emulator.url}/history/{answer['prompt_id']}") as resp:
        got = (await resp.json())[answer["prompt_id"]]
    assert set(got) == set(want)
    assert got["prompt"][1:] == [answer["prompt_id"], workflow("b_emptyimage_save.json"), {"client_id": "probe"}, ["2"]]
    assert [[m[0], set(m[1])] for m in got["status"]["messages"]] == [
        [m[0], set(m[1])] for m in want["status"]["messages"]
    ]
    assert {k: v for k, v in got["status"].items() if k != "messages"} == {"status_str": "success", "completed": True}
    assert got["meta"] == want["meta"]
    assert [i["filename"] for i in got["outputs"]["2"]["images"]] == ["wf_b_empty_00001_.png", "wf_b_empty_00002_.png"]
    async with session.get(
        f"{emulator.url}/view", params={"filename": "wf_b_empty_00001_.png", "type": "output"}
    ) as resp:
        assert resp.status == 200
        assert (await resp.read()).startswith(b"\x89PNG")


async def test_runtime_error_matches_the_recording(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as ws:
        listener = Listener(ws)
        await listener.until(lambda m: m["type"] == "status")
        await post_prompt(session, emulator, {"prompt": workflow("e_runtime_error_broken_file.json"), "client_id": "A"})
        got = await listener.until(is_final)
    want = recorded("S4 runtime error: LoadImage of a non-image file")
    assert [m["type"] for m in got[1:]] == [m["type"] for m in want]
    error = next(m["data"] for m in got if m["type"] == "execution_error")
    assert set(error) == {
        "prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
        "traceback", "current_inputs", "current_outputs", "timestamp",
    }  # fmt: skip
    assert (error["node_id"], error["node_type"], error["exception_type"]) == (
        "1",
        "LoadImage",
        "PIL.UnidentifiedImageError",
    )


VALIDATION_CASES = {
    "missing-class": {"1": {"class_type": "NoSuchNode", "inputs": {}}},
    "missing-required": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    },
    "bad-combo+missing-file": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "does_not_exist.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {"image": ["1", 0], "upscale_method": "magic", "width": 8, "height": 8, "crop": "disabled"},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    },
    "no-output-node": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    },
}  # fmt: skip


def recorded_validation(label: str) -> Any:
    note = next(
        e["note"]
        for e in SCENARIOS["S5 validation errors (HTTP 400 expected, no WS traffic)"]
        if f"({label})" in e["note"]
    )
    return orjson.loads(note.split("-> 400 ", 1)[1])


@pytest.mark.parametrize("label", [*VALIDATION_CASES, "no 'prompt' key"])
async def test_validation_errors_match_the_recording(
    emulator: Emulator, session: aiohttp.ClientSession, label: str
) -> None:
    body = {"prompt": VALIDATION_CASES[label]} if label in VALIDATION_CASES else {}
    status, answer = await post_prompt(session, emulator, body)
    assert status == 400
    assert answer == recorded_validation(label)


async def test_upload_names_like_comfyui(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    """http_probe: same content keeps its name, other content becomes `name (1).ext`; no image is a 400."""

    async def send(data: bytes, **fields: str) -> Any:
        form = aiohttp.FormData(fields)
        form.add_field("image", data, filename="up_test.png")
        async with session.post(f"{emulator.url}/upload/image", data=form) as resp:
            return await resp.json() if resp.status == 200 else resp.status

    assert await send(b"\x89PNG one") == {"name": "up_test.png", "subfolder": "", "type": "input"}
    assert await send(b"\x89PNG one") == {"name": "up_test.png", "subfolder": "", "type": "input"}
    assert await send(b"\x89PNG two") == {"name": "up_test (1).png", "subfolder": "", "type": "input"}
    assert await send(b"x", overwrite="true", subfolder="sub") == {
        "name": "up_test.png",
        "subfolder": "sub",
        "type": "input",
    }
    async with session.post(f"{emulator.url}/upload/image", data=aiohttp.FormData({"x": "1"})) as resp:
        assert resp.status == 400


async def test_queue_delete_and_targeted_interrupt(
    make_emulator: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    """S6: two prompts; the pending one deleted from /queue, the running one interrupted by id."""
    emulator = await make_emulator(pace=0.2)
    async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as ws:
        listener = Listener(ws)
        _, first = await post_prompt(
            session, emulator, {"prompt": workflow("c_slow_scale_blur.json"), "client_id": "A"}
        )
        _, second = await post_prompt(
            session, emulator, {"prompt": workflow("c_slow_scale_blur.json"), "client_id": "A"}
        )
        await listener.until(lambda m: m["type"] == "executing")
        async with session.get(f"{emulator.url}/queue") as resp:
            queue = await resp.json()
        assert [i[1] for i in queue["queue_running"]] == [first["prompt_id"]]
        assert [i[1] for i in queue["queue_pending"]] == [second["prompt_id"]]
        assert queue["queue_pending"][0][3] == {"client_id": "A"}
        async with session.post(f"{emulator.url}/queue", json={"delete": [second["prompt_id"]]}) as resp:
            assert resp.status == 200
        async with session.post(f"{emulator.url}/interrupt", json={"prompt_id": "not-running"}) as resp:
            assert resp.status == 200
        async with session.post(f"{emulator.url}/interrupt", json={"prompt_id": first["prompt_id"]}) as resp:
            assert resp.status == 200
        got = await listener.until(is_final)
    types = [m["type"] for m in got if m["type"] != "progress_state"]
    assert types[-3:] == ["execution_interrupted", "status", "executing"]
    interrupted = next(m["data"] for m in got if m["type"] == "execution_interrupted")
    assert set(interrupted) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert emulator.engine.history[first["prompt_id"]]["status"]["status_str"] == "error"
    assert second["prompt_id"] not in emulator.engine.history


async def test_prompt_without_client_id_only_broadcasts(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    """S7: without client_id only status and progress_state reach sockets; no executing null."""
    async with session.ws_connect(f"{emulator.url}/ws?clientId=B") as ws:
        listener = Listener(ws)
        await listener.until(lambda m: m["type"] == "status")
        await post_prompt(session, emulator, {"prompt": workflow("b_emptyimage_save.json")})
        await listener.until(
            lambda m: m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
        )
    assert {m["type"] for m in listener.messages} == {"status", "progress_state"}


async def test_get_image_size_sends_a_text_frame(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as ws:
        listener = Listener(ws)
        await post_prompt(session, emulator, {"prompt": workflow("d_ws_demo_gets_size_preview.json"), "client_id": "A"})
        got = await listener.until(is_final)
    (frame,) = listener.binary
    assert frame[:8] == bytes.fromhex("0000000300000001")
    assert frame[8:] == b"2width: 256, height: 256\n batch size: 1"
    outputs = [m["data"]["output"]["images"][0] for m in got if m["type"] == "executed"]
    assert sorted(o["type"] for o in outputs) == ["output", "temp"]


async def test_sampler_reports_one_progress_per_step(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    prompt = workflow("sd15_text_to_image.json")
    prompt["3"]["inputs"]["steps"] = 5
    async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as ws:
        listener = Listener(ws)
        await post_prompt(session, emulator, {"prompt": prompt, "client_id": "A"})
        got = await listener.until(is_final)
    steps = [m["data"] for m in got if m["type"] == "progress"]
    assert [(s["value"], s["max"], s["node"]) for s in steps] == [(i, 5, "3") for i in range(1, 6)]


async def test_rest_odds_and_ends(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    """http_probe: /api alias, /free without a body is a 500, unknown history is {}, /object_info/NoSuch is {}."""
    checks = [
        ("GET", "/api/prompt", None, 200, {"exec_info": {"queue_remaining": 0}}),
        ("GET", "/history/unknown", None, 200, {}),
        ("GET", "/object_info/NoSuch", None, 200, {}),
        ("GET", "/queue", None, 200, {"queue_running": [], "queue_pending": []}),
        ("GET", "/features", None, 200, {"supports_preview_metadata": True, "max_upload_size": 104857600}),
    ]
    for method, path, body, status, answer in checks:
        async with session.request(method, emulator.url + path, json=body) as resp:
            assert (resp.status, await resp.json()) == (status, answer), path
    async with session.post(f"{emulator.url}/free") as resp:
        assert resp.status == 500
    async with session.post(f"{emulator.url}/free", json={"unload_models": True, "free_memory": True}) as resp:
        assert resp.status == 200
    async with session.post(f"{emulator.url}/prompt", data=b"{not json") as resp:
        assert resp.status == 500
    async with session.get(f"{emulator.url}/object_info/ImageInvert") as resp:
        recorded_line = (FIXTURES / "http_probe-0.3.64.txt").read_text().split("## GET /object_info/ImageInvert\n")[1]
        assert await resp.json() == orjson.loads(recorded_line.split("\n")[0])
    async with session.get(f"{emulator.url}/system_stats") as resp:
        stats = await resp.json()
    assert set(stats) == {"system", "devices"}
    assert stats["system"]["comfyui_version"] == "0.3.64"


def test_png_writer_makes_valid_images(tmp_path: Path) -> None:
    from comfybridge.emulator.png import png_size, solid_png

    data = solid_png(3, 2, 0xFF0000)
    assert png_size(data) == (3, 2)
    assert struct.unpack(">I", data[8:12])[0] == 13


async def test_reconnect_mid_run_is_told_the_running_node(make_emulator: EmulatorFactory) -> None:
    emulator = await make_emulator(pace=0.2)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as ws:
            await post_prompt(session, emulator, {"prompt": workflow("c_slow_scale_blur.json"), "client_id": "A"})
            await Listener(ws).until(lambda m: m["type"] == "executing")
        async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as again:
            first = await Listener(again).until(lambda m: m["type"] == "executing")
    assert first[0]["type"] == "status"
    assert first[1] == {"type": "executing", "data": {"node": emulator.engine.last_node_id}}


async def test_a_stale_socket_that_ends_deafens_the_newer_one_as_in_comfyui(make_emulator: EmulatorFactory) -> None:
    """ComfyUI's server.py forgets a clientId's older socket without closing it, and the end of any
    socket forgets its clientId: the newer socket, still open, hears nothing from then on."""
    emulator = await make_emulator()
    sockets = emulator.app[SOCKETS]
    async with aiohttp.ClientSession() as session:
        older = await session.ws_connect(f"{emulator.url}/ws?clientId=twice")
        async with session.ws_connect(f"{emulator.url}/ws?clientId=twice") as newer:
            assert orjson.loads((await newer.receive()).data)["type"] == "status"  # the newer one is in
            await older.close()
            await wait_for(lambda: "twice" not in sockets)
            assert not newer.closed


async def test_cache_never_serves_a_node_whose_input_runs_again(make_bridge: Any, emulator: Emulator) -> None:
    """Another workflow in between reuses node id 3: image-to-image's sampler runs again, so the
    decoder after it (same signature as before) must run again too, not be served from cache."""
    client = await make_bridge(emulator)
    for body in ({"workflow": "image-to-image"}, {"workflow": "slow", "2/seed": 1}, {"workflow": "image-to-image"}):
        frames = await run_job(client, "cache", body)
        assert frames[-1]["status"] == "closed", frames[-1]


async def test_invert_really_inverts_an_uploaded_image(make_bridge: Any, emulator: Emulator) -> None:
    client = await make_bridge(emulator)
    _, names = await upload(client, {"file": ("green.png", png(8, 8, 0x2ED37E))}, client_id="invert")
    frames = await run_job(client, "invert", {"workflow": "invert", "1/image": names["file"]})
    assert frames[-1]["status"] == "closed"
    [(_, _, _, data)] = await read_results(await client.get("/history", params={"clientId": "invert"}))
    assert png_first_pixel(data) == 0xFFFFFF ^ 0x2ED37E  # (209, 44, 129)


# the newer dialect (releases after 0.3.64), as ComfyUI's own server.py and comfy_execution/jobs.py define it
async def test_jobs_dialect_lists_finds_and_cancels_jobs(make_emulator: EmulatorFactory) -> None:
    old = await make_emulator()
    jobs = await make_emulator(pace=0.3, speaks="jobs")
    async with aiohttp.ClientSession() as session:
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        for prompt_id in (first, second):
            body = {"prompt": workflow("c_slow_scale_blur.json"), "prompt_id": prompt_id}
            assert (await post_prompt(session, jobs, body))[1]["prompt_id"] == prompt_id
        async with session.get(f"{jobs.url}/api/jobs", params={"limit": "1"}) as resp:
            listing = await resp.json()
        assert listing["pagination"] == {"offset": 0, "limit": 1, "total": 2, "has_more": True}
        async with session.get(f"{jobs.url}/api/jobs/{second}") as resp:
            assert (await resp.json())["status"] == "pending"
        async with session.post(f"{jobs.url}/api/jobs/{second}/cancel") as resp:
            assert await resp.json() == {"cancelled": True}
        async with session.post(f"{jobs.url}/api/jobs/{first}/cancel") as resp:
            assert await resp.json() == {"cancelled": True}  # it runs: interrupted
        async with session.post(f"{jobs.url}/api/jobs/{uuid.uuid4()}/cancel") as resp:
            assert await resp.json() == {"cancelled": False}  # unknown: a no-op, not an error
        async with session.get(f"{jobs.url}/api/jobs/{uuid.uuid4()}") as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "Job not found"}
        while first not in jobs.engine.history:
            await asyncio.sleep(0.02)
        async with session.get(f"{jobs.url}/api/jobs/{first}") as resp:
            assert (await resp.json())["status"] == "cancelled"
        async with session.get(f"{jobs.url}/api/jobs/{second}") as resp:
            assert resp.status == 404  # dequeued before it ran: ComfyUI forgets it
        # 0.3.64 has no jobs API at all: a 404 from the router.
        async with session.get(f"{old.url}/api/jobs") as resp:
            assert resp.status == 404


@pytest.mark.parametrize("prompt_id", ["not-a-uuid", str(uuid.uuid4()).upper(), uuid.uuid4().hex])
async def test_jobs_dialect_refuses_a_prompt_id_that_is_not_a_canonical_uuid(
    make_emulator: EmulatorFactory, prompt_id: str
) -> None:
    jobs = await make_emulator(speaks="jobs")
    async with aiohttp.ClientSession() as session:
        status, answer = await post_prompt(
            session, jobs, {"prompt": workflow("b_emptyimage_save.json"), "prompt_id": prompt_id}
        )
    assert status == 400
    assert answer["error"]["type"] == "invalid_prompt_id"
    assert answer["node_errors"] == {}


async def test_jobs_dialect_outputs_carry_asset_ids_and_the_bridge_ignores_them(
    make_emulator: EmulatorFactory, make_bridge: Any
) -> None:
    jobs = await make_emulator(speaks="jobs")
    async with aiohttp.ClientSession() as session:
        _, answer = await post_prompt(session, jobs, {"prompt": workflow("b_emptyimage_save.json")})
    await wait_for(lambda: answer["prompt_id"] in jobs.engine.history)
    images = [i for node in jobs.engine.history[answer["prompt_id"]]["outputs"].values() for i in node["images"]]
    assert images
    assert all(set(i) == {"filename", "subfolder", "type", "id", "preview_id"} for i in images)
    client = await make_bridge(jobs)
    frames = await run_job(client, "assets", {"workflow": "solid", "1/batch_size": 1})
    assert frames[-1]["status"] == "closed"
    [(_, _, _, data)] = await read_results(await client.get("/history", params={"clientId": "assets"}))
    assert data.startswith(b"\x89PNG")


async def test_a_backend_upgraded_while_away_is_asked_again_what_it_offers(
    make_emulator: EmulatorFactory, make_bridge: Any
) -> None:
    old = await make_emulator()
    client = await make_bridge(old)
    [backend] = client.app[SCHEDULER].backends.values()
    await wait_for(lambda: backend.client.jobs_api is False)
    port = old.port
    await old.stop()
    await make_emulator(port=port, speaks="jobs")
    await wait_for(lambda: backend.client.jobs_api is True)
    frames = await run_job(client, "upgraded", {"workflow": "solid", "1/batch_size": 1})
    assert frames[-1]["status"] == "closed"


async def picture(client: Any, client_id: str, body: dict[str, Any]) -> bytes:
    frames = await run_job(client, client_id, body)
    assert frames[-1]["status"] == "closed", frames[-1]
    [(_, _, _, data)] = await read_results(await client.get("/history", params={"clientId": client_id}))
    return data


async def test_text_to_image_draws_from_its_seed_and_its_prompt(make_bridge: Any, emulator: Emulator) -> None:
    client = await make_bridge(emulator)

    def body(seed: int, text: str) -> dict[str, Any]:
        return {"workflow": "text-to-image", "3/seed": seed, "3/steps": 2, "6/text": text, "5/width": 64}

    cat = await picture(client, "t2i", body(1, "a cat"))
    assert png_size(cat) == (64, 512)
    assert await picture(client, "t2i", body(1, "a cat")) == cat  # the same inputs, the same picture
    assert await picture(client, "t2i", body(2, "a cat")) != cat
    assert await picture(client, "t2i", body(1, "a dog")) != cat


async def test_scale_blur_depends_on_its_noise_seed(make_bridge: Any, emulator: Emulator) -> None:
    client = await make_bridge(emulator)
    one = await picture(client, "blur", {"workflow": "slow", "2/seed": 1})
    assert await picture(client, "blur", {"workflow": "slow", "2/seed": 2}) != one


def test_blur_blurs_and_sharpen_sharpens() -> None:
    noisy = pictures.add_noise({"w": 320, "h": 320, "b": 1, "c": 0x808080}, seed=7, strength=0.5)
    blurred = pictures.blur(noisy, 10)
    sharpened = pictures.sharpen(blurred, 10, alpha=1.0)

    def roughness(image: dict[str, Any]) -> float:
        red = image["px"][0::3]
        return statistics.pstdev(a - b for a, b in itertools.pairwise(red))

    assert roughness(blurred) < roughness(noisy) / 3
    assert roughness(blurred) < roughness(sharpened)
    assert pictures.blur({"w": 9, "h": 9, "b": 1, "c": 0x123456}, 3)["c"] == 0x123456  # solid stays solid
    inverted = pictures.invert(noisy)
    assert inverted["px"] == bytes(255 - v for v in noisy["px"])


# Uploaded pictures: LoadImage decodes their real pixels (png.py), so invert and scale-blur work on them.
RED, BLUE = (200, 30, 60), (20, 90, 220)


def halves(width: int, height: int) -> bytes:
    """A picture whose left half is RED and right half BLUE."""
    row = bytes(RED) * (width // 2) + bytes(BLUE) * (width - width // 2)
    return png_from_rows(width, height, [row] * height)


def rgb_at(thumbnail: Thumbnail, x: int, y: int) -> tuple[int, ...]:
    start = (y * thumbnail.tw + x) * 3
    return tuple(thumbnail.rgb[start : start + 3])


def inverse(colour: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(255 - v for v in colour)


async def test_invert_inverts_every_pixel_of_an_uploaded_picture(make_bridge: Any, emulator: Emulator) -> None:
    client = await make_bridge(emulator)
    _, names = await upload(client, {"file": ("halves.png", halves(64, 48))}, client_id="halves")
    data = await picture(client, "halves", {"workflow": "invert", "1/image": names["file"]})
    result = png_thumbnail(data, 64)
    assert result is not None
    assert (result.width, result.height) == (64, 48)
    for y in range(48):
        for x in range(64):
            if x < 30:
                assert rgb_at(result, x, y) == inverse(RED), (x, y)
            elif x >= 34:  # the tile's border column may mix both
                assert rgb_at(result, x, y) == inverse(BLUE), (x, y)


async def test_scale_blur_scales_and_blurs_an_uploaded_picture(make_bridge: Any, emulator: Emulator) -> None:
    client = await make_bridge(emulator)
    _, names = await upload(client, {"file": ("halves.png", halves(64, 64))}, client_id="blur")
    data = await picture(client, "blur", {"workflow": "slow", "1/image": names["file"], "2/seed": 3})
    result = png_thumbnail(data, 512)
    assert result is not None
    assert (result.width, result.height) == (512, 512)  # its last ImageScale's size
    red = [rgb_at(result, x, 256)[0] for x in range(512)]  # across the middle: 200 on the left, 20 on the right
    assert all(180 < level < 235 for level in red[:192])  # a little noise (and the sharpen's halo)
    assert all(level < 40 for level in red[320:])
    ramp = [level for level in red if 50 < level < 170]  # the sharp edge has become a ramp of several levels
    assert len(set(ramp)) >= 2
    assert len(ramp) >= 32


async def test_a_picture_nothing_here_reads_is_one_colour(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    """A truncated PNG, or a JPEG that nothing here reads, still loads: as one colour, as before."""

    async def inverted(name: str, data: bytes) -> Thumbnail | None:
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name)
        async with session.post(f"{emulator.url}/upload/image", data=form) as resp:
            assert resp.status == 200
        prompt = workflow("a_loadimage_invert_save.json")
        prompt["1"]["inputs"]["image"] = name
        _, answer = await post_prompt(session, emulator, {"prompt": prompt})
        await wait_for(lambda: answer["prompt_id"] in emulator.engine.history)
        entry = emulator.engine.history[answer["prompt_id"]]
        assert entry["status"]["status_str"] == "success", entry["status"]
        [saved] = entry["outputs"]["3"]["images"]
        return png_thumbnail((emulator.engine.output_dir / saved["filename"]).read_bytes(), 64)

    whole = halves(64, 64)
    cut = whole[: len(whole) - 40]  # inside IDAT
    assert png_thumbnail(cut, 32) is None
    assert pictures.load(cut) is None
    for name, data in (("cut.png", cut), ("photo.jpg", JPEG)):
        result = await inverted(name, data)
        assert result is not None
        assert result.rgb == result.rgb[:3] * (64 * 64), name


def test_load_keeps_the_pixels_and_puts_alpha_in_the_mask() -> None:
    """ComfyUI's LoadImage: the RGB picture, and a mask that is 1 - alpha (white where transparent)."""
    lines = [b"".join(bytes((x * 30, y * 30, 90, 255 if x < 4 else 0)) for x in range(8)) for y in range(8)]
    data = encode(8, 8, 6, 8, lines, (4,), 4)
    loaded = pictures.load(data)
    assert loaded is not None
    image, mask = loaded
    assert (image["w"], image["h"], image["tw"], image["th"]) == (8, 8, 8, 8)
    assert image["px"][:9] == bytes((0, 0, 90, 30, 0, 90, 60, 0, 90))
    assert mask["px"][: 3 * 8] == bytes(3 * 4) + b"\xff" * 3 * 4  # opaque left, transparent right
    solid, empty = pictures.load(png(40, 40, 0x123456)) or ({}, {})
    assert "px" not in solid  # one colour stays a solid image
    assert solid["c"] == 0x123456
    assert empty == {"w": 40, "h": 40, "b": 1, "c": 0}  # no alpha: an empty mask


# The PNG reader, against pictures written here with zlib and struct and every row filter applied.
def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def filtered(kind: int, line: bytes, prior: bytes, bpp: int) -> bytes:
    """One row with PNG filter `kind` applied, written straight from the standard's definitions."""
    out = bytearray()
    for i, value in enumerate(line):
        left = line[i - bpp] if i >= bpp else 0
        up, diagonal = prior[i], (prior[i - bpp] if i >= bpp else 0)
        estimate = left + up - diagonal
        nearest = min(
            (abs(estimate - left), 0, left), (abs(estimate - up), 1, up), (abs(estimate - diagonal), 2, diagonal)
        )
        predicted = [0, left, up, (left + up) // 2, nearest[2]][kind]
        out.append((value - predicted) % 256)
    return bytes(out)


def encode(
    width: int, height: int, colour: int, depth: int, lines: list[bytes], kinds: tuple[int, ...], bpp: int,
    extra: bytes = b"", interlace: int = 0, idat_size: int = 1 << 20,
) -> bytes:  # fmt: skip
    """A PNG of already packed `lines`, row y filtered with kinds[y % len(kinds)], its data in IDATs
    of at most `idat_size` bytes."""
    raw, prior = bytearray(), bytes(len(lines[0]))
    for y, line in enumerate(lines):
        kind = kinds[y % len(kinds)]
        raw += bytes((kind,)) + filtered(kind, line, prior, bpp)
        prior = line
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    packed = zlib.compress(bytes(raw), 9)
    idats = b"".join(chunk(b"IDAT", packed[i : i + idat_size]) for i in range(0, len(packed), idat_size))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + idats + chunk(b"IEND", b"")


FILTERS = [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4)]


@pytest.mark.parametrize("kinds", FILTERS, ids=["none", "sub", "up", "average", "paeth", "mixed"])
@pytest.mark.parametrize("colour", [0, 2, 3, 4, 6], ids=["grey", "rgb", "palette", "grey+alpha", "rgba"])
def test_png_reader_reads_every_colour_type_through_every_filter(colour: int, kinds: tuple[int, ...]) -> None:
    rng = random.Random(colour * 10 + len(kinds) + kinds[0])
    width, height = 7, 6
    palette = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(6)]
    alphas = [0, 80, 255, 30]  # tRNS may be shorter than the palette: the rest are opaque
    extra = b""
    if colour == 3:
        indices = [[rng.randrange(6) for _ in range(width)] for _ in range(height)]
        lines = [bytes(row) for row in indices]
        pixels = [[(*palette[i], alphas[i] if i < 4 else 255) for i in row] for row in indices]
        extra = chunk(b"PLTE", bytes(v for c in palette for v in c)) + chunk(b"tRNS", bytes(alphas))
    else:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
        lines = [rng.randbytes(width * channels) for _ in range(height)]
        pixels = []
        for line in lines:
            samples = [line[x * channels : (x + 1) * channels] for x in range(width)]
            if channels <= 2:
                pixels.append([(s[0], s[0], s[0], s[1] if channels == 2 else 255) for s in samples])
            else:
                pixels.append([(s[0], s[1], s[2], s[3] if channels == 4 else 255) for s in samples])
    bpp = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    data = encode(width, height, colour, 8, lines, kinds, bpp, extra)
    result = png_thumbnail(data, 32)
    assert result is not None
    assert (result.width, result.height, result.tw, result.th) == (width, height, width, height)
    assert result.rgb == bytes(v for row in pixels for p in row for v in p[:3])
    if colour in (3, 4, 6):
        assert result.alpha == bytes(p[3] for row in pixels for p in row)
    else:
        assert result.alpha is None


@pytest.mark.parametrize(("colour", "depth"), [(0, 1), (0, 2), (0, 4), (3, 2), (0, 16), (2, 16), (6, 16)])
def test_png_reader_spreads_packed_samples_and_keeps_the_high_byte_of_wide_ones(colour: int, depth: int) -> None:
    rng = random.Random(depth)
    width, height = 11, 3
    channels = {0: 1, 2: 3, 3: 1, 6: 4}[colour]
    top = (1 << min(depth, 8)) - 1
    values = [[[rng.randrange(top + 1) for _ in range(channels)] for _ in range(width)] for _ in range(height)]
    lines = []
    for row in values:
        if depth == 16:
            lines.append(bytes(b for px in row for v in px for b in (v, rng.randrange(256))))
        else:
            packed = "".join(format(px[0], f"0{depth}b") for px in row)
            packed += "0" * (-len(packed) % 8)
            lines.append(int(packed, 2).to_bytes(len(packed) // 8, "big"))
    palette = bytes(range(3 * 4))
    extra = chunk(b"PLTE", palette) if colour == 3 else b""
    bpp = max(1, channels * depth // 8)
    data = encode(width, height, colour, depth, lines, (0, 1, 2, 3, 4), bpp, extra)
    result = png_thumbnail(data, 32)
    assert result is not None
    if colour == 3:
        want = bytes(v for row in values for px in row for v in palette[px[0] * 3 : px[0] * 3 + 3])
    elif colour == 0:
        want = bytes(v * 255 // top for row in values for px in row for v in (px[0],) * 3)
    else:
        want = bytes(v for row in values for px in row for v in px[:3])
    assert result.rgb == want


def test_png_reader_averages_a_large_picture_down_to_its_tile() -> None:
    width, height = 96, 64
    rng = random.Random(5)
    lines = [rng.randbytes(width * 3) for _ in range(height)]
    result = png_thumbnail(encode(width, height, 2, 8, lines, (4, 3), 3, idat_size=7), 32)
    assert result is not None
    assert (result.width, result.height, result.tw, result.th) == (96, 64, 32, 32)
    for ty in range(32):
        for tx in range(32):
            block = [lines[y][x * 3] for y in (2 * ty, 2 * ty + 1) for x in range(3 * tx, 3 * tx + 3)]
            assert result.rgb[(ty * 32 + tx) * 3] == (sum(block) + 3) // 6, (tx, ty)


def test_png_reader_refuses_what_it_cannot_read_without_raising() -> None:
    whole = encode(9, 9, 2, 8, [bytes(range(27))] * 9, (1, 4), 3)
    data_end = whole.index(b"IEND") - 8  # before the IDAT's CRC and IEND's length; CRCs are not checked
    for cut in range(len(whole)):
        result = png_thumbnail(whole[:cut], 32)
        assert (result is None) == (cut < data_end), cut
    interlaced = encode(9, 9, 2, 8, [bytes(range(27))] * 9, (0,), 3, interlace=1)
    raw = b"\x07" + bytes(27)  # no filter 7
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 9, 1, 8, 2, 0, 0, 0))
    bad_filter = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    corrupt = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"not zlib at all") + chunk(b"IEND", b"")
    for refused in (interlaced, bad_filter, corrupt, b"", b"GIF89a", b"\x89PNG\r\n\x1a\n"):
        assert png_thumbnail(refused, 32) is None
    assert png_thumbnail(whole, 32, max_pixels=80) is None  # 81 pixels
    assert png_thumbnail(whole, 32, max_pixels=81) is not None


def test_png_reader_inflates_no_more_than_its_rows() -> None:
    """A 2x2 picture whose data inflates to 40 MB: the reader takes its rows and stops."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(40 << 20), 9)) + chunk(b"IEND", b"")
    tracemalloc.start()
    try:
        result = png_thumbnail(bomb, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is not None
    assert result.rgb == bytes(12)
    assert peak < 2 << 20


async def test_an_upload_over_comfyuis_request_limit_is_a_413(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """ComfyUI's --max-upload-size (100 MB) bounds the whole request body, the form's framing
    included: a file 40 bytes under it is `413`, as ComfyUI 0.3.64 answered it."""
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(bytes(104857600 - 40)), filename="big.png")
    async with session.post(f"{emulator.url}/upload/image", data=form) as resp:
        assert resp.status == 413


async def test_a_value_of_the_wrong_type_is_comfyuis_400(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    """EmptyImage's width "abc": a 400 with an `invalid_input_type` node error, as ComfyUI 0.3.64
    answered it (the emulator answered 500, which a bridge takes for a backend failing)."""
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": "abc", "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    async with session.post(f"{emulator.url}/prompt", json={"prompt": prompt, "client_id": "t"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    (error,) = body["node_errors"]["1"]["errors"]
    assert error["type"] == "invalid_input_type"
    assert error["extra_info"]["input_name"] == "width"


def ran(messages: list[dict[str, Any]]) -> list[str]:
    return [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"] is not None]


def invert_and_save(color: int, prefix: str = "probe", ids: tuple[str, str, str] = ("1", "2", "3")) -> dict[str, Any]:
    a, b, c = ids
    return {
        a: {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": color}},
        b: {"class_type": "ImageInvert", "inputs": {"image": [a, 0]}},
        c: {"class_type": "SaveImage", "inputs": {"images": [b, 0], "filename_prefix": prefix}},
    }


async def test_view_serves_html_and_css_outputs_as_downloads(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """server.py's /view forces text/html, application/xhtml+xml, text/javascript and text/css to
    application/octet-stream ("For security, force certain mimetypes to download instead of display").
    Real 0.3.64, `GET /view?filename=h6ct.html`: `Content-Type: application/octet-stream` (same for .htm
    and .css); the emulator answers `text/html` / `text/css`. The bridge's download refuses a `text/html`
    answer as "a proxy in front of ComfyUI?" (client.py WEB_PAGES), so on the emulator an HTML output
    fails a job that real ComfyUI would complete."""
    for name in ("report.html", "report.htm", "style.css"):
        (emulator.engine.output_dir / name).write_bytes(b"<!doctype html><p>hi</p>\n")
        async with session.get(f"{emulator.url}/view", params={"filename": name, "type": "output"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Disposition"] == f'filename="{name}"'
            assert resp.content_type == "application/octet-stream", name


async def interrupted_in(
    session: aiohttp.ClientSession, emulator: Emulator, prompt: dict[str, Any], node: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Queue `prompt` (as client A), interrupt it 0.1 s into `node`: its answer, and every message A
    heard until its final `executing` null."""
    async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as ws:
        listener = Listener(ws)
        _, answer = await post_prompt(session, emulator, {"prompt": prompt, "client_id": "A"})
        await listener.until(lambda m: m["type"] == "executing" and m["data"]["node"] == node)
        await asyncio.sleep(0.1)
        async with session.post(f"{emulator.url}/interrupt", json={"prompt_id": answer["prompt_id"]}) as resp:
            assert resp.status == 200
        return answer, await listener.until(is_final)


async def test_interrupt_in_the_last_node_lets_the_prompt_succeed(
    make_emulator: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    """ComfyUI checks its interrupt flag between nodes (and inside samplers' steps), never in the middle of
    an image node. Real 0.3.64, EmptyImage 4096x4096 -> ImageAddNoise -> SaveImage, `POST /interrupt
    {"prompt_id": ...}` 0.3 s after `executing(3)`: `(1.08, 'executing(3)'), (1.38, 'INTERRUPT 200'),
    (5.38, "executed(3:['images'])"), (5.6, 'execution_success'), (5.6, 'executing(None)')`, and /history
    says `success` with the file. The emulator stops SaveImage in its middle and reports
    `execution_interrupted`: a cancel that arrives during the last node is never seen to lose the race,
    as it does on a real backend (the prompt succeeds and writes its outputs)."""
    emulator = await make_emulator(pace=0.5)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 3}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "late"}},
    }
    answer, got = await interrupted_in(session, emulator, prompt, "2")
    assert "execution_interrupted" not in [m["type"] for m in got]
    assert "execution_success" in [m["type"] for m in got]
    assert emulator.engine.history[answer["prompt_id"]]["status"]["status_str"] == "success"


async def test_interrupt_mid_node_lands_at_the_next_node(
    make_emulator: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    """Real 0.3.64 (slow workflow c, interrupt while node 4 ImageBlur runs): `executing(4) ...
    progress_state(4:finished) progress_state(5:running) executing(5)
    execution_interrupted(5, executed=['3', '1', '2', '4'])`: the running node finishes, and the interrupt
    is reported at the next node (the emulator used to report it in the node that ran, unfinished)."""
    emulator = await make_emulator(pace=0.5)
    prompt = invert_and_save(8)
    _, got = await interrupted_in(session, emulator, prompt, "1")
    interrupted = next(m["data"] for m in got if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "2"
    assert sorted(interrupted["executed"]) == ["1"]
    assert ran(got) == ["1", "2"]


@pytest.mark.parametrize(
    ("link", "error_type"),
    [(["1", 0, 1], "bad_linked_input"), ([1, 0], "exception_during_validation")],
    ids=["three-items", "int-node-id"],
)
async def test_a_malformed_link_is_refused(
    emulator: Emulator, session: aiohttp.ClientSession, link: list[Any], error_type: str
) -> None:
    """Real 0.3.64, SaveImage `images: ["1", 0, 1]`: 400 `{"type": "bad_linked_input", "message": "Bad
    linked input, must be a length-2 list of [node_id, slot_index]", "details": "images", ...}`;
    `images: [1, 0]`: 400 `exception_during_validation` ("Exception when validating node", KeyError 1).
    The emulator answers 200 for both and runs SaveImage on a made-up picture, so a workflow that
    real ComfyUI refuses passes every test."""
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": link, "filename_prefix": "x"}},
    }
    status, answer = await post_prompt(session, emulator, {"prompt": prompt})
    assert status == 400, answer
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert [e["type"] for e in answer["node_errors"]["2"]["errors"]] == [error_type]


async def test_the_cache_is_comfyuis_classic_cache(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    """As a real ComfyUI 0.3.64 does (seen by hand, against `b_emptyimage_save.json`): entries are
    keyed by a node's inputs and its ancestors', not its id; only those the prompt being run can use
    stay; outputs are cached too, told again with `executed` and no file written; POST /free with
    `free_memory` empties the cache."""
    b = workflow("b_emptyimage_save.json")
    renamed = {"11": b["1"], "12": {**b["2"], "inputs": {**b["2"]["inputs"], "images": ["11", 0]}}}
    other = {**b, "2": {**b["2"], "inputs": {**b["2"]["inputs"], "filename_prefix": "other"}}}

    async with session.ws_connect(f"{emulator.url}/ws?clientId=cache") as ws:
        listener = Listener(ws)

        async def run(prompt: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
            """Cached nodes, nodes that ran, and the files its output names."""
            listener.messages.clear()
            status, _ = await post_prompt(session, emulator, {"prompt": prompt, "client_id": "cache"})
            assert status == 200
            got = await listener.until(is_final)
            cached = next(m for m in got if m["type"] == "execution_cached")["data"]["nodes"]
            ran = [m["data"]["node"] for m in got if m["type"] == "executing" and m["data"]["node"] is not None]
            executed = next(m for m in got if m["type"] == "executed")["data"]["output"]["images"]
            return cached, ran, [image["filename"] for image in executed]

        saved = ["wf_b_empty_00001_.png", "wf_b_empty_00002_.png"]
        assert await run(b) == ([], ["1", "2"], saved)
        assert await run(b) == (["1", "2"], [], saved)  # all cached: the same files told again
        assert await run(renamed) == (["11", "12"], [], saved)  # by inputs, not by node id
        assert await run(other) == (["1"], ["2"], ["other_00001_.png", "other_00002_.png"])
        # That prompt could not use b's SaveImage entry: it went.
        assert await run(b) == (["1"], ["2"], ["wf_b_empty_00003_.png", "wf_b_empty_00004_.png"])
        async with session.post(f"{emulator.url}/free", json={"free_memory": True}) as resp:
            assert resp.status == 200
        assert (await run(b))[:2] == ([], ["1", "2"])
    assert sorted(p.name for p in emulator.engine.output_dir.glob("wf_b_empty_*")) == [
        f"wf_b_empty_0000{n}_.png" for n in range(1, 7)
    ]


async def heard_running(session: aiohttp.ClientSession, emulator: Emulator, prompt: dict[str, Any]) -> Listener:
    """Run `prompt` as client A: what A heard, text and binary, until its final `executing` null."""
    async with session.ws_connect(f"{emulator.url}/ws?clientId=A") as ws:
        listener = Listener(ws)
        status, answer = await post_prompt(session, emulator, {"prompt": prompt, "client_id": "A"})
        assert status == 200, answer
        await listener.until(is_final)
    return listener


def cached_in(messages: list[dict[str, Any]]) -> list[str]:
    nodes: list[str] = next(m for m in messages if m["type"] == "execution_cached")["data"]["nodes"]
    return nodes


async def test_nodes_that_ran_before_a_later_node_failed_stay_cached(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """ComfyUI's classic cache keeps each node's output as the node ends: a later node's failure
    loses none of it, and the same prompt again runs only the node that failed."""
    prompt = invert_and_save(7, prefix="../outside")  # SaveImage refuses to write outside its folder
    first = await heard_running(session, emulator, prompt)
    failed = next(m["data"] for m in first.messages if m["type"] == "execution_error")
    assert (failed["node_id"], sorted(failed["executed"])) == ("3", ["1", "2"])
    again = await heard_running(session, emulator, prompt)
    assert (cached_in(again.messages), ran(again.messages)) == (["1", "2"], ["3"])


async def test_nodes_that_ran_before_an_interrupt_stay_cached(
    make_emulator: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    """The same after an interrupt: what ran before it is cached, the next run starts where it stopped."""
    emulator = await make_emulator(pace=0.3)
    prompt = invert_and_save(9)
    _, got = await interrupted_in(session, emulator, prompt, "2")
    interrupted = next(m["data"] for m in got if m["type"] == "execution_interrupted")
    assert (interrupted["node_id"], sorted(interrupted["executed"])) == ("3", ["1", "2"])
    again = await heard_running(session, emulator, prompt)
    assert (cached_in(again.messages), ran(again.messages)) == (["1", "2"], ["3"])


async def test_a_cached_node_says_its_result_once_and_sends_no_frame_again(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """GetImageSize's text frame is sent as it runs: cached, it does not run, and says nothing again
    (also when a node after it runs); a cached output (PreviewImage, SaveImage) is told once, with
    `executed`, its earlier files."""
    prompt = workflow("d_ws_demo_gets_size_preview.json")
    first = await heard_running(session, emulator, prompt)
    assert len(first.binary) == 1
    told = {m["data"]["node"]: m["data"]["output"] for m in first.messages if m["type"] == "executed"}
    again = await heard_running(session, emulator, prompt)
    assert (cached_in(again.messages), ran(again.messages), again.binary) == (list(prompt), [], [])
    executed = [m["data"] for m in again.messages if m["type"] == "executed"]
    assert sorted(e["node"] for e in executed) == ["4", "6"]
    assert {e["node"]: e["output"] for e in executed} == told
    recoloured = {**prompt, "3": {**prompt["3"], "inputs": {**prompt["3"]["inputs"], "color": 0}}}
    third = await heard_running(session, emulator, recoloured)
    assert (cached_in(third.messages), ran(third.messages), third.binary) == (["1", "2", "5", "6"], ["3", "4"], [])
    assert sorted(m["data"]["node"] for m in third.messages if m["type"] == "executed") == ["4", "6"]


async def test_a_file_uploaded_again_with_other_content_runs_its_loader_again(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Real 0.3.64: LoadImage's IS_CHANGED is the sha256 of the file, so after `overwrite=true` puts
    other content under the same name, LoadImage and everything after it run again (the same
    content again stays cached). The emulator keyed the cache by the name and served the old picture."""

    async def send(data: bytes) -> None:
        form = aiohttp.FormData({"overwrite": "true"})
        form.add_field("image", data, filename="again.png")
        async with session.post(f"{emulator.url}/upload/image", data=form) as resp:
            assert (await resp.json())["name"] == "again.png"

    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "again.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "again"}},
    }
    await send(png(colour=0xFF0000))
    first = await heard_running(session, emulator, prompt)
    assert (cached_in(first.messages), ran(first.messages)) == ([], ["1", "2", "3"])
    await send(png(colour=0xFF0000))
    same = await heard_running(session, emulator, prompt)
    assert (cached_in(same.messages), ran(same.messages)) == (["1", "2", "3"], [])
    await send(png(colour=0x0000FF))
    other = await heard_running(session, emulator, prompt)
    assert (cached_in(other.messages), ran(other.messages)) == ([], ["1", "2", "3"])
    saved = emulator.engine.output_dir / "again_00002_.png"
    assert png_first_pixel(saved.read_bytes()) == 0xFFFF00  # the blue picture, inverted


def _saving(images: Any) -> dict[str, Any]:
    inputs = {"filename_prefix": "x"} if images is None else {"images": images, "filename_prefix": "x"}
    return {"class_type": "SaveImage", "inputs": inputs}


_EMPTY = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
_SAVE_IMAGES = ["IMAGE", {"tooltip": "The images to save."}]
_FAILED = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "extra_info": {}}


def _node_errors(node: str, class_type: str, error: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    return {node: {"errors": [error], "dependent_outputs": outputs, "class_type": class_type}}


# Each prompt with the 400 body a real ComfyUI 0.3.64 answered (its tracebacks left out: they name its files).
BAD_LINKS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "to a node that is not there": (
        {"1": _EMPTY, "2": _saving(["99", 0])},
        {
            "error": {**_FAILED, "details": "Exception when validating node: '99'"},
            "node_errors": _node_errors("2", "SaveImage", {
                "type": "exception_during_validation", "message": "Exception when validating node",
                "details": "'99'", "extra_info": {"exception_type": "KeyError"},
            }, ["2"]),
        },
    ),
    "from an inner node to a node that is not there": (
        {"1": _EMPTY, "2": {"class_type": "ImageInvert", "inputs": {"image": ["99", 0]}}, "3": _saving(["2", 0])},
        {
            "error": {**_FAILED, "details": ""},
            "node_errors": _node_errors("2", "ImageInvert", {
                "type": "exception_during_inner_validation", "message": "Exception when validating inner node",
                "details": "'99'", "extra_info": {
                    "input_name": "images", "input_config": _SAVE_IMAGES, "exception_message": "'99'",
                    "exception_type": "KeyError", "linked_node": ["2", 0],
                },
            }, ["3"]),
        },
    ),
    "to an output the node does not have": (
        {"1": _EMPTY, "2": _saving(["1", 5])},
        {
            "error": {**_FAILED, "details": "Exception when validating node: tuple index out of range"},
            "node_errors": _node_errors("2", "SaveImage", {
                "type": "exception_during_validation", "message": "Exception when validating node",
                "details": "tuple index out of range", "extra_info": {"exception_type": "IndexError"},
            }, ["2"]),
        },
    ),
    "by a slot that is a string": (
        {"1": _EMPTY, "2": _saving(["1", "0"])},
        {
            "error": {**_FAILED, "details": (
                "Exception when validating node: tuple indices must be integers or slices, not str"
            )},
            "node_errors": _node_errors("2", "SaveImage", {
                "type": "exception_during_validation", "message": "Exception when validating node",
                "details": "tuple indices must be integers or slices, not str",
                "extra_info": {"exception_type": "TypeError"},
            }, ["2"]),
        },
    ),
    "of a type that does not match, into an inner node": (
        {
            "1": {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}}, "4": _EMPTY,
            "5": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}, "2": _saving(["5", 0]),
        },
        {
            "error": {**_FAILED, "details": ""},
            "node_errors": _node_errors("5", "ImageInvert", {
                "type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                "details": "image, received_type(INT) mismatch input_type(IMAGE)", "extra_info": {
                    "input_name": "image", "input_config": ["IMAGE", {}], "received_type": "INT",
                    "linked_node": ["1", 0],
                },
            }, ["2"]),
        },
    ),
    "missing, on the output": (
        {"1": _EMPTY, "2": _saving(None)},
        {
            "error": {**_FAILED, "details": "Required input is missing: images"},
            "node_errors": _node_errors("2", "SaveImage", {
                "type": "required_input_missing", "message": "Required input is missing", "details": "images",
                "extra_info": {"input_name": "images"},
            }, ["2"]),
        },
    ),
    "of three items": (
        {"1": _EMPTY, "2": _saving(["1", 0, 1])},
        {
            "error": {**_FAILED, "details": (
                "Bad linked input, must be a length-2 list of [node_id, slot_index]: images"
            )},
            "node_errors": _node_errors("2", "SaveImage", {
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": "images", "extra_info": {
                    "input_name": "images", "input_config": _SAVE_IMAGES, "received_value": ["1", 0, 1],
                },
            }, ["2"]),
        },
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LINKS))
async def test_a_bad_link_is_refused_with_comfyuis_own_words(
    emulator: Emulator, session: aiohttp.ClientSession, case: str
) -> None:
    """Field by field as a real 0.3.64 answered. The emulator said `details` "KeyError: '99'" with an
    empty `extra_info`, blamed the output for a crash inside an inner node, left out
    `input_config`, and gave the top-level `details` only for a type mismatch (ComfyUI lists there
    the failed outputs' own errors, `message: details`, one a line)."""
    prompt, want = BAD_LINKS[case]
    status, answer = await post_prompt(session, emulator, {"prompt": prompt})
    assert status == 400
    for entry in answer["node_errors"].values():
        for error in entry["errors"]:
            traceback = error["extra_info"].pop("traceback", [])
            assert isinstance(traceback, list)
            assert all(isinstance(line, str) for line in traceback)
    assert answer == want


async def test_every_output_that_fails_is_a_dependent_of_every_failed_node(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """ComfyUI 0.3.64 keeps one record of failed nodes across outputs and adds each failing output to
    every failed node's `dependent_outputs`, even one it does not lead to: here EmptyImage's, by
    SaveImage 3, which reads nothing. The emulator listed only the outputs that read the node."""
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": "x"}},
        "2": _saving(["1", 0]),
        "3": _saving(None),
    }
    status, answer = await post_prompt(session, emulator, {"prompt": prompt})
    assert status == 400
    assert answer["error"]["details"] == "Required input is missing: images"
    outputs = {node: entry["dependent_outputs"] for node, entry in answer["node_errors"].items()}
    assert outputs == {"1": ["2", "3"], "3": ["3"]}


async def test_a_runtime_error_tells_the_failed_nodes_inputs_and_the_prompts_nodes(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Real 0.3.64's execution_error: `current_inputs` is the failed node's inputs, each a list of
    its values (a linked picture as the text of its tensor), then its hidden inputs (SaveImage's
    `prompt` as Python prints the dict, `extra_pnginfo` null); `current_outputs` is a list of every
    node id of the prompt. The emulator sent `{}` for both, the second not even a list."""
    broken = workflow("e_runtime_error_broken_file.json")
    first = await heard_running(session, emulator, broken)
    error = next(m["data"] for m in first.messages if m["type"] == "execution_error")
    assert error["current_inputs"] == {"image": ["broken.png"]}
    assert sorted(error["current_outputs"]) == ["1", "2"]

    outside = invert_and_save(7, prefix="../outside")  # SaveImage refuses to write outside its folder
    second = await heard_running(session, emulator, outside)
    error = next(m["data"] for m in second.messages if m["type"] == "execution_error")
    current = error["current_inputs"]
    assert list(current) == ["images", "filename_prefix", "prompt", "extra_pnginfo"]
    assert current["filename_prefix"] == ["../outside"]
    assert current["prompt"] == [str(outside)]
    assert current["extra_pnginfo"] == [None]
    (picture,) = current["images"]
    assert isinstance(picture, str)
    assert picture.startswith("tensor(")
    assert sorted(error["current_outputs"]) == ["1", "2", "3"]


async def test_a_cached_output_is_marked_finished_with_integer_progress(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Real 0.3.64 marks a cached output finished with `value: 1, max: 1` (ints: its progress entry
    is made as the node finishes), a node that ran with 1.0 and 1.0; the emulator sent 1.0 for both."""
    prompt = workflow("b_emptyimage_save.json")
    ran_once = await heard_running(session, emulator, prompt)
    cached = await heard_running(session, emulator, prompt)

    def finished(listener: Listener) -> list[Any]:
        states = [m["data"]["nodes"].get("2") for m in listener.messages if m["type"] == "progress_state"]
        return [(state["value"], state["max"]) for state in states if state and state["state"] == "finished"]

    assert [type(v) for pair in finished(ran_once) for v in pair] == [float, float]
    assert [type(v) for pair in finished(cached) for v in pair] == [int, int]
