"""Who is looking at a dashboard page: a session cookie opened with an API token.

Why a session and not the token in the browser: the token is a long-lived credential that belongs
in the CLI's 0600 file, not in a page's JavaScript or local storage. The login form takes it once,
over POST, and the store opens a session (``Store.open_session``) that keeps only the cookie's
sha256 and ends when its token is revoked or expires.

The cookie is ``HttpOnly`` (scripts cannot read it), ``SameSite=Strict`` (another site's pages
cannot send it), and ``Secure`` when the server is reached over HTTPS (``--ssl-certfile``, or a
proxy that says so in ``X-Forwarded-Proto``). Every form that changes something also carries the
session's CSRF token, and htmx requests carry it in the ``X-CSRF-Token`` header; a POST without the
right one is refused (403). The cookie's scope is ``/``, so the API (Bearer tokens only) never
takes it: a cookie cannot authorize an API call.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import HTTPException, Request

from orchestrator.api.auth import Caller

COOKIE = "tf_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Viewer:
    """The caller of one page, and the CSRF token its forms must carry."""

    caller: Caller
    csrf: str

    @property
    def name(self) -> str:
        return self.caller.user.name


class LoginRequired(Exception):
    """No live session: the page answers with a redirect to /login (``pages`` installs the handler)."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def viewer(request: Request) -> Viewer:
    """FastAPI dependency: the page's viewer, or LoginRequired."""
    found = request.app.state.store.session_user(request.cookies.get(COOKIE))
    if found is None:
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    user, csrf = found
    return Viewer(Caller(user), csrf)


def login_url(next_url: str) -> str:
    return "/login?next=" + quote(next_url, safe="")


def safe_next(next_url: str | None) -> str:
    """Where to go after logging in: a path on this server only (never another site)."""
    if not next_url or not next_url.startswith("/") or next_url.startswith("//") or "\\" in next_url:
        return "/"
    return next_url


def is_https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def check_csrf(request: Request, who: Viewer, sent: str | None) -> None:
    """403 unless ``sent`` (the form field) or the X-CSRF-Token header is this session's token."""
    token = sent or request.headers.get(CSRF_HEADER) or ""
    if not hmac.compare_digest(token.encode(), who.csrf.encode()):
        raise HTTPException(403, "this form is stale or came from another site: reload the page and try again")
