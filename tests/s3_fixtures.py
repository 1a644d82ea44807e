"""S3 over real HTTP for tests: one moto server per test process on 127.0.0.1, a fresh bucket per
test, and a fault-injecting proxy in front of it.

Import the fixtures into a test module (conftest is not ours to edit)::

    from tests.s3_fixtures import moto_server, s3_bucket, s3_env, s3_proxy  # noqa: F401

Two ways to credentials, neither leaking into other tests: ``dummy_session()`` (a boto3 session
holding the dummy keys; the environment is untouched), or the ``s3_env`` fixture (the dummy keys in
the environment for one test, so the store's default credential chain finds them). ``~/.aws`` and
the instance-metadata service are kept out of the way in both.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faulty_proxy import FaultyProxy

# Distinctive dummy credentials: tests search every message and log line for them.
ACCESS_KEY_ID = "AKIATUNEFLEETDUMMYID7"
SECRET_ACCESS_KEY = "tunefleet-dummy-secret-Zq8xW3vR9pLm2KsT"
SESSION_TOKEN = "tunefleet-dummy-session-token-Hy4nB7cE1"

_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_DEFAULT_REGION": "us-east-1",
}
_ISOLATE = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/tunefleet-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/tunefleet-test-aws-credentials",
}
_UNSET = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
)

_lock = threading.RLock()
_shared: dict[str, Any] = {}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_moto() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one stderr line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def shared_moto_endpoint() -> str:
    """One moto server for the whole test process, started on first use, stopped at exit.

    Shared by the ``moto_server`` fixture and by helpers that cannot take fixtures (the store
    factory of the contract tests in test_storage.py)."""
    with _lock:
        if "endpoint" not in _shared:
            cm = running_moto()
            _shared["endpoint"] = cm.__enter__()
            atexit.register(cm.__exit__, None, None, None)
        return _shared["endpoint"]


@contextlib.contextmanager
def aws_env(**values: str) -> Iterator[None]:
    """No AWS settings from the machine, only ``values``; restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _UNSET:
            mp.delenv(name, raising=False)
        for name, value in {**_ISOLATE, **values}.items():
            mp.setenv(name, value)
        yield


def dummy_session():
    """A boto3 session holding the dummy credentials, without touching the environment."""
    import boto3

    with aws_env():  # the session reads config files now: not the machine's
        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
            aws_session_token=SESSION_TOKEN, region_name="us-east-1",
        )


def shared_session():
    """One dummy session for all tests: its loaded service models make new clients cheap."""
    with _lock:
        if "session" not in _shared:
            _shared["session"] = dummy_session()
        return _shared["session"]


def raw_client(endpoint: str):
    """A plain boto3 client on ``endpoint`` (cached: creating one costs ~0.1 s)."""
    with _lock:
        key = f"client:{endpoint}"
        if key not in _shared:
            _shared[key] = shared_session().client("s3", endpoint_url=endpoint)
        return _shared[key]


def new_bucket(endpoint: str) -> str:
    name = f"tf-test-{uuid.uuid4().hex[:12]}"
    raw_client(endpoint).create_bucket(Bucket=name)
    return name


def empty_and_remove(endpoint: str, bucket: str) -> None:
    client = raw_client(endpoint)
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", ()):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=bucket)


def make_s3_store(prefix: str = "ckpt", **kwargs: Any):
    """An S3Store on a new bucket of the shared moto server (for store-kind factories)."""
    from infra.s3 import S3Store

    endpoint = shared_moto_endpoint()
    kwargs.setdefault("endpoint_url", endpoint)
    kwargs.setdefault("session", shared_session())
    return S3Store(f"s3://{new_bucket(endpoint)}/{prefix}", **kwargs)


@pytest.fixture(scope="session")
def moto_server() -> str:
    """The endpoint URL of the process's moto server."""
    return shared_moto_endpoint()


@pytest.fixture
def s3_env() -> Iterator[None]:
    """The dummy credentials in the environment (the default chain's first stop), for one test."""
    with aws_env(**_ENV):
        yield


@pytest.fixture
def s3_bucket(moto_server) -> Iterator[str]:
    """A new, empty bucket; emptied and removed afterwards so moto's memory does not grow."""
    name = new_bucket(moto_server)
    yield name
    empty_and_remove(moto_server, name)


@pytest.fixture
def s3_proxy(moto_server) -> Iterator[FaultyProxy]:
    """A fault-injecting proxy in front of moto; ``.endpoint`` is what a client talks to."""
    host, port = moto_server.removeprefix("http://").split(":")
    with FaultyProxy(host, int(port)) as proxy:
        yield proxy
