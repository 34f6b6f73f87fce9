"""Webhooks: telling an app that its job ended, signed as Standard Webhooks sign them, retried
with backoff until acknowledged, delivered at least once.

A delivery is recorded in the journal in the same transaction as the job's end, so a restart
resumes it; it is forgotten once the receiver answers 2xx (or after `max_age`). A slow, failing or
dead receiver costs a task and a few requests, never a job or the bridge."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from ..errors import BadInput
from .clients import scope_of, unscoped

__all__ = [
    "FIRST_RETRY",
    "NAT64",
    "PublicOnlyResolver",
    "Webhooks",
    "check_public",
    "check_url",
    "delivery_for",
    "internal",
    "secret_from",
    "sign",
    "webhook_session",
]

log = logging.getLogger(__name__)

FIRST_RETRY = 1.0  # seconds; doubling up to MAX_RETRY_DELAY
MAX_RETRY_DELAY = 600.0
ATTEMPT_TIMEOUT = 10.0
# A receiver (host and port) gets this many connections at once, and the deliveries of one API key
# (or, without keys, one client) this many attempts at once, waiting for their turn outside their
# time-out: receivers that take connections and never answer hold back their own calls, not the
# others' (the pool's whole is POOL).
PER_RECEIVER = 4
PER_OWNER = 8
POOL = 256
# Receivers' names are looked up on threads of the webhooks' own, DNS_TIMEOUT at most: a nameserver
# that never answers holds those, never the threads the bridge's file work runs on.
DNS_THREADS = 4
DNS_TIMEOUT = 5.0
MAX_URL = 2048
NAT64 = ipaddress.ip_network("64:ff9b::/96")
EVENTS = {"done": "job.done", "failed": "job.failed", "cancelled": "job.cancelled"}
Spawn = Callable[[Coroutine[Any, Any, None], str], object]


def secret_from(setting: str) -> bytes:
    """`whsec_<base64>` as Standard Webhooks writes secrets, or any other string as its bytes."""
    if setting.startswith("whsec_"):
        try:
            key = base64.b64decode(setting.removeprefix("whsec_"), validate=True)
        except ValueError:
            raise ValueError("webhook_secret starts with whsec_ but is not base64 after it") from None
        if not key:  # (`whsec_${UNSET}`): an empty key, which anyone could sign with
            raise ValueError("webhook_secret is whsec_ with nothing after it: no key to sign with")
        return key
    return setting.encode()


def check_url(url: Any) -> str:
    """A receiver's URL: absolute http(s), or BadInput naming the problem."""
    if not isinstance(url, str) or not url:
        raise BadInput("'_webhook' must be an http(s) URL.")
    try:
        parsed = URL(url)
        valid = parsed.scheme in ("http", "https") and bool(parsed.host) and parsed.port is not None
    except (ValueError, UnicodeError):  # a port out of range, an unclosed bracket, ...
        valid = False
    if not valid or len(url) > MAX_URL:
        shown = url if len(url) <= 200 else url[:200] + "..."
        raise BadInput(f"'_webhook' must be an absolute http(s) URL; got {shown!r}.")
    return url


def internal(address: str) -> bool:
    """Loopback, private, link-local (cloud metadata), multicast or reserved: not the open internet.
    An IPv6 address that carries an IPv4 one (mapped, compatible, NAT64, 6to4, Teredo) is judged
    by the IPv4 address it leads to."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        value = int(ip)
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if value >> 32 == 0 or ip in NAT64:  # ::a.b.c.d (deprecated), 64:ff9b::a.b.c.d
            embedded.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
        if any(v4 is not None and internal(str(v4)) for v4 in embedded):
            return True
    return not ip.is_global or ip.is_multicast


async def check_public(url: str) -> None:
    """A client's `_webhook` must not make the bridge call its own network (server-side request
    forgery): every address the host resolves to must be public. Raises BadInput."""
    host = URL(url).host or ""
    if host == "localhost" or host.endswith(".localhost"):
        raise BadInput(f"'_webhook' may not point at this machine or its network ({host}).")
    try:
        infos = await DNS.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError, TimeoutError):  # unknown, not a host name, or no answer in time
        raise BadInput(f"'_webhook' host {host[:200]!r} does not resolve.") from None
    if any(internal(str(info[4][0])) for info in infos):
        raise BadInput(f"'_webhook' may not point at this machine or its network ({host}).")


def delivery_for(
    job_id: str,
    client_id: str,
    workflow: str,
    outcome: str,
    detail: str,
    files: list[dict[str, Any]],
    url: str,
    root: str = "",
) -> dict[str, Any]:
    """The call that tells `url` of a job's end: its id (stable, so a receiver can drop duplicates),
    its body (naming the client as the app knows it) and its owner, whose turns it takes (the job's
    API key, or without keys its client)."""
    event = EVENTS[outcome]
    body = {
        "type": event,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "data": {
            "job_id": job_id,
            "client_id": unscoped(client_id),
            "workflow": workflow,
            "status": "closed" if outcome == "done" else "error",
            "detail": detail,
            "files": files,
            "results": f"{root}/history?clientId={unscoped(client_id)}" if outcome == "done" else None,
        },
    }
    owner = scope_of(client_id) or client_id
    return {
        "id": f"msg_{job_id}_{outcome}",
        "url": url,
        "body": orjson.dumps(body),
        "created": time.time(),
        "owner": owner,
    }


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks: base64 HMAC-SHA256 of `id.timestamp.body`, as `v1,<signature>`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


class _DnsThreads:
    """What ThreadedResolver asks of its loop (getaddrinfo, getnameinfo), on threads of its own."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="webhook-dns")

    async def getaddrinfo(
        self, host: str, port: int | None, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[Any]:
        call = functools.partial(socket.getaddrinfo, host, port, family, type, proto, flags)
        async with asyncio.timeout(DNS_TIMEOUT):
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int = 0) -> tuple[str, str]:
        async with asyncio.timeout(DNS_TIMEOUT):
            return await asyncio.get_running_loop().run_in_executor(self._pool, socket.getnameinfo, sockaddr, flags)


DNS = _DnsThreads()


class PublicOnlyResolver(ThreadedResolver):
    """Resolves a receiver's name at the moment of each connection and refuses internal addresses:
    a name that answered with a public address when the job was accepted cannot be turned toward
    the bridge's own network later (DNS rebinding)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        refused = [r["host"] for r in found if internal(r["host"])]
        if refused:
            raise OSError(f"{host} resolves to an internal address ({refused[0]}); webhooks go to public ones")
        return found


def webhook_session(allow_private: bool) -> aiohttp.ClientSession:
    """The webhooks' own session (never ComfyUI's pool): with private addresses not allowed, every
    connection is checked when it is made."""
    loop: Any = DNS  # (all ThreadedResolver asks of its loop)
    resolver = ThreadedResolver(loop) if allow_private else PublicOnlyResolver(loop)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=resolver, limit=POOL, limit_per_host=PER_RECEIVER)
    )


class _Turns:
    """One owner's attempts under way (at most PER_OWNER), and how many deliveries wait for them."""

    __slots__ = ("semaphore", "users")

    def __init__(self) -> None:
        self.semaphore = asyncio.Semaphore(PER_OWNER)
        self.users = 0


class Webhooks:
    def __init__(
        self,
        secret: bytes,
        session: aiohttp.ClientSession,
        acknowledged: Callable[[str], object],
        max_age: float = 86400.0,
        allow_private: bool = False,
    ) -> None:
        self.secret = secret
        self.session = session
        self.acknowledged = acknowledged  # forget a delivery (the journal's `delivered`)
        # Where deliveries run: the scheduler's supervisor, which it sets (`Scheduler.use_webhooks`).
        self.spawn: Spawn = lambda coro, name: coro.close()
        self.max_age = max_age
        self.allow_private = allow_private
        self._turns: dict[str, _Turns] = {}  # owner -> its attempts' semaphore, while some delivery uses it

    def send(self, delivery: dict[str, Any]) -> None:
        """Deliver in the background (a job's end never waits for its receiver)."""
        self.spawn(self._deliver(delivery), f"webhook {delivery['id']}")

    @contextlib.asynccontextmanager
    async def _turn(self, owner: str) -> AsyncIterator[None]:
        """One of PER_OWNER attempts at once for `owner`; its semaphore is dropped once unused."""
        turn = self._turns.get(owner)
        if turn is None:
            turn = self._turns[owner] = _Turns()
        turn.users += 1
        try:
            async with turn.semaphore:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[owner]

    async def _deliver(self, delivery: dict[str, Any]) -> None:
        delay, attempt = FIRST_RETRY, 0
        owner = _owner_of(delivery)
        while True:
            attempt += 1
            async with self._turn(owner):
                problem = await self._attempt(delivery)
            if problem is None:
                log.info("webhook %s delivered to %s (attempt %d)", delivery["id"], delivery["url"], attempt)
                self.acknowledged(delivery["id"])
                return
            left = self.max_age - (time.time() - delivery["created"])
            if left <= 0:
                log.warning("webhook %s to %s given up after %d attempts: %s", delivery["id"], delivery["url"],
                            attempt, problem)  # fmt: skip
                self.acknowledged(delivery["id"])
                return
            pause = min(delay, left)  # the last try comes as max_age ends, not a whole pause before it
            log.warning("webhook %s to %s failed (%s); retrying in %.3gs", delivery["id"], delivery["url"],
                        problem, pause)  # fmt: skip
            await asyncio.sleep(pause)
            delay = min(MAX_RETRY_DELAY, delay * 2)

    async def _attempt(self, delivery: dict[str, Any]) -> str | None:
        """One POST; None when the receiver acknowledged it (2xx), else what went wrong."""
        try:
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "webhook-id": delivery["id"],
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.secret, delivery["id"], timestamp, delivery["body"]),
            }
            if not self.allow_private:
                host = URL(delivery["url"]).host or ""
                if _is_ip(host) and internal(host):  # a literal address is never resolved: check it here
                    return f"{host} is an internal address; webhooks go to public ones"
            timeout = aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT)
            # Redirects are not followed: a public receiver must not bounce the signed call inward.
            post = self.session.post(
                delivery["url"], data=delivery["body"], headers=headers, timeout=timeout, allow_redirects=False
            )
            async with post as resp:
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return f"{exc.__class__.__name__}: {exc}"
        except Exception as exc:  # a fault of ours, or one this list missed: tried again, never dropped
            log.exception("webhook %s to %s: the attempt failed", delivery["id"], delivery["url"])
            return f"{exc.__class__.__name__}: {exc}"


def _owner_of(delivery: dict[str, Any]) -> str:
    """Whose job a delivery tells of: its API key, or without keys its client. A call recorded by an
    older bridge has no owner: its body's client stands in (the key's, unscoped, is not known)."""
    if delivery.get("owner"):
        return str(delivery["owner"])
    try:
        client_id = str(orjson.loads(delivery["body"])["data"]["client_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""
    return scope_of(client_id) or client_id


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
