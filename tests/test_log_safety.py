"""Logs a hostile client cannot use: no API key in any line, text or JSON, and no forged lines."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
import string
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import http_parser, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidHeader, InvalidURLError, LineTooLong
from hypothesis import given
from hypothesis import strategies as st

from comfybridge.edge.logs import REDACTED, JsonFormatter, TextFormatter, one_line, quiet_bad_requests, redact, refusal

from .conftest import FIXTURES, BridgeFactory, EmulatorFactory, wait_for
from .fake_comfy import FakeComfy
from .helpers import bridge_process, generate, poll_status
from .services import unused_port

KEY = "live-key-0123456789abcdef"  # the bridge's one key: clients with a broken request still send it
WRONG = "wrong-key-fedcba9876543210"
S = "s3cr3t-VALUE-0123456789"
HOOK_TOKEN = "receiver-token-42424242"  # a webhook receiver's, in the URL a client gives

# (what a log line may hold, what it must become)
SHAPES = {
    "query": (f"GET /ws?token={S}&clientId=a HTTP/1.1", f"GET /ws?token={REDACTED}&clientId=a HTTP/1.1"),
    "query last": (f"/workflow-thumbnail?workflow=x&token={S}", f"/workflow-thumbnail?workflow=x&token={REDACTED}"),
    "other query names": (
        f"https://hook.example/x?key={S}&api_key={S}&access_token={S}#f",
        f"https://hook.example/x?key={REDACTED}&api_key={REDACTED}&access_token={REDACTED}#f",
    ),
    "a secret": (f"/oauth?client_secret={S}&password={S}", f"/oauth?client_secret={REDACTED}&password={REDACTED}"),
    "too long line": (f"bytearray(b'/ws?token={S}&x=aaaa...')", f"bytearray(b'/ws?token={REDACTED}&x=aaaa...')"),
    "bearer in bytes": (f"b'Authorization: Bearer {S}\\x01'", f"b'Authorization: Bearer {REDACTED}'"),
    "x-api-key in bytes": (f"b'X-API-Key: {S}\\r'", f"b'X-API-Key: {REDACTED}\\r'"),
    "raw headers": (
        f"GET / HTTP/1.1\r\nHost: x\r\nauthorization: basic {S}\r\nx-api-key: {S}\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: x\r\nauthorization: basic {REDACTED}\r\nx-api-key: {REDACTED}\r\n\r\n",
    ),
    "raw headers in bytes": (
        f"b'GET / HTTP/1.1\\r\\nAuthorization: Bearer {S}\\r\\nX-API-Key: {S}\\r\\nHost: x\\r\\n\\r\\n'",
        f"b'GET / HTTP/1.1\\r\\nAuthorization: Bearer {REDACTED}\\r\\nX-API-Key: {REDACTED}\\r\\nHost: x\\r\\n\\r\\n'",
    ),
    "header dict": (
        f"<CIMultiDictProxy('Host': 'x', 'Authorization': 'Bearer {S}', 'X-API-Key': '{S}')>",
        f"<CIMultiDictProxy('Host': 'x', 'Authorization': 'Bearer {REDACTED}', 'X-API-Key': '{REDACTED}')>",
    ),
    "header json": (f'{{"x-api-key": "{S}", "host": "x"}}', f'{{"x-api-key": "{REDACTED}", "host": "x"}}'),
    "no scheme": (f"Authorization: {S}", f"Authorization: {REDACTED}"),
    "credentials with spaces": (f"Authorization: Bearer {S} {S}", f"Authorization: Bearer {REDACTED}"),
    "bare bearer": (f"b'Bearer {S}...'", f"b'Bearer {REDACTED}'"),
    "quote in a bytes repr": (f'b"Authorization: Bearer it\'s-{S}"', f'b"Authorization: Bearer {REDACTED}"'),
    "keyword argument": (f"Settings(webhook_secret='{S}')", f"Settings(webhook_secret='{REDACTED}')"),
    "its neighbours left alone": (
        f"GET /ws?monkey=1&cache_key=2&token={S}&tokens=3 from 10.0.0.1: This API key may not",
        f"GET /ws?monkey=1&cache_key=2&token={REDACTED}&tokens=3 from 10.0.0.1: This API key may not",
    ),
}


@pytest.mark.parametrize(("text", "redacted"), SHAPES.values(), ids=SHAPES.keys())
def test_every_shape_of_a_key_is_redacted(text: str, redacted: str) -> None:
    assert redact(text) == redacted
    assert redact(redacted) == redacted


# What keys are made of as clients send them: a header's value may hold spaces inside (the parser
# strips its ends); a query's is percent-encoded, so holds no space, & or #. A quote or a backslash
# in a key could end the redaction early: keys here have neither. Each holds a ~, which no text
# around it has: a key found in a line is a key leaked, not a coincidence.
HEADER_KEY = st.text(string.ascii_letters + string.digits + " -._~+/=!$%*@^&#()[]{}|;:,<>?", min_size=16).map(
    lambda key: f"{key[:8]}~{key[8:]}".strip()
)
QUERY_KEY = st.text(string.ascii_letters + string.digits + "-._~+/=%!$*", min_size=16).map(
    lambda key: f"{key[:8]}~{key[8:]}"
)
HEADER_SHAPES: list[Callable[[str], str]] = [
    lambda k: f"Authorization: Bearer {k}",
    lambda k: f"authorization:{k}",
    lambda k: f"X-API-Key: {k}\r\nHost: x",
    lambda k: repr(f"Host: x\r\nX-Api-Key: {k}\x01\r\n".encode()),
    lambda k: repr(f"Authorization: Bearer {k}\r".encode()),
    lambda k: str({"Authorization": f"Bearer {k}", "Host": "x"}),
    lambda k: orjson.dumps({"X-API-Key": k}).decode(),
    lambda k: f"b'Bearer {k}...'",
]
QUERY_SHAPES: list[Callable[[str], str]] = [
    lambda k: f"GET /ws?clientId=a&token={k} HTTP/1.1",
    lambda k: repr(bytearray(f"/workflow-thumbnail?token={k}&workflow=x".encode())),
    lambda k: f"https://hook.example/in?api_key={k}",
    lambda k: f"key={k}",
]


@given(key=HEADER_KEY, shape=st.sampled_from(HEADER_SHAPES))
def test_no_header_key_survives(key: str, shape: Callable[[str], str]) -> None:
    assert key not in redact(shape(key))


@given(key=QUERY_KEY, shape=st.sampled_from(QUERY_SHAPES))
def test_no_query_key_survives(key: str, shape: Callable[[str], str]) -> None:
    assert key not in redact(shape(key))


@given(st.text())
def test_a_text_record_is_one_line_whatever_its_message(message: str) -> None:
    record = logging.LogRecord("comfybridge.access", logging.INFO, __file__, 1, "GET %s 404", (message,), None)
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert not [c for c in one_line(message) if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


def record_with_a_traceback(name: str, **extra: object) -> logging.LogRecord:
    try:
        raise ValueError(f"bad header X-API-Key: {S}\r\n2026-01-01 00:00:00,000 INFO forged\x1b[2J")
    except ValueError:
        exc_info = sys.exc_info()
    return logging.makeLogRecord(
        {"name": name, "levelno": logging.ERROR, "levelname": "ERROR", "msg": "Error handling %s from %s",
         "args": (f"/ws?token={S}", "10.0.0.1"), "exc_info": exc_info, **extra}
    )  # fmt: skip


def test_text_lines_are_redacted_and_escaped_tracebacks_too() -> None:
    # exc_text: what another handler's formatter may have left on the record, unredacted
    text = TextFormatter().format(record_with_a_traceback("aiohttp.web", exc_text=f"cached: {S}"))
    assert S not in text
    first, *trace = text.splitlines()
    assert first.endswith(f"ERROR aiohttp.web: Error handling /ws?token={REDACTED} from 10.0.0.1")
    assert trace[0] == "Traceback (most recent call last):"  # a traceback keeps its own lines
    assert trace[-1] == f"ValueError: bad header X-API-Key: {REDACTED}\\r\\n2026-01-01 00:00:00,000 INFO forged\\x1b[2J"
    assert "\x1b" not in text


def test_json_lines_are_redacted_fields_and_tracebacks_too() -> None:
    fields = {"url": f"https://hook.example/?token={S}", "hops": [f"Bearer {S}"], "status": 401}
    line = JsonFormatter().format(record_with_a_traceback("aiohttp.server", fields=fields))
    assert S not in line
    parsed = orjson.loads(line)
    assert parsed["message"] == f"Error handling /ws?token={REDACTED} from 10.0.0.1"
    assert parsed["url"] == f"https://hook.example/?token={REDACTED}"
    assert (parsed["hops"], parsed["status"]) == ([f"Bearer {REDACTED}"], 401)
    assert f"ValueError: bad header X-API-Key: {REDACTED}\r\n2026" in parsed["exception"]


def test_bytes_that_are_not_utf_8_leave_a_line_all_the_same() -> None:
    # aiohttp's pure Python parser keeps such bytes of a path as lone surrogates; UTF-8 cannot hold them
    record = logging.makeLogRecord(
        {"msg": "GET %s 404", "args": (f"/y\udcff?token={S}",), "fields": {"route": "/y\udcff\udced"}}
    )
    parsed = orjson.loads(JsonFormatter().format(record))
    assert (parsed["message"], parsed["route"]) == (f"GET /y\\udcff?token={REDACTED} 404", "/y\\udcff\\udced")
    text = TextFormatter().format(record)
    assert text.endswith(f"GET /y\\udcff?token={REDACTED} 404")
    text.encode()  # any stream can take it


# What aiohttp's parsers raise (the C one and the pure Python one), with a key in the bytes they quote.
HEADER_QUOTED = repr(f"X-API-Key: {S}".encode())
VALUE_QUOTED = repr(S[8:].encode() + b"\x01")  # a header's second packet: its name was in the first
REFUSALS = [
    (BadHttpMessage(f"Invalid header value char:\n\n  {HEADER_QUOTED}\n  ^"), "Invalid header value char"),
    (BadHttpMessage(f"Invalid header value char:\n\n  {VALUE_QUOTED}\n  ^"), "Invalid header value char"),
    (LineTooLong(f"Bearer {S}".encode() + b"a" * 90 + b"...", 8190), "Got more than 8190 bytes when reading"),
    (LineTooLong(S.encode() + b"...", 8190), "Got more than 8190 bytes when reading"),  # a header's bare value
    (InvalidHeader(S.encode() + b"\x00"), "Invalid HTTP header"),
    (BadStatusLine(f"GET /ws?token={S} HTTP/9"), f"Bad status line 'GET /ws?token={REDACTED} HTTP/9'"),
    (InvalidURLError(f"/ws?token={S}&x=" + "a" * 300), f"/ws?token={REDACTED}&x=" + "a" * 177 + "..."),
]


@pytest.mark.parametrize(("error", "said"), REFUSALS)
def test_a_refusal_names_the_fault_not_the_bytes(error: BadHttpMessage, said: str) -> None:
    assert refusal(error) == said
    record = logging.makeLogRecord(
        {"name": "aiohttp.server", "levelno": logging.ERROR, "msg": "Error handling request from %s",
         "args": ("10.0.0.1",), "exc_info": (type(error), error, None)}
    )  # fmt: skip
    assert quiet_bad_requests(record)
    assert (record.levelno, record.getMessage(), record.exc_info) == (
        logging.INFO, f"refused a malformed request: {said}", None
    )  # fmt: skip


async def send(url: str, *chunks: bytes) -> bytes:
    """Bytes straight onto a socket, chunk by chunk (each its own packet); the status line of the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.05)
        return (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n")[0]
    finally:
        writer.close()


HEAD = b"GET /workflow-list HTTP/1.1\r\nHost: x\r\n"
CLOSE = b"Connection: close\r\n\r\n"
MALFORMED = [
    (b"GET /ws?token=" + KEY.encode() + b"&clientId=a&pad=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",),
    (b"GET /ws?token=" + KEY.encode() + b" HTTP/1.x\r\nHost: x\r\n\r\n",),  # the Python parser quotes the line
    (HEAD + b"Authorization: Bearer " + KEY.encode() + b"\x01\r\n\r\n",),
    (HEAD + b"X-API-Key: " + KEY.encode() + b"\r\r\n\r\n",),  # a bare CR
    (HEAD + b"X-API-Key: " + KEY[:9].encode(), KEY[9:].encode() + b"\x01\r\n\r\n"),  # its name in the first packet
    (HEAD + b"X-API-Key: " + KEY.encode() + b"b" * 9000 + b"\r\n\r\n",),
]


@pytest.mark.parametrize("parser", ["C", "Python"])
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_hostile_client_leaves_no_key_and_no_forged_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_format: str, parser: str
) -> None:
    shutil.copytree(FIXTURES / "workflows", tmp_path / "workflows")
    if parser == "Python":
        monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")  # aiohttp's pure Python parser, with its own messages
    args = ("--emulate", "1", "--api-keys", KEY, "--log-format", log_format)
    args += ("--webhook-secret", "signing-secret-0123", "--webhook-allow-private", "true")
    hook = f"http://127.0.0.1:{unused_port()}/hook?token={HOOK_TOKEN}"  # nothing listens: its failures are logged
    async with bridge_process(tmp_path, *args, ready="/health") as (proc, url):
        for chunks in MALFORMED:
            assert (await send(url, *chunks)).startswith(b"HTTP/1.0 400"), chunks[0][:60]
        wrong_header = HEAD + b"X-API-Key: " + WRONG.encode() + b"\r\n" + CLOSE
        assert (await send(url, wrong_header)).endswith(b"401 Unauthorized")
        wrong_token = b"GET /ws?token=" + WRONG.encode() + b" HTTP/1.1\r\nHost: x\r\n" + CLOSE
        assert (await send(url, wrong_token)).endswith(b"401 Unauthorized")
        forged = b"GET /x%0d%0aINFO%20forged%1b[31m HTTP/1.1\r\nHost: x\r\n" + CLOSE
        assert (await send(url, forged)).endswith(b"401 Unauthorized")
        async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as session:
            body = {"workflow": "solid", "1/batch_size": 1, "_webhook": hook}
            async with session.post(f"{url}/generate-based-workflow", params={"clientId": "c"}, json=body) as resp:
                assert resp.status == 200, await resp.text()
        await wait_for(lambda: "/hook?token=" in (tmp_path / "bridge.log").read_text())
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    log = (tmp_path / "bridge.log").read_text()
    for secret in (KEY, KEY[9:], WRONG, HOOK_TOKEN):
        assert secret not in log
    assert f"/hook?token={REDACTED} failed" in log  # the bridge's own lines are redacted too
    assert "\x1b" not in log
    lines = log.splitlines()
    if log_format == "json":
        records = [orjson.loads(line) for line in lines]  # one record a line, every line
        messages = [r["message"] for r in records]
        assert any(r.get("route") == "/x\r\nINFO forged\x1b[31m" and r["status"] == 401 for r in records)
    else:
        messages = [line.partition(": ")[2] for line in lines]
        assert not [line for line in lines if line.startswith("INFO forged")]
        assert any(m.startswith(r"GET /x\r\nINFO forged\x1b[31m 401 ") for m in messages)
    assert sum(m.startswith("refused a malformed request: ") for m in messages) == len(MALFORMED)
    assert sum(m.startswith(("GET /workflow-list 401", "GET /ws 401")) for m in messages) == 2


async def test_metrics_never_show_a_backends_password(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory
) -> None:
    """A backend's URL may carry a password: /health and /metrics name it without, the job
    histograms and busy counters included."""
    emulator = await make_emulator()
    client = await make_bridge(emulator.url.replace("http://", "http://comfy:s3cretpassw0rd@"))
    status, _ = await generate(client, "m-1", {"workflow": "solid", "1/batch_size": 1})
    assert status == 200
    await poll_status(client, "m-1", {"closed"}, timeout=20)
    for path in ("/health", "/metrics"):
        text = await (await client.get(path)).text()
        assert "s3cretpassw0rd" not in text, [line for line in text.splitlines() if "s3cret" in line][:3]
    assert 'backend="http://comfy@127.0.0.1' in text  # the job histograms are there, named without it


async def test_a_jobs_error_never_shows_a_backends_password(make_fake: Any, make_bridge: BridgeFactory) -> None:
    """A job's error (its socket, /execution-info, its webhook) names the backend without the
    password its URL carries."""
    fake: FakeComfy = await make_fake(pace=0.1)
    client = await make_bridge(
        fake.url.replace("http://", "http://comfy:s3cretpassw0rd@"), result_retries=2, backend_grace=30
    )
    status, _ = await generate(client, "victim", {"workflow": "slow", "2/seed": 2})
    assert status == 200
    await wait_for(lambda: bool(fake.upstream.engine.started))
    fake.replace("GET /history/*", 200, "<html>proxy error page, not JSON at all</html>", times=10)
    await fake.drop_sockets()  # its events are missed now: the outcome must come from /history
    info = await poll_status(client, "victim", {"closed", "error"}, timeout=30)
    assert info["status"] == "error"
    assert "http://comfy@127.0.0.1" in info["detail"]
    assert "s3cretpassw0rd" not in info["detail"]


async def test_malformed_content_dispositions_leave_no_raw_line_and_nothing_kept(tmp_path: Path) -> None:
    """aiohttp warns of a malformed Content-Disposition (the client's fault, answered 400): under
    Python's default filters each distinct header went raw to stderr, past the formatter, and was
    kept in the warnings registry for the life of the process. A real process, its log in JSON."""
    shutil.copytree(FIXTURES / "workflows", tmp_path / "workflows")
    async with (
        bridge_process(tmp_path, "--emulate", "1", "--log-format", "json") as (_, url),
        aiohttp.ClientSession() as session,
    ):
        for n in range(10):
            form = aiohttp.MultipartWriter("form-data")
            form.append(b"\x89PNG\r\n").headers["Content-Disposition"] = (
                f'form-data; name="f"; filename="{n}-{S}.png"; filename="b.png"'
            )
            async with session.post(f"{url}/upload", data=form) as resp:
                assert resp.status == 400
                assert "detail" in await resp.json()
    lines = (tmp_path / "bridge.log").read_text().splitlines()
    assert lines
    for line in lines:
        orjson.loads(line)  # every line through the JSON formatter: none raw
    assert not [line for line in lines if "ContentDisposition" in line or S in line]


async def test_a_client_cannot_grow_the_metrics_without_bound(
    make_bridge: BridgeFactory, make_emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request histogram is labelled by method: to aiohttp's pure Python parser (PyPy,
    AIOHTTP_NO_EXTENSIONS) any token is a method. A method of no standard is counted as "other"."""
    monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    client = await make_bridge(await make_emulator())
    for index in range(50):
        await client.request(f"X{index:04d}", "/workflow-list")
    text = await (await client.get("/metrics")).text()
    methods = set(re.findall(r'comfybridge_request_duration_seconds_count\{[^}]*method="([^"]+)"', text))
    assert len(methods) < 20, f"{len(methods)} method label values, chosen by a client"
    assert "other" in methods
