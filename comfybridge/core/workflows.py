"""Workflow store: API-format files, their aliases and exposed inputs, and per-job patched copies."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import orjson

from ..errors import BadInput, TooLarge, UnknownWorkflow, WorkflowConfigError

__all__ = ["InputSpec", "Workflow", "WorkflowStore"]

log = logging.getLogger(__name__)
VIEWS_KEPT = 64  # views of the workflows kept at once (see WorkflowStore.view)
WHOLE = 2**53  # the largest whole float that is exactly the integer it reads as

ALIAS_FILE = "workflow_alias.json"
ALIAS_KEYS = frozenset({"alias", "fn", "description", "thumbnail", "inputs"})  # what an alias entry may hold
MEDIA_EXTENSIONS = {
    "image": {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"},
    "video": {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"},
    "audio": {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus"},
}
# Loader nodes whose named input is a file in ComfyUI's input folder, and the kind of file.
FILE_LOADERS = {
    "LoadImage": "image",
    "LoadImageMask": "image",
    "LoadImageOutput": "image",
    "LoadVideo": "video",
    "VHS_LoadVideo": "video",
    "LoadAudio": "audio",
    "VHS_LoadAudio": "audio",
}
FILE_INPUT_NAMES = {"image", "video", "audio", "file", "upload"}
_TYPES: list[tuple[type, str]] = [(bool, "bool"), (int, "int"), (float, "float"), (str, "str")]


def media_kind_of_name(name: str) -> str | None:
    suffix = Path(name).suffix.lower()
    return next((kind for kind, exts in MEDIA_EXTENSIONS.items() if suffix in exts), None)


@dataclass
class InputSpec:
    """One exposed input, `node/name`, with what /workflow-info tells about it."""

    node_id: str
    name: str
    type: str
    title: str
    class_type: str
    default: Any
    upload: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: list[Any] | None = None
    description: str | None = None

    @property
    def key(self) -> str:
        return f"{self.node_id}/{self.name}"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "class": self.class_type,
            "default": self.default,
        }
        optional = {
            "upload": self.upload,
            "min": self.minimum,
            "max": self.maximum,
            "choices": self.choices,
            "description": self.description,
        }
        info.update({k: v for k, v in optional.items() if v is not None})
        return info

    def check(self, value: Any, upload_kind: Callable[[str], str | None], max_text: int) -> None:
        """Raise BadInput when `value` does not fit this input (TooLarge for a text over `max_text` bytes)."""
        if self.type == "float":
            fits = isinstance(value, int | float) and not isinstance(value, bool)
        elif self.type == "int":
            fits = isinstance(value, int) and not isinstance(value, bool)
        else:
            fits = isinstance(value, {"str": str, "bool": bool}[self.type])
        if not fits:
            got = _json_type(value)
            # The JSON parser reads an integer past 64 bits as a float (1e19, inside them, is a float).
            if got == "float" and self.type == "int" and (value >= 2**64 or value <= -(2**63)):
                got = "a whole number over 64 bits"
            article = "an" if self.type == "int" else "a"
            raise BadInput(f"Input '{self.key}' must be {article} {self.type}, got {got}.")
        if isinstance(value, str) and len(value) > max_text // 4 and len(value.encode()) > max_text:
            raise TooLarge(
                f"Input '{self.key}' is {len(value.encode())} bytes long, over the limit of {max_text / 1024:g} KB "
                f"({max_text} bytes, max_text_kb)."
            )
        if self.upload:
            if value == self.default:
                return
            kind = upload_kind(value)
            if kind is None:
                raise BadInput(
                    f"Input '{self.key}' names no uploaded file: {value!r}. Upload it with POST /upload first."
                )
            if kind and kind != self.upload:
                raise BadInput(f"Input '{self.key}' takes an {self.upload} file, but {value!r} is {kind}.")
            return
        if self.minimum is not None and value < self.minimum:
            raise BadInput(f"Input '{self.key}' must be at least {self.minimum}, got {value}.")
        if self.maximum is not None and value > self.maximum:
            raise BadInput(f"Input '{self.key}' must be at most {self.maximum}, got {value}.")
        if self.choices is not None and value not in self.choices:
            shown = ", ".join(map(str, self.choices[:20])) + (", ..." if len(self.choices) > 20 else "")
            raise BadInput(f"Input '{self.key}' must be one of: {shown}; got {value!r}.")


@dataclass
class Workflow:
    alias: str
    path: Path
    raw: bytes  # the file as loaded; every job decodes its own copy from it
    inputs: dict[str, InputSpec]
    description: str = ""
    thumbnail: Path | None = None  # a picture of what it makes, inside the workflow folder

    def catalogue_entry(self, root: str = "") -> dict[str, Any]:
        """The workflow as the catalogue shows it: name, description, thumbnail link (under `root`, the
        path a proxy serves the bridge at), inputs."""
        thumbnail = f"{root}/workflow-thumbnail?workflow={quote(self.alias)}" if self.thumbnail else None
        return {
            "name": self.alias,
            "description": self.description,
            "thumbnail": thumbnail,
            "inputs": self.describe_inputs(),
        }

    def describe_inputs(self) -> dict[str, dict[str, Any]]:
        return {key: spec.describe() for key, spec in self.inputs.items()}

    def file_inputs(self) -> list[InputSpec]:
        return [spec for spec in self.inputs.values() if spec.upload]

    def build(self, values: dict[str, Any]) -> dict[str, Any]:
        """A fresh copy of the graph with `values` (already checked) patched in."""
        prompt: dict[str, Any] = orjson.loads(self.raw)
        for key, value in values.items():
            spec = self.inputs[key]
            prompt[spec.node_id]["inputs"][spec.name] = value
        return prompt

    def check_request(
        self, body: dict[str, Any], upload_kind: Callable[[str], str | None], max_text: int
    ) -> dict[str, Any]:
        """The client's inputs, checked; raises BadInput (or TooLarge) naming what is wrong."""
        values = {k: v for k, v in body.items() if k != "workflow"}
        unknown = sorted(set(values) - set(self.inputs))
        if unknown:
            allowed = ", ".join(self.inputs) or "none"
            raise BadInput(f"Unknown input {unknown[0]!r} for workflow '{self.alias}'. Allowed inputs: {allowed}.")
        for key, value in values.items():
            spec = self.inputs[key]
            if spec.type == "int" and isinstance(value, float) and value.is_integer() and abs(value) <= WHOLE:
                # 16.0 is an integer to JSON Schema (the OpenAPI document's): taken as 16, if exact.
                values[key] = value = int(value)
            spec.check(value, upload_kind, max_text)
        return values


class WorkflowStore:
    """Every workflow the admin put in the folder, by alias. Loaded once at start-up."""

    def __init__(self, workflows: dict[str, Workflow]) -> None:
        self._workflows = workflows
        # Views built from every workflow (a catalogue, a schema document): thousands of workflows
        # take tens of ms to describe, too long to do again for each request. Emptied on any change.
        self._views: dict[Hashable, bytes] = {}

    def view(self, key: Hashable, build: Callable[[], bytes]) -> bytes:
        """`build()`, kept until the workflows or what is known of their inputs change."""
        built = self._views.get(key)
        if built is None:
            if len(self._views) >= VIEWS_KEPT:  # a key per set of allowed workflows: a few at most
                self._views.clear()
            built = self._views[key] = build()
        return built

    @classmethod
    def load(cls, folder: Path) -> WorkflowStore:
        """Every workflow of the folder, or WorkflowConfigError naming what is wrong: a folder or file
        that cannot be read is one too, never a folder read as empty (as a glob would)."""
        try:
            return cls._load(folder)
        except OSError as exc:
            raise WorkflowConfigError(f"{exc.filename or folder} cannot be read: {exc.strerror or exc}") from None

    @classmethod
    def _load(cls, folder: Path) -> WorkflowStore:
        if not folder.is_dir():
            raise WorkflowConfigError(f"workflow folder {folder} does not exist")
        entries = _read_alias_file(folder / ALIAS_FILE)
        named = {entry["fn"] for entry in entries}
        for path in sorted(p for p in folder.iterdir() if p.name.endswith(".json")):
            try:
                path.name.encode()
            except UnicodeEncodeError:  # bytes of another encoding: no JSON answer could name it
                raise WorkflowConfigError(f"{folder}: file name {path.name!r} is not UTF-8; rename it") from None
            if path.name != ALIAS_FILE and path.name not in named:
                entries.append({"alias": path.stem, "fn": path.name, "found": True})
        workflows: dict[str, Workflow] = {}
        for entry in entries:
            alias = entry["alias"]
            if alias in workflows:
                raise WorkflowConfigError(f"{folder / ALIAS_FILE}: alias {alias!r} is defined twice")
            workflows[alias] = _load_workflow(folder, entry)
        log.info("loaded %d workflows from %s: %s", len(workflows), folder, ", ".join(sorted(workflows)))
        return cls(workflows)

    def aliases(self) -> list[str]:
        return sorted(self._workflows)

    def replace_with(self, fresh: WorkflowStore) -> None:
        """Serve the workflows of a folder read again (SIGHUP); jobs already accepted keep their prompt."""
        self._workflows = fresh._workflows
        self._views.clear()
        log.info("workflows reloaded: %s", ", ".join(self.aliases()))

    def get(self, alias: Any) -> Workflow:
        if not isinstance(alias, str) or not alias:
            raise BadInput("The 'workflow' field is required: the alias of a workflow from GET /workflow-list.")
        try:
            return self._workflows[alias]
        except KeyError:
            raise UnknownWorkflow(
                f"Unknown workflow {alias!r}. Available workflows: {', '.join(self.aliases()) or 'none'}."
            ) from None

    def node_classes(self) -> set[str]:
        """The node classes whose definitions tell something of the exposed inputs (files aside)."""
        return {spec.class_type for w in self._workflows.values() for spec in w.inputs.values() if not spec.upload}

    def apply_object_info(self, object_info: dict[str, Any]) -> None:
        """Learn min/max/choices/description of exposed inputs from a backend's /object_info."""
        self._views.clear()
        for workflow in self._workflows.values():
            for spec in workflow.inputs.values():
                node_info = object_info.get(spec.class_type)
                if spec.upload or not isinstance(node_info, dict):
                    continue
                sections = node_info.get("input")
                sections = sections if isinstance(sections, dict) else {}
                config = None
                for part in ("required", "optional"):
                    inputs = sections.get(part)
                    if config is None and isinstance(inputs, dict):
                        config = inputs.get(spec.name)
                if not isinstance(config, list) or not config:
                    continue
                _type_from(spec, config[0])
                options = config[1] if len(config) > 1 and isinstance(config[1], dict) else {}
                # Choices come as the first item, or (newer nodes: SaveVideo's codec) as "COMBO" and its options.
                choices = options.get("options") if config[0] == "COMBO" else config[0]
                if isinstance(choices, list) and all(isinstance(c, str | int | float) for c in choices):
                    spec.choices = list(choices)
                if _is_number(options.get("min")):
                    spec.minimum = options["min"]
                if _is_number(options.get("max")):
                    spec.maximum = options["max"]
                if isinstance(options.get("tooltip"), str):
                    spec.description = options["tooltip"]


def _type_from(spec: InputSpec, declared: Any) -> None:
    """A number input takes the type its node declares: "Save (API Format)" writes a FLOAT of 8.0 as
    `8`, which alone would make `cfg` an int and refuse 7.5."""
    if declared == "FLOAT" and spec.type == "int":
        spec.type = "float"
    elif declared == "INT" and spec.type == "float" and float(spec.default).is_integer():
        spec.type, spec.default = "int", int(spec.default)


def _read_alias_file(path: Path) -> list[dict[str, Any]]:
    """Both forms: `{"alias": "file.json"}` or a list of `{"alias", "fn", "description", ...}`."""
    if not path.is_file():
        return []
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise WorkflowConfigError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        if "" in map(str.strip, data):
            raise WorkflowConfigError(f"{path}: an alias is empty")
        return [{"alias": alias, "fn": fn} for alias, fn in data.items()]
    if isinstance(data, list):
        entries = []
        for index, entry in enumerate(data):
            if not (
                isinstance(entry, dict) and isinstance(entry.get("alias"), str) and isinstance(entry.get("fn"), str)
            ):
                raise WorkflowConfigError(f"{path}: entry {index} needs string 'alias' and 'fn' fields")
            if not entry["alias"].strip():
                raise WorkflowConfigError(f"{path}: entry {index} has an empty alias")
            unknown = sorted(set(entry) - ALIAS_KEYS)
            if unknown:  # a typo ("input") would leave the workflow exposing nothing, unsaid
                known = ", ".join(sorted(ALIAS_KEYS))
                where = f"{path}: entry {entry['alias']!r}"
                raise WorkflowConfigError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
            inputs = entry.get("inputs", [])
            if not (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs)):
                raise WorkflowConfigError(f"{path}: entry {entry['alias']!r}: 'inputs' must be a list of 'node/input'")
            entries.append(dict(entry))
        return entries
    raise WorkflowConfigError(f'{path}: expected {{"alias": "file.json"}} or a list of alias objects')


def _load_workflow(folder: Path, entry: dict[str, Any]) -> Workflow:
    name = entry["fn"]
    path = folder / name
    # A path inside the folder; a link there is the admin's own and is followed wherever it points.
    why = (
        "is not a path inside the workflow folder" if PurePosixPath(name).is_absolute() or ".." in Path(name).parts
        else "is a link to nothing" if path.is_symlink() and not path.exists()
        else "does not exist" if not path.exists()
        else "is not a regular file" if not path.is_file()
        else None
    )  # fmt: skip
    if why is not None:
        where = (
            str(path)
            if entry.get("found")
            else f"{folder / ALIAS_FILE}: alias {entry['alias']!r} names {name!r}, which"
        )
        raise WorkflowConfigError(f"{where} {why}")
    raw = path.read_bytes()
    try:
        graph = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WorkflowConfigError(f"{path}: not valid JSON ({exc})") from None
    if not _is_api_format(graph):
        raise WorkflowConfigError(
            f"{path}: not an API-format ComfyUI workflow (expected {{node_id: {{class_type, inputs}}}}; "
            "export it with 'Save (API Format)')"
        )
    wanted: list[tuple[str, str]] = []
    for node_id, node in graph.items():
        marker = node.get("_meta", {}).get("apiinput") if isinstance(node.get("_meta"), dict) else None
        if isinstance(marker, list) and all(isinstance(name, str) for name in marker):
            marker = ",".join(marker)  # ["seed", "text"], as one might well write it
        if isinstance(marker, str):
            wanted += [(node_id, name.strip()) for name in marker.split(",") if name.strip()]
        elif marker is not None:
            raise WorkflowConfigError(f'{path}: node {node_id}: _meta.apiinput must name inputs, as "seed, text"')
    for key in entry.get("inputs", []):
        node_id, _, name = key.partition("/")
        if not name:
            raise WorkflowConfigError(f"{path}: exposed input {key!r} must be written 'node/input'")
        wanted.append((node_id, name))
    inputs: dict[str, InputSpec] = {}
    for node_id, name in wanted:
        spec = _input_spec(path, graph, node_id, name)
        inputs.setdefault(spec.key, spec)
    return Workflow(
        alias=entry["alias"],
        path=path,
        raw=raw,
        inputs=inputs,
        description=str(entry.get("description") or ""),
        thumbnail=_thumbnail(folder, entry),
    )


THUMBNAIL_TYPES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}


def _thumbnail(folder: Path, entry: dict[str, Any]) -> Path | None:
    """The alias file's `thumbnail`: a picture inside the workflow folder, checked at load."""
    name = entry.get("thumbnail")
    if not name:
        return None
    path = folder / str(name)
    where = f"{folder / ALIAS_FILE}: alias {entry['alias']!r}"
    if not path.resolve().is_relative_to(folder.resolve()) or not path.is_file():
        raise WorkflowConfigError(f"{where}: thumbnail {name!r} is not a file in {folder}")
    if path.suffix.lower() not in THUMBNAIL_TYPES:
        raise WorkflowConfigError(f"{where}: thumbnail {name!r} must be {', '.join(sorted(THUMBNAIL_TYPES))}")
    return path


def _is_api_format(graph: Any) -> bool:
    return (
        isinstance(graph, dict)
        and bool(graph)
        and all(
            isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(node.get("inputs"), dict)
            for node in graph.values()
        )
    )


def _input_spec(path: Path, graph: dict[str, Any], node_id: str, name: str) -> InputSpec:
    node = graph.get(node_id)
    if node is None:
        raise WorkflowConfigError(f"{path}: exposed input '{node_id}/{name}': node {node_id} does not exist")
    if name not in node["inputs"]:
        raise WorkflowConfigError(f"{path}: exposed input '{node_id}/{name}': node {node_id} has no input {name!r}")
    default = node["inputs"][name]
    if isinstance(default, list):
        raise WorkflowConfigError(
            f"{path}: exposed input '{node_id}/{name}' is a link to another node ({default}), not a value"
        )
    kind = next((label for py_type, label in _TYPES if isinstance(default, py_type)), None)
    if kind is None:
        raise WorkflowConfigError(f"{path}: exposed input '{node_id}/{name}' has no usable default value")
    class_type = node["class_type"]
    meta = node.get("_meta") if isinstance(node.get("_meta"), dict) else {}
    upload = None
    if kind == "str":
        by_name = media_kind_of_name(default)
        if class_type in FILE_LOADERS and name in FILE_INPUT_NAMES:
            upload = FILE_LOADERS[class_type]
        elif by_name and (name in FILE_INPUT_NAMES or class_type.startswith("Load")):
            upload = by_name
    return InputSpec(
        node_id=node_id,
        name=name,
        type=kind,
        title=str(meta.get("title") or class_type),
        class_type=class_type,
        default=default,
        upload=upload,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    for py_type, label in ((int, "int"), (float, "float"), (str, "str"), (list, "list"), (dict, "object")):
        if isinstance(value, py_type):
            return label
    return "null"
