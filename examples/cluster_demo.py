"""A cluster to try on one machine: a throwaway PostgreSQL, two ComfyUI emulators, two bridges on
that database sharing one data folder, and nginx in front of them with config/nginx-comfybridge-cluster.conf.

    make cluster-demo              # nginx on http://127.0.0.1:8080; Ctrl-C stops and removes it all

Needs Debian's `postgresql` and `nginx-light` packages (apt-get install postgresql nginx-light) and
nothing else: the database lives in a temporary folder, as the tests make theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import nginx_config, postgres_binaries, throwaway_postgres, unused_port  # noqa: E402


def missing_packages() -> list[str]:
    missing = []
    if postgres_binaries() is None:
        missing.append("postgresql")
    if not (shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")):
        missing.append("nginx-light")
    return missing


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{log.name}: the process stopped:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    sys.exit(f"{url} did not come up; see {log}")


@contextlib.contextmanager
def started(args: list[str], log: Path, ready: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process writing to `log`, up once `ready` answers 200; stopped (SIGINT, then SIGKILL) at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        wait_up(ready, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default %(default)s)")
    parser.add_argument("--pace", type=float, default=0.05, help="emulated seconds per node (default %(default)s)")
    args = parser.parse_args()
    missing = missing_packages()
    if missing:
        sys.exit(f"cluster-demo needs Debian packages: apt-get install {' '.join(missing)}")
    python = sys.executable
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped as by Ctrl-C: everything cleaned up
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(throwaway_postgres())
        database = postgres.new_database()
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comfybridge-cluster-demo-")))
        emulators = []
        for n in range(2):
            port = unused_port()
            log = root / f"emulator{n}.log"
            emulator = ["-m", "comfybridge.emulator", "--port", str(port), "--pace", str(args.pace)]
            stack.enter_context(started([python, *emulator], log, f"http://127.0.0.1:{port}/system_stats"))
            emulators.append(f"http://127.0.0.1:{port}")
        bridges, pids = [], []
        for n in range(2):
            port = unused_port()
            (root / f"bridge{n}").mkdir()
            bridge = ["-m", "comfybridge", "--port", str(port), "--backends", ",".join(emulators),
                      "--database", database, "--data-dir", str(root / "data"), "--workflows", str(ROOT / "workflows"),
                      "--trusted-proxies", "127.0.0.1"]  # fmt: skip
            proc = stack.enter_context(started([python, *bridge], root / f"bridge{n}" / "bridge.log",
                                               f"http://127.0.0.1:{port}/ready"))  # fmt: skip
            bridges.append(port)
            pids.append(proc.pid)
        (root / "nginx").mkdir()
        (root / "nginx" / "nginx.conf").write_text(
            nginx_config(root / "nginx", args.port, bridges, "nginx-comfybridge-cluster.conf")
        )
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or "nginx"
        stack.enter_context(started([nginx, "-c", str(root / "nginx" / "nginx.conf"), "-p", str(root / "nginx")],
                                    root / "nginx" / "nginx.log", f"http://127.0.0.1:{args.port}/health"))  # fmt: skip
        print(f"""
comfybridge cluster demo, its files under {root} and {postgres.root}:
  nginx       http://127.0.0.1:{args.port}   (the playground: http://127.0.0.1:{args.port}/playground)
  bridges     {", ".join(f"http://127.0.0.1:{p}" for p in bridges)}   (the first leads; /health says)
  emulators   {", ".join(emulators)}
  PostgreSQL  {database}
Try: {python} examples/ws_example.py --url http://127.0.0.1:{args.port}
     kill -9 {pids[0]} (the leading bridge) and watch the other take over.
Ctrl-C stops everything and removes it.""", flush=True)  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
