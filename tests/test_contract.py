"""The machine-readable contract: /openapi.json describes what the bridge really does, and no request
generated from it (valid or not) gets a 5xx or an error without a `detail`."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from comfybridge.edge.appkeys import SETTINGS, WORKFLOWS

from .conftest import FIXTURES, BridgeFactory
from .helpers import ROOT, Client, generate

# Cases per operation; `make fuzz` asks for many more.
FUZZ_EXAMPLES = int(os.environ.get("COMFYBRIDGE_FUZZ_EXAMPLES", "50"))


async def test_every_route_is_described_and_every_described_route_exists(bridge: Client) -> None:
    doc = await (await bridge.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in bridge.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert described == served
    # A request of the contract's may meet a bridge that cannot answer now (its store or database
    # away, stopping, a cluster with no leader): every route that needs a key says so.
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "401" not in op["responses"] or "503" in op["responses"], (method, path)


async def test_each_workflow_schema_matches_its_inputs(bridge: Client) -> None:
    doc = await (await bridge.get("/openapi.json")).json()
    aliases = await (await bridge.get("/workflow-list")).json()
    schemas = doc["components"]["schemas"]
    assert sorted(n.removeprefix("Generate_") for n in schemas if n.startswith("Generate_")) == aliases
    for alias in aliases:
        inputs = await (await bridge.get("/workflow-info", params={"workflow": alias})).json()
        properties = schemas[f"Generate_{alias}"]["properties"]
        assert set(properties) == {"workflow", *inputs}
        for key, info in inputs.items():
            expected = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}[info["type"]]
            assert properties[key]["type"] == expected
            assert properties[key].get("minimum") == info.get("min")
            assert properties[key].get("maximum") == info.get("max")
            assert properties[key].get("enum") == info.get("choices")


async def test_the_document_is_valid_whatever_the_workflows_are_named(
    make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Files named as people name them ("text to image.json", "café.json") and an alias with a
    slash made component names OpenAPI forbids (validators refuse the whole document), and a $ref
    that pointed nowhere. Names that clean up alike stay apart; each schema's title keeps its alias."""
    folder = tmp_path / "named"
    folder.mkdir()
    for name in ("text to image.json", "text_to_image.json", "café.json", "b_emptyimage_save.json"):
        shutil.copy(FIXTURES / "workflows" / "b_emptyimage_save.json", folder / name)
    (folder / "workflow_alias.json").write_text('{"sd15/solid": "b_emptyimage_save.json"}')
    bridge = await make_bridge(workflows=folder)
    doc = await (await bridge.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    assert all(re.fullmatch(r"[a-zA-Z0-9._-]+", name) for name in schemas), list(schemas)
    body = doc["paths"]["/generate-based-workflow"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = [option["$ref"].removeprefix("#/components/schemas/") for option in body["oneOf"]]
    assert sorted(schemas[ref]["title"] for ref in refs) == ["café", "sd15/solid", "text to image", "text_to_image"]


async def test_what_the_schema_accepts_the_bridge_accepts(bridge: Client) -> None:
    doc = await (await bridge.get("/openapi.json")).json()
    schema = {**doc["components"]["schemas"]["Generate_solid"], "components": doc["components"]}
    validator = jsonschema_rs.validator_for(schema)
    good: dict[str, Any] = {"workflow": "solid", "1/width": 16, "1/batch_size": 1}
    assert validator.is_valid(good)
    assert (await generate(bridge, "schema", good))[0] == 200
    for bad in ({**good, "1/width": "16"}, {**good, "9/nope": 1}, {"1/width": 16}):
        assert not validator.is_valid(bad)
        assert (await generate(bridge, "schema", bad))[0] == 400
    # 16.0 is an integer to JSON Schema 2020-12: the bridge takes it as 16 (a whole float past 2**53
    # is no exact integer, and stays refused).
    whole = {**good, "1/width": 16.0}
    assert validator.is_valid(whole)
    assert (await generate(bridge, "schema", whole))[0] == 200
    taken = bridge.app[WORKFLOWS].get("solid").check_request(whole, lambda name: None, 1 << 20)
    assert type(taken["1/width"]) is int
    status, answer = await generate(bridge, "schema", {**good, "1/width": float(2**53 + 2)})
    assert (status, answer["detail"]) == (400, "Input '1/width' must be an int, got float.")


async def test_docs_page_shows_the_document(bridge: Client) -> None:
    resp = await bridge.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert 'fetch("openapi.json"' in await resp.text()
    assert bridge.app[SETTINGS].api_keys == ()


async def test_docs_page_with_a_trailing_slash_moves_to_its_address(bridge: Client) -> None:
    """As /playground/ does: the page's links are relative to /docs; its `token` goes along."""
    for asked, moved_to in (("/docs/", "../docs"), ("/docs/?token=k%2B1", "../docs?token=k%2B1")):
        moved = await bridge.get(asked, allow_redirects=False)
        assert (moved.status, moved.headers["Location"]) == (301, moved_to), asked
    page = await bridge.get("/docs/")
    assert (page.status, page.content_type, page.url.path) == (200, "text/html", "/docs")


@pytest.fixture(scope="module")
def live_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bridge process (with an emulated ComfyUI) on a free loopback port, for a client that is not
    asyncio: schemathesis calls it with `requests`."""
    workdir = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(FIXTURES / "workflows", workdir / "workflows")
    with (workdir / "bridge.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "comfybridge", "--emulate", "1", "--port", "0", "--max-json-mb", "1",
             "--stop-grace", "0"],
            cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline().decode()  # printed once its port is bound
        assert banner.startswith("comfybridge on http://"), (workdir / "bridge.log").read_text()
        url = banner.split()[2]
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/generation-count", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, (workdir / "bridge.log").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
    log_text = (workdir / "bridge.log").read_text()
    assert "Traceback" not in log_text, log_text[-3000:]


@pytest.fixture(scope="module")
def api_schema(live_bridge: str) -> Any:
    return schemathesis.openapi.from_url(f"{live_bridge}/openapi.json")


OPERATIONS = [
    ("GET", "/workflow-list"),
    ("GET", "/workflow-info"),
    ("GET", "/workflow-thumbnail"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("POST", "/upload"),
    ("POST", "/generate-based-workflow"),
    ("GET", "/history"),
    ("GET", "/execution-info"),
    ("GET", "/generation-count"),
    ("POST", "/free"),
    ("POST", "/interrupt"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/"),
    ("GET", "/playground"),
    ("GET", "/playground/"),
    ("GET", "/playground/{name}"),
    ("GET", "/ws"),
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_generated_request_breaks_the_bridge(api_schema: Any, method: str, path: str) -> None:
    """Schemathesis's cases for one operation, valid (positive) and invalid (negative) alike: never a
    5xx (but a waited-for job's own failure), and every error is JSON with a `detail`."""
    operation = api_schema[path][method]
    calls = 0

    cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=cases)
    def check(case: Any) -> None:
        nonlocal calls
        calls += 1
        response = case.call(timeout=30)
        # A job that failed, told to the request that waited for it (`?wait=1`), is a documented 502.
        waited = str((case.query or {}).get("wait", "")).lower() in ("1", "true")
        failed_job = waited and response.status_code == 502 and "job_id" in response.json()
        assert response.status_code < 500 or failed_job, (case.method, case.path, case.query, response.text[:500])
        if response.status_code >= 400:
            assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
                case.method,
                case.path,
                case.query,
                case.headers,
                response.status_code,
                response.text[:300],
            )
            assert isinstance(response.json().get("detail"), str)

    check()
    print(f"{method} {path}: {calls} generated requests")


def test_every_operation_of_the_document_is_fuzzed(api_schema: Any) -> None:
    """The list above is the document's every operation: a route added without it would go unfuzzed."""
    documented = {(method.upper(), path) for path, item in api_schema.raw_schema["paths"].items() for method in item}
    assert documented == set(OPERATIONS)


@settings(max_examples=FUZZ_EXAMPLES * 4, deadline=None, database=None)
@given(
    boundary=st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=90),
    header=st.binary(max_size=300),
    content=st.binary(max_size=300),
    closed=st.booleans(),
)
def test_any_multipart_body_gets_a_json_answer(
    live_bridge: str, boundary: str, header: bytes, content: bytes, closed: bool
) -> None:
    """Multipart as a careless or hostile client writes it: never a 5xx, always `{"detail"}` on error."""
    mark = boundary.encode("latin-1")
    body = b"--" + mark + b"\r\n" + header + b"\r\n\r\n" + content + (b"\r\n--" + mark + b"--\r\n" if closed else b"")
    host, port = live_bridge.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        content_type = "multipart/form-data; boundary=" + boundary
        connection.putrequest("POST", "/upload")
        connection.putheader("Content-Type", content_type.encode("latin-1"))
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    assert response.status < 500, answer
    if response.status >= 400 and response.getheader("Content-Type", "").startswith("application/json"):
        assert isinstance(orjson.loads(answer)["detail"], str)
    else:  # 200, or a request aiohttp's own parser refused before any handler saw it
        assert response.status in (200, 400), (response.status, answer)
