"""Settings: one table of options, read from flags, COMFYBRIDGE_* env, .env, a TOML file and defaults."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from dotenv import dotenv_values
from yarl import URL

from . import __version__
from .comfy.client import DIALECTS
from .core.webhooks import secret_from
from .store.s3 import parse_storage_url

__all__ = ["OPTIONS", "ConfigError", "Settings", "load_settings"]

DEFAULT_CONFIG = Path("config/comfybridge.toml")
SECRETS = {"database", "webhook_secret", "metrics_key", "api_keys"}  # settings whose values are never echoed
ENV_PREFIX = "COMFYBRIDGE_"
ROOT_PATH = re.compile(r"(/(?!\.+(/|$))[A-Za-z0-9._~-]+)+")  # nothing a link would escape; no . or ..


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    backends: tuple[str, ...] = ("http://127.0.0.1:8188",)
    workflows: Path = Path("workflows")
    data_dir: Path = Path("data")
    emulate: int = 0
    emulator_pace: float = 0.005
    emulator_dialect: str = "0.3.64"
    heartbeat: float = 1.0
    progress_every: float = 0.25
    disconnect_grace: float = 5.0
    job_idle_timeout: float = 60.0
    result_ttl: float = 86400.0
    upload_ttl: float = 3600.0
    max_upload_mb: float = 100.0
    max_request_mb: float = 500.0
    max_json_mb: float = 10.0
    max_upload_files: int = 16
    max_text_kb: float = 256.0
    max_result_mb: float = 8192.0
    inline_result_kb: float = 1024.0
    max_event_mb: float = 16.0
    result_retries: int = 8
    body_timeout: float = 60.0
    stop_grace: float = 5.0
    allowed_media: tuple[str, ...] = ("image", "video", "audio")
    max_frame_mp: float = 50.0
    max_total_mp: float = 200.0
    max_video_mp: float = 2000.0
    pipeline_depth: int = 1
    shutdown_timeout: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = True
    backend_grace: float = 10.0
    comfy_timeout: float = 30.0
    max_jobs_per_client: int = 0
    warm_slack: float = 0.05
    free_idle_after: float = 0.0
    free_every_jobs: int = 0
    free_below_vram_mb: float = 0.0
    free_below_ram_mb: float = 0.0
    delete_history: bool = True
    output_subfolder: bool = True
    comfy_outputs: tuple[tuple[str, Path], ...] = ()  # (backend URL, its output folder as seen here)
    delete_outputs: bool = True
    comfy_inputs: tuple[tuple[str, Path], ...] = ()  # (backend URL, its input folder as seen here)
    delete_inputs: bool = True
    drain: float = 0.0
    journal_sync: bool = True
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    rate_limit: float = 0.0
    rate_burst: float = 20.0
    ip_rate_limit: float = 0.0
    max_jobs_per_key: int = 0
    max_sockets_per_client: int = 8
    max_sockets_per_ip: int = 256
    trusted_proxies: tuple[str, ...] = ()
    root_path: str = ""
    cors_origins: tuple[str, ...] = ()
    ready_max_queue: int = 0
    metrics_key: str = ""
    webhook_secret: str = ""
    webhook_max_age: float = 86400.0
    webhook_allow_private: bool = False
    database: str = ""
    advertise_url: str = ""
    leader_timeout: float = 5.0
    storage: str = ""
    s3_endpoint: str = ""
    link_ttl: float = 3600.0
    s3_timeout: float = 10.0

    @property
    def own_url(self) -> str:
        """Where the other bridges of a cluster reach this one."""
        if self.advertise_url:
            return self.advertise_url
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        return f"http://{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{self.port}"

    @property
    def keys_on(self) -> bool:
        """Whether callers need an API key."""
        return bool(self.api_keys or self.api_keys_file)

    @property
    def state_file(self) -> Path:
        return self.data_dir / "current_state.json"

    @property
    def journal_file(self) -> Path:
        return self.data_dir / "journal.sqlite3"


# How each setting is parsed and checked: (parser, check, help). The check returns an error or None.
Parser = Callable[[Any], Any]


class Invalid(ValueError):
    """A value a parser refused, with what is wrong in words (shown after the value)."""


def _number(kind: type) -> Parser:
    wanted = "a whole number" if kind is int else "a number"

    def parse(value: Any) -> Any:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):  # TOML's 2.5 is no port
            raise Invalid(f"is not {wanted}")
        if isinstance(value, str):
            value = value.strip()
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise Invalid(f"is not {wanted}") from None
        if not math.isfinite(number):  # `inf` and `nan` parse, then overflow or compare false downstream
            raise Invalid(f"is not a finite {wanted.removeprefix('a ')}")
        return number

    return parse


def _flag_value(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise Invalid("is not true or false")


def _words(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(i).strip() for i in items if str(i).strip())


def _origins(value: Any) -> tuple[str, ...]:
    """Origins as a browser sends them (lowercase scheme://host[:port], the host in ASCII, no default
    port, no path): one copied from the address bar, with its `/`, or typed in capitals, matches."""
    origins = []
    for item in _words(value):
        if item == "*":
            origins.append(item)
            continue
        url = URL(item)
        bare = url.path in ("", "/") and not url.query_string and not url.fragment and url.user is None
        if url.scheme not in ("http", "https") or not url.host or not bare:
            raise Invalid(f"names {item!r}, which is not an origin (http(s)://host[:port], as a browser sends it)")
        port = f":{url.explicit_port}" if url.explicit_port is not None and not url.is_default_port() else ""
        origins.append(f"{url.scheme}://{url.host_subcomponent}{port}")
    return tuple(origins)


def _backends(value: Any) -> tuple[str, ...]:
    urls = []
    for item in _words(value):
        url = URL(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.host or (url.explicit_port is None and "://" not in item):
            raise Invalid(f"names {item!r}, which is not a ComfyUI host:port or http(s) URL")
        urls.append(str(url).rstrip("/"))
    if not urls:
        raise Invalid("names no ComfyUI (give host:port or URLs, comma-separated)")
    return tuple(urls)


def _backend_folders(value: Any) -> tuple[tuple[str, Path], ...]:
    """`URL=FOLDER` pairs: a comma list, or a TOML table of URL = folder."""
    pairs = value.items() if isinstance(value, dict) else (item.partition("=")[::2] for item in _words(value))
    found: dict[str, Path] = {}
    for url, folder in pairs:
        if not isinstance(folder, str) or not folder.strip():
            raise Invalid(f"must be URL=FOLDER pairs, e.g. http://127.0.0.1:8188=/opt/comfyui/output; got {url!r}")
        try:
            backend = _backends(url)[0]
        except ValueError:
            raise Invalid(f"names {url!r}, which is not a ComfyUI host:port or URL") from None
        if backend in found:
            raise Invalid(f"names {backend} twice")
        found[backend] = Path(folder.strip())
    return tuple(found.items())


def _optional_path(value: Any) -> Path | None:
    text = str(value).strip()
    return Path(text) if text else None


def _networks(value: Any) -> tuple[str, ...]:
    words = _words(value)
    for word in words:
        try:
            ipaddress.ip_network(word, strict=False)
        except ValueError:
            raise Invalid(f"names {word!r}, which is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return words


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _link_ttl(value: float) -> str | None:
    """What a SigV4 presigned link may live: whole seconds, from 1 to a week."""
    return None if 1 <= value <= 604800 else "must be from 1 to 604800 seconds (S3 signs links for a week at most)"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number (0-65535)"


def _database(value: str) -> str:
    """A PostgreSQL URL (host, or a socket folder in `?host=`), or empty; a bad one is refused without
    showing its password."""
    value = str(value).strip()
    if not value:
        return value
    try:
        url = URL(value)
        usable = url.scheme in ("postgresql", "postgres") and bool(url.host or url.query.get("host"))
        url.port  # noqa: B018 - a port out of range raises here
    except (ValueError, TypeError):
        usable = False
    if not usable:
        raise Invalid("must be empty (the SQLite journal) or a postgresql://user:password@host:port/database URL")
    return value


def _storage(value: str) -> str:
    value = str(value).strip()
    if value:
        try:
            parse_storage_url(value)
        except ValueError as exc:  # it says what is wrong
            raise Invalid(str(exc)) from None
    return value


def _endpoint(value: str) -> str:
    value = str(value).strip().rstrip("/")
    if value:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise Invalid("must be an http(s)://host[:port] URL of an S3-compatible server")
    return value


def _advertise_url(value: str) -> str:
    value = str(value).strip().rstrip("/")
    if value:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
            raise Invalid("must be empty or a base URL such as http://10.0.0.5:8188")
    return value


def _root_path(value: str) -> str:
    value = str(value).strip().rstrip("/")
    if value and not ROOT_PATH.fullmatch(value):
        raise Invalid("must be empty or a path such as /comfy or /api/comfy (letters, digits, - . _ ~ only)")
    return value


def _log_format(value: str) -> str | None:
    return None if value in ("text", "json") else "must be text or json"


def _webhook_secret(value: str) -> str | None:
    try:
        secret_from(value)
    except ValueError as exc:
        return str(exc)
    return None


def _dialect(value: str) -> str | None:
    return None if value in DIALECTS else f"is not a ComfyUI dialect the emulator speaks (use {' or '.join(DIALECTS)})"


def _media(value: tuple[str, ...]) -> str | None:
    bad = [v for v in value if v not in ("image", "video", "audio")]
    return f"unknown media kind {bad[0]!r} (use image, video, audio)" if bad else None


def _level(value: str) -> str | None:
    return None if value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "must be DEBUG, INFO, WARNING or ERROR"


OPTIONS: dict[str, tuple[Parser, Callable[[Any], str | None] | None, str]] = {
    "host": (str, None, "listen address"),
    "port": (_number(int), _port, "listen port"),
    "backends": (_backends, None, "comma list of ComfyUI host:port or URLs"),
    "workflows": (Path, None, "workflow folder (*.json + workflow_alias.json)"),
    "data_dir": (Path, None, "uploads, results, the job journal and current_state.json"),
    "emulate": (_number(int), _not_negative, "start N built-in ComfyUI emulators and use them as the backends"),
    "emulator_pace": (_number(float), _not_negative, "seconds each emulated node takes (with --emulate)"),
    "emulator_dialect": (str, _dialect, "ComfyUI the emulators speak like: 0.3.64, or jobs (later releases)"),
    "heartbeat": (_number(float), _positive, "seconds between `listening` frames"),
    "progress_every": (
        _number(float),
        _not_negative,
        "a job's progress frames come at most this often (0: every rise)",
    ),
    "disconnect_grace": (_number(float), _not_negative, "wait before a lost socket cancels its jobs"),
    "job_idle_timeout": (_number(float), _positive, "a job with no ComfyUI event this long fails"),
    "result_ttl": (_number(float), _positive, "seconds unfetched results (and finished clients) are kept"),
    "upload_ttl": (_number(float), _positive, "seconds unused uploads are kept"),
    "max_upload_mb": (_number(float), _positive, "largest file one upload part may be, in MB"),
    "max_request_mb": (_number(float), _positive, "largest whole upload request, in MB"),
    "max_json_mb": (_number(float), _positive, "largest JSON request body, in MB, counted after any decoding"),
    "max_upload_files": (_number(int), _positive, "most files in one upload request"),
    "max_text_kb": (_number(float), _positive, "longest text a workflow input may take, in KB (UTF-8)"),
    "max_result_mb": (_number(float), _positive, "largest output file a job may have, in MB (larger: the job fails)"),
    "inline_result_kb": (
        _number(float),
        _not_negative,
        "output files up to this size (KB) are kept in the journal, not as files",
    ),
    "max_event_mb": (_number(float), _positive, "largest ComfyUI event frame, in MB (larger: refused unread)"),
    "result_retries": (_number(int), _positive, "tries to copy a finished job's results before it fails"),
    "body_timeout": (_number(float), _positive, "seconds a request body may take (uploads: plus 1 s per 64 KB)"),
    "stop_grace": (
        _number(float),
        _not_negative,
        "on SIGTERM, seconds to keep serving while /ready and new jobs answer 503 (a load balancer drains)",
    ),
    "allowed_media": (_words, _media, "media kinds accepted by /upload (image, video, audio)"),
    "max_frame_mp": (_number(float), _positive, "largest frame an uploaded image may have, in megapixels"),
    "max_total_mp": (_number(float), _positive, "most pixels of all an uploaded image's frames, in megapixels"),
    "max_video_mp": (
        _number(float),
        _positive,
        "most pixels of all an uploaded video's frames, in megapixels (ComfyUI decodes them all to float32)",
    ),
    "pipeline_depth": (_number(int), _not_negative, "prompts queued in each ComfyUI behind the running one; 0: none"),
    "shutdown_timeout": (_number(float), _not_negative, "seconds in-flight requests get to finish on SIGTERM"),
    "log_level": (str, _level, "DEBUG, INFO, WARNING or ERROR"),
    "log_format": (str, _log_format, "text, or json (one object per line, with job and request fields)"),
    "access_log": (_flag_value, None, "a log line per request: method, route, status, duration, client (true/false)"),
    "webhook_secret": (str, _webhook_secret, "signs webhook calls (Standard Webhooks; whsec_<base64> or any text)"),
    "webhook_max_age": (_number(float), _positive, "seconds a webhook call is retried before it is given up"),
    "webhook_allow_private": (
        _flag_value,
        None,
        "let a request's _webhook point at loopback or private addresses (true/false)",
    ),
    "metrics_key": (str, None, "a token GET /metrics requires (Bearer); empty: the API keys, if any"),
    "ready_max_queue": (
        _number(int),
        _not_negative,
        "GET /ready answers 503 above this many waiting jobs (0: no limit)",
    ),
    "backend_grace": (_number(float), _not_negative, "seconds a backend may be away before its jobs move"),
    "comfy_timeout": (_number(float), _positive, "seconds to wait for a ComfyUI REST answer"),
    "max_jobs_per_client": (_number(int), _not_negative, "jobs one client may have in line (429 beyond; 0: no limit)"),
    "warm_slack": (_number(float), _not_negative, "how much later (a fraction of the job) a warm backend may finish"),
    "free_idle_after": (_number(float), _not_negative, "free a backend's memory after this many idle seconds (0: off)"),
    "free_every_jobs": (_number(int), _not_negative, "free a backend's memory every N jobs (0: off)"),
    "free_below_vram_mb": (_number(float), _not_negative, "free memory when free VRAM is under this (0: off)"),
    "free_below_ram_mb": (_number(float), _not_negative, "free memory when free RAM is under this (0: off)"),
    "delete_history": (_flag_value, None, "delete delivered prompts from ComfyUI's history (true/false)"),
    "output_subfolder": (_flag_value, None, "save each job's outputs in comfybridge/<day>/<job>/ (true/false)"),
    "comfy_outputs": (
        _backend_folders,
        None,
        "comma list of URL=FOLDER: a backend's output folder as this machine sees it, its outputs read "
        "from disk instead of fetched over GET /view (needs output_subfolder)",
    ),
    "delete_outputs": (
        _flag_value,
        None,
        "with comfy_outputs: delete each job's outputs from ComfyUI's folder once stored here (true/false)",
    ),
    "comfy_inputs": (
        _backend_folders,
        None,
        "comma list of URL=FOLDER: a backend's input folder as this machine sees it, uploads written there "
        "instead of sent over POST /upload/image (checked at each connect)",
    ),
    "delete_inputs": (
        _flag_value,
        None,
        "with comfy_inputs: delete each upload written into ComfyUI's folder once no unfinished job needs it "
        "(true/false)",
    ),
    "drain": (_number(float), _not_negative, "on SIGTERM, seconds to wait for jobs inside ComfyUI to finish (0: none)"),
    "journal_sync": (_flag_value, None, "fsync the job journal at every commit (false only for benchmarks)"),
    "api_keys": (_words, None, "comma list of API keys that may call the bridge (none: no keys needed)"),
    "api_keys_file": (_optional_path, None, 'JSON file of keys: [{"name", "key", "workflows"?}] ("": none)'),
    "rate_limit": (_number(float), _not_negative, "requests a second one API key may make (0: no limit)"),
    "rate_burst": (_number(float), _positive, "requests a key or address may make at once above its rate"),
    "ip_rate_limit": (_number(float), _not_negative, "requests a second one address may make (0: no limit)"),
    "max_jobs_per_key": (_number(int), _not_negative, "unfinished jobs one API key may have (429 beyond; 0: no limit)"),
    "max_sockets_per_client": (_number(int), _positive, "open WebSockets one clientId may have (429 beyond)"),
    "max_sockets_per_ip": (_number(int), _positive, "open WebSockets one address may have (429 beyond)"),
    "trusted_proxies": (_networks, None, "addresses (CIDR) whose X-Forwarded-For is believed, e.g. 127.0.0.1"),
    "root_path": (
        _root_path,
        None,
        "the path a proxy serves the bridge under, e.g. /comfy (the proxy strips it); links the bridge gives "
        "start with it",
    ),
    "cors_origins": (_origins, None, "origins browsers may call from (* for any; none: CORS off)"),
    "database": (
        _database,
        None,
        "empty: the SQLite journal in the data dir; postgresql://user:password@host:port/db: the jobs in PostgreSQL",
    ),
    "advertise_url": (
        _advertise_url,
        None,
        "with --database: the URL other bridges reach this one at (empty: http://host:port, loopback for 0.0.0.0)",
    ),
    "leader_timeout": (
        _number(float),
        _positive,
        "with --database: seconds the leading bridge may go without reaching the database before it stops leading",
    ),
    "storage": (
        _storage,
        None,
        "empty: uploads and results in folders under the data dir; s3://bucket/prefix: in object storage",
    ),
    "s3_endpoint": (_endpoint, None, "with s3:// storage: an S3-compatible server's URL (empty: AWS)"),
    "link_ttl": (_number(float), _link_ttl, "with s3:// storage: seconds a /history?resType=url link works"),
    "s3_timeout": (
        _number(float),
        _positive,
        "with s3:// storage: seconds to connect or to wait for an answer (3 tries)",
    ),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, as every other bad setting (argparse would print its whole usage first)."""
        raise ConfigError(f"{message} (python -m comfybridge --help lists the settings)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m comfybridge",
        description="One small API in front of many ComfyUI servers.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"comfybridge {__version__}")
    parser.add_argument("--config", type=Path, help=f"TOML config file (default {DEFAULT_CONFIG} when present)")
    defaults = Settings()
    for name, (_, _, help_text) in OPTIONS.items():
        default = _shown(getattr(defaults, name))
        parser.add_argument(_flag(name), dest=name, help=f"{help_text} (default: {default}) [{_env(name)}]")
    return parser


def _shown(value: Any) -> str:
    """A default as one would type it: a comma list, a plain number, `none`."""
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).replace("%", "%%")


def load_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Merge the sources, highest first: flags, COMFYBRIDGE_* env, .env, config file, defaults."""
    environ = os.environ if environ is None else environ
    cwd = cwd or Path.cwd()
    flags = vars(build_parser().parse_args(argv))
    dotenv = _read_dotenv(cwd / ".env")

    config_path = flags.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG") or dotenv.get(ENV_PREFIX + "CONFIG")
    file_values: dict[str, Any] = {}
    config_file = cwd / Path(config_path) if config_path else cwd / DEFAULT_CONFIG
    if config_path or config_file.is_file():
        file_values = _read_toml(config_file)

    raw: dict[str, tuple[Any, str]] = {}
    for key, value in file_values.items():
        if key not in OPTIONS:
            raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
        raw[key] = (value, f"{key} in {config_file}")
    for source, label in ((dotenv, str(cwd / ".env")), (environ, "environment")):
        if "COMFYUI_SERVERS" in source:
            raw["backends"] = (source["COMFYUI_SERVERS"], f"COMFYUI_SERVERS in {label}")
        for name in OPTIONS:
            if _env(name) in source:
                raw[name] = (source[_env(name)], f"{_env(name)} in {label}")
    for name, value in flags.items():
        raw[name] = (value, _flag(name))

    values: dict[str, Any] = {}
    for name, (value, origin) in raw.items():
        parse, check, _ = OPTIONS[name]
        shown = "(its value hidden)" if name in SECRETS else repr(value)
        try:
            parsed = parse(value)
        except (TypeError, ValueError) as exc:
            told = isinstance(exc, Invalid) or name in SECRETS
            why = str(exc) if told and str(exc) else f"is not a valid {name.replace('_', ' ')}"
            raise ConfigError(f"{origin}: {shown} {why}") from None
        problem = check(parsed) if check else None
        if problem:
            raise ConfigError(f"{origin}: {shown} {problem}")
        values[name] = parsed
    if "log_level" in values:
        values["log_level"] = values["log_level"].upper()
    if values.get("database") and values.get("emulate"):
        # Each bridge's emulators would die with it: the next leader could not adopt their prompts.
        raise ConfigError(
            f"{raw['emulate'][1]}: a cluster (--database) needs ComfyUI servers every bridge reaches: give "
            "--backends (start emulators with python -m comfybridge.emulator --port P)"
        )
    if values.get("emulate") and "backends" in flags and "emulate" in flags:
        raise ConfigError("--backends and --emulate: the emulators are the backends; give one or the other")
    settings = _resolve_paths(replace(Settings(), **values), cwd)
    for name in ("comfy_outputs", "comfy_inputs"):
        if getattr(settings, name):
            _check_backend_folders(settings, name, raw[name][1])
    return settings


def _check_backend_folders(settings: Settings, name: str, origin: str) -> None:
    """Each folder must belong to a backend and be a folder; and job outputs must carry their job's
    id in their names (`output_subfolder`), so a folder set wrongly can never hand over another
    prompt's file of the same name: it only sends the bridge back to /view."""
    if settings.emulate:
        raise ConfigError(f"{origin}: the built-in emulators are reached over HTTP; leave it out with --emulate")
    if name == "comfy_outputs" and not settings.output_subfolder:
        raise ConfigError(f"{origin}: reading outputs from a folder needs output_subfolder = true")
    for url, folder in getattr(settings, name):
        if url not in settings.backends:
            raise ConfigError(f"{origin}: {url} is not one of the backends ({', '.join(settings.backends)})")
        if not folder.is_dir():
            raise ConfigError(f"{origin}: {folder} (for {url}) is not a folder")


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        return {k: v for k, v in dotenv_values(path).items() if v is not None}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {_unreadable(exc)}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {_unreadable(exc)}") from None
    # Accept both a flat file and one with a [comfybridge] table, not both at once: what sits beside
    # the table would be dropped without a word.
    if "comfybridge" not in data:
        return data
    section, beside = data["comfybridge"], sorted(set(data) - {"comfybridge"})
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: comfybridge must be a table of settings ([comfybridge])")
    if beside:
        raise ConfigError(
            f"config file {path}: {', '.join(beside)} beside the [comfybridge] table; "
            "put every setting under the table, or none"
        )
    return dict(section)


def _unreadable(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"it is not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start})"
    return exc.strerror or str(exc)


def _resolve_paths(settings: Settings, cwd: Path) -> Settings:
    keys = cwd / settings.api_keys_file if settings.api_keys_file is not None else None
    return replace(
        settings,
        workflows=cwd / settings.workflows,
        data_dir=cwd / settings.data_dir,
        api_keys_file=keys,
        comfy_outputs=tuple((url, cwd / folder) for url, folder in settings.comfy_outputs),
        comfy_inputs=tuple((url, cwd / folder) for url, folder in settings.comfy_inputs),
    )
