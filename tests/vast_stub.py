"""A stub Vast.ai server: the endpoints ``providers.vast`` uses, on 127.0.0.1, for any test.

Paths and bodies follow the official client (vastai 1.9.1, ``vastai/api/instances.py`` and
``offers.py``); every path sits under the server root the provider is given as ``url``:

- ``POST /api/v0/bundles/``: search; answers ``{"offers": [...]}`` from ``stub.offers[body["type"]]``
  (no other filtering: the provider must re-check), minus asks already rented.
- ``PUT /api/v0/asks/{ask}/``: rent; ``{"success": true, "new_contract": ID}``. A body ``price``
  (the SDK's ``bid_price``) makes an interruptible rental at that price; ``null`` an on-demand one
  at the ask's ``dph_total``. An unknown or already rented ask: 404 ``no_such_ask``.
- ``GET /api/v0/instances/{id}/?owner=me``: show; ``{"instances": row}``; gone: 404 (or
  ``{"instances": null}`` with ``gone_as_null``).
- ``GET /api/v1/instances/``: the SDK's list; ``select_filters`` (``{"col": {"in": [...]}}`` or
  ``{"eq": v}``), ``limit``, ``after_token``; answers ``{"instances": page, "next_token": ...}``.
  ``GET /api/v0/instances/`` (the older list) answers every row.
- ``DELETE /api/v0/instances/{id}/``: destroy; ``{"success": true}``; unknown: 404.

Rows carry the fields the provider reads: ``id, machine_id, label, actual_status, intended_status,
gpu_name, gpu_ram, num_gpus, is_bid, bid_price, dph_total, min_bid, image_uuid, image_runtype,
image_args, onstart, extra_env ([[name, value], ...]), disk_space, start_date``.

Behaviours (attributes, set any time):
- ``wrong_gpu = "RTX 3090"``: rentals report this GPU instead of the ask's (SkyPilot's bug rents
  whatever comes first); ``ignore_bid = True``: bids are rented on demand at ``dph_total`` (the
  same bug sent a spot request without its price); ``rent_overrides``: any other row fields.
- ``status_on_rent``: what a fresh rental reports (default ``"running"``; ``"loading"`` to hold it).
- ``outbid(id)``: marks the instance ``stopped`` (Vast pauses, not deletes, an outbid
  interruptible instance), then calls ``stopper(id)`` if its process is alive.
- ``set_status(id, status)``; ``fail(method, path_prefix, status, times=1, body=None)`` answers the
  next matching requests with an error; ``rent_answer_delay_s`` rents, then answers that late.
- ``ignore_list_filters``: the v1 list ignores ``select_filters`` (the client must check labels).
- ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
- ``runner(instance_id, env, script)``: called when an instance is rented, to play the remote
  machine (e.g. start ``python -m jobs.train`` with ``env``). ``script`` is the shell script the
  container would run: ``args[1]`` for the provider's ``runtype: args`` with a ``bash -c`` entrypoint,
  else the ``onstart`` text. If it returns an object with ``wait()`` (a ``Popen``), the stub waits on
  it in a thread and marks the instance ``exited`` when it returns (``exit_codes[id]`` holds the code),
  unless it was stopped or destroyed first. ``stopper(instance_id)`` is called on ``outbid`` and on
  destroy while that process is alive (e.g. SIGKILL it).

Every request is recorded in ``requests`` (``Recorded``: method, path, query, headers, body).
Use as a context manager (``with VastStub(...) as stub: stub.url``) or ``start()``/``stop()``.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Runner = Callable[[int, dict[str, str], str], Any]
Stopper = Callable[[int], None]
_SHELLS = {"bash", "sh", "/bin/bash", "/bin/sh", "/usr/bin/bash"}


def offer_row(id_: int, gpu_name: str, num_gpus: int = 1, gpu_ram: int = 24564, dph_total: float = 0.40,
              min_bid: float = 0.30, reliability: float = 0.99, **more: Any) -> dict[str, Any]:
    """A search answer's offer in Vast's own field names (gpu_ram MB per GPU; prices per machine)."""
    return {
        "id": id_, "ask_contract_id": id_, "machine_id": id_ * 10, "gpu_name": gpu_name, "num_gpus": num_gpus,
        "gpu_ram": gpu_ram, "gpu_total_ram": gpu_ram * num_gpus, "dph_total": dph_total, "min_bid": min_bid,
        "reliability": reliability, "inet_down": 1000.0, "inet_up": 800.0, "geolocation": "Texas, US",
        "hosting_type": 1, "verified": True, "rentable": True, "rented": False, "score": 100.0, **more,
    }


@dataclass
class Recorded:
    method: str
    path: str  # without the query string
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class _Fault:
    method: str
    prefix: str
    status: int
    times: int
    body: Any
    headers: dict[str, str]


@dataclass
class VastStub:
    offers: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"on-demand": [], "bid": []})
    api_key: str | None = None
    runner: Runner | None = None
    stopper: Stopper | None = None
    wrong_gpu: str | None = None
    ignore_bid: bool = False
    rent_overrides: dict[str, Any] = field(default_factory=dict)
    status_on_rent: str = "running"
    gone_as_null: bool = False
    ignore_list_filters: bool = False  # a list endpoint that ignores select_filters: the client must check
    rent_answer_delay_s: float = 0.0

    def __post_init__(self) -> None:
        self.requests: list[Recorded] = []
        self.instances: dict[int, dict[str, Any]] = {}
        self.destroyed: list[int] = []
        self.exit_codes: dict[int, int | None] = {}
        self.rented_asks: set[int] = set()
        self._faults: list[_Fault] = []
        self._alive: set[int] = set()  # instances whose runner process has not exited
        self._next_id = 7001
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ---- life ----
    def start(self) -> VastStub:
        stub = self

        class Handler(_Handler):
            pass

        Handler.stub = stub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> VastStub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- controls ----
    def fail(self, method: str, path_prefix: str, status: int, times: int = 1, body: Any = None,
             headers: dict[str, str] | None = None) -> None:
        """Answer the next ``times`` requests matching (method, path prefix) with this status/body."""
        with self._lock:
            self._faults.append(_Fault(method.upper(), path_prefix, status, times, body, headers or {}))

    def set_status(self, instance_id: int, status: str | None) -> None:
        with self._lock:
            self.instances[instance_id]["actual_status"] = status

    def outbid(self, instance_id: int) -> None:
        """Pause the instance as Vast does when an interruptible rental is outbid."""
        with self._lock:
            row = self.instances[instance_id]
            row["actual_status"] = "stopped"
            row["status_msg"] = "outbid"
            alive = instance_id in self._alive
        if alive and self.stopper is not None:
            self.stopper(instance_id)

    def calls(self, method: str, path_prefix: str = "") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def env_of(self, instance_id: int) -> dict[str, str]:
        with self._lock:
            return dict(self.instances[instance_id]["extra_env"])

    # ---- the API ----
    def handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: Any) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests.append(Recorded(method, path, query, headers, body))
            if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
                return 401, {"success": False, "error": "invalid_api_key", "msg": "Invalid API key"}, {}
            for fault in self._faults:
                if fault.method == method and path.startswith(fault.prefix) and fault.times > 0:
                    fault.times -= 1
                    return fault.status, fault.body if fault.body is not None else {"success": False}, fault.headers
        return (*self._route(method, path, query, body), {})

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if method == "POST" and parts == ["api", "v0", "bundles"]:
            return self._search(body)
        if method == "PUT" and len(parts) == 4 and parts[:3] == ["api", "v0", "asks"] and parts[3].isdigit():
            return self._rent(int(parts[3]), body if isinstance(body, dict) else {})
        if parts[:3] == ["api", "v0", "instances"] and len(parts) == 4 and parts[3].isdigit():
            iid = int(parts[3])
            if method == "GET":
                return self._show(iid)
            if method == "DELETE":
                return self._destroy(iid)
        if method == "GET" and parts == ["api", "v0", "instances"]:
            with self._lock:
                return 200, {"instances": [dict(r) for r in self.instances.values()]}
        if method == "GET" and parts == ["api", "v1", "instances"]:
            return self._list(query)
        return 404, {"success": False, "error": "not_found", "msg": f"{method} {path}"}

    def _search(self, body: Any) -> tuple[int, Any]:
        kind = str((body or {}).get("type")) if isinstance(body, dict) else ""
        with self._lock:
            offers = [o for o in self.offers.get(kind, []) if o.get("id") not in self.rented_asks]
        return 200, {"offers": offers}

    def _ask(self, ask_id: int) -> dict[str, Any] | None:
        for offers in self.offers.values():
            for o in offers:
                if o.get("id") == ask_id:
                    return o
        return None

    def _rent(self, ask_id: int, body: dict[str, Any]) -> tuple[int, Any]:
        with self._lock:
            ask = self._ask(ask_id)
            if ask is None or ask_id in self.rented_asks:
                return 404, {"success": False, "error": "no_such_ask",
                             "msg": f"Instance type by id {ask_id} is not available."}
            self.rented_asks.add(ask_id)
            iid = self._next_id
            self._next_id += 1
            price = body.get("price")
            bid = isinstance(price, int | float) and not self.ignore_bid
            env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
            args = body.get("args")
            row: dict[str, Any] = {
                "id": iid, "machine_id": ask.get("machine_id"), "ask_contract_id": ask_id,
                "label": body.get("label"), "actual_status": self.status_on_rent, "intended_status": "running",
                "cur_state": "running", "next_state": "running", "status_msg": "",
                "gpu_name": self.wrong_gpu or ask.get("gpu_name"), "gpu_ram": ask.get("gpu_ram"),
                "num_gpus": ask.get("num_gpus"), "is_bid": bid, "bid_price": price if bid else None,
                "dph_total": price if bid else ask.get("dph_total"), "min_bid": ask.get("min_bid"),
                "image_uuid": body.get("image"), "image_runtype": body.get("runtype"), "image_args": args,
                "onstart": body.get("onstart"), "extra_env": [[k, v] for k, v in env.items()],
                "disk_space": body.get("disk"), "start_date": time.time(),
                "ssh_host": "127.0.0.1", "ssh_port": 0,
            }
            row.update(self.rent_overrides)
            self.instances[iid] = row
        if self.runner is not None:
            self._start_runner(iid, env, _script(body.get("onstart"), args))
        if self.rent_answer_delay_s:
            time.sleep(self.rent_answer_delay_s)
        return 200, {"success": True, "new_contract": iid}

    def _start_runner(self, iid: int, env: dict[str, str], script: str) -> None:
        assert self.runner is not None
        try:
            proc = self.runner(iid, env, script)
        except Exception as exc:  # the machine failed to start: the container exited
            with self._lock:
                self.instances[iid].update(actual_status="exited", status_msg=f"runner failed: {exc}")
            return
        if not callable(getattr(proc, "wait", None)):
            return
        with self._lock:
            self._alive.add(iid)

        def watch() -> None:
            code = proc.wait()
            with self._lock:
                self._alive.discard(iid)
                self.exit_codes[iid] = code
                row = self.instances.get(iid)
                if row is not None and row.get("actual_status") in ("running", "loading"):
                    row["actual_status"] = "exited"

        threading.Thread(target=watch, daemon=True).start()

    def _show(self, iid: int) -> tuple[int, Any]:
        with self._lock:
            row = self.instances.get(iid)
            if row is None:
                return (200, {"instances": None}) if self.gone_as_null else (
                    404, {"success": False, "error": "no_such_instance"})
            return 200, {"instances": dict(row)}

    def _destroy(self, iid: int) -> tuple[int, Any]:
        with self._lock:
            if self.instances.pop(iid, None) is None:
                return 404, {"success": False, "error": "no_such_instance"}
            self.destroyed.append(iid)
            alive = iid in self._alive
        if alive and self.stopper is not None:
            self.stopper(iid)
        return 200, {"success": True}

    def _list(self, query: dict[str, str]) -> tuple[int, Any]:
        try:
            filters = json.loads(query.get("select_filters") or "{}")
            limit = max(1, min(int(query.get("limit") or 25), 25))
            after = int(query["after_token"]) if query.get("after_token") else None
        except (ValueError, TypeError):
            return 400, {"success": False, "error": "invalid_args"}
        with self._lock:
            rows = sorted((dict(r) for r in self.instances.values()), key=lambda r: r["id"])
        for col, cond in ({} if self.ignore_list_filters else filters or {}).items():
            if isinstance(cond, dict) and "in" in cond:
                rows = [r for r in rows if r.get(col) in cond["in"]]
            elif isinstance(cond, dict) and "eq" in cond:
                rows = [r for r in rows if r.get(col) == cond["eq"]]
        if after is not None:
            rows = [r for r in rows if r["id"] > after]
        page, more = rows[:limit], len(rows) > limit
        return 200, {"instances": page, "next_token": str(page[-1]["id"]) if more else None,
                     "total_instances": len(rows)}


def _script(onstart: Any, args: Any) -> str:
    """The shell script a container would run: ``bash -c SCRIPT`` in args mode, else onstart."""
    if isinstance(args, list) and args:
        if onstart in _SHELLS and len(args) >= 2 and args[0] == "-c":
            return str(args[1])
        return shlex.join([str(onstart or ""), *map(str, args)]).strip()
    return str(onstart or "")


class _Handler(BaseHTTPRequestHandler):
    stub: VastStub

    def log_message(self, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        status, answer, headers = self.stub.handle(self.command, parts.path, query, dict(self.headers), body)
        data = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up waiting
            pass

    do_GET = do_PUT = do_POST = do_DELETE = _serve
