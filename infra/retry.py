"""Retries for object storage (and any other flaky remote): transient faults back off, permanent ones fail fast.

Why two layers, and how they combine (S3):

1. **botocore, inside each SDK call** (``sdk_config``): standard retry mode, ``total_max_attempts``
   (default 3) per HTTP request, exponential backoff with jitter (botocore's own: up to 1 s, 2 s,
   ...), plus connect/read timeouts. It retries 5xx, throttling codes (SlowDown, Throttling, ...),
   and connection errors on *one request*: one multipart part, one PUT. That keeps a 10 GB upload
   from restarting because one part hit a 503.
2. **tenacity, around each store operation** (``call_with_retry``): when botocore gives up, or a
   fault happens where botocore does not retry (a connection dropped while *reading a body*, a
   multipart upload that s3transfer aborted), the whole operation (put a file, get an object, list)
   is retried, ``RetryPolicy.attempts`` times at most, with exponential backoff + jitter; no sleep
   reaches past ``RetryPolicy.deadline_s`` and no attempt starts after it.

Worst case for one operation: each of its requests is sent ``attempts x sdk_attempts`` times, in about
``deadline_s`` + one attempt's own worst case (its timeouts x sdk_attempts) of wall time.
Permanent faults (AccessDenied, NoSuchBucket, bad credentials, ...) are retried by neither layer:
botocore does not retry 4xx, and ``is_transient`` says no, so they surface after one request.
The caller (``infra.s3``) turns them into a ``StorageError`` that says what to fix.

Nothing here formats credentials: classification looks only at error codes, status codes and
exception types.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

T = TypeVar("T")

# S3 (and S3-compatible) error codes worth another try. HTTP status >= 500 and 429 count too.
TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "OperationAborted", "500", "502", "503", "504", "429",
    # a multipart upload that vanished (aborted, or completed by a request whose answer was lost):
    # botocore cannot help, but the store's next attempt uploads the file again
    "NoSuchUpload",
})
# Codes that no retry will fix: the message must say what the user has to change.
PERMANENT_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "NoSuchBucket",
    "InvalidBucketName", "PermanentRedirect", "301", "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException", "InvalidRequest", "InvalidArgument", "NotImplemented",
})


@dataclass(frozen=True)
class RetryPolicy:
    """The outer (tenacity) layer: how often, how long, how far apart."""

    attempts: int = 6
    deadline_s: float = 30.0  # no attempt and no sleep starts after this
    initial_wait_s: float = 0.5
    max_wait_s: float = 8.0
    jitter_s: float = 0.5
    sdk_attempts: int = 3  # botocore's per-request attempts (total, including the first)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``"NoSuchBucket"``, ``"404"``), else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        if code:
            return str(code)
    return None


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (``__cause__``/``__context__``): boto3's S3UploadFailedError and
    RetriesExceededError hide the real ClientError or connection error there."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        last = getattr(cur, "last_exception", None)  # RetriesExceededError
        cur = cur.__cause__ or cur.__context__ or (last if isinstance(last, BaseException) else None)
    return seen


def _transient_one(exc: BaseException) -> bool | None:
    """True/False when this exception alone decides; None when it says nothing."""
    from botocore import exceptions as bx

    code = error_code(exc)
    if code is not None:
        if code in PERMANENT_CODES:
            return False
        status = http_status(exc)
        return code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429))
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError | bx.ParamValidationError):
        return False
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError):
        return True  # endpoint unreachable, connect/read timeout, closed mid-response, short body
    if isinstance(exc, ConnectionError | TimeoutError | socket.timeout):
        return True  # the builtin ones: reset, aborted, broken pipe
    try:
        import urllib3.exceptions as ux

        if isinstance(exc, ux.ProtocolError | ux.ReadTimeoutError | ux.NewConnectionError):
            return True
    except ImportError:  # pragma: no cover - urllib3 always comes with botocore
        pass
    name = type(exc).__name__
    if name in ("RetriesExceededError", "S3TransferRetriesExceededError"):
        return True  # s3transfer gave up on a download stream: another whole attempt may work
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: throttling, 5xx, timeouts, dropped connections."""
    for one in causes(exc):
        verdict = _transient_one(one)
        if verdict is not None:
            return verdict
    return False


def sdk_config(policy: RetryPolicy, *, max_pool_connections: int = 10, **s3_options: Any):
    """botocore's own layer: standard retries, and a deadline on every connect and read."""
    from botocore.config import Config

    return Config(
        retries={"total_max_attempts": max(1, policy.sdk_attempts), "mode": "standard"},
        connect_timeout=policy.connect_timeout_s,
        read_timeout=policy.read_timeout_s,
        max_pool_connections=max_pool_connections,
        s3=s3_options or None,
    )


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    transient: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """``fn()``, retried on transient faults with exponential backoff + jitter, within the policy's
    attempts and deadline. The last exception is re-raised unchanged (the caller explains it)."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            on_retry(state.attempt_number, state.outcome.exception(), state.next_action.sleep)

    deadline = time.monotonic() + policy.deadline_s

    def wait(state: tenacity.RetryCallState) -> float:
        backoff = min(policy.max_wait_s, policy.initial_wait_s * 2 ** (state.attempt_number - 1))
        return max(0.0, min(backoff + random.uniform(0, policy.jitter_s), deadline - time.monotonic()))

    def stop(state: tenacity.RetryCallState) -> bool:
        return state.attempt_number >= max(1, policy.attempts) or time.monotonic() >= deadline

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient),
        stop=stop,
        wait=wait,
        sleep=time.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
