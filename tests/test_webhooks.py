"""Webhooks: signed calls to a real local receiver that fails on purpose, at least once, across restarts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from comfybridge.core import webhooks
from comfybridge.edge.appkeys import JOURNAL

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import TINY, backends, bridge_process, generate, png, post_job, run_job, upload, wait_closed
from .services import unused_port

SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes....").decode()


class Receiver:
    """A webhook receiver on a loopback port that refuses the first `failures` calls (HTTP 500)."""

    def __init__(self, failures: int = 0, port: int = 0) -> None:
        self.failures = failures
        self.port = port
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read()))
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=500)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.calls]


def signature_is_valid(headers: dict[str, str], body: bytes) -> bool:
    """Checked as a Standard Webhooks receiver checks it, written here independently."""
    secret = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    version, _, given = headers["webhook-signature"].partition(",")
    return version == "v1" and hmac.compare_digest(given, expected)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = Receiver(failures=2)
    await started.start()
    yield started
    await started.stop()


async def test_done_is_signed_retried_and_delivered_once_acknowledged(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "FIRST_RETRY", 0.05)
    client = await make_bridge(await make_emulator(), webhook_secret=SECRET, webhook_allow_private=True)
    body = {"workflow": "solid", "1/batch_size": 2, "_webhook": receiver.url}
    frames = await run_job(client, "hooked", body)
    assert frames[-1]["status"] == "closed"  # the job never waited for the receiver
    job_id = frames[-1]["job_id"]
    await wait_for(lambda: len(receiver.calls) == 3)  # two refusals, then acknowledged
    assert {headers["webhook-id"] for headers, _ in receiver.calls} == {f"msg_{job_id}_done"}
    assert all(signature_is_valid(headers, body) for headers, body in receiver.calls)
    assert abs(int(receiver.calls[-1][0]["webhook-timestamp"]) - time.time()) < 60
    event = receiver.events()[-1]
    assert event["type"] == "job.done"
    data = event["data"]
    assert (data["job_id"], data["client_id"], data["workflow"], data["status"]) == (
        job_id,
        "hooked",
        "solid",
        "closed",
    )
    assert [f["file_name"] for f in data["files"]] == [
        f"wf_b_empty_{job_id}_00001_.png",
        f"wf_b_empty_{job_id}_00002_.png",
    ]
    assert data["results"] == "/history?clientId=hooked"
    journal = client.app[JOURNAL].path
    await wait_for(lambda: _pending(journal) == 0)  # acknowledged: forgotten
    await asyncio.sleep(0.3)
    assert len(receiver.calls) == 3  # and never sent again


async def test_the_results_link_starts_with_the_path_a_proxy_serves_the_bridge_at(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "FIRST_RETRY", 0.05)
    settings = {"webhook_secret": SECRET, "webhook_allow_private": True, "root_path": "/studio/comfy"}
    client = await make_bridge(await make_emulator(), **settings)
    await run_job(client, "hooked", {"workflow": "solid", "_webhook": receiver.url})
    await wait_for(lambda: len(receiver.calls) == 3)
    assert receiver.events()[-1]["data"]["results"] == "/studio/comfy/history?clientId=hooked"


async def test_a_call_is_tried_once_more_as_its_max_age_ends(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: retried "until the receiver answers 2xx or webhook_max_age passes". Tries at 0 and
    0.5 s, then the next pause (1 s) would end past the 1.2 s: the call was given up at 0.5 s. The
    last pause is cut to what is left, so a receiver back by then is called."""
    monkeypatch.setattr(webhooks, "FIRST_RETRY", 0.5)
    receiver.failures = 2
    client = await make_bridge(
        await make_emulator(), webhook_secret=SECRET, webhook_allow_private=True, webhook_max_age=1.2
    )
    await run_job(client, "short-lived", {"workflow": "solid", "1/batch_size": 1, "_webhook": receiver.url})
    await wait_for(lambda: len(receiver.calls) == 3)  # the third, as the max age ends, is acknowledged
    await wait_for(lambda: _pending(client.app[JOURNAL].path) == 0)


async def test_an_attempt_that_fails_in_an_unforeseen_way_is_tried_again(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt that raises what no one foresaw (here: signing) is logged and tried again; the
    delivery is never dropped with its task."""
    monkeypatch.setattr(webhooks, "FIRST_RETRY", 0.05)
    receiver.failures = 0
    real_sign, calls = webhooks.sign, []

    def sign_once_wrong(*args: Any) -> str:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a fault of ours")
        return real_sign(*args)

    monkeypatch.setattr(webhooks, "sign", sign_once_wrong)
    client = await make_bridge(await make_emulator(), webhook_secret=SECRET, webhook_allow_private=True)
    await run_job(client, "unforeseen", {**TINY, "_webhook": receiver.url})
    await wait_for(lambda: len(receiver.calls) == 1)
    assert len(calls) == 2
    await wait_for(lambda: _pending(client.app[JOURNAL].path) == 0)


async def test_failed_and_cancelled_jobs_are_told_too(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, receiver: Receiver
) -> None:
    receiver.failures = 0
    emulator = await make_emulator(pace=0.2)
    client = await make_bridge(emulator, webhook_secret=SECRET, webhook_allow_private=True)
    frames = await run_job(client, "broken", {"workflow": "broken", "_webhook": receiver.url})
    assert frames[-1]["status"] == "error"
    await generate(client, "stopped", {"workflow": "slow", "2/seed": 3, "_webhook": receiver.url})
    await wait_for(lambda: len(emulator.engine.started) == 2)
    await client.post("/interrupt", params={"clientId": "stopped"})
    await wait_for(lambda: len(receiver.calls) == 2)
    kinds = {event["data"]["client_id"]: event for event in receiver.events()}
    assert kinds["broken"]["type"] == "job.failed"
    assert "cannot identify image file" in kinds["broken"]["data"]["detail"]
    assert kinds["broken"]["data"]["results"] is None
    assert (kinds["stopped"]["type"], kinds["stopped"]["data"]["detail"]) == ("job.cancelled", "interrupted")


async def test_a_dead_receiver_never_holds_a_job_back(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    client = await make_bridge(await make_emulator(), webhook_secret=SECRET, webhook_allow_private=True)
    dead = f"http://127.0.0.1:{unused_port()}/hook"  # nothing listens there
    for index in range(3):
        frames = await run_job(client, f"d{index}", {"workflow": "solid", "1/batch_size": 1, "_webhook": dead})
        assert frames[-1]["status"] == "closed"
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok"


@pytest.mark.parametrize(
    ("settings", "hook", "detail"),
    [
        ({}, "http://127.0.0.1:9/hook", "This bridge sends no webhooks: it has no webhook_secret to sign them with."),
        (
            {"webhook_secret": SECRET},
            "ftp://example.com/x",
            "'_webhook' must be an absolute http(s) URL; got 'ftp://example.com/x'.",
        ),
        ({"webhook_secret": SECRET}, 42, "'_webhook' must be an http(s) URL."),
        (
            {"webhook_secret": SECRET},
            "http://169.254.169.254/latest/meta-data",
            "'_webhook' may not point at this machine or its network (169.254.169.254).",
        ),
        (
            {"webhook_secret": SECRET},
            "http://127.0.0.1:9/x",
            "'_webhook' may not point at this machine or its network (127.0.0.1).",
        ),
        (
            {"webhook_secret": SECRET},
            "http://10.1.2.3/x",
            "'_webhook' may not point at this machine or its network (10.1.2.3).",
        ),
        (
            {"webhook_secret": SECRET},
            "http://[::1]/x",
            "'_webhook' may not point at this machine or its network (::1).",
        ),
        (
            {"webhook_secret": SECRET},
            "http://localhost:8080/x",
            "'_webhook' may not point at this machine or its network (localhost).",
        ),
        *[
            (
                {"webhook_secret": SECRET},
                f"http://[{ip}]/x",
                f"'_webhook' may not point at this machine or its network ({ip}).",
            )
            for ip in ("64:ff9b::7f00:1", "::7f00:1", "2002:7f00:1::")  # NAT64, IPv4-compatible, 6to4 of 127.0.0.1
        ],
        (
            {},
            "https://example.com:99999/",
            "'_webhook' must be an absolute http(s) URL; got 'https://example.com:99999/'.",
        ),
        ({}, "http://[::1/", "'_webhook' must be an absolute http(s) URL; got 'http://[::1/'."),
        ({"webhook_secret": SECRET}, "http://a..b/", "'_webhook' host 'a..b' does not resolve."),
        ({"webhook_secret": SECRET}, f"http://{'a' * 64}.com/", f"'_webhook' host '{'a' * 64}.com' does not resolve."),
    ],
)
async def test_a_webhook_the_bridge_cannot_honour_is_refused(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, settings: dict[str, Any], hook: Any, detail: str
) -> None:
    client = await make_bridge(await make_emulator(), **settings)
    status, body = await generate(client, "refused", {"workflow": "solid", "_webhook": hook})
    assert (status, body) == (400, {"detail": detail})
    assert await (await client.get("/generation-count")).json() == 0  # nothing accepted


async def test_an_api_key_can_carry_its_webhook(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.failures = 0
    key_file = tmp_path / "keys.json"
    key = "studio-key-0123456789"
    key_file.write_bytes(orjson.dumps([{"name": "studio", "key": key, "webhook": receiver.url}]))
    client = await make_bridge(
        await make_emulator(), api_keys_file=key_file, webhook_secret=SECRET, webhook_allow_private=True
    )
    headers = {"Authorization": f"Bearer {key}"}
    resp = await client.post(
        "/generate-based-workflow", params={"clientId": "keyed"}, json={"workflow": "solid"}, headers=headers
    )
    assert resp.status == 200
    await wait_for(lambda: len(receiver.calls) == 1)
    assert receiver.events()[0]["data"]["client_id"] == "keyed"  # as the app knows it, not scoped


@pytest.mark.parametrize("journal", ["this release's", "the previous release's"])
async def test_a_call_owed_before_a_crash_is_made_after_the_restart(
    workdir: Path, make_emulator: EmulatorFactory, journal: str
) -> None:
    """The previous release's journal (schema 2) recorded its calls without their owner: it opens,
    and its owed call is made."""
    emulator = await make_emulator()
    port = unused_port()
    hook = f"http://127.0.0.1:{port}/hook"  # down for now
    args = (*backends(emulator), "--webhook-secret", SECRET, "--webhook-allow-private", "true")
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *args) as (proc, url):
            job_id = await post_job(session, url, "owed", {**TINY, "_webhook": hook})
            await wait_closed(session, url, ["owed"])
            proc.kill()  # the call failed once and waits for its retry: now only the journal has it
        assert _pending(workdir / "data" / "journal.sqlite3") == 1
        if journal == "the previous release's":
            with contextlib.closing(sqlite3.connect(workdir / "data" / "journal.sqlite3")) as conn:
                conn.execute("ALTER TABLE deliveries DROP COLUMN owner")
                conn.execute("PRAGMA user_version=2")
                conn.commit()
        receiver = Receiver(port=port)
        await receiver.start()
        try:
            async with bridge_process(workdir, *args):
                await wait_for(lambda: len(receiver.calls) >= 1)
                assert receiver.events()[0]["data"]["job_id"] == job_id
                assert signature_is_valid(*receiver.calls[0])
                await wait_for(lambda: _pending(workdir / "data" / "journal.sqlite3") == 0)
        finally:
            await receiver.stop()


def _pending(journal: Path) -> int:
    with sqlite3.connect(journal) as conn:
        return int(conn.execute("SELECT count(*) FROM deliveries").fetchone()[0])


async def test_a_redirect_is_never_followed(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that answers 307 toward another address does not get the signed call sent there."""
    monkeypatch.setattr(webhooks, "FIRST_RETRY", 0.05)
    inside = Receiver()
    await inside.start()
    bouncer = web.Application()
    bounced: list[str] = []

    async def bounce(request: web.Request) -> web.Response:
        bounced.append(request.method)
        raise web.HTTPTemporaryRedirect(inside.url)

    bouncer.router.add_post("/hook", bounce)
    runner = web.AppRunner(bouncer, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        client = await make_bridge(await make_emulator(), webhook_secret=SECRET, webhook_allow_private=True)
        body = {"workflow": "solid", "1/batch_size": 1, "_webhook": f"http://127.0.0.1:{port}/hook"}
        assert (await run_job(client, "bounced", body))[-1]["status"] == "closed"
        await wait_for(lambda: len(bounced) >= 2)  # a 307 is a failed attempt: tried again, never followed
        assert inside.calls == []
    finally:
        await runner.cleanup()
        await inside.stop()


async def test_a_name_that_turns_internal_is_refused_when_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the address is checked again at every connection, not only at submission."""
    answers = {"rebinder.example": "10.0.0.7", "public.example": "93.184.216.34"}

    async def resolve(self: Any, host: str, port: int = 0, family: Any = 0) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": answers[host], "port": port, "family": family, "proto": 0, "flags": 0}]

    monkeypatch.setattr(webhooks.ThreadedResolver, "resolve", resolve)
    resolver = webhooks.PublicOnlyResolver()
    assert (await resolver.resolve("public.example", 443))[0]["host"] == "93.184.216.34"
    with pytest.raises(OSError, match="internal address"):
        await resolver.resolve("rebinder.example", 443)


async def test_an_owed_call_to_an_internal_literal_is_not_made_once_private_is_off() -> None:
    """A call recorded while private receivers were allowed is not made after that is turned off."""
    async with aiohttp.ClientSession() as session:
        hooks = webhooks.Webhooks(b"secret", session, lambda _: None, allow_private=False)
        delivery = webhooks.delivery_for("j1", "c", "solid", "done", "Execution is done", [], "http://10.0.0.7/x")
        assert await hooks._attempt(delivery) == "10.0.0.7 is an internal address; webhooks go to public ones"


@contextlib.asynccontextmanager
async def silent_receivers(
    count: int,
) -> AsyncIterator[tuple[list[str], list[asyncio.StreamWriter], webhooks.Webhooks, Receiver]]:
    """`count` receivers that take connections and never answer (their URLs, and the connections
    they hold), webhooks on their own session, and one good receiver; all stopped after."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    tarpits = [await asyncio.start_server(silent, "127.0.0.1", 0) for _ in range(count)]
    good = Receiver()
    await good.start()
    session = webhooks.webhook_session(allow_private=True)
    tasks: list[asyncio.Future[None]] = []
    hooks = webhooks.Webhooks(b"secret", session, lambda _id: None, allow_private=True)
    hooks.spawn = lambda coro, name: tasks.append(asyncio.ensure_future(coro))
    try:
        yield [f"http://127.0.0.1:{t.sockets[0].getsockname()[1]}/hook" for t in tarpits], held, hooks, good
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        for writer in held:
            writer.close()
        for tarpit in tarpits:
            tarpit.close()
        await good.stop()


async def test_a_receiver_that_never_answers_holds_back_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """One client's jobs name a receiver that takes every connection and never answers: it holds
    PER_RECEIVER connections at most, and another client's receiver is called at once (its attempt
    is not spent waiting for a slot of the shared pool)."""
    monkeypatch.setattr(webhooks, "ATTEMPT_TIMEOUT", 600.0)  # the silent ones hold theirs for the whole test
    async with silent_receivers(1) as ((tarpit_url,), held, hooks, good):
        for n in range(80):  # a hostile client's jobs, one webhook each
            hooks.send(webhooks.delivery_for(f"bad{n}", "bad", "solid", "done", "x", [], tarpit_url))
        await wait_for(lambda: len(held) == webhooks.PER_RECEIVER)
        hooks.send(webhooks.delivery_for("good", "good", "solid", "done", "x", [], good.url))
        await wait_for(lambda: bool(good.calls), timeout=30)
        assert len(held) == webhooks.PER_RECEIVER


async def test_webhook_names_whose_nameserver_never_answers_stall_no_upload(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `_webhook` host is looked up inside the request. On asyncio's default executor (a handful
    of threads here), lookups a nameserver never answers held every thread the bridge's file work
    runs on: another client's upload waited for them. They have threads of their own now."""
    real = socket.getaddrinfo
    answer = threading.Event()  # the nameserver answers at the end of the test

    def unanswered(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".slow.example"):
            answer.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", unanswered)
    client = await make_bridge(await make_emulator(), webhook_secret="a webhook secret of some length")

    async def hostile(n: int) -> int:
        body = {**TINY, "_webhook": f"https://h{n}.slow.example/hook"}
        resp = await client.post("/generate-based-workflow", params={"clientId": f"bad-{n}"}, json=body)
        return resp.status

    attack = [asyncio.ensure_future(hostile(n)) for n in range(40)]
    try:
        await asyncio.sleep(0)  # the attack's requests are on their way
        async with asyncio.timeout(30):  # (only stops a hang: the lookups are held for 60 s)
            status, _ = await upload(client, {"file": ("cat.png", png())}, client_id="innocent")
        assert status == 200
    finally:
        answer.set()
    assert set(await asyncio.gather(*attack)) == {400}  # "does not resolve"


async def test_one_clients_silent_receivers_hold_a_few_connections_whatever_their_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One client's jobs name 64 silent receivers (one address, 64 ports: PER_RECEIVER does not
    bound them together): its deliveries make PER_OWNER attempts at once, the rest wait their turn
    outside their time-out, and another client's receiver is called at once."""
    monkeypatch.setattr(webhooks, "ATTEMPT_TIMEOUT", 600.0)
    async with silent_receivers(64) as (urls, held, hooks, good):
        for m in range(5):  # (enough to fill the pool, were there no turns: 64 ports x PER_RECEIVER)
            for n, url in enumerate(urls):
                hooks.send(webhooks.delivery_for(f"bad{n}-{m}", "bad", "solid", "done", "x", [], url))
        await wait_for(lambda: len(held) == webhooks.PER_OWNER)
        hooks.send(webhooks.delivery_for("good", "good", "solid", "done", "x", [], good.url))
        await wait_for(lambda: bool(good.calls), timeout=30)
        assert len(held) == webhooks.PER_OWNER


KEYS = [{"name": "hostile", "key": "hostile-key-0123456789"}, {"name": "studio", "key": "studio-key-0123456789"}]


@pytest.mark.parametrize("studio_client", ["app", None])
async def test_an_api_keys_turns_are_its_own_whatever_its_client_ids(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    studio_client: str | None,
) -> None:
    """Key `hostile` sends jobs under three times PER_OWNER clientIds, each naming a receiver that takes
    the connection and never answers: the key holds PER_OWNER attempts, not PER_OWNER per clientId.
    Key `studio`, with a clientId of its own or the very one `hostile` used ("app": each key has its
    own clientIds), is called at once. The turns used to go by the clientId in the call's body (the
    app's, unscoped): `studio`'s "app" waited behind `hostile`'s."""
    monkeypatch.setattr(webhooks, "ATTEMPT_TIMEOUT", 600.0)  # the silent ones hold theirs for the whole test
    receiver.failures = 0
    key_file = tmp_path / "keys.json"
    key_file.write_bytes(orjson.dumps(KEYS))
    client = await make_bridge(
        await make_emulator(), api_keys_file=key_file, webhook_secret=SECRET, webhook_allow_private=True
    )
    async with silent_receivers(3 * webhooks.PER_OWNER) as (urls, held, _, _):
        for n, url in enumerate(urls):
            status, _ = await generate(
                client, "app" if n == 0 else f"c{n}", {**TINY, "_webhook": url}, headers=_key("hostile")
            )
            assert status == 200
        await wait_for(lambda: len(held) == webhooks.PER_OWNER)
        status, _ = await generate(
            client, studio_client or "own", {**TINY, "_webhook": receiver.url}, headers=_key("studio")
        )
        assert status == 200
        await wait_for(lambda: bool(receiver.calls), timeout=30)
        assert len(held) == webhooks.PER_OWNER


def _key(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {next(k['key'] for k in KEYS if k['name'] == name)}"}
