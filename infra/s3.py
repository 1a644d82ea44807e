"""The S3 checkpoint store: ``s3://bucket/prefix`` on AWS S3 or anything speaking its API
(Cloudflare R2, GCS's S3 interoperability API, MinIO).

Why this shape: the checkpoint protocol (manifest written last, sha256 verified on download,
retention) lives in ``CheckpointStore``; this class only maps its object primitives onto S3.
Each S3 object write is atomic (a PUT, or a multipart upload, appears whole or not at all), so
the base class's manifest-last commit is all a checkpoint needs.

Where settings come from (all the standard AWS places, nothing of ours):

- endpoint: the ``endpoint_url`` argument, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``,
  else ``endpoint_url`` in the AWS config file (botocore resolves these itself), else AWS S3.
  A custom endpoint gets path-style URLs (``http://host/bucket/key``), which MinIO needs.
- region: the ``region`` argument, else ``AWS_DEFAULT_REGION`` / the profile, else ``AWS_REGION``
  (botocore 1.44 does not read ``AWS_REGION`` for clients; we do), else ``us-east-1``.
- credentials: botocore's chain (env, profile, SSO, instance role). Never stored, logged or put
  in a message here.
- checksums: botocore's defaults (CRC32 on uploads). An older S3-compatible service that rejects
  them works with ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (botocore reads it).

Large files go through boto3's transfer manager (multipart, parallel parts); small objects
through one PUT. Retries: see ``infra.retry`` (botocore per request, tenacity per operation).
A multipart upload that fails for good is aborted by s3transfer; if even the abort fails, the
parts linger until a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from typing_extensions import override

from infra.logging import get_logger
from infra.retry import RetryPolicy, call_with_retry, causes, error_code, http_status, is_transient, sdk_config
from infra.storage import CheckpointStore, StorageError

T = TypeVar("T")
MB = 1 << 20
_DELETE_BATCH = 1000  # the DeleteObjects limit
_TOKEN = re.compile(r"(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^\s'\"&,}]+", re.I)


class _RedactTokens(logging.Filter):
    """botocore's DEBUG lines (request headers, the canonical request) carry the session token:
    mask it, so turning on DEBUG logging never writes a credential. The secret key is never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's to report
            return True
        if "security-token" in message.lower():
            record.msg, record.args = _TOKEN.sub(r"\1***", message), ()
        return True


_REDACT = _RedactTokens()
for _name in ("botocore.endpoint", "botocore.auth", "botocore.hooks", "botocore.httpsession", "botocore.parsers"):
    logging.getLogger(_name).addFilter(_REDACT)


class S3Error(StorageError):
    """An S3 operation failed. ``code`` is the S3 error code (or the exception type);
    ``transient`` says whether it failed only after retries ran out (a later try may work)."""

    def __init__(self, message: str, *, code: str | None = None, transient: bool = False):
        super().__init__(message)
        self.code = code
        self.transient = transient


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``; the prefix is "" or ends in '/'."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        raise StorageError(f"{uri!r} is not an s3:// URI (use s3://bucket/prefix)")
    if not parsed.netloc:
        raise StorageError(f"{uri!r}: an S3 store needs a bucket name (s3://bucket/prefix)")
    if any(c in parsed.netloc for c in "@:") or parsed.query or parsed.fragment:
        raise StorageError(f"{uri!r}: expected s3://bucket/prefix (no user, port, ?query or #fragment)")
    parts = [p for p in parsed.path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"{uri!r}: the prefix may not contain '.' or '..' segments")
    return parsed.netloc, "".join(p + "/" for p in parts)


def _safe_url(url: str | None) -> str:
    """An endpoint URL without any user:password@ part, for messages."""
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _env_policy() -> RetryPolicy:
    """The default retry policy; ``TUNEFLEET_S3_DEADLINE_S`` sets how long one operation keeps trying
    (default 30 s: a payload rides out longer outages in its own loop, ``jobs.channel``)."""
    deadline = os.environ.get("TUNEFLEET_S3_DEADLINE_S")
    return RetryPolicy(deadline_s=float(deadline)) if deadline else RetryPolicy()


class S3Store(CheckpointStore):
    """Checkpoints under ``s3://bucket/prefix``. Thread-safe (one boto3 client, used concurrently)."""

    list_page_size = 1000  # keys per ListObjectsV2 page (S3's maximum)
    control_poll_s = float(os.environ.get("TUNEFLEET_S3_CONTROL_POLL_S", "10"))  # one GET per this many seconds

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        retry: RetryPolicy | None = None,
        multipart_threshold: int = 16 * MB,
        multipart_chunksize: int = 16 * MB,
        max_concurrency: int = 10,
        session: boto3.session.Session | None = None,
    ):
        """``session``: a boto3 session to take credentials and profile from (default: a new one,
        i.e. the standard chain). Nothing touches the network until the first operation."""
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self.retry = retry or _env_policy()
        session = session or boto3.session.Session()
        self.region = region or session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        self._client = session.client(
            "s3",
            region_name=self.region,
            endpoint_url=endpoint_url or None,  # None: botocore reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / config
            config=sdk_config(self.retry, max_pool_connections=max(10, max_concurrency + 2)),
        )
        self.endpoint_url = self._client.meta.endpoint_url
        self._small = multipart_threshold
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._log = get_logger(component="s3")

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={_safe_url(self.endpoint_url)!r})"

    # ---- keys ----
    def _key(self, key: str) -> str:
        if key.startswith("/") or any(p in (".", "..") for p in key.split("/")):
            raise StorageError(f"key {key!r} escapes the store root {self.uri}")
        return self.prefix + key

    @override
    def key_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    @override
    def presign_get(self, key: str, expires_s: int) -> str:
        """A presigned GET URL (signed locally with the daemon's credentials; no request is sent)."""
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=int(expires_s))

    @override
    def presign_put(self, key: str, expires_s: int) -> str | None:
        """A presigned PUT of a JSON object (its Content-Type is signed: send application/json)."""
        return self._client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self._key(key), "ContentType": "application/json"},
            ExpiresIn=int(expires_s))

    # ---- object primitives ----
    @override
    def put_file(self, key: str, src: Path) -> None:
        full = self._key(key)
        src = Path(src)
        if src.stat().st_size < self._small:
            def put() -> None:
                with open(src, "rb") as f:
                    self._client.put_object(Bucket=self.bucket, Key=full, Body=f)
        else:
            def put() -> None:
                self._client.upload_file(str(src), self.bucket, full, Config=self._transfer)
        self._call("upload", key, put)

    @override
    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._call("put", key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data))

    @override
    def get_bytes(self, key: str) -> bytes | None:
        full = self._key(key)

        def get() -> bytes | None:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            with response["Body"] as body:  # reading is inside the retry: a body cut off is retried
                return body.read()

        return self._call("get", key, get)

    @override
    def get_file(self, key: str, dest: Path) -> None:
        full = self._key(key)

        def get() -> None:
            try:  # s3transfer writes a temp file next to dest and renames it when complete
                self._client.download_file(self.bucket, full, str(dest), Config=self._transfer)
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey"):
                    self._raise_missing(key)
                raise

        self._call("download", key, get)

    @override
    def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        full = self._key(prefix)

        def listing() -> list[tuple[str, int]]:
            out = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.list_page_size}
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix) :]
                    if key and not key.endswith("/"):  # skip "folder" marker objects
                        out.append((key, int(obj["Size"])))
            return out

        return sorted(self._call("list", prefix, listing))

    @override
    def delete_keys(self, keys: list[str]) -> None:
        full = [self._key(k) for k in keys]
        for i in range(0, len(full), _DELETE_BATCH):
            batch = full[i : i + _DELETE_BATCH]

            def delete(batch: list[str] = batch) -> None:
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                errors = [e for e in response.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
                if errors:
                    first = errors[0]
                    raise S3Error(
                        f"could not delete {len(errors)} object(s) under {self.uri}, e.g. "
                        f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip(),
                        code=first.get("Code"),
                    )

            self._call("delete", batch[0][len(self.prefix) :], delete)

    # ---- retries and errors ----
    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        started = time.monotonic()
        attempts = [1]

        def on_retry(attempt: int, exc: BaseException, sleep_s: float) -> None:
            attempts[0] = attempt + 1
            self._log.warning(
                "s3 retry", op=op, uri=self.key_uri(key), attempt=attempt, error=_describe(exc),
                sleep_s=round(sleep_s, 2),
            )

        try:
            return call_with_retry(fn, policy=self.retry, on_retry=on_retry)
        except StorageError:
            raise
        except Exception as exc:
            if not any(isinstance(c, BotoCoreError | ClientError | OSError) or _from_boto(c) for c in causes(exc)):
                raise  # a bug, not a storage fault: keep its traceback
            raise self._explain(exc, op, key, attempts[0], time.monotonic() - started) from None

    def _raise_missing(self, key: str) -> None:
        """A HEAD 404 says neither whether the key or the bucket is missing: ask once."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchBucket"):
                raise self._bucket_missing() from None
            raise
        raise S3Error(f"{self.key_uri(key)} does not exist", code="NoSuchKey")

    def _bucket_missing(self) -> S3Error:
        return S3Error(
            f"bucket {self.bucket!r} does not exist at {_safe_url(self.endpoint_url)} "
            f"(create it or fix checkpoint.store; the endpoint comes from AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL)",
            code="NoSuchBucket",
        )

    def _explain(self, exc: BaseException, op: str, key: str, attempts: int, elapsed: float) -> S3Error:
        """One message per fault: what went wrong and what to change. Never the credentials."""
        from botocore import exceptions as bx

        where = self.key_uri(key)
        endpoint = _safe_url(self.endpoint_url)
        code = next((c for c in map(error_code, causes(exc)) if c), None)
        status = next((s for s in map(http_status, causes(exc)) if s), None)
        kinds = {type(c) for c in causes(exc)}
        if any(issubclass(k, bx.NoCredentialsError | bx.PartialCredentialsError) for k in kinds):
            return S3Error(
                f"no usable AWS credentials for {self.uri} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or run where an instance role provides them)",
                code="NoCredentials",
            )
        if code == "NoSuchBucket":
            return self._bucket_missing()
        if code in ("AccessDenied", "Forbidden", "403", "AllAccessDisabled", "AccountProblem"):
            return S3Error(
                f"access denied: {op} {where} at {endpoint} (HTTP {status or 403} {code}); the credentials in use "
                "lack permission for this bucket/prefix (grant s3:GetObject/PutObject/ListBucket/DeleteObject "
                "there, or use other credentials via AWS_PROFILE / AWS_ACCESS_KEY_ID)",
                code=code,
            )
        if code == "InvalidAccessKeyId":
            return S3Error(
                f"{endpoint} does not know the access key id in use ({op} {where}); check AWS_ACCESS_KEY_ID / "
                "AWS_PROFILE, and that the endpoint (AWS_ENDPOINT_URL_S3) is the service that issued the key",
                code=code,
            )
        if code == "SignatureDoesNotMatch":
            return S3Error(
                f"{endpoint} rejected the request signature ({op} {where}): the secret access key does not "
                "match the access key id; check AWS_SECRET_ACCESS_KEY / the profile's credentials",
                code=code,
            )
        if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
            return S3Error(
                f"the session credentials are expired or invalid ({op} {where}); refresh them "
                "(aws sso login, or a new AWS_SESSION_TOKEN)",
                code=code,
            )
        if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return S3Error(
                f"bucket {self.bucket!r} is not in region {self.region!r} ({code}); set AWS_DEFAULT_REGION "
                "to the bucket's region",
                code=code,
            )
        if code == "InvalidBucketName" or any(issubclass(k, bx.ParamValidationError) for k in kinds):
            return S3Error(f"{self.uri}: {bucket_hint(self.bucket)}", code=code or "InvalidBucketName")
        detail = _describe(exc)
        if is_transient(exc):
            unreachable = any(issubclass(k, bx.EndpointConnectionError | bx.ConnectTimeoutError) for k in kinds)
            hint = " (is the endpoint right? AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)" if unreachable else ""
            return S3Error(
                f"{op} {where} failed after {attempts} attempt(s) over {elapsed:.1f} s at {endpoint}: {detail}{hint}",
                code=code or type(exc).__name__,
                transient=True,
            )
        return S3Error(f"{op} {where} failed at {endpoint}: {detail}", code=code or type(exc).__name__)


def bucket_hint(bucket: str) -> str:
    return (
        f"{bucket!r} is not a valid bucket name (3-63 characters: lowercase letters, digits, '-' and '.'); "
        "fix checkpoint.store"
    )


def _from_boto(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("boto3", "botocore", "s3transfer", "urllib3")


def _describe(exc: BaseException) -> str:
    """A short, credential-free description: the S3 code and message, or the exception type."""
    for c in causes(exc):
        code = error_code(c)
        if code:
            message = (getattr(c, "response", {}).get("Error") or {}).get("Message") or ""
            return f"{code} (HTTP {http_status(c)}) {message}".strip()
    return f"{type(exc).__name__}: {exc}"
