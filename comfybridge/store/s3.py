"""Blobs in S3-compatible object storage (`--storage s3://bucket/prefix`), through aiobotocore.

A blob is written as one PUT when small, else as a multipart upload of PART-sized parts, so a large
result streams through with at most one part held; nothing is visible under its name until the
upload completes, and its stored size is checked before `commit` returns. Credentials come from
the standard AWS variables and files; `--s3-endpoint` names any S3-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from ..errors import StorageUnavailable
from .blobs import BlobGone, BlobWriter

__all__ = ["PART", "ObjectStoreError", "S3Blobs", "parse_storage_url"]

log = logging.getLogger(__name__)

PART = 8 * 1024 * 1024  # bytes per part of a multipart upload (S3's minimum is 5 MiB)
DELETE_BATCH = 1000  # keys per DeleteObjects call, S3's limit
ATTEMPTS = 3  # tries of one call (botocore's retries)
SLOWEST = 1024 * 1024  # bytes a second: a store slower than this at taking a body is taken for away
BACKOFF = 2.0**ATTEMPTS  # seconds botocore may sleep between tries, at most, in all (standard mode)
_CREDENTIALS_REFUSED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ObjectStoreError(Exception):
    """The object storage the settings name cannot be used at start-up (one line, exit 2)."""


def parse_storage_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix ending in `/`, or empty). Raises ValueError."""
    if not url.startswith("s3://"):
        raise ValueError("must be empty (folders under the data dir) or s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"names no valid bucket ({bucket!r}): 3-63 lowercase letters, digits, '.' or '-'")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


class _Connection:
    """One client for a bucket, shared by the stores under its prefix."""

    def __init__(self) -> None:
        self.client: Any = None
        self.exits = contextlib.AsyncExitStack()


class S3Blobs:
    links = True

    def __init__(self, url: str, endpoint: str = "", timeout: float = 10.0) -> None:
        self.bucket, self.prefix = parse_storage_url(url)
        self.endpoint = endpoint
        self.timeout = timeout
        self.url = url  # as configured
        self.where = url
        self._connection = _Connection()

    def child(self, name: str) -> S3Blobs:
        """The blobs under `<prefix>name/`, through the same client (started and closed with this one)."""
        other = S3Blobs(self.url, self.endpoint, self.timeout)
        other.prefix = f"{self.prefix}{name}/"
        other.where = f"s3://{self.bucket}/{other.prefix}"
        other._connection = self._connection
        return other

    @property
    def _client(self) -> Any:
        return self._connection.client

    async def start(self) -> None:
        """Open the client and check the bucket answers: ObjectStoreError, in one line, if not."""
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError:
            raise ObjectStoreError("--storage s3://... needs the s3 extra: pip install 'comfybridge[s3]'") from None
        config = AioConfig(
            signature_version="s3v4",
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},
            max_pool_connections=64,
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        session = get_session()
        self._connection.client = await self._connection.exits.enter_async_context(
            session.create_client("s3", endpoint_url=self.endpoint or None, config=config)
        )
        try:
            async with self.call(f"the bucket {self.bucket}"):
                await self._client.head_bucket(Bucket=self.bucket)
        except StorageUnavailable as exc:
            await self.close()
            raise ObjectStoreError(f"storage {self.url} cannot be used: {exc}") from None

    async def close(self) -> None:
        await self._connection.exits.aclose()
        self._connection.client = None

    def _name(self, key: str) -> str:
        return self.prefix + key

    @contextlib.asynccontextmanager
    async def call(self, what: str, key: str | None = None, size: int = 0) -> AsyncIterator[None]:
        """One call to the store: its failures as the bridge's (`_trouble`), within its deadline."""
        with _trouble(what, key):
            async with self.bounded(size):
                yield

    def bounded(self, size: int = 0) -> asyncio.Timeout:
        """A deadline for one call, its tries included. botocore's timeouts bound connecting and each
        read, not a body's sending nor the wait for `100 Continue`: a server that takes the connection
        and then says nothing (paused, overloaded) would hold the call, and a stop, for ever."""
        return asyncio.timeout(ATTEMPTS * (2 * self.timeout + size / SLOWEST) + BACKOFF)  # a body sent each try

    def writer(self, key: str) -> BlobWriter:
        return _S3Writer(self, self._name(key))

    async def chunks(self, key: str, size: int) -> AsyncGenerator[bytes, None]:
        with _trouble(f"reading {key}", key):
            async with self.bounded():
                answer = await self._client.get_object(Bucket=self.bucket, Key=self._name(key))
            body = answer["Body"]
            try:
                while True:
                    async with self.bounded(size):
                        chunk = await body.read(size)
                    if not chunk:
                        break
                    yield chunk
            finally:
                body.close()

    async def read(self, key: str) -> bytes:
        async with self.call(f"reading {key}", key):
            answer = await self._client.get_object(Bucket=self.bucket, Key=self._name(key))
            async with answer["Body"] as body:
                data: bytes = await body.read()
                return data

    async def exists(self, key: str) -> bool:
        try:
            async with self.call(f"looking for {key}", key):
                await self._client.head_object(Bucket=self.bucket, Key=self._name(key))
        except BlobGone:
            # A HEAD's answer has no body: S3 says a missing bucket with the same bare 404 as a
            # missing key. Only a bucket that is there makes it the key's.
            async with self.call("looking for the bucket"):
                await self._client.head_bucket(Bucket=self.bucket)
            return False
        return True

    async def sizes(self, keys: list[str]) -> dict[str, int] | None:
        return None  # a HEAD each: a read of an object that is gone fails instead

    async def seal(self, prefix: str) -> None:
        pass  # an object is durable once its upload completes

    async def delete(self, keys: list[str]) -> None:
        refused: list[dict[str, str]] = []
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self._name(key)} for key in keys[start : start + DELETE_BATCH]]
            async with self.call("deleting"):
                answer = await self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            # A bulk delete answers 200 even when it removed nothing: each key it kept is in Errors.
            refused += [e for e in answer.get("Errors") or () if e.get("Code") != "NoSuchKey"]  # (gone is gone)
        if refused:
            code = refused[0].get("Code", "error")
            log.error("object storage: deleting %d objects refused: %s %s", len(refused), code, refused[0].get("Key"))
            raise StorageUnavailable(f"object storage refused deleting {len(refused)} of {len(keys)} objects ({code})")

    async def delete_prefix(self, prefix: str) -> None:
        await self.delete([key for key, _ in await self.keys(prefix)])

    async def keys(self, prefix: str = "") -> list[tuple[str, float]]:
        found = []
        with _trouble("listing"):
            paginator = self._client.get_paginator("list_objects_v2")
            pages = aiter(paginator.paginate(Bucket=self.bucket, Prefix=self._name(prefix)))
            while True:
                async with self.bounded():
                    page = await anext(pages, None)
                if page is None:
                    break
                for item in page.get("Contents", ()):
                    found.append((item["Key"][len(self.prefix) :], item["LastModified"].timestamp()))
        return found

    async def link(self, key: str, expires: int) -> str | None:
        with _trouble("signing a link"):
            url: str = await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=expires
            )
        return url


class _S3Writer:
    def __init__(self, store: S3Blobs, name: str) -> None:
        self.store = store
        self.name = name
        self.size = 0
        self._held = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    async def reserve(self, size: int | None) -> None:
        pass  # object storage has no disk of ours to fill

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._held += chunk
        while len(self._held) >= PART:
            await self._send_part(PART)

    async def _send_part(self, length: int) -> None:
        client, bucket = self.store._client, self.store.bucket
        with _trouble(f"storing {self.name}"):
            if self._upload_id is None:
                async with self.store.bounded():
                    started = await client.create_multipart_upload(Bucket=bucket, Key=self.name)
                self._upload_id = started["UploadId"]
            number = len(self._parts) + 1
            async with self.store.bounded(length):
                sent = await client.upload_part(
                    Bucket=bucket, Key=self.name, UploadId=self._upload_id, PartNumber=number,
                    Body=bytes(self._held[:length]),
                )  # fmt: skip
        self._parts.append({"ETag": sent["ETag"], "PartNumber": number})
        del self._held[:length]

    async def commit(self) -> int:
        client, bucket = self.store._client, self.store.bucket
        if self._upload_id is None:
            async with self.store.call(f"storing {self.name}", size=len(self._held)):
                await client.put_object(Bucket=bucket, Key=self.name, Body=bytes(self._held))
        else:
            if self._held:
                await self._send_part(len(self._held))
            async with self.store.call(f"storing {self.name}", size=self.size):  # a while, over many parts
                await client.complete_multipart_upload(
                    Bucket=bucket, Key=self.name, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
                )
            self._upload_id = None
        self._held.clear()
        async with self.store.call(f"checking {self.name}"):
            stored = (await client.head_object(Bucket=bucket, Key=self.name))["ContentLength"]
        if stored != self.size:
            raise StorageUnavailable(f"object storage kept {stored} bytes of {self.name}, not {self.size}")
        return self.size

    async def abort(self) -> None:
        self._held.clear()
        client, bucket = self.store._client, self.store.bucket
        # Best effort, and short: it often runs as a request is cancelled (a stop) with the store away.
        # An upload left unfinished is the bucket's lifecycle rule's, an object left the orphan sweep's.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.store.timeout):
                if self._upload_id is not None:
                    await client.abort_multipart_upload(Bucket=bucket, Key=self.name, UploadId=self._upload_id)
                else:
                    await client.delete_object(Bucket=bucket, Key=self.name)


@contextlib.contextmanager
def _trouble(what: str, key: str | None = None) -> Iterator[None]:
    """Object storage's failures as the bridge's: a missing key is BlobGone; anything else (refused,
    unreachable, wrong credentials, no bucket) StorageUnavailable, with S3's own code."""
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "error"))
        if key is not None and code in ("NoSuchKey", "404", "NotFound"):
            raise BlobGone(key) from None
        log.error("object storage: %s failed: %s %s", what, code, error.get("Message", ""))
        hint = ": check the credentials" if code in _CREDENTIALS_REFUSED else ""
        raise StorageUnavailable(f"object storage refused {what} ({code}{hint})") from None
    except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.error("object storage: %s failed: %s", what, exc)
        raise StorageUnavailable(f"object storage cannot be reached ({exc.__class__.__name__})") from None
