"""Accounts in the store: teams, users with a role, and the API tokens they authenticate with.

Why it is shaped this way:

* **A token is shown once and stored as its sha256 only.** ``create_token`` returns the plaintext
  (``tf_`` + 43 URL-safe characters: 256 random bits) to its caller and keeps nothing that could
  give it back: the hex digest (a unique index, so ``authenticate`` is one indexed lookup) and the
  first few characters, so a person can tell their tokens apart in a listing. A token is random,
  not a password, so a plain fast hash is enough: nobody can guess 256 bits, whatever the speed.
  Neither the plaintext nor the hash is in any row, event, log line, repr or exception message.
* **authenticate never raises for what a client sends.** Anything that is not a well-formed token
  (None, bytes, empty, huge, wrong alphabet) is just "no user"; so are a revoked token, an expired
  one (by the store's clock) and a disabled user's. A revoke or a disable is one committed write,
  and every later ``authenticate`` reads it: it takes effect at once.
* **last_used_at is written at most once a minute per token**, so a client polling every second
  does not turn every read into a write.
* **Names are checked like job names**, and a new team or user may not differ from an existing one
  only by case (``Alice`` vs ``alice`` would be two owners nobody can tell apart).
* **Nothing here writes an event**: events belong to jobs. Ownership is recorded on the rows
  themselves (``jobs.owner``, copied to ``attempts.owner`` and ``spend.owner`` when those rows are
  made), so a member's view and a team's monthly spend are single indexed queries.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import sqlite3
import uuid
from typing import Any

from orchestrator.store.base import StoreBase
from orchestrator.store.rows import (
    AccountExists,
    InvalidAccount,
    TeamNotFound,
    TokenNotFound,
    TokenRow,
    UserNotFound,
    UserRow,
    token_row,
    user_row,
)

ROLES = ("admin", "member")
TOKEN_PREFIX = "tf_"
PREFIX_CHARS = 10  # shown in listings: "tf_" and 7 characters of the secret (42 of its 256 bits)
MAX_NOTE_CHARS = 200
LAST_USED_EVERY_S = 60.0  # last_used_at is written at most this often per token
SESSION_TTL_S = 12 * 3600.0  # a dashboard login lasts a working day (and never past its token)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What authenticate accepts before hashing anything: ours are "tf_" + 43 characters.
_TOKEN_RE = re.compile(r"tf_[A-Za-z0-9_-]{20,128}")
_MAX_TOKEN_CHARS = 3 + 128


def check_name(name: Any, what: str) -> str:
    """A team or user name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit
    (so no name is "." or ".." in an API path). InvalidAccount otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = repr(name) if isinstance(name, str) and len(name) <= 80 else f"a {type(name).__name__}"
        raise InvalidAccount(
            f"{what} name {shown} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_budget(monthly_usd: Any, what: str) -> float | None:
    """None (no cap of its own) or a finite amount >= 0. InvalidAccount otherwise."""
    if monthly_usd is None:
        return None
    if isinstance(monthly_usd, bool) or not isinstance(monthly_usd, (int, float)):
        raise InvalidAccount(f"{what} monthly budget must be a number of dollars, not {type(monthly_usd).__name__}")
    value = float(monthly_usd)
    if not math.isfinite(value) or value < 0:
        raise InvalidAccount(f"{what} monthly budget must be a finite amount >= 0, not {monthly_usd!r}")
    return value


def token_hash(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("ascii")).hexdigest()


class AccountsMixin(StoreBase):
    # -- teams --------------------------------------------------------------------------------

    def create_team(self, name: str, monthly_usd: float | None = None) -> None:
        """A new team; AccountExists if the name is taken (in any case), InvalidAccount if bad."""
        check_name(name, "team")
        budget = check_budget(monthly_usd, f"team {name!r}")
        now = self._now()
        with self._write() as c:
            taken = c.execute("SELECT name FROM teams WHERE lower(name) = lower(?)", (name,)).fetchone()
            if taken is not None:
                raise AccountExists(f"team {taken[0]!r} already exists")
            c.execute("INSERT INTO teams (name, monthly_usd, created_at) VALUES (?, ?, ?)", (name, budget, now))

    def list_teams(self) -> list[dict[str, Any]]:
        """Every team by name: {name, monthly_usd, created_at, users} (users: how many, disabled too)."""
        with self._read() as c:
            rows = c.execute(
                "SELECT t.name, t.monthly_usd, t.created_at, COUNT(u.name) FROM teams t"
                " LEFT JOIN users u ON u.team = t.name GROUP BY t.name ORDER BY t.name"
            ).fetchall()
        return [{"name": r[0], "monthly_usd": r[1], "created_at": r[2], "users": r[3]} for r in rows]

    def set_team_budget(self, name: str, monthly_usd: float | None) -> None:
        """Set (or, with None, clear) a team's monthly cap. TeamNotFound if there is no such team."""
        budget = check_budget(monthly_usd, f"team {name!r}")
        with self._write() as c:
            if c.execute("UPDATE teams SET monthly_usd = ? WHERE name = ?", (budget, name)).rowcount == 0:
                raise TeamNotFound(f"no team {name!r}")

    def team_budget(self, name: str) -> float | None:
        """A team's monthly cap (None: no cap, or no such team)."""
        with self._read() as c:
            r = c.execute("SELECT monthly_usd FROM teams WHERE name = ?", (name,)).fetchone()
        return None if r is None or r[0] is None else float(r[0])

    # -- users --------------------------------------------------------------------------------

    def create_user(
        self, name: str, team: str, role: str = "member", monthly_usd: float | None = None
    ) -> UserRow:
        """A new user in an existing team. InvalidAccount (bad name, role or budget), TeamNotFound,
        AccountExists (the name is taken, in any case); nothing is written then."""
        check_name(name, "user")
        if role not in ROLES:
            raise InvalidAccount(f"role {role!r} is invalid: use one of {', '.join(ROLES)}")
        budget = check_budget(monthly_usd, f"user {name!r}")
        if not isinstance(team, str):
            raise TeamNotFound(f"no team {team!r}")
        now = self._now()
        with self._write() as c:
            if c.execute("SELECT 1 FROM teams WHERE name = ?", (team,)).fetchone() is None:
                raise TeamNotFound(f"no team {team!r}" + self._hint(c, "teams", team))
            taken = c.execute("SELECT name FROM users WHERE lower(name) = lower(?)", (name,)).fetchone()
            if taken is not None:
                raise AccountExists(f"user {taken[0]!r} already exists")
            c.execute(
                "INSERT INTO users (name, team, role, monthly_usd, created_at) VALUES (?, ?, ?, ?, ?)",
                (name, team, role, budget, now),
            )
            return self._fetch_user(c, name)

    def get_user(self, name: str) -> UserRow:
        """The user with exactly this name; UserNotFound if none."""
        with self._read() as c:
            return self._fetch_user(c, name)

    def list_users(self, team: str | None = None) -> list[UserRow]:
        """Users by name, disabled ones too; only one team's with ``team`` (TeamNotFound if unknown)."""
        with self._read() as c:
            if team is None:
                rows = c.execute("SELECT * FROM users ORDER BY name").fetchall()
            else:
                if c.execute("SELECT 1 FROM teams WHERE name = ?", (team,)).fetchone() is None:
                    raise TeamNotFound(f"no team {team!r}" + self._hint(c, "teams", team))
                rows = c.execute("SELECT * FROM users WHERE team = ? ORDER BY name", (team,)).fetchall()
        return [user_row(r) for r in rows]

    def disable_user(self, name: str) -> UserRow:
        """Disable a user: every token of theirs stops authenticating at once, and they can get no
        new one or submit a job. Idempotent (the first time is kept). UserNotFound if none."""
        now = self._now()
        with self._write() as c:
            self._fetch_user(c, name)
            c.execute("UPDATE users SET disabled_at = ? WHERE name = ? AND disabled_at IS NULL", (now, name))
            return self._fetch_user(c, name)

    def set_user_budget(self, name: str, monthly_usd: float | None) -> UserRow:
        """Set (or, with None, clear) a user's own monthly cap. UserNotFound if there is no such user."""
        budget = check_budget(monthly_usd, f"user {name!r}")
        with self._write() as c:
            if c.execute("UPDATE users SET monthly_usd = ? WHERE name = ?", (budget, name)).rowcount == 0:
                raise UserNotFound(f"no user {name!r}")
            return self._fetch_user(c, name)

    # -- tokens -------------------------------------------------------------------------------

    def create_token(
        self, user: str, *, expires_at: float | None = None, note: str = ""
    ) -> tuple[TokenRow, str]:
        """A new API token for an enabled user: its row and its plaintext, which is shown to
        nobody else and never again (only its sha256 is kept). UserNotFound; InvalidAccount for a
        disabled user, an expiry not in the future, or a note that is not short text."""
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise InvalidAccount(f"a token's note must be text of at most {MAX_NOTE_CHARS} characters")
        now = self._now()
        if expires_at is not None:
            if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) \
                    or not math.isfinite(expires_at):
                raise InvalidAccount(f"expires_at must be a time in seconds, not {expires_at!r}")
            if expires_at <= now:
                raise InvalidAccount("expires_at must be in the future")
            expires_at = float(expires_at)
        plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as c:
            account = self._fetch_user(c, user)
            if account.disabled:
                raise InvalidAccount(f"user {user!r} is disabled: a disabled user gets no new token")
            token_id = self._free_id(c, "tokens", lambda: "t" + uuid.uuid4().hex[:9], "token")
            c.execute(
                "INSERT INTO tokens (id, user_name, hash, prefix, created_at, expires_at, note)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, user, token_hash(plaintext), plaintext[:PREFIX_CHARS], now, expires_at, note),
            )
            return self._fetch_token(c, token_id), plaintext

    def authenticate(self, plaintext: Any) -> UserRow | None:
        """The enabled user a live token belongs to; None for anything else, never an exception
        for what a client sent (garbage, a revoked or expired token, a disabled user's)."""
        if not isinstance(plaintext, str) or len(plaintext) > _MAX_TOKEN_CHARS \
                or not _TOKEN_RE.fullmatch(plaintext):
            return None
        digest = token_hash(plaintext)
        now = self._now()
        with self._read() as c:
            found = self._live_token(c, digest, now)
        if found is None:
            return None
        token_id, last_used, user = found
        if last_used is not None and now - last_used < LAST_USED_EVERY_S:
            return user
        try:
            with self._write() as c:  # checked again under the write lock: a revoke may have landed
                found = self._live_token(c, digest, now)
                if found is None:
                    return None
                c.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, token_id))
                return found[2]
        except self._engine.busy_errors:  # the store stayed locked past its busy timeout: last_used_at is
            return user  # only a hint, and the token was live when read, so the request goes on

    @staticmethod
    def _live_token(c: sqlite3.Connection, digest: str, now: float) -> tuple[str, float | None, UserRow] | None:
        r = c.execute(
            "SELECT t.id, t.hash, t.expires_at, t.revoked_at, t.last_used_at, u.*"
            " FROM tokens t JOIN users u ON u.name = t.user_name WHERE t.hash = ?",
            (digest,),
        ).fetchone()
        if r is None or not hmac.compare_digest(r["hash"], digest):
            return None
        if r["revoked_at"] is not None or r["disabled_at"] is not None:
            return None
        if r["expires_at"] is not None and r["expires_at"] <= now:
            return None
        return r["id"], r["last_used_at"], user_row(r)

    # -- browser sessions (the dashboard) ------------------------------------------------------

    def open_session(self, plaintext: Any, *, ttl_s: float = SESSION_TTL_S) -> tuple[str, str, UserRow] | None:
        """A browser session opened with a live API token: (the cookie's value, the session's CSRF
        token, the user); None for anything but a live token. Only the cookie's sha256 is kept, and
        the session ends when its token is revoked or expires, whichever comes first."""
        if not isinstance(plaintext, str) or len(plaintext) > _MAX_TOKEN_CHARS \
                or not _TOKEN_RE.fullmatch(plaintext):
            return None
        now = self._now()
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        with self._write() as c:
            found = self._live_token(c, token_hash(plaintext), now)
            if found is None:
                return None
            token_id, _, user = found
            expires = now + float(ttl_s)
            token_expires = c.execute("SELECT expires_at FROM tokens WHERE id = ?", (token_id,)).fetchone()[0]
            if token_expires is not None:
                expires = min(expires, float(token_expires))
            c.execute("INSERT INTO sessions (hash, token_id, csrf, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                      (token_hash(cookie), token_id, csrf, now, expires))
            c.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, token_id))
        return cookie, csrf, user

    def session_user(self, cookie: Any) -> tuple[UserRow, str] | None:
        """The enabled user of a live session and its CSRF token; None for anything else (an ended
        or expired session, a revoked or expired token, a disabled user, garbage)."""
        if not isinstance(cookie, str) or not 16 <= len(cookie) <= 128:
            return None
        now = self._now()
        with self._read() as c:
            r = c.execute(
                "SELECT s.csrf, s.hash, u.* FROM sessions s JOIN tokens t ON t.id = s.token_id"
                " JOIN users u ON u.name = t.user_name"
                " WHERE s.hash = ? AND s.ended_at IS NULL AND s.expires_at > ? AND t.revoked_at IS NULL"
                " AND (t.expires_at IS NULL OR t.expires_at > ?) AND u.disabled_at IS NULL",
                (token_hash(cookie), now, now),
            ).fetchone()
        if r is None or not hmac.compare_digest(r["hash"], token_hash(cookie)):
            return None
        return user_row(r), r["csrf"]

    def end_session(self, cookie: Any) -> None:
        """Log a browser session out (nothing happens for an unknown one)."""
        if isinstance(cookie, str):
            with self._write() as c:
                c.execute("UPDATE sessions SET ended_at = ? WHERE hash = ? AND ended_at IS NULL",
                          (self._now(), token_hash(cookie)))

    def revoke_token(self, token_id: str) -> TokenRow:
        """Revoke a token: it stops authenticating at once. Idempotent (the first revoke's time is
        kept). TokenNotFound if there is no such id."""
        now = self._now()
        with self._write() as c:
            self._fetch_token(c, token_id)
            c.execute("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id))
            return self._fetch_token(c, token_id)

    def list_tokens(self, user: str | None = None) -> list[TokenRow]:
        """Tokens, oldest first, revoked and expired too; only one user's with ``user``
        (UserNotFound if unknown)."""
        with self._read() as c:
            if user is None:
                rows = c.execute("SELECT * FROM tokens ORDER BY created_at, id").fetchall()
            else:
                self._fetch_user(c, user)
                rows = c.execute(
                    "SELECT * FROM tokens WHERE user_name = ? ORDER BY created_at, id", (user,)
                ).fetchall()
        return [token_row(r) for r in rows]

    # -- spend by owner -----------------------------------------------------------------------

    def spend_by(self, owner: str | None = None, team: str | None = None, since: float | None = None) -> float:
        """Sum of the spend ledger: one user's rows with ``owner``, those of a team's users with
        ``team``, from ``since`` on (e.g. ``orchestrator.budget.month_start(now)``). No filter: all."""
        where, params = self._owned_by(owner, team)
        if since is not None:
            where.append("ts >= ?")
            params.append(float(since))
        sql = "SELECT COALESCE(SUM(usd), 0.0) FROM spend"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as c:
            return float(c.execute(sql, params).fetchone()[0])

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _fetch_user(c: sqlite3.Connection, name: str) -> UserRow:
        r = c.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        if r is None:
            raise UserNotFound(f"no user {name!r}" + AccountsMixin._hint(c, "users", name))
        return user_row(r)

    @staticmethod
    def _fetch_token(c: sqlite3.Connection, token_id: str) -> TokenRow:
        r = c.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if r is None:
            raise TokenNotFound(f"no token {token_id!r}")
        return token_row(r)

    @staticmethod
    def _hint(c: sqlite3.Connection, table: str, name: Any) -> str:
        """" (did you mean 'Alice'?)" when a name differs from an existing one only by case."""
        if not isinstance(name, str):
            return ""
        assert table in ("users", "teams")
        r = c.execute(f"SELECT name FROM {table} WHERE lower(name) = lower(?)", (name,)).fetchone()
        return f" (did you mean {r[0]!r}?)" if r is not None else ""
