"""The bridge as deployed: behind a real nginx, with the proxy settings the README gives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from yarl import URL

from comfybridge.emulator.png import png_size

from .conftest import FIXTURES, BridgeFactory, EmulatorFactory
from .helpers import (
    bridge_process,
    png,
    poll_status,
    read_results,
    system_binary,
    wait_until_up,
    without_job_id,
)
from .postgres import PostgresServer
from .services import ROOT, nginx_config, unused_port

CONFIG = """
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log;
daemon off;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location {location} {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            client_max_body_size 500m;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def nginx(binary: str, root: Path, port: int, status: int = 200, path: str = "") -> AsyncIterator[str]:
    """nginx with `root`/nginx.conf, listening on `port`, until the block ends (up once
    `path`/workflow-list answers `status`); its URL."""
    proc = await asyncio.create_subprocess_exec(
        binary, "-c", str(root / "nginx.conf"), "-p", str(root), stderr=asyncio.subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_up(f"{url}{path}/workflow-list", proc, root / "error.log", status=status)
        yield url
    finally:
        proc.terminate()
        await proc.wait()


@pytest.fixture
async def behind_nginx(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> AsyncIterator[str]:
    binary = system_binary("nginx", "nginx-light")
    client = await make_bridge(await make_emulator(pace=0.01))
    root = tmp_path / "nginx"
    root.mkdir()
    port = unused_port()
    user = "user root;" if os.geteuid() == 0 else ""
    config = CONFIG.format(user=user, root=root, port=port, location="/", upstream=client.server.port)
    (root / "nginx.conf").write_text(config)
    async with nginx(binary, root, port) as url:
        yield url


async def test_a_job_end_to_end_through_nginx(behind_nginx: str) -> None:
    url = behind_nginx
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws", 1) + "/ws", params={"clientId": "proxied"}) as ws:
            first = orjson.loads((await ws.receive()).data)
            assert first["status"] == "connected"
            body = {"workflow": "solid", "1/width": 20, "1/batch_size": 1}
            async with session.post(
                f"{url}/generate-based-workflow", params={"clientId": "proxied"}, json=body
            ) as resp:
                assert (await resp.json())["detail"] == "queued / 1"
            async for msg in ws:
                frame = orjson.loads(msg.data)
                if frame["status"] in ("closed", "error"):
                    assert frame["status"] == "closed"
                    break
        async with session.get(f"{url}/history", params={"clientId": "proxied"}) as resp:
            parts = await read_results(resp)
        assert [(p[0], without_job_id(p[1])) for p in parts] == [("result_0", "wf_b_empty_00001_.png")]
        assert png_size(parts[0][3]) == (20, 384)
        async with session.get(f"{url}/history", params={"clientId": "proxied"}) as resp:
            assert resp.status == 204
            assert resp.headers["X-Detail"].endswith("/ proxied")
        async with session.get(f"{url}/nope") as resp:
            assert (resp.status, await resp.json()) == (404, {"detail": "Not found: /nope"})


async def test_two_bridges_behind_nginx_keep_each_client_on_one_bridge(
    make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    binary = system_binary("nginx", "nginx-light")
    emulators = [await make_emulator(pace=0.02), await make_emulator(pace=0.02)]
    backends = ("--backends", ",".join(e.url for e in emulators), "--trusted-proxies", "127.0.0.1")
    dirs = []
    for name in ("one", "two"):
        shutil.copytree(FIXTURES / "workflows", tmp_path / name / "workflows")
        dirs.append(tmp_path / name)
    async with bridge_process(dirs[0], *backends) as (_, first), bridge_process(dirs[1], *backends) as (_, second):
        root = tmp_path / "nginx"
        root.mkdir()
        port = unused_port()
        ports = [int(first.rsplit(":", 1)[1]), int(second.rsplit(":", 1)[1])]
        (root / "nginx.conf").write_text(nginx_config(root, port, ports))
        clients = [f"user-{index}" for index in range(12)]
        async with nginx(binary, root, port) as url, aiohttp.ClientSession() as session:
            await asyncio.gather(*(one_client(session, url, client_id) for client_id in clients))
    logs = [(directory / "bridge.log").read_text() for directory in dirs]
    homes = {}
    for client_id in clients:
        seen = [f"client={client_id} " in log for log in logs]
        assert seen.count(True) == 1, client_id  # upload, socket, generate and history on one bridge
        homes[client_id] = seen.index(True)
    assert set(homes.values()) == {0, 1}  # both bridges have clients
    assert all(len(e.engine.started) > 0 for e in emulators)  # and their jobs use both GPUs
    assert sum(len(e.engine.started) for e in emulators) == len(clients)


async def test_a_cluster_behind_nginx_serves_each_request_wherever_it_lands(
    make_emulator: EmulatorFactory, tmp_path: Path, postgres: PostgresServer
) -> None:
    """The cluster's nginx config spreads requests with no regard to the clientId: a client's upload,
    socket, job and fetch land on either bridge, and each still works."""
    binary = system_binary("nginx", "nginx-light")
    emulators = [await make_emulator(pace=0.02), await make_emulator(pace=0.02)]
    shutil.copytree(FIXTURES / "workflows", tmp_path / "workflows")
    flags = ("--backends", ",".join(e.url for e in emulators), "--trusted-proxies", "127.0.0.1",
             "--database", postgres.new_database(), "--data-dir", str(tmp_path / "data"),
             "--workflows", str(tmp_path / "workflows"))  # fmt: skip
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    async with (
        bridge_process(tmp_path / "one", *flags, ready="/health") as (_, first),
        bridge_process(tmp_path / "two", *flags, ready="/health") as (_, second),
    ):
        root = tmp_path / "nginx"
        root.mkdir()
        port = unused_port()
        ports = [int(first.rsplit(":", 1)[1]), int(second.rsplit(":", 1)[1])]
        (root / "nginx.conf").write_text(nginx_config(root, port, ports, "nginx-comfybridge-cluster.conf"))
        clients = [f"user-{index}" for index in range(12)]
        async with nginx(binary, root, port) as url, aiohttp.ClientSession() as session:
            await asyncio.gather(*(one_client(session, url, client_id) for client_id in clients))
            async with session.get(f"{second}/metrics") as resp:
                relayed = [line for line in (await resp.text()).splitlines() if line.startswith("comfybridge_relayed")]
    kinds = {line.split('"')[1] for line in relayed if float(line.rsplit(" ", 1)[1]) > 0}
    assert kinds == {"http", "websocket"}  # requests and sockets landed on the follower, which relayed them
    assert sum(len(e.engine.started) for e in emulators) == len(clients)


async def one_client(session: aiohttp.ClientSession, url: str, client_id: str) -> None:
    params = {"clientId": client_id}
    form = aiohttp.FormData()
    form.add_field("photo", png(8, 8, 0x112233), filename="p.png", content_type="image/png")
    async with session.post(f"{url}/upload", params=params, data=form) as resp:
        stored = (await resp.json())["photo"]
    async with session.ws_connect(url.replace("http", "ws", 1) + "/ws", params=params) as ws:
        body = {"workflow": "invert", "1/image": stored}
        async with session.post(f"{url}/generate-based-workflow", params=params, json=body) as resp:
            assert resp.status == 200, await resp.text()
        async for msg in ws:
            if orjson.loads(msg.data)["status"] in ("closed", "error"):
                assert orjson.loads(msg.data)["status"] == "closed", msg.data
                break
    async with session.get(f"{url}/history", params=params) as resp:
        assert len(await read_results(resp)) == 1


async def test_a_bridge_served_under_a_path_gives_links_that_work_there(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    binary = system_binary("nginx", "nginx-light")
    client = await make_bridge(await make_emulator(pace=0.01), root_path="/studio/comfy")
    port = unused_port()
    user = "user root;" if os.geteuid() == 0 else ""
    # proxy_pass with a URI: nginx strips the location's path before passing the request on
    upstream = f"{client.server.port}/"
    config = CONFIG.format(user=user, root=tmp_path, port=port, location="/studio/comfy/", upstream=upstream)
    (tmp_path / "nginx.conf").write_text(config)
    async with nginx(binary, tmp_path, port, path="/studio/comfy") as host, aiohttp.ClientSession() as session:
        url = f"{host}/studio/comfy"
        async with session.get(f"{url}/workflow-list", params={"detail": "1"}) as resp:
            entry = next(e for e in await resp.json() if e["name"] == "text-to-image")
        async with session.get(f"{host}{entry['thumbnail']}") as resp:  # the link as given, on the host
            assert (resp.status, resp.content_type) == (200, "image/png")
        async with session.get(f"{url}/openapi.json") as resp:
            document = await resp.json()
        assert document["servers"] == [{"url": "/studio/comfy"}]
        assert document["components"]["schemas"]["Generate_text-to-image"]["x-thumbnail"] == entry["thumbnail"]
        async with session.get(f"{host}{document['servers'][0]['url']}/workflow-info?workflow=solid") as resp:
            assert resp.status == 200
        async with session.get(f"{url}/playground/") as resp:  # redirected within the path
            assert (resp.status, resp.url.path) == (200, "/studio/comfy/playground")
        await one_client(session, url, "under-a-path")


@pytest.mark.parametrize("shipped", ["nginx-comfybridge.conf", "nginx-comfybridge-cluster.conf"])
async def test_nginxs_own_answers_are_json_details_as_the_bridges_are(tmp_path: Path, shipped: str) -> None:
    """No bridge answers (all stopped): what nginx says itself is {"detail": ...} JSON, not its HTML page."""
    binary = system_binary("nginx", "nginx-light")
    port = unused_port()
    (tmp_path / "nginx.conf").write_text(nginx_config(tmp_path, port, [unused_port(), unused_port()], shipped))
    async with nginx(binary, tmp_path, port, status=502) as url, aiohttp.ClientSession() as session:
        for method, path in (("GET", "/history?clientId=a"), ("POST", "/generate-based-workflow?clientId=a")):
            async with session.request(method, f"{url}{path}", json={"workflow": "solid"}) as resp:
                assert resp.status == 502
                assert resp.content_type == "application/json"
                assert (await resp.json())["detail"].startswith("No bridge answered this request")


DEBIAN_DEFAULT_SITE = """
    server {
        listen 127.0.0.1:PORT default_server;
        server_name _;
        location / { try_files $uri $uri/ =404; }
    }
"""


@pytest.mark.parametrize("shipped", ["nginx-comfybridge.conf", "nginx-comfybridge-cluster.conf"])
def test_a_shipped_config_beside_debians_default_site_is_refused_not_silently_passed_over(
    tmp_path: Path, shipped: str
) -> None:
    """Put in conf.d/ as the file says, beside Debian's sites-enabled/default (`default_server`,
    `server_name _`): the shipped block had no name and was no default, so `nginx -t` passed and every
    request with the site's host name got nginx's HTML 404 from the default site. Now it claims
    `default_server` too: nginx refuses the pair, naming it, and the file's note says what to do."""
    binary = system_binary("nginx", "nginx-light")
    port = unused_port()
    config = nginx_config(tmp_path, port, [8001, 8002], shipped)
    config = config[: config.rindex("}")] + DEBIAN_DEFAULT_SITE.replace("PORT", str(port)) + "}\n"
    (tmp_path / "nginx.conf").write_text(config)
    checked = subprocess.run(
        [binary, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)], capture_output=True, text=True
    )
    assert checked.returncode != 0
    assert "duplicate default server" in checked.stderr, checked.stderr


@contextlib.asynccontextmanager
async def two_bridges_behind_nginx(
    make_emulator: EmulatorFactory, tmp_path: Path
) -> AsyncIterator[tuple[str, list[tuple[asyncio.subprocess.Process, str]]]]:
    """Two bridges, each with its own data folder, on one emulator, behind the shipped
    config/nginx-comfybridge.conf (a clientId's requests to one bridge)."""
    binary = system_binary("nginx", "nginx-light")
    emulator = await make_emulator(pace=0.01)
    flags = ("--backends", emulator.url, "--trusted-proxies", "127.0.0.1")
    homes = []
    for name in ("one", "two"):
        shutil.copytree(FIXTURES / "workflows", tmp_path / name / "workflows")
        homes.append(tmp_path / name)
    async with bridge_process(homes[0], *flags) as first, bridge_process(homes[1], *flags) as second:
        root = tmp_path / "nginx"
        root.mkdir()
        port = unused_port()
        ports = [int(url.rsplit(":", 1)[1]) for _, url in (first, second)]
        (root / "nginx.conf").write_text(nginx_config(root, port, ports))
        async with nginx(binary, root, port) as url:
            yield url, [first, second]


async def _upload(session: aiohttp.ClientSession, url: str, client_id: str) -> str:
    form = aiohttp.FormData()
    form.add_field("photo", png(8, 8), filename="p.png", content_type="image/png")
    async with session.post(f"{url}/upload", params={"clientId": client_id}, data=form) as resp:
        assert resp.status == 200
        stored: str = (await resp.json())["photo"]
        return stored


async def _known_on(session: aiohttp.ClientSession, bridge: str, client_id: str) -> bool:
    async with session.get(f"{bridge}/execution-info", params={"clientId": client_id}) as resp:
        return resp.status == 200


async def test_a_stopped_bridges_clients_wait_for_it_instead_of_meeting_another_bridge(
    make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """nginx passed a stopped bridge's clients to the other bridge (the next upstream on a refused
    connection, and a failed server set aside): their uploads "named no uploaded file" there, and a
    job accepted there left its results where the client never asks once its bridge was back. The
    shipped config's answer for that moment is its JSON 502."""
    async with two_bridges_behind_nginx(make_emulator, tmp_path) as (url, bridges), aiohttp.ClientSession() as session:
        (first_process, first), _ = bridges
        homed = []
        for index in range(16):
            stored = await _upload(session, url, f"user-{index}")
            if await _known_on(session, first, f"user-{index}"):
                homed.append((f"user-{index}", stored))
        client_id, stored = homed[0]
        first_process.terminate()  # a restart: stop_grace 0 here
        await first_process.wait()
        body = {"workflow": "invert", "1/image": stored}
        async with session.post(f"{url}/generate-based-workflow", params={"clientId": client_id}, json=body) as resp:
            assert resp.status == 502
            assert (await resp.json())["detail"].startswith("No bridge answered this request")


async def test_a_clientid_with_a_colon_reaches_one_bridge_however_it_is_spelled(
    make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """`app:1` as aiohttp and curl send it, `app%3A1` as a browser's URLSearchParams does: nginx hashed
    the raw query value, so the two spellings of one client met two bridges."""
    async with two_bridges_behind_nginx(make_emulator, tmp_path) as (url, _), aiohttp.ClientSession() as session:
        for index in range(16):
            await _upload(session, url, f"app:{index}:{index}")
            encoded = URL(f"{url}/execution-info?clientId=app%3A{index}%3a{index}", encoded=True)
            async with session.get(encoded) as resp:
                assert resp.status == 200, (index, await resp.text())


async def test_a_download_dropped_behind_nginx_can_be_fetched_again(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """An answer counted as handed over once written: behind nginx, megabytes sit in kernel buffers
    (written, never received) when the app stops reading and drops. Its results were forgotten (204).
    Now they count once the peer's TCP acknowledged every byte, and a reset before that keeps them."""
    binary = system_binary("nginx", "nginx-light")
    bridge = await make_bridge(await make_emulator())
    root = tmp_path / "nginx"
    root.mkdir()
    port = unused_port()
    config = nginx_config(root, port, [bridge.server.port, bridge.server.port])
    # nginx's send buffer to the app is pinned: autotuned, it grows to net.ipv4.tcp_wmem's 4 MB, and
    # the whole 4 MB answer then sits in kernel buffers, acknowledged, before the app drops
    config = config.replace(f"listen 127.0.0.1:{port} ", f"listen 127.0.0.1:{port} sndbuf=64k ")
    (root / "nginx.conf").write_text(config)
    async with nginx(binary, root, port) as url, aiohttp.ClientSession() as session:
        body = {"workflow": "text-to-image", "5/width": 2048, "5/height": 2048, "3/steps": 1, "5/batch_size": 24}
        async with session.post(f"{url}/generate-based-workflow", params={"clientId": "mobile"}, json=body) as resp:
            assert resp.status == 200, await resp.text()
        await poll_status(bridge, "mobile", {"closed"}, timeout=60)

        def read_a_little_then_drop() -> bytes:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /history?clientId=mobile HTTP/1.1\r\nHost: app.example\r\n\r\n")
                head = sock.recv(2048)
                time.sleep(1.0)  # a phone on a bad link reads no more, then the link drops
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
                return head

        assert (await asyncio.to_thread(read_a_little_then_drop)).startswith(b"HTTP/1.1 200")

        async def history() -> aiohttp.ClientResponse:
            """/history once the answer before it is found out: dropped or taken (409 meanwhile)."""
            async with asyncio.timeout(30):
                while (resp := await session.get(f"{url}/history", params={"clientId": "mobile"})).status == 409:
                    resp.release()
                    await asyncio.sleep(0.05)
            return resp

        resp = await history()
        answer = await resp.read()
        assert resp.status == 200, answer[:300]
        assert answer.count(b"X-Job-Id: ") == 24
        assert len(answer) == resp.content_length
        resp = await history()
        resp.release()
        assert resp.status == 204  # taken whole this time


@pytest.mark.parametrize(
    ("plain", "encoded"),
    [
        ("plain-id", "plain-id"),
        ("app:1", "app%3a1"),
        ("app:1:2:3:4", "app%3A1%3A2%3A3%3A4"),
        ("tenant:app:user:device:session:7", "tenant%3Aapp%3Auser%3Adevice%3Asession%3A7"),
    ],
)
async def test_a_clientid_hashes_alike_however_its_colons_are_spelled(tmp_path: Path, plain: str, encoded: str) -> None:
    """The shipped config's map gives one hash key to both spellings of a clientId, whatever the
    number of its colons (it rewrote 1 to 3 only: with more, the two spellings met two bridges)."""
    binary = system_binary("nginx", "nginx-light")
    site = (ROOT / "config" / "nginx-comfybridge.conf").read_text()
    found = re.search(r"map \$arg_clientId \$comfybridge_client \{.*?\n\}\n", site, re.S)
    assert found is not None
    root = tmp_path / "nginx"
    root.mkdir()
    port = unused_port()
    user = "user root;" if os.geteuid() == 0 else ""
    temps = "".join(
        f"{kind}_temp_path {root}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (root / "nginx.conf").write_text(
        f"worker_processes 1;\n{user}\npid {root}/nginx.pid;\nerror_log {root}/error.log;\ndaemon off;\n"
        "events { worker_connections 64; }\nhttp {\naccess_log off;\n"
        + temps
        + found.group(0)
        + f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "$comfybridge_client"; }} }}\n}}\n'
    )
    async with nginx(binary, root, port) as url, aiohttp.ClientSession() as session:
        keys = []
        for value in (plain, encoded):
            async with session.get(URL(f"{url}/history?clientId={value}", encoded=True)) as resp:
                keys.append(await resp.text())
    assert keys[0] == keys[1], f"hash keys differ: {keys}"
