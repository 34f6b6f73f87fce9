"""The emulator's ComfyUI core: prompt validation, the queue, and node execution with events."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import itertools
import logging
import re
import struct
import time
import uuid
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from . import pictures
from .png import png_first_pixel, png_size, solid_png

__all__ = ["Engine", "Faults", "PromptRejected"]

log = logging.getLogger(__name__)

# Send targets: a socket id, or None for a broadcast to every socket.
Sender = Callable[[str, dict[str, Any], "str | None"], None]
BinarySender = Callable[[bytes, "str | None"], None]

# Events ComfyUI broadcasts when a prompt has no client_id; the others are then not sent at all.
_BROADCAST_WITHOUT_CLIENT = {"progress", "progress_state", "execution_interrupted"}
_LOADERS = ("LoadImage", "LoadImageMask")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM")
HISTORY_LIMIT = 10000


def load_object_info() -> dict[str, Any]:
    raw = resources.files(__package__).joinpath("object_info.json").read_bytes()
    info: dict[str, Any] = orjson.loads(raw)
    return info


@dataclass
class Faults:
    """Failures a test or benchmark can inject."""

    prompt_500: int = 0  # answer the next N POST /prompt with a 500
    prompt_413: int = 0  # refuse the next N POST /prompt as too large, as ComfyUI's server does past 100 MB
    prompt_hang: bool = False  # never answer POST /prompt
    answer_delay: float = 0.0  # queue the prompt, then wait this long before answering POST /prompt
    runtime_error: int = 0  # the next N prompts fail in their first node
    node_error: int = 0  # the next N prompts are refused by validation, as ComfyUI refuses a bad value
    drop_socket_after_nodes: int | None = None  # close every socket after N nodes of the next prompt
    start_delay: float = 0.0  # seconds before each prompt starts (a slow model load)
    video_mb: int = 0  # SaveImage also writes a video of this many MB (sparse: cheap to make, real to read)
    # The next prompt hangs inside its node N+1, deaf to interrupts, until released; N = all its nodes:
    # it hangs after its last node, before it reports how it ended.
    hang_after_nodes: int | None = None
    hold_end: bool = False  # the next prompt's final `executing null` waits until released (a slow history write)


@dataclass(order=True)
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptRejected(Exception):
    """A prompt ComfyUI answers with HTTP 400."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


class Interrupted(Exception):
    pass


class NodeFailure(Exception):
    def __init__(self, message: str, exception_type: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


def _error(kind: str, message: str, details: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


def _types_match(received: Any, wanted: Any) -> bool:
    """ComfyUI's validate_node_input, not strict: equal, "*", or comma-separated types that share one."""
    if received == wanted or "*" in (received, wanted):
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in wanted.split(",")})


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


class ValidationCrash(Exception):
    """What makes ComfyUI's validation itself raise: a link to a node that is not there (KeyError),
    to an output the node does not have (IndexError), by a slot that is not an int (TypeError)."""

    def __init__(self, exc: Exception, failed_line: str) -> None:
        super().__init__(str(exc))
        self.exception_type = type(exc).__qualname__  # builtins only: ComfyUI's full_type_name drops the module
        # ComfyUI sends Python's traceback of the lookup; ours names the same lookup, in our code.
        self.traceback = [f'  File "emulator/engine.py", in _linked_type\n    {failed_line}\n']


class Engine:
    """One ComfyUI: a prompt queue run one prompt at a time, with ComfyUI's events in ComfyUI's order."""

    def __init__(
        self, root: Path, pace: float, send: Sender, send_binary: BinarySender, jobs_api: bool = False
    ) -> None:
        self.jobs_api = jobs_api  # the newer dialect: /api/jobs, output asset ids, create_time
        self.input_dir = root / "input"
        self.output_dir = root / "output"
        self.temp_dir = root / "temp"
        for folder in (self.input_dir, self.output_dir, self.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._seed_inputs()
        self.pace = pace
        self.faults = Faults()
        self.object_info = load_object_info()
        self.history: dict[str, dict[str, Any]] = {}
        self.free_requests: list[Any] = []  # bodies of POST /free, so a test can see what was asked
        self.requests: collections.Counter[str] = collections.Counter()  # by route, e.g. "GET /queue"
        self.cancel_requests: list[str] = []  # ids given to the jobs API's cancel, so a test can see it used
        self.started: list[str] = []  # every prompt id that began to run, in order (history may be deleted)
        self.timeline: list[tuple[str, float, float]] = []  # (prompt id, start, end) in monotonic seconds
        self._send = send
        self._send_binary = send_binary
        self._numbers = itertools.count()
        self._pending: list[QueueItem] = []
        self._running: QueueItem | None = None
        self.last_node_id: str | None = None
        self._interrupt_id: str | None = None
        self._wakeup = asyncio.Event()
        self.stopping = asyncio.Event()  # set at shutdown, so a hanging request can end
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._hang_released = asyncio.Event()
        # ComfyUI's classic cache: what each node made (its value, and its UI output if any), by the
        # node's signature; only the entries the prompt being run can use are kept.
        self._cache: dict[str, tuple[Any, dict[str, Any] | None]] = {}
        self._forget_cache = False  # POST /free asked for it
        self._drop_sockets: Callable[[], None] = lambda: None
        self._task: asyncio.Task[None] | None = None

    def _seed_inputs(self) -> None:
        """The files a fresh ComfyUI (and the sample workflows) expect in the input folder."""
        seeds = {
            "example.png": solid_png(64, 64, 0x3366CC),
            "test.png": solid_png(256, 256, 0x808080),
            "i2i_example.jpg": solid_png(512, 512, 0x4488AA),  # PIL opens a PNG whatever its name
            "broken.png": b"this is not an image\n",
        }
        for name, data in seeds.items():
            path = self.input_dir / name
            if not path.exists():
                path.write_bytes(data)

    # lifecycle -------------------------------------------------------------------------------
    def start(self, drop_sockets: Callable[[], None]) -> None:
        self._drop_sockets = drop_sockets
        self._task = asyncio.create_task(self._worker(), name="emulator-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # queue -----------------------------------------------------------------------------------
    @property
    def queue_remaining(self) -> int:
        return len(self._pending) + (1 if self._running else 0)

    def running_client(self) -> str | None:
        return self._running.extra_data.get("client_id") if self._running else None

    def status_message(self) -> dict[str, Any]:
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining}}}

    def broadcast_status(self) -> None:
        self._send("status", self.status_message(), None)

    def queue_snapshot(self) -> dict[str, Any]:
        running = [self._running.as_list()] if self._running else []
        return {"queue_running": running, "queue_pending": [i.as_list() for i in sorted(self._pending)]}

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /prompt: validate and queue; raises PromptRejected for ComfyUI's 400 answers."""
        number: float = body["number"] if isinstance(body.get("number"), int | float) else next(self._numbers)
        if body.get("front"):
            number = -number
        prompt = body.get("prompt")
        if prompt is None:
            msg = "No prompt provided"
            raise PromptRejected({"error": _error("no_prompt", msg, msg), "node_errors": {}})
        chosen = body.get("prompt_id")
        if self.jobs_api and chosen is not None and not _canonical_uuid(chosen):
            error = _error(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one",
            )
            raise PromptRejected({"error": error, "node_errors": {}})
        prompt_id = str(chosen or uuid.uuid4())
        if self.faults.node_error > 0:
            self.faults.node_error -= 1
            raise PromptRejected(_injected_node_error(prompt))
        outputs, node_errors = self.validate(prompt)
        extra = dict(body.get("extra_data") or {})
        if body.get("client_id"):
            extra["client_id"] = body["client_id"]
        if self.jobs_api:
            extra["create_time"] = _now_ms()
        heapq.heappush(self._pending, QueueItem(number, prompt_id, prompt, extra, outputs))
        self.broadcast_status()
        self._wakeup.set()
        return {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def delete_pending(self, prompt_ids: list[str]) -> None:
        before = len(self._pending)
        self._pending = [i for i in self._pending if i.prompt_id not in prompt_ids]
        if len(self._pending) != before:
            heapq.heapify(self._pending)
            self.broadcast_status()

    def clear_pending(self) -> None:
        self._pending = []
        self.broadcast_status()

    def pause(self) -> None:
        """Start no new prompt until resume(): a test can line up work behind a busy GPU."""
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()

    def interrupt(self, prompt_id: str | None) -> bool:
        """With an id, only that prompt if it runs; with none, whatever runs. True if it acted."""
        if self._running and (prompt_id is None or prompt_id == self._running.prompt_id):
            self._interrupt_id = self._running.prompt_id
            return True
        return False

    def cancel(self, prompt_id: str) -> bool:
        """The jobs API's cancel: dequeue it if pending, interrupt it if running (never another
        prompt), nothing if finished or unknown. True if it acted."""
        self.cancel_requests.append(prompt_id)
        if any(item.prompt_id == prompt_id for item in self._pending):
            self.delete_pending([prompt_id])
            return True
        return self.interrupt(prompt_id)

    def job(self, prompt_id: str) -> dict[str, Any] | None:
        """GET /api/jobs/{id}: one job in the jobs API's shape, or None if unknown."""
        if prompt_id in self.history:
            return _history_job(prompt_id, self.history[prompt_id], full=True)
        if self._running is not None and self._running.prompt_id == prompt_id:
            return _queue_job(self._running, "in_progress", full=True)
        item = next((i for i in self._pending if i.prompt_id == prompt_id), None)
        return _queue_job(item, "pending", full=True) if item else None

    def jobs(self) -> list[dict[str, Any]]:
        """GET /api/jobs: running, pending and finished jobs, newest first."""
        listed = [_queue_job(self._running, "in_progress")] if self._running else []
        listed += [_queue_job(i, "pending") for i in self._pending]
        listed += [_history_job(pid, entry) for pid, entry in self.history.items()]
        return sorted(listed, key=lambda j: j.get("create_time", 0), reverse=True)

    # validation ------------------------------------------------------------------------------
    def validate(self, prompt: Any) -> tuple[list[str], dict[str, Any]]:
        if not isinstance(prompt, dict):
            raise PromptRejected({"error": _error("invalid_prompt", "Prompt is not a dict"), "node_errors": {}})
        for node_id, node in prompt.items():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            if class_type is None:
                msg = "Cannot execute because a node is missing the class_type property."
                raise PromptRejected(
                    {"error": _error("invalid_prompt", msg, f"Node ID '#{node_id}'"), "node_errors": {}}
                )
            if class_type not in self.object_info:
                msg = f"Cannot execute because node {class_type} does not exist."
                raise PromptRejected(
                    {"error": _error("invalid_prompt", msg, f"Node ID '#{node_id}'"), "node_errors": {}}
                )
        outputs = sorted(
            (nid for nid, node in prompt.items() if self.object_info[node["class_type"]]["output_node"]),
            key=_node_order,
        )
        if not outputs:
            msg = "Prompt has no outputs"
            raise PromptRejected({"error": _error("prompt_no_outputs", msg), "node_errors": {}})
        # As ComfyUI: one record of every node validated so far (valid, its own errors), shared by
        # all outputs, so a node is checked once; each output that fails is added to the
        # dependent_outputs of every failed node recorded by then, whether it leads there or not.
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        node_errors: dict[str, Any] = {}
        good: list[str] = []
        own_errors: list[dict[str, Any]] = []  # the failed outputs' own errors, for the summary
        for output in outputs:
            try:
                valid = self._validate_node(prompt, output, validated)
            except ValidationCrash as exc:  # the output's own lookup raised
                extra = {"exception_type": exc.exception_type, "traceback": exc.traceback}
                crash = _error("exception_during_validation", "Exception when validating node", str(exc), extra)
                validated[output] = (False, [crash])
                valid = False
            if valid:
                good.append(output)
                continue
            own_errors += validated[output][1]
            for nid, (ok, errors) in validated.items():
                if not ok and errors:
                    entry = node_errors.setdefault(
                        nid, {"errors": errors, "dependent_outputs": [], "class_type": prompt[nid]["class_type"]}
                    )
                    entry["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for e in own_errors)
            body = {"error": _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)}
            body["node_errors"] = node_errors
            raise PromptRejected(body)
        return good, node_errors

    def _validate_node(
        self, prompt: dict[str, Any], node_id: str, validated: dict[str, tuple[bool, list[dict[str, Any]]]]
    ) -> bool:
        """Whether the node and all it reads are valid; its own errors go into `validated`. Raises
        ValidationCrash where ComfyUI's own lookup of a link raises."""
        if node_id in validated:
            return validated[node_id][0]
        validated[node_id] = (True, [])  # while it is checked: a cycle ends here (ComfyUI would recurse)
        node = prompt[node_id]
        info = self.object_info[node["class_type"]]
        inputs = node.get("inputs") or {}
        errors: list[dict[str, Any]] = []
        valid = True
        for name, config in info["input"].get("required", {}).items():
            if name not in inputs:
                errors.append(_error("required_input_missing", "Required input is missing", name, {"input_name": name}))
                continue
            valid &= self._validate_input(prompt, node, name, config, inputs[name], errors, validated)
        for name, config in info["input"].get("optional", {}).items():
            if name in inputs:
                valid &= self._validate_input(prompt, node, name, config, inputs[name], errors, validated)
        validated[node_id] = (valid and not errors, errors)
        return not errors and valid

    def _validate_input(
        self,
        prompt: dict[str, Any],
        node: dict[str, Any],
        name: str,
        config: list[Any],
        value: Any,
        errors: list[dict[str, Any]],
        validated: dict[str, tuple[bool, list[dict[str, Any]]]],
    ) -> bool:
        """Adds the input's errors to `errors`; False if a node it links to is invalid."""
        kind = config[0]
        options = config[1] if len(config) > 1 else {}
        config = [kind, options]  # ComfyUI reports input_config with its options dict, even an empty one
        if isinstance(value, list):  # a link, to ComfyUI, whatever its items are
            return self._validate_link(prompt, name, config, value, errors, validated)
        errors.extend(self._validate_value(node, name, config, value))
        return True

    def _validate_link(
        self,
        prompt: dict[str, Any],
        name: str,
        config: list[Any],
        link: list[Any],
        errors: list[dict[str, Any]],
        validated: dict[str, tuple[bool, list[dict[str, Any]]]],
    ) -> bool:
        if len(link) != 2:
            msg = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            errors.append(
                _error(
                    "bad_linked_input", msg, name, {"input_name": name, "input_config": config, "received_value": link}
                )
            )
            return True
        source_id = link[0]
        received = self._linked_type(prompt, link)
        kind = config[0]
        if not _types_match(received, kind):
            detail = f"{name}, received_type({received}) mismatch input_type({kind})"
            extra = {"input_name": name, "input_config": config, "received_type": received, "linked_node": link}
            errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes", detail, extra))
            return True
        try:
            return self._validate_node(prompt, source_id, validated)
        except ValidationCrash as exc:  # ComfyUI pins a crash inside the linked node on that node
            extra = {
                "input_name": name,
                "input_config": config,
                "exception_message": str(exc),
                "exception_type": exc.exception_type,
                "traceback": exc.traceback,
                "linked_node": link,
            }
            message = "Exception when validating inner node"
            validated[source_id] = (False, [_error("exception_during_inner_validation", message, str(exc), extra)])
            return False

    def _linked_type(self, prompt: dict[str, Any], link: list[Any]) -> Any:
        """The type a link carries, looked up as ComfyUI does (a node's RETURN_TYPES is a tuple), so a
        bad node id or slot fails with the same exception and text."""
        try:
            source = prompt[link[0]]
        except (KeyError, TypeError) as exc:
            raise ValidationCrash(exc, "source = prompt[link[0]]") from None
        try:
            return tuple(self.object_info[source["class_type"]]["output"])[link[1]]
        except (IndexError, TypeError) as exc:
            raise ValidationCrash(exc, "return_types[link[1]]") from None

    def _validate_value(self, node: dict[str, Any], name: str, config: list[Any], value: Any) -> list[dict[str, Any]]:
        kind, options = config
        if node["class_type"] in ("LoadImage", "LoadImageMask") and name == "image":
            if not (self.input_dir / str(value)).is_file():
                detail = f"image - Invalid image file: {value}"
                return [
                    _error(
                        "custom_validation_failed", "Custom validation failed for node", detail, {"input_name": name}
                    )
                ]
            return []
        info: dict[str, Any] = {"input_name": name, "input_config": config, "received_value": value}
        if isinstance(kind, list):
            if value not in kind:
                detail = f"{name}: '{value}' not in {kind}"
                return [_error("value_not_in_list", "Value not in list", detail, info)]
            return []
        converters: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
        if kind in converters:
            try:
                converted = converters[kind](value)
            except (TypeError, ValueError) as exc:
                detail = f"{name}, {value}, {exc}"
                extra = {**info, "exception_message": str(exc)}
                return [
                    _error("invalid_input_type", f"Failed to convert an input value to a {kind} value", detail, extra)
                ]
            if "min" in options and converted < options["min"]:
                msg = f"Value {converted} smaller than min of {options['min']}"
                return [_error("value_smaller_than_min", msg, name, info)]
            if "max" in options and converted > options["max"]:
                msg = f"Value {converted} bigger than max of {options['max']}"
                return [_error("value_bigger_than_max", msg, name, info)]
        return []

    # execution -------------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            await self._unpaused.wait()
            if not self._pending:  # (also emptied while paused)
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = heapq.heappop(self._pending)
            self._running = item
            self.started.append(item.prompt_id)
            started = time.monotonic()
            self._interrupt_id = None
            self.broadcast_status()
            try:
                await self._execute(item)
            except Exception:  # pragma: no cover - an emulator bug must not stop the queue
                log.exception("emulator failed on prompt %s", item.prompt_id)
            finally:
                self._running = None
                self.timeline.append((item.prompt_id, started, time.monotonic()))

    def _emit(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        if sid is None and event not in _BROADCAST_WITHOUT_CLIENT:
            return
        self._send(event, data, sid)

    async def _execute(self, item: QueueItem) -> None:
        sid = item.extra_data.get("client_id")
        pid = item.prompt_id
        messages: list[list[Any]] = []

        def record(event: str, data: dict[str, Any]) -> None:
            messages.append([event, data])
            self._emit(event, data, sid)

        if self.faults.start_delay:
            await asyncio.sleep(self.faults.start_delay)
        record("execution_start", {"prompt_id": pid, "timestamp": _now_ms()})
        # As ComfyUI (0.3.64, classic cache): keyed by a node's class and inputs, its ancestors' too (not
        # by node id); every entry this prompt cannot use goes (so, in effect, what the previous prompt
        # made stays); a cached node does not run, and a cached output tells its result again.
        fingerprints = await self._loader_fingerprints(item.prompt)
        signatures = _signatures(item.prompt, _execution_order(item.prompt, list(item.prompt)), fingerprints)
        used = set(signatures.values())
        if self._forget_cache:
            self._cache, self._forget_cache = {}, False
        self._cache = {key: made for key, made in self._cache.items() if key in used}
        cached = [n for n in item.prompt if signatures[n] in self._cache]
        record("execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": _now_ms()})
        order = _execution_order(item.prompt, item.outputs, set(cached))
        states: dict[str, dict[str, Any]] = {}
        results: dict[str, Any] = {n: self._cache[signatures[n]][0] for n in cached}
        executed: list[str] = []  # the nodes that ran (cached ones did not)
        ui_outputs: dict[str, Any] = {}
        fail_now = self.faults.runtime_error > 0
        if fail_now:
            self.faults.runtime_error -= 1
        drop_after = self.faults.drop_socket_after_nodes
        self.faults.drop_socket_after_nodes = None
        hang_after, self.faults.hang_after_nodes = self.faults.hang_after_nodes, None
        hold_end, self.faults.hold_end = self.faults.hold_end, False
        if hang_after is not None or hold_end:
            self._hang_released.clear()  # armed now: a release from here on lets the hang pass, even an early one
        outcome = "success"
        ran = 0  # nodes run so far (cached outputs only tell their result)
        for node_id in order:
            if node_id in cached:  # an output made before
                self._tell_cached(node_id, signatures[node_id], states, ui_outputs, pid, sid)
                continue
            count, ran = ran, ran + 1
            node = item.prompt[node_id]
            try:
                states[node_id] = _node_state(pid, node_id, 0.0, 1.0, "running")
                self._emit("progress_state", {"prompt_id": pid, "nodes": dict(states)}, sid)
                self._emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": pid}, sid)
                self.last_node_id = node_id
                self._check_interrupt(pid)  # as ComfyUI: once it has said which node comes next
                if drop_after is not None and count == drop_after:
                    self._drop_sockets()
                if fail_now:
                    raise NodeFailure("emulated failure (injected)", "RuntimeError")
                if hang_after is not None and count == hang_after:
                    await self._hang()  # a node that never returns (a deadlocked custom node)
                await self._spend(node, node_id, pid, sid)
                results[node_id] = await self._node_value(item.prompt, node_id, results)
                ui = self._write_outputs(node, node_id, results, pid)
                self._cache[signatures[node_id]] = (results[node_id], ui)  # as it ends, even if a later node fails
                if ui is not None:
                    ui_outputs[node_id] = ui
                    self._emit(
                        "executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": pid}, sid
                    )
                states[node_id] = _node_state(pid, node_id, 1.0, 1.0, "finished")
                self._emit("progress_state", {"prompt_id": pid, "nodes": dict(states)}, sid)
                executed.append(node_id)
            except Interrupted:
                outcome = "interrupted"
                data = {"prompt_id": pid, "node_id": node_id, "node_type": node["class_type"], "executed": executed}
                record("execution_interrupted", {**data, "timestamp": _now_ms()})
                break
            except NodeFailure as exc:
                outcome = "error"
                states[node_id] = _node_state(pid, node_id, 0.0, 1.0, "error")
                record(
                    "execution_error",
                    {
                        "prompt_id": pid,
                        "node_id": node_id,
                        "node_type": node["class_type"],
                        "executed": executed,
                        "exception_message": f"{exc}\n",
                        "exception_type": exc.exception_type,
                        "traceback": [f'  File "emulator/engine.py", in execute\n    {exc.exception_type}: {exc}\n'],
                        "current_inputs": self._current_inputs(item, node_id, results),
                        "current_outputs": list(item.prompt),  # ComfyUI: every node of the prompt, in set order
                        "timestamp": _now_ms(),
                    },
                )
                break
        if outcome == "success" and hang_after == ran:
            await self._hang()
        if outcome == "success":
            record("execution_success", {"prompt_id": pid, "timestamp": _now_ms()})
        # ComfyUI writes history after execution_success, then broadcasts the queue, then sends executing null.
        await asyncio.sleep(0)
        if hold_end:
            await self._hang()
        self._store_history(item, ui_outputs, outcome, messages)
        self._running = None
        self.broadcast_status()
        self._emit("executing", {"node": None, "prompt_id": pid}, sid if sid else None)

    def free(self, body: Any) -> None:
        """POST /free: `free_memory` empties the cache too, once the running prompt (if any) ends."""
        self.free_requests.append(body)
        if isinstance(body, dict) and body.get("free_memory"):
            self._forget_cache = True

    async def _loader_fingerprints(self, prompt: dict[str, Any]) -> dict[str, str]:
        """What ComfyUI's LoadImage.IS_CHANGED answers, by node: the sha256 of the file's content, so
        a file uploaded again under the same name with other content makes the node (and all after
        it) run again. Hashed in a worker thread, as a file may be large."""
        loaders = [n for n, node in prompt.items() if node["class_type"] in _LOADERS]
        if not loaders:
            return {}
        paths = [self.input_dir / str((prompt[n].get("inputs") or {}).get("image")) for n in loaders]
        digests = await asyncio.to_thread(lambda: [_content_digest(path) for path in paths])
        return dict(zip(loaders, digests, strict=True))

    def _tell_cached(
        self,
        node_id: str,
        signature: str,
        states: dict[str, dict[str, Any]],
        ui_outputs: dict[str, Any],
        pid: str,
        sid: str | None,
    ) -> None:
        """A cached output node's turn: ComfyUI says its earlier result again (`executed`, its output
        None if it has no UI), writes nothing, and marks it finished (value and max 1, not 1.0, as
        ComfyUI marks a node it did not run)."""
        ui = self._cache[signature][1]
        if ui is not None:
            ui_outputs[node_id] = ui
        self._emit("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": pid}, sid)
        states[node_id] = _node_state(pid, node_id, 1, 1, "finished")
        self._emit("progress_state", {"prompt_id": pid, "nodes": dict(states)}, sid)

    async def _hang(self) -> None:
        """Wait, deaf to interrupts and sending nothing, until `release_hang` (since the prompt began)."""
        await self._hang_released.wait()

    def release_hang(self) -> None:
        """The hung node returns at last (its prompt goes on, or stops if it was interrupted meanwhile)."""
        self._hang_released.set()

    def _check_interrupt(self, prompt_id: str) -> None:
        if self._interrupt_id == prompt_id:
            self._interrupt_id = None
            raise Interrupted

    async def _spend(self, node: dict[str, Any], node_id: str, pid: str, sid: str | None) -> None:
        """Take `pace` seconds; a sampler splits it over its steps with one `progress` per step."""
        steps = node.get("inputs", {}).get("steps")
        if "Sampler" in node["class_type"] and isinstance(steps, int) and steps > 0:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.pace / steps)
                self._check_interrupt(pid)
                self._emit("progress", {"value": step, "max": steps, "prompt_id": pid, "node": node_id}, sid)
        else:  # ComfyUI looks for an interrupt between nodes (and in a sampler's steps): this one runs to its end
            await asyncio.sleep(self.pace)

    def _resolve(self, value: Any, results: dict[str, Any]) -> Any:
        if _is_link(value):
            out = results.get(value[0])
            return out[value[1]] if isinstance(out, tuple) and value[1] < len(out) else None
        return value

    async def _node_value(self, prompt: dict[str, Any], node_id: str, results: dict[str, Any]) -> tuple[Any, ...]:
        """A loader reads and decodes its file in a worker thread: a large picture takes a while in pure
        Python, and the sockets and routes of this emulator must keep answering meanwhile."""
        if prompt[node_id]["class_type"] in _LOADERS:
            return await asyncio.to_thread(self._run_node_value, prompt, node_id, results)
        return self._run_node_value(prompt, node_id, results)

    def _run_node_value(self, prompt: dict[str, Any], node_id: str, results: dict[str, Any]) -> tuple[Any, ...]:
        """What the node passes on: image-like outputs are `pictures.Image` dicts (size, batch, colour, a tile)."""
        node = prompt[node_id]
        kind = node["class_type"]
        inputs = {k: self._resolve(v, results) for k, v in (node.get("inputs") or {}).items()}
        if kind in _LOADERS:
            path = self.input_dir / str(inputs.get("image"))
            data = path.read_bytes() if path.is_file() else b""
            head = data[:64]
            if not head.startswith(_IMAGE_MAGIC):
                raise NodeFailure(f"cannot identify image file '{path}'", "PIL.UnidentifiedImageError")
            loaded = pictures.load(data)
            if loaded is not None:
                return loaded
            # Nothing here reads it: one colour, a PNG's first pixel if it has one, else from the file's bytes.
            width, height = png_size(head) or (64, 64)
            colour = png_first_pixel(data)
            if colour is None:
                colour = int.from_bytes(hashlib.md5(head).digest()[:3], "big")
            return ({"w": width, "h": height, "b": 1, "c": colour}, {"w": width, "h": height, "b": 1, "c": 0})
        if kind in ("EmptyImage", "EmptyLatentImage"):
            colour = int(inputs.get("color") or 0) if kind == "EmptyImage" else 0x223344
            image = {"w": int(inputs["width"]), "h": int(inputs["height"]), "b": int(inputs["batch_size"]), "c": colour}
            return (image,)
        if kind == "ImageScale":
            source = dict(inputs.get("image") or {"b": 1, "c": 0})
            return ({**source, "w": int(inputs["width"]), "h": int(inputs["height"])},)
        if kind in ("ImageInvert", "ImageAddNoise", "ImageBlur", "ImageSharpen"):
            source = dict(inputs.get("image") or {"w": 64, "h": 64, "b": 1, "c": 0})
            if kind == "ImageInvert":
                return (pictures.invert(source),)
            if kind == "ImageAddNoise":
                return (pictures.add_noise(source, int(inputs["seed"]), float(inputs["strength"])),)
            if kind == "ImageBlur":
                return (pictures.blur(source, int(inputs["blur_radius"])),)
            return (pictures.sharpen(source, int(inputs["sharpen_radius"]), float(inputs["alpha"])),)
        if kind == "CLIPTextEncode":
            return ({"text": str(inputs.get("text") or "")},)
        if kind == "GetImageSize":
            source = inputs.get("image") or {"w": 64, "h": 64, "b": 1}
            text = f"width: {source['w']}, height: {source['h']}\n batch size: {source['b']}"
            self._send_binary(_text_frame(node_id, text), None)
            return (source["w"], source["h"], source["b"])
        if kind in ("KSampler", "KSamplerAdvanced"):
            # No model here: a procedural picture from the seed and the prompt's text stands in.
            latent = dict(inputs.get("latent_image") or {"w": 512, "h": 512, "b": 1})
            seed = int(inputs.get("seed") or inputs.get("noise_seed") or 0)
            positive = inputs.get("positive")
            text = str(positive.get("text", "")) if isinstance(positive, dict) else ""
            return (pictures.imagine(int(latent["w"]), int(latent["h"]), int(latent["b"]), seed, text),)
        first = next((v for v in inputs.values() if isinstance(v, dict)), None)
        return (first,) if first else ("model", "clip", "vae")

    def _current_inputs(self, item: QueueItem, node_id: str, results: dict[str, Any]) -> dict[str, list[Any]]:
        """A failed node's inputs as ComfyUI's execution_error tells them: in the prompt's order, each
        a list of its values (a link's, what it carried; nothing, if that did not run), then the
        class's hidden inputs (the prompt as Python prints a dict)."""
        node = item.prompt[node_id]
        declared = self.object_info[node["class_type"]]["input"]
        known = {**declared.get("required", {}), **declared.get("optional", {})}
        current = {
            name: [_format_input(self._resolve(value, results) if _is_link(value) else value)]
            for name, value in (node.get("inputs") or {}).items()
            if name in known
        }
        hidden = {"PROMPT": item.prompt, "EXTRA_PNGINFO": item.extra_data.get("extra_pnginfo"), "UNIQUE_ID": node_id}
        for name, kind in declared.get("hidden", {}).items():
            current[name] = [_format_input(hidden.get(kind))]
        return current

    def _write_outputs(
        self, node: dict[str, Any], node_id: str, results: dict[str, Any], pid: str
    ) -> dict[str, Any] | None:
        kind = node["class_type"]
        if kind not in ("SaveImage", "PreviewImage"):
            return None
        image = self._resolve(node["inputs"].get("images"), results) or {"w": 64, "h": 64, "b": 1, "c": 0}
        if kind == "SaveImage":
            folder, file_type = self.output_dir, "output"
            prefix = str(node["inputs"].get("filename_prefix", "ComfyUI"))
        else:
            folder, file_type = self.temp_dir, "temp"
            prefix = "ComfyUI_temp_" + pid[:5]
        subfolder, _, stem = prefix.rpartition("/")
        target = (folder / subfolder).resolve()
        if not target.is_relative_to(folder.resolve()):
            raise NodeFailure("Saving image outside the output folder is not allowed.", "Exception")
        target.mkdir(parents=True, exist_ok=True)
        counter = _next_counter(target, stem)
        data = pictures.to_png(image)
        images = []
        for index in range(max(1, int(image["b"]))):
            filename = f"{stem}_{counter + index:05}_.png"
            (target / filename).write_bytes(data)
            entry = {"filename": filename, "subfolder": subfolder, "type": file_type}
            if self.jobs_api:  # newer releases register each output as an asset
                asset = str(uuid.uuid4())
                entry.update(id=asset, preview_id=asset)
            images.append(entry)
        if kind == "SaveImage" and self.faults.video_mb > 0:
            video = f"{stem}_{counter:05}_.mp4"
            _sparse_mp4(target / video, self.faults.video_mb << 20)
            clip = {"filename": video, "subfolder": subfolder, "type": file_type, "format": "video/h264-mp4"}
            return {"images": images, "gifs": [clip]}
        return {"images": images}

    def _store_history(self, item: QueueItem, outputs: dict[str, Any], outcome: str, messages: list[list[Any]]) -> None:
        status = {"status_str": "success" if outcome == "success" else "error", "completed": outcome == "success"}
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs}
        self.history[item.prompt_id] = {
            "prompt": item.as_list(),
            "outputs": outputs,
            "status": {**status, "messages": messages},
            "meta": meta,
        }
        while len(self.history) > HISTORY_LIMIT:
            self.history.pop(next(iter(self.history)))


def _queue_job(item: QueueItem, status: str, full: bool = False) -> dict[str, Any]:
    job = {"id": item.prompt_id, "status": status, "priority": item.number, "outputs_count": 0}
    if "create_time" in item.extra_data:
        job["create_time"] = item.extra_data["create_time"]
    job["previewable_outputs_count"] = 0
    if full:
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.extra_data}
    return job


def _history_job(prompt_id: str, entry: dict[str, Any], full: bool = False) -> dict[str, Any]:
    status = entry["status"]
    events = {name: data for name, data in status["messages"]}
    if status["status_str"] == "success":
        state = "completed"
    else:
        state = "cancelled" if "execution_interrupted" in events else "failed"
    files = [f for node in entry["outputs"].values() for f in node.get("images", [])]
    job: dict[str, Any] = {"id": prompt_id, "status": state, "priority": entry["prompt"][0]}
    if "create_time" in entry["prompt"][3]:
        job["create_time"] = entry["prompt"][3]["create_time"]
    if "execution_start" in events:
        job["execution_start_time"] = events["execution_start"]["timestamp"]
    end = next(
        (events[e] for e in ("execution_success", "execution_error", "execution_interrupted") if e in events), None
    )
    if end is not None:
        job["execution_end_time"] = end["timestamp"]
    if "execution_error" in events:
        job["execution_error"] = events["execution_error"]
    job["outputs_count"] = job["previewable_outputs_count"] = len(files)
    if files:
        node_id = next(n for n, node in entry["outputs"].items() if node.get("images"))
        job["preview_output"] = {**files[0], "nodeId": node_id, "mediaType": "images"}
    if full:
        job["outputs"] = entry["outputs"]
        job["execution_status"] = status
        job["workflow"] = {"prompt": entry["prompt"][2], "extra_data": entry["prompt"][3]}
    return job


def _injected_node_error(prompt: Any) -> dict[str, Any]:
    """ComfyUI's answer to a value it refuses, for the first node of the prompt."""
    node_id, node = next(iter(prompt.items())) if isinstance(prompt, dict) and prompt else ("1", {})
    error = _error("custom_validation_failed", "Custom validation failed for node", "injected failure")
    entry = {"errors": [error], "dependent_outputs": [node_id], "class_type": node.get("class_type", "")}
    body = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
    return {"error": body, "node_errors": {node_id: entry}}


def _format_input(value: Any) -> Any:
    """ComfyUI sends a plain value as it is and anything else as Python's str of it; a picture here
    is no tensor, so its text says what it stands for."""
    if value is None or isinstance(value, int | float | bool | str):
        return value
    if isinstance(value, dict) and {"w", "h", "b"} <= value.keys():
        return f"tensor(<emulated image: batch {value['b']}, {value['w']}x{value['h']}>)"
    return str(value)


def _sparse_mp4(path: Path, size: int) -> None:
    """An MP4 whose boxes account for every byte (ftyp, then one mdat of zeros to the end)."""
    ftyp = struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 512) + b"isomiso2"
    with path.open("wb") as handle:
        handle.write(ftyp + struct.pack(">I", size - len(ftyp)) + b"mdat")
        handle.truncate(size)


def _canonical_uuid(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _now_ms() -> int:
    return int(time.time() * 1000)


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 30, node_id)


def _node_state(pid: str, node_id: str, value: float, maximum: float, state: str) -> dict[str, Any]:
    return {
        "value": value,
        "max": maximum,
        "state": state,
        "node_id": node_id,
        "prompt_id": pid,
        "display_node_id": node_id,
        "parent_node_id": None,
        "real_node_id": node_id,
    }


def _execution_order(prompt: dict[str, Any], outputs: list[str], cached: Set[str] = frozenset()) -> list[str]:
    """Dependencies before dependants, starting from each output in turn, as ComfyUI stages them. A
    cached node needs nothing it reads; it has a turn only if it is an output (to tell its result)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str, output: bool) -> None:
        if node_id in seen or (node_id in cached and not output):
            return
        seen.add(node_id)
        if node_id not in cached:
            for value in (prompt[node_id].get("inputs") or {}).values():
                if _is_link(value) and value[0] in prompt:
                    visit(value[0], False)
        order.append(node_id)

    for output in outputs:
        visit(output, True)
    return order


def _content_digest(path: Path) -> str:
    """A file's sha256; one that cannot be read gets a value no other run has (never a cache hit),
    as ComfyUI's IS_CHANGED that raises gives NaN."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return uuid.uuid4().hex


def _signatures(prompt: dict[str, Any], order: list[str], fingerprints: dict[str, str]) -> dict[str, str]:
    """A node's cache key: its class, its IS_CHANGED fingerprint if it has one, and its inputs, with
    links replaced by their source's key."""
    keys: dict[str, str] = {}
    for node_id in order:
        node = prompt[node_id]
        inputs = {
            k: (keys.get(v[0], ""), v[1]) if _is_link(v) else v for k, v in sorted((node.get("inputs") or {}).items())
        }
        signature = [node["class_type"], fingerprints.get(node_id), inputs]
        keys[node_id] = hashlib.sha1(orjson.dumps(signature)).hexdigest()
    return keys


def _next_counter(folder: Path, stem: str) -> int:
    """SaveImage lists its folder on every save to find the next number, like ComfyUI."""
    pattern = re.compile(re.escape(stem) + r"_(\d{5})_")
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return max(numbers, default=0) + 1


def _text_frame(node_id: str, text: str) -> bytes:
    node = node_id.encode()
    return struct.pack(">II", 3, len(node)) + node + text.encode()
