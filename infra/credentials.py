"""Store credentials for one attempt: short-lived, and able to touch only that job's prefix.

Why: a rented machine is somebody else's computer. On a marketplace (Vast.ai) the host's operator
can read the container's environment; a cloud VM (SkyPilot) is ours but is still one more place a
key can leak from. So an attempt never gets the daemon's own keys by default. It gets STS session
credentials whose session policy allows:

- read, write and delete under ``<store>/<job>/`` (checkpoints, progress, the final adapter),
- read of ``<store>/inputs/`` (its staged inputs, content-addressed and shared between jobs) and,
  for a sweep's next rung, of the job it resumes from,
- listing the bucket only under those prefixes.

The daemon's identity comes from botocore's own credential chain (environment, profile, SSO,
instance or container role), so whatever lets the daemon reach the store works. With
``store_role_arn`` the daemon calls ``AssumeRole`` on that role; otherwise ``GetFederationToken``
(which needs long-lived IAM user keys; a daemon on SSO or an instance role sets a role instead).
The session policy can only narrow what the caller may do, never widen it.

Where the store has no STS (Cloudflare R2, MinIO without it): a machine we trust (a SkyPilot VM in
our own account) gets the daemon's static keys through its secret channel; a marketplace host gets
them only with the explicit opt-in ``untrusted_hosts: forward_static_keys``, and is refused
otherwise, with that reason. Nothing here is logged; errors name the store and the cause, never a key.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

STATIC_OPT_IN = "forward_static_keys"
_PASS_THROUGH = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
REFRESH_OBJECT = "credentials.json"  # <job>/attempts/<attempt>/credentials.json: refreshed keys


class CredentialError(Exception):
    """No credentials can be given to this attempt; the message says why and what to configure."""


@dataclass(frozen=True)
class AttemptCredentials:
    """What one attempt's payload gets to reach its store. ``env`` holds secrets: never log it."""

    env: dict[str, str] = field(repr=False)
    kind: str  # "sts" (scoped, expiring), "static" (the daemon's own keys), "none" (a local folder store)
    expires_at: float | None = None  # epoch seconds (sts only)
    policy: dict[str, Any] | None = None  # the session policy requested (sts only)


def session_policy(bucket: str, prefix: str, job_id: str, reads: tuple[str, ...] = ()) -> dict[str, Any]:
    """The session policy of one job's attempts (see the module doc). ``reads``: other jobs whose
    checkpoints it may read (a sweep rung's parent)."""
    arn = f"arn:aws:s3:::{bucket}"
    mine = f"{prefix}{job_id}/"
    read_prefixes = [f"{prefix}inputs/", *(f"{prefix}{other}/" for other in reads)]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "JobReadWrite", "Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
             "Resource": [f"{arn}/{mine}*"]},
            {"Sid": "InputsRead", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"{arn}/{p}*" for p in read_prefixes]},
            {"Sid": "ListOwnPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [arn],
             "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in (mine, *read_prefixes)]}}},
        ],
    }


def allows(policy: dict[str, Any], action: str, bucket: str, key: str) -> bool:
    """Whether ``policy`` (Allow statements with literal-prefix ``*`` resources, as built above)
    allows ``action`` on ``bucket/key``; for ``s3:ListBucket``, ``key`` is the listed prefix."""
    for st in policy.get("Statement", []):
        if st.get("Effect") != "Allow" or action not in _listify(st.get("Action")):
            continue
        if action == "s3:ListBucket":
            if f"arn:aws:s3:::{bucket}" not in _listify(st.get("Resource")):
                continue
            wanted = _listify(((st.get("Condition") or {}).get("StringLike") or {}).get("s3:prefix"))
            if any(_match(w, key) for w in wanted):
                return True
        elif any(_match(r, f"arn:aws:s3:::{bucket}/{key}") for r in _listify(st.get("Resource"))):
            return True
    return False


def _listify(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _match(pattern: str, value: str) -> bool:
    if pattern.endswith("*") and "*" not in pattern[:-1]:
        return value.startswith(pattern[:-1])
    return "*" not in pattern and value == pattern


def _session(session=None):
    import boto3

    return session or boto3.session.Session()


def _sts(session):
    from infra.retry import RetryPolicy, sdk_config

    region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
    return session.client("sts", region_name=region, config=sdk_config(RetryPolicy(deadline_s=20.0)))


def _static(session) -> dict[str, str]:
    creds = session.get_credentials()
    if creds is None:
        raise CredentialError("no AWS credentials found (botocore looked in the environment, ~/.aws, SSO and "
                              "the instance role): configure the daemon's access to the store")
    frozen = creds.get_frozen_credentials()
    env = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}
    if frozen.token:
        env["AWS_SESSION_TOKEN"] = frozen.token
    return env


def _common_env(region: str | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASS_THROUGH if os.environ.get(k)}
    if region and "AWS_DEFAULT_REGION" not in env:
        env["AWS_DEFAULT_REGION"] = region
    return env


def mint(store_uri: str, job_id: str, *, duration_s: int = 3600, role_arn: str | None = None,
         reads: tuple[str, ...] = (), session=None) -> AttemptCredentials:
    """Scoped STS credentials for one job's attempts (see the module doc). Raises CredentialError
    saying why when STS refused or is not there."""
    from botocore.exceptions import BotoCoreError, ClientError

    from infra.s3 import parse_s3_uri

    bucket, prefix = parse_s3_uri(store_uri)
    policy = session_policy(bucket, prefix, job_id, reads)
    session = _session(session)
    _static(session)  # no identity at all: say so plainly
    sts = _sts(session)
    name = f"tf-{job_id}"[:32]
    try:
        if role_arn:
            answer = sts.assume_role(RoleArn=role_arn, RoleSessionName=name, Policy=json.dumps(policy),
                                     DurationSeconds=duration_s)
        else:
            answer = sts.get_federation_token(Name=name, Policy=json.dumps(policy), DurationSeconds=duration_s)
        c = answer["Credentials"]
        expires = c["Expiration"]
        expires_at = expires.timestamp() if hasattr(expires, "timestamp") else time.time() + duration_s
    except (ClientError, BotoCoreError, KeyError) as exc:
        how = f"AssumeRole on {role_arn}" if role_arn else "GetFederationToken"
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else type(exc).__name__
        raise CredentialError(f"STS {how} failed ({code}); attempts need scoped store credentials: "
                              + ("check the role's trust policy" if role_arn else
                                 "set store_role_arn in config.yaml (GetFederationToken needs IAM user keys)")
                              ) from None
    env = {**_common_env(session.region_name), "AWS_ACCESS_KEY_ID": c["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"], "AWS_SESSION_TOKEN": c["SessionToken"],
           "TUNEFLEET_CREDENTIALS_EXPIRE_AT": f"{expires_at:.0f}"}
    return AttemptCredentials(env=env, kind="sts", expires_at=expires_at, policy=policy)


def for_attempt(store_uri: str, job_id: str, *, trusted_host: bool, on_premises: bool,
                untrusted_hosts: str = "refuse_static_keys", duration_s: int = 3600,
                role_arn: str | None = None, reads: tuple[str, ...] = (), session=None) -> AttemptCredentials:
    """The store credentials one attempt's payload gets (see the module doc).

    - a local folder store: none (only an on-premises attempt is ever placed with one);
    - on premises (this machine, the team's Ray cluster): the daemon's own AWS variables;
    - elsewhere: scoped STS credentials; if STS fails, the daemon's static keys for a trusted host
      or an untrusted one with the opt-in, else CredentialError with both reasons."""
    if not store_uri.startswith("s3://"):
        return AttemptCredentials(env={}, kind="none")
    if on_premises:  # this machine or the team's cluster: the daemon's AWS variables; the rest of
        # the chain (profile, SSO, instance role) is the payload's own, and refreshes itself there
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        return AttemptCredentials(env={**_common_env(None), **{k: os.environ[k] for k in keys if os.environ.get(k)}},
                                  kind="static")
    session = _session(session)
    try:
        return mint(store_uri, job_id, duration_s=duration_s, role_arn=role_arn, reads=reads, session=session)
    except CredentialError as exc:
        if trusted_host or untrusted_hosts == STATIC_OPT_IN:
            return AttemptCredentials(env={**_common_env(session.region_name), **_static(session)}, kind="static")
        raise CredentialError(f"{exc}. Without STS (R2, MinIO) a marketplace host would get the daemon's own "
                              f"keys; that needs untrusted_hosts: {STATIC_OPT_IN} in config.yaml") from None


def refresh_key(job_id: str, attempt_id: str) -> str:
    """Where the daemon puts an attempt's next credentials, inside the job's own prefix (readable
    only with that job's credentials, which is what they replace)."""
    return f"{job_id}/attempts/{attempt_id}/{REFRESH_OBJECT}"


def refresh_doc(creds: AttemptCredentials) -> bytes:
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    return json.dumps({**{k: creds.env[k] for k in keys if k in creds.env}, "expires_at": creds.expires_at}).encode()


def refreshable_session(store_uri: str, job_id: str, attempt_id: str, env: dict[str, str] | None = None):
    """For a payload given expiring credentials (``TUNEFLEET_CREDENTIALS_EXPIRE_AT``): a boto3
    session whose credentials botocore refreshes by itself before they expire, from the object the
    daemon rewrites at half their life (``refresh_key``), read with the credentials still valid.
    None when the credentials do not expire."""
    import boto3
    import botocore.session
    from botocore.credentials import RefreshableCredentials

    env = dict(os.environ if env is None else env)
    expire = env.get("TUNEFLEET_CREDENTIALS_EXPIRE_AT")
    if not expire or not env.get("AWS_ACCESS_KEY_ID"):
        return None
    from datetime import UTC, datetime

    def iso(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, UTC).isoformat()

    current = {"access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env.get("AWS_SECRET_ACCESS_KEY", ""),
               "token": env.get("AWS_SESSION_TOKEN"), "expiry_time": iso(float(expire)), "_at": float(expire)}

    def refresh() -> dict[str, Any]:
        from infra.s3 import S3Store

        reader = boto3.session.Session(aws_access_key_id=current["access_key"],
                                       aws_secret_access_key=current["secret_key"],
                                       aws_session_token=current["token"])
        try:
            raw = S3Store(store_uri, session=reader).get_bytes(refresh_key(job_id, attempt_id))
            doc = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - keep the current ones; botocore says so once they expire
            doc = {}
        at = doc.get("expires_at")
        if isinstance(at, int | float) and at > current["_at"] and doc.get("AWS_ACCESS_KEY_ID"):
            current.update(access_key=doc["AWS_ACCESS_KEY_ID"], secret_key=doc.get("AWS_SECRET_ACCESS_KEY", ""),
                           token=doc.get("AWS_SESSION_TOKEN"), expiry_time=iso(at), _at=float(at))
        return {k: v for k, v in current.items() if k != "_at"}

    creds = RefreshableCredentials.create_from_metadata(
        metadata={k: v for k, v in current.items() if k != "_at"}, refresh_using=refresh, method="tunefleet-store")
    core = botocore.session.get_session()
    core._credentials = creds  # noqa: SLF001 - botocore's documented way to give a session fixed providers is this
    return boto3.session.Session(botocore_session=core)
