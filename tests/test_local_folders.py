"""ComfyUI's folders when this machine can see them: outputs read from its output folder
(`comfy_outputs`), never from outside it, and fetched over /view whenever the folder does not have
them; uploads written into its input folder (`comfy_inputs`) once ComfyUI is seen to read it."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from comfybridge.comfy.folders import InputFolders, LocalInputs, LocalOutputs, LocalReadFailed, LocalTooLarge
from comfybridge.comfy.shapes import OutputRef
from comfybridge.core.jobs import job_folder
from comfybridge.edge.appkeys import SCHEDULER
from comfybridge.emulator import Emulator
from comfybridge.emulator.png import png_size

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .helpers import (
    backends,
    bridge_process,
    fetch_results,
    files_under,
    generate,
    png,
    poll_status,
    post_job,
    read_results,
    upload,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOLID = {"workflow": "solid", "1/width": 16, "1/height": 16, "1/batch_size": 1}


def only_output(emulator: Emulator) -> bytes:
    (path,) = [p for p in emulator.engine.output_dir.rglob("*.png") if p.is_file()]
    return path.read_bytes()


async def wait_for_results(client: object, client_id: str) -> list[tuple[str, str, str, bytes]]:
    resp = await client.post(  # type: ignore[attr-defined]
        "/generate-based-workflow", params={"clientId": client_id, "wait": "1"}, json=SOLID
    )
    assert resp.status == 200, await resp.text()
    return await read_results(resp)


async def test_outputs_are_read_from_the_folder_not_over_view(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(
        emulator, comfy_outputs=((emulator.url, emulator.engine.output_dir),), delete_outputs=False
    )
    for turn in range(3):
        parts = await wait_for_results(client, f"local{turn}")
        assert [part[3] for part in parts] == [only_output(emulator)]
        for path in emulator.engine.output_dir.rglob("*.png"):
            path.unlink()  # each turn's file is the only one
    assert emulator.engine.requests["GET /view"] == 1  # the folder's check at connect, no output


async def test_stored_outputs_are_deleted_from_comfyuis_folder(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    output = emulator.engine.output_dir
    client = await make_bridge(emulator, comfy_outputs=((emulator.url, output),))
    (output / "kept.png").write_bytes(b"an admin's own file")
    parts = await wait_for_results(client, "tidy")
    assert parts[0][3].startswith(PNG_SIGNATURE)
    resp = await client.get("/history", params={"clientId": "tidy"})
    assert resp.status == 204  # handed over by the one request
    await wait_for(lambda: files_under(output) == [output / "kept.png"])
    (day,) = (output / "comfybridge").iterdir()
    assert list(day.iterdir()) == []  # the job's own folder too
    assert (output / "kept.png").read_bytes() == b"an admin's own file"
    assert emulator.engine.requests["GET /view"] == 1  # the folder's check at connect, no output


TWO_SAVES = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "first"}},
    "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "second"}},
}


async def test_what_an_interrupted_prompt_saved_before_it_stopped_is_deleted_from_comfyuis_folder(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """A job interrupted after one of its SaveImage nodes ran: the job ended first, so nothing
    collected its prompt when it left ComfyUI, and its first image (and its history entry) stayed
    in ComfyUI for good."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "two.json").write_bytes(orjson.dumps(TWO_SAVES))
    emulator = await make_emulator(pace=0.3)
    output = emulator.engine.output_dir
    client = await make_bridge(emulator, comfy_outputs=((emulator.url, output),), workflows=tmp_path / "flows")
    assert (await generate(client, "stop", {"workflow": "two"}))[0] == 200
    await wait_for(lambda: bool(files_under(output)))  # the first SaveImage ran
    assert (await client.post("/interrupt", params={"clientId": "stop"})).status == 200
    await wait_for(lambda: any(e["status"]["status_str"] == "error" for e in emulator.engine.history.values()))
    await wait_for(lambda: not files_under(output) and not emulator.engine.history)


async def test_what_a_failed_prompt_saved_before_its_error_is_deleted_from_comfyuis_folder(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Its history forgotten, but the image its first SaveImage made stayed in ComfyUI's folder."""
    (tmp_path / "flows").mkdir()
    broken = {**TWO_SAVES, "3": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}}}
    broken["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "second"}}
    (tmp_path / "flows" / "broken.json").write_bytes(orjson.dumps(broken))
    emulator = await make_emulator()
    (emulator.engine.input_dir / "broken.png").write_bytes(b"no picture")  # fails as it is loaded
    output = emulator.engine.output_dir
    client = await make_bridge(emulator, comfy_outputs=((emulator.url, output),), workflows=tmp_path / "flows")
    assert (await generate(client, "fails", {"workflow": "broken"}))[0] == 200
    status = await poll_status(client, "fails", {"error", "closed"})
    assert "cannot identify image file" in status["detail"]
    await wait_for(lambda: not emulator.engine.history and not files_under(output))


async def test_a_folder_comfyui_does_not_write_is_found_out_at_connect_and_left_alone(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = await make_emulator()
    elsewhere = tmp_path / "another-comfy-output"
    elsewhere.mkdir()
    with caplog.at_level(logging.INFO, logger="comfybridge.comfy.client"):
        client = await make_bridge(emulator, comfy_outputs=((emulator.url, elsewhere),))
        parts = await wait_for_results(client, "astray")
    assert [part[3] for part in parts] == [only_output(emulator)]
    assert emulator.engine.requests["GET /view"] == 2  # the check, then the output
    assert "does not use" in caplog.text
    assert "outputs are fetched over /view" in caplog.text
    assert list(elsewhere.iterdir()) == []  # the check's file is gone too


async def test_a_read_only_output_folder_is_read_unchecked(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output folder mounted read-only here still serves reads (each one checked as ever)."""

    def read_only(self: LocalOutputs) -> tuple[str, bytes]:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(LocalOutputs, "write_probe", read_only)
    emulator = await make_emulator()
    client = await make_bridge(
        emulator, comfy_outputs=((emulator.url, emulator.engine.output_dir),), delete_outputs=False
    )
    parts = await wait_for_results(client, "read-only")
    assert [part[3] for part in parts] == [only_output(emulator)]
    assert emulator.engine.requests["GET /view"] == 0


async def test_a_link_out_of_the_folder_is_not_followed(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    """ComfyUI names its files in its events: whatever the folder holds, nothing outside it is read.
    Here ComfyUI's own folder links its `comfybridge` subfolder elsewhere (inside it, or ComfyUI
    would not save there): ComfyUI writes through the link, the bridge reads nothing through it."""
    emulator = await make_emulator()
    elsewhere = emulator.engine.output_dir / "linked"
    elsewhere.mkdir(parents=True)
    (emulator.engine.output_dir / "comfybridge").symlink_to(elsewhere)
    client = await make_bridge(emulator, comfy_outputs=((emulator.url, emulator.engine.output_dir),))
    parts = await wait_for_results(client, "linked")
    assert [part[3] for part in parts] == [only_output(emulator)]
    assert emulator.engine.requests["GET /view"] == 2  # the folder's check, then the output
    assert list(elsewhere.rglob("*.png"))  # nothing deleted through the link either


async def test_an_output_over_the_limit_fails_its_job_without_a_download(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(
        emulator, comfy_outputs=((emulator.url, emulator.engine.output_dir),), max_result_mb=20 / (1024 * 1024)
    )
    resp = await client.post("/generate-based-workflow", params={"clientId": "big", "wait": "1"}, json=SOLID)
    assert resp.status == 502
    assert "The result cannot be kept" in (await resp.json())["detail"]
    assert emulator.engine.requests["GET /view"] == 1  # the folder's check at connect, no output


async def test_only_the_jobs_own_outputs_are_read_here_or_deleted(make_fake: Any, make_bridge: BridgeFactory) -> None:
    """A name ComfyUI reports that the bridge did not give the job (a cached node's earlier file, a
    prefix wired from another node, a custom node's naming) may be another prompt's, or an admin's:
    it is fetched over /view, as ComfyUI serves it, and never deleted."""
    fake = await make_fake()
    output = fake.upstream.engine.output_dir
    output.mkdir(parents=True, exist_ok=True)
    (output / "admin.png").write_bytes(png(4, 4))

    def named_elsewhere(text: str) -> str:
        message = orjson.loads(text)
        if message.get("type") == "executed":
            message["data"]["output"]["images"] = [{"filename": "admin.png", "subfolder": "", "type": "output"}]
        return orjson.dumps(message).decode()

    fake.rewrite = named_elsewhere
    client = await make_bridge(fake.url, comfy_outputs=((fake.url, output),))
    parts = await wait_for_results(client, "cached")
    assert [part[3] for part in parts] == [png(4, 4)]
    assert fake.seen.count("GET /view") >= 1
    assert (output / "admin.png").read_bytes() == png(4, 4)


async def test_a_prompt_gone_from_comfyui_before_its_last_event_is_let_go_when_interrupted(
    make_fake: Any, make_bridge: BridgeFactory
) -> None:
    """ComfyUI finished the prompt, but its last events have not reached the bridge when the client
    interrupts: the cancel finds the prompt gone from ComfyUI's queue and takes the job back, and the
    late `executing null` then matches no job. What the prompt saved stayed in ComfyUI for good."""
    fake = await make_fake()
    engine = fake.upstream.engine
    output = engine.output_dir
    client = await make_bridge(fake.url, comfy_outputs=((fake.url, output),), job_idle_timeout=600)
    engine.pause()
    assert (await generate(client, "late", SOLID))[0] == 200
    scheduler = client.app[SCHEDULER]
    (job,) = scheduler.clients.get("late").jobs.values()
    await wait_for(lambda: engine.queue_remaining == 1)
    prompt_id = job.prompt_id

    def late(text: str) -> str:  # its events after its start, and ComfyUI's word that its queue is empty
        if orjson.loads(text)["type"] == "status":
            return ""
        return text if prompt_id not in text or "execution_start" in text else ""

    fake.rewrite = late
    engine.resume()
    await wait_for(lambda: prompt_id in engine.history and bool(files_under(output)))
    assert (await client.post("/interrupt", params={"clientId": "late"})).status == 200
    assert (await poll_status(client, "late", {"error", "closed"}))["detail"] == "interrupted"
    await wait_for(lambda: not engine.history and not files_under(output))


def test_a_job_folder_is_only_what_the_bridge_named_for_that_job() -> None:
    job = "0123456789abcdef0123456789abcdef"
    mine = OutputRef(f"x_{job}_00001_.png", f"comfybridge/2026-12-01/{job[:12]}/video", "output")
    assert job_folder(job, mine) == f"comfybridge/2026-12-01/{job[:12]}"
    assert job_folder(job, OutputRef("x_00001_.png", f"comfybridge/2026-12-01/{job[:12]}", "output")) is None
    assert job_folder(job, OutputRef(f"x_{job}_00001_.png", "comfybridge/2026-12-01/another", "output")) is None
    assert job_folder(job, OutputRef(f"x_{job}_00001_.png", "", "output")) is None


async def test_removal_goes_up_to_the_jobs_folder_and_no_further(tmp_path: Path) -> None:
    job_dir = tmp_path / "comfybridge" / "day" / "job"
    (job_dir / "video").mkdir(parents=True)
    (job_dir / "video" / "a.mp4").write_bytes(b"v")
    (job_dir / "b.png").write_bytes(b"p")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.png").write_bytes(b"not the job's")
    (job_dir / "linked").symlink_to(outside)
    refs = [
        OutputRef("a.mp4", "comfybridge/day/job/video", "output"),
        OutputRef("b.png", "comfybridge/day/job", "output"),
        OutputRef("c.png", "comfybridge/day/job/linked", "output"),  # through a link: not followed
    ]
    await LocalOutputs(tmp_path, "comfy").remove([(refs, "comfybridge/day/job")])
    assert (outside / "c.png").read_bytes() == b"not the job's"
    assert sorted(p.name for p in job_dir.iterdir()) == ["linked"]  # the job's folder keeps the link
    (job_dir / "linked").unlink()
    await LocalOutputs(tmp_path, "comfy").remove([(refs[:1], "comfybridge/day/job")])
    assert list((tmp_path / "comfybridge" / "day").iterdir()) == []  # the job's folder, not the day's
    assert (tmp_path / "comfybridge" / "day").is_dir()


class Taken:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reserved: list[int | None] = []

    async def reserve(self, size: int | None) -> None:
        self.reserved.append(size)

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


async def test_a_large_output_streams_from_the_folder(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "big.bin").write_bytes(data)
    outputs, sink = LocalOutputs(tmp_path, "comfy"), Taken()
    assert await outputs.copy(OutputRef("big.bin", "sub", "output"), sink, len(data)) == len(data)
    assert sink.data == data
    assert sink.reserved == [len(data)]
    with pytest.raises(LocalTooLarge):
        await outputs.copy(OutputRef("big.bin", "sub", "output"), Taken(), len(data) - 1)


@pytest.mark.parametrize("planted", ["dotdot", "inner-dotdot", "symlink", "linked-folder", "fifo", "folder", "nul"])
async def test_what_is_not_a_file_of_the_folder_is_left_to_view(tmp_path: Path, planted: str) -> None:
    root, outside = tmp_path / "output", tmp_path / "secret.png"
    (root / "sub").mkdir(parents=True)
    outside.write_bytes(b"not ComfyUI's")
    name, subfolder = "x.png", ""
    if planted == "dotdot":
        name = "../secret.png"
    elif planted == "inner-dotdot":
        name, subfolder = "secret.png", "sub/../.."
    elif planted == "symlink":
        (root / name).symlink_to(outside)
    elif planted == "linked-folder":
        name, subfolder = "secret.png", "out"
        (root / "out").symlink_to(tmp_path)
    elif planted == "fifo":
        os.mkfifo(root / name)  # opening it for reading would wait for a writer
    elif planted == "folder":
        (root / name).mkdir()
    else:
        name = "x\0.png"
    sink, open_before = Taken(), len(os.listdir("/proc/self/fd"))
    assert await LocalOutputs(root, "comfy").copy(OutputRef(name, subfolder, "output"), sink, 1 << 20) is None
    assert not sink.data
    assert len(os.listdir("/proc/self/fd")) == open_before  # nothing left open


async def test_a_file_that_breaks_off_is_a_failed_read(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"\0" * (3 << 20))

    class Cutting(Taken):
        async def write(self, chunk: bytes) -> None:
            await super().write(chunk)
            os.truncate(tmp_path / "big.bin", len(self.data))  # the rest is gone

    with pytest.raises(LocalReadFailed, match="changed while it was read"):
        await LocalOutputs(tmp_path, "comfy").copy(OutputRef("big.bin", "", "output"), Cutting(), 4 << 20)


async def invert_through(client: object, client_id: str) -> tuple[str, bytes]:
    """Upload a picture, invert it in one request: (the upload's name, the result)."""
    status, names = await upload(client, {"photo": ("photo.png", png(30, 20))}, client_id=client_id)  # type: ignore[arg-type]
    assert status == 200
    resp = await client.post(  # type: ignore[attr-defined]
        "/generate-based-workflow",
        params={"clientId": client_id, "wait": "1"},
        json={"workflow": "invert", "1/image": names["photo"]},
    )
    assert resp.status == 200, await resp.text()
    (part,) = await read_results(resp)
    return names["photo"], part[3]


async def test_uploads_are_written_into_the_input_folder_comfyui_reads(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, comfy_inputs=((emulator.url, emulator.engine.input_dir),), delete_inputs=False)
    inputs = client.app[SCHEDULER].backends[emulator.url].client.inputs
    await wait_for(lambda: inputs is not None and inputs.usable)  # ComfyUI served back the probe
    name, result = await invert_through(client, "in")
    assert png_size(result) == (30, 20)
    assert (emulator.engine.input_dir / name).read_bytes() == png(30, 20)
    assert emulator.engine.requests["POST /upload/image"] == 0
    assert not [p for p in emulator.engine.input_dir.iterdir() if p.name.startswith(".")]  # no probe, no temporary


async def test_an_upload_is_deleted_from_comfyuis_folder_once_no_unfinished_job_needs_it(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory
) -> None:
    emulator = await make_emulator()
    client = await make_bridge(emulator, comfy_inputs=((emulator.url, emulator.engine.input_dir),))
    inputs = client.app[SCHEDULER].backends[emulator.url].client.inputs
    await wait_for(lambda: inputs is not None and inputs.usable)
    seeded = sorted(p.name for p in emulator.engine.input_dir.iterdir())
    status, names = await upload(client, {"photo": ("photo.png", png(30, 20))}, client_id="shared")  # type: ignore[arg-type]
    assert status == 200
    # Two jobs with the same upload, the second queued inside ComfyUI while the first runs and ends;
    # each prompt starts a while after the one before, long after the first job's end is stored.
    emulator.engine.faults.start_delay = 1.0
    body = {"workflow": "invert", "1/image": names["photo"]}
    answers = await asyncio.gather(
        *(
            client.post("/generate-based-workflow", params={"clientId": "shared", "wait": "1"}, json=body)
            for _ in range(2)
        )
    )
    for resp in answers:
        assert resp.status == 200, await resp.text()  # the second still found its file
    await wait_for(lambda: sorted(p.name for p in emulator.engine.input_dir.iterdir()) == seeded)
    emulator.engine.faults.start_delay = 0.0
    _, result = await invert_through(client, "again")  # written there anew for the next job
    assert png_size(result) == (30, 20)
    await wait_for(lambda: sorted(p.name for p in emulator.engine.input_dir.iterdir()) == seeded)
    assert emulator.engine.requests["POST /upload/image"] == 0


async def test_an_upload_a_killed_bridge_wrote_is_deleted_once_its_job_ends_after_the_restart(
    workdir: Path, make_emulator: EmulatorFactory
) -> None:
    emulator = await make_emulator(pace=0.4)  # the job runs on while the bridge is down
    folder = emulator.engine.input_dir
    seeded = sorted(p.name for p in folder.iterdir())
    flags = (*backends(emulator), "--comfy-inputs", f"{emulator.url}={folder}")
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *flags) as (proc, url):
            form = aiohttp.FormData()
            form.add_field("photo", png(30, 20), filename="photo.png", content_type="image/png")
            async with session.post(f"{url}/upload", params={"clientId": "kept"}, data=form) as resp:
                name = (await resp.json())["photo"]
            await post_job(session, url, "kept", {"workflow": "invert", "1/image": name})
            await wait_for(lambda: len(emulator.engine.started) == 1)
            assert (folder / name).is_file()
            proc.kill()
        async with bridge_process(workdir, *flags) as (proc, url):
            await wait_for(lambda: sorted(p.name for p in folder.iterdir()) == seeded)  # the adopted job ended
            assert [job for job, _ in await fetch_results(session, url, "kept")]
    assert len(emulator.engine.started) == 1


async def test_a_new_copy_outlives_an_old_deletion_and_a_planted_link_is_removed_not_followed(
    tmp_path: Path,
) -> None:
    folder, victim = tmp_path / "input", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_bytes(b"kept")
    source = tmp_path / "source.png"
    source.write_bytes(b"picture")
    inputs = LocalInputs(folder, "comfy")
    batches: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        batches.append(asyncio.ensure_future(coro))

    assert await inputs.place(source, "sent-again.png")
    assert await inputs.place(source, "linked.png")
    (folder / "linked.png").unlink()
    (folder / "linked.png").symlink_to(victim)  # swapped for a link meanwhile: the link goes, not its target
    inputs.remove_later(["sent-again.png", "linked.png", "never-here.png"], spawn)
    await inputs.settle("sent-again.png")  # a job sends it here again before the batch runs
    assert await inputs.place(source, "sent-again.png")
    await asyncio.gather(*batches)
    assert sorted(p.name for p in folder.iterdir()) == ["sent-again.png"]
    assert victim.read_bytes() == b"kept"
    inputs.remove_later(["sent-again.png"], spawn)
    await asyncio.gather(*batches)
    assert list(folder.iterdir()) == []


async def test_backends_that_share_an_input_folder_share_its_deletions(tmp_path: Path) -> None:
    """One ComfyUI's deletion of an upload must not hit the copy another ComfyUI, reading the same
    folder (here named through a link), was just given."""
    folder = tmp_path / "input"
    folder.mkdir()
    (tmp_path / "same").symlink_to(folder)
    source = tmp_path / "source.png"
    source.write_bytes(b"picture")
    shared = InputFolders()
    first, second = LocalInputs(folder, "comfy-a", shared), LocalInputs(tmp_path / "same", "comfy-b", shared)
    assert first.deletions is second.deletions
    batches: list[asyncio.Task[None]] = []
    assert await first.place(source, "u.png")
    first.remove_later(["u.png"], lambda coro, name: batches.append(asyncio.ensure_future(coro)))
    await second.settle("u.png")  # the next job, on the other ComfyUI
    assert await second.place(source, "u.png")
    await asyncio.gather(*batches)
    assert (folder / "u.png").read_bytes() == b"picture"


async def test_a_copy_sent_while_an_older_batch_deletes_it_waits_for_that_batch(tmp_path: Path) -> None:
    """Two deletion batches under way at once (a slow disk): a copy sent again waits for the one
    deleting its name, not only for the newest."""
    source = tmp_path / "source.png"
    source.write_bytes(b"picture")
    inputs = LocalInputs(tmp_path, "comfy")
    for name in ("x.png", "y.png"):
        assert await inputs.place(source, name)
    deletions = inputs.deletions
    release, unlinking = threading.Event(), deletions._unlink_all

    def held(names: set[str]) -> None:
        if "x.png" in names:
            release.wait()  # the first batch is slow
        unlinking(names)

    deletions._unlink_all = held  # type: ignore[method-assign]
    batches: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        batches.append(asyncio.ensure_future(coro))

    inputs.remove_later(["x.png"], spawn)
    await wait_for(lambda: "x.png" in deletions._removing)  # its batch is under way, held in its thread
    inputs.remove_later(["y.png"], spawn)
    await wait_for(lambda: not (tmp_path / "y.png").exists())  # a second batch ran meanwhile
    settling = asyncio.ensure_future(inputs.settle("x.png"))
    await asyncio.sleep(0)
    assert not settling.done()
    release.set()
    await settling
    assert await inputs.place(source, "x.png")
    await asyncio.gather(*batches)
    assert (tmp_path / "x.png").read_bytes() == b"picture"


async def test_a_folder_comfyui_does_not_read_sends_uploads_over_http(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = await make_emulator()
    elsewhere = tmp_path / "another-comfy-input"
    elsewhere.mkdir()
    with caplog.at_level(logging.WARNING, logger="comfybridge.comfy.client"):
        client = await make_bridge(emulator, comfy_inputs=((emulator.url, elsewhere),))
        _, result = await invert_through(client, "astray")
    assert png_size(result) == (30, 20)
    assert emulator.engine.requests["POST /upload/image"] == 1
    assert "does not use" in caplog.text
    assert list(elsewhere.iterdir()) == []  # the probe is gone too


@pytest.mark.parametrize("name", ["sub/x.png", ".hidden.png"])
async def test_an_upload_is_written_only_under_its_own_plain_name(tmp_path: Path, name: str) -> None:
    (tmp_path / "sub").mkdir()
    source = tmp_path / "source.png"
    source.write_bytes(b"picture")
    inputs = LocalInputs(tmp_path / "input", "comfy")
    (tmp_path / "input").mkdir()
    assert await inputs.place(source, name) is False
    assert list((tmp_path / "input").iterdir()) == []


async def test_an_input_folder_that_cannot_be_written_is_left_for_http(tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    source.write_bytes(b"picture")
    inputs = LocalInputs(tmp_path / "gone", "comfy")
    inputs.usable = True
    assert await inputs.place(source, "x.png") is False
    assert inputs.usable is False  # until the next connect's check
    taken: list[bytes] = []

    async def stream() -> AsyncIterator[bytes]:
        for chunk in (b"pic", b"ture"):
            taken.append(chunk)
            yield chunk

    assert await inputs.place(stream(), "x.png") is False
    assert taken == []  # nothing taken from the stream: it goes over HTTP whole


async def test_an_upload_replaces_a_link_planted_in_the_folder_and_never_writes_through_it(tmp_path: Path) -> None:
    folder, victim = tmp_path / "input", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_bytes(b"the bridge's user's file")
    (folder / "x.png").symlink_to(victim)
    source = tmp_path / "source.png"
    source.write_bytes(b"picture")
    assert await LocalInputs(folder, "comfy").place(source, "x.png") is True
    assert not (folder / "x.png").is_symlink()
    assert (folder / "x.png").read_bytes() == b"picture"
    assert victim.read_bytes() == b"the bridge's user's file"
    assert [p.name for p in folder.iterdir()] == ["x.png"]  # no temporary file left


async def test_a_gone_upload_is_said_gone_not_blamed_on_the_folder(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    inputs = LocalInputs(tmp_path / "input", "comfy")
    inputs.usable = True
    with pytest.raises(FileNotFoundError):
        await inputs.place(tmp_path / "gone.png", "x.png")
    assert inputs.usable is True


def test_temporary_files_a_killed_bridge_left_are_swept_at_the_next_check(tmp_path: Path) -> None:
    inputs = LocalInputs(tmp_path, "comfy")
    old, fresh = tmp_path / ".x.png.0badc0de.comfybridge.tmp", tmp_path / ".y.png.feedf00d.comfybridge.tmp"
    for path in (old, fresh, tmp_path / "admin.png"):
        path.write_bytes(b"...")
    os.utime(old, (1, 1))
    name, data = inputs.write_probe()
    assert (tmp_path / name).read_bytes() == data
    inputs.remove_probe(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "admin.png"]
