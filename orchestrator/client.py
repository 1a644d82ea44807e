"""The CLI as a client of ``tunefleet server``: which server and token to use, and a small httpx
client whose errors are the CLI's own (:class:`CliError` with the embedded CLI's exit codes).

- The server is ``$TUNEFLEET_SERVER``, else the one ``tunefleet login`` stored in
  ``$TUNEFLEET_HOME/credentials.json`` (mode 0600); the token is ``$TUNEFLEET_TOKEN``, else the
  stored one. Environment variables win over the stored login. No server: ``remote()`` is None and
  every command runs on this machine's store, as before.
- The token travels only in the ``Authorization`` header: it is never put in a message, a log or
  an exception.
- HTTP errors: 422 -> exit 2 (the server's message, a job file's problems as ``validate`` prints
  them); 401 -> exit 2 with "run tunefleet login"; 403, 404, 409 -> exit 1 with the server's
  message; 429 -> waits ``Retry-After`` once, then exit 1; 5xx and transport errors -> exit 1,
  "server unreachable at URL". One retry on a connection error.

Stdlib, httpx and the CLI's base only: the CLI must start fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cli_base import CliError

CREDENTIALS = "credentials.json"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_RETRY_AFTER_S = 30.0


def _home() -> Path:
    return Path(os.environ.get("TUNEFLEET_HOME") or "~/.tunefleet").expanduser()


def credentials_path() -> Path:
    return _home() / CREDENTIALS


def stored_login() -> dict[str, str]:
    """``{"url", "token"}`` from ``tunefleet login``, or {} (none, or unreadable)."""
    try:
        data = json.loads(credentials_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k in ("url", "token") and isinstance(v, str) and v}


def save_login(url: str, token: str) -> Path:
    """Write the login with mode 0600 from its creation (a temporary file made 0600, then renamed)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CREDENTIALS}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "token": token}, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def forget_login() -> bool:
    try:
        credentials_path().unlink()
    except FileNotFoundError:
        return False
    return True


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(f"server URL must start with http:// or https://, not {url!r}", 2)
    return url


def server_url() -> str | None:
    """The configured server (env first, then the stored login), or None: the embedded path."""
    url = os.environ.get("TUNEFLEET_SERVER", "").strip() or stored_login().get("url")
    return normalize_url(url) if url else None


def remote() -> Client | None:
    """A client for the configured server, or None when no server is configured."""
    url = server_url()
    if url is None:
        return None
    token = os.environ.get("TUNEFLEET_TOKEN", "").strip() or stored_login().get("token")
    if not token:
        raise CliError(f"no API token for {url}: set TUNEFLEET_TOKEN or run tunefleet login", 2)
    return Client(url, token)


@dataclass
class Client:
    url: str
    token: str = field(repr=False)  # never in a repr, a traceback's locals or a log line

    def _http(self):
        import httpx

        return httpx.Client(base_url=self.url + "/api/v1", headers={"Authorization": f"Bearer {self.token}"},
                            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json_body: Any = None,
                content: Callable[[], Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON body of a 2xx answer; a CliError otherwise."""
        import httpx

        waited = False
        connect_tries = 0
        while True:
            kwargs: dict[str, Any] = {"params": params, "headers": headers}
            if content is not None:
                kwargs["content"] = content()
            elif json_body is not None:
                kwargs["json"] = json_body
            try:
                with self._http() as http:
                    r = http.request(method, path, **kwargs)
            except httpx.ConnectError:
                connect_tries += 1
                if connect_tries < 2:
                    time.sleep(0.5)
                    continue
                raise self.unreachable() from None
            except httpx.HTTPError:
                raise self.unreachable() from None
            if r.status_code == 429 and not waited:
                waited = True
                time.sleep(_retry_after(r))
                continue
            if r.status_code >= 400:
                raise self.error(r.status_code, _detail(r))
            try:
                return r.json()
            except ValueError:
                raise CliError(f"server at {self.url} answered {r.status_code} with a body that is not JSON") from None

    def download(self, path: str, dest: Path) -> bool:
        """``GET path`` streamed into ``dest`` (whole or not at all); False on 404; a CliError otherwise."""
        import httpx

        part = dest.with_name(f".{dest.name}.part")
        for attempt in range(2):
            try:
                with self._http() as http, http.stream("GET", path) as r:
                    if r.status_code == 404:
                        return False
                    if r.status_code == 429 and attempt == 0:
                        time.sleep(_retry_after(r))
                        continue
                    if r.status_code >= 400:
                        r.read()
                        raise self.error(r.status_code, _detail(r))
                    with open(part, "wb") as f:
                        for chunk in r.iter_bytes(1 << 20):
                            f.write(chunk)
                os.replace(part, dest)
                return True
            except httpx.HTTPError:
                raise self.unreachable() from None
            finally:
                part.unlink(missing_ok=True)
        raise CliError(f"rate limited by the server at {self.url}")

    def fetch(self, path: str) -> bytes | None:
        """The body of ``GET path`` (a small object); None on 404."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="tunefleet-get.") as tmp:
            dest = Path(tmp) / "body"
            return dest.read_bytes() if self.download(path, dest) else None

    @contextlib.contextmanager
    def stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[Iterator[tuple[str, str]]]:
        """Server-sent events of ``GET path`` as (event, data) pairs."""
        import httpx

        try:
            with self._http() as http, http.stream("GET", path, params=params,
                                                   timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self.error(r.status_code, _detail(r))
                yield _sse_events(r.iter_lines())
        except httpx.HTTPError:
            raise self.unreachable() from None

    def unreachable(self) -> CliError:
        return CliError(f"server unreachable at {self.url}")

    def error(self, status: int, detail: Any) -> CliError:
        if status == 401:
            return CliError(f"the server at {self.url} did not accept the API token (revoked, expired or wrong): "
                            "run tunefleet login", 2)
        if status >= 500:
            return CliError(f"server unreachable at {self.url} ({status}: {_text(detail)})")
        if status == 429:
            return CliError(f"rate limited by the server at {self.url}: {_text(detail)}")
        if status == 413:
            return CliError(_text(detail), 2)
        return CliError(_text(detail), 2 if status in (400, 422) else 1)


def _retry_after(r) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(r.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _detail(r) -> Any:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:500] or f"HTTP {r.status_code}"
    return body.get("detail", body) if isinstance(body, dict) else body


def _text(detail: Any) -> str:
    """A server's ``detail``: a string as is, a list of problems one per line as validate prints them."""
    if isinstance(detail, list):
        lines = []
        for p in detail:
            if isinstance(p, dict):
                where = p.get("loc") or ""
                line = f" (line {p['line']})" if p.get("line") else ""
                lines.append(f"{where}{line}: {p.get('message')}" if where else str(p.get("message")))
            else:
                lines.append(str(p))
        n = len(lines)
        return f"{n} problem{'s' if n != 1 else ''}; nothing was queued\n" + "\n".join(lines)
    return str(detail)


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    if data:
        yield event, "\n".join(data)


# ---------------------------------------------------------------- job ids
def resolve_job_id(client: Client, prefix: str) -> str:
    """The one visible job whose id is ``prefix`` or starts with it, with ``Store.resolve_job_id``'s
    messages (exit 1)."""
    prefix = prefix.strip().lower()
    if not prefix:
        raise CliError("empty job id")
    ids = sorted(j["id"] for j in client.request("GET", "/jobs", params={"limit": 100_000}))
    if prefix in ids:
        return prefix
    matches = [i for i in ids if i.startswith(prefix)][:6]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(f"no job id starts with {prefix!r}")
    more = ", ..." if len(matches) > 5 else ""
    raise CliError(f"job id prefix {prefix!r} is ambiguous; it matches {', '.join(matches[:5])}{more}")


# ---------------------------------------------------------------- submit
def submission(job_file: Path, spec) -> tuple[str, dict[str, Path]]:
    """The job file's text to send and the local files it names, keyed as that text names them.

    A path the server cannot take as a key (absolute, ``~``, or with ``..``) is rewritten in the
    text to ``_inputs/<n>/<basename>`` on its own line, so the line numbers of the server's
    messages still match the file."""
    import re

    import yaml

    text = job_file.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    data = data if isinstance(data, dict) else {}
    files: dict[str, Path] = {}
    renames: dict[str, str] = {}

    def key_for(raw: str, local: Path) -> str:
        if raw in renames:
            return renames[raw]
        parts = Path(raw).parts
        if raw.startswith(("/", "~")) or ".." in parts or "\\" in raw:
            new = f"_inputs/{len(renames)}/{local.name}"
            renames[raw] = new
            return new
        return raw

    for key in ("datasets", "eval_datasets"):
        raws = data.get(key) or []
        for i, d in enumerate(getattr(spec, key, None) or []):
            raw = raws[i].get("path") if i < len(raws) and isinstance(raws[i], dict) else None
            if isinstance(raw, str) and os.path.isfile(d.path):
                files[key_for(raw, Path(d.path))] = Path(d.path)
    raw_model = data.get("base_model")
    if isinstance(raw_model, str) and raw_model.startswith(("/", ".", "~")) and os.path.isdir(spec.base_model):
        folder = Path(spec.base_model)
        prefix = key_for(raw_model, folder)
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                files[f"{prefix.rstrip('/')}/{f.relative_to(folder).as_posix()}"] = f
    for raw, new in renames.items():
        # the value as a whole YAML/JSON scalar: after `: `, `- `, `[`, `,` or a quote; before a quote,
        # a comma, a bracket, a comment or the line's end
        pattern = re.compile(r"(?<=[\s:\[,{'\"])" + re.escape(raw) + r"(?=['\"\s,\]}#]|$)", re.M)
        text = pattern.sub(lambda _m, new=new: new, text)
    return text, files


def submit(client: Client, job_file: Path, spec, priority: int | None, progress) -> dict[str, Any]:
    """POST the job with its files; ``progress(total)`` returns a context giving an ``advance(n)``
    callback (or None) for large uploads."""
    import base64

    text, files = submission(job_file, spec)
    payload = {"yaml": text, "files": {k: base64.b64encode(p.read_bytes()).decode() for k, p in files.items()}}
    if priority is not None:
        payload["priority"] = priority
    raw = json.dumps(payload).encode()
    with progress(sum(p.stat().st_size for p in files.values()), len(raw)) as advance:
        if advance is None:
            return client.request("POST", "/jobs", json_body=payload)

        def chunks():
            for i in range(0, len(raw), 1 << 20):
                piece = raw[i:i + (1 << 20)]
                advance(len(piece))
                yield piece

        return client.request("POST", "/jobs", content=chunks,
                              headers={"Content-Type": "application/json", "Content-Length": str(len(raw))})


# ---------------------------------------------------------------- sweeps
def resolve_sweep_id(client: Client, prefix: str) -> str:
    """The one visible sweep whose id is ``prefix`` or starts with it, with ``Store.get_sweep``'s
    messages (exit 1)."""
    ids = sorted(s["id"] for s in client.request("GET", "/sweeps"))
    if prefix in ids:
        return prefix
    matches = [i for i in ids if i.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    raise CliError(f"no sweep {prefix!r}" + (f" (candidates: {', '.join(matches[:5])})" if matches else ""))


def sweep_submission(sweep_file: Path) -> dict[str, Any]:
    """The body of ``POST /sweeps``: the sweep file's text with its ``base:`` renamed to the name the
    server gives the base job (line for line), the base job's text as ``submission`` sends a job,
    and the base job's local files. The caller has validated the sweep (``load_sweep``) already."""
    import base64
    import re

    import yaml

    from jobs.spec import load_job_file
    from orchestrator.sweep import SWEEP_BASE
    from providers.registry import PROVIDERS

    text = sweep_file.read_text()
    raw_base = yaml.safe_load(text)["base"]
    base_path = (sweep_file.parent / raw_base).resolve()
    base_text, files = submission(base_path, load_job_file(base_path, known_providers=PROVIDERS))
    pattern = re.compile(r"^(base\s*:\s*)(['\"]?)" + re.escape(str(raw_base)) + r"\2(\s*(#.*)?)$", re.M)
    sent, n = pattern.subn(lambda m: f"{m.group(1)}{SWEEP_BASE}{m.group(3)}", text, count=1)
    if n != 1 or yaml.safe_load(sent).get("base") != SWEEP_BASE:  # a flow mapping, an anchor...: rewrite it whole
        doc = yaml.safe_load(text)
        doc["base"] = SWEEP_BASE
        sent = yaml.safe_dump(doc, sort_keys=False)
    return {"yaml": sent, "base": base_text,
            "files": {k: base64.b64encode(p.read_bytes()).decode() for k, p in files.items()}}
