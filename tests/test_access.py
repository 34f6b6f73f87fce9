"""API keys, clientIds scoped per key, rate and socket limits, trusted proxies, CORS."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from comfybridge.config import load_settings
from comfybridge.edge.appkeys import SCHEDULER

from .conftest import BridgeFactory, EmulatorFactory
from .helpers import TINY, Client, png, run_cli, run_job

A = "key-a-0123456789abcdef"
B = "key-b-0123456789abcdef"
ROUTES = [
    ("GET", "/workflow-list"),
    ("GET", "/workflow-info?workflow=solid"),
    ("POST", "/upload"),
    ("POST", "/generate-based-workflow?clientId=c"),
    ("GET", "/history?clientId=c"),
    ("GET", "/execution-info?clientId=c"),
    ("GET", "/generation-count"),
    ("POST", "/free"),
    ("POST", "/interrupt?clientId=c"),
    ("GET", "/ws?clientId=c"),
]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed(make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path) -> Client:
    key_file = tmp_path / "keys.json"
    key_file.write_bytes(orjson.dumps([{"name": "limited", "key": "key-c-0123456789abcdef", "workflows": ["solid"]}]))
    return await make_bridge(await make_emulator(), api_keys=(A, B), api_keys_file=key_file)


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_route_needs_a_valid_key(keyed: Client, method: str, path: str) -> None:
    for headers in ({}, auth("wrong-key-0123456789"), {"X-API-Key": "wrong-key-0123456789"}):
        resp = await keyed.request(method, path, headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="comfybridge"'
        assert (await resp.json())["detail"].endswith("API key is not valid.") == bool(headers)
    ok = await keyed.request(method, path, headers={"X-API-Key": A})
    assert ok.status != 401


async def test_the_websocket_takes_its_key_as_a_token(keyed: Client) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await keyed.ws_connect("/ws", params={"clientId": "w", "token": "wrong-key-0123456789"})
    assert refused.value.status == 401
    async with keyed.ws_connect("/ws", params={"clientId": "w", "token": A}) as ws:
        assert orjson.loads((await ws.receive()).data)["status"] == "connected"
    # Two different keys, as tokens or as a token beside a header: which was meant cannot be told.
    for params, headers in (
        ([("clientId", "w"), ("token", A), ("token", B)], {}),
        ({"clientId": "w", "token": A}, {"X-API-Key": B}),
        ({"clientId": "w", "token": "wrong-key-0123456789"}, {"X-API-Key": A}),
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await keyed.ws_connect("/ws", params=params, headers=headers)
        assert refused.value.status == 401
    async with keyed.ws_connect("/ws", params={"clientId": "w", "token": A}, headers={"X-API-Key": A}):
        pass  # the same key twice is one key
    async with keyed.ws_connect("/ws", params={"clientId": "w", "token": ""}, headers={"X-API-Key": A}):
        pass  # an empty token is no key


async def frames(ws: aiohttp.ClientWebSocketResponse, until: str) -> list[Any]:
    seen = []
    async for msg in ws:
        seen.append(orjson.loads(msg.data))
        if seen[-1]["status"] == until:
            break
    return seen


async def test_a_key_never_reaches_another_keys_clients(keyed: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("file", png(), filename="a.png")
    upload = await keyed.post("/upload", params={"clientId": "shared"}, data=form, headers=auth(A))
    name = (await upload.json())["file"]
    async with (
        keyed.ws_connect("/ws", params={"clientId": "shared"}, headers=auth(A)) as mine,
        keyed.ws_connect("/ws", params={"clientId": "shared"}, headers=auth(B)) as theirs,
    ):
        resp = await keyed.post("/generate-based-workflow", params={"clientId": "shared"}, json=TINY, headers=auth(A))
        assert resp.status == 200
        assert (await frames(mine, "closed"))[-1]["status"] == "closed"
        other = await frames(theirs, "listening")  # B's socket of the same clientId hears nothing of A's job
        assert [f["status"] for f in other] == ["connected", "listening"]
    params = {"clientId": "shared"}
    for method, path in (("GET", "/execution-info"), ("POST", "/interrupt"), ("POST", "/free")):
        resp = await keyed.request(method, path, params={"clientId": "stranger"}, headers=auth(B))
        assert resp.status == 400
    resp = await keyed.get("/history", params=params, headers=auth(B))
    assert resp.status == 204  # B's "shared" has nothing: A's results stay A's
    body = {"workflow": "invert", "1/image": name}
    resp = await keyed.post("/generate-based-workflow", params={"clientId": "thief"}, json=body, headers=auth(B))
    assert resp.status == 400
    assert "names no uploaded file" in (await resp.json())["detail"]
    resp = await keyed.get("/history", params=params, headers=auth(A))
    assert resp.status == 200


async def test_uploads_without_a_client_id_are_for_the_clients_of_their_key_only(keyed: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("file", png(), filename="pooled.png")
    name = (await (await keyed.post("/upload", data=form, headers=auth(A))).json())["file"]
    body = {"workflow": "invert", "1/image": name}
    resp = await keyed.post("/generate-based-workflow", params={"clientId": "other"}, json=body, headers=auth(B))
    assert resp.status == 400
    assert "names no uploaded file" in (await resp.json())["detail"]
    resp = await keyed.post("/generate-based-workflow", params={"clientId": "any"}, json=body, headers=auth(A))
    assert resp.status == 200


async def test_a_keys_pool_of_uploads_survives_a_restart(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    emulator, data = await make_emulator(), tmp_path / "pool"
    first = await make_bridge(emulator, api_keys=(A, B), data_dir=data)
    form = aiohttp.FormData()
    form.add_field("file", png(), filename="pooled.png")
    name = (await (await first.post("/upload", data=form, headers=auth(A))).json())["file"]
    await first.close()
    again = await make_bridge(emulator, api_keys=(A, B), data_dir=data)
    body = {"workflow": "invert", "1/image": name}
    resp = await again.post("/generate-based-workflow", params={"clientId": "b"}, json=body, headers=auth(B))
    assert resp.status == 400
    resp = await again.post("/generate-based-workflow", params={"clientId": "a"}, json=body, headers=auth(A))
    assert resp.status == 200
    assert [c.id for c in again.app[SCHEDULER].clients] == ["key1~a"]  # the pool is no client of its own


async def test_two_different_keys_in_one_request_are_refused(keyed: Client) -> None:
    for headers in (
        {"Authorization": f"Bearer {A}", "X-API-Key": B},
        [("Authorization", f"Bearer {A}"), ("Authorization", f"Bearer {B}")],
    ):
        resp = await keyed.get("/workflow-list", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["detail"] == "The request carries more than one API key; send one."
    same = await keyed.get("/workflow-list", headers={"Authorization": f"Bearer {A}", "X-API-Key": A})
    assert same.status == 200
    for open_page in ("/health", "/ready", "/docs", "/docs/", "/playground"):  # they need no key: two are no harm
        resp = await keyed.get(open_page, headers={"Authorization": f"Bearer {A}", "X-API-Key": B})
        assert resp.status != 401, open_page


async def test_a_key_limited_to_workflows(keyed: Client) -> None:
    headers = {"X-API-Key": "key-c-0123456789abcdef"}
    assert await (await keyed.get("/workflow-list", headers=headers)).json() == ["solid"]
    resp = await keyed.get("/workflow-info", params={"workflow": "invert"}, headers=headers)
    assert (resp.status, await resp.json()) == (403, {"detail": "This API key may not use workflow 'invert'."})
    body = {"workflow": "invert", "1/image": "example.png"}
    resp = await keyed.post("/generate-based-workflow", params={"clientId": "c"}, json=body, headers=headers)
    assert resp.status == 403
    resp = await keyed.post("/generate-based-workflow", params={"clientId": "c"}, json=TINY, headers=headers)
    assert resp.status == 200


async def test_request_rates_are_limited_per_key(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), api_keys=(A, B), rate_limit=0.01, rate_burst=2)
    statuses = [(await client.get("/generation-count", headers=auth(A))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = await client.get("/generation-count", headers=auth(A))
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await limited.json())["detail"].startswith("Too many requests; try again in ")
    assert (await client.get("/generation-count", headers=auth(B))).status == 200  # B has its own budget


async def test_a_rate_per_key_without_keys_says_at_start_that_it_limits_nothing(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_bridge(await make_emulator(), rate_limit=0.01, rate_burst=1)
    assert {(await client.get("/generation-count")).status for _ in range(3)} == {200}
    assert any("rate_limit is per API key, and no keys are set" in r.getMessage() for r in caplog.records)


async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = await make_emulator()
    behind = await make_bridge(emulator, ip_rate_limit=0.01, rate_burst=1, trusted_proxies=("127.0.0.1",))
    for address in ("198.51.100.1", "198.51.100.2"):
        resp = await behind.get("/generation-count", headers={"X-Forwarded-For": f"203.0.113.9, {address}"})
        assert resp.status == 200
    resp = await behind.get("/generation-count", headers={"X-Forwarded-For": "198.51.100.1"})
    assert resp.status == 429
    exposed = await make_bridge(emulator, ip_rate_limit=0.01, rate_burst=1, data_dir=tmp_path / "exposed")
    assert (await exposed.get("/generation-count", headers={"X-Forwarded-For": "198.51.100.1"})).status == 200
    resp = await exposed.get("/generation-count", headers={"X-Forwarded-For": "198.51.100.2"})  # a lie: ignored
    assert resp.status == 429


async def test_sockets_per_client_are_limited(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    client = await make_bridge(await make_emulator(), max_sockets_per_client=2)
    first = await client.ws_connect("/ws", params={"clientId": "many"})
    second = await client.ws_connect("/ws", params={"clientId": "many"})
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", params={"clientId": "many"})
    assert refused.value.status == 429
    await first.close()
    async with asyncio.timeout(10):
        while True:  # the slot is free once the bridge has seen the socket go
            try:
                third = await client.ws_connect("/ws", params={"clientId": "many"})
                break
            except aiohttp.WSServerHandshakeError:
                await asyncio.sleep(0.02)
    await third.close()
    await second.close()


async def test_unfinished_jobs_per_key_are_limited(make_bridge: BridgeFactory, make_emulator: EmulatorFactory) -> None:
    emulator = await make_emulator()
    emulator.engine.pause()
    client = await make_bridge(emulator, api_keys=(A,), max_jobs_per_key=2)
    statuses = []
    for index in range(3):
        params = {"clientId": f"busy-{index}"}
        resp = await client.post("/generate-based-workflow", params=params, json=TINY, headers=auth(A))
        statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    emulator.engine.resume()


async def test_cors_is_off_unless_origins_are_given(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = await make_emulator()
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    off = await make_bridge(emulator)
    resp = await off.options("/generate-based-workflow", headers=preflight)
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in (await off.get("/workflow-list", headers=preflight)).headers
    on = await make_bridge(emulator, cors_origins=("https://app.example",), data_dir=tmp_path / "on")
    resp = await on.options("/generate-based-workflow", headers=preflight)
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-API-Key" in resp.headers["Access-Control-Allow-Headers"]
    resp = await on.get("/history", params={"clientId": "x"}, headers={"Origin": "https://app.example"})
    assert resp.headers["Access-Control-Expose-Headers"] == "X-Detail, Retry-After"
    resp = await on.get("/workflow-list", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert resp.headers["Vary"] == "Origin"  # a cache must not hand it to an allowed origin


@pytest.mark.parametrize("written", ["https://app.example/", "HTTPS://App.Example", "https://app.example:443"])
async def test_an_origin_copied_from_the_address_bar_is_allowed(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path, written: str
) -> None:
    """A browser's Origin is the lowercase scheme://host, no path, no default port. An origin written
    otherwise was taken as is: it never matched, and that very app was refused (403)."""
    settings = load_settings(["--cors-origins", f"{written},http://[::1]:3000"], environ={}, cwd=tmp_path)
    client = await make_bridge(await make_emulator(), cors_origins=settings.cors_origins)
    for origin in ("https://app.example", "http://[::1]:3000"):
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        resp = await client.options("/generate-based-workflow", headers=preflight)
        assert resp.status == 204, origin
        assert resp.headers["Access-Control-Allow-Origin"] == origin


async def test_an_allowed_origin_can_read_its_results(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """The results are streamed from within their handler (/history's 200, ?wait=1's): they carry
    the CORS headers too, or a browser app could not read them."""
    origin = {"Origin": "https://app.example"}
    client = await make_bridge(await make_emulator(), cors_origins=("https://app.example",))
    await run_job(client, "cors-1", TINY)
    resp = await client.get("/history", params={"clientId": "cors-1"}, headers=origin)
    assert resp.status == 200
    await resp.read()
    assert resp.headers.get("Access-Control-Allow-Origin") == "https://app.example"
    for res_type in ("base64", "multipart"):
        params = {
            "clientId": f"cors-{res_type}",
            "wait": "1",
            **({"resType": res_type} if res_type == "base64" else {}),
        }
        resp = await client.post("/generate-based-workflow", params=params, json=TINY, headers=origin)
        assert resp.status == 200
        await resp.read()
        assert resp.headers.get("Access-Control-Allow-Origin") == "https://app.example"


def test_listening_beyond_loopback_without_keys_is_announced(tmp_path: Path) -> None:
    (tmp_path / "workflows").mkdir()
    # 192.0.2.1 is a documentation address this machine does not have: the bind fails, nothing listens.
    result = run_cli(["--host", "192.0.2.1", "--port", "8000", "--emulate", "1"], tmp_path)
    assert "WARNING: listening on 192.0.2.1 with no API keys" in result.stderr
    assert result.returncode == 2
    quiet = run_cli(["--host", "192.0.2.1", "--emulate", "1", "--api-keys", A], tmp_path)
    assert "WARNING" not in quiet.stderr


def test_a_bad_key_file_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "workflows").mkdir()
    (tmp_path / "keys.json").write_text('[{"name": "x", "key": "short"}]')
    result = run_cli(["--api-keys-file", "keys.json"], tmp_path)
    assert result.returncode == 2
    assert "API keys must be at least 16 characters long; shorter: key 'x' in " in result.stderr
    result = run_cli(["--api-keys", f"{A},short"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith("shorter: key 2 of api_keys")
    assert "loaded" not in result.stderr  # one line: nothing was loaded before the keys were checked
    for name in ("a/../../x", "team/a", "..", "a~b", "", "x" * 65):
        (tmp_path / "keys.json").write_bytes(orjson.dumps([{"name": name, "key": A}]))
        result = run_cli(["--api-keys-file", "keys.json"], tmp_path)
        assert result.returncode == 2, name
        assert "API key names must be unique, 1-64 characters of A-Z a-z 0-9 _ . -" in result.stderr
