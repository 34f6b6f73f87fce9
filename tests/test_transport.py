"""The HTTP edge against what a client can do with bytes on the wire: compressed bombs inflated only
to the limit, bodies that trickle, `Expect: 100-continue` with a size that will be refused."""

from __future__ import annotations

import asyncio
import contextlib
import io
import zlib
from typing import Any

import orjson
import pytest

from comfybridge.edge import bodies

from .conftest import BridgeFactory, EmulatorFactory
from .helpers import Client, generate, gzip_bomb

TINY = {"workflow": "solid", "1/width": 8, "1/batch_size": 1}


async def exchange(client: Client, request: bytes, trickle: bytes = b"", every: float = 0.0) -> bytes:
    """Send raw bytes on a connection of its own, then `trickle` a byte at a time until the answer
    comes; the raw answer."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)

    async def dribble() -> None:
        for byte in trickle:
            await asyncio.sleep(every)
            writer.write(bytes([byte]))
            await writer.drain()

    sending = asyncio.create_task(dribble())
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(65536), 20)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()


async def test_a_gzip_bomb_is_inflated_only_up_to_the_limit(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_bridge(await make_emulator(), max_json_mb=1)
    inflated: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, wbits: int) -> None:
            self.inner = real(wbits)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self.inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(bodies.zlib, "decompressobj", Counting)
    bomb = gzip_bomb(2000)  # 2 MB of gzip that would be 2 GB of JSON
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    resp = await client.post(
        "/generate-based-workflow", params={"clientId": "bomb"}, data=io.BytesIO(bomb), headers=headers
    )
    assert resp.status == 413
    assert await resp.json() == {"detail": "The request body is larger than the limit of 1 MB."}
    assert sum(inflated) <= 1024 * 1024 + 1  # never a byte more than needed to know
    status, _ = await generate(client, "after", TINY)
    assert status == 200
    # Both encodings ComfyUI clients send work when they are small enough.
    for coding, packer in (("gzip", zlib.compressobj(6, zlib.DEFLATED, 31)), ("deflate", zlib.compressobj())):
        body = packer.compress(orjson.dumps(TINY)) + packer.flush()
        headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
        resp = await client.post("/generate-based-workflow", params={"clientId": coding}, data=body, headers=headers)
        assert resp.status == 200, coding
    resp = await client.post(
        "/generate-based-workflow",
        params={"clientId": "br"},
        data=b"\x00",
        headers={"Content-Encoding": "br", "Content-Type": "application/json"},
    )
    assert resp.status == 415
    cut = zlib.compress(orjson.dumps(TINY))[:-6]
    resp = await client.post(
        "/generate-based-workflow",
        params={"clientId": "cut"},
        data=cut,
        headers={"Content-Encoding": "deflate", "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert await resp.json() == {"detail": "The request body could not be read: its deflate data is cut short."}


async def test_a_body_that_trickles_is_refused_with_408(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    client = await make_bridge(await make_emulator(), body_timeout=0.5)
    body = orjson.dumps(TINY)
    head = (
        b"POST /generate-based-workflow?clientId=slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    answer = await exchange(client, head, trickle=body, every=0.1)
    assert answer.startswith(b"HTTP/1.1 408 ")
    detail = orjson.loads(answer.partition(b"\r\n\r\n")[2])["detail"]
    assert detail.startswith("The request body arrived too slowly: ")
    assert detail.endswith(": it may take 0.5 s (body_timeout), and 1 s more for every 64 KB.")
    # An upload too: its parts are read under the same clock.
    boundary = b"b0undary"
    part = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    answer = await exchange(client, head, trickle=part + b"\x89PNG" * 100, every=0.05)
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_expect_100_continue_is_not_promised_to_a_body_that_will_be_refused(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    client = await make_bridge(await make_emulator())
    refused = {
        413: b"/upload?clientId=big\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 10737418240",
        415: b"/generate-based-workflow?clientId=t\r\nContent-Type: text/plain\r\nContent-Length: 20",
        400: b"/upload?clientId=a&clientId=b\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 20",
    }
    for status, head in refused.items():
        path, _, rest = head.partition(b"\r\n")
        request = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + rest + b"\r\nExpect: 100-continue\r\n\r\n"
        answer = await exchange(client, request)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:40]
        assert b"100 Continue" not in answer
        if status == 413:
            assert orjson.loads(answer.partition(b"\r\n\r\n")[2]) == {
                "detail": "The upload is larger than the limit of 500 MB."
            }
    for head in (
        b"POST /generate-based-workflow?clientId=bad%20id HTTP/1.1\r\nContent-Type: application/json\r\n",
        b"POST /free HTTP/1.1\r\n",  # reads no body at all
        b"POST /interrupt?clientId=x HTTP/1.1\r\n",
    ):
        answer = await exchange(
            client, head + b"Host: x\r\nContent-Length: 10737418240\r\nExpect: 100-continue\r\n\r\n"
        )
        assert b"100 Continue" not in answer, head
        assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 200", b"HTTP/1.1 503")), answer[:40]
    # An expectation other than 100-continue: refused in JSON, as every error, and nothing read.
    answer = await exchange(
        client,
        b"POST /generate-based-workflow?clientId=t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 20\r\nExpect: 200-maybe\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 417 ")
    assert "200-maybe" in orjson.loads(answer.partition(b"\r\n\r\n")[2])["detail"]
    # A body that will be read is promised, then read.
    body = orjson.dumps(TINY)
    fine = (
        b"POST /generate-based-workflow?clientId=ok HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(fine)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def test_expect_100_continue_is_not_promised_past_keys_rates_types_or_query_that_refuse(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """The refusals that came after a `100 Continue` (the expectation is answered before any
    middleware runs): no key or a wrong one (401), an upload that is not multipart or names no
    boundary (400), a bad `wait` or `resType` (400), a rate spent (429)."""
    key = "k" * 32
    client = await make_bridge(await make_emulator(), api_keys=(key,))
    auth = b"Authorization: Bearer " + key.encode()
    json_type = b"Content-Type: application/json"

    async def expecting(client: Client, path: bytes, headers: bytes) -> bytes:
        return await exchange(
            client,
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\nContent-Length: 100000\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n",
        )

    refused = [
        (401, b"/upload", b"Content-Type: multipart/form-data; boundary=b"),
        (401, b"/generate-based-workflow?clientId=a", json_type + b"\r\nAuthorization: Bearer wrong"),
        (400, b"/upload", b"Content-Type: text/plain\r\n" + auth),
        (400, b"/upload", b"Content-Type: multipart/form-data\r\n" + auth),
        (400, b"/generate-based-workflow?clientId=a&wait=7", json_type + b"\r\n" + auth),
        (400, b"/generate-based-workflow?clientId=a&wait=1&resType=zip", json_type + b"\r\n" + auth),
    ]
    for status, path, headers in refused:
        answer = await expecting(client, path, headers)
        assert answer.startswith(b"HTTP/1.1 %d " % status), (path, answer[:60])
        assert b"100 Continue" not in answer, path
    limited = await make_bridge(await make_emulator(), ip_rate_limit=0.01, rate_burst=1)
    assert (await limited.get("/health")).status == 200  # the address's one request
    answer = await expecting(limited, b"/generate-based-workflow?clientId=a", json_type)
    assert answer.startswith(b"HTTP/1.1 429 "), answer[:60]
    assert b"100 Continue" not in answer


async def test_expect_100_continue_is_promised_to_a_caller_with_a_good_key(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    key = "k" * 32
    client = await make_bridge(await make_emulator(), api_keys=(key,))
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(
            b"POST /generate-based-workflow?clientId=a&wait=0 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 100 Continue")
    finally:
        writer.close()


@pytest.mark.parametrize("wbits", [-zlib.MAX_WBITS, zlib.MAX_WBITS, 16 + zlib.MAX_WBITS])
def test_inflating_in_slices_reads_everything_zlib_holds_back(wbits: int) -> None:
    """A slice that fills up as the input runs out may leave output inside zlib (raw deflate has no
    trailer to make it read on): every slice size, chunking and length gives the whole body back."""
    data = orjson.dumps({"workflow": "solid", "pad": "".join(chr(97 + (i * 7919) % 23) for i in range(5000))})
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    packed = packer.compress(data) + packer.flush()
    for size in range(7, 200, 3):
        for chunking in (len(packed), 61, 1):
            inflater = zlib.decompressobj(wbits)
            out = b"".join(
                piece
                for start in range(0, len(packed), chunking)
                for piece in bodies.inflated(inflater, packed[start : start + chunking], len(data) + 1, size)
            )
            assert (out, inflater.eof) == (data, True), (size, chunking)
