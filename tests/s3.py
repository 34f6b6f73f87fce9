"""A real S3 API server for the tests: moto's threaded server on a loopback port (state in memory,
gone when it stops), with throwaway credentials; a fresh bucket per test.

What it does not check: presigned links' signatures and expiry (moto serves any GET of an
existing key), nor S3's 5 MiB minimum part size; the tests check a link's SigV4 form themselves."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["S3Server", "running_s3"]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self, url: str) -> None:
        self.url = url

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = "b-" + uuid.uuid4().hex[:16]
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def running_s3() -> Iterator[S3Server]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        why = "moto is not installed: pip install 'moto[server]' (make installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # the bridges (in-process and child processes) find them as on AWS
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{server._server.server_port}")
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
