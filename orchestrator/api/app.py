"""The FastAPI application: limits, error shapes, metrics, and the routes under ``/api/v1``.

- ``/healthz`` (no token): the store answers and its schema version; ``/metrics`` (no token,
  Prometheus text format): queue depth by state, live attempts by provider, spend, preemptions,
  placement latency (submit to first attempt), each provider's health and consecutive failed calls
  (as the daemon records them), HTTP requests and their latency by route. Neither holds a secret
  or a job's content.
- ``/openapi.json`` is the contract; ``/docs`` renders it.
- Bodies over ``max_body_bytes`` are refused with 413 before they are read whole.
- Errors are JSON ``{"detail": ...}``: 401 unauthenticated, 404 unknown (or not yours to see), 409
  refused in the job's state, 413 too large, 422 bad input (a job file's problems listed with key
  path, line and message, as ``tunefleet validate`` prints them), 429 rate limited. An unexpected
  error is a 500 with an id to look up in the server log, never a traceback in the body.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse

from infra.config import Config
from orchestrator.api.auth import Access, RateLimiter

API_VERSION = "v1"
API_PREFIX = f"/api/{API_VERSION}"
MAX_BODY_BYTES = 64 << 20

log = logging.getLogger("tunefleet.server")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by Content-Length or, for a chunked
    body, counted as it arrives, before any route sees it (the body is read here and handed on)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit, send)
        if declared is not None:  # the server (h11) stops a body at its declared length
            return await self.app(scope, receive, send)
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                return await _too_large(self.limit, send)
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _too_large_message(limit: int) -> str:
    return f"request body over {limit >> 20} MiB (the server's --max-body-mb)"


async def _too_large(limit: int, send) -> None:
    body = JSONResponse({"detail": _too_large_message(limit)}, status_code=413)
    await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})


class Metrics:
    """Request counts and latency by route template and status (in memory, per process)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.seconds: dict[str, tuple[int, float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        n, total = self.seconds.get(route, (0, 0.0))
        self.seconds[route] = (n + 1, total + seconds)


def create_app(config: Config, store, *, max_body_bytes: int = MAX_BODY_BYTES, rate: float = 20.0,
               burst: int = 40) -> FastAPI:
    """The API over ``store`` (an open :class:`orchestrator.store.Store`, shared by all requests)."""
    from orchestrator.api import artifacts, fleet, jobs

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield

    app = FastAPI(title="tunefleet", version=API_VERSION, lifespan=lifespan,
                  description="Fine-tuning jobs on the cheapest capacity that can do them: the CLI's "
                              "commands over HTTP. Authenticate with `Authorization: Bearer <token>`.")
    app.state.config = config
    app.state.store = store
    app.state.access = Access(store)
    app.state.limiter = RateLimiter(rate, burst)
    app.state.metrics = Metrics()
    app.state.started = time.time()
    app.include_router(jobs.router, prefix=API_PREFIX)
    app.include_router(fleet.router, prefix=API_PREFIX)
    app.include_router(artifacts.router, prefix=API_PREFIX)
    _add_dashboard(app)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", None)
        if route is not None and request.url.path.startswith(API_PREFIX):  # a router's route omits its prefix
            route = API_PREFIX + route
        app.state.metrics.observe(request.method, route or "(unmatched)", response.status_code,
                                  time.perf_counter() - t0)
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": [_field_error(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("unexpected error %s on %s %s: %s", ref, request.method, request.url.path, type(exc).__name__,
                  exc_info=exc)
        return JSONResponse({"detail": f"internal error {ref}; the server log has the details"}, status_code=500)

    @app.get("/healthz", tags=["server"])
    def healthz() -> dict[str, Any]:
        """The store answers: its schema version, database, how many jobs it holds, and which daemon
        last took the lock (host:pid; with replicas, the one running the queue)."""
        counts = store.count_jobs_by_state()
        leader = store.daemon_leader()
        return {"ok": True, "version": API_VERSION, "schema": store.schema_version(), "database": store.backend,
                "jobs": sum(counts.values()), "uptime_s": round(time.time() - app.state.started, 1),
                "daemon_leader": None if leader is None else {"holder": leader["holder"], "since": leader["since"]}}

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text format."""
        return render_metrics(store, app.state.metrics)

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


def _add_dashboard(app: FastAPI) -> None:
    """The web dashboard (``orchestrator.web``) at ``/``: its pages, its static files, and for page
    requests a login redirect or an HTML error page instead of the API's JSON."""
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from orchestrator.web import pages
    from orchestrator.web.session import LoginRequired, login_url

    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.HERE / "static"), name="static")

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired):
        if request.headers.get("hx-request"):  # a poll from a page whose session ended: reload into the login
            return PlainTextResponse("", status_code=401, headers={"HX-Redirect": login_url(exc.next_url)})
        return RedirectResponse(login_url(exc.next_url), status_code=303)

    from fastapi.exception_handlers import http_exception_handler

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if path.startswith(API_PREFIX) or path in ("/healthz", "/metrics", "/openapi.json") \
                or "text/html" not in request.headers.get("accept", ""):
            return await http_exception_handler(request, exc)
        return pages.render(request, "error.html", status=exc.status_code, code=exc.status_code,
                            message=str(exc.detail))


def _field_error(e: dict[str, Any]) -> dict[str, Any]:
    """A request-validation error without the input it was given (which may hold a secret)."""
    return {"loc": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
            "line": None, "message": str(e.get("msg", "invalid"))}


def render_metrics(store, http: Metrics) -> str:
    from orchestrator.states import JobState

    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            tag = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{tag}}} {value:g}" if tag else f"{name} {value:g}")

    counts = store.count_jobs_by_state()
    metric("tunefleet_jobs", "gauge", "Jobs by state.", [({"state": s.value}, counts.get(s, 0)) for s in JobState])
    live: dict[str, int] = {}
    for a in store.live_attempts():
        live[a.provider] = live.get(a.provider, 0) + 1
    metric("tunefleet_live_attempts", "gauge", "Attempts launched and not ended, by provider.",
           [({"provider": p}, n) for p, n in sorted(live.items())])
    metric("tunefleet_spend_usd_total", "counter", "Dollars recorded in the spend ledger.",
           [({}, store.spend_since(0.0))])
    metric("tunefleet_preemptions_total", "counter", "Attempts that ended interrupted (reclaimed or preempted).",
           [({}, store.count_preemptions())])
    waits = sorted(store.placement_seconds())
    metric("tunefleet_placement_seconds", "summary",
           "Seconds from submit to the first attempt, over the last 1,000 jobs placed.",
           [({"quantile": q}, _quantile(waits, float(q))) for q in ("0.5", "0.9", "0.99")] if waits else [])
    lines.append(f"tunefleet_placement_seconds_sum {sum(waits):g}")
    lines.append(f"tunefleet_placement_seconds_count {len(waits)}")
    health = store.provider_health()
    metric("tunefleet_provider_up", "gauge", "1 while the daemon finds a provider usable, 0 in backoff or disabled.",
           [({"provider": p}, 1 if h.get("state") == "ok" else 0) for p, h in sorted(health.items())])
    metric("tunefleet_provider_failures", "gauge", "A provider's consecutive failed calls, as the daemon counts them.",
           [({"provider": p}, int(h.get("failures") or 0)) for p, h in sorted(health.items())])
    metric("tunefleet_http_requests_total", "counter", "HTTP requests by method, route and status.",
           [({"method": m, "route": r, "status": str(s)}, n) for (m, r, s), n in sorted(http.requests.items())])
    metric("tunefleet_http_request_seconds_sum", "counter", "Seconds spent answering, by route.",
           [({"route": r}, t) for r, (_, t) in sorted(http.seconds.items())])
    metric("tunefleet_http_request_seconds_count", "counter", "Requests answered, by route.",
           [({"route": r}, n) for r, (n, _) in sorted(http.seconds.items())])
    return "\n".join(lines) + "\n"


def _quantile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of a sorted, non-empty list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
