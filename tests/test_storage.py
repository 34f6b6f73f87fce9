"""Results in S3-compatible object storage (`--storage s3://...`), against a real S3 API server
(moto's, see tests/s3.py), through the bridge's HTTP and WebSocket edge."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from comfybridge.config import ConfigError, load_settings
from comfybridge.errors import StorageUnavailable
from comfybridge.store.s3 import S3Blobs

from .conftest import BridgeFactory, EmulatorFactory, wait_for
from .faulty_s3 import FAULTS, FaultyS3, faulty_s3
from .helpers import (
    TINY,
    assert_one_line_error,
    backends,
    bridge_process,
    fetch_results,
    generate,
    png,
    poll_status,
    post_job,
    read_results,
    run_cli,
    run_job,
    upload,
    wait_closed,
    without_job_id,
)
from .s3 import S3Server
from .services import unused_port


async def test_results_are_kept_in_the_bucket_until_fetched_then_removed(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    client = await make_bridge(
        await make_emulator(), storage=f"s3://{bucket}/bridge", s3_endpoint=s3.url, inline_result_kb=0
    )
    frames = await run_job(client, "stored", {"workflow": "solid", "1/batch_size": 2})
    job_id = frames[-1]["job_id"]
    keys = s3.keys(bucket)
    assert len(keys) == 2
    assert all(key.startswith(f"bridge/results/{job_id}/") for key in keys)
    assert not list((tmp_path / "data" / "results").rglob("*.png"))  # nothing on the bridge's disk
    parts = await read_results(await client.get("/history", params={"clientId": "stored"}))
    assert len(parts) == 2
    assert all(part[3].startswith(b"\x89PNG") for part in parts)
    await wait_for(lambda: s3.keys(bucket) == [])  # removed once the fetch is journaled


async def test_a_large_result_streams_through_a_multipart_upload_and_back_as_base64(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    emulator = await make_emulator()
    emulator.engine.faults.video_mb = 20  # more than two parts of 8 MiB
    bucket = s3.new_bucket()
    client = await make_bridge(emulator, storage=f"s3://{bucket}", s3_endpoint=s3.url)
    frames = await run_job(client, "video", TINY)
    assert frames[-1]["status"] == "closed", frames[-1]
    (video_key,) = [key for key in s3.keys(bucket) if key.endswith(".mp4")]
    stored = s3.client().get_object(Bucket=bucket, Key=video_key)["Body"].read()
    assert len(stored) == 20 << 20
    (original,) = (emulator.root / "output").rglob("*.mp4")
    assert hashlib.sha256(stored).digest() == hashlib.sha256(original.read_bytes()).digest()
    resp = await client.get("/history", params={"clientId": "video", "resType": "base64"})
    files = orjson.loads(await resp.read())["files"]
    videos = [f for f in files if f["file_name"].endswith(".mp4")]
    assert base64.b64decode(videos[0]["content"]) == stored


async def test_results_as_presigned_links_count_as_fetched(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    bucket = s3.new_bucket()
    client = await make_bridge(await make_emulator(), storage=f"s3://{bucket}/p", s3_endpoint=s3.url)
    frames = await run_job(client, "linked", TINY)
    resp = await client.get("/history", params={"clientId": "linked", "resType": "url"})
    assert resp.status == 200
    (item,) = (await resp.json())["files"]
    assert item["job_id"] == frames[-1]["job_id"]
    assert item["content_type"] == "image/png"
    assert item["expires_at"].endswith("Z")
    url = urllib.parse.urlsplit(item["url"])
    query = urllib.parse.parse_qs(url.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]  # SigV4 (moto does not check signatures)
    assert query["X-Amz-Expires"] == ["3600"]
    async with aiohttp.ClientSession() as session, session.get(item["url"]) as got:
        assert got.status == 200
        assert (await got.read()).startswith(b"\x89PNG")
    again = await client.get("/history", params={"clientId": "linked"})
    assert again.status == 204  # counted as fetched
    await asyncio.sleep(0.2)  # the objects must outlive their links (not a timing assertion)
    assert len(s3.keys(bucket)) == 1


async def test_links_need_object_storage(make_emulator: EmulatorFactory, make_bridge: BridgeFactory) -> None:
    client = await make_bridge(await make_emulator())
    await run_job(client, "local", TINY)
    resp = await client.get("/history", params={"clientId": "local", "resType": "url"})
    assert resp.status == 400
    assert "resType=url needs results kept in object storage" in (await resp.json())["detail"]
    assert (await client.get("/history", params={"clientId": "local"})).status == 200  # nothing was lost


async def test_results_in_the_bucket_survive_a_kill_9(
    workdir: Path, make_emulator: EmulatorFactory, s3: S3Server
) -> None:
    bucket = s3.new_bucket()
    flags = (*backends(await make_emulator()), "--storage", f"s3://{bucket}/r", "--s3-endpoint", s3.url)
    async with aiohttp.ClientSession() as session:
        async with bridge_process(workdir, *flags) as (proc, url):
            jobs = [await post_job(session, url, "kept", TINY) for _ in range(3)]
            await wait_closed(session, url, ["kept"])
            proc.kill()
        async with bridge_process(workdir, *flags) as (_, url):
            assert sorted(job for job, _ in await fetch_results(session, url, "kept")) == sorted(jobs)


def test_a_bucket_that_cannot_be_used_is_one_line_and_exit_2(workdir: Path, s3: S3Server) -> None:
    missing = run_cli(["--emulate", "1", "--storage", "s3://no-such-bucket-here", "--s3-endpoint", s3.url], workdir)
    assert_one_line_error(missing, "storage s3://no-such-bucket-here cannot be used", "(404)")
    away = run_cli(["--emulate", "1", "--storage", "s3://bucket-x", "--s3-endpoint", "http://127.0.0.1:9"], workdir)
    assert_one_line_error(away, "storage s3://bucket-x cannot be used", "cannot be reached")
    bad = run_cli(["--emulate", "1", "--storage", "s3://No_Bucket"], workdir)
    assert_one_line_error(bad, "--storage: 's3://No_Bucket' names no valid bucket")


async def test_uploads_are_kept_in_the_bucket_sent_from_there_and_survive_a_restart(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server, tmp_path: Path
) -> None:
    emulator = await make_emulator()
    bucket = s3.new_bucket()
    storage = {"storage": f"s3://{bucket}/u", "s3_endpoint": s3.url}
    first = await make_bridge(emulator, **storage)
    status, names = await upload(first, {"file": ("keep.png", png(12, 10, 0x102030))}, client_id="uploader")
    assert status == 200
    assert s3.keys(bucket) == [f"u/uploads/c-uploader/{names['file']}"]
    assert not [p for p in (tmp_path / "data" / "uploads").rglob("*") if p.is_file()]  # nothing kept here
    frames = await run_job(first, "uploader", {"workflow": "invert", "1/image": names["file"]})
    assert frames[-1]["status"] == "closed", frames[-1]
    (sent,) = (emulator.root / "input").glob("*keep*")  # streamed from the bucket to ComfyUI
    assert sent.read_bytes() == png(12, 10, 0x102030)
    await first.close()
    second = await make_bridge(emulator, **storage)
    parts = await read_results(await second.get("/history", params={"clientId": "uploader"}))
    assert [without_job_id(p[1]) for p in parts] == ["wf_a_invert_00001_.png"]
    status, _ = await generate(second, "uploader", {"workflow": "invert", "1/image": names["file"]})
    assert status == 200  # the upload is known again after the restart, from the bucket


async def test_expired_uploads_leave_the_bucket(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    bucket = s3.new_bucket()
    client = await make_bridge(await make_emulator(), storage=f"s3://{bucket}", s3_endpoint=s3.url, upload_ttl=2)
    await upload(client, {"file": ("gone.png", png())}, client_id="brief")
    assert len(s3.keys(bucket)) == 1
    await wait_for(lambda: s3.keys(bucket) == [], timeout=30)  # the sweeper's turn comes within a tenth of the TTL


async def test_object_storage_away_a_while_then_back_loses_nothing(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The S3 server stops while a job runs: an upload meanwhile answers 503 with a detail; the
    finished job's results are stored again until the server is back, and the job ends well.
    (A server of its own, on a port it can stop and take again; `s3` sets the credentials.)"""
    from moto.server import ThreadedMotoServer

    port = unused_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    bucket = S3Server(url).new_bucket()
    emulator = await make_emulator(pace=0.05)
    client = await make_bridge(
        emulator, storage=f"s3://{bucket}", s3_endpoint=url, result_retries=20, inline_result_kb=0
    )
    try:
        status, _ = await generate(client, "patient", {"workflow": "slow", "2/seed": 1})
        assert status == 200
        server.stop()  # the bucket's state stays in this process: the same server comes back
        status, answer = await upload(client, {"file": ("x.png", png())}, client_id="patient")
        assert status == 503
        assert "object storage cannot be reached" in answer["detail"]
        await wait_for(  # ComfyUI finished it, and a try to store its results failed
            lambda: any("could not store its results" in r.getMessage() for r in caplog.records), timeout=60
        )
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        info = await poll_status(client, "patient", {"closed", "error"}, timeout=60)
        assert info["status"] == "closed", info
        assert len(await read_results(await client.get("/history", params={"clientId": "patient"}))) == 1
    finally:
        server.stop()


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_object_storage_in_trouble_refuses_clearly_and_loses_nothing(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    s3: S3Server,
    fault: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S3 answering 5xx, refusing the credentials, without the bucket, or not answering at all (not
    even reading a request): an upload and a fetch meanwhile answer 503 with S3's own reason, within
    a bound, and change nothing; a job that finishes meanwhile waits for the store (past
    `result_retries`) and ends well once it is back."""
    bucket = s3.new_bucket()
    async with faulty_s3(s3.url) as proxy:
        storage = {"storage": f"s3://{bucket}/t", "s3_endpoint": proxy.url, "s3_timeout": 0.5, "inline_result_kb": 0}
        client = await make_bridge(await make_emulator(pace=0.05), **storage, result_retries=1)
        await run_job(client, "earlier", TINY)
        status, _ = await generate(client, "patient", {"workflow": "slow", "2/seed": 1})
        assert status == 200
        before = s3.keys(bucket)
        proxy.fault = fault
        reason = "cannot be reached (" if fault in ("hang", "silent") else f"({FAULTS[fault][1]}"
        status, answer = await upload(client, {"file": ("x.png", png())}, client_id="patient")
        assert (status, reason in answer["detail"]) == (503, True), answer
        fetch = await client.get("/history", params={"clientId": "earlier"})
        assert (fetch.status, reason in (await fetch.json())["detail"]) == (503, True)
        await wait_for(  # ComfyUI finished it, and more tries to store its results than result_retries failed
            lambda: sum("could not store its results" in r.getMessage() for r in caplog.records) >= 2, timeout=60
        )
        assert proxy.refused
        proxy.fault = None
        info = await poll_status(client, "patient", {"closed", "error"}, timeout=60)
        assert info["status"] == "closed", info
        for client_id in ("earlier", "patient"):  # the fetch that was refused lost nothing
            assert len(await read_results(await client.get("/history", params={"clientId": client_id}))) == 1
        assert before
        await wait_for(lambda: s3.keys(bucket) == [])  # the refused upload left nothing; fetched results go


@pytest.mark.parametrize("fault", ["503", "no-bucket"])
async def test_an_upload_that_cannot_be_read_at_hand_over_waits_for_the_store(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    s3: S3Server,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """S3 answering 5xx, or its bucket missing a while, as a job that names an upload is handed over:
    the job waits for the store (the store's trouble, not ComfyUI's: no backend is rested for it, the
    job is not failed as refused, nor as its upload gone: a HEAD's bare 404 says no bucket too) and
    runs once it is back."""
    bucket = s3.new_bucket()
    async with faulty_s3(s3.url) as proxy:
        client = await make_bridge(
            await make_emulator(), storage=f"s3://{bucket}/t", s3_endpoint=proxy.url, s3_timeout=0.5
        )
        status, names = await upload(client, {"photo": ("cat.png", png())}, client_id="hand")
        assert status == 200
        proxy.fault = fault
        status, _ = await generate(client, "hand", {"workflow": "invert", "1/image": names["photo"]})
        assert status == 200
        waited = "not sent, its upload cannot be read"
        await wait_for(lambda: sum(waited in r.getMessage() for r in caplog.records) >= 4, timeout=30)  # > MAX_ATTEMPTS
        proxy.fault = None
        info = await poll_status(client, "hand", {"closed", "error"}, timeout=60)
        assert info["status"] == "closed", info
        assert not any("did not take" in r.getMessage() and "hand-overs" in r.getMessage() for r in caplog.records)


async def test_an_upload_the_store_breaks_off_mid_hand_over_waits_for_the_store(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    s3: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store answers for the upload, then its stream breaks off on the way into ComfyUI (aiohttp
    wraps what a body raises): still the store's trouble, not ComfyUI's."""
    bucket = s3.new_bucket()
    client = await make_bridge(await make_emulator(), storage=f"s3://{bucket}/t", s3_endpoint=s3.url, s3_timeout=0.5)
    status, names = await upload(client, {"photo": ("cat.png", png())}, client_id="mid")
    assert status == 200
    real, failing = S3Blobs.chunks, [5]

    async def flaky(self: S3Blobs, key: str, size: int) -> AsyncGenerator[bytes, None]:
        if key.startswith("c-") and failing[0]:  # HEAD answered; the GET (or a body read) does not
            failing[0] -= 1
            raise StorageUnavailable("object storage cannot be reached (ReadTimeoutError)")
        async for chunk in real(self, key, size):
            yield chunk

    monkeypatch.setattr(S3Blobs, "chunks", flaky)
    status, _ = await generate(client, "mid", {"workflow": "invert", "1/image": names["photo"]})
    assert status == 200
    info = await poll_status(client, "mid", {"closed", "error"}, timeout=60)
    assert info["status"] == "closed", info  # not 'ComfyUI did not accept the job'


async def test_objects_no_record_names_are_swept_while_running(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    """A deletion refused, or a store's answer lost after it did the work, leaves objects nobody
    names: the running bridge removes them once older than anything could still need them."""
    bucket = s3.new_bucket()
    client = await make_bridge(
        await make_emulator(), storage=f"s3://{bucket}/t", s3_endpoint=s3.url, result_ttl=1, link_ttl=1, upload_ttl=2
    )
    status, _ = await upload(client, {"file": ("kept.png", png())}, client_id="owner")
    assert status == 200
    orphans = ["t/results/0123456789abcdef/000-lost.png", "t/uploads/c-owner/0123456789ab-lost.png"]
    for key in orphans:
        s3.client().put_object(Bucket=bucket, Key=key, Body=png())
    await wait_for(lambda: not set(orphans) & set(s3.keys(bucket)), timeout=30)


@pytest.mark.parametrize("code", ["AccessDenied", "NoSuchKey"])
async def test_result_objects_a_bulk_delete_kept_are_removed_by_a_later_sweep(
    make_emulator: EmulatorFactory,
    make_bridge: BridgeFactory,
    s3: S3Server,
    caplog: pytest.LogCaptureFixture,
    code: str,
) -> None:
    """S3's bulk delete answers 200 when it keeps keys, naming each in its Errors: the fetched results
    it kept are tried again, not taken as gone (the orphan sweep would wait for result_ttl + link_ttl).
    A key some S3-compatible store calls NoSuchKey there is gone already: never tried again."""
    bucket = s3.new_bucket()
    async with faulty_s3(s3.url) as proxy:
        client = await make_bridge(
            await make_emulator(),
            storage=f"s3://{bucket}/t",
            s3_endpoint=proxy.url,
            inline_result_kb=0,
            result_ttl=1,
            link_ttl=600,
        )
        await run_job(client, "kept", TINY)
        assert s3.keys(bucket)
        proxy.refuse_deletes = code
        assert len(await read_results(await client.get("/history", params={"clientId": "kept"}))) == 1
        if code == "NoSuchKey":
            await wait_for(lambda: proxy.refused > 0)
            await asyncio.sleep(0.3)  # its answer read (a refusal would be logged by now)
            assert not any("refused deleting" in r.getMessage() for r in caplog.records)
            return
        await wait_for(lambda: any("refused deleting 1 of 1 objects" in r.getMessage() for r in caplog.records))
        assert s3.keys(bucket)
        proxy.refuse_deletes = ""
        await wait_for(lambda: s3.keys(bucket) == [], timeout=30)


async def test_an_upload_streams_into_the_bucket_as_it_arrives(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    """Parts of a large upload reach the bucket while the client is still sending it; the object
    appears, whole, only once all of it has arrived and passed the checks."""
    bucket = s3.new_bucket()
    client = await make_bridge(await make_emulator(), storage=f"s3://{bucket}/t", s3_endpoint=s3.url)
    samples = 20 * 1024 * 1024
    wav = (
        b"RIFF" + struct.pack("<I", 36 + samples) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
    )
    wav += b"data" + struct.pack("<I", samples) + b"\0" * samples
    boundary = "streamed-upload"
    opening = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    half = len(wav) * 3 // 4

    def parts_in_flight() -> int:
        s3c = s3.client()
        uploads = s3c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return sum(
            len(s3c.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", [])) for u in uploads
        )

    async def body() -> AsyncIterator[bytes]:
        yield opening
        for start in range(0, half, 1024 * 1024):
            yield wav[start : min(start + 1024 * 1024, half)]
        await wait_for(lambda: parts_in_flight() >= 1, timeout=30)  # sent on while the client waits
        assert s3.keys(bucket) == []  # nothing visible under its name yet
        yield wav[half:]
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = await client.post(
        "/upload",
        params={"clientId": "streamer"},
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    answer = await resp.json()
    assert resp.status == 200, answer
    (key,) = s3.keys(bucket)
    assert key == f"t/uploads/c-streamer/{answer['file']}"
    assert s3.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == len(wav)


async def test_credentials_refused_at_start_are_one_line_and_exit_2(workdir: Path, s3: S3Server) -> None:
    bucket = s3.new_bucket()
    async with faulty_s3(s3.url) as proxy:
        proxy.fault = "403"
        flags = ["--emulate", "1", "--storage", f"s3://{bucket}", "--s3-endpoint", proxy.url]
        result = await asyncio.to_thread(run_cli, flags, workdir)
    assert_one_line_error(result, f"storage s3://{bucket} cannot be used", "(403: check the credentials)")


async def test_a_result_object_removed_by_other_hands_cuts_the_answer_once_then_the_rest_come(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    """Object storage is not asked about every object before a fetch: an object deleted by hand
    shows when it is read. After the answer began, it is cut off (a short answer would be taken for
    whole, and the results forgotten); the lost job's results are forgotten, the others come next."""
    bucket = s3.new_bucket()
    emulator = await make_emulator()
    client = await make_bridge(emulator, storage=f"s3://{bucket}", s3_endpoint=s3.url, inline_result_kb=0)
    body = {"workflow": "solid", "1/batch_size": 1}
    emulator.engine.faults.video_mb = 2  # too large to be read before the answer: it streams
    jobs = [(await run_job(client, "tampered", body))[-1]["job_id"]]
    emulator.engine.faults.video_mb = 0
    jobs.append((await run_job(client, "tampered", body))[-1]["job_id"])
    (victim,) = [key for key in s3.keys(bucket) if jobs[1] in key]
    s3.client().delete_object(Bucket=bucket, Key=victim)
    resp = await client.get("/history", params={"clientId": "tampered"})
    assert resp.status == 200  # the first job's files were on their way when the second's was missed
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    resp = await client.get("/history", params={"clientId": "tampered"})
    assert len(await read_results(resp)) == 2  # the first job's picture and video
    assert (await client.get("/history", params={"clientId": "tampered"})).status == 204


async def test_a_small_result_object_removed_by_other_hands_is_a_410_before_anything_is_sent(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    """Small results are read whole before the answer: a missing object is said (410, naming its
    job), its job's results are forgotten, and the others come with the next fetch."""
    bucket = s3.new_bucket()
    client = await make_bridge(await make_emulator(), storage=f"s3://{bucket}", s3_endpoint=s3.url, inline_result_kb=0)
    jobs = [(await run_job(client, "tampered", {"workflow": "solid", "1/batch_size": 1}))[-1]["job_id"] for _ in "ab"]
    (victim,) = [key for key in s3.keys(bucket) if jobs[1] in key]
    s3.client().delete_object(Bucket=bucket, Key=victim)
    resp = await client.get("/history", params={"clientId": "tampered"})
    assert resp.status == 410
    assert jobs[1] in (await resp.json())["detail"]
    resp = await client.get("/history", params={"clientId": "tampered"})
    assert [without_job_id(part[1]) for part in await read_results(resp)] == ["wf_b_empty_00001_.png"]
    assert (await client.get("/history", params={"clientId": "tampered"})).status == 204


class ListingRefusedS3(FaultyS3):
    """Passes everything through but a bucket listing, which it answers with `fault` (a store that
    answers the bucket's HEAD, then a 503 SlowDown or a 500 on the next request)."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.fault is not None and request.method == "GET" and "list-type" in request.query:
            self.refused += 1
            return web.Response(
                status=FAULTS[self.fault][0],
                body=f"<Error><Code>{FAULTS[self.fault][1]}</Code><Message>refused</Message></Error>".encode(),
                content_type="application/xml",
            )
        fault, self.fault = self.fault, None  # (nothing else is in flight at start-up: HEAD, then the listing)
        try:
            return await super()._handle(request)
        finally:
            self.fault = fault


async def test_a_store_refusing_the_listing_at_start_up_is_one_line_and_exit_2(workdir: Path, s3: S3Server) -> None:
    """The bucket answers its HEAD, then refuses (503 SlowDown) the listing start-up reads: one line,
    exit 2, as for any bucket that cannot be used at start-up."""
    bucket = s3.new_bucket()
    proxy = ListingRefusedS3(s3.url)
    await proxy.start()
    try:
        proxy.fault = "503"
        flags = ["--emulate", "1", "--storage", f"s3://{bucket}", "--s3-endpoint", proxy.url, "--s3-timeout", "1"]
        result = await asyncio.to_thread(run_cli, flags, workdir)
    finally:
        await proxy.stop()
    assert proxy.refused
    assert_one_line_error(result, f"storage s3://{bucket} cannot be used")


@pytest.mark.parametrize("fault", ["403", "503"])
async def test_links_asked_of_a_store_in_trouble_are_a_503_that_keeps_the_results(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server, fault: str
) -> None:
    """A store refusing (5xx, wrong credentials) answers 503 for a fetch as links too: they were signed
    without asking the store, answered 200, and the results counted as fetched."""
    bucket = s3.new_bucket()
    async with faulty_s3(s3.url) as proxy:
        client = await make_bridge(
            await make_emulator(), storage=f"s3://{bucket}/l", s3_endpoint=proxy.url, s3_timeout=0.5, inline_result_kb=0
        )
        frames = await run_job(client, "linked", TINY)
        assert frames[-1]["status"] == "closed", frames[-1]
        proxy.fault = fault
        resp = await client.get("/history", params={"clientId": "linked", "resType": "url"})
        answer = await resp.json()
        proxy.fault = None
        assert resp.status == 503, answer
        resp = await client.get("/history", params={"clientId": "linked"})
        assert resp.status == 200  # nothing was forgotten
        assert len(await read_results(resp)) == 1


async def test_links_to_result_objects_removed_by_other_hands_are_not_handed_out(
    make_emulator: EmulatorFactory, make_bridge: BridgeFactory, s3: S3Server
) -> None:
    """A result object removed by other hands is a `410` naming its job when asked for as links too
    (a HEAD each), never a link to nothing answered 200."""
    bucket = s3.new_bucket()
    client = await make_bridge(
        await make_emulator(), storage=f"s3://{bucket}/l", s3_endpoint=s3.url, inline_result_kb=0
    )
    job_id = (await run_job(client, "gone", TINY))[-1]["job_id"]
    (victim,) = s3.keys(bucket)
    s3.client().delete_object(Bucket=bucket, Key=victim)
    resp = await client.get("/history", params={"clientId": "gone", "resType": "url"})
    answer = await resp.json()
    if resp.status == 200:
        async with aiohttp.ClientSession() as session, session.get(answer["files"][0]["url"]) as got:
            assert got.status == 200, f"the bridge handed out a dead link ({got.status}) for job {job_id}"
    assert resp.status == 410, answer
    assert job_id in answer["detail"]


@pytest.mark.parametrize("ttl", ["0.5", str(8 * 86400)])
def test_a_link_ttl_that_s3_would_not_sign_is_refused(tmp_path: Path, ttl: str) -> None:
    """SigV4 presigned links live 1 s to a week: S3 refuses a longer `X-Amz-Expires`, and 0.5 s was
    signed as 0 (expired when handed out)."""
    with pytest.raises(ConfigError, match="604800"):
        load_settings(["--link-ttl", ttl], environ={}, cwd=tmp_path)
