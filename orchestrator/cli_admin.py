"""``tunefleet admin``: teams, users and API tokens for a team server (``orchestrator.store.accounts``).

Whoever can run these commands can open the state database, so they are the server's
administrator: nothing here asks for a token. Every listing takes ``--json``. A refused command
(bad name, role, budget or duration; a name taken; an unknown team, user or token) exits 2 with
one line saying why, and changes nothing.

``admin user|team set-budget NAME --monthly-usd N`` (or ``--clear``) changes a monthly budget
at once: the daemon reads it at every placement and budget check, so jobs waiting for it are placed
again within seconds once it fits, and running ones are stopped (saved first) before it is crossed.

A token's plaintext is printed once, by ``admin token create``, alone on stdout (so
``TOKEN=$(tunefleet admin token create alice)`` works); the notice that it will not be shown again
goes to stderr. The store keeps only its sha256.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.table import Table

from orchestrator.cli_base import (
    CliError,
    JsonOpt,
    _config,
    _emit_json,
    _escape,
    _store,
    app,
    console,
    err,
)

admin_app = typer.Typer(help="Teams, users and API tokens (for a team server).", no_args_is_help=True)
team_app = typer.Typer(help="Teams: a monthly budget shared by their users.", no_args_is_help=True)
user_app = typer.Typer(help="Users: a team, a role (admin or member), an optional monthly budget.",
                       no_args_is_help=True)
token_app = typer.Typer(help="API tokens: shown once, stored hashed, revocable.", no_args_is_help=True)
admin_app.add_typer(team_app, name="team")
admin_app.add_typer(user_app, name="user")
admin_app.add_typer(token_app, name="token")
app.add_typer(admin_app, name="admin")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(?:\d{1,6}[smhdw])+")
MAX_EXPIRY_S = 10 * 366 * 86400

BudgetOpt = Annotated[float | None, typer.Option("--monthly-usd", help="Monthly budget in dollars (default: none).")]
NewBudgetOpt = Annotated[float | None, typer.Option("--monthly-usd", help="The new monthly budget in dollars.")]
ClearOpt = Annotated[bool, typer.Option("--clear", help="Remove the monthly budget (no cap of its own).")]


@contextlib.contextmanager
def _refused(changes: bool = True) -> Iterator[None]:
    """The store's refusals as exit 2 and one line (they wrote nothing)."""
    from orchestrator.store import (
        AccountExists,
        InvalidAccount,
        TeamNotFound,
        TokenNotFound,
        UserNotFound,
    )

    try:
        yield
    except (InvalidAccount, AccountExists, TeamNotFound, UserNotFound, TokenNotFound) as exc:
        raise CliError(f"{exc}; nothing was changed" if changes else str(exc), 2) from None


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``1w``, ``1d12h`` -> seconds (s, m, h, d, w). CliError (exit 2)
    for anything else, zero, or more than ten years."""
    spec = text.strip().lower()
    if not _DURATION_RE.fullmatch(spec):
        raise CliError(f"--expires-in {text!r} is not a duration: use e.g. 30d, 12h, 90m, 1w or 1d12h "
                       "(s, m, h, d, w); nothing was changed", 2)
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", spec))
    if not 0 < seconds <= MAX_EXPIRY_S:
        raise CliError(f"--expires-in {text!r} must be more than 0 and at most 10 years; nothing was changed", 2)
    return float(seconds)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _money(amount: float | None) -> str:
    from orchestrator.budget import usd

    return "-" if amount is None else usd(amount)


def _table(headers: tuple[str, ...], rows: list[list[str]]) -> Table:
    """Every column at its full width (an id or a date cut short is useless), except a last NOTE,
    which is shortened on a narrow terminal; print it with ``crop=False``."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for i, h in enumerate(headers):
        width = max([len(h)] + [len(r[i]) for r in rows])
        table.add_column(h, no_wrap=True, overflow="ellipsis", min_width=None if h == "NOTE" else width)
    for r in rows:
        table.add_row(*(_escape(c) for c in r))
    return table


def user_dict(u) -> dict[str, Any]:
    return {"name": u.name, "team": u.team, "role": u.role, "monthly_usd": u.monthly_usd,
            "created_at": u.created_at, "disabled": u.disabled}


def token_state(t, now: float) -> str:
    if t.revoked_at is not None:
        return "revoked"
    if t.expires_at is not None and t.expires_at <= now:
        return "expired"
    return "active"


def token_dict(t, now: float) -> dict[str, Any]:
    return {"id": t.id, "user": t.user, "prefix": t.prefix, "created_at": t.created_at, "expires_at": t.expires_at,
            "last_used_at": t.last_used_at, "revoked_at": t.revoked_at, "note": t.note,
            "state": token_state(t, now)}


# ---------------------------------------------------------------- teams
@team_app.command("create")
def team_create(name: str, monthly_usd: BudgetOpt = None, json_out: JsonOpt = False) -> None:
    """Create a team."""
    with _store(_config()) as store, _refused():
        store.create_team(name, monthly_usd)
    if json_out:
        _emit_json({"name": name, "monthly_usd": monthly_usd})
    else:
        console.print(f"team {_escape(name)} created" + (f" (monthly budget {_money(monthly_usd)})"
                                                          if monthly_usd is not None else ""), highlight=False)


@team_app.command("list")
def team_list(json_out: JsonOpt = False) -> None:
    """Every team, with its number of users and its monthly budget."""
    with _store(_config()) as store:
        teams = store.list_teams()
    if json_out:
        _emit_json(teams)
    elif not teams:
        console.print("no teams yet: tunefleet admin team create NAME")
    else:
        rows = [[t["name"], str(t["users"]), _money(t["monthly_usd"]), _when(t["created_at"])] for t in teams]
        console.print(_table(("NAME", "USERS", "MONTHLY", "CREATED"), rows), crop=False)


def _new_budget(monthly_usd: float | None, clear: bool) -> float | None:
    """--monthly-usd N or --clear, exactly one (CliError, exit 2, otherwise)."""
    if (monthly_usd is None) == (not clear):
        raise CliError("give the new budget as --monthly-usd N, or --clear to remove it; nothing was changed", 2)
    return monthly_usd


def _budget_note(monthly_usd: float | None) -> str:
    if monthly_usd is None:
        return "no monthly budget of its own now"
    return (f"monthly budget {_money(monthly_usd)} (this calendar month, UTC; queued jobs waiting for it "
            "are placed again within seconds if it now fits)")


@team_app.command("set-budget")
def team_set_budget(name: str, monthly_usd: NewBudgetOpt = None, clear: ClearOpt = False,
                    json_out: JsonOpt = False) -> None:
    """Set (or --clear) a team's monthly budget, shared by its users' jobs."""
    budget = _new_budget(monthly_usd, clear)
    with _store(_config()) as store, _refused():
        store.set_team_budget(name, budget)
        team = next(t for t in store.list_teams() if t["name"] == name)
    if json_out:
        _emit_json(team)
    else:
        console.print(f"team {_escape(name)}: {_budget_note(team['monthly_usd'])}", highlight=False)


# ---------------------------------------------------------------- users
@user_app.command("create")
def user_create(
    name: str,
    team: Annotated[str, typer.Option("--team", help="The user's team (it must exist).")],
    role: Annotated[str, typer.Option("--role", help="admin (sees and acts on everything) or member.")] = "member",
    monthly_usd: BudgetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a user in a team."""
    with _store(_config()) as store, _refused():
        user = store.create_user(name, team, role=role, monthly_usd=monthly_usd)
    if json_out:
        _emit_json(user_dict(user))
    else:
        console.print(f"user {_escape(user.name)} created in team {_escape(user.team)} as {user.role}; "
                      f"give them a token: tunefleet admin token create {_escape(user.name)}", highlight=False)


@user_app.command("list")
def user_list(
    team: Annotated[str | None, typer.Option("--team", help="Only this team's users.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Users (disabled ones too), by name."""
    with _store(_config()) as store, _refused(changes=False):
        users = store.list_users(team)
    if json_out:
        _emit_json([user_dict(u) for u in users])
    elif not users:
        console.print("no users yet: tunefleet admin user create NAME --team TEAM")
    else:
        rows = [[u.name, u.team, u.role, _money(u.monthly_usd), "disabled" if u.disabled else "active",
                 _when(u.created_at)] for u in users]
        console.print(_table(("NAME", "TEAM", "ROLE", "MONTHLY", "STATE", "CREATED"), rows), crop=False)


@user_app.command("disable")
def user_disable(name: str, json_out: JsonOpt = False) -> None:
    """Disable a user: their tokens stop working at once."""
    with _store(_config()) as store, _refused():
        user = store.disable_user(name)
    if json_out:
        _emit_json(user_dict(user))
    else:
        console.print(f"user {_escape(user.name)} disabled; their tokens no longer work", highlight=False)


@user_app.command("set-budget")
def user_set_budget(name: str, monthly_usd: NewBudgetOpt = None, clear: ClearOpt = False,
                    json_out: JsonOpt = False) -> None:
    """Set (or --clear) a user's own monthly budget (their team's still applies too)."""
    budget = _new_budget(monthly_usd, clear)
    with _store(_config()) as store, _refused():
        user = store.set_user_budget(name, budget)
    if json_out:
        _emit_json(user_dict(user))
    else:
        console.print(f"user {_escape(user.name)}: {_budget_note(user.monthly_usd)}", highlight=False)


# ---------------------------------------------------------------- tokens
@token_app.command("create")
def token_create(
    user: str,
    expires_in: Annotated[str | None, typer.Option("--expires-in", help="e.g. 30d, 12h, 1w (default: never).")] = None,
    note: Annotated[str, typer.Option("--note", help="What the token is for (shown in listings).")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Create an API token for a user. It is printed once and never again: only its hash is kept."""
    expires_at = None if expires_in is None else time.time() + parse_duration(expires_in)
    with _store(_config()) as store, _refused():
        row, plaintext = store.create_token(user, expires_at=expires_at, note=note)
    if json_out:
        _emit_json({"id": row.id, "token": plaintext, "user": row.user, "expires_at": row.expires_at})
    else:
        sys.stdout.write(plaintext + "\n")
        sys.stdout.flush()
    until = f"expires {_when(row.expires_at)}" if row.expires_at is not None else "does not expire"
    err.print(f"token {row.id} for {_escape(row.user)} ({until}). Store it now: it will not be shown again.",
              highlight=False)


@token_app.command("list")
def token_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's tokens.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """API tokens (never their secrets), oldest first, revoked and expired ones too."""
    with _store(_config()) as store, _refused(changes=False):
        tokens = store.list_tokens(user)
    now = time.time()
    if json_out:
        _emit_json([token_dict(t, now) for t in tokens])
    elif not tokens:
        console.print("no tokens yet: tunefleet admin token create USER")
    else:
        rows = [[t.id, t.user, t.prefix + "…", _when(t.created_at), _when(t.expires_at), _when(t.last_used_at),
                 _when(t.revoked_at), token_state(t, now), t.note] for t in tokens]
        headers = ("ID", "USER", "PREFIX", "CREATED", "EXPIRES", "LAST USED", "REVOKED", "STATE", "NOTE")
        console.print(_table(headers, rows), crop=False)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="ID")], json_out: JsonOpt = False) -> None:
    """Revoke a token: it stops working at once. Revoking it again changes nothing."""
    with _store(_config()) as store, _refused():
        row = store.revoke_token(token_id.strip())
    if json_out:
        _emit_json(token_dict(row, time.time()))
    else:
        console.print(f"token {row.id} of {_escape(row.user)} revoked at {_when(row.revoked_at)}", highlight=False)
