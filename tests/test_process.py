"""`python -m comfybridge` as an operator runs it: exit codes, SIGTERM, kill -9 and the durable counter."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from comfybridge.emulator.png import png_size

from .conftest import FIXTURES, EmulatorFactory, wait_for
from .helpers import (
    ROOT,
    assert_one_line_error,
    bound_by_file_modes,
    bridge_process,
    count,
    run_cli,
    submit,
    without_job_id,
)
from .services import unused_port


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "workflows").mkdir()
    for name in ("b_emptyimage_save.json",):
        (tmp_path / "workflows" / name).write_bytes((FIXTURES / "workflows" / name).read_bytes())
    (tmp_path / "workflows" / "workflow_alias.json").write_text(
        '[{"alias": "solid", "fn": "b_emptyimage_save.json", "inputs": ["1/width"]}]'
    )
    return tmp_path


async def test_counter_survives_sigterm_and_kill_9(workdir: Path) -> None:
    async with bridge_process(workdir) as (proc, url):
        await submit(url, "p1")
        await submit(url, "p1")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    state = orjson.loads((workdir / "data" / "current_state.json").read_bytes())
    assert state["generation_count"] == 2
    async with bridge_process(workdir) as (proc, url):
        assert await count(url) == 2
        await submit(url, "p2")
        proc.kill()  # kill -9: no chance to save anything more
        await proc.wait()
    async with bridge_process(workdir) as (proc, url):
        assert await count(url) == 3
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_sigterm_drains_for_stop_grace_with_ready_and_new_jobs_503_then_exits_0(workdir: Path) -> None:
    async with bridge_process(workdir, "--emulate", "1", "--stop-grace", "30") as (proc, url):
        await submit(url, "before")
        async with aiohttp.ClientSession() as session:
            proc.send_signal(signal.SIGTERM)
            ready: dict[str, Any] = {}
            while ready.get("detail") != "the bridge is stopping":
                async with session.get(f"{url}/ready") as resp:
                    ready = await resp.json()
            assert resp.status == 503
            body = {"workflow": "solid", "1/width": 8}
            async with session.post(f"{url}/generate-based-workflow", params={"clientId": "late"}, json=body) as resp:
                assert resp.status == 503
                assert (await resp.json())["detail"].startswith("The bridge is shutting down")
            async with session.get(f"{url}/execution-info", params={"clientId": "before"}) as resp:
                assert resp.status == 200  # everything else is still served
            async with session.get(f"{url}/health") as resp:
                assert (await resp.json())["stopping"] is True
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)  # a second one: now
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    log = (workdir / "bridge.log").read_text()
    assert "SIGTERM: refusing new jobs (503 stopping); the bridge stops in 30s" in log


async def test_a_second_signal_during_the_grace_stops_at_once_and_cleanly(workdir: Path) -> None:
    args = ("--emulate", "1", "--emulator-pace", "1", "--stop-grace", "1", "--drain", "4")
    async with bridge_process(workdir, *args) as (proc, url):
        await submit(url, "before")  # a few seconds of work inside ComfyUI, for the drain to wait for
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "the bridge stops in 1s" in (workdir / "bridge.log").read_text())
        proc.send_signal(signal.SIGINT)  # now; the grace timer must not fire in the middle of the stop
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    log = (workdir / "bridge.log").read_text()
    assert "Traceback" not in log
    async with bridge_process(workdir) as (proc, url):  # the lock was let go, the journal closed
        assert await count(url) == 1


async def test_ctrl_c_pressed_again_and_again_while_stopping_is_no_traceback(workdir: Path) -> None:
    """An impatient operator's Ctrl-C, again and again while the bridge stops: once its own signal
    handlers were gone (its clean-up under way), the next one raised KeyboardInterrupt: a traceback,
    exit 130, the journal's last writes cut short."""
    async with bridge_process(workdir, "--emulate", "1") as (proc, url):
        await submit(url, "before")
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(ProcessLookupError):
            while proc.returncode is None:  # (the guard only stops a hang)
                # os.kill, not send_signal: Popen.send_signal polls first and may reap the child under
                # asyncio's watcher, which then reports exit 255 for a bridge that exited 0
                os.kill(proc.pid, signal.SIGINT)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.005)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    log = (workdir / "bridge.log").read_text()
    assert "Traceback" not in log, log[-1500:]
    async with bridge_process(workdir) as (proc, url):  # the lock was let go, the journal closed
        assert await count(url) == 1


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


async def test_a_second_bridge_on_the_same_data_folder_exits_2_having_changed_nothing(workdir: Path) -> None:
    async with bridge_process(workdir) as (proc, url):
        await submit(url, "first")
        async with aiohttp.ClientSession() as session:
            info: dict[str, str] = {}
            while info.get("status") != "closed":
                async with session.get(f"{url}/execution-info", params={"clientId": "first"}) as resp:
                    info = await resp.json()
            await asyncio.sleep(1.2)  # the state file follows the journal within a second: let it settle
            before = await asyncio.to_thread(snapshot, workdir / "data")
            result = await asyncio.to_thread(run_cli, ["--emulate", "1"], workdir)
            assert_one_line_error(result, "data folder", "is in use by another comfybridge", f"pid {proc.pid}", url)
            assert await asyncio.to_thread(snapshot, workdir / "data") == before
            port = url.rpartition(":")[2]
            result = await asyncio.to_thread(run_cli, ["--emulate", "1", "--port", port], workdir)
            assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")
            assert await asyncio.to_thread(snapshot, workdir / "data") == before
            async with session.get(f"{url}/history", params={"clientId": "first"}) as resp:
                assert resp.status == 200
                assert len(await resp.read()) > 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    # The kernel lets go of the lock with its holder: the next bridge starts.
    async with bridge_process(workdir) as (proc, url):
        assert await count(url) == 1


def test_corrupt_state_file_stops_start_up(workdir: Path) -> None:
    (workdir / "data").mkdir()
    (workdir / "data" / "current_state.json").write_text('{"generation_count": "ten"')
    assert_one_line_error(run_cli([], workdir), "current_state.json is unreadable or corrupt", "never reset silently")


@pytest.mark.parametrize("wal", [b"", b"\x37\x7f\x06\x82" + bytes(60)], ids=["alone", "beside its WAL"])
def test_an_emptied_journal_stops_start_up_where_jobs_were_counted(workdir: Path, wal: bytes) -> None:
    """SQLite would take an empty file for an empty journal (and ignore a WAL beside it); the state
    file's count says it was not."""
    (workdir / "data").mkdir()
    (workdir / "data" / "current_state.json").write_text('{"generation_count": 3}')
    (workdir / "data" / "journal.sqlite3").write_bytes(b"")
    if wal:
        (workdir / "data" / "journal.sqlite3-wal").write_bytes(wal)
    result = run_cli([], workdir)
    assert_one_line_error(result, "journal.sqlite3 is empty", "counted 3 jobs", "never dropped silently")
    assert (workdir / "data" / "journal.sqlite3").stat().st_size == 0  # left as it was found


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (["--port", "abc"], {}, ["--port: 'abc' is not a whole number"]),
        ([], {"COMFYBRIDGE_DISCONNECT_GRACE": "-1"}, ["COMFYBRIDGE_DISCONNECT_GRACE", "must not be negative"]),
        (["--workflows", "nowhere"], {}, ["workflow folder", "nowhere does not exist"]),
    ],
)
def test_bad_setting_exits_2_with_one_line(
    workdir: Path, args: list[str], env: dict[str, str], fragments: list[str]
) -> None:
    assert_one_line_error(run_cli(args, workdir, **env), *fragments)


def test_bad_workflow_exits_2_naming_it(workdir: Path) -> None:
    (workdir / "workflows" / "broken.json").write_text("{oops")
    assert_one_line_error(run_cli([], workdir), "broken.json: not valid JSON")


def test_exposed_link_exits_2_naming_node_and_input(workdir: Path) -> None:
    (workdir / "workflows" / "workflow_alias.json").write_text(
        '[{"alias": "solid", "fn": "b_emptyimage_save.json", "inputs": ["2/images"]}]'
    )
    assert_one_line_error(run_cli([], workdir), "b_emptyimage_save.json", "'2/images' is a link")


def test_emulator_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "comfybridge.emulator", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "--pace" in result.stdout


@pytest.mark.parametrize("script", ["ws_example.py", "rest_example.py"])
async def test_example_clients_save_results(workdir: Path, script: str) -> None:
    async with bridge_process(workdir) as (_, url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / script), "--url", url, "--workflow", "solid",
            "--input", "1/width=24", "--out", str(workdir / "out"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    assert "Execution is done" in out.decode()
    assert err.decode().count("100.00%") == 1, err.decode()  # the bar's last line, once
    saved = sorted(p.name for p in (workdir / "out").iterdir())
    assert [without_job_id(name) for name in saved] == ["wf_b_empty_00001_.png", "wf_b_empty_00002_.png"]
    assert png_size((workdir / "out" / saved[0]).read_bytes()) == (24, 384)


UNREACHABLE = "error: cannot reach the bridge at "
EXAMPLES = ["ws_example.py", "rest_example.py", "burst.py"]
# --url with no scheme (easily left out), another scheme, a broken address
NO_URLS = ["127.0.0.1:8001", "localhost:8001", "ftp://127.0.0.1:8001", "http://[::1"]


@pytest.mark.parametrize(
    ("script", "args", "code", "said"),
    [
        *[(script, [], 1, UNREACHABLE) for script in EXAMPLES],
        *[(script, ["--url", url], 2, "error: argument --url: ") for script in EXAMPLES for url in NO_URLS],
        *[(script, ["--file", "1/image=/no/such.png"], 1, "error: /no/such.png") for script in EXAMPLES[:2]],
        *[(script, ["--out", str(ROOT / "README.md")], 1, "error: --out ") for script in EXAMPLES[:2]],
        *[("burst.py", ["--clients", clients], 2, "error: argument --clients: ") for clients in ("0", "-1")],
    ],
)
def test_example_clients_say_in_one_line_what_is_wrong(script: str, args: list[str], code: int, said: str) -> None:
    """Before any job: a bridge that is not there, a wrong argument (a later --url overrides the first)."""
    closed = f"http://127.0.0.1:{unused_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--url", closed, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith(said), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def close_unanswered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """What takes a connection and closes it without an answer (a TCP balancer with no bridge behind)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


@pytest.mark.parametrize(
    ("script", "server", "said"),
    [
        *[(script, close_unanswered, UNREACHABLE) for script in EXAMPLES],
    ],
)
async def test_example_clients_say_in_one_line_what_no_bridge_did(script: str, server: Handler, said: str) -> None:
    """Something that is no bridge takes the connection (aiohttp's ServerDisconnectedError is no OSError)."""
    listening = await asyncio.start_server(server, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / script), "--url", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        listening.close()
    told = err.decode()
    assert proc.returncode == 1, told
    assert told.startswith(said), told
    assert len(told.strip().splitlines()) == 1, told


KEY = "burst-key-0123456789"


@pytest.mark.parametrize(
    ("keys", "args", "refusal"),
    [
        ([], [], "HTTP 400: Unknown input '3/seed'"),
        (["--api-keys", KEY], [], "HTTP 401: A valid API key is required"),  # its socket refused
        (["--api-keys", KEY], ["--api-key", KEY], "HTTP 400: Unknown input '3/seed'"),
    ],
)
async def test_burst_example_says_a_refused_job_in_one_line(
    tmp_path: Path, keys: list[str], args: list[str], refusal: str
) -> None:
    """A workflow without the 3/seed burst.py sets: the bridge answers 400 to every client, and the
    example says so in one line (it used to raise SystemExit inside a gathered task: "Task exception
    was never retrieved" and an asyncio traceback around the one useful line); as it does a socket
    refused for want of --api-key."""
    (tmp_path / "workflows").mkdir()
    shutil.copy(FIXTURES / "workflows" / "b_emptyimage_save.json", tmp_path / "workflows")
    (tmp_path / "workflows" / "workflow_alias.json").write_text(
        '[{"alias": "solid-color", "fn": "b_emptyimage_save.json", "inputs": ["1/width"]}]'
    )
    async with bridge_process(tmp_path, "--emulate", "1", *keys, ready="/health") as (_, url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "burst.py"), "--url", url, "--clients", "2",
            "--workflow", "solid-color", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    said = err.decode()
    assert proc.returncode == 1
    assert said.startswith("job "), said
    assert refusal in said, said
    assert len(said.strip().splitlines()) == 1, said


def test_make_run_leaves_the_port_to_the_settings_unless_one_is_given(tmp_path: Path) -> None:
    """Settings: "Highest first: command-line flags, COMFYBRIDGE_* environment variables, a `.env`
    file, the config file". `make run` and `make demo` used to pass `--port 8000` always, so a port
    in the config file or .env was silently overruled; `PORT=` still chooses one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "COMFYBRIDGE_PORT")}
    for target, port, wanted in (("run", None, ""), ("demo", None, ""), ("demo", "8123", " --port 8123")):
        given = [f"PORT={port}"] if port else []
        shown = subprocess.run(
            ["make", "-n", "-C", str(ROOT), target, *given], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        command = next(line for line in shown.splitlines() if "-m comfybridge" in line)
        assert ("--port" in command) == bool(port), command
        assert command.endswith(wanted), command


async def test_sighup_applies_a_new_backend_list(workdir: Path, make_emulator: EmulatorFactory) -> None:
    old = await make_emulator()
    new = await make_emulator()
    config = workdir / "bridge.toml"
    config.write_text(f'backends = ["{old.url}"]\n')
    async with bridge_process(workdir, "--config", str(config)) as (proc, url):
        await submit(url, "before")
        await wait_for(lambda: len(old.engine.started) == 1)
        config.write_text(f'backends = ["{new.url}"]\n')
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "SIGHUP: backends are now" in (workdir / "bridge.log").read_text())
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            while True:  # 503 until the new backend is connected
                body = {"workflow": "solid", "1/width": 8}
                params = {"clientId": "after"}
                async with session.post(f"{url}/generate-based-workflow", params=params, json=body) as resp:
                    if resp.status == 200:
                        break
                    assert resp.status == 503
                await asyncio.sleep(0.05)
        await wait_for(lambda: len(new.engine.started) == 1)
    assert len(old.engine.started) == 1


async def test_sighup_applies_a_changed_api_key_file(workdir: Path) -> None:
    """An admin revokes a leaked key and adds one, then `systemctl reload`: the next request with the
    old key is refused and the new one works, with no restart (the sockets stay). A key file that no
    longer loads, or one that would switch keys off, is logged and the keys loaded before stay."""
    keys = workdir / "keys.json"
    keys.write_bytes(orjson.dumps([{"name": "leaked", "key": "leaked-key-0123456789"}]))

    async def status_with(url: str, key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as session, session.get(f"{url}/workflow-list", headers=headers) as resp:
            return resp.status

    async with bridge_process(workdir, "--emulate", "1", "--api-keys-file", str(keys), ready="/health") as (proc, url):
        assert await status_with(url, "leaked-key-0123456789") == 200
        keys.write_bytes(orjson.dumps([{"name": "fresh", "key": "fresh-key-0123456789"}]))
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "SIGHUP: API keys are now fresh" in (workdir / "bridge.log").read_text())
        assert await status_with(url, "leaked-key-0123456789") == 401
        assert await status_with(url, "fresh-key-0123456789") == 200
        for broken in (b"[{not json", b"[]"):
            keys.write_bytes(broken)
            proc.send_signal(signal.SIGHUP)
            said = "the ones loaded before stay" if broken != b"[]" else "switching keys on or off takes a restart"
            await wait_for(lambda said=said: said in (workdir / "bridge.log").read_text())  # type: ignore[misc]
            assert await status_with(url, "fresh-key-0123456789") == 200
            assert await status_with(url, "nobody") == 401


KEY_A, KEY_B = "aaaa-key-0123456789", "bbbb-key-0123456789"


async def test_sighup_hands_no_clients_of_one_key_to_another(workdir: Path) -> None:
    """Keys of `api_keys` are named by their place (key1, key2), and clientIds by their key's name.
    Revoking the first of two by SIGHUP made the second `key1`: it saw the revoked key's client
    "app" and fetched its results. Such a reload is refused, and said; and a key file giving a key a
    webhook is refused while the running bridge has no webhook secret (its jobs would all be 400)."""
    conf = workdir / "c.toml"
    conf.write_text(f'api_keys = ["{KEY_A}", "{KEY_B}"]\n')
    log = workdir / "bridge.log"
    async with (
        bridge_process(workdir, "--emulate", "1", "--config", str(conf), ready="/health") as (proc, url),
        aiohttp.ClientSession() as session,
    ):

        async def job_of(key: str) -> object:
            params, headers = {"clientId": "app"}, {"Authorization": f"Bearer {key}"}
            async with session.get(f"{url}/execution-info", params=params, headers=headers) as resp:
                return (await resp.json()).get("job_id")

        job = await submit(url, "app", headers={"Authorization": f"Bearer {KEY_A}"})
        assert await job_of(KEY_A) == job
        conf.write_text(f'api_keys = ["{KEY_B}"]\n')  # KEY_A leaked: revoked by taking it out
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "key1 of api_keys would be another key than before" in log.read_text())
        assert await job_of(KEY_B) != job
        keys = workdir / "keys.json"
        keys.write_bytes(orjson.dumps([{"name": "studio", "key": KEY_A, "webhook": "https://example.com/hook"}]))
        conf.write_text(f'api_keys_file = "{keys}"\nwebhook_secret = "whsec_{"A" * 44}"\n')
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "keys with a webhook need webhook_secret set" in log.read_text())
        assert await job_of(KEY_A) == job  # the keys loaded before stay


async def test_sighup_in_emulate_mode_reloads_the_workflows_and_keeps_serving(workdir: Path) -> None:
    async with bridge_process(workdir) as (proc, url), aiohttp.ClientSession() as session:
        async with session.get(f"{url}/workflow-list") as resp:
            assert await resp.json() == ["solid"]
        async with session.get(f"{url}/openapi.json") as resp:  # (built, and kept until a change)
            assert "Generate_second" not in (await resp.json())["components"]["schemas"]
        shutil.copy(workdir / "workflows" / "b_emptyimage_save.json", workdir / "workflows" / "second.json")
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(20):
            while True:
                async with session.get(f"{url}/workflow-list") as resp:
                    if await resp.json() == ["second", "solid"]:
                        break
                await asyncio.sleep(0.05)
        assert proc.returncode is None
        async with session.get(f"{url}/openapi.json") as resp:
            assert "Generate_second" in (await resp.json())["components"]["schemas"]
        await submit(url, "after-reload")
        (workdir / "workflows" / "broken.json").write_text("{not json")
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "workflows not reloaded" in (workdir / "bridge.log").read_text())
        async with session.get(f"{url}/workflow-list") as resp:
            assert await resp.json() == ["second", "solid"]  # the ones loaded before stay


async def _served(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/workflow-list") as resp:
        return await resp.json()


@pytest.mark.parametrize("unreadable", ["folder", "file"])
async def test_sighup_with_a_workflow_folder_or_file_it_cannot_read_keeps_the_workflows(
    workdir: Path, unreadable: str
) -> None:
    """A folder that may be entered but not listed read as empty (a glob hides the error): every
    workflow went, "workflows reloaded" at INFO. A file it may not read escaped the reload as an
    unretrieved task exception. Either is "workflows not reloaded", naming it; the old ones stay."""
    folder, log = workdir / "workflows", workdir / "bridge.log"
    async with bridge_process(workdir, prefix=bound_by_file_modes()) as (proc, url):
        assert await _served(url) == ["solid"]
        if unreadable == "folder":
            culprit, mode = folder, 0o311
        else:
            culprit, mode = folder / "second.json", 0o000
            shutil.copy(folder / "b_emptyimage_save.json", culprit)
        culprit.chmod(mode)
        try:
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "workflows not reloaded" in log.read_text())
            assert await _served(url) == ["solid"]
        finally:
            culprit.chmod(0o755)
    said = log.read_text()
    assert f"the ones loaded before stay: {culprit} cannot be read: Permission denied" in said
    assert "Task exception" not in said
    assert "workflows reloaded" not in said


def test_a_workflow_file_it_cannot_read_at_start_is_named_not_the_data_folder(workdir: Path) -> None:
    """It was "the data folder cannot be used: Permission denied: .../workflows/...": the admin was
    sent to the wrong folder."""
    culprit = workdir / "workflows" / "b_emptyimage_save.json"
    culprit.chmod(0o000)
    try:
        done = run_cli(["--emulate", "1"], workdir, prefix=bound_by_file_modes())
    finally:
        culprit.chmod(0o644)
    assert_one_line_error(done, f"{culprit} cannot be read: Permission denied")


async def test_sighup_serves_a_new_workflow_folder_and_names_the_settings_a_restart_applies(workdir: Path) -> None:
    """A changed `workflows` setting was ignored (the start-up folder read again, "reloaded"), and so
    was any setting a reload does not apply, without a word."""
    (workdir / "v2").mkdir()
    shutil.copy(FIXTURES / "workflows" / "a_loadimage_invert_save.json", workdir / "v2" / "invert.json")
    config, log = workdir / "c.toml", workdir / "bridge.log"
    config.write_text('workflows = "workflows"\nrate_limit = 0\n')
    async with bridge_process(workdir, "--emulate", "1", "--config", str(config)) as (proc, url):
        proc.send_signal(signal.SIGHUP)  # nothing changed: nothing to say
        await wait_for(lambda: log.read_text().count("workflows reloaded") == 1)
        config.write_text('workflows = "v2"\nrate_limit = 5\n')
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: log.read_text().count("workflows reloaded") == 2)
        assert await _served(url) == ["invert"]
    said = [line for line in log.read_text().splitlines() if "take effect at a restart" in line]
    assert len(said) == 1, said
    assert said[0].endswith("SIGHUP: changed rate_limit, which take effect at a restart")


async def test_burst_example_spreads_over_both_emulated_gpus(workdir: Path) -> None:
    """`make demo` + examples/burst.py: the bridge's log says where each job ran, and a burst of
    one-job clients uses both GPUs (no backend has run the workflow before)."""
    for name in ("sd15_text_to_image.json",):
        (workdir / "workflows" / name).write_bytes((FIXTURES / "workflows" / name).read_bytes())
    (workdir / "workflows" / "workflow_alias.json").write_text(
        '[{"alias": "text-to-image", "fn": "sd15_text_to_image.json"}]'
    )
    async with bridge_process(workdir, "--emulate", "2", "--emulator-pace", "0.05") as (_, url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "burst.py"), "--url", url, "--clients", "4",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
    assert "4 jobs in" in out.decode()
    log = (workdir / "bridge.log").read_text()
    places = re.findall(r"done on (\S+), waited", log)
    assert len(places) == 4, log
    assert len(set(places)) == 2, log


async def test_deleting_the_lock_file_lets_no_second_bridge_in(workdir: Path) -> None:
    async with bridge_process(workdir) as (_, url):
        (workdir / "data" / "bridge.lock").unlink()  # the folder itself is what is locked
        result = await asyncio.to_thread(run_cli, ["--emulate", "1"], workdir)
        assert_one_line_error(result, "data folder", "is in use by another comfybridge")
        assert await count(url) == 0


async def test_a_request_waiting_for_its_job_gets_503_when_the_bridge_stops(workdir: Path) -> None:
    """`?wait=1` while SIGTERM stops the bridge: a clear 503, and the job stays journaled."""
    slow = ("--emulate", "1", "--emulator-pace", "30")  # the job is still running when the bridge stops
    async with bridge_process(workdir, *slow) as (proc, url), aiohttp.ClientSession() as session:
        call = asyncio.ensure_future(
            session.post(f"{url}/generate-based-workflow", params={"clientId": "late", "wait": "1"},
                         json={"workflow": "solid"})
        )  # fmt: skip
        await wait_for(lambda: "accepted (solid)" in (workdir / "bridge.log").read_text(), timeout=15)
        proc.send_signal(signal.SIGTERM)
        async with await call as resp:
            assert resp.status == 503
            assert "stays journaled" in (await resp.json())["detail"]
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    async with (
        bridge_process(workdir, *slow) as (_, url),
        aiohttp.ClientSession() as session,
        session.get(f"{url}/execution-info", params={"clientId": "late"}) as resp,
    ):
        info = await resp.json()
        assert info.get("jobs_left") == 1, info  # the job was kept: recovered, waiting or running again
