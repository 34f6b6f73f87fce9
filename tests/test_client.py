"""comfybridge.sdk, async and blocking, against a real bridge in front of the emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from comfybridge.emulator.png import png_first_pixel
from comfybridge.sdk import AsyncBridge, Bridge, BridgeError, Event, JobFailed

from .conftest import BridgeFactory, EmulatorFactory
from .helpers import Client, png


def url_of(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_async_client_runs_a_job_end_to_end(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    client = await make_bridge(await make_emulator())
    events: list[Event] = []
    async with AsyncBridge(url_of(client)) as bridge:
        assert "invert" in await bridge.workflows()
        assert "1/image" in await bridge.inputs("invert")
        job = await bridge.run("invert", files={"1/image": ("green.png", png(8, 8, 0x2ED37E))}, on_event=events.append)
        saved = await bridge.save_results(tmp_path / "out")
        assert await bridge.save_results(tmp_path / "out") == []  # fetched once, then forgotten
    assert events[-1].status == "closed"
    assert events[-1].job_id == job.job_id
    assert [e.percent for e in events if e.percent is not None][-1] == 100.0
    [result] = saved
    assert result.job_id == job.job_id
    assert job.job_id in result.path.name
    assert png_first_pixel(result.path.read_bytes()) == 0xFFFFFF ^ 0x2ED37E


async def test_async_client_raises_the_bridges_detail(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator())
    async with AsyncBridge(url_of(client)) as bridge:
        with pytest.raises(BridgeError) as refused:
            await bridge.generate("nope")
        assert refused.value.status == 400
        assert refused.value.detail.startswith("Unknown workflow 'nope'")
        with pytest.raises(JobFailed) as failed:
            await bridge.run("broken")
        assert "cannot identify image file" in failed.value.detail
    async with AsyncBridge(url_of(client), api_key="not-a-key") as stranger:
        assert await stranger.generation_count() >= 1  # keys are off: any key is ignored


async def test_the_client_reports_the_bridges_own_detail_for_a_refused_socket(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    key = "k" * 24
    client = await make_bridge(await make_emulator(), api_keys=(key,), max_sockets_per_client=1)
    async with AsyncBridge(url_of(client), api_key="wrong-key-of-some-length") as stranger:
        with pytest.raises(BridgeError) as refused:
            await anext(stranger.events())
        assert (refused.value.status, refused.value.detail) == (401, "That API key is not valid.")
    async with AsyncBridge(url_of(client), client_id="one-socket", api_key=key) as first:
        events = first.events()
        assert (await anext(events)).status == "connected"
        async with AsyncBridge(url_of(client), client_id="one-socket", api_key=key) as second:
            with pytest.raises(BridgeError) as refused:
                await anext(second.events())
            assert refused.value.status == 429
            assert refused.value.detail == "This clientId already has 1 sockets open, the limit."
        await events.aclose()


async def test_blocking_client_follows_and_saves_from_a_thread(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    client = await make_bridge(await make_emulator(pace=0.02))
    url = url_of(client)

    def script() -> tuple[list[Event], list[Path], str]:
        with Bridge(url) as bridge:
            job = bridge.generate("solid", {"1/batch_size": 1, "1/width": 16})
            events = list(bridge.follow(job))
            saved = [r.path for r in bridge.save_results(tmp_path / "sync")]
            return events, saved, job.job_id

    events, saved, job_id = await asyncio.to_thread(script)
    assert events[-1].status == "closed"
    assert all(e.job_id in (None, job_id) for e in events)
    assert [p.name for p in saved] == [f"wf_b_empty_{job_id}_00001_.png"]


async def test_the_client_saves_a_result_named_like_a_folder_inside_its_folder(
    make_fake: Any, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    fake = await make_fake()

    def named_dot(text: str) -> str:
        message = orjson.loads(text)
        if message.get("type") == "executed":
            for item in message["data"]["output"].get("images", []):
                item["filename"] = "."
        return orjson.dumps(message).decode()

    fake.rewrite = named_dot
    fake.replace("GET /view", 200, png())
    client = await make_bridge(fake.url)
    async with AsyncBridge(url_of(client)) as bridge:
        await bridge.run("solid", {"1/batch_size": 1})
        saved = await bridge.save_results(tmp_path / "out")
    assert [r.path.parent for r in saved] == [tmp_path / "out"]
    assert saved[0].path.read_bytes() == png()


async def test_one_request_generates_and_saves_or_raises_the_jobs_error(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    client = await make_bridge(await make_emulator())
    async with AsyncBridge(url_of(client)) as bridge:
        [result] = await bridge.generate_and_save("invert", tmp_path / "one", files={"1/image": ("g.png", png(8, 8))})
        with pytest.raises(JobFailed) as failed:
            await bridge.generate_and_save("broken", tmp_path / "none")
        assert "cannot identify image file" in failed.value.detail
        assert await bridge.save_results(tmp_path / "rest") == []  # handed over in the answer already
    assert result.job_id is not None
    assert result.job_id in result.path.name
    assert png_first_pixel(result.path.read_bytes()) == 0xFFFFFF ^ 0x336699


async def test_a_502_that_names_no_job_is_the_bridges_error_not_a_jobs(aiohttp_server: Any, tmp_path: Path) -> None:
    """A relaying bridge's (or a proxy's) own 502 is not a job that failed."""

    async def relay_lost(request: web.Request) -> web.Response:
        return web.json_response({"detail": "The bridge that leads stopped answering"}, status=502)

    app = web.Application()
    app.router.add_post("/generate-based-workflow", relay_lost)
    server = await aiohttp_server(app)
    async with AsyncBridge(str(server.make_url("")).rstrip("/")) as bridge:
        with pytest.raises(BridgeError) as refused:
            await bridge.generate_and_save("solid", tmp_path)
    assert refused.value.status == 502
    assert refused.value.detail == "The bridge that leads stopped answering"
