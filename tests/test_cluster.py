"""Several bridge processes on one PostgreSQL behave as one bridge: one leads (runs the scheduler),
the others relay every request to it; when it dies, another takes over its jobs by prompt_id."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from comfybridge.emulator import Emulator

from .conftest import EmulatorFactory, wait_for
from .helpers import TINY, bridge_process, fetch_results, png, post_job, status_of, wait_closed
from .postgres import PostgresServer
from .s3 import S3Server

pytestmark = pytest.mark.timeout(180)


@contextlib.asynccontextmanager
async def cluster(
    workdir: Path, database: str, emulators: list[Emulator], size: int, storage: dict[str, str], *extra: str
) -> AsyncIterator[list[tuple[asyncio.subprocess.Process, str]]]:
    """`size` bridge processes, started one after the other (the first leads), sharing the
    workflows and either the data folder or, with object storage (`storage`), a bucket and no
    folder at all; each has its own working folder and log. `extra`: flags for every bridge."""
    flags = (
        "--backends", ",".join(e.url for e in emulators), "--database", database, "--job-idle-timeout", "60",
        "--workflows", str(workdir / "workflows"), *extra,
    )  # fmt: skip
    if storage:
        flags += ("--storage", storage["storage"], "--s3-endpoint", storage["s3_endpoint"])
    async with contextlib.AsyncExitStack() as stack:
        bridges = []
        for n in range(size):
            own = workdir / f"bridge{n}"
            own.mkdir()
            data = own / "data" if storage else workdir / "data"
            bridges.append(
                await stack.enter_async_context(bridge_process(own, *flags, "--data-dir", str(data), ready="/health"))
            )
        yield bridges


async def health(session: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with session.get(f"{url}/health") as resp:
        report: dict[str, object] = await resp.json()
        return report


async def role_and_generation(session: aiohttp.ClientSession, url: str) -> tuple[object, object]:
    seen: dict[str, object] = (await health(session, url))["cluster"]  # type: ignore[assignment]
    return seen["role"], seen["generation"]


async def metrics_of(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The bridge's own /metrics (never relayed), sample by sample."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return {
        name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    }


async def closed_job_ids(ws: aiohttp.ClientWebSocketResponse, wanted: int) -> list[str]:
    """Job ids of `closed` frames, in order, until `wanted` of them came (the guard only stops a hang)."""
    closed: list[str] = []
    async with asyncio.timeout(90):
        while len(closed) < wanted:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            frame = orjson.loads(msg.data)
            if frame["status"] == "closed":
                closed.append(frame["job_id"])
    return closed


async def test_a_client_on_three_bridges_hears_and_fetches_every_job(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, storage: dict[str, str]
) -> None:
    emulators = [await make_emulator(pace=0.02), await make_emulator(pace=0.02)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 3, storage) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (_, a), (_, b), (_, c) = bridges
        assert [(await health(session, url))["cluster"]["role"] for url in (a, b, c)] == [  # type: ignore[index]
            "leader", "follower", "follower",
        ]  # fmt: skip
        async with session.ws_connect(f"{c}/ws", params={"clientId": "everywhere"}) as ws:
            first = orjson.loads((await ws.receive()).data)
            assert first["status"] == "connected"
            jobs = [await post_job(session, b, "everywhere", TINY) for _ in range(6)]
            assert sorted(await closed_job_ids(ws, 6)) == sorted(jobs)
        assert sorted(set(job for job, _ in await fetch_results(session, c, "everywhere"))) == sorted(jobs)
        async with session.get(f"{a}/generation-count") as resp:
            assert await resp.json() == 6
        async with session.get(f"{b}/history", params={"clientId": "everywhere"}) as resp:
            assert resp.status == 204  # fetched once, through C
        scraped = {url: await metrics_of(session, url) for url in (a, b, c)}
        assert [scraped[url]["comfybridge_cluster_leader"] for url in (a, b, c)] == [1, 0, 0]
        assert scraped[b]['comfybridge_relayed_total{kind="http"}'] == 7  # six jobs and a /history
        assert scraped[c]['comfybridge_relayed_total{kind="websocket"}'] == 1
        assert 'comfybridge_relayed_total{kind="http"}' not in scraped[a]  # the leader relays nothing
        assert 0 < scraped[a]["comfybridge_cluster_lease_seconds"] <= 5  # renewed each second, 5 s long
        assert "comfybridge_cluster_lease_seconds" not in scraped[b]
        reports = [(await health(session, url))["cluster"] for url in (a, b)]
        assert 0 < reports[0]["lease_expires_in"] <= 5  # type: ignore[index,operator]
        assert "lease_expires_in" not in reports[1]  # type: ignore[operator]
        follower_health = await health(session, b)
        assert "generation_count" not in follower_health  # no figures of its own idle scheduler
        assert follower_health["schedule"] == "kept by the leading bridge: see its /health"
        # An Upgrade header on a plain request is no socket: the follower relays it as the request it is.
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
        async with session.get(f"{b}/workflow-list", headers=upgrade) as resp:
            assert resp.status == 200
            assert "solid" in await resp.json()
        # One request for a whole job, through a follower: answered once the leader's job ended.
        params = {"clientId": "at-once", "wait": "1", "resType": "base64"}
        async with session.post(f"{c}/generate-based-workflow", params=params, json=TINY) as resp:
            assert resp.status == 200, await resp.text()
            (item,) = (await resp.json())["files"]
        assert base64.b64decode(item["content"]).startswith(b"\x89PNG")
        async with session.get(f"{a}/history", params={"clientId": "at-once"}) as resp:
            assert resp.status == 204  # handed over in that answer


async def test_a_follower_logs_the_clients_address_behind_a_trusted_proxy(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """Behind nginx (`--trusted-proxies 127.0.0.1`), a follower's own log line for a request it
    relayed named nginx's address: its relay ran before the access check that reads X-Forwarded-For.
    (The leader's line, and its rate limits, had the client's.)"""
    extra = ("--trusted-proxies", "127.0.0.1")
    async with (
        cluster(workdir, postgres.new_database(), [await make_emulator()], 2, {}, *extra) as bridges,
        aiohttp.ClientSession() as session,
    ):
        follower = bridges[1][1]
        async with session.post(
            f"{follower}/generate-based-workflow",
            params={"clientId": "addressed"},
            json=TINY,
            headers={"X-Forwarded-For": "10.0.0.7"},
        ) as resp:
            assert resp.status == 200, await resp.text()
    for n in (0, 1):  # the leader's line, and the follower's
        lines = [
            line
            for line in (workdir / f"bridge{n}" / "bridge.log").read_text().splitlines()
            if "client=addressed " in line
        ]
        assert lines, n
        assert all(line.endswith(" from 10.0.0.7") for line in lines), lines


async def test_kill_9_of_the_leader_mid_burst_loses_nothing_and_runs_nothing_twice(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, storage: dict[str, str]
) -> None:
    emulators = [await make_emulator(pace=0.1), await make_emulator(pace=0.1)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 3, storage) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (leader, _), (_, b), (_, c) = bridges
        async with session.ws_connect(f"{c}/ws", params={"clientId": "burst"}) as ws:
            await ws.receive()  # connected
            jobs = [await post_job(session, b, "burst", TINY) for _ in range(16)]
            await wait_for(lambda: sum(len(e.engine.started) for e in emulators) >= 4)
            os.kill(leader.pid, signal.SIGKILL)
            async with asyncio.timeout(90):  # polled through C, which relays to whichever bridge leads
                while not (
                    (info := await status_of(session, c, "burst")).get("jobs_left") == 0 and info["status"] == "closed"
                ):
                    await asyncio.sleep(0.05)
            assert not ws.closed  # the socket on C stayed open through the takeover
        async with asyncio.timeout(10):  # the follower learns the new generation at its next look
            while {(await health(session, url))["cluster"]["generation"] for url in (b, c)} != {2}:  # type: ignore[index]
                await asyncio.sleep(0.05)
        took_over = [await health(session, url) for url in (b, c)]
        assert sorted(h["cluster"]["role"] for h in took_over) == ["follower", "leader"]  # type: ignore[index]
        delivered = [job for job, _ in await fetch_results(session, b, "burst")]
        assert sorted(set(delivered)) == sorted(jobs)
    started = [prompt for e in emulators for prompt in e.engine.started]
    assert len(started) == len(set(started)) == 16  # every job ran, none twice
    for n in (1, 2):
        assert "Traceback" not in (workdir / f"bridge{n}" / "bridge.log").read_text()


async def test_kill_9_of_a_follower_loses_nothing(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, storage: dict[str, str]
) -> None:
    """A follower holds nothing of its own: jobs submitted through it, then its death, and every
    one of them ends once and is fetched through the leader."""
    emulators = [await make_emulator(pace=0.05)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, storage) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (_, a), (follower, b) = bridges
        jobs = [await post_job(session, b, "via-follower", TINY) for _ in range(6)]
        os.kill(follower.pid, signal.SIGKILL)
        async with asyncio.timeout(60):
            while not (
                (info := await status_of(session, a, "via-follower")).get("jobs_left") == 0
                and info["status"] == "closed"
            ):
                await asyncio.sleep(0.05)
        assert sorted(set(job for job, _ in await fetch_results(session, a, "via-follower"))) == sorted(jobs)
    started = [prompt for e in emulators for prompt in e.engine.started]
    assert len(started) == len(set(started)) == 6


async def test_sigterm_hands_the_lead_over_at_once_and_relays_meanwhile(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, storage: dict[str, str]
) -> None:
    emulators = [await make_emulator(pace=0.02)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, storage) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (first, a), (_, b) = bridges
        await post_job(session, a, "handover", TINY)
        first.send_signal(signal.SIGTERM)  # bridge_process gives no --stop-grace here: 0, so it goes
        await first.wait()
        async with asyncio.timeout(30):
            while (await health(session, b))["cluster"]["role"] != "leader":  # type: ignore[index]
                await asyncio.sleep(0.05)
        job = await post_job(session, b, "handover", TINY)
        async with asyncio.timeout(30):
            while (await status_of(session, b, "handover")).get("job_id") != job:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(30):
            while (await status_of(session, b, "handover"))["status"] != "closed":
                await asyncio.sleep(0.05)
        assert len(await fetch_results(session, b, "handover")) >= 2


async def test_bridges_starting_together_on_an_empty_database_elect_one_leader(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    emulator = await make_emulator()
    database = postgres.new_database()
    flags = ("--backends", emulator.url, "--database", database, "--data-dir", str(workdir / "data"),
             "--workflows", str(workdir / "workflows"))  # fmt: skip
    for n in range(3):
        (workdir / f"b{n}").mkdir()
    async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        bridges = await asyncio.gather(
            *(stack.enter_async_context(bridge_process(workdir / f"b{n}", *flags, ready="/health")) for n in range(3))
        )
        async with asyncio.timeout(10):  # a follower names the leader once it has read its record
            while None in {(await health(session, url))["cluster"]["leader"] for _, url in bridges}:  # type: ignore[index]
                await asyncio.sleep(0.05)
        reports = [await health(session, url) for _, url in bridges]
        roles = sorted(r["cluster"]["role"] for r in reports)  # type: ignore[index]
        assert roles == ["follower", "follower", "leader"]
        leader = next(url for (_, url), r in zip(bridges, reports, strict=True) if r["cluster"]["role"] == "leader")  # type: ignore[index]
        assert {r["cluster"]["leader"] for r in reports} == {leader}  # type: ignore[index]
        job = await post_job(session, bridges[0][1], "together", TINY)
        assert job


async def test_turns_are_fair_across_bridges(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, storage: dict[str, str]
) -> None:
    """100 jobs of one client posted through A do not make a client with one job on B wait for them."""
    emulators = [await make_emulator(pace=0.02)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, storage) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (_, a), (_, b) = bridges
        await asyncio.gather(*(post_job(session, a, "hundred", TINY) for _ in range(100)))
        async with session.ws_connect(f"{b}/ws", params={"clientId": "single"}) as ws:
            await ws.receive()  # connected
            job = await post_job(session, b, "single", TINY)
            assert await closed_job_ids(ws, 1) == [job]
        left = (await status_of(session, a, "hundred"))["jobs_left"]
        assert left >= 80, f"the single job waited for {100 - left} of the hundred"


@pytest.mark.parametrize("outage", [3, 30])
async def test_postgres_stopped_and_started_mid_burst_every_job_ends_once(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, storage: dict[str, str], outage: float
) -> None:
    """A short outage: the leader connects again and keeps its lead. A long one (past leader_timeout):
    it stops leading; once the database is back a leader adopts the prompts that ran on meanwhile."""
    emulators = [await make_emulator(pace=0.1), await make_emulator(pace=0.1)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, storage) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (_, a), (_, b) = bridges
        jobs = [await post_job(session, a, "outage", TINY) for _ in range(12)]
        await wait_for(lambda: sum(len(e.engine.started) for e in emulators) >= 3)
        generation = (await health(session, b))["cluster"]["generation"]  # type: ignore[index]
        postgres.stop()
        try:
            for url in (a, b):  # refused at once, whichever bridge is asked, and nothing accepted
                async with asyncio.timeout(30):
                    async with session.post(
                        f"{url}/generate-based-workflow", params={"clientId": "refused"}, json=TINY
                    ) as resp:
                        assert resp.status == 503, await resp.text()
                        assert (await resp.json())["detail"]
            async with asyncio.timeout(30):  # the follower no longer knows a leader...
                while (cluster_view := (await health(session, b))["cluster"])["leader"] is not None:  # type: ignore[index]
                    await asyncio.sleep(0.05)
            assert cluster_view["generation"] == generation  # ...and its figure does not fall back to 0
            await asyncio.sleep(outage)  # the outage itself, not a timing assertion
        finally:
            postgres.start()
        async with asyncio.timeout(120):
            while not (
                (info := await status_of(session, b, "outage")).get("jobs_left") == 0 and info["status"] == "closed"
            ):
                await asyncio.sleep(0.1)
        assert sorted(set(job for job, _ in await fetch_results(session, b, "outage"))) == sorted(jobs)
        async with asyncio.timeout(30):  # a may still be finding the leader again after a long outage (503)
            while True:
                async with session.get(f"{a}/execution-info", params={"clientId": "refused"}) as resp:
                    if resp.status != 503:
                        break
                await asyncio.sleep(0.2)
        assert resp.status == 400  # an unknown clientId: the refused job was never accepted
        async with session.get(f"{b}/generation-count") as resp:
            assert await resp.json() == 12
    started = [prompt for e in emulators for prompt in e.engine.started]
    assert len(started) == len(set(started)) == 12  # every job ran, none twice


async def test_sighup_on_a_follower_starts_no_scheduling_of_its_own(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, storage: dict[str, str]
) -> None:
    """A follower told to reload keeps the backend list for when it leads; it opens nothing to
    ComfyUI (its socket there would replace the leader's, which has the same name)."""
    emulator = await make_emulator(pace=0.02)
    async with (
        cluster(workdir, postgres.new_database(), [emulator], 2, storage) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (_, a), (follower, b) = bridges
        follower.send_signal(signal.SIGHUP)
        log = workdir / "bridge1" / "bridge.log"
        await wait_for(lambda: "SIGHUP: backends are now" in log.read_text())
        assert (await health(session, b))["backends"] == []
        jobs = [await post_job(session, b, "after-hup", TINY) for _ in range(3)]
        async with asyncio.timeout(60):
            while (await status_of(session, a, "after-hup")).get("jobs_left") != 0:
                await asyncio.sleep(0.05)
        assert sorted(job for job, _ in await fetch_results(session, a, "after-hup")) == sorted(jobs)


async def test_a_bridge_whose_backends_or_data_folder_differ_from_the_leaders_says_so(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    first, second = await make_emulator(), await make_emulator()
    database = postgres.new_database()
    common = ("--database", database, "--workflows", str(workdir / "workflows"))
    shared = (*common, "--data-dir", str(workdir / "data"))
    for name in ("leader", "odd", "twin"):
        (workdir / name).mkdir()
    odd, twin = workdir / "odd" / "bridge.log", workdir / "twin" / "bridge.log"
    async with (  # started in turn: the first leads
        bridge_process(workdir / "leader", "--backends", first.url, *shared, ready="/health"),
        bridge_process(
            workdir / "odd",
            "--backends",
            f"{first.url},{second.url}",
            *common,
            "--data-dir",
            str(workdir / "odd-data"),
            ready="/health",
        ),  # fmt: skip
        bridge_process(workdir / "twin", "--backends", first.url, *shared, ready="/health"),
    ):
        await wait_for(lambda: "give every bridge of a cluster the same --backends" in odd.read_text())
        await wait_for(lambda: "the same --data-dir" in odd.read_text())
        await wait_for(lambda: "the cluster's leader is" in twin.read_text())  # compared by then
    assert "same --backends" not in (workdir / "leader" / "bridge.log").read_text()
    assert "same --" not in twin.read_text()  # same backends, same folder: nothing to say


async def test_a_cluster_on_object_storage_shares_no_folder_and_survives_kill_9(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, s3: S3Server
) -> None:
    """Each bridge has a data folder of its own; uploads and results live in one bucket. An upload
    through the follower feeds jobs the leader runs, and a result comes back through it as a link;
    the leader dies mid-burst; the other bridge takes over and every job's result comes back, from
    the bucket."""
    emulators = [await make_emulator(pace=0.1), await make_emulator(pace=0.1)]
    bucket = s3.new_bucket()
    flags = ("--backends", ",".join(e.url for e in emulators), "--database", postgres.new_database(),
             "--storage", f"s3://{bucket}/c", "--s3-endpoint", s3.url, "--workflows", str(workdir / "workflows"),
             "--job-idle-timeout", "60")  # fmt: skip
    for name in ("a", "b"):
        (workdir / name).mkdir()
    async with (
        bridge_process(workdir / "a", *flags, "--data-dir", str(workdir / "a" / "data"), ready="/health") as (
            leader,
            _,
        ),
        bridge_process(workdir / "b", *flags, "--data-dir", str(workdir / "b" / "data"), ready="/health") as (_, b),
        aiohttp.ClientSession() as session,
    ):
        form = aiohttp.FormData()
        form.add_field("file", png(10, 6, 0x0F0F0F), filename="in.png", content_type="image/png")
        async with session.post(f"{b}/upload", params={"clientId": "bucketed"}, data=form) as resp:
            assert resp.status == 200, await resp.text()
            name = (await resp.json())["file"]
        body = {"workflow": "invert", "1/image": name}
        linked = await post_job(session, b, "bucketed", body)
        async with asyncio.timeout(30):
            while (await status_of(session, b, "bucketed")).get("status") != "closed":
                await asyncio.sleep(0.05)
        async with session.get(f"{b}/history", params={"clientId": "bucketed", "resType": "url"}) as resp:
            (item,) = (await resp.json())["files"]  # relayed: links signed by the leader
        assert item["job_id"] == linked
        async with session.get(item["url"]) as got:
            assert (await got.read()).startswith(b"\x89PNG")
        jobs = [await post_job(session, b, "bucketed", body) for _ in range(8)]
        await wait_for(lambda: sum(len(e.engine.started) for e in emulators) >= 2)
        os.kill(leader.pid, signal.SIGKILL)
        async with asyncio.timeout(90):
            while not (
                (info := await status_of(session, b, "bucketed")).get("jobs_left") == 0 and info["status"] == "closed"
            ):
                await asyncio.sleep(0.05)
        assert sorted(set(job for job, _ in await fetch_results(session, b, "bucketed"))) == sorted(jobs)
    started = [prompt for e in emulators for prompt in e.engine.started]
    assert len(started) == len(set(started)) == 9
    for name in ("a", "b"):  # nothing of the uploads or the results on either bridge's disk
        assert not [p for p in (workdir / name / "data").rglob("*.png") if p.is_file()]


async def test_frames_of_a_job_submitted_while_a_relayed_socket_reconnects_are_not_lost(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """Socket on C (relayed to A). A is killed; B takes over; a job is posted to B at once, while C's
    socket is still finding B: it hears that job's frames, its `closed` above all (held for it)."""
    emulators = [await make_emulator(pace=0.02)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 3, {}) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (leader, _), (_, b), (_, c) = bridges
        async with session.ws_connect(f"{c}/ws", params={"clientId": "between"}) as ws:
            assert orjson.loads((await ws.receive()).data)["status"] == "connected"
            os.kill(leader.pid, signal.SIGKILL)
            async with asyncio.timeout(30):
                while (await health(session, b))["cluster"]["role"] != "leader":  # type: ignore[index]
                    await asyncio.sleep(0.02)
            job = await post_job(session, b, "between", TINY)
            heard: list[tuple[str | None, str]] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):  # the job itself takes a fraction of a second
                    while (job, "closed") not in heard:
                        frame = orjson.loads((await ws.receive()).data)
                        heard.append((frame.get("job_id"), frame["status"]))
            assert (job, "closed") in heard, f"job {job}: the socket on C heard only {set(heard)}"


async def test_a_frozen_leader_is_deposed_its_jobs_end_once_and_its_return_deafens_nothing(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """A paused leader (SIGSTOP: a frozen VM, a blocked loop) keeps its lock while its host answers
    keepalives. The follower ends its session once it has been silent for 2 x leader_timeout + 2 s,
    leads and takes its jobs over. Woken, the old leader stands down, and the close of its ComfyUI
    socket (which makes ComfyUI forget the clientId both leaders use) costs the next jobs nothing."""
    emulator = await make_emulator(pace=0.1)
    async with (
        cluster(
            workdir, postgres.new_database(), [emulator], 2, {}, "--leader-timeout", "1", "--pipeline-depth", "8"
        ) as bridges,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        (first, a), (_, b) = bridges
        jobs = [await post_job(session, b, "frozen", TINY) for _ in range(8)]
        # Paused once every prompt is inside ComfyUI: one paused mid-send would go out when it wakes,
        # after the next leader sent its job again (no fence reaches inside ComfyUI; see README).
        await wait_for(lambda: emulator.engine.requests["POST /prompt"] == 8)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(60):  # b's own /health: never relayed
                while (await health(session, b))["cluster"]["role"] != "leader":  # type: ignore[index]
                    await asyncio.sleep(0.1)
            await wait_closed(session, b, ["frozen"], timeout=60)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        async with asyncio.timeout(30):  # the woken one follows, and knows whom
            while (await role_and_generation(session, a)) != ("follower", 2):
                await asyncio.sleep(0.1)
        assert (await health(session, b))["cluster"]["role"] == "leader"  # type: ignore[index]
        jobs += [await post_job(session, a, "after", TINY) for _ in range(2)]  # relayed by the woken one
        await wait_closed(session, b, ["after"], timeout=40)  # not job_idle_timeout (60 s)
        delivered = [job for client in ("frozen", "after") for job, _ in await fetch_results(session, b, client)]
        assert sorted(set(delivered)) == sorted(jobs)
    started = emulator.engine.started
    assert len(started) == len(set(started)) == 10  # every job ran, none twice
    assert "is ended, so" in (workdir / "bridge1" / "bridge.log").read_text()


async def test_an_interrupt_during_a_database_outage_is_refused_not_undone(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """POST /interrupt during a PostgreSQL outage (longer than --leader-timeout): the ends it cannot
    record would be undone by the next leader, which runs the jobs from the journal. It answered 200
    "interrupted"; it must say 503, as other requests that need the database do."""
    emulators = [await make_emulator(pace=0.3)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, {}) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (_, a), (_, b) = bridges
        jobs = [await post_job(session, a, "cancelme", TINY) for _ in range(6)]
        await wait_for(lambda: len(emulators[0].engine.started) >= 1)
        postgres.stop()
        try:
            async with session.post(f"{b}/interrupt", params={"clientId": "cancelme"}) as resp:
                interrupted = resp.status, await resp.text()
            await asyncio.sleep(10)  # past --leader-timeout: the leader stands down
        finally:
            postgres.start()
        async with asyncio.timeout(90):
            while True:
                async with session.get(f"{b}/execution-info", params={"clientId": "cancelme"}) as resp:
                    if resp.status != 503:
                        info = await resp.json()
                        if info.get("jobs_left") == 0:
                            break
                await asyncio.sleep(0.2)
        assert interrupted[0] == 503, interrupted
        assert "not recorded yet" in interrupted[1] or "leads" in interrupted[1], interrupted
        assert len(jobs) == 6  # each ended once the database was back (jobs_left 0 above)


async def test_sigterm_of_a_lone_postgres_bridge_serves_during_its_grace(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """One bridge with --database: SIGTERM drains as a single bridge's does (for stop_grace the bridge
    refuses new jobs and /ready answers 503, while sockets, polls and fetches are served). It stood
    down as if another bridge were there to take over: every poll and fetch answered 503 "No bridge
    of the cluster leads", and its sockets closed at once with 1012."""
    emulators = [await make_emulator(pace=0.2)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 1, {}, "--stop-grace", "6") as bridges,
        aiohttp.ClientSession() as session,
    ):
        ((proc, a),) = bridges
        async with session.ws_connect(f"{a}/ws", params={"clientId": "lone"}) as ws:
            await ws.receive()  # connected
            for _ in range(3):
                await post_job(session, a, "lone", TINY)
            await wait_for(lambda: len(emulators[0].engine.started) >= 1)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)  # well inside the 6 s grace
            seen = {}
            for method, path in (
                ("GET", "/execution-info"), ("GET", "/history"), ("GET", "/generation-count"),
                ("GET", "/workflow-list"), ("GET", "/ready"), ("POST", "/generate-based-workflow"),
            ):  # fmt: skip
                body = TINY if method == "POST" else None
                async with session.request(method, f"{a}{path}", params={"clientId": "lone"}, json=body) as resp:
                    seen[path] = (resp.status, (await resp.read())[:120])
            closes = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    while (msg := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
                        pass
                    closes.append((msg.type, msg.data, msg.extra))
        assert proc.returncode is None  # still in its grace when asked
        assert seen["/ready"][0] == 503, seen
        assert seen["/generate-based-workflow"][0] == 503, seen
        for path in ("/execution-info", "/history", "/generation-count", "/workflow-list"):
            assert seen[path][0] in (200, 204), (path, seen[path], "socket:", closes)
        assert not closes, closes


async def test_a_follower_relays_to_the_leader_while_its_lease_lasts_through_a_database_outage(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """The database goes away: the leader serves on what needs none (a poll) until its lease runs
    out. A follower that lost the database too kept relaying nothing: it forgot the leader at once,
    and answered 503 "no bridge leads" while the leader still led. It relays until that lease could
    have run out, then forgets it."""
    emulators = [await make_emulator()]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, {}, "--leader-timeout", "10") as bridges,
        aiohttp.ClientSession() as session,
    ):
        _, (_, b) = bridges
        await post_job(session, b, "poller", TINY)
        await wait_closed(session, b, ["poller"])
        follower_log = workdir / "bridge1" / "bridge.log"
        said = len(follower_log.read_text())
        postgres.stop()
        try:
            await wait_for(lambda: "database" in follower_log.read_text()[said:], timeout=30)  # b lost it too
            async with session.get(f"{b}/execution-info", params={"clientId": "poller"}) as resp:
                assert resp.status == 200, await resp.text()  # relayed to a, which still leads
                assert (await resp.json())["status"] == "closed"
            async with asyncio.timeout(60):  # a's lease has run out: b names no leader any more
                while (await health(session, b))["cluster"]["leader"] is not None:  # type: ignore[index]
                    await asyncio.sleep(0.1)
        finally:
            postgres.start()


async def test_a_lone_leader_in_its_sigterm_grace_takes_no_job_after_leading_again(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """A lone bridge on PostgreSQL gets SIGTERM and drains (new jobs 503). The database goes away past
    --leader-timeout, the term ends, and once it is back the bridge leads again (nobody else can): its
    new term must still refuse new jobs."""
    emulators = [await make_emulator()]
    flags = ("--stop-grace", "60", "--leader-timeout", "2")
    async with (
        cluster(workdir, postgres.new_database(), emulators, 1, {}, *flags) as bridges,
        aiohttp.ClientSession() as session,
    ):
        ((proc, a),) = bridges
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        async with session.post(f"{a}/generate-based-workflow", params={"clientId": "late"}, json=TINY) as resp:
            assert resp.status == 503, await resp.text()  # stopping
        postgres.stop()
        try:
            await asyncio.sleep(4.0)  # past --leader-timeout: the term ends
        finally:
            postgres.start()
        async with asyncio.timeout(30):  # it campaigns again, and (alone) wins
            while (await health(session, a))["cluster"]["role"] != "leader":  # type: ignore[index]
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        async with session.post(f"{a}/generate-based-workflow", params={"clientId": "later"}, json=TINY) as resp:
            answered = resp.status, await resp.text()
        assert answered[0] == 503, f"a bridge in its SIGTERM grace took a new job: {answered}"


async def test_a_leader_whose_only_peer_is_stepping_down_drains_as_a_lone_bridge(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """The whole cluster is stopped, follower first: a bridge that stands down is not one to hand over
    to, so the leader drains as a lone bridge does, serving polls through its grace."""
    emulators = [await make_emulator()]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, {}, "--stop-grace", "20") as bridges,
        aiohttp.ClientSession() as session,
    ):
        (leader, a), (follower, _) = bridges
        await post_job(session, a, "whole", TINY)
        follower.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        leader.send_signal(signal.SIGTERM)
        await asyncio.sleep(2.0)
        async with session.get(f"{a}/execution-info", params={"clientId": "whole"}) as resp:
            answered = resp.status, await resp.text()
        role = (await health(session, a))["cluster"]
        assert answered[0] == 200, (answered, role)


async def test_a_bridge_that_leads_again_after_a_database_outage_accepts_new_jobs(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """PostgreSQL goes away for longer than --leader-timeout: the leader stops leading, and once the
    database is back it takes the lock again and leads. Its new term refused every new job for good
    with 503 "The bridge is shutting down": the end of the old term (the scheduler closed) was taken
    for a SIGTERM's grace. With several bridges the old leader usually wins the lock back, so the
    whole cluster refused work until that bridge was restarted."""
    emulators = [await make_emulator()]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 1, {}, "--leader-timeout", "2") as bridges,
        aiohttp.ClientSession() as session,
    ):
        ((_, a),) = bridges
        await post_job(session, a, "before", TINY)
        await wait_closed(session, a, ["before"], timeout=30)
        postgres.stop()
        try:
            async with asyncio.timeout(30):  # past --leader-timeout: the term ends
                while (await health(session, a))["cluster"]["role"] == "leader":  # type: ignore[index]
                    await asyncio.sleep(0.1)
        finally:
            postgres.start()
        async with asyncio.timeout(30):  # it campaigns again and, alone, wins
            while (await health(session, a))["cluster"]["role"] != "leader":  # type: ignore[index]
                await asyncio.sleep(0.1)
        answer = await submit_past_503(session, a)
        async with session.get(f"{a}/ready") as resp:
            ready = resp.status, await resp.text()
        assert answer[0] == 200, f"leading again, it still refuses jobs: {answer}; /ready {ready}"


async def test_a_socket_on_a_follower_closes_with_1011_after_its_last_error(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """The contract: after an `error` that leaves the client nothing, the socket closes with 1011. A
    follower relaying the socket took the code from aiohttp's `close_code`, which turns to 1006 when
    its reply to the leader's Close finds the leader already gone (the Close itself said 1011). 1006
    reads as "the leader is gone": the follower connected again and kept the client's socket open,
    heartbeats and all, for good. One try in three to six did so; each of ten must close."""
    emulators = [await make_emulator(pace=0.3)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, {}) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (_, a), (_, b) = bridges
        outcomes = []
        for attempt in range(10):
            client = f"ends-{attempt}"
            ending = "interrupt" if attempt % 2 else "failed job"
            async with session.ws_connect(f"{b}/ws", params={"clientId": client}) as ws:
                assert orjson.loads((await ws.receive()).data)["status"] == "connected"
                first = await post_job(session, a, client, TINY)
                async with asyncio.timeout(30):  # the first job ends well
                    while True:
                        frame = orjson.loads((await ws.receive()).data)
                        if frame["status"] == "closed" and frame.get("job_id") == first:
                            break
                if ending == "interrupt":
                    await post_job(session, a, client, TINY)
                    await post_job(session, a, client, TINY)
                    async with session.post(f"{a}/interrupt", params={"clientId": client}) as resp:
                        assert resp.status == 200, await resp.text()
                else:
                    await post_job(session, a, client, {"workflow": "broken"})
                last: dict[str, object] = {}
                msg = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(6):  # heartbeats come each second meanwhile; a close comes at once
                        while (msg := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
                            frame = orjson.loads(msg.data)
                            if frame["status"] == "error":
                                last = frame
                assert last.get("jobs_left") == 0, last
                outcomes.append(None if msg is None or msg.type is aiohttp.WSMsgType.TEXT else (msg.type, msg.data))
                if outcomes[-1] is None:
                    break  # still open, heartbeats going on
        assert outcomes == [(aiohttp.WSMsgType.CLOSE, 1011)] * 10, f"try {len(outcomes)} ({ending}): {outcomes}"


async def test_a_deposed_leader_that_leads_again_later_accepts_new_jobs(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """A second term without a database outage: A leads, freezes (SIGSTOP) and is deposed; B leads; A
    wakes and follows. Later B dies (kill -9) and A, the only bridge left, leads again: it takes jobs
    (it refused them all, and /ready said "the bridge is stopping")."""
    emulators = [await make_emulator()]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, {}, "--leader-timeout", "1") as bridges,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        (first, a), (second, b) = bridges
        await post_job(session, a, "before", TINY)
        await depose(session, first.pid, a, b)
        os.kill(second.pid, signal.SIGKILL)
        async with asyncio.timeout(30):  # and leads again once B is gone
            while (await health(session, a))["cluster"]["role"] != "leader":  # type: ignore[index]
                await asyncio.sleep(0.1)
        answer = await submit_past_503(session, a)
        assert answer[0] == 200, f"leading again, it still refuses jobs: {answer}"


async def depose(session: aiohttp.ClientSession, pid: int, leader: str, other: str) -> None:
    """The leading bridge (process `pid`) freezes (SIGSTOP) until the `other` leads, then wakes and follows."""
    os.kill(pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(60):  # deposed after 2 x leader_timeout + 2 s of silence
            while (await health(session, other))["cluster"]["role"] != "leader":  # type: ignore[index]
                await asyncio.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    async with asyncio.timeout(30):  # woken, it follows (once its term has closed: it knows the leader)
        while (await health(session, leader))["cluster"] != {"role": "follower", "leader": other, "generation": 2}:
            await asyncio.sleep(0.1)


async def test_a_bridge_that_led_before_gets_its_grace_on_sigterm(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """A follower that led once had its scheduler closed at its term's end, which SIGTERM read as a
    second SIGTERM: it stopped at once, cutting the requests it relays. Now it relays through its
    stop_grace, as a bridge that never led does."""
    emulators = [await make_emulator()]
    flags = ("--leader-timeout", "1", "--stop-grace", "20")
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, {}, *flags) as bridges,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        (first, a), (_, b) = bridges
        await post_job(session, a, "before", TINY)
        await depose(session, first.pid, a, b)
        first.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)  # what an immediate stop takes, and more
        assert first.returncode is None
        await post_job(session, a, "during-grace", TINY)  # relayed to the leader
        await wait_closed(session, b, ["during-grace"], timeout=30)


async def submit_past_503(session: aiohttp.ClientSession, url: str, tries: int = 10) -> tuple[int, str]:
    """A job submitted through `url`, tried again a second after each 503 (a term that is starting:
    a few tries at most); the last answer."""
    for _ in range(tries):
        async with session.post(f"{url}/generate-based-workflow", params={"clientId": "after"}, json=TINY) as resp:
            answer = resp.status, await resp.text()
        if answer[0] != 503:
            break
        await asyncio.sleep(1.0)
    return answer


async def test_a_bridge_that_stopped_leading_reports_no_stale_backend_figures(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer
) -> None:
    """A follower has no schedule of its own (its /health says so). One that led, deposed, kept
    answering /metrics with its closed term's figures for ever: `comfybridge_backend_up 1` for a
    ComfyUI that died since (the leader says 0). Prometheus scrapes each bridge: summed or alerted
    on, the figures said a dead backend was up."""
    doomed = await make_emulator()
    emulators = [await make_emulator(), doomed]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 2, {}, "--leader-timeout", "1") as bridges,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        (first, a), (_, b) = bridges
        await post_job(session, a, "before", TINY)
        await depose(session, first.pid, a, b)
        await doomed.stop()  # a ComfyUI dies
        up = f'comfybridge_backend_up{{backend="{doomed.url}"}}'
        async with asyncio.timeout(30):  # the leader sees it
            while (await metrics_of(session, b)).get(up) != 0:
                await asyncio.sleep(0.1)
        scraped = await metrics_of(session, a)
        gauges = ("comfybridge_backend_up", "comfybridge_backend_stuck", "comfybridge_backend_in_flight")
        assert not [name for name in scraped if name.startswith(gauges)], scraped  # (counters: what it did)
        assert scraped["comfybridge_queue_depth"] == 0


async def closed_heard(ws: aiohttp.ClientWebSocketResponse, wanted: set[str], within: float) -> set[str]:
    """The job ids of the `closed` frames a socket hears until it heard all of `wanted` (or `within` s)."""
    heard: set[str] = set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not wanted <= heard:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                frame = orjson.loads(msg.data)
                if frame["status"] == "closed":
                    heard.add(frame["job_id"])
    return heard


@pytest.mark.parametrize("places", [("c", "c"), ("b", "c")], ids=["two-tabs-on-one-follower", "one-on-each-follower"])
async def test_every_socket_of_a_client_hears_the_jobs_a_new_leader_took_over(
    workdir: Path, make_emulator: EmulatorFactory, postgres: PostgresServer, places: tuple[str, str]
) -> None:
    """The contract: several sockets of one clientId all receive the same frames. Two sockets of one
    clientId on followers (both on C, or one on B and one on C); leader A is killed mid-burst, B takes
    over: the frames it held for sockets coming back (every `closed` of the jobs it took over) went to
    the first of the two only; the other, open and hearing later jobs, never heard they ended."""
    emulators = [await make_emulator(pace=0.2)]
    async with (
        cluster(workdir, postgres.new_database(), emulators, 3, {}) as bridges,
        aiohttp.ClientSession() as session,
    ):
        (leader, _), (_, b), (_, c) = bridges
        where = {"b": b, "c": c}
        async with (
            session.ws_connect(f"{where[places[0]]}/ws", params={"clientId": "tabs"}) as first,
            session.ws_connect(f"{where[places[1]]}/ws", params={"clientId": "tabs"}) as second,
        ):
            for ws in (first, second):
                assert orjson.loads((await ws.receive()).data)["status"] == "connected"
            jobs = {await post_job(session, b, "tabs", TINY) for _ in range(5)}
            await wait_for(lambda: len(emulators[0].engine.started) >= 2)
            os.kill(leader.pid, signal.SIGKILL)
            async with asyncio.timeout(60):  # every job ended, as the new leader says
                while not (
                    (info := await status_of(session, b, "tabs")).get("jobs_left") == 0 and info["status"] == "closed"
                ):
                    await asyncio.sleep(0.1)
            heard = await asyncio.gather(closed_heard(first, jobs, 20), closed_heard(second, jobs, 20))
            still_open = [not first.closed, not second.closed]
        missing = [sorted(jobs - each) for each in heard]
        assert missing == [[], []], f"`closed` never heard, per socket: {missing} (open: {still_open})"
