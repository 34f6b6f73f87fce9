"""ComfyUI's answers and events, each shape checked in one function that every caller uses.

Nothing ComfyUI (or a proxy in front of it) sends is trusted: a value of the wrong type, a missing
key, an array where an object belongs is refused here with `Malformed`, never found out later as
an exception deep inside a task that listens or collects.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Complaints",
    "Finished",
    "Malformed",
    "OutputRef",
    "describe_refusal",
    "event",
    "finished",
    "history_entry",
    "memory_free",
    "outputs_of",
    "queue_ids",
    "upload_name",
]

RESULT_KINDS_SKIPPED = {"animated", "text"}  # keys of an output that are not file lists
OUTCOMES = {"execution_success": "success", "execution_error": "error", "execution_interrupted": "interrupted"}


class Malformed(ValueError):
    """An answer or event whose shape the bridge cannot use; the message says what was wrong."""


@dataclass(frozen=True)
class OutputRef:
    """One output file of a prompt, as ComfyUI lists it in history."""

    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class Finished:
    """How a prompt ended, from its history entry."""

    outcome: str  # success, error or interrupted
    error: str | None  # ComfyUI's text for an error
    outputs: dict[str, Any]  # node id -> what it output (file lists among other things)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Malformed(f"{what} is {type(value).__name__}, not an object")
    return value


def _node_id(value: Any, what: str) -> str:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise Malformed(f"{what} is {type(value).__name__}, not a node id")


def _number(value: Any, what: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise Malformed(f"{what} is {type(value).__name__}, not a number")


# REST answers ----------------------------------------------------------------------------------
def queue_ids(answer: Any) -> tuple[list[str], list[str]]:
    """Prompt ids running and pending, from GET /queue's `{"queue_running": [item], "queue_pending": [item]}`,
    an item being `[number, prompt_id, prompt, extra_data, outputs]`."""
    body = _object(answer, "GET /queue's answer")
    lists = []
    for key in ("queue_running", "queue_pending"):
        items = body.get(key, [])
        if not isinstance(items, list):
            raise Malformed(f"GET /queue's {key} is {type(items).__name__}, not a list")
        ids = []
        for item in items:
            if not (isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)):
                raise Malformed(f"GET /queue's {key} holds an item without a prompt id")
            ids.append(item[1])
        lists.append(ids)
    return lists[0], lists[1]


def upload_name(answer: Any) -> str:
    """The name ComfyUI gave an uploaded file: POST /upload/image answers `{"name", "subfolder", "type"}`."""
    name = _object(answer, "POST /upload/image's answer").get("name")
    if not isinstance(name, str) or not name:
        raise Malformed("POST /upload/image's answer has no file name")
    return name


def history_entry(answer: Any, prompt_id: str) -> dict[str, Any] | None:
    """The prompt's entry in GET /history/{id}'s `{prompt_id: entry}`; None while ComfyUI has none (`{}`)."""
    entry = _object(answer, "GET /history's answer").get(prompt_id)
    return None if entry is None else _object(entry, f"the history entry of {prompt_id}")


def finished(entry: dict[str, Any]) -> Finished:
    """The one reading of a history entry: interrupted, success (with its outputs) or error (with its text).

    `status.messages` keeps ComfyUI's last events of the prompt; an interrupt is only told there
    (its status_str is "error"). An entry with no readable status is an error, never a success."""
    outputs = entry.get("outputs")
    outputs = outputs if isinstance(outputs, dict) else {}
    status = entry.get("status")
    if not isinstance(status, dict):
        return Finished("error", "ComfyUI's history does not say how the prompt ended", outputs)
    messages = status.get("messages")
    events = [m for m in messages if isinstance(m, list) and m] if isinstance(messages, list) else []
    if any(m[0] == "execution_interrupted" for m in events):
        return Finished("interrupted", None, outputs)
    if status.get("status_str") == "success":
        return Finished("success", None, outputs)
    errors = [describe_execution_error(m[1]) for m in events if m[0] == "execution_error" and len(m) > 1]
    return Finished("error", errors[0] if errors else None, outputs)


def outputs_of(outputs: dict[str, Any]) -> list[OutputRef]:
    """Every result file (images, gifs, videos, audio, ...) with type "output", in ComfyUI's order;
    items of another shape are skipped (a custom node's own output, a preview)."""
    refs = []
    for node_output in outputs.values():
        if not isinstance(node_output, dict):
            continue
        for kind, items in node_output.items():
            if kind in RESULT_KINDS_SKIPPED or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict) or item.get("type") != "output":
                    continue
                filename, subfolder = item.get("filename"), item.get("subfolder") or ""
                if isinstance(filename, str) and filename and isinstance(subfolder, str):
                    refs.append(OutputRef(filename, subfolder, "output"))
    return refs


def memory_free(stats: Any) -> tuple[int | None, int]:
    """Free VRAM of the first device (None without one) and free RAM, in bytes, from GET /system_stats."""
    body = _object(stats, "GET /system_stats's answer")
    ram = _object(body.get("system"), "GET /system_stats's system").get("ram_free")
    devices = body.get("devices")
    first = devices[0] if isinstance(devices, list) and devices else None
    vram = first.get("vram_free") if isinstance(first, dict) else None
    free_vram = int(vram) if isinstance(vram, int | float) and not isinstance(vram, bool) else None
    return free_vram, int(_number(ram, "GET /system_stats's ram_free"))


def describe_refusal(body: Any, what: str = "the prompt") -> str:
    """ComfyUI's validation answer as one readable sentence: the error, then each node's errors (a
    prompt accepted in part has no error, only node errors)."""
    if not isinstance(body, dict):
        return f"ComfyUI refused {what}"
    error = body.get("error")
    text = f"ComfyUI refused {what}"
    if isinstance(error, dict):
        text = str(error.get("message") or text)
        if error.get("details"):
            text += f" ({error['details']})"
    parts = []
    node_errors = body.get("node_errors")
    for node_id, node in (node_errors if isinstance(node_errors, dict) else {}).items():
        items = node.get("errors") if isinstance(node, dict) else None
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            detail = f": {item['details']}" if item.get("details") else ""
            parts.append(f"node {node_id} ({node.get('class_type', '?')}): {item.get('message', 'error')}{detail}")
    return text + (": " + "; ".join(parts) if parts else "")


def describe_execution_error(data: Any) -> str:
    if not isinstance(data, dict):
        return "ComfyUI reported an error without details"
    message = str(data.get("exception_message") or "").strip()
    kind = data.get("exception_type") or "error"
    return f"node {data.get('node_id')} ({data.get('node_type')}): {kind}: {message}"


# events ----------------------------------------------------------------------------------------
def event(kind: str, data: Any) -> dict[str, Any] | None:
    """A WebSocket event as the bridge uses it, checked and normalised (node ids as strings); None for
    an event the bridge does not follow. Raises Malformed for a known event of the wrong shape."""
    if kind not in _EVENTS:
        return None
    body = _object(data, f"the data of {kind}")
    if kind == "status":
        status = _object(body.get("status"), "status.status")
        exec_info = _object(status.get("exec_info"), "status.exec_info")
        remaining = exec_info.get("queue_remaining")
        if not isinstance(remaining, int) or isinstance(remaining, bool) or remaining < 0:
            raise Malformed("status.exec_info.queue_remaining is not a count")
        return {"queue_remaining": remaining}
    prompt_id = body.get("prompt_id")
    if kind == "executing" and "prompt_id" not in body:
        return None  # told to a socket that reconnects mid-run: which node runs, of no prompt; reconcile covers it
    if not isinstance(prompt_id, str):
        raise Malformed(f"{kind} has no prompt_id")
    checked: dict[str, Any] = {"prompt_id": prompt_id}
    if kind == "execution_cached":
        nodes = body.get("nodes")
        if nodes is not None and not isinstance(nodes, list):
            raise Malformed(f"execution_cached.nodes is {type(nodes).__name__}, not a list")
        checked["nodes"] = [_node_id(n, "a cached node") for n in nodes or []]
    elif kind == "executing":
        node = body.get("node")
        checked["node"] = None if node is None else _node_id(node, "executing.node")
    elif kind == "progress":
        checked["node"] = _node_id(body.get("node"), "progress.node")
        checked["value"] = _number(body.get("value"), "progress.value")
        checked["max"] = _number(body.get("max"), "progress.max")
    elif kind == "progress_state":
        nodes = _object(body.get("nodes"), "progress_state.nodes")
        done = [n for n, node in nodes.items() if isinstance(node, dict) and node.get("state") == "finished"]
        checked["finished"] = [str(node_id) for node_id in done]
    elif kind == "executed":
        checked["node"] = _node_id(body.get("node"), "executed.node")
        output = body.get("output")  # None: a cached output node without UI output, told again
        checked["output"] = {} if output is None else _object(output, "executed.output")
    elif kind == "execution_error":
        checked["error"] = describe_execution_error(body)
    return checked


_EVENTS = {
    "status",
    "execution_start",
    "execution_cached",
    "executing",
    "progress",
    "progress_state",
    "executed",
    *OUTCOMES,
}


class Complaints:
    """Logs what a backend sent malformed: the first of each kind at once, then at most one line a
    minute with how many were skipped meanwhile, so a broken ComfyUI cannot flood the log."""

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        every: float = 60.0,
        said: str = "ComfyUI %s sent a malformed %s, skipped: %s%s",  # name, what, problem, how many more
    ) -> None:
        self.name = name
        self.said = said
        self.log = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def note(self, what: str, problem: str) -> None:
        now = time.monotonic()
        last = self._last.get(what)
        if last is not None and now - last < self.every:
            self._skipped[what] = self._skipped.get(what, 0) + 1
            return
        skipped = self._skipped.pop(what, 0)
        self._last[what] = now
        more = f" ({skipped} more since the last such line)" if skipped else ""
        self.log.warning(self.said, self.name, what, problem, more)
