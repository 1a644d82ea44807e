"""An HTTP proxy on 127.0.0.1 that injects S3 faults by rule, in front of a real server (moto).

Why: retries and the commit protocol are only believable when tested against the faults S3 really
produces: 503 SlowDown, slow responses, connections dropped mid-response, 403s. Everything not
faulted is forwarded byte-for-byte (request line, headers, Content-Length and chunked bodies,
ETag and every other response header). The one change: ``Expect: 100-continue`` is answered by the
proxy itself (as HTTP allows a proxy to) and not forwarded, so a fault can be decided before the
body is sent, the way S3 answers a PUT it will reject.

    with FaultyProxy("127.0.0.1", moto_port) as proxy:
        proxy.add(Rule(ops={"UploadPart"}, action="error", every=2))   # every other part: 503 SlowDown
        ... client with endpoint_url=proxy.endpoint ...
        proxy.count("UploadPart")                                    # what reached the proxy

Each client connection gets its own thread and a fresh upstream connection per request.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

_COPY = 1 << 20
_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Request:
    method: str
    target: str
    op: str  # the S3 operation, e.g. "PutObject", "UploadPart", "GetObject", "ListObjectsV2"
    bucket: str
    key: str
    headers: dict[str, str]  # lower-cased names (the raw bytes are forwarded, not these)


@dataclass
class Rule:
    """Which requests to fault and how.

    ``ops``: S3 operation names (None: any); ``key_contains``: a substring of the key (None: any).
    Of the matching requests, numbers 1, 1+every, 1+2*every, ... are faulted, at most ``times``
    (None: no limit). Actions:

    - ``error``: answer ``status`` with an S3 XML error (``code``, ``message``) without asking upstream;
    - ``delay``: wait ``delay_s``, then forward;
    - ``drop``: forward, then close the connection mid-response (half the body, or nothing when
      the response has no body: the request took effect but the client never hears so).
    """

    ops: set[str] | None = None
    key_contains: str | None = None
    action: str = "error"
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    extra_xml: str = ""  # more elements for the error body, e.g. <AWSAccessKeyId>
    delay_s: float = 0.0
    every: int = 1
    times: int | None = None
    matched: int = 0
    fired: int = 0

    def matches(self, req: Request) -> bool:
        return (self.ops is None or req.op in self.ops) and (
            self.key_contains is None or self.key_contains in req.key
        )

    def take(self) -> bool:
        """Count a matching request; whether this one is faulted."""
        self.matched += 1
        if (self.matched - 1) % max(1, self.every) != 0:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


@dataclass
class Seen:
    op: str
    key: str
    action: str  # "forward" or the rule's action
    at: float = field(default_factory=time.monotonic)


def s3_operation(method: str, target: str, headers: dict[str, str]) -> tuple[str, str, str]:
    """(operation, bucket, key) of a path-style S3 request."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    bucket, _, key = parts.path.lstrip("/").partition("/")
    key = unquote(key)
    if not bucket:
        return "ListBuckets", "", ""
    if not key:
        if method == "GET":
            if query.get("list-type") == ["2"]:
                return "ListObjectsV2", bucket, ""
            return ("ListMultipartUploads" if "uploads" in query else "ListObjects"), bucket, ""
        if method == "POST":
            return ("DeleteObjects" if "delete" in query else "PostBucket"), bucket, ""
        op = {"HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}.get(method, method)
        return op, bucket, ""
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPart", bucket, key
        return ("CopyObject" if "x-amz-copy-source" in headers else "PutObject"), bucket, key
    if method == "POST":
        return ("CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"), bucket, key
    if method == "DELETE":
        return ("AbortMultipartUpload" if "uploadId" in query else "DeleteObject"), bucket, key
    if method == "HEAD":
        return "HeadObject", bucket, key
    return ("ListParts" if "uploadId" in query else "GetObject"), bucket, key


class _Closed(Exception):
    """The client closed its connection between requests."""


def _read_head(f: BinaryIO) -> list[bytes]:
    """Raw lines (with CRLF) of a request/status line and headers, up to the blank line."""
    lines: list[bytes] = []
    while True:
        line = f.readline(65537)
        if not line:
            if lines:
                raise ConnectionError("connection closed inside a message head")
            raise _Closed
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return lines


def _headers(lines: list[bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines[1:-1]:
        name, _, value = line.decode("latin-1").partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def _copy_body(src: BinaryIO, dst: socket.socket | None, headers: dict[str, str], *, until_eof: bool) -> None:
    """Copy one message body raw (chunk framing included); ``dst`` None just consumes it."""

    def out(data: bytes) -> None:
        if dst is not None:
            dst.sendall(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = src.readline(65537)
            if not size_line:
                raise ConnectionError("connection closed inside a chunked body")
            out(size_line)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = src.readline(65537)
                    if not trailer:
                        raise ConnectionError("connection closed inside chunk trailers")
                    out(trailer)
                    if trailer in (b"\r\n", b"\n"):
                        return
            _copy_exact(src, out, size + 2)  # data + CRLF
        return
    if "content-length" in headers:
        _copy_exact(src, out, int(headers["content-length"]))
    elif until_eof:
        while data := src.read1(_COPY):
            out(data)


def _copy_exact(src: BinaryIO, out, n: int) -> None:
    while n > 0:
        data = src.read(min(n, _COPY))
        if not data:
            raise ConnectionError("connection closed inside a body")
        out(data)
        n -= len(data)


class FaultyProxy:
    """A threaded HTTP/1.1 proxy that forwards to ``upstream_host:upstream_port`` and applies rules."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1", port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self.endpoint = f"http://{self.host}:{self.port}"
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="faulty-proxy", daemon=True)

    # ---- control ----
    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        try:  # wake the accept() blocked in the other thread (closing alone does not on Linux)
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
        except OSError:
            pass
        try:
            self._listener.close()
        finally:
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.seen.clear()

    def count(self, op: str | None = None, key_contains: str | None = None, action: str | None = None) -> int:
        with self._lock:
            return sum(
                1 for s in self.seen
                if (op is None or s.op == op) and (key_contains is None or key_contains in s.key)
                and (action is None or s.action == action)
            )

    # ---- serving ----
    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="faulty-proxy-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            f = conn.makefile("rb")
            while not self._stopping:
                if not self._one(conn, f):
                    break
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _pick(self, req: Request) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(req) and rule.take():
                    return rule
        return None

    def _one(self, conn: socket.socket, f: BinaryIO) -> bool:
        """Serve one request; whether the client connection stays open."""
        head = _read_head(f)
        method, target, _version = head[0].decode("latin-1").split(" ", 2)
        headers = _headers(head)
        op, bucket, key = s3_operation(method, target, headers)
        req = Request(method, target, op, bucket, key, headers)
        rule = self._pick(req)
        action = rule.action if rule else "forward"
        with self._lock:
            self.seen.append(Seen(op, key, action))
        expects = headers.get("expect", "").lower() == "100-continue"

        if rule is not None and rule.action == "error":
            if not expects:
                _copy_body(f, None, headers, until_eof=False)
            self._send_error(conn, req, rule, close=expects)
            return not expects
        if rule is not None and rule.action == "delay":
            time.sleep(rule.delay_s)

        if expects:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = [line for line in head if not line.lower().startswith(b"expect:")]
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(b"".join(head))
            _copy_body(f, up, headers, until_eof=False)
            uf = up.makefile("rb")
            rhead = _read_head(uf)
            while rhead[0].split(b" ", 2)[1].startswith(b"1"):  # interim responses
                rhead = _read_head(uf)
            rheaders = _headers(rhead)
            status = int(rhead[0].split(b" ", 2)[1])
            has_body = method != "HEAD" and status not in (204, 304)
            if rule is not None and rule.action == "drop":
                length = int(rheaders.get("content-length", "0") or 0) if has_body else 0
                if length > 0:
                    conn.sendall(b"".join(rhead))
                    _copy_exact(uf, conn.sendall, length // 2)
                conn.shutdown(socket.SHUT_RDWR)
                return False
            conn.sendall(b"".join(rhead))
            framed = "content-length" in rheaders or "chunked" in rheaders.get("transfer-encoding", "").lower()
            if has_body:
                _copy_body(uf, conn, rheaders, until_eof=True)
            closing = rheaders.get("connection", "").lower() == "close" or (has_body and not framed)
            return not closing and headers.get("connection", "").lower() != "close"

    def _send_error(self, conn: socket.socket, req: Request, rule: Rule, *, close: bool) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            f"<Code>{rule.code}</Code><Message>{rule.message}</Message>"
            f"<Resource>/{req.bucket}/{req.key}</Resource><RequestId>{request_id}</RequestId>"
            f"{rule.extra_xml}</Error>"
        ).encode()
        if req.method == "HEAD":
            body = b""
        reason = _REASONS.get(rule.status, "Error")
        lines = [
            f"HTTP/1.1 {rule.status} {reason}",
            "Content-Type: application/xml",
            f"Content-Length: {len(body)}",
            f"x-amz-request-id: {request_id}",
        ]
        if close:
            lines.append("Connection: close")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        if close:
            conn.shutdown(socket.SHUT_WR)
