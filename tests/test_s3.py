"""The S3 store over real HTTP (moto on 127.0.0.1), through a proxy that injects S3's faults.

The shared checkpoint contract (commit, corrupt downloads, retention, ...) runs against S3 in
test_storage.py; this file covers what is S3's own: multipart, retries under 503s and dropped
connections, never half-committing, permanent faults failing fast with a clear message, where the
endpoint comes from, and credentials never showing up in messages or logs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest

pytest.importorskip("moto")

from infra.retry import RetryPolicy, is_transient  # noqa: E402
from infra.s3 import MB, S3Error, S3Store, parse_s3_uri  # noqa: E402
from infra.storage import MANIFEST, StorageError, open_store  # noqa: E402
from tests.faulty_proxy import FaultyProxy, Rule  # noqa: E402
from tests.s3_fixtures import (  # noqa: E402, F401
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    aws_env,
    free_port,
    moto_server,
    raw_client,
    s3_bucket,
    s3_env,
    s3_proxy,
    shared_session,
)

JOB = "job-s3"
FAST = RetryPolicy(attempts=3, deadline_s=20, initial_wait_s=0.05, max_wait_s=0.2, jitter_s=0.05, sdk_attempts=2)


def store_via(proxy: FaultyProxy, bucket: str, *, prefix: str = "runs", **kwargs) -> S3Store:
    kwargs.setdefault("session", shared_session())
    kwargs.setdefault("retry", FAST)
    return S3Store(f"s3://{bucket}/{prefix}", endpoint_url=proxy.endpoint, **kwargs)


def make_checkpoint(root: Path, big_mb: int = 0, salt: str = "") -> dict[str, bytes]:
    files = {
        "adapter_config.json": f'{{"r": 8, "salt": "{salt}"}}'.encode(),
        "trainer_state.json": os.urandom(5000),
        "nested/rng_state.pth": os.urandom(3000),
    }
    if big_mb:
        files["adapter_model.safetensors"] = os.urandom(big_mb * MB)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def ckpt_prefix(step: int) -> str:
    return f"{JOB}/checkpoints/{step:010d}/"


# ---- URIs, open_store, endpoint and region from the environment ----------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [("s3://b1", "b1", ""), ("s3://b1/", "b1", ""), ("s3://b1/a/b", "b1", "a/b/"), ("s3://b1//a//b/", "b1", "a/b/")],
)
def test_parse_s3_uri(uri, bucket, prefix):
    assert parse_s3_uri(uri) == (bucket, prefix)


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "s3://b/../x", "s3://user@b/x", "s3://b/x?versionId=1"])
def test_bad_s3_uris_raise_storage_error(uri, s3_env):
    with pytest.raises(StorageError):
        open_store(uri)


def test_open_store_builds_s3_store_that_reopens_by_uri(s3_env):
    store = open_store("s3://my-bucket/team/run-1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == ("my-bucket", "team/run-1/", "s3://my-bucket/team/run-1/")
    assert store.key_uri("j/progress.json") == "s3://my-bucket/team/run-1/j/progress.json"
    again = open_store(store.uri)
    assert (again.bucket, again.prefix) == (store.bucket, store.prefix)


def test_importing_storage_does_not_import_boto3():
    code = "import sys, infra.storage; sys.exit(1 if 'boto3' in sys.modules or 'botocore' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("where", ["s3-specific", "generic", "both"])
def test_endpoint_and_region_come_from_the_environment(moto_server, s3_bucket, where):
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_REGION": "eu-west-3"}
    if where == "s3-specific":
        env["AWS_ENDPOINT_URL_S3"] = moto_server
    elif where == "generic":
        env["AWS_ENDPOINT_URL"] = moto_server
    else:  # the S3-specific one wins
        env["AWS_ENDPOINT_URL_S3"] = moto_server
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    with aws_env(**env):
        store = open_store(f"s3://{s3_bucket}/p")
        store.write_json(JOB, "progress.json", {"step": 1})
        assert store.read_json(JOB, "progress.json") == {"step": 1}
    assert store.endpoint_url == moto_server
    assert store.region == "eu-west-3"
    assert raw_client(moto_server).get_object(Bucket=s3_bucket, Key=f"p/{JOB}/progress.json")["Body"].read()


# ---- transient faults: retried, and the data is intact -------------------------------------------


@pytest.mark.slow
def test_multipart_checkpoint_survives_503s_and_dropped_connections(s3_proxy, s3_bucket, tmp_path):
    store = store_via(s3_proxy, s3_bucket, retry=RetryPolicy(initial_wait_s=0.05, max_wait_s=0.5))
    src = tmp_path / "src"
    files = make_checkpoint(src, big_mb=36)  # 16 MiB parts: 3 parts
    slow_down = s3_proxy.add(Rule(ops={"PutObject", "UploadPart"}, every=2))  # 503 SlowDown, every other
    dropped_put = s3_proxy.add(Rule(ops={"CompleteMultipartUpload"}, action="drop", times=1))
    s3_proxy.add(Rule(ops={"CreateMultipartUpload"}, action="delay", delay_s=0.3))

    ref = store.commit_checkpoint(JOB, 100, src, meta={"loss": 0.9})

    assert s3_proxy.count("CreateMultipartUpload") >= 1  # the big file went multipart
    assert slow_down.fired >= 3 and dropped_put.fired == 1
    assert s3_proxy.count("UploadPart") > 3  # parts were retried
    s3_proxy.add(Rule(ops={"GetObject"}, action="drop", every=2))  # half a body, then the socket closes
    s3_proxy.add(Rule(ops={"HeadObject", "ListObjectsV2"}, every=2, status=500, code="InternalError"))
    listed = store.list_checkpoints(JOB)
    assert [r.step for r in listed] == [100] and listed[0].files == ref.files
    out = store.download(listed[0], tmp_path / "out")  # verifies size and sha256 of every file
    assert read_tree(out) == files
    assert s3_proxy.count("GetObject", action="drop") >= 2


def test_sdk_and_store_retries_combine_with_bounded_requests(s3_proxy, s3_bucket):
    """botocore tries each request sdk_attempts times; the store retries the operation on top."""
    store = store_via(s3_proxy, s3_bucket, retry=RetryPolicy(
        attempts=3, initial_wait_s=0.01, max_wait_s=0.05, jitter_s=0.01, sdk_attempts=2))
    rule = s3_proxy.add(Rule(ops={"PutObject"}, times=3))  # attempt 1: 2 requests; attempt 2: 1 + success
    store.put_bytes("a/object", b"payload")
    assert rule.fired == 3 and s3_proxy.count("PutObject") == 4
    assert store.get_bytes("a/object") == b"payload"


def test_body_cut_off_mid_response_is_retried_by_the_store(s3_proxy, s3_bucket):
    store = store_via(s3_proxy, s3_bucket)
    data = os.urandom(2 * MB)
    store.put_bytes("blob", data)
    s3_proxy.add(Rule(ops={"GetObject"}, action="drop", times=1))
    assert store.get_bytes("blob") == data
    assert s3_proxy.count("GetObject") == 2


def test_transient_faults_give_up_within_the_policy(s3_proxy, s3_bucket):
    store = store_via(s3_proxy, s3_bucket)  # FAST: 3 attempts x 2 requests
    s3_proxy.add(Rule(ops={"PutObject"}, status=503, code="SlowDown"))
    with pytest.raises(S3Error) as info:
        store.put_bytes("x", b"1")
    assert info.value.transient and info.value.code == "SlowDown"
    assert "after 3 attempt(s)" in str(info.value) and "SlowDown" in str(info.value)
    assert s3_proxy.count("PutObject") == 3 * 2


def test_unreachable_endpoint_says_so(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/p", endpoint_url=f"http://127.0.0.1:{free_port()}",
                    session=shared_session(), retry=RetryPolicy(attempts=2, initial_wait_s=0.01, sdk_attempts=1))
    with pytest.raises(S3Error) as info:
        store.list_keys("")
    assert info.value.transient
    assert "after 2 attempt(s)" in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)


# ---- a checkpoint is never half-committed --------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "key"),
    [("PutObject", MANIFEST), ("PutObject", "nested/rng_state.pth"), ("CompleteMultipartUpload", "adapter_model")],
    ids=["manifest-put", "file-between-others", "multipart-complete"],
)
def test_commit_failing_for_good_leaves_the_old_state(s3_proxy, s3_bucket, tmp_path, op, key):
    store = store_via(s3_proxy, s3_bucket)
    old = make_checkpoint(tmp_path / "old", salt="old")
    store.commit_checkpoint(JOB, 10, tmp_path / "old")
    make_checkpoint(tmp_path / "new", big_mb=17, salt="new")  # 17 MiB: multipart
    rule = s3_proxy.add(Rule(ops={op}, key_contains=f"{ckpt_prefix(20)}{key}", status=500, code="InternalError"))

    with pytest.raises(S3Error) as info:
        store.commit_checkpoint(JOB, 20, tmp_path / "new")

    assert info.value.transient and rule.fired == 3 * 2  # bounded: attempts x sdk_attempts
    assert [r.step for r in store.list_checkpoints(JOB)] == [10]  # no new checkpoint
    assert read_tree(store.download(store.latest_checkpoint(JOB), tmp_path / "dl")) == old
    left = [k for k, _ in store.list_keys(ckpt_prefix(20))]
    assert not any(k.endswith(MANIFEST) for k in left)
    if key == MANIFEST:
        assert len(left) == 4  # every file is there, uncommitted

    s3_proxy.clear()
    make_checkpoint(tmp_path / "newer", salt="newer")
    store.commit_checkpoint(JOB, 30, tmp_path / "newer")
    assert sorted(store.apply_retention(JOB, keep=1)) == [10, 20]  # retention cleans the leftovers
    assert store.list_keys(ckpt_prefix(20)) == [] and [r.step for r in store.list_checkpoints(JOB)] == [30]


def test_readers_see_the_old_state_or_the_complete_checkpoint(s3_proxy, moto_server, s3_bucket, tmp_path):
    writer = store_via(s3_proxy, s3_bucket)
    reader = S3Store(f"s3://{s3_bucket}/runs", endpoint_url=moto_server, session=shared_session())
    make_checkpoint(tmp_path / "a", salt="a")
    writer.commit_checkpoint(JOB, 10, tmp_path / "a")
    new_files = make_checkpoint(tmp_path / "b", big_mb=20, salt="b")
    s3_proxy.add(Rule(ops={"PutObject", "UploadPart", "CompleteMultipartUpload"}, action="delay", delay_s=0.25))
    s3_proxy.add(Rule(ops={"PutObject"}, every=2))

    seen: list[list[int]] = []
    incomplete: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            refs = reader.list_checkpoints(JOB)
            seen.append([r.step for r in refs])
            for ref in refs:
                present = dict(reader.list_keys(ckpt_prefix(ref.step)))
                for f in ref.files:
                    if present.get(ckpt_prefix(ref.step) + f.path) != f.size:
                        incomplete.append(f"{ref.step}/{f.path}")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        writer.commit_checkpoint(JOB, 20, tmp_path / "b")
    finally:
        done.set()
        watcher.join(timeout=60)
    seen.append([r.step for r in reader.list_checkpoints(JOB)])

    assert len(seen) > 3 and {tuple(s) for s in seen} <= {(10,), (10, 20)}
    assert seen[0] == [10] and seen[-1] == [10, 20]
    assert incomplete == []
    assert read_tree(reader.download(reader.latest_checkpoint(JOB), tmp_path / "out")) == new_files


# ---- permanent faults: fail fast, say what to fix ------------------------------------------------

SIGNATURE_XML = (
    f"<AWSAccessKeyId>{ACCESS_KEY_ID}</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256 x</StringToSign>"
    "<SignatureProvided>abc123</SignatureProvided>"
)
PERMANENT = {
    "access-denied": (Rule(status=403, code="AccessDenied", message="Access Denied"), "access denied"),
    "unknown-key-id": (
        Rule(status=403, code="InvalidAccessKeyId", message="The AWS Access Key Id you provided does not exist",
             extra_xml=f"<AWSAccessKeyId>{ACCESS_KEY_ID}</AWSAccessKeyId>"),
        "AWS_ACCESS_KEY_ID",
    ),
    "bad-signature": (
        Rule(status=403, code="SignatureDoesNotMatch", message="The request signature we calculated does not match",
             extra_xml=SIGNATURE_XML),
        "AWS_SECRET_ACCESS_KEY",
    ),
    "expired-token": (Rule(status=400, code="ExpiredToken", message="The token has expired"), "refresh"),
}
OPERATIONS = {
    "put_bytes": lambda s, tmp: s.put_bytes("k", b"x"),
    "get_bytes": lambda s, tmp: s.get_bytes("k"),
    "list_keys": lambda s, tmp: s.list_keys(""),
    "delete_keys": lambda s, tmp: s.delete_keys(["k"]),
    "put_file": lambda s, tmp: s.put_file("f", _file(tmp, 1000)),
    "put_file_multipart": lambda s, tmp: s.put_file("f", _file(tmp, 17 * MB)),
}


def _file(tmp: Path, size: int) -> Path:
    path = tmp / f"data-{size}"
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("fault", sorted(PERMANENT))
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_permanent_faults_fail_at_once_with_a_fix(s3_proxy, s3_bucket, tmp_path, fault, op):
    rule, hint = PERMANENT[fault]
    s3_proxy.add(Rule(**{**rule.__dict__, "matched": 0, "fired": 0}))
    store = store_via(s3_proxy, s3_bucket, retry=RetryPolicy(initial_wait_s=0.01))  # 6 x 3 if it retried
    with pytest.raises(S3Error) as info:
        OPERATIONS[op](store, tmp_path)
    message = str(info.value)
    assert not info.value.transient and info.value.code == rule.code
    assert hint in message
    assert s3_proxy.count() == 1, f"{s3_proxy.count()} requests: a permanent fault was retried"
    assert ACCESS_KEY_ID not in message and SECRET_ACCESS_KEY not in message


@pytest.mark.parametrize("op", sorted(OPERATIONS) + ["get_file"])
def test_missing_bucket_fails_at_once_naming_it(s3_proxy, tmp_path, op):
    store = store_via(s3_proxy, "tf-no-such-bucket", retry=RetryPolicy(initial_wait_s=0.01))
    run = OPERATIONS.get(op) or (lambda s, tmp: s.get_file("k", tmp / "dest"))
    with pytest.raises(S3Error) as info:
        run(store, tmp_path)
    assert info.value.code == "NoSuchBucket" and not info.value.transient
    assert "bucket 'tf-no-such-bucket' does not exist" in str(info.value)
    assert "create it or fix checkpoint.store" in str(info.value)
    assert s3_proxy.count() <= 2  # get_file: one HEAD of the key, one HEAD of the bucket to tell which


def test_missing_key_on_get_file_is_a_plain_storage_error(s3_proxy, s3_bucket, tmp_path):
    store = store_via(s3_proxy, s3_bucket)
    with pytest.raises(StorageError, match="does not exist") as info:
        store.get_file("nope", tmp_path / "dest")
    assert info.value.code == "NoSuchKey" and "bucket" not in str(info.value)
    assert store.get_bytes("nope") is None


def test_no_credentials_at_all(s3_bucket, moto_server):
    with aws_env():
        store = S3Store(f"s3://{s3_bucket}/p", endpoint_url=moto_server)
        with pytest.raises(S3Error, match="AWS_ACCESS_KEY_ID") as info:
            store.put_bytes("k", b"x")
    assert info.value.code == "NoCredentials"


def test_transient_and_permanent_classification():
    from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    for code, status in [("SlowDown", 503), ("InternalError", 500), ("RequestTimeout", 400), ("Whatever", 502)]:
        assert is_transient(client_error(code, status)), code
    for code, status in [("AccessDenied", 403), ("NoSuchBucket", 404), ("InvalidAccessKeyId", 403),
                         ("SignatureDoesNotMatch", 403), ("NoSuchKey", 404), ("403", 403)]:
        assert not is_transient(client_error(code, status)), code
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(ConnectionClosedError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError())
    wrapped = RuntimeError("upload failed")  # boto3's S3UploadFailedError hides the ClientError here
    wrapped.__context__ = client_error("SlowDown", 503)
    assert is_transient(wrapped)
    assert not is_transient(ValueError("a bug"))


# ---- credentials never appear -------------------------------------------------------------------


def test_credentials_never_appear_in_messages_or_logs(s3_proxy, s3_bucket, s3_env, tmp_path, caplog, capfd):
    """Credentials from the environment (the default chain); every failure mode; DEBUG logging on."""
    from structlog.testing import capture_logs

    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    def capture(fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - we want every kind
            texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])

    with capture_logs() as events:
        store = S3Store(f"s3://{s3_bucket}/p", endpoint_url=s3_proxy.endpoint, retry=FAST)
        store.put_bytes("ok", b"fine")  # success (DEBUG logs of a signed request)
        s3_proxy.add(Rule(ops={"PutObject"}, key_contains="slow", code="SlowDown"))
        capture(lambda: store.put_bytes("slow", b"x"))  # transient, exhausted: retry warnings logged
        key_id_xml = f"<AWSAccessKeyId>{ACCESS_KEY_ID}</AWSAccessKeyId>"
        faults = [("AccessDenied", ""), ("InvalidAccessKeyId", key_id_xml), ("SignatureDoesNotMatch", SIGNATURE_XML)]
        for code, extra in faults:
            s3_proxy.clear()
            s3_proxy.add(Rule(status=403, code=code, extra_xml=extra))
            capture(lambda: store.put_bytes("k", b"x"))
            capture(lambda: store.put_file("big", _file(tmp_path, 17 * MB)))
            capture(lambda: store.get_bytes("k"))
    out, err = capfd.readouterr()
    ours = [repr(e) for e in events]
    assert len(texts) == 3 * 10 and any("s3 retry" in line for line in ours)
    logs = caplog.text + out + err
    assert "x-amz-security-token" in logs.lower()  # botocore's DEBUG lines were there...
    for secret in (SECRET_ACCESS_KEY, SESSION_TOKEN):
        assert secret not in logs  # ...with the token masked
        assert not any(secret in t for t in texts + ours)
    assert not any(ACCESS_KEY_ID in t for t in texts + ours)  # not even the key id in our messages and events


# ---- listing, deleting ---------------------------------------------------------------------------


def test_list_keys_follows_pages_and_skips_folder_markers(s3_proxy, s3_bucket, moto_server):
    store = store_via(s3_proxy, s3_bucket)
    store.list_page_size = 2
    for name in ["e", "a", "c/d", "b", "c/a"]:
        store.put_bytes(f"{JOB}/{name}", name.encode() * 3)
    raw_client(moto_server).put_object(Bucket=s3_bucket, Key=f"runs/{JOB}/c/", Body=b"")  # a console "folder"
    raw_client(moto_server).put_object(Bucket=s3_bucket, Key="elsewhere/x", Body=b"x")  # outside the prefix
    s3_proxy.clear()
    got = store.list_keys(f"{JOB}/")
    assert got == [(f"{JOB}/{n}", len(n) * 3) for n in ["a", "b", "c/a", "c/d", "e"]]
    assert s3_proxy.count("ListObjectsV2") == 3  # 6 objects, 2 a page


def test_delete_keys_batches_and_ignores_missing(s3_proxy, s3_bucket):
    store = store_via(s3_proxy, s3_bucket)
    present = [f"{JOB}/k{i}" for i in range(5)]
    for key in present:
        store.put_bytes(key, b"x")
    s3_proxy.clear()
    store.delete_keys([f"{JOB}/missing{i}" for i in range(2400)] + present)
    assert s3_proxy.count("DeleteObjects") == 3  # 1000 per request
    assert store.list_keys(f"{JOB}/") == []
    store.delete_keys(present)  # again: safe to repeat
    store.delete_keys([])
    assert s3_proxy.count("DeleteObjects") == 4


def test_empty_file_and_odd_names_round_trip(s3_proxy, s3_bucket, tmp_path):
    store = store_via(s3_proxy, s3_bucket)
    src = tmp_path / "src"
    files = {"empty.bin": b"", "with space/ü n+i=c&o?de.txt": b"hi", "deep/a/b/c/d.json": b"{}"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    store.commit_checkpoint(JOB, 1, src)
    ref = store.latest_checkpoint(JOB)
    assert {f.path: f.sha256 for f in ref.files} == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    assert read_tree(store.download(ref, tmp_path / "out")) == files


# ---- the proxy itself: byte-for-byte ------------------------------------------------------------


def test_proxy_forwards_chunked_bodies_and_headers_byte_for_byte():
    import socket

    received: list[bytes] = []
    reply = (b"HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nX-Odd:  spaced  \r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n")
    request = (b"PUT /bkt/key HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-Amz-Meta-A: 1\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n")
    server = socket.create_server(("127.0.0.1", 0))

    def upstream() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"0\r\n\r\n"):
                data += conn.recv(65536)
            received.append(data)
            conn.sendall(reply)

    t = threading.Thread(target=upstream, daemon=True)
    t.start()
    with FaultyProxy("127.0.0.1", server.getsockname()[1]) as proxy, socket.create_connection(
        (proxy.host, proxy.port), timeout=10
    ) as client:
        client.sendall(request)
        got = b""
        while not got.endswith(b"X-Trailer: t\r\n\r\n"):
            chunk = client.recv(65536)
            assert chunk, "proxy closed early"
            got += chunk
        assert proxy.count("PutObject") == 1
    t.join(timeout=10)
    server.close()
    assert received == [request] and got == reply
