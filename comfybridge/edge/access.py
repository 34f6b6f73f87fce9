"""Who may call, and how much: API keys (each key its own namespace of clientIds, optionally limited to
some workflows), the caller's address behind trusted proxies, request rates, and CORS."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..core.clients import SCOPE, check_client_id
from ..core.webhooks import check_url
from ..errors import BadInput, Forbidden, RateLimited, Unauthorized

__all__ = ["CALLER", "KEY", "AccessPolicy", "KeyFileError", "KeyRing", "RateLimiter", "client_id_of", "scoped"]

log = logging.getLogger(__name__)

# Served without a key: a static page (the document it shows needs a key when keys are on), and the
# probes a load balancer calls (they show details only to a caller with a key).
OPEN_PATHS = {"/docs", "/docs/", "/health", "/ready", "/metrics", "/playground"}  # /metrics checks its own key
OPEN_PREFIXES = ("/playground/",)  # the playground's own files: plain, public
KEY_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,64}")
TOKEN_PATHS = {"/ws", "/workflow-thumbnail"}


class KeyFileError(Exception):
    """An API key file that cannot be used; start-up stops and names it."""


@dataclass(frozen=True)
class ApiKey:
    name: str  # shown in logs and scoped clientIds, never the secret
    secret: bytes = field(repr=False)
    workflows: frozenset[str] | None = None  # None: every workflow
    webhook: str | None = None  # where its jobs' ends are told, unless a request names another

    def check_workflow(self, alias: str) -> None:
        if self.workflows is not None and alias not in self.workflows:
            raise Forbidden(f"This API key may not use workflow {alias!r}.")


class KeyRing:
    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = list(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, plain: Sequence[str], key_file: Path | None) -> KeyRing:
        """Keys from the settings (all workflows) and from a JSON file:
        `[{"name": "studio", "key": "...", "workflows": ["text-to-image"], "webhook": "https://..."}, ...]`."""
        keys = [ApiKey(f"key{index}", secret.encode()) for index, secret in enumerate(plain, 1)]
        if key_file is not None:
            try:
                entries = orjson.loads(key_file.read_bytes())
                for entry in entries:
                    workflows = entry.get("workflows")
                    keys.append(
                        ApiKey(
                            str(entry["name"]),
                            str(entry["key"]).encode(),
                            frozenset(map(str, workflows)) if workflows is not None else None,
                            check_url(entry["webhook"]) if entry.get("webhook") else None,
                        )
                    )
            except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError, BadInput) as exc:
                raise KeyFileError(
                    f"API key file {key_file}: cannot be used ({exc.__class__.__name__}: {exc})"
                ) from None
        names = [k.name for k in keys]
        if len(set(names)) != len(names) or not all(KEY_NAME.fullmatch(n) for n in names):
            # A name becomes part of folder and object names (its clients' uploads): nothing that could escape.
            raise KeyFileError("API key names must be unique, 1-64 characters of A-Z a-z 0-9 _ . - (not only dots)")
        short = [
            f"key {k.name.removeprefix('key')} of api_keys" if index < len(plain) else f"key {k.name!r} in {key_file}"
            for index, k in enumerate(keys)
            if len(k.secret) < 16
        ]
        if short:
            raise KeyFileError(f"API keys must be at least 16 characters long; shorter: {', '.join(short)}")
        return cls(keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key matching `presented`, compared in constant time against every key."""
        candidate = presented.encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(candidate, key.secret):
                found = key
        return found


KEY = web.RequestKey("api_key", ApiKey)
CALLER = web.RequestKey("caller", str)  # the client's address, behind trusted proxies


def presented_key(request: web.Request) -> str | None:
    """The API key the request carries. Two different ones (two headers, or both kinds) are refused:
    which one the caller meant cannot be told, and trying the first would be a guess."""
    keys = set()
    for auth in request.headers.getall(hdrs.AUTHORIZATION, ()):
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            keys.add(value.strip())
    keys.update(value for value in request.headers.getall("X-API-Key", ()) if value)
    if request.path in TOKEN_PATHS:  # browsers set no headers on a WebSocket or an <img>
        keys.update(token for token in request.query.getall("token", ()) if token)
    if len(keys) > 1:
        raise Unauthorized("The request carries more than one API key; send one.")
    return keys.pop() if keys else None


def query_value(request: web.Request, name: str) -> str | None:
    """A query parameter given at most once; given twice, it is refused: which one the caller meant
    cannot be told, and taking the first would be a guess."""
    given = request.query.getall(name, ())
    if len(given) > 1:
        raise BadInput(f"{name} is given more than once; give it once.")
    return given[0] if given else None


def client_id_of(request: web.Request, required: bool = True) -> str | None:
    """The request's clientId, checked, as the core knows it (within the caller's API key)."""
    given = query_value(request, "clientId")
    if given is None and not required:
        return None
    return scoped(request, check_client_id(given))


def scoped(request: web.Request, client_id: str) -> str:
    """The clientId as the core knows it: within the caller's key, so keys never share clients."""
    key = request.get(KEY)
    return client_id if key is None else f"{key.name}{SCOPE}{client_id}"


# addresses and rates ---------------------------------------------------------------------------
def caller_address(request: web.Request, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The client's address: `X-Forwarded-For` is believed only when the peer is a trusted proxy,
    and then only up to the first hop that is not one."""
    peer = request.remote or ""
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    address = peer
    while _is_trusted(address, trusted) and hops:
        address = hops.pop()
    return address


def _is_trusted(address: str, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class RateLimiter:
    """A token bucket per caller: `rate` requests a second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: float, max_callers: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def allows(self, caller: str) -> bool:
        """Whether `take` would pass now (nothing is spent)."""
        tokens, at = self._buckets.get(caller, (self.burst, time.monotonic()))
        return min(self.burst, tokens + (time.monotonic() - at) * self.rate) >= 1.0

    def take(self, caller: str) -> None:
        """Spend one token of the caller's bucket, or raise RateLimited saying when to come back."""
        now = time.monotonic()
        tokens, at = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if len(self._buckets) >= self.max_callers:  # forget the longest-idle callers (dicts keep order)
            for stale in list(self._buckets)[: self.max_callers // 10]:
                del self._buckets[stale]
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise RateLimited(f"Too many requests; try again in {wait} s.", retry_after=wait)
        self._buckets[caller] = (tokens - 1.0, now)


@dataclass
class AccessPolicy:
    keys: KeyRing
    key_rate: RateLimiter | None = None
    ip_rate: RateLimiter | None = None
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    cors_origins: frozenset[str] = frozenset()
    # Cluster mode: the caller's address another bridge of the cluster relayed the request for.
    relayed_caller: Callable[[web.Request], str | None] = lambda request: None

    def middleware(self) -> Middleware:
        @web.middleware
        async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
            address = self.relayed_caller(request) or caller_address(request, self.trusted_proxies)
            request[CALLER] = address
            if self.ip_rate is not None:
                self.ip_rate.take(address)
            key = self._key(request)
            if key is not None:
                request[KEY] = key
                if self.key_rate is not None:
                    self.key_rate.take(key.name)
            return await handler(request)

        return access

    def _key(self, request: web.Request) -> ApiKey | None:
        """The caller's valid key; None with keys off, or on an open page without one. Raises
        Unauthorized for a missing or unknown key where one is needed."""
        if not self.keys.enabled:
            return None
        is_open = request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES)
        try:
            presented = presented_key(request)
        except Unauthorized:
            if not is_open:
                raise
            presented = None  # an open page needs no key: two of them are as good as none
        key = self.keys.find(presented) if presented else None
        if key is None and not is_open:
            raise Unauthorized(
                "A valid API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY` "
                "(`?token=KEY` on the WebSocket)."
                if presented is None
                else "That API key is not valid."
            )
        return key

    def admits(self, request: web.Request) -> bool:
        """Whether `middleware` will let the request through (its key, its rates), asked before it
        runs and spending nothing: a body is promised `100 Continue` only then."""
        address = self.relayed_caller(request) or caller_address(request, self.trusted_proxies)
        if self.ip_rate is not None and not self.ip_rate.allows(address):
            return False
        try:
            key = self._key(request)
        except Unauthorized:
            return False
        return key is None or self.key_rate is None or self.key_rate.allows(key.name)

    def cors_middleware(self) -> Middleware:
        """Preflights answered here; every other answer gets its headers in `cors_headers`."""

        @web.middleware
        async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method == "OPTIONS" and request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD):
                origin = request.headers.get(hdrs.ORIGIN)
                if not self._origin_allowed(origin):
                    refusal = orjson.dumps({"detail": f"Origin {origin!r} may not call this bridge."})
                    return web.Response(body=refusal, status=403, content_type="application/json")
                response = web.Response(status=204)
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "GET, POST, OPTIONS"
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = "Authorization, X-API-Key, Content-Type"
                response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = "600"
                return response
            return await handler(request)

        return cors

    def _origin_allowed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.cors_origins or origin in self.cors_origins)

    async def cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare`, with CORS on: every answer as its headers go out, results streamed
        from within their handler included. Each varies by Origin, so a cache keeps them apart."""
        vary = response.headers.get(hdrs.VARY)
        if not vary:
            response.headers[hdrs.VARY] = "Origin"
        elif "origin" not in vary.lower():
            response.headers[hdrs.VARY] = f"{vary}, Origin"
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and self._origin_allowed(origin):
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = "X-Detail, Retry-After"
