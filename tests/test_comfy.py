"""The ComfyUI client's reading of ComfyUI's answers, including the failures the emulator does not make."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from comfybridge.comfy.client import BackendUnavailable, ComfyClient, PromptRefused
from comfybridge.comfy.shapes import OutputRef, describe_refusal, outputs_of


def test_outputs_of_every_kind_and_only_outputs() -> None:
    outputs = {
        "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]},
        "4": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]},
        "12": {"gifs": [{"filename": "v.mp4", "subfolder": "vid", "type": "output", "format": "video/h264-mp4"}]},
        "13": {"audio": [{"filename": "s.flac", "subfolder": "", "type": "output"}], "animated": [True]},
        "14": {"videos": [{"filename": "w.webm", "subfolder": "", "type": "output"}], "text": ["hi"]},
        "15": {"images": [{"filename": ["not", "a", "name"], "type": "output"}, "junk", {"type": "output"}]},
        "16": ["not", "an", "object"],
    }
    assert outputs_of(outputs) == [
        OutputRef("a.png", "", "output"),
        OutputRef("v.mp4", "vid", "output"),
        OutputRef("s.flac", "", "output"),
        OutputRef("w.webm", "", "output"),
    ]


def test_refusal_text_names_nodes() -> None:
    body = {
        "error": {"type": "invalid_prompt", "message": "Cannot execute because node X does not exist.",
                  "details": "Node ID '#1'", "extra_info": {}},
        "node_errors": {},
    }  # fmt: skip
    assert describe_refusal(body) == "Cannot execute because node X does not exist. (Node ID '#1')"
    assert describe_refusal("garbage") == "ComfyUI refused the prompt"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def fake_comfy(aiohttp_server: Any) -> AsyncIterator[Callable[..., Awaitable[ComfyClient]]]:
    """A ComfyUI that answers one route with a canned response: for failures the emulator does not make.

    (aioresponses, the usual tool here, cannot build responses for aiohttp 3.14 yet: its issue #289.)"""
    async with aiohttp.ClientSession() as session:

        async def make(routes: list[tuple[str, str, Handler]]) -> ComfyClient:
            app = web.Application()
            for method, path, handler in routes:
                app.router.add_route(method, path, handler)
            server = await aiohttp_server(app)
            return ComfyClient(str(server.make_url("")), session, "bridge-test")

        yield make


def answer(status: int, body: bytes = b"", calls: list[str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        if calls is not None:
            calls.append(await request.text())
        return web.Response(status=status, body=body, content_type="application/json")

    return handler


async def test_submit_outcomes(fake_comfy: Any, unused_tcp_port: int) -> None:
    refused = await fake_comfy([("POST", "/prompt", answer(400, b"not json"))])
    with pytest.raises(PromptRefused, match=r"ComfyUI refused the prompt \(400\): not json"):
        await refused.submit({}, "p1")
    too_large = await fake_comfy([("POST", "/prompt", answer(413, b"Maximum request body size exceeded"))])
    with pytest.raises(PromptRefused, match=r"\(413\): Maximum request body size exceeded"):
        await too_large.submit({}, "p1")
    overloaded = await fake_comfy([("POST", "/prompt", answer(503))])
    with pytest.raises(BackendUnavailable, match="answered HTTP 503"):
        await overloaded.submit({}, "p1")
    accepted = await fake_comfy(
        [("POST", "/prompt", answer(200, b'{"prompt_id": "p1", "number": 3, "node_errors": {}}'))]
    )
    await accepted.submit({}, "p1")
    async with aiohttp.ClientSession() as session:
        nobody = ComfyClient(f"http://127.0.0.1:{unused_tcp_port}", session, "bridge-test")
        with pytest.raises(BackendUnavailable, match="ClientConnectorError"):
            await nobody.submit({}, "p1")


async def test_interrupt_only_when_that_prompt_runs(fake_comfy: Any) -> None:
    interrupts: list[str] = []
    other = b'{"queue_running": [[1, "other", {}, {}, []]], "queue_pending": []}'
    busy = await fake_comfy(
        [("GET", "/queue", answer(200, other)), ("POST", "/interrupt", answer(200, b"", interrupts))]
    )
    await busy.interrupt("mine")
    assert interrupts == []  # another client's prompt runs: never interrupt it
    mine = b'{"queue_running": [[2, "mine", {}, {}, []]], "queue_pending": []}'
    running = await fake_comfy(
        [("GET", "/queue", answer(200, mine)), ("POST", "/interrupt", answer(200, b"", interrupts))]
    )
    await running.interrupt("mine")
    assert interrupts == ['{"prompt_id":"mine"}']
