"""Which S3 client for the bridge: CPU per small object's round (PUT, HEAD, GET, DELETE) and the
memory a large object's streamed PUT and GET take, for each candidate, against moto's S3 server
in a process of its own. Each candidate runs in a fresh process of its own.

    pip install obstore            # the candidates beside aiobotocore and boto3
    python bench/s3_clients.py [--small 300] [--large-mb 256] [--json]

The figures are in bench/RESULTS.md ("Choosing the S3 client")."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

CANDIDATES = ("aiobotocore", "boto3-threads", "obstore")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
SMALL = 64 * 1024
CHUNK = 256 * 1024
PART = 8 * 1024 * 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def source(total: int) -> AsyncIterator[bytes]:
    block = os.urandom(CHUNK)
    for _ in range(total // CHUNK):
        yield block


async def in_parts(chunks: AsyncIterator[bytes], send: Callable[[int, bytes], Awaitable[str]]) -> list[dict[str, Any]]:
    """Regroup `chunks` into PART-sized parts, send each (`send(number, body)` -> its ETag)."""
    parts: list[dict[str, Any]] = []
    held = bytearray()
    async for chunk in chunks:
        held += chunk
        if len(held) >= PART:
            parts.append({"ETag": await send(len(parts) + 1, bytes(held)), "PartNumber": len(parts) + 1})
            held.clear()
    if held:
        parts.append({"ETag": await send(len(parts) + 1, bytes(held)), "PartNumber": len(parts) + 1})
    return parts


class Client:
    """put(key, bytes), head(key) -> size, get(key) -> bytes, delete(key), put_stream(key, chunks),
    get_stream(key) -> bytes read (chunk by chunk, nothing kept)."""

    put: Callable[[str, bytes], Awaitable[None]]
    head: Callable[[str], Awaitable[int]]
    get: Callable[[str], Awaitable[bytes]]
    delete: Callable[[str], Awaitable[None]]
    put_stream: Callable[[str, AsyncIterator[bytes]], Awaitable[None]]
    get_stream: Callable[[str], Awaitable[int]]


async def aiobotocore_client(endpoint: str, bucket: str, stack: Any) -> Client:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(signature_version="s3v4", s3={"addressing_style": "path"}, max_pool_connections=64)
    s3 = await stack.enter_async_context(get_session().create_client("s3", endpoint_url=endpoint, config=config))
    c = Client()

    async def put(key: str, data: bytes) -> None:
        await s3.put_object(Bucket=bucket, Key=key, Body=data)

    async def head(key: str) -> int:
        return int((await s3.head_object(Bucket=bucket, Key=key))["ContentLength"])

    async def get(key: str) -> bytes:
        answer = await s3.get_object(Bucket=bucket, Key=key)
        async with answer["Body"] as body:
            return bytes(await body.read())

    async def delete(key: str) -> None:
        await s3.delete_object(Bucket=bucket, Key=key)

    async def put_stream(key: str, chunks: AsyncIterator[bytes]) -> None:
        upload = (await s3.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]

        async def send(number: int, body: bytes) -> str:
            sent = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=body)
            return str(sent["ETag"])

        parts = await in_parts(chunks, send)
        await s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})

    async def get_stream(key: str) -> int:
        answer = await s3.get_object(Bucket=bucket, Key=key)
        body, size = answer["Body"], 0
        while chunk := await body.read(CHUNK):
            size += len(chunk)
        body.close()
        return size

    c.put, c.head, c.get, c.delete, c.put_stream, c.get_stream = put, head, get, delete, put_stream, get_stream
    return c


async def boto3_client(endpoint: str, bucket: str, stack: Any) -> Client:
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}, max_pool_connections=64)
    )
    run = asyncio.to_thread
    c = Client()

    async def put(key: str, data: bytes) -> None:
        await run(s3.put_object, Bucket=bucket, Key=key, Body=data)

    async def head(key: str) -> int:
        return int((await run(s3.head_object, Bucket=bucket, Key=key))["ContentLength"])

    async def get(key: str) -> bytes:
        answer = await run(s3.get_object, Bucket=bucket, Key=key)
        return bytes(await run(answer["Body"].read))

    async def delete(key: str) -> None:
        await run(s3.delete_object, Bucket=bucket, Key=key)

    async def put_stream(key: str, chunks: AsyncIterator[bytes]) -> None:
        upload = (await run(s3.create_multipart_upload, Bucket=bucket, Key=key))["UploadId"]

        async def send(number: int, body: bytes) -> str:
            sent = await run(s3.upload_part, Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=body)
            return str(sent["ETag"])

        parts = await in_parts(chunks, send)
        await run(
            s3.complete_multipart_upload, Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )

    async def get_stream(key: str) -> int:
        answer = await run(s3.get_object, Bucket=bucket, Key=key)
        body, size = answer["Body"], 0
        while chunk := await run(body.read, CHUNK):
            size += len(chunk)
        return size

    c.put, c.head, c.get, c.delete, c.put_stream, c.get_stream = put, head, get, delete, put_stream, get_stream
    return c


async def obstore_client(endpoint: str, bucket: str, stack: Any) -> Client:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        region="us-east-1",
        access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )
    c = Client()

    async def put(key: str, data: bytes) -> None:
        await obstore.put_async(store, key, data)

    async def head(key: str) -> int:
        return int((await obstore.head_async(store, key))["size"])

    async def get(key: str) -> bytes:
        return bytes(await (await obstore.get_async(store, key)).bytes_async())

    async def delete(key: str) -> None:
        await obstore.delete_async(store, key)

    async def put_stream(key: str, chunks: AsyncIterator[bytes]) -> None:
        await obstore.put_async(store, key, chunks, chunk_size=PART)

    async def get_stream(key: str) -> int:
        size = 0
        async for chunk in (await obstore.get_async(store, key)).stream(min_chunk_size=CHUNK):
            size += len(chunk)
        return size

    c.put, c.head, c.get, c.delete, c.put_stream, c.get_stream = put, head, get, delete, put_stream, get_stream
    return c


MAKERS = {"aiobotocore": aiobotocore_client, "boto3-threads": boto3_client, "obstore": obstore_client}


async def measure(name: str, endpoint: str, bucket: str, small: int, large: int) -> dict[str, Any]:
    import contextlib

    async with contextlib.AsyncExitStack() as stack:
        client = await MAKERS[name](endpoint, bucket, stack)
        data = os.urandom(SMALL)
        await client.put("warm", data)  # connections and imports before the clock starts
        await client.delete("warm")
        cpu, wall = time.process_time(), time.perf_counter()
        for n in range(small):
            key = f"small/{name}/{n}"
            await client.put(key, data)
            assert await client.head(key) == SMALL
            assert len(await client.get(key)) == SMALL
            await client.delete(key)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        base = rss_mb()
        peak = 0.0
        key = f"large/{name}"

        async def watched(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            nonlocal peak
            async for chunk in chunks:
                peak = max(peak, rss_mb() - base)
                yield chunk

        await client.put_stream(key, watched(source(large)))
        put_peak = peak
        got = await client.get_stream(key)
        assert got == large, (got, large)
        await client.delete(key)
    return {
        "client": name,
        "cpu_ms_per_round": round(cpu * 1000 / small, 2),
        "wall_ms_per_round": round(wall * 1000 / small, 2),
        "large_put_rss_growth_mb": round(put_peak, 1),
        "large_peak_rss_growth_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 1),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=300, help="rounds of a 64 KiB object")
    parser.add_argument("--large-mb", type=int, default=256, help="MB of the streamed object")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this candidate here
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    if args.one:
        result = asyncio.run(measure(args.one, args.endpoint, args.bucket, args.small, args.large_mb * 1024 * 1024))
        print(json.dumps(result))
        return
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        bucket = "bench-" + uuid.uuid4().hex[:8]
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        results = []
        for name in CANDIDATES:
            command = [sys.executable, __file__, "--one", name, "--endpoint", endpoint, "--bucket", bucket]
            command += ["--small", str(args.small), "--large-mb", str(args.large_mb)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                results.append({"client": name, "error": done.stderr.strip().splitlines()[-1]})
            else:
                results.append(json.loads(done.stdout))
    finally:
        server.terminate()
        server.wait()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(r)


if __name__ == "__main__":
    main()
