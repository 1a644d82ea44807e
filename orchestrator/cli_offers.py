"""``tunefleet providers``, ``estimate`` and ``offers``: what capacity exists, what a job needs, and
what the daemon would do with it now (the same ``decide`` on the same inputs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from infra.config import Config

from orchestrator.budget import usd
from orchestrator.cli_base import JsonOpt, _config, _emit_json, _load, _store, app, console, err

@app.command()
def providers(json_out: JsonOpt = False) -> None:
    """Every provider: enabled or not, why, whether the daemon can launch there, its price source, and
    how the daemon last found it (backing off after errors, or disabled a while)."""
    from orchestrator.views_fleet import providers_view

    config = _config()
    with _existing_store(config) as store:
        rows, learned = providers_view(config, store)
    if json_out:
        _emit_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for col in ("PROVIDER", "ENABLED", "LAUNCH", "DAEMON SAYS", "WHY / PRICE SOURCE"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("WHY / PRICE SOURCE", "DAEMON SAYS"))
    for r in rows:
        d = r["daemon"]
        says = "-" if d is None else "ok" if d["state"] == "ok" else (
            f"[yellow]{d['state']}[/] until {time.strftime('%H:%M:%S', time.localtime(d['until']))}: {d['reason']}")
        table.add_row(r["provider"], "[green]yes[/]" if r["enabled"] else "[yellow]no[/]",
                      "yes" if r["launchable"] else "not yet", says, r["reason"])
    console.print(table)
    if learned:
        console.print("\n[bold]Interruption hazards: advertised vs learned from this store's attempts[/]")
        t = Table(box=None, header_style="bold")
        for col in ("PROVIDER", "GPU", "HOST", "ATTEMPTS", "HOURS", "INTERRUPTED", "ADVERTISED /H", "LEARNED /H"):
            t.add_column(col, justify="left" if col in ("PROVIDER", "GPU", "HOST") else "right")
        for x in learned:
            t.add_row(x["provider"], x["gpu"], x["host"] or "(all hosts)", str(x["attempts"]), f"{x['hours']:.1f}",
                      str(x["interruptions"]), f"{x['advertised_per_hour']:.4f}", f"{x['learned_per_hour']:.4f}")
        console.print(t)


@contextmanager
def _existing_store(config: Config) -> Iterator[Any]:
    """The store if this machine has one, else None (reading must not create one)."""
    if config.database_url is None and not config.db_path.is_file():
        yield None
        return
    with _store(config) as store:
        yield store


def _spec_and_estimate(job_file: Path):
    """The validated job and its estimate, calibrated by throughput measured on earlier runs."""
    from orchestrator.views_fleet import calibrated_estimate

    spec = _load(job_file)
    config = _config()
    with _existing_store(config) as store:
        return spec, calibrated_estimate(spec, store)


@app.command()
def estimate(job_file: Path, json_out: JsonOpt = False) -> None:
    """VRAM, tokens, and hours and cost on each GPU model, before anything is rented."""
    from orchestrator.views_fleet import estimate_view

    spec, est = _spec_and_estimate(job_file)
    view = estimate_view(spec, est)
    rows = view["gpus"]
    if json_out:
        _emit_json(view)
        return
    d = est.to_dict()
    console.print(
        f"[bold]{job_file}[/]: {d['method']} of {spec.base_model} ({d['params_b']:.3g} B params, from {d['params_source']})\n"
        f"VRAM per GPU: {d['vram_gb']:.1f} GB (weights+optimizer {d['weights_gb']:.1f}, activations {d['activations_gb']:.1f})"
        + (f"\n  {d['strategy']} over {d['processes']} GPUs: {d['vram_gb']:.1f} GB on each; one GPU alone would need "
           f"{d['vram_one_gpu_gb']:.1f} GB" if d["processes"] > 1 else "")
        + f"\ntokens: {d['tokens']:,} over {d['steps']:,} steps ({d['examples']:,} examples, global batch "
          f"{d['global_batch']})"
    )
    table = Table(box=None, header_style="bold")
    for col in ("GPU", "COUNT", "VRAM", "FITS", "HOURS"):
        table.add_column(col, justify="left" if col == "GPU" else "right")
    for r in rows:
        table.add_row(r["gpu"], str(r["count"]), f"{r['vram_gb']:g}", "yes" if r["fits"] else "[red]no[/]",
                      f"{r['hours']:.3f}" if r["hours"] is not None else "-")
    console.print(table)


@app.command()
def offers(
    job_file: Path,
    show_all: Annotated[bool, typer.Option("--all", help="Also list rejected offers, with the reason.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Every provider's offers for a job, ranked by expected cost of the completed job, and what the
    daemon would do with it now (the same decision function, on the same inputs)."""
    from orchestrator.views_fleet import offers_view

    spec, est = _spec_and_estimate(job_file)
    config = _config()
    with _existing_store(config) as store:
        view = offers_view(config, store, spec, est, show_all)
    d, shown, hidden, problems = view.decision, view.shown, view.hidden, view.problems
    if json_out:
        _emit_json(view.to_dict())
        return
    table = Table(box=None, header_style="bold")
    cols = (["PROVIDER", "GPU", "$/H", "EST H", "EST $", "RISK"] + (["HAZARD /H"] if show_all else [])
            + ["PRICE", "LAUNCH"] + (["WHY NOT"] if show_all else []))
    for col in cols:
        table.add_column(col, justify="right" if col in ("$/H", "EST H", "EST $", "RISK") else "left",
                         no_wrap=col != "WHY NOT", overflow="fold", min_width=30 if col == "WHY NOT" else None)
    for p in shown:
        o = p.offer
        gpu = f"{o.gpu}x{o.gpu_count}" if o.gpu_count else o.gpu
        launch = "yes" if (o.provider, o.offer_id) in d.ready else ("quote only" if p.viable else "-")
        row = [f"{o.provider}{' (spot)' if o.interruptible else ''}", gpu, f"{o.usd_per_hour:.3f}",
               f"{p.est_hours:.2f}" if p.est_hours is not None else "-",
               usd(p.est_usd) if p.est_usd is not None else "-", f"{p.risk:.0%}"]
        if show_all:
            row.append(_hazard_text(o))
        row += [o.provenance, launch]
        if show_all:
            row.append("" if p.viable else f"[red]{escape(p.reason)}[/]")
        table.add_row(*row)
    n_viable = sum(p.viable for p in d.placements)
    console.print(table, crop=False)
    console.print(f"{n_viable} viable of {len(d.placements)} offers, {len(d.ready)} launchable now; VRAM needed "
                  f"{est.vram_gb:.1f} GB, {est.tokens:,} tokens"
                  + (f"; {hidden} with placeholder prices hidden (--all shows them)" if hidden else ""))
    console.print(f"[bold]daemon would {d.verdict.value}[/] ({d.code.value}): {escape(d.text)}")
    for name, why in sorted(problems.items()):
        err.print(f"[yellow]{name}[/]: {escape(why)}")


def _hazard_text(o) -> str:
    """The hazard ranked (as advertised until attempts were observed), and then the advertised one
    with the observations behind it."""
    if not o.interruptible and o.hazard_per_hour <= 0:
        return "-"
    adv = o.detail("hazard_advertised")
    if adv is None:
        return f"{o.hazard_per_hour:.3f}"
    return f"{o.hazard_per_hour:.3f} (adv {adv:.3f}, {o.detail('hazard_observations', 0)} obs)"
