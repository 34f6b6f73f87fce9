"""The bridge as deployed: behind a real nginx, with the proxy settings the README gives."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from comfybridge.emulator.png import png_size

from .conftest import BridgeFactory, EmulatorFactory
from .helpers import read_results, system_binary, wait_until_up, without_job_id
from .test_process import free_port

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
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            client_max_body_size 500m;
            proxy_buffering off;
        }}
    }}
}}
"""


@pytest.fixture
async def behind_nginx(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, tmp_path: Path
) -> AsyncIterator[str]:
    binary = system_binary("nginx", "nginx-light")
    client = await make_bridge(await make_emulator(pace=0.01))
    root = tmp_path / "nginx"
    root.mkdir()
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(CONFIG.format(user=user, root=root, port=port, upstream=client.server.port))
    proc = await asyncio.create_subprocess_exec(
        binary, "-c", str(root / "nginx.conf"), "-p", str(root), stderr=asyncio.subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_up(f"{url}/workflow-list", proc, root / "error.log")
        yield url
    finally:
        proc.terminate()
        await proc.wait()


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
