"""Restarts lose nothing: kill -9 and SIGTERM of a bridge process under load, against emulators that
outlive it; every accepted job ends exactly once and no prompt runs twice."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from comfybridge.core.tracking import RESUMED
from comfybridge.edge.appkeys import JOURNAL, SCHEDULER
from comfybridge.emulator import Emulator
from comfybridge.errors import StorageUnavailable
from comfybridge.store.results import FETCHED, ResultStore

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .fake_comfy import FakeComfy
from .helpers import (
    TINY,
    assert_one_line_error,
    backends,
    bound_by_file_modes,
    bridge_process,
    count,
    fetch_results,
    generate,
    kept,
    png,
    poll_status,
    post_job,
    run_cli,
    run_job,
    status_of,
    upload,
    wait_closed,
)

JOBS_PER_ROUND = 25  # per client


def runs_per_job(*emulators: Emulator) -> collections.Counter[str]:
    """How often each job ran on the emulators: one output folder per job, one file per run."""
    runs: collections.Counter[str] = collections.Counter()
    for emulator in emulators:
        for path in (emulator.root / "output" / "comfybridge").rglob("*.png"):
            runs[path.parent.name] += 1
    return runs


def assert_no_prompt_ran_twice(*emulators: Emulator) -> None:
    started = [p for e in emulators for p in e.engine.started]
    assert len(started) == len(set(started))


@pytest.mark.timeout(120)
@pytest.mark.both_stores
async def test_kill_9_at_random_moments_under_load_loses_no_job(
    workdir: Path, make_emulator: EmulatorFactory, store: str, storage: dict[str, str]
) -> None:
    emulators = [await make_emulator(pace=0.01), await make_emulator(pace=0.01)]
    rng = random.Random(6)
    accepted: dict[str, str] = {}  # job id -> client id
    unanswered = 0  # requests cut off by a kill: the bridge may or may not have accepted them
    clients = [f"burst-{i}" for i in range(8)]
    async with aiohttp.ClientSession() as session:
        last_count = 0
        for _ in range(3):
            async with bridge_process(workdir, *backends(*emulators, database=store, storage=storage)) as (proc, url):
                assert await count(url) >= last_count  # the counter never goes down across a crash

                async def submit_until_killed(client_id: str, url: str = url) -> None:
                    nonlocal unanswered
                    for _ in range(JOBS_PER_ROUND):
                        try:
                            accepted[await post_job(session, url, client_id, TINY)] = client_id
                        except aiohttp.ClientError:
                            unanswered += 1
                            return
                        await asyncio.sleep(0.01)  # a client app's pace, so the burst outlasts the kill

                loops = [asyncio.create_task(submit_until_killed(c)) for c in clients]
                await asyncio.sleep(rng.uniform(0.1, 0.4))  # a random moment in the burst
                last_count = await count(url)
                proc.kill()
                await proc.wait()
                await asyncio.gather(*loops)
        async with bridge_process(workdir, *backends(*emulators, database=store, storage=storage)) as (proc, url):
            assert await count(url) >= last_count
            await wait_closed(session, url, clients)
            delivered = [part for c in clients for part in await fetch_results(session, url, c)]
            assert await count(url) >= len(accepted)
    job_ids = [job_id for job_id, _ in delivered]
    assert len(accepted) > 50
    assert unanswered > 0, "no request was cut off: the kills missed the burst"
    assert len(job_ids) == len(set(job_ids)), "a job delivered twice"
    assert set(accepted) <= set(job_ids), "an accepted job was lost"
    assert len(set(job_ids) - set(accepted)) <= unanswered
    assert_no_prompt_ran_twice(*emulators)
    runs = runs_per_job(*emulators)
    assert all(runs[job_id[:12]] == 1 for job_id in job_ids), "a job ran twice"


@pytest.mark.both_stores
async def test_sigterm_with_40_jobs_in_line_then_restart_delivers_all(
    workdir: Path, make_emulator: EmulatorFactory, store: str, storage: dict[str, str]
) -> None:
    emulator = await make_emulator(pace=0.05)
    clients = [f"term-{i}" for i in range(10)]
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(emulator, database=store, storage=storage)) as (proc, url):
            async with session.ws_connect(f"{url}/ws", params={"clientId": "watcher"}) as ws:
                jobs = await asyncio.gather(*(post_job(session, url, c, TINY) for c in clients for _ in range(4)))
                await wait_for(lambda: len(emulator.engine.started) >= 2)
                proc.send_signal(signal.SIGTERM)
                async for _ in ws:  # the bridge says it is going away, then closes the socket
                    pass
                assert ws.close_code == 1001
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert len(emulator.engine.started) < 40, "all jobs ran before the stop: nothing was tested"
        async with bridge_process(workdir, *backends(emulator, database=store, storage=storage)) as (proc, url):
            await wait_closed(session, url, clients)
            delivered = [part for c in clients for part in await fetch_results(session, url, c)]
            assert await count(url) == 40
    assert sorted(job_id for job_id, _ in delivered) == sorted(jobs)
    assert_no_prompt_ran_twice(emulator)
    assert set(runs_per_job(emulator).values()) == {1}


@pytest.mark.both_dialects
@pytest.mark.both_stores
async def test_job_running_at_a_crash_is_adopted_and_reports_progress(
    workdir: Path, make_emulator: EmulatorFactory, store: str, storage: dict[str, str]
) -> None:
    emulator = await make_emulator(pace=0.4)  # text-to-image: seven nodes, a 20-step sampler
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(emulator, database=store, storage=storage)) as (proc, url):
            job_id = await post_job(session, url, "adopt", {"workflow": "text-to-image"})
            await wait_for(lambda: len(emulator.engine.started) == 1)
            proc.kill()
        async with bridge_process(workdir, *backends(emulator, database=store, storage=storage)) as (proc, url):
            async with session.ws_connect(f"{url}/ws", params={"clientId": "adopt"}) as ws:
                frames = []
                async for msg in ws:
                    frames.append(orjson.loads(msg.data))
                    if frames[-1]["status"] in ("closed", "error"):
                        break
            assert frames[-1]["status"] == "closed", frames
            progress = [i for i, f in enumerate(frames) if f["status"] == "progress"]
            assert progress, frames
            # What the last process told is unknown here: the job says it resumed before counting again.
            told = frames[progress[0] - 1]
            assert (told["status"], told["detail"]) == ("listening", RESUMED)
            values = [float(frames[i]["detail"].rstrip("%")) for i in progress]
            assert values == sorted(values)
            assert [job for job, _ in await fetch_results(session, url, "adopt")] == [job_id]
    assert len(emulator.engine.started) == 1


async def test_a_later_job_finished_before_a_crash_is_told_closed_again_after_the_earlier_one(
    workdir: Path, make_emulator: EmulatorFactory
) -> None:
    """Job 1 waits inside one ComfyUI while job 2 finishes on the other; after a crash, job 2's
    `closed` is said again, but only after job 1's: a client hears its jobs in order."""
    emulators = [await make_emulator(pace=0.05), await make_emulator(pace=0.05)]
    for emulator in emulators:
        emulator.engine.pause()
    body = {"workflow": "slow", "2/seed": 1}
    journal = workdir / "data" / "journal.sqlite3"

    def state_of(job_id: str) -> str | None:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(*emulators)) as (proc, url):
            first = await post_job(session, url, "order", body)
            await wait_for(lambda: any(e.engine.queue_remaining for e in emulators))
            held = next(e for e in emulators if e.engine.queue_remaining)
            other = next(e for e in emulators if e is not held)
            second = await post_job(session, url, "order", {**body, "2/seed": 2})
            await wait_for(lambda: other.engine.queue_remaining == 1)
            other.engine.resume()
            await wait_for(lambda: state_of(second) == "done")
            proc.kill()
        async with (
            bridge_process(workdir, *backends(*emulators)) as (proc, url),
            session.ws_connect(f"{url}/ws", params={"clientId": "order"}) as ws,
        ):
            held.engine.resume()
            closed: list[str] = []
            async with asyncio.timeout(60):  # only a guard against a hang
                while len(closed) < 2:
                    frame = orjson.loads((await ws.receive()).data)
                    if frame["status"] == "closed":
                        closed.append(frame["job_id"])
    assert closed == [first, second]  # nothing of job 2 before job 1's ending


@pytest.mark.both_dialects
async def test_prompt_that_finished_while_the_bridge_was_down_is_collected_not_rerun(
    workdir: Path, make_emulator: EmulatorFactory, storage: dict[str, str]
) -> None:
    emulator = await make_emulator(pace=0.3)
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(emulator, storage=storage)) as (proc, url):
            job_id = await post_job(session, url, "done-while-down", TINY)
            await wait_for(lambda: len(emulator.engine.started) == 1)
            proc.kill()
        await wait_for(lambda: len(emulator.engine.history) == 1)
        async with bridge_process(workdir, *backends(emulator, storage=storage)) as (proc, url):
            await wait_closed(session, url, ["done-while-down"])
            assert [job for job, _ in await fetch_results(session, url, "done-while-down")] == [job_id]
    assert len(emulator.engine.started) == 1


@pytest.mark.both_dialects
async def test_prompt_lost_by_a_restarted_comfyui_is_sent_again(
    workdir: Path, make_emulator: EmulatorFactory, storage: dict[str, str]
) -> None:
    first = await make_emulator(pace=0.01)
    port = first.port  # the ComfyUI that comes back listens where it did
    first.engine.pause()  # the job stays queued inside ComfyUI
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(first, storage=storage)) as (proc, url):
            job_id = await post_job(session, url, "lost", TINY)
            await wait_for(lambda: first.engine.queue_remaining == 1)
            proc.kill()
        await first.stop()  # ComfyUI restarts too, forgetting its queue
        second = await make_emulator(pace=0.01, port=port)
        async with bridge_process(workdir, *backends(second, storage=storage)) as (proc, url):
            await wait_closed(session, url, ["lost"])
            assert [job for job, _ in await fetch_results(session, url, "lost")] == [job_id]
    assert first.engine.started == []
    assert len(second.engine.started) == 1


async def test_waiting_jobs_survive_a_crash_in_order(
    workdir: Path, make_emulator: EmulatorFactory, storage: dict[str, str]
) -> None:
    emulator = await make_emulator(pace=0.01)
    emulator.engine.pause()
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(emulator, storage=storage), "--pipeline-depth", "0") as (
            proc,
            url,
        ):
            jobs = [await post_job(session, url, "order", {**TINY, "1/width": 8 + i}) for i in range(5)]
            proc.kill()
        emulator.engine.resume()
        async with bridge_process(workdir, *backends(emulator, storage=storage), "--delete-history", "false") as (
            proc,
            url,
        ):
            await wait_closed(session, url, ["order"])
            assert [job for job, _ in await fetch_results(session, url, "order")] == jobs
    widths = [emulator.engine.history[p]["prompt"][2]["1"]["inputs"]["width"] for p in emulator.engine.started]
    assert widths == [8, 9, 10, 11, 12]


async def test_drain_lets_running_jobs_finish_before_exit(
    workdir: Path, make_emulator: EmulatorFactory, storage: dict[str, str]
) -> None:
    emulator = await make_emulator(pace=0.3)
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(emulator, storage=storage), "--drain", "30") as (proc, url):
            async with session.ws_connect(f"{url}/ws", params={"clientId": "drained"}) as ws:
                await post_job(session, url, "drained", TINY)
                await wait_for(lambda: len(emulator.engine.started) == 1)
                proc.send_signal(signal.SIGTERM)
                statuses = [orjson.loads(msg.data)["status"] async for msg in ws]
            assert statuses[-1] == "closed"
            assert ws.close_code == 1001
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        async with bridge_process(workdir, *backends(emulator, storage=storage)) as (proc, url):
            assert len(await fetch_results(session, url, "drained")) == 1


async def test_results_stay_fetchable_across_restarts_until_fetched(
    workdir: Path, make_emulator: EmulatorFactory, storage: dict[str, str]
) -> None:
    emulator = await make_emulator()
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *backends(emulator, storage=storage)) as (proc, url):
            job_id = await post_job(session, url, "keeper", TINY)
            await wait_closed(session, url, ["keeper"])
            proc.kill()
        async with bridge_process(workdir, *backends(emulator, storage=storage)) as (proc, url):
            # Its `closed` may have been lost with the process that ended the job: a socket back says it again.
            async with session.ws_connect(url.replace("http", "ws", 1) + "/ws", params={"clientId": "keeper"}) as ws:
                frames = [orjson.loads((await ws.receive(timeout=10)).data) for _ in range(2)]
            assert [f["status"] for f in frames] == ["connected", "closed"]
            assert (frames[1]["job_id"], frames[1]["jobs_left"]) == (job_id, 0)
            assert (await status_of(session, url, "keeper"))["status"] == "closed"
            assert [job for job, _ in await fetch_results(session, url, "keeper")] == [job_id]
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        async with (
            bridge_process(workdir, *backends(emulator, storage=storage)) as (proc, url),
            session.get(f"{url}/history", params={"clientId": "keeper"}) as resp,
        ):
            assert resp.status == 204
            assert resp.headers["X-Detail"].startswith("The client ID has not been submitted")
    assert not kept(workdir / "data", "results", storage)


def test_corrupt_journal_stops_start_up_naming_it(workdir: Path) -> None:
    (workdir / "data").mkdir()
    (workdir / "data" / "journal.sqlite3").write_bytes(b"this is not a database, it was damaged\n" * 200)
    result = run_cli(["--emulate", "1"], workdir)
    assert_one_line_error(result, "journal.sqlite3", "corrupt", "never dropped silently")


@pytest.mark.both_stores
async def test_learned_speeds_survive_a_restart(workdir: Path, make_emulator: EmulatorFactory, store: str) -> None:
    """What the planner learned of each backend is kept in the journal: after a restart the slow
    backend is known as slow before any new job ran (unknown, both would count as average, 1.0)."""
    fast, slow = await make_emulator(pace=0.01), await make_emulator(pace=0.08)
    flags = (*backends(fast, slow), *(("--database", store) if store else ()))

    async def speeds(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
        async with session.get(f"{url}/health") as resp:
            return {b["url"]: b["relative_speed"] for b in (await resp.json())["backends"]}

    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *flags) as (proc, url):
            await asyncio.gather(*(post_job(session, url, f"learn-{i}", TINY) for i in range(8)))
            await wait_closed(session, url, [f"learn-{i}" for i in range(8)])
            learned = await speeds(session, url)
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        assert learned[slow.url] < 1 < learned[fast.url]
        async with bridge_process(workdir, *flags) as (proc, url):
            assert await speeds(session, url) == learned


def journal_rows(data_dir: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(data_dir / "journal.sqlite3")) as conn:
        return conn.execute("SELECT id, state, prompt_id, backend FROM jobs ORDER BY seq").fetchall()


async def test_prompt_moved_off_an_absent_backend_does_not_run_there_after_a_restart(
    make_fake: Any, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """A backend away for backend_grace loses its job (sent again under a new prompt_id); its old
    prompt, still in that ComfyUI's queue, is to be taken back when it is reachable again. The
    bridge stops before that: the next process takes it back (the journal kept it), and the job
    runs once."""
    fake: FakeComfy = await make_fake()
    engine = fake.upstream.engine
    engine.pause()  # the prompt waits in ComfyUI's queue
    first = await make_bridge(fake.url, backend_grace=0.3, comfy_timeout=1.0)
    status, body = await generate(first, "twice", TINY)
    assert status == 200, body
    job_id = body["job_id"]
    scheduler = first.app[SCHEDULER]
    await wait_for(lambda: engine.queue_remaining == 1)
    old_prompt = next(iter(scheduler.core.by_prompt))
    # ComfyUI stays up (its queue too) but the bridge cannot reach it: its socket drops, reconnects hang.
    gate = fake.hold("GET /prompt")
    await fake.drop_sockets()
    backend = next(iter(scheduler.backends.values()))
    await wait_for(lambda: old_prompt in backend.abandoned)  # moved: sent again under a new prompt_id
    await first.close()  # SIGTERM (or kill -9) before the backend is back
    assert journal_rows(tmp_path / "data")[0][1] == "waiting"

    gate.set()
    del fake.held["GET /prompt"]
    second = await make_bridge(fake.url, backend_grace=0.3)
    await wait_for(lambda: all(b.healthy for b in second.app[SCHEDULER].backends.values()))
    engine.resume()  # only now: a bridge that remembered the old prompt has taken it back by then
    assert (await poll_status(second, "twice", {"closed", "error"}))["status"] == "closed"
    await asyncio.sleep(0.5)  # let ComfyUI's queue run out
    assert old_prompt not in engine.started, f"job {job_id} ran twice: prompts {engine.started}"


async def test_jobs_a_restarted_comfyui_forgot_are_sent_again_in_their_order(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Bridge and ComfyUI both restart: the client's two prompts are unknown there, so both are sent
    again, in their order (each goes to the head of the queue: the later one used to overtake the
    earlier, and the client heard nothing while it ran, its frames waiting behind the earlier job's
    ending)."""
    emulator = await make_emulator()
    engine = emulator.engine
    engine.pause()
    first = await make_bridge(emulator, pipeline_depth=2)
    for n in range(2):
        status, body = await generate(first, "ordered", {**TINY, "1/width": 8 + n})
        assert status == 200, body
    await wait_for(lambda: engine.queue_remaining == 2)
    await first.close()
    engine.clear_pending()  # ComfyUI restarted too: it forgot both prompts

    second = await make_bridge(emulator, pipeline_depth=2)
    await wait_for(lambda: engine.queue_remaining == 2)
    engine.resume()
    for _ in range(2):
        await poll_status(second, "ordered", {"closed"})
    await wait_for(lambda: all(r[1] == "done" for r in journal_rows(tmp_path / "data")))
    in_acceptance_order = [r[2] for r in journal_rows(tmp_path / "data")]
    assert engine.started == in_acceptance_order


async def test_a_failure_the_last_process_could_not_tell_is_told_after_a_restart(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The client's socket is away (within disconnect_grace) while job X fails and job Y succeeds;
    the bridge restarts before the socket is back, and the frames it held die with it. The next
    process tells both endings again, in order: X's `error` as well as Y's `closed`."""
    emulator = await make_emulator()
    engine = emulator.engine
    engine.pause()
    first = await make_bridge(emulator, pipeline_depth=2, disconnect_grace=60)
    async with first.ws_connect("/ws", params={"clientId": "away"}) as ws:
        ids = []
        for n in range(2):
            status, body = await generate(first, "away", {**TINY, "1/width": 8 + n})
            assert status == 200, body
            ids.append(body["job_id"])
        await wait_for(lambda: engine.queue_remaining == 2)
    engine.faults.runtime_error = 1  # X fails in its first node, Y runs well
    engine.resume()
    await wait_for(lambda: [r[1] for r in journal_rows(tmp_path / "data")] == ["failed", "done"])
    await first.close()

    second = await make_bridge(emulator, pipeline_depth=2, disconnect_grace=60)
    async with second.ws_connect("/ws", params={"clientId": "away"}) as ws:
        heard = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for msg in ws:
                    frame = orjson.loads(msg.data)
                    heard.append((frame.get("job_id"), frame["status"], frame.get("jobs_left")))
                    if frame.get("job_id") == ids[1] and frame["status"] == "closed":
                        break
    endings = [(job, status) for job, status, _ in heard if status in ("closed", "error")]
    assert endings == [(ids[0], "error"), (ids[1], "closed")], heard


@pytest.mark.parametrize("dialect", ["jobs"], indirect=True)
async def test_a_prompt_to_take_back_that_comfyui_no_longer_knows_does_not_keep_it_down(
    make_fake: Any, make_bridge: BridgeFactory, dialect: str
) -> None:
    """A prompt kept to be taken back that ComfyUI has long forgotten: the jobs API answers its cancel
    with 404 ("no such job"); that is nothing left to take back, not a backend that is down."""
    fake: FakeComfy = await make_fake()
    first = await make_bridge(fake.url)
    core = first.app[SCHEDULER].core
    core.abandon(next(iter(core.backends.values())), "long-gone-prompt")
    await first.close()
    fake.replace("POST /jobs/*/cancel", 404, '{"error": "not found"}', times=100)
    second = await make_bridge(fake.url)
    await wait_for(lambda: all(b.healthy for b in second.app[SCHEDULER].backends.values()))
    assert "POST /jobs/*/cancel" in fake.seen
    assert (await run_job(second, "after", TINY))[-1]["status"] == "closed"


async def test_an_error_told_again_after_a_restart_does_not_close_a_socket_whose_client_has_a_job_in_line(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The client's only job failed; the bridge restarts and tells that `error` again, held for
    the socket on its way back. Meanwhile the client posts its next job, then connects: an ending
    said again closes no socket (the contract closes one only if the client has nothing in line)."""
    emulator = await make_emulator()
    first = await make_bridge(emulator)
    status, body = await generate(first, "retold", {"workflow": "bad_ckpt"})
    assert status == 200, body
    assert (await poll_status(first, "retold", {"error", "closed"}))["status"] == "error"
    await first.close()

    emulator.engine.pause()  # the next job stays in line
    second = await make_bridge(emulator)
    status, body = await generate(second, "retold", TINY)
    assert status == 200, body
    async with second.ws_connect("/ws", params={"clientId": "retold"}) as ws:
        heard = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                async for msg in ws:
                    heard.append(orjson.loads(msg.data))
        assert not ws.closed, f"closed ({ws.close_code}) with a job in line, after {heard}"
    emulator.engine.resume()


async def test_a_result_folder_it_cannot_list_at_start_stops_the_start_and_forgets_nothing(
    workdir: Path, make_emulator: EmulatorFactory
) -> None:
    """The start-up listing of the results skipped a folder it may not list (a trouble that may pass:
    a wrong owner after a restore) as if it were empty: the finished, unfetched job was taken for
    "its result files are gone", forgotten in the journal for good and its folder moved aside.
    Now the start stops, naming it; once it can be read, the results are there."""
    emulator = await make_emulator()
    flags = (*backends(emulator), "--inline-result-kb", "0")  # results as files
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *flags) as (proc, url):
            job_id = await post_job(session, url, "patient", TINY)
            await wait_closed(session, url, ["patient"])
            proc.kill()  # kill -9: the job is done, its results unfetched
            await proc.wait()
        folder = workdir / "data" / "results" / job_id
        folder.chmod(0o311)  # may be entered, not listed
        try:
            refused = await asyncio.to_thread(run_cli, list(flags), workdir, bound_by_file_modes())
        finally:
            folder.chmod(0o755)
        assert_one_line_error(refused, f"the data folder cannot be used: Permission denied: {folder}")
        async with bridge_process(workdir, *flags) as (proc, url):
            delivered = await fetch_results(session, url, "patient")
    assert [delivered_job for delivered_job, _ in delivered] == [job_id]


async def test_an_upload_outlives_a_job_whose_end_is_not_recorded_yet(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's end released its uploads at once, before the end was durable: while it could not be
    recorded (a full disk, a database away), the upload expired; a restart then ran the job again
    (its ComfyUI had forgotten the prompt) with an upload that was gone, and it failed."""
    emulator = await make_emulator()
    first = await make_bridge(emulator, upload_ttl=0.5, data_dir=tmp_path / "data")
    journal = first.app[JOURNAL]
    update = journal.update
    refused = asyncio.Event()

    def no_end(job_id: str, fields: dict[str, Any], delivery: Any = None) -> asyncio.Future[None]:
        if fields.get("state") != "done":
            return update(job_id, fields, delivery)
        refused.set()
        future = asyncio.get_running_loop().create_future()
        future.set_exception(StorageUnavailable("The bridge's database cannot be reached"))
        return future

    monkeypatch.setattr(journal, "update", no_end)
    _, needed = await upload(first, {"file": ("needed.png", png(10, 10))}, client_id="durable")
    status, body = await generate(first, "durable", {"workflow": "invert", "1/image": needed["file"]})
    assert status == 200, body
    await asyncio.wait_for(refused.wait(), 10)  # the job ran; its end is not recorded
    _, control = await upload(first, {"file": ("control.png", png(10, 10))}, client_id="other")
    folder = tmp_path / "data" / "uploads"
    await wait_for(lambda: not (folder / "c-other" / control["file"]).exists())  # a sweep past the TTL ran
    await first.close()  # the end never landed: the journal says the job is in ComfyUI
    emulator.engine.history.clear()  # which restarted too, and forgot the prompt
    second = await make_bridge(emulator, data_dir=tmp_path / "data")
    assert (await poll_status(second, "durable", {"closed", "error"}))["status"] == "closed"


KEPT = {"journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm", "bridge.lock", "current_state.json"}


def job_ids_in_journal(data_dir: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(data_dir / "journal.sqlite3")) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM jobs")]


def files_left(data_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file() and p.name not in KEPT)


async def test_results_fetched_just_before_a_kill_9_are_not_left_in_the_data_folder(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """A client fetches its results; the fetch is journaled (its row forgotten) and the process dies
    (kill -9) before it unlinks the files, the next step. The next start found a result folder no
    journal row names and moved it to data/orphans/, "kept there until removed by hand", with a
    warning that reads as a lost journal; a restart soak saw 12 such folders after one kill -9."""
    data = tmp_path / "data"
    emulator = await make_emulator()
    local = {"inline_result_kb": 0, "storage": "", "s3_endpoint": ""}  # result files in the data folder
    first = await make_bridge(emulator, **local)
    resp = await first.post("/generate-based-workflow", params={"clientId": "c"}, json=TINY)
    assert resp.status == 200, await resp.text()
    job_id = (await resp.json())["job_id"]
    await poll_status(first, "c", {"closed"})
    assert any(job_id in name for name in files_left(data))

    async def dies_before_the_unlink(keys: list[str]) -> None:  # the process is killed right here
        return None

    first.app[SCHEDULER].core.results.delete = dies_before_the_unlink
    resp = await first.get("/history", params={"clientId": "c"})
    assert resp.status == 200
    await resp.read()
    await wait_for(lambda: job_id not in job_ids_in_journal(data))  # the fetch is durable
    await first.close()

    second = await make_bridge(emulator, **local)
    assert (await second.get("/history", params={"clientId": "c"})).status == 204  # delivered once, forgotten
    left = [name for name in files_left(data) if job_id in name]
    assert left == [], f"files of a job fetched and forgotten before the crash are still kept: {left}"


async def test_a_fetched_jobs_folder_is_put_back_when_its_forget_never_landed(tmp_path: Path) -> None:
    """Set aside before the journal forgets the job: a crash before the forget lands leaves the row,
    so the results are still owed (served once more, as the README says), under their own name."""
    root = tmp_path / "results"
    owed, forgotten = "a" * 32, "b" * 32
    for job in (owed, forgotten):
        (root / f"{job}{FETCHED}").mkdir(parents=True)
        (root / f"{job}{FETCHED}" / "000-x.png").write_bytes(b"png")
    await ResultStore(root).sort_out(done={owed}, unfinished=set(), orphan_age=0)
    assert not (tmp_path / "orphans").exists()  # nothing taken for a lost journal's
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [owed, f"{owed}/000-x.png"]
