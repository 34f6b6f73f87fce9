"""Hostile and careless clients: malformed bodies, bombs, unsafe methods, refusals by ComfyUI, noise."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from comfybridge.edge.appkeys import HUB, SCHEDULER, SETTINGS
from comfybridge.edge.ws import MAX_BEHIND

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import (
    Client,
    assert_one_line_error,
    bridge_process,
    generate,
    gzip_bomb,
    png,
    read_results,
    run_cli,
    run_job,
    upload,
)

TINY = {"workflow": "solid", "1/width": 8, "1/height": 8, "1/batch_size": 1}
PNG = png()


async def raw_request(client: Client, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client library to tidy them up); the status and body of the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def multipart_request(content_type: bytes, body: bytes) -> bytes:
    return (
        b"POST /upload HTTP/1.1\r\nHost: bridge\r\nContent-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )


def part(header: bytes, boundary: bytes = b"abc") -> bytes:
    return b"--" + boundary + b"\r\n" + header + b"\r\n\r\n" + PNG + b"\r\n--" + boundary + b"--\r\n"


FILE_HEADER = b'Content-Disposition: form-data; name="f"; filename="a.png"'
MALFORMED = {
    "no boundary": (b"multipart/form-data", part(FILE_HEADER)),
    "boundary over 70": (b"multipart/form-data; boundary=" + b"b" * 80, part(FILE_HEADER, b"b" * 80)),
    "control bytes": (b"multipart/form-data; boundary=abc", part(b'Content-Disposition: form-data; name="f\x00\x1b"')),
    "header over 8190": (b"multipart/form-data; boundary=abc", part(FILE_HEADER.replace(b"a.png", b"a" * 9000))),
    "no closing boundary": (b"multipart/form-data; boundary=abc", b"--abc\r\n" + FILE_HEADER + b"\r\n\r\n" + PNG),
    "no boundary at all": (b"multipart/form-data; boundary=abc", b"hello"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_multipart_is_a_400_json(bridge: Client, case: str, caplog: pytest.LogCaptureFixture) -> None:
    status, body = await raw_request(bridge, multipart_request(*MALFORMED[case]))
    assert status == 400
    assert orjson.loads(body)["detail"].startswith("Malformed multipart body: ")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_any_parameter_given_twice_is_refused_and_changes_nothing(bridge: Client) -> None:
    await run_job(bridge, "twice", TINY)
    for method, path, params in (
        ("GET", "/history", [("clientId", "twice"), ("resType", "base64"), ("resType", "xx")]),
        ("POST", "/generate-based-workflow", [("clientId", "twice"), ("wait", "1"), ("wait", "0")]),
        ("GET", "/workflow-info", [("workflow", "solid"), ("workflow", "invert")]),
        ("GET", "/workflow-list", [("detail", "1"), ("detail", "0")]),
    ):
        name = params[-1][0]
        resp = await bridge.request(method, path, params=params, json=TINY if "generate" in path else None)
        assert resp.status == 400, path
        assert (await resp.json())["detail"] == f"{name} is given more than once; give it once."
    assert (await bridge.get("/history", params={"clientId": "twice"})).status == 200  # nothing was handed over
    assert await (await bridge.get("/generation-count")).json() == 1


async def test_a_body_that_is_not_json_says_why(bridge: Client) -> None:
    for raw, why in ((b'{"workflow": "solid", "1/width": NaN}', "unexpected character"), (b"[1e400]", "number")):
        resp = await bridge.post(
            "/generate-based-workflow",
            params={"clientId": "nan"},
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        detail = (await resp.json())["detail"]
        assert (resp.status, detail.startswith("The body is not valid JSON (")) == (400, True), detail
        assert why in detail.lower(), detail


async def test_a_client_id_given_twice_is_refused_and_changes_nothing(bridge: Client) -> None:
    await run_job(bridge, "first", TINY)
    twice = [("clientId", "first"), ("clientId", "second")]
    for method, path in (
        ("POST", "/generate-based-workflow"),
        ("GET", "/history"),
        ("GET", "/execution-info"),
        ("POST", "/interrupt"),
        ("POST", "/free"),
        ("POST", "/upload"),
    ):
        resp = await bridge.request(method, path, params=twice, json=TINY if "generate" in path else None)
        assert resp.status == 400, path
        assert (await resp.json())["detail"] == "clientId is given more than once; give it once."
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await bridge.ws_connect("/ws", params=twice)
    assert refused.value.status == 400
    assert (await bridge.get("/history", params={"clientId": "first"})).status == 200  # nothing was handed over
    assert (await bridge.get("/execution-info", params={"clientId": "second"})).status == 400  # never made


async def test_head_never_hands_results_over(bridge: Client) -> None:
    await run_job(bridge, "linkcheck", TINY)
    head = await bridge.head("/history", params={"clientId": "linkcheck"})
    assert head.status == 405
    assert head.headers["Content-Type"] == "application/json"
    parts = await read_results(await bridge.get("/history", params={"clientId": "linkcheck"}))
    assert len(parts) == 1
    assert (await bridge.head("/generation-count")).status == 200  # HEAD where it changes nothing


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_json_bodies_are_limited_after_decoding(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    client = await make_bridge(await make_emulator(), max_json_mb=1)
    big = orjson.dumps({**TINY, "pad": "x" * (2 * 1024 * 1024)})
    json_type = {"Content-Type": "application/json"}
    resp = await client.post(
        "/generate-based-workflow", params={"clientId": "big"}, data=io.BytesIO(big), headers=json_type
    )
    assert resp.status == 413
    assert await resp.json() == {"detail": "The request body is larger than the limit of 1 MB."}
    # 200 KB of gzip that inflates to 200 MB: refused once 1 MB has been inflated, never held whole.
    bomb = gzip_bomb(200)
    peak = rss_mb()
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    params = {"clientId": "bomb"}
    resp = await client.post("/generate-based-workflow", params=params, data=io.BytesIO(bomb), headers=headers)
    assert resp.status == 413
    assert rss_mb() - peak < 64

    # 200 MB of plain JSON, streamed: refused after the first megabyte, never read whole.
    async def flood() -> AsyncIterator[bytes]:
        yield b'{"workflow": "'
        for _ in range(200):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    with contextlib.suppress(aiohttp.ClientError):  # the bridge may hang up on the rest of the upload
        resp = await client.post(
            "/generate-based-workflow", params={"clientId": "flood"}, data=flood(), headers=json_type
        )
        assert resp.status == 413
    assert rss_mb() - peak < 64
    status, _ = await generate(client, "after", TINY)  # everyone else carries on
    assert status == 200
    assert (await client.get("/execution-info", params={"clientId": "bomb"})).status == 400


async def test_a_prompt_comfyui_refuses_as_too_large_fails_only_that_job(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    emulator.engine.faults.prompt_413 = 1
    frames = await run_job(client, "huge", TINY)
    assert frames[-1]["status"] == "error"
    assert frames[-1]["detail"].startswith("ComfyUI refused the prompt (413): Maximum request body size")
    backend = next(iter(client.app[SCHEDULER].backends.values()))
    assert (backend.submit_failures, backend.usable) == (0, True)
    assert (await run_job(client, "small", TINY))[-1]["status"] == "closed"


async def test_free_with_every_backend_down_says_so(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator)
    await emulator.stop()
    await wait_for(lambda: not any(b.healthy for b in client.app[SCHEDULER].backends.values()))
    resp = await client.post("/free")
    assert resp.status == 503
    assert await resp.json() == {"detail": "No ComfyUI backend is up to free its memory; try again shortly."}


async def test_failed_uploads_leave_no_folders(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), upload_ttl=0.3)
    for index in range(3):
        status, _ = await upload(client, {"file": ("a.txt", b"not media")}, client_id=f"careless-{index}")
        assert status == 415
    root = client.app[SETTINGS].data_dir / "uploads"
    await wait_for(lambda: not [p for p in root.iterdir() if p.name.startswith("c-careless")])


async def test_a_client_leaving_mid_upload_is_no_error(tmp_path: Path) -> None:
    (tmp_path / "workflows").mkdir()
    async with bridge_process(tmp_path) as (proc, url):
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        body = b"--abc\r\n" + FILE_HEADER + b"\r\n\r\n" + PNG + b"\0" * 100_000
        writer.write(multipart_request(b"multipart/form-data; boundary=abc", body + b"\0" * 1000)[:-1000])
        await writer.drain()
        writer.close()  # mid-upload
        await wait_for(lambda: "the client went away" in (tmp_path / "bridge.log").read_text())
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    log = (tmp_path / "bridge.log").read_text()
    assert "Traceback" not in log
    assert " ERROR " not in log


async def test_protocol_garbage_and_a_taken_port_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "workflows").mkdir()
    async with bridge_process(tmp_path) as (proc, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\nFOO\x01 / HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.0 400")
        writer.close()
        reader, writer = await asyncio.open_connection(host, int(port))
        lie = b"this is not gzip"  # a body whose Content-Encoding is false
        writer.write(
            b"POST /generate-based-workflow?clientId=x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: "
            + str(len(lie)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + lie
        )
        await writer.drain()
        head, _, body = (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.1 400")
        assert orjson.loads(body) == {"detail": "The request body could not be read: it is not valid compressed data."}
        (tmp_path / "second" / "workflows").mkdir(parents=True)
        result = await asyncio.to_thread(run_cli, ["--port", port, "--emulate", "1"], tmp_path / "second")
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "in use")
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    log = (tmp_path / "bridge.log").read_text()
    assert "refused a malformed request" in log
    assert "Traceback" not in log
    assert " ERROR " not in log


async def test_a_path_that_is_not_utf8_is_a_json_404_with_either_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "workflows").mkdir()
    for parser in ("C", "Python"):
        if parser == "Python":
            monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")  # aiohttp's pure Python parser lets the bytes through
        async with bridge_process(tmp_path) as (_, url):
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /caf\xe9\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.0 400")), (parser, answer[:80])
            if answer.startswith(b"HTTP/1.1 404"):
                assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["detail"].startswith("Not found: /caf")
    assert " ERROR " not in (tmp_path / "bridge.log").read_text()


def masked_text(payload: bytes) -> bytes:
    """A client's (masked) WebSocket text frame of under 126 bytes."""
    mask = os.urandom(4)
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_socket_that_talks_but_never_reads_is_cut_before_its_backlog_grows_without_bound(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A socket that sends a word now and then is never pinged out (any frame it sends resets
    aiohttp's heartbeat); reading nothing, it filled its buffers, then every frame for it (each
    `listening` heartbeat) waited in its outbox, with no bound: 1 GB in 45 s for 16 such sockets at a
    short heartbeat. Now it is cut once MAX_BEHIND frames wait, and nothing of it stays."""
    client = await make_bridge(await make_emulator(), heartbeat=0.0002)  # many frames, quickly
    hub = client.app[HUB]
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    raw.connect((client.host, client.port))
    raw.setblocking(False)
    _, writer = await asyncio.open_connection(sock=raw)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws?clientId=deaf HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    writer.transport.pause_reading()  # reads nothing, ever
    try:
        await wait_for(lambda: hub.count("deaf") == 1)
        for box in hub._outboxes["deaf"].values():  # the bridge's side buffers little: the test is quick
            box.ws.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        most = 0
        async with asyncio.timeout(60):
            while hub.count("deaf") and most <= 2 * MAX_BEHIND:
                writer.write(masked_text(b"hi"))  # a word now and then: the connection looks alive
                most = max([most, *(len(box.waiting) for box in hub._outboxes.get("deaf", {}).values())])
                await asyncio.sleep(0.05)
    finally:
        writer.close()
    assert most <= MAX_BEHIND
