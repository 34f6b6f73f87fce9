"""comfybridge.sdk, async and blocking, against a real bridge in front of the emulator."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from comfybridge.edge.appkeys import JOURNAL, SCHEDULER
from comfybridge.emulator.png import png_first_pixel
from comfybridge.sdk import AsyncBridge, Bridge, BridgeError, Event, Job, JobFailed

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import Client, bridge_process, png


def url_of(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


async def network_outage(bridge: AsyncBridge, seconds: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's socket drops (the bridge sees it close: its disconnect grace starts), and every
    connection attempt fails for `seconds`."""
    connect = bridge._connect
    back_at = time.monotonic() + seconds

    async def network_down() -> aiohttp.ClientWebSocketResponse:
        if time.monotonic() < back_at:
            raise aiohttp.ClientConnectionError("network is unreachable")
        return await connect()

    monkeypatch.setattr(bridge, "_connect", network_down)
    assert bridge._ws is not None
    await bridge._ws.close()


async def until_progress(heard: list[Event]) -> None:
    """Until a `progress` frame is heard (the guard only stops a hang)."""
    async with asyncio.timeout(15):
        while not any(e.status == "progress" for e in heard):
            await asyncio.sleep(0.02)


async def following_slow_job(bridge: AsyncBridge) -> tuple[Job, asyncio.Task[Event]]:
    """A `slow` job on an open socket, and its follow, once it reports progress."""
    heard: list[Event] = []
    await bridge._socket()
    job = await bridge.generate("slow")
    following = asyncio.create_task(bridge.follow(job, on_event=heard.append))
    await until_progress(heard)
    return job, following


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
            assert refused.value.retry_after is not None
        await events.aclose()


async def test_a_refusal_to_wait_says_how_long(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    client = await make_bridge(await make_emulator(pace=0.05), max_jobs_per_client=1)
    async with AsyncBridge(url_of(client)) as bridge:
        await bridge.generate("slow")
        with pytest.raises(BridgeError) as refused:
            await bridge.generate("slow")
        assert (refused.value.status, refused.value.retry_after) == (429, 1.0)
        await bridge.interrupt()


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


@pytest.mark.parametrize("listen", [True, False])
async def test_a_blocking_client_that_only_polls_keeps_its_job_when_it_goes(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path, listen: bool
) -> None:
    """A script that queues a job and exits: with a socket, disconnect = cancel; polling only
    (`listen=False`, as examples/rest_example.py), the job runs on and its results wait."""
    client = await make_bridge(await make_emulator(pace=0.05), disconnect_grace=0.1)
    url = url_of(client)

    def queue_and_go() -> str:
        with Bridge(url, client_id=f"script-{listen}") as bridge:
            return bridge.generate("slow", listen=listen).job_id

    job_id = await asyncio.to_thread(queue_and_go)
    async with AsyncBridge(url, client_id=f"script-{listen}") as later:  # it polls: no socket comes back
        while (status := await later.status()).status not in ("closed", "error"):
            await asyncio.sleep(0.05)
        assert status.job_id == job_id
        if listen:
            assert (status.status, status.detail) == ("error", "interrupted")
        else:
            assert status.status == "closed"
            assert {r.job_id for r in await later.save_results(tmp_path / "out")} == {job_id}


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


CLOSED_J1 = '{"status": "closed", "detail": "done", "job_id": "j1", "jobs_left": 0}'


async def socket_saying(aiohttp_server: Any, frames: list[str]) -> str:
    """The URL of a server whose /ws says these frames, then waits for the client to close."""

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for frame in frames:
            await ws.send_str(frame)
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/ws", socket)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_a_frame_that_is_not_a_status_is_skipped_not_the_end_of_a_follow(aiohttp_server: Any) -> None:
    """A frame the client does not understand (a newer bridge's kind, a proxy's) between a job's
    frames: the follow goes on to the job's end, instead of every follower raising."""

    frames = ['{"kind": "notice", "text": "maintenance at noon"}', "not json", CLOSED_J1]
    async with AsyncBridge(await socket_saying(aiohttp_server, frames)) as bridge:
        await bridge._socket()
        end = await asyncio.wait_for(bridge.follow(Job("j1", 1)), 10)
    assert (end.status, end.job_id) == ("closed", "j1")


async def test_an_unknown_kind_of_frame_is_warned_about_once_per_client(
    aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream of frames the client does not understand (a proxy's keep-alives): one warning per
    kind, the repeats at debug level, so the log is not flooded."""

    unknown = ['{"type": "keepalive"}', '{"kind": "notice", "text": "maintenance at noon"}', "not json"]
    url = await socket_saying(aiohttp_server, [*unknown * 3, CLOSED_J1])
    caplog.set_level("DEBUG", logger="comfybridge.sdk")
    async with AsyncBridge(url) as bridge:
        await bridge._socket()
        await asyncio.wait_for(bridge.follow(Job("j1", 1)), 10)
    ignored = [r for r in caplog.records if "not a status" in r.getMessage()]
    warned = [r.getMessage() for r in ignored if r.levelname == "WARNING"]
    assert len(warned) == 3, warned
    assert all(any(kind in w for w in warned) for kind in ("keepalive", "notice", "not JSON"))
    assert [r.levelname for r in ignored].count("DEBUG") == 6


# One socket for every job of a client: several followed at once, in any order, through an error's
# 1011 and through a restart of the bridge (real bridge processes).
SLOW = ("--emulate", "1", "--emulator-pace", "0.2")  # `slow` then runs for about 1.5 s


async def interrupt_soon(bridge: AsyncBridge, delay: float = 0.5) -> None:
    await asyncio.sleep(delay)
    await bridge.interrupt()


async def test_the_async_client_runs_a_job_after_one_that_failed(workdir: Path, tmp_path: Path) -> None:
    """A job that errors (here: interrupted) makes the bridge close the socket with 1011; the next
    `run` of the same AsyncBridge must still follow its own job to its end."""
    async with bridge_process(workdir, *SLOW) as (_, url), AsyncBridge(url, client_id="after-error") as bridge:
        canceller = asyncio.create_task(interrupt_soon(bridge))
        with pytest.raises(JobFailed):
            await bridge.run("slow")
        await canceller
        job = await asyncio.wait_for(bridge.run("solid", {"1/width": 8}), 30)
        saved = await bridge.save_results(tmp_path / "out")
        assert {r.job_id for r in saved} == {job.job_id}


async def test_the_async_client_runs_a_job_after_one_that_broke(workdir: Path) -> None:
    """The same with a job ComfyUI itself fails (a runtime error), no interrupt involved."""
    async with bridge_process(workdir, "--emulate", "1") as (_, url), AsyncBridge(url) as bridge:
        with pytest.raises(JobFailed):
            await bridge.run("broken")
        await asyncio.sleep(0.3)  # the close frame has arrived by now
        job = await asyncio.wait_for(bridge.run("solid", {"1/width": 8}), 30)
        assert job.job_id


async def test_the_blocking_client_follows_a_job_after_one_that_failed(workdir: Path) -> None:
    async with bridge_process(workdir, "--emulate", "1") as (_, url):

        def script() -> list[Event]:
            with Bridge(url) as bridge:
                failed = bridge.generate("broken")
                with pytest.raises(JobFailed):
                    list(bridge.follow(failed))
                job = bridge.generate("solid", {"1/width": 8})
                return list(bridge.follow(job))

        events = await asyncio.wait_for(asyncio.to_thread(script), 30)
        assert events[-1].status == "closed"


async def test_one_async_client_runs_several_jobs_at_once(workdir: Path, tmp_path: Path) -> None:
    """`asyncio.gather` of `run`s on one AsyncBridge: each returns its own job."""
    async with bridge_process(workdir, "--emulate", "2") as (_, url), AsyncBridge(url) as bridge:
        jobs = await asyncio.wait_for(asyncio.gather(*(bridge.run("solid", {"1/width": 8 + n}) for n in range(3))), 30)
        assert len({job.job_id for job in jobs}) == 3
        saved = await bridge.save_results(tmp_path / "out")
        assert {r.job_id for r in saved} == {job.job_id for job in jobs}


async def test_following_a_later_job_first_does_not_lose_the_earlier_ones_end(workdir: Path) -> None:
    """follow(b) then follow(a): a's `closed` came first (job by job) and must not be thrown away."""
    async with bridge_process(workdir, "--emulate", "1") as (_, url), AsyncBridge(url) as bridge:
        await bridge.events().__anext__()  # the socket is open (`connected`) before the jobs exist
        first = await bridge.generate("solid", {"1/width": 8})
        second = await bridge.generate("solid", {"1/width": 9})
        assert (await asyncio.wait_for(bridge.follow(second), 30)).job_id == second.job_id
        ended = await asyncio.wait_for(bridge.follow(first), 10)
        assert (ended.status, ended.job_id) == ("closed", first.job_id)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
async def test_run_survives_a_bridge_restart(workdir: Path, tmp_path: Path, how: signal.Signals) -> None:
    """The bridge stops (SIGTERM: sockets closed with 1001; kill -9) while `run` waits, and comes back on
    the same port and data folder: the docs say to connect again and the job's frames follow, and
    that restarts lose nothing. `run` should reconnect and end with the job's `closed`, not raise."""
    async with bridge_process(workdir, *SLOW) as (proc, url):
        port = url.rsplit(":", 1)[1]
        bridge = AsyncBridge(url, client_id="through-a-restart")
        heard: list[Event] = []
        running = asyncio.create_task(bridge.run("slow", on_event=heard.append))
        await until_progress(heard)
        proc.send_signal(how)
        await proc.wait()
        try:
            async with bridge_process(workdir, *SLOW, "--port", port):
                job = await asyncio.wait_for(running, 45)
                assert (heard[-1].status, heard[-1].job_id) == ("closed", job.job_id)
                saved = await bridge.save_results(tmp_path / "out")
                assert {r.job_id for r in saved} == {job.job_id}
        finally:
            running.cancel()
            await bridge.close()


async def test_async_close_ends_a_follower_that_is_reconnecting(workdir: Path) -> None:
    """The bridge goes away while `follow` waits, and the follower reconnects: `close()` ends it
    (BridgeError), instead of leaving it retrying on a session of its own making."""
    async with bridge_process(workdir, *SLOW) as (proc, url):
        bridge = AsyncBridge(url, client_id="closing")
        heard: list[Event] = []
        following = asyncio.create_task(bridge.run("slow", on_event=heard.append))
        await until_progress(heard)
        proc.kill()
        await proc.wait()
        await asyncio.sleep(0.5)  # the follower is in its reconnect loop now
        await bridge.close()
        try:
            with pytest.raises(BridgeError):
                await asyncio.wait_for(following, 10)
        finally:
            following.cancel()
            leaked = bridge._session
            if leaked is not None:
                await leaked.close()


async def test_blocking_close_does_not_leave_a_following_thread_hanging(workdir: Path) -> None:
    """Bridge.follow in one thread, Bridge.close in another while the socket is being opened again:
    the following thread ends (BridgeError), never waits for ever on a loop that stopped."""
    async with bridge_process(workdir, *SLOW) as (proc, url):
        bridge = Bridge(url, client_id="closing-blocking")
        job = await asyncio.to_thread(bridge.generate, "slow")
        heard: list[Event] = []
        outcome: list[BaseException | None] = []

        def follow() -> None:
            try:
                for event in bridge.follow(job):
                    heard.append(event)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        await until_progress(heard)
        proc.kill()
        await proc.wait()
        await asyncio.sleep(0.5)  # the follower is in its reconnect loop now
        await asyncio.to_thread(bridge.close)
        await asyncio.to_thread(follower.join, 10)
        assert not follower.is_alive(), "the following thread hangs for ever after close()"


async def test_blocking_follow_after_generate_misses_no_frame(workdir: Path) -> None:
    """Bridge.generate opens the socket first so that `follow` misses nothing: the frames told between
    generate and follow, which no one was listening for, reach follow."""
    async with bridge_process(workdir, *SLOW) as (_, url):

        def script() -> list[Event]:
            with Bridge(url, client_id="late-follower") as bridge:
                job = bridge.generate("slow")
                time.sleep(0.8)  # the script does something else; the job makes progress meanwhile
                return list(bridge.follow(job))

        events = await asyncio.wait_for(asyncio.to_thread(script), 30)
    assert events[-1].status == "closed"
    percents = [e.percent for e in events if e.percent is not None]
    assert percents, [(e.status, e.detail) for e in events]
    assert min(percents) < 20, [(e.status, e.detail) for e in events]  # the job's first step


@pytest.mark.parametrize(("grace", "outage"), [(5.0, 3.3), (0.3, 2.0)])
async def test_a_network_outage_within_the_grace_is_ridden_out_and_past_it_ends_the_follow(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    monkeypatch: pytest.MonkeyPatch,
    grace: float,
    outage: float,
) -> None:
    """The socket drops and the network stays away. Inside the bridge's disconnect grace (5 s, the
    default) the SDK opens it again in time (its pauses never exceed a second): the job runs on and
    the follow ends with its `closed`. Past the grace and the frames' hold, the job is cancelled and
    no frame will say so: after reconnecting, the follower reads /execution-info and raises the job's
    end instead of waiting for ever."""
    client = await make_bridge(await make_emulator(pace=1.5), disconnect_grace=grace)  # `slow`: about 10 s
    async with AsyncBridge(url_of(client), client_id="outage") as bridge:
        job, following = await following_slow_job(bridge)
        await network_outage(bridge, outage, monkeypatch)
        if outage < grace:
            ended = await asyncio.wait_for(following, 30)
            assert (ended.status, ended.job_id) == ("closed", job.job_id)
        else:
            with pytest.raises(JobFailed, match="interrupted"):
                await asyncio.wait_for(following, 30)


async def test_a_reconnect_attempt_that_gets_no_answer_is_cut_short_within_the_grace(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt to open the socket again gets no answer at all (a host gone, a firewall that
    drops packets): it is cut short and the next one opens it within the bridge's 5 s grace, so the job
    runs on. Left to aiohttp, the attempt would wait 30 s to connect and the job would be cancelled."""
    client = await make_bridge(await make_emulator(pace=1.5), disconnect_grace=5.0)  # `slow`: about 10 s
    async with AsyncBridge(url_of(client), client_id="swallowed") as bridge:
        job, following = await following_slow_job(bridge)
        connect, attempts = bridge._connect, []

        async def first_swallowed() -> aiohttp.ClientWebSocketResponse:
            attempts.append(time.monotonic())
            if len(attempts) == 1:
                await asyncio.Event().wait()  # no answer, ever
            return await connect()

        monkeypatch.setattr(bridge, "_connect", first_swallowed)
        assert bridge._ws is not None
        await bridge._ws.close()
        ended = await asyncio.wait_for(following, 30)
        assert (ended.status, ended.job_id) == ("closed", job.job_id)
        assert len(attempts) >= 2


async def test_a_blocking_follow_dropped_early_leaves_the_socket_reader_alive(workdir: Path) -> None:
    """A blocking `follow` dropped early (a `break`, JobFailed after the `error`) is closed in the
    caller's thread: nothing of the loop's (the reader's listeners) may be touched there, or the
    reader dies ("Set changed size during iteration") and every later follow waits for ever. (Many
    listeners and a short switch interval widen the window.)"""
    import sys

    async with bridge_process(workdir, "--emulate", "1", "--heartbeat", "0.01") as (_, url):

        def script() -> str:
            old = sys.getswitchinterval()
            sys.setswitchinterval(1e-5)
            bridge = Bridge(url, client_id="threads")
            try:
                job = bridge.generate("solid", {"1/width": 8})
                assert list(bridge.follow(job))[-1].status == "closed"

                async def listen_a_lot() -> list[object]:
                    kept = []
                    for _ in range(3000):  # as many `events()` iterators would
                        listening = bridge._async._listening()
                        listening.__enter__()
                        kept.append(listening)
                    return kept

                kept = asyncio.run_coroutine_threadsafe(listen_a_lot(), bridge._loop).result()
                assert len(kept) == 3000
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    following = bridge.follow(job)
                    next(following)  # its `closed` (kept): then the script moves on
                    del following
                reader = bridge._async._reader
                assert reader is not None
                if reader.done() and not reader.cancelled() and reader.exception() is not None:
                    return f"the socket's reader died: {reader.exception()!r}"
                return "alive"
            finally:
                sys.setswitchinterval(old)
                bridge.close()

        said = await asyncio.wait_for(asyncio.to_thread(script), 60)
    assert said == "alive", said


async def test_two_followed_jobs_cancelled_by_a_long_outage_both_end(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs followed, both cancelled by an outage past the grace: /execution-info names only the
    one that ended last, whose follow raises its end; the other's follow ends too (BridgeError:
    its end is not kept any more), never waits for ever."""
    client = await make_bridge(await make_emulator(pace=1.5), disconnect_grace=0.3)
    async with AsyncBridge(url_of(client), client_id="outage-two") as bridge:
        heard: list[Event] = []
        await bridge._socket()
        first = await bridge.generate("slow")
        second = await bridge.generate("slow")
        following = [
            asyncio.create_task(bridge.follow(first, on_event=heard.append)),
            asyncio.create_task(bridge.follow(second)),
        ]
        await until_progress(heard)
        await network_outage(bridge, 2.0, monkeypatch)
        _, pending = await asyncio.wait(following, timeout=20)
        for task in pending:
            task.cancel()
        assert not pending, "a follow of a job cancelled during the outage waits for ever"
        first_said, second_said = following[0].exception(), following[1].exception()
        assert isinstance(second_said, JobFailed)  # the last job: its end is at /execution-info
        assert second_said.detail == "interrupted"
        assert isinstance(first_said, BridgeError)  # an earlier one: ended, how is not kept any more
        assert first.job_id in first_said.detail


async def test_follow_of_a_job_that_ended_before_the_socket_opened_ends(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncBridge.generate then AsyncBridge.follow: a job that ended before follow's socket opened
    (its frames spoke to no socket, and no hold was pending) ends the follow with its end, read from
    /execution-info, instead of leaving it waiting for ever.
    """
    import comfybridge.app

    monkeypatch.setattr(comfybridge.app, "HOLD_FOR_RECONNECT", 0.1)  # the start-up hold, past already
    client = await make_bridge(await make_emulator())
    await asyncio.sleep(0.5)  # past the start-up hold
    async with AsyncBridge(url_of(client), client_id="late") as bridge:
        job = await bridge.generate("solid", {"1/width": 8})
        async with asyncio.timeout(15):
            while not (await bridge.status()).ended:
                await asyncio.sleep(0.05)
        try:
            ended = await asyncio.wait_for(bridge.follow(job), 10)
        except TimeoutError:
            pytest.fail("follow of a job that already ended waits for ever")
        assert (ended.status, ended.job_id) == ("closed", job.job_id)


async def test_follow_of_an_earlier_job_that_ended_unheard_while_a_later_one_ran_ends(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs queued, then followed in order: the first ended before the socket opened, the second
    still ran. /execution-info was read once, naming the second, and the follow of the first waited
    for ever. It ends (BridgeError, as README says: only the last job's end is kept) once the
    client's last job ends, since then every job of it has."""
    import comfybridge.app

    monkeypatch.setattr(comfybridge.app, "HOLD_FOR_RECONNECT", 0.1)  # the start-up hold, past already
    client = await make_bridge(await make_emulator(pace=0.3))  # `slow`: about 2 s
    await asyncio.sleep(0.5)  # past the start-up hold
    async with AsyncBridge(url_of(client), client_id="in-order") as bridge:
        first = await bridge.generate("solid", {"1/width": 8})
        second = await bridge.generate("slow")
        async with asyncio.timeout(15):  # the first has ended; the second runs
            while (now := await bridge.status()).job_id != second.job_id or now.status != "progress":
                await asyncio.sleep(0.02)
        with pytest.raises(BridgeError, match=first.job_id):
            await asyncio.wait_for(bridge.follow(first), 20)
        assert (await bridge.follow(second)).status == "closed"  # its end was heard


async def test_a_follow_reconnected_to_a_bridge_that_does_not_know_the_client_ends(workdir: Path) -> None:
    """The bridge dies mid-job and what comes back on its address has another data folder (a
    container started without its volume): the socket opens again, /execution-info answers 400 for
    the clientId, and no frame of the job will come. The follow waited for ever."""
    slow = ("--emulate", "1", "--emulator-pace", "0.5")
    async with bridge_process(workdir, *slow) as (proc, url):
        bridge = AsyncBridge(url, client_id="forgotten")
        heard: list[Event] = []
        running = asyncio.create_task(bridge.run("slow", on_event=heard.append))
        async with asyncio.timeout(15):
            while not any(event.status == "progress" for event in heard):
                await asyncio.sleep(0.02)
        proc.kill()
        await proc.wait()
    try:
        port = url.rsplit(":", 1)[1]
        async with bridge_process(workdir, *slow, "--port", port, "--data-dir", str(workdir / "other")):
            with pytest.raises(BridgeError, match="does not know this client"):
                await asyncio.wait_for(running, 30)
    finally:
        running.cancel()
        await bridge.close()


async def test_a_follow_is_not_ended_by_an_earlier_jobs_closed_heard_before_it_was_accepted(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """A job queued and not followed (its frames kept in the SDK's backlog, as BACKLOG says: "a job
    queued, then followed"), then, once it ended, a second job followed. The follow drains the
    backlog, meets the first job's `closed` with jobs_left 0 (sent before the second was accepted)
    and takes it for the second job's unheard end: BridgeError while the second job still runs."""
    client = await make_bridge(await make_emulator())
    async with AsyncBridge(url_of(client), client_id="backlogged") as bridge:
        await bridge._socket()  # as the blocking Bridge.generate does (listen=True)
        first = await bridge.generate("solid", {"1/width": 8})
        async with asyncio.timeout(15):  # its `closed` (jobs_left 0) is in the backlog now
            while first.job_id not in bridge._ended:
                await asyncio.sleep(0.02)
        second = await bridge.generate("solid", {"1/width": 8})
        end = await asyncio.wait_for(bridge.follow(second), 20)
        assert (end.status, end.job_id) == ("closed", second.job_id)


async def test_a_job_whose_end_is_being_recorded_is_still_named_and_its_follow_fails_as_it_did(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """Two jobs of a client on two backends: the second is refused by its ComfyUI at once (no frame of
    it told), its end record slow (a busy, or briefly away, database); then the first closes.
    /execution-info says `listening` with no job_id meanwhile (open_status of a client whose jobs all
    left `jobs`, one ending still untold). A follow of the second begun now (its socket opened for
    it) takes that for "the bridge knows no job of this client" and raises BridgeError, though the
    job's `error` comes once its end is recorded (JobFailed, as before the change)."""
    client = await make_bridge(await make_emulator(pace=0.3), await make_emulator())
    journal = client.app[JOURNAL]
    gate, update, spared = asyncio.Event(), journal.update, set()

    def slow_end(job_id: str, fields: dict[str, Any], delivery: Any = None) -> Any:
        written = update(job_id, fields, delivery)
        if fields.get("state") not in ("done", "failed") or job_id in spared:
            return written

        async def later() -> None:
            await gate.wait()
            await written

        return asyncio.ensure_future(later())

    journal.update = slow_end
    async with AsyncBridge(url_of(client), client_id="two") as bridge:
        first = await bridge.generate("slow")
        spared.add(first.job_id)
        second = await bridge.generate("bad_ckpt")
        known = client.app[SCHEDULER].clients.get("two")
        assert known is not None
        await wait_for(lambda: not known.jobs and known.untold == [second.job_id], 20)  # first closed
        assert (await bridge.status()).job_id == second.job_id  # under way for the client: its end untold
        following = asyncio.create_task(bridge.follow(second))
        await asyncio.sleep(0.5)
        gate.set()
        with pytest.raises(JobFailed):  # (a BridgeError: the follow ended wrongly)
            await asyncio.wait_for(following, 20)


async def test_close_makes_a_waiting_events_iterator_raise(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """close() makes a waiting `events()` raise BridgeError, as a follow does: it must not just stop,
    as if the bridge had closed the socket."""
    client = await make_bridge(await make_emulator())
    bridge = AsyncBridge(url_of(client), client_id="events-close")
    heard: list[Event] = []

    async def consume() -> None:
        async for event in bridge.events():
            heard.append(event)

    consuming = asyncio.create_task(consume())
    async with asyncio.timeout(10):
        while not heard:
            await asyncio.sleep(0.02)
    await bridge.close()
    with pytest.raises(BridgeError):
        await asyncio.wait_for(consuming, 10)
