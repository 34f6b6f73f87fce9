"""`make cluster-demo` as a newcomer runs it: with what the bridge runs with (no test toolchain), it
brings up PostgreSQL, two bridges and nginx, serves a job through nginx, and removes it all on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp

from .helpers import ROOT, fetch_results, post_job, system_binary, wait_closed
from .postgres import require_postgres
from .services import unused_port

# The demo in a Python that cannot import pytest, as after `make cluster-demo`'s install.
WITHOUT_PYTEST = (
    "import runpy, sys; sys.modules['pytest'] = None; sys.argv[0] = 'examples/cluster_demo.py'; "
    "runpy.run_path('examples/cluster_demo.py', run_name='__main__')"
)


async def test_the_cluster_demo_runs_without_the_test_toolchain_and_cleans_up() -> None:
    system_binary("nginx", "nginx-light")
    require_postgres()
    port = unused_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WITHOUT_PYTEST, "--port", str(port), "--pace", "0.01",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    banner = ""
    try:
        async with asyncio.timeout(90):
            while "Ctrl-C stops everything" not in banner:
                line = await proc.stdout.readline()
                assert line, f"the demo stopped:\n{banner}"
                banner += line.decode()
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await post_job(session, url, "demo", {"workflow": "solid-color"})  # the repository's own workflows
            await wait_closed(session, url, ["demo"])
            assert await fetch_results(session, url, "demo")  # its pictures, through nginx
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = await proc.stdout.read()
        await proc.wait()
    folders = re.search(r"its files under (\S+) and (\S+):", banner)
    assert folders is not None, banner
    for folder in folders[1], folders[2]:
        assert not await asyncio.to_thread(Path(folder).exists), rest.decode()
