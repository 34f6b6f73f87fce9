"""Properties over many generated inputs: clientIds, input patching, stored names, media sniffing."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from comfybridge.core.clients import CLIENT_ID, check_client_id
from comfybridge.core.workflows import WorkflowStore
from comfybridge.errors import BadInput
from comfybridge.store.media import is_complete, sniff
from comfybridge.store.uploads import safe_name

from .conftest import FIXTURES

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
ALLOWED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"


@FAST
@given(st.text(max_size=200) | st.text(alphabet=ALLOWED, max_size=200))
def test_client_ids_are_accepted_exactly_when_they_fit(value: str) -> None:
    fits = 1 <= len(value) <= 128 and all(c in ALLOWED for c in value)
    if fits:
        assert check_client_id(value) == value
    else:
        with pytest.raises(BadInput):
            check_client_id(value)
    assert bool(CLIENT_ID.fullmatch(value)) == fits


@FAST
@given(
    width=st.integers(min_value=1, max_value=16384),
    height=st.integers(min_value=1, max_value=16384),
    color=st.integers(min_value=0, max_value=0xFFFFFF),
)
def test_patching_inputs_changes_those_inputs_and_nothing_else(width: int, height: int, color: int) -> None:
    store = WorkflowStore.load(FIXTURES / "workflows")
    workflow = store.get("solid")
    raw_before = workflow.raw
    values: dict[str, Any] = {"1/width": width, "1/height": height, "1/color": color}
    workflow.check_request({"workflow": "solid", **values}, lambda name: None, 1 << 20)
    prompt = workflow.build(values)
    original = orjson.loads(raw_before)
    assert prompt["1"]["inputs"] == {**original["1"]["inputs"], "width": width, "height": height, "color": color}
    assert {k: v for k, v in prompt.items() if k != "1"} == {k: v for k, v in original.items() if k != "1"}
    assert workflow.raw == raw_before  # the workflow file is never modified


@FAST
@given(st.text(max_size=300))
@example("a" * 79 + ".b.png")  # cut at 80 to a trailing dot, which the extension's dot doubled
def test_stored_names_never_escape_and_carry_the_content_type(filename: str) -> None:
    name = safe_name(filename, "image/png", ".png")
    assert re.fullmatch(r"[0-9a-f]{12}-[A-Za-z0-9_.-]{1,80}\.(png)", name), name
    assert "/" not in name
    assert ".." not in name.partition("-")[2]


MEDIA_HEADS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\0\0\0\0WEBP",
    b"RIFF\0\0\0\0WAVE",
    b"BM",
    b"II*\x00",
    b"\0\0\0\x18ftypisom",
    b"\x1aE\xdf\xa3",
    b"OggS",
    b"fLaC",
    b"ID3",
]


@FAST
@given(head=st.sampled_from(MEDIA_HEADS) | st.binary(max_size=8), rest=st.binary(max_size=2000))
def test_sniffing_and_completeness_never_fail_on_any_bytes(head: bytes, rest: bytes) -> None:
    data = head + rest
    found = sniff(data[:32])
    if found is None:
        return
    kind, mime, ext = found
    assert kind in ("image", "video", "audio")
    assert mime.startswith(kind + "/")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        assert is_complete(path, ext) in (True, False)
