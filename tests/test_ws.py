"""The WebSocket channel: status frames, progress, errors, and disconnect = cancel."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import logging
import os
import re
import socket
import struct
import termios
import time
import tracemalloc
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from comfybridge.core.clients import about_job, status_message
from comfybridge.core.jobs import JobState
from comfybridge.core.supervisor import Supervisor
from comfybridge.edge.appkeys import HUB, JOURNAL, SCHEDULER
from comfybridge.edge.ws import HIGH_WATER, MAX_BEHIND, MAX_HELD, Outbox, text_frame
from comfybridge.emulator import Emulator

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import TINY, Client, frames_until, generate, poll_status, run_job, seed, slow_ends
from .test_scheduling import held_journal

CONNECTED = {"status": "connected", "detail": "server connected", "details": "server connected"}
LISTENING = {"status": "listening", "detail": "server is listening", "details": "server is listening"}
INTERRUPTED = {"status": "error", "detail": "interrupted", "details": "interrupted"}

pytestmark = pytest.mark.both_dialects  # every test here runs against both ComfyUI dialects


def interrupted_prompts(emulator: Emulator) -> list[str]:
    return [
        pid
        for pid, entry in emulator.engine.history.items()
        if any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    ]


async def test_open_socket_says_connected_then_listening(bridge: Client) -> None:
    async with bridge.ws_connect("/ws", params={"clientId": "hello"}) as ws:
        assert orjson.loads((await ws.receive()).data) == CONNECTED
        assert orjson.loads((await ws.receive()).data) == LISTENING
        assert orjson.loads((await ws.receive()).data) == LISTENING


async def test_progress_rises_to_100_then_closed(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator(pace=0.02)
    client = await make_bridge(emulator, progress_every=0)  # every rise
    frames = await run_job(client, "steps", {"workflow": "text-to-image", "3/steps": 10})
    start = next(i for i, f in enumerate(frames) if f["status"] == "progress")
    running = frames[start:-1]
    assert all(f["status"] == "progress" for f in running), "no listening frame while the job runs"
    values = [float(f["detail"].rstrip("%")) for f in running]
    assert all(re.fullmatch(r"\d{1,3}\.\d{2}%", f["detail"]) for f in running)
    assert all(f["details"] == f["detail"] for f in running)
    assert values == sorted(values)
    assert running[-1]["detail"] == "100.00%"
    # The sampler's ten steps are most of the job, so they show as many distinct values.
    assert len({v for v in values if 0 < v < 100}) >= 8
    assert seed(frames[-1]) == {"status": "closed", "detail": "Execution is done", "details": "Execution is done"}


async def test_runtime_error_is_sent_then_socket_closes_1011(bridge: Client) -> None:
    async with bridge.ws_connect("/ws", params={"clientId": "err"}) as ws:
        await generate(bridge, "err", {"workflow": "broken"})
        frames = await frames_until(ws, "error")
        detail = frames[-1]["detail"]
        assert detail.startswith("node 1 (LoadImage): PIL.UnidentifiedImageError: cannot identify image file")
        assert detail.endswith("broken.png'")
        assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1011
    info = await (await bridge.get("/execution-info", params={"clientId": "err"})).json()
    assert seed(info) == {"status": "error", "detail": detail, "details": detail}


async def test_comfyui_validation_error_reaches_the_client(bridge: Client) -> None:
    frames = await run_job(bridge, "refused", {"workflow": "bad_ckpt"})
    assert frames[-1]["status"] == "error"
    assert frames[-1]["detail"].startswith(
        "Prompt outputs failed validation: node 4 (CheckpointLoaderSimple): Value not in list: "
        "ckpt_name: 'missing-model.safetensors' not in ['v1-5-pruned-emaonly.safetensors']"
    )


async def test_error_keeps_socket_open_while_more_jobs_wait(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    emulator.engine.faults.runtime_error = 1  # the first job fails...
    emulator.engine.faults.start_delay = 0.3  # ...once the second one is surely in line
    client = await make_bridge(emulator)
    async with client.ws_connect("/ws", params={"clientId": "two"}) as ws:
        await generate(client, "two", {"workflow": "solid", "1/batch_size": 1})
        await generate(client, "two", {"workflow": "solid", "1/batch_size": 1})
        frames = await frames_until(ws, "closed")
        assert [f["status"] for f in frames if f["status"] in ("error", "closed")] == ["error", "closed"]
        assert not ws.closed


@pytest.mark.parametrize(("first", "endings"), [("broken", "error"), ("solid", "closed")])
async def test_an_error_that_waited_behind_an_earlier_job_closes_the_socket_when_it_leaves_nothing(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, first: str, endings: str
) -> None:
    """The contract: after an `error` "the bridge closes it with code 1011 after sending the frame,
    unless the client has further jobs in line". Job 2 is refused by ComfyUI's validation while
    job 1 still runs (failing, or not): its error waits behind job 1's ending, and the close is
    decided as it is sent (jobs_left 0), not as it was made."""
    emulator = await make_emulator(pace=0.3)
    client = await make_bridge(emulator)
    async with client.ws_connect("/ws", params={"clientId": "refused"}) as ws:
        await ws.receive()  # connected
        assert (
            await generate(
                client, "refused", {"workflow": first, "1/batch_size": 1} if first == "solid" else {"workflow": first}
            )
        )[0] == 200
        assert (await generate(client, "refused", {"workflow": "bad_ckpt"}))[0] == 200
        seen: list[tuple[str, int]] = []
        while (msg := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:  # open after the last: a time-out
            frame = orjson.loads(msg.data)
            if frame["status"] in ("closed", "error"):
                seen.append((frame["status"], frame["jobs_left"]))
        assert seen == [(endings, 1), ("error", 0)]
        assert ws.close_code == 1011


async def test_every_socket_of_a_client_gets_the_frames(bridge: Client) -> None:
    async with (
        bridge.ws_connect("/ws", params={"clientId": "multi"}) as one,
        bridge.ws_connect("/ws", params={"clientId": "multi"}) as two,
    ):
        await generate(bridge, "multi", {"workflow": "solid", "1/batch_size": 1})
        assert (await frames_until(one, "closed"))[-1]["status"] == "closed"
        assert (await frames_until(two, "closed"))[-1]["status"] == "closed"


async def test_disconnect_cancels_after_grace(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator(pace=0.3)
    client = await make_bridge(emulator, disconnect_grace=0.2)
    async with client.ws_connect("/ws", params={"clientId": "gone"}) as ws:
        await generate(client, "gone", {"workflow": "slow", "2/seed": 7})
        await frames_until(ws, "progress")
    await wait_for(lambda: len(interrupted_prompts(emulator)) == 1)
    info = await (await client.get("/execution-info", params={"clientId": "gone"})).json()
    assert seed(info) == INTERRUPTED


async def test_socket_back_within_grace_keeps_the_job(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator(pace=0.05)
    client = await make_bridge(emulator, disconnect_grace=30)
    async with client.ws_connect("/ws", params={"clientId": "flaky"}) as ws:
        await generate(client, "flaky", {"workflow": "slow", "2/seed": 8})
        await frames_until(ws, "progress")
    async with client.ws_connect("/ws", params={"clientId": "flaky"}) as ws:
        assert (await frames_until(ws, {"closed", "error"}))[-1]["status"] == "closed"
    assert interrupted_prompts(emulator) == []


async def test_a_socket_back_within_grace_hears_what_was_told_while_it_was_away(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Two jobs end while the client's socket is away: back within the grace, it hears both endings,
    in order, the last with jobs_left 0, as if it had never left."""
    client = await make_bridge(await make_emulator(pace=0.05), disconnect_grace=30)
    async with client.ws_connect("/ws", params={"clientId": "away"}) as ws:
        first = (await generate(client, "away", {"workflow": "slow", "2/seed": 1}))[1]["job_id"]
        second = (await generate(client, "away", {"workflow": "slow", "2/seed": 2}))[1]["job_id"]
        await frames_until(ws, "progress")
    await poll_status(client, "away", {"closed"})  # both ended meanwhile
    async with client.ws_connect("/ws", params={"clientId": "away"}) as ws:
        frames = await frames_until(ws, "closed")
        frames += await frames_until(ws, "closed")
    endings = [(f["job_id"], f["jobs_left"]) for f in frames if f["status"] == "closed"]
    assert endings == [(first, 1), (second, 0)]


async def test_a_socket_closed_while_the_last_end_is_recorded_hears_it_when_back(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator(), disconnect_grace=30)
    journal = client.app[JOURNAL]
    gate, held = slow_ends(journal)
    ws = await client.ws_connect("/ws", params={"clientId": "gap"})
    status, answer = await generate(client, "gap", TINY)
    assert status == 200
    await wait_for(lambda: held == [answer["job_id"]])  # it ran; its end is being written
    await ws.close()
    await wait_for(lambda: client.app[HUB].count("gap") == 0)
    gate.set()
    await poll_status(client, "gap", {"closed"})
    async with client.ws_connect("/ws", params={"clientId": "gap"}) as ws:  # back well within the grace
        async with asyncio.timeout(3):
            frames = await frames_until(ws, "closed")
    assert frames[-1]["job_id"] == answer["job_id"]


async def test_jobs_that_end_within_the_grace_are_not_said_cancelled(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_bridge(await make_emulator(), disconnect_grace=0.3)
    scheduler = client.app[SCHEDULER]
    with caplog.at_level(logging.INFO, logger="comfybridge.core.scheduler"):
        async with client.ws_connect("/ws", params={"clientId": "brief"}):
            await generate(client, "brief", {"workflow": "solid", "1/batch_size": 1})
        await wait_for(lambda: "brief" in scheduler._grace)
        await wait_for(lambda: "brief" not in scheduler._grace)  # the grace ran out, the job long done
    assert (await poll_status(client, "brief", {"closed", "error"}))["status"] == "closed"
    assert "cancelling" not in caplog.text


async def test_a_plain_request_to_the_socket_is_told_what_it_is(bridge: Client) -> None:
    resp = await bridge.get("/ws", params={"clientId": "curious"})
    assert resp.status == 400
    assert await resp.json() == {
        "detail": "This is the WebSocket endpoint: connect to it with a WebSocket client (Upgrade: websocket)."
    }


async def test_rest_only_jobs_are_never_cancelled_by_sockets(bridge: Client) -> None:
    status, _ = await generate(bridge, "rest", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200
    assert (await poll_status(bridge, "rest", {"closed", "error"}))["status"] == "closed"


async def test_interrupt_running_job(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    emulator = await make_emulator(pace=0.3)
    client = await make_bridge(emulator)
    async with client.ws_connect("/ws", params={"clientId": "stop"}) as ws:
        await generate(client, "stop", {"workflow": "slow", "2/seed": 9})
        await frames_until(ws, "progress")
        resp = await client.post("/interrupt", params={"clientId": "stop"})
        assert await resp.json() == {"detail": "interrupted that clientId will be ignored. / stop"}
        frames = await frames_until(ws, "error")
        assert seed(frames[-1]) == INTERRUPTED
        assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSE
    await wait_for(lambda: len(interrupted_prompts(emulator)) == 1)


async def test_interrupting_several_jobs_tells_each_ones_end_in_order(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Two jobs running at once on two GPUs, then one interrupt: each job's `error`, the first
    job's before anything of the second's (the second's progress, held back until then, may come
    in between), and the socket closes after the last."""
    first_gpu, second_gpu = await make_emulator(pace=0.3), await make_emulator(pace=0.3)
    client = await make_bridge(first_gpu, second_gpu)
    async with client.ws_connect("/ws", params={"clientId": "both"}) as ws:
        jobs = []
        for seed_value in (1, 2):
            status, body = await generate(client, "both", {"workflow": "slow", "2/seed": seed_value})
            assert status == 200
            jobs.append(body["job_id"])
        await wait_for(lambda: all(e.engine.started for e in (first_gpu, second_gpu)))  # both run now
        await frames_until(ws, "progress")
        await client.post("/interrupt", params={"clientId": "both"})
        frames = await frames_until(ws, "error")
        while frames[-1].get("job_id") != jobs[-1]:
            frames += await frames_until(ws, "error")
        assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSE
    about = [f for f in frames if "job_id" in f]
    assert [f["job_id"] for f in about] == sorted((f["job_id"] for f in about), key=jobs.index)  # never interleaved
    ends = [(f["job_id"], f["jobs_left"], seed(f)) for f in about if f["status"] == "error"]
    assert ends == [(jobs[0], 1, INTERRUPTED), (jobs[1], 0, INTERRUPTED)]


async def test_a_client_hears_about_its_jobs_one_after_another(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    client = await make_bridge(await make_emulator(pace=0.05))
    async with client.ws_connect("/ws", params={"clientId": "story"}) as ws:
        jobs = []
        for seed_value in (1, 2, 3):
            status, body = await generate(client, "story", {"workflow": "slow", "2/seed": seed_value})
            assert status == 200
            jobs.append(body["job_id"])
        frames = []
        while len([f for f in frames if f["status"] == "closed"]) < 3:
            frames.extend(await frames_until(ws, "closed"))
    about = [f for f in frames if "job_id" in f]
    assert [f["job_id"] for f in about] == sorted((f["job_id"] for f in about), key=jobs.index)  # never interleaved
    closes = [f for f in about if f["status"] == "closed"]
    assert [(f["job_id"], f["jobs_left"]) for f in closes] == [(jobs[0], 2), (jobs[1], 1), (jobs[2], 0)]
    for job_id in jobs:
        percents = [float(f["detail"][:-1]) for f in about if f["job_id"] == job_id and f["status"] == "progress"]
        assert percents == sorted(percents)
        assert percents[-1] == 100.0
    info = await (await client.get("/execution-info", params={"clientId": "story"})).json()
    assert (info["status"], info["job_id"], info["jobs_left"]) == ("closed", jobs[2], 0)
    resp = await client.get("/history", params={"clientId": "story"})
    reader = aiohttp.MultipartReader.from_response(resp)
    owners, names = [], []
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        await part.read()
        owners.append(part.headers["X-Job-Id"])
        names.append(part.filename)
    assert owners == jobs
    assert names == [f"wf_c_slow_{job_id}_00001_.png" for job_id in jobs]  # matched by name, not by counting


async def test_a_job_whose_backend_is_away_says_so(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    emulator = await make_emulator(pace=0.5)
    client = await make_bridge(emulator, backend_grace=30)
    async with client.ws_connect("/ws", params={"clientId": "stranded"}) as ws:
        await generate(client, "stranded", {"workflow": "slow", "2/seed": 9})
        await frames_until(ws, "progress")
        await emulator.stop()
        frames = await frames_until(ws, "listening")
    assert frames[-1]["detail"] == "waiting for its ComfyUI to come back (up to 30s)"
    info = await (await client.get("/execution-info", params={"clientId": "stranded"})).json()
    assert (info["status"], info["detail"]) == ("listening", "waiting for its ComfyUI to come back (up to 30s)")


async def test_frames_to_a_slow_reader_wait_in_order_and_close_comes_last() -> None:
    """While a socket's buffer is full, frames wait in its outbox and one task sends them in order;
    a frame published meanwhile never jumps the line; after the 1011 close nothing is written."""

    class Transport(asyncio.WriteTransport):
        def __init__(self) -> None:
            super().__init__()
            self.buffered = HIGH_WATER  # the client is not reading
            self.written: list[bytes] = []

        def write(self, data: Any) -> None:
            self.written.append(bytes(data))

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def is_closing(self) -> bool:
            return False

    class Socket:
        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.closed_with: int | None = None
            self.closed = False

        async def send_frame(self, frame: bytes, opcode: WSMsgType) -> None:
            await asyncio.sleep(0)
            self.sent.append(frame)

        async def close(self, code: int, message: bytes) -> None:
            self.closed_with, self.closed = code, True

    transport, socket = Transport(), Socket()
    outbox = Outbox(socket, transport, Supervisor())  # type: ignore[arg-type]
    outbox.put(b"one")
    transport.buffered = 0  # drained, but "one" still waits: "two" must queue behind it
    outbox.put(b"two")
    await wait_for(lambda: outbox.sender is None)
    assert socket.sent == [b"one", b"two"]
    assert transport.written == []
    outbox.put(b"three")  # nothing waits now: straight to the socket, as one text frame
    assert transport.written == [text_frame(b"three")] == [b"\x81\x05three"]
    outbox.put(None)
    await wait_for(lambda: socket.closed_with is not None)
    assert socket.closed_with == 1011
    outbox.put(b"four")  # after the Close frame nothing more goes out, straight or queued
    assert outbox.sender is None
    assert not outbox.waiting
    assert transport.written == [text_frame(b"three")]
    assert socket.sent == [b"one", b"two"]


def test_a_frame_to_a_socket_of_uvloop_is_written_at_once() -> None:
    """uvloop's transports have WriteTransport's methods but not its class: a frame to one is written
    straight, as to asyncio's, not sent by a task of its own."""
    uvloop = pytest.importorskip("uvloop")

    class Socket:
        closed = False

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        heard: asyncio.Future[bytes] = loop.create_future()

        class Reader(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                heard.set_result(data)

        server = await loop.create_server(Reader, "127.0.0.1", 0)
        transport, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname()[:2])
        try:
            outbox = Outbox(Socket(), transport, Supervisor())  # type: ignore[arg-type]
            outbox.put(b"one")
            assert outbox.sender is None
            return await asyncio.wait_for(heard, 5)
        finally:
            transport.close()
            server.close()
            await server.wait_closed()

    assert uvloop.run(main()) == text_frame(b"one")


async def test_progress_frames_are_coalesced_the_last_never_held_back(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Within `progress_every` only the latest percent would be told, once it is over: with one
    longer than the job, its first frame and its 100.00% are all, and `closed` follows at once.
    It is also longer than the machine has been up: a job never told is not one told at boot."""
    emulator = await make_emulator(pace=0.02)
    client = await make_bridge(emulator, progress_every=time.monotonic() + 3600)
    frames = await run_job(client, "coalesced", {"workflow": "text-to-image", "3/steps": 10})
    progress = [f["detail"] for f in frames if f["status"] == "progress"]
    assert len(progress) == 2
    assert progress[-1] == "100.00%"
    assert frames[-1]["status"] == "closed"


async def test_an_error_held_for_a_socket_away_closes_nothing_once_a_job_is_in_line(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A job fails while its client's socket is away (within disconnect_grace): its `error`, with
    nothing in line then, waits for the socket with a close behind it. The client submits another
    job over REST, then comes back: it hears the error, and its socket stays open for the new job."""
    emulator = await make_emulator()
    client = await make_bridge(emulator, disconnect_grace=30)
    emulator.engine.pause()
    async with client.ws_connect("/ws", params={"clientId": "away"}) as ws:
        await ws.receive()  # connected
        assert (await generate(client, "away", {"workflow": "broken"}))[0] == 200
    emulator.engine.resume()
    assert (await poll_status(client, "away", {"error", "closed"}, timeout=20))["status"] == "error"
    emulator.engine.pause()  # the next job stays in line
    assert (await generate(client, "away", TINY))[0] == 200
    async with client.ws_connect("/ws", params={"clientId": "away"}) as ws:
        heard = [orjson.loads((await ws.receive(timeout=10)).data)["status"] for _ in range(2)]
        assert heard == ["connected", "error"]
        emulator.engine.resume()
        frames = await frames_until(ws, {"closed", "error"})
        assert frames[-1]["status"] == "closed"  # the new job's: the socket stayed open for it


async def _read_frames(reader: asyncio.StreamReader, wanted: int) -> int:
    """Text frames read (server frames are unmasked) until `wanted` carry a job_id or the socket ends."""
    await reader.readuntil(b"\r\n\r\n")
    heard = 0
    while heard < wanted:
        try:
            head = await reader.readexactly(2)
            size = head[1] & 0x7F
            if size == 126:
                size = int.from_bytes(await reader.readexactly(2), "big")
            elif size == 127:
                size = int.from_bytes(await reader.readexactly(8), "big")
            payload = await reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return heard  # the bridge cut the connection
        if head[0] & 0x0F == 0x1 and orjson.loads(payload).get("job_id"):
            heard += 1
        elif head[0] & 0x0F == 0x8:
            return heard
    return heard


async def test_a_socket_back_hears_every_frame_held_for_it_not_cut_by_its_own_replay(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """README: a socket back within its grace (or after a restart, within 30 s) hears what was held
    for it, in order; up to MAX_HELD (4,096) frames are held. The replay puts them all in the new
    socket's outbox in one go, before the client can read one: past the kernel's buffers (small here,
    as on a real network: a reading client with a 4 KB receive buffer) and 64 KB, the rest wait, and
    at MAX_BEHIND (1,024) the new socket is cut and they are dropped, though its client reads."""
    client = await make_bridge(await make_emulator())
    hub = client.app[HUB]
    held = MAX_HELD - 16
    hub.hold(("back",), 60)  # as after a restart, or a socket lost within its grace
    for n in range(held):
        hub.publish("back", about_job(status_message("closed", "Execution is done"), f"{n:032x}", held - n - 1))
    for site in client.server.runner.sites:
        for sock in site._server.sockets:  # what a real network's path allows (loopback's MSS of 64 KB does not)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect((client.host, client.port))
    raw.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=raw)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws?clientId=back HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    try:
        async with asyncio.timeout(30):
            heard = await _read_frames(reader, held)  # it reads all the while
    finally:
        writer.close()
    assert heard == held, f"heard {heard} of {held} held frames (cut at {MAX_BEHIND} behind)"


async def test_a_jobs_ending_told_past_the_held_limit_is_still_heard(bridge: Client) -> None:
    """Past MAX_HELD frames held for a client, the newest were dropped, its job's ending among them:
    the socket back never heard `closed`. Progress is said again; an ending is not."""
    hub, job = bridge.app[HUB], f"{7:032x}"
    hub.hold(("long-away",), 60)
    for n in range(MAX_HELD + 10):
        hub.publish("long-away", about_job(status_message("progress", f"{n % 100}.00%"), job, 1))
    hub.publish("long-away", about_job(status_message("closed", "Execution is done"), job, 0))
    async with bridge.ws_connect("/ws", params={"clientId": "long-away"}) as ws:
        frames = await frames_until(ws, "closed", timeout=30)
    assert (frames[-1]["job_id"], len(frames)) == (job, MAX_HELD + 2)  # connected, the held progress, closed


@pytest.mark.parametrize("draining", [False, True])
async def test_a_client_that_fetched_with_its_socket_open_is_forgotten_when_the_socket_closes(
    bridge: Client, draining: bool
) -> None:
    """CONTRACT: a clientId stays known "until its last result is fetched or expires and it has no
    socket open". One that fetched its results while its socket was open was forgotten by nothing
    when the socket closed: `/execution-info` said `closed` for a day (result_ttl), not 400. So too
    while a stopping bridge still serves (drain, stop_grace): only a closed scheduler forgets nothing."""
    scheduler = bridge.app[SCHEDULER]
    async with bridge.ws_connect("/ws", params={"clientId": "sock"}) as ws:
        await run_job(bridge, "sock", {"workflow": "solid", "1/batch_size": 1})
        await frames_until(ws, "closed")
        resp = await bridge.get("/history", params={"clientId": "sock"})
        assert resp.status == 200
        await resp.read()
        assert (await bridge.get("/execution-info", params={"clientId": "sock"})).status == 200  # its socket is open
        if draining:
            await scheduler.drain(0.5)  # as SIGTERM with `drain` does (or stop_dispatching without it)
    await wait_for(lambda: scheduler.clients.get("sock") is None)
    resp = await bridge.get("/execution-info", params={"clientId": "sock"})
    assert resp.status == 400, await resp.text()
    resp = await bridge.get("/history", params={"clientId": "sock"})
    assert resp.status == 204
    assert resp.headers["X-Detail"].startswith("The client ID has not been submitted to the server before.")


async def test_execution_info_counts_a_job_accepted_while_the_first_waits_inside_comfyui(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """API.md: `jobs_left` is counted when the body is sent. A job accepted while the client's first
    one waited inside ComfyUI was not counted by `/execution-info` until that first job's next frame."""
    client = await make_bridge(await make_emulator(pace=0.5))
    status, _ = await generate(client, "other", {"workflow": "solid", "1/batch_size": 8})  # busy for a while
    assert status == 200
    status, first = await generate(client, "mine", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200
    mine = client.app[SCHEDULER].clients.get("mine")
    assert mine is not None
    await wait_for(lambda: mine.jobs[first["job_id"]].state is JobState.QUEUED)  # handed over, waiting there
    info = await (await client.get("/execution-info", params={"clientId": "mine"})).json()
    assert (info["status"], info["job_id"], info["jobs_left"]) == ("connected", first["job_id"], 1)
    status, _ = await generate(client, "mine", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200
    info = await (await client.get("/execution-info", params={"clientId": "mine"})).json()
    assert (info["status"], info["job_id"], info["jobs_left"]) == ("connected", first["job_id"], 2)


async def test_an_ending_held_while_the_socket_was_away_counts_a_job_accepted_since_in_jobs_left(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """docs/API.md: `jobs_left` is "counted when the frame is sent, so `0` really is the last ending".
    A client's socket drops mid-job (a flaky mobile link); the job ends while it is away, so its
    `closed` is held for the socket's return. Meanwhile the client submits a second job over REST.
    Back within the grace, the socket hears the first job's `closed`: the second job is still to
    end, so `jobs_left` must be 1. The bridge sends the frame as it was encoded when the job ended,
    `jobs_left: 0`, and an app that stops at `jobs_left == 0` closes its socket, which cancels the
    second job after the grace."""
    client = await make_bridge(await make_emulator(pace=0.05), disconnect_grace=30)
    async with client.ws_connect("/ws", params={"clientId": "flaky-link"}) as ws:
        status, answer = await generate(client, "flaky-link", {"workflow": "slow", "2/seed": 1})
        assert status == 200, answer
        first = answer["job_id"]
        await frames_until(ws, "progress")
    await poll_status(client, "flaky-link", {"closed"})  # the first job ended while the socket was away
    status, answer = await generate(client, "flaky-link", {"workflow": "slow", "2/seed": 2})
    assert status == 200, answer
    second = answer["job_id"]
    async with client.ws_connect("/ws", params={"clientId": "flaky-link"}) as ws:
        frames = await frames_until(ws, "closed")
        assert (frames[-1]["job_id"], frames[-1]["jobs_left"]) == (first, 1), frames
        frames = await frames_until(ws, "closed")
        assert (frames[-1]["job_id"], frames[-1]["jobs_left"]) == (second, 0), frames


async def test_a_socket_back_hears_a_later_jobs_ending_after_an_error_held_while_it_was_away(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A client's socket drops; its job fails while it is away (its `error`, which left the client
    nothing at that moment, is held with the close that follows it). Still within the grace the
    client submits another job over REST, which ends well. Its socket back must hear both endings,
    the `error` and then the second job's `closed` (the contract closes a socket after an `error`
    only "unless the client has further jobs in line"; docs/API.md: frames of job n+1 come after
    job n's ending). The bridge replays the held close right after the `error` and cuts the socket
    with 1011: the second job's frames, its `closed` among them, are never heard."""
    emulator = await make_emulator(pace=0.02)
    client = await make_bridge(emulator, disconnect_grace=30)
    emulator.engine.pause()
    async with client.ws_connect("/ws", params={"clientId": "away-err"}) as ws:
        emulator.engine.faults.runtime_error = 1  # the first job fails
        status, answer = await generate(client, "away-err", {"workflow": "solid", "1/batch_size": 1})
        assert status == 200, answer
        first = answer["job_id"]
        await frames_until(ws, "connected")
    emulator.engine.resume()
    failed = await poll_status(client, "away-err", {"error"})  # it failed while the socket was away
    assert failed["job_id"] == first
    status, answer = await generate(client, "away-err", {"workflow": "solid", "1/batch_size": 2})
    assert status == 200, answer
    second = answer["job_id"]
    done = await poll_status(client, "away-err", {"closed"})
    assert done["job_id"] == second
    async with client.ws_connect("/ws", params={"clientId": "away-err"}) as ws:
        frames = await frames_until(ws, "error")
        assert frames[-1]["job_id"] == first
        try:
            frames = await frames_until(ws, "closed")
        except AssertionError:
            raise AssertionError(f"the socket was closed ({ws.close_code}) before the second job's ending") from None
        assert frames[-1]["job_id"] == second


async def test_every_socket_back_hears_the_ending_told_while_the_clients_sockets_were_away(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """The contract: "Several sockets for one clientId: all receive the same frames." A client with
    two sockets open (two tabs of one app) loses both mid-job (a network blip); the job ends while
    they are away, and both come back within the grace. Each must hear the job's `closed`; the bridge
    hands what it held to the first socket back only, and the second never hears the job end."""
    emulator = await make_emulator(pace=0.05)
    client = await make_bridge(emulator, disconnect_grace=30)
    async with (
        client.ws_connect("/ws", params={"clientId": "two-tabs"}) as one,
        client.ws_connect("/ws", params={"clientId": "two-tabs"}) as two,
    ):
        status, answer = await generate(client, "two-tabs", {"workflow": "slow", "2/seed": 3})
        assert status == 200, answer
        await frames_until(one, "progress")
        await frames_until(two, "progress")
    await poll_status(client, "two-tabs", {"closed"})  # it ended while both were away
    async with (
        client.ws_connect("/ws", params={"clientId": "two-tabs"}) as one,
        client.ws_connect("/ws", params={"clientId": "two-tabs"}) as two,
    ):
        assert (await frames_until(one, "closed", timeout=3))[-1]["job_id"] == answer["job_id"]
        try:
            heard = await frames_until(two, "closed", timeout=3)
        except TimeoutError:
            raise AssertionError("the second socket back never heard the job's `closed`") from None
        assert heard[-1]["job_id"] == answer["job_id"]


@pytest.mark.parametrize("queued", [False, True])
async def test_execution_info_never_says_closed_with_jobs_left(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, queued: bool
) -> None:
    """README: "`/execution-info` says `closed` only when no job of the client is left"; docs/API.md:
    `jobs_left` counts the jobs whose ending the client has still to hear. A client's first job has
    ended; its next submission is being journaled (a slow disk, or PostgreSQL's round trip). A poll
    meanwhile answered `{"status": "closed", ..., "jobs_left": 1}`: `closed` and one job left at
    once, which no reading of the contract allows (before the accept it is `closed`/0, after it
    `listening`/1 about the new job). The job is handed over at once as it is accepted, or
    (`queued`: every ComfyUI busy) joins the bridge's queue."""
    emulator = await make_emulator()
    client = await make_bridge(emulator, pipeline_depth=0)
    status, answer = await generate(client, "poller", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200, answer
    await poll_status(client, "poller", {"closed"})
    if queued:
        emulator.engine.pause()  # another client's job holds the only ComfyUI: the next one queues
        status, answer = await generate(client, "blocker", {"workflow": "solid", "1/batch_size": 1})
        assert status == 200, answer
        await poll_status(client, "blocker", {"connected"})
    go = held_journal(client)  # the next accept is written slowly
    submitting = asyncio.ensure_future(generate(client, "poller", {"workflow": "solid", "1/batch_size": 2}))
    known = client.app[SCHEDULER].core.clients.get("poller")
    assert known is not None
    await wait_for(lambda: len(known.jobs) == 1)  # the second job is being accepted
    try:
        info = await (await client.get("/execution-info", params={"clientId": "poller"})).json()
    finally:
        go.set()
        await submitting
        emulator.engine.resume()
    assert not (info["status"] == "closed" and info["jobs_left"]), info


async def test_sockets_that_send_a_large_frame_the_bridge_never_uses_cannot_pin_its_memory(bridge: Client) -> None:
    """README ("Facing the internet"): "No request breaks it", bodies "are bounded as they arrive", and
    "a client that never reads but keeps talking ... can no longer grow the bridge's memory"; 256
    sockets per address are allowed. The bridge reads nothing a client sends on its socket, yet each
    socket may send a text frame of up to aiohttp's default 4 MB, which is gathered in memory until it
    is whole: one address with 256 sockets that each send 4 MB of a frame and stop pins about 1 GiB.
    Here 16 sockets each send 4 MB of an unfinished frame; the bridge's memory must not grow by
    anything like the 64 MB they sent (it grows by that much, and keeps it while they stay)."""
    sockets, tracing = 16, not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    payload = b"x" * 4_000_000
    writers = []
    try:
        for n in range(sockets):
            reader, writer = await asyncio.open_connection(bridge.host, bridge.port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET /ws?clientId=talker-{n} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            await reader.readuntil(b"\r\n\r\n")
            # A masked text frame that says 4.1 MB, of which 4 MB is sent (mask 0: the bytes as they are).
            writer.write(bytes((0x81, 0x80 | 127)) + (4_100_000).to_bytes(8, "big") + b"\0\0\0\0" + payload)
            writers.append((reader, writer))
        hub = bridge.app[HUB]

        def all_read() -> bool:
            """Every byte sent is read by the bridge, or its connection is gone (a refused frame)."""
            for n, (_, writer) in enumerate(writers):
                if (writer.transport.get_write_buffer_size() or _unsent(writer)) and hub.count(f"talker-{n}"):
                    return False
            for outboxes in hub._outboxes.values():
                for outbox in outboxes.values():
                    sock = outbox.transport.get_extra_info("socket") if outbox.transport else None
                    if sock is not None and _unread(sock):
                        return False
            return True

        await wait_for(all_read, timeout=30)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        for _, writer in writers:
            writer.close()
        if tracing:
            tracemalloc.stop()
    assert grown < sockets * 1_000_000, f"{sockets} sockets' unfinished frames hold {grown / 1e6:.0f} MB of the bridge"


def _unsent(writer: asyncio.StreamWriter) -> int:
    """Bytes of ours the peer has not acknowledged yet (Linux SIOCOUTQ)."""
    sock = writer.get_extra_info("socket")
    if writer.is_closing() or sock is None or sock.fileno() < 0:
        return 0
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in the bridge's receive buffer of one socket (FIONREAD)."""
    if sock.fileno() < 0:
        return 0
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def test_a_tab_lost_again_before_the_other_is_back_leaves_both_expected(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """README: a socket back "hears every frame told meanwhile ...; so does each of the client's sockets
    lost with it (two tabs on one link)". Two tabs lose their sockets together (2 expected back). Tab A
    comes back (1 left: B) and loses its socket again while the job still waits: now A and B are both
    away; counting only A as expected, the job's `closed` went to A and was let go: B, back within
    the grace, never heard that its job ended."""
    emulator = await make_emulator()
    client = await make_bridge(emulator, disconnect_grace=30)
    emulator.engine.pause()  # the job waits inside ComfyUI while the sockets come and go
    async with (
        client.ws_connect("/ws", params={"clientId": "tabs-again"}),
        client.ws_connect("/ws", params={"clientId": "tabs-again"}),
    ):
        status, answer = await generate(client, "tabs-again", {"workflow": "solid", "1/batch_size": 1})
        assert status == 200, answer
        await poll_status(client, "tabs-again", {"connected"})
    known = client.app[SCHEDULER].core.clients.get("tabs-again")
    assert known is not None
    await wait_for(lambda: known.sockets == 0)  # both lost together
    async with client.ws_connect("/ws", params={"clientId": "tabs-again"}) as again:
        await again.receive()  # tab A back (its `connected`)
    await wait_for(lambda: known.sockets == 0)  # and lost again, the job still waiting
    emulator.engine.resume()
    await poll_status(client, "tabs-again", {"closed"})  # it ended while both were away
    async with client.ws_connect("/ws", params={"clientId": "tabs-again"}) as a:
        assert (await frames_until(a, "closed", timeout=3))[-1]["job_id"] == answer["job_id"]
        async with client.ws_connect("/ws", params={"clientId": "tabs-again"}) as b:
            try:
                heard = await frames_until(b, "closed", timeout=3)
            except TimeoutError:
                raise AssertionError("tab B, lost with A, never heard its job's `closed`") from None
            assert heard[-1]["job_id"] == answer["job_id"]
