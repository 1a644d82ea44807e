"""``tunefleet providers``, ``estimate`` and ``offers``: what capacity exists, what a job needs, and
what the daemon would do with it now (the same ``decide`` on the same inputs)."""

from __future__ import annotations

import time
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
    from providers.registry import PROVIDERS, build_providers

    config = _config()
    built, broken = build_providers(config, light=True)
    health: dict[str, dict[str, Any]] = {}
    learned: list[dict[str, Any]] = []
    if config.db_path.is_file():
        with _store(config) as store:
            health = store.provider_health()
            learned = _learned_rows(store)
    now = time.time()
    rows = []
    for name in PROVIDERS:
        h = health.get(name)
        daemon = None
        if h is not None:
            active = h["state"] != "ok" and (h["until"] or 0) > now
            daemon = {"state": h["state"] if active else "ok", "until": h["until"] if active else None,
                      "reason": h["reason"], "failures": h["failures"], "seen_at": h["updated_at"]}
        if name in broken:
            rows.append({"provider": name, "enabled": False, "launchable": False, "reason": broken[name],
                         "daemon": daemon})
            continue
        prov = built[name]
        try:
            enabled, reason = prov.check()
        except Exception as exc:  # check() must not raise; if it does, report it
            enabled, reason = False, f"check failed: {exc}"
        rows.append({"provider": name, "enabled": enabled, "launchable": prov.launchable, "reason": reason,
                     "daemon": daemon})
    for r in rows:
        r["learned"] = [x for x in learned if x["provider"] == r["provider"]]
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


def _learned_rows(store, hosts: int = 5) -> list[dict[str, Any]]:
    """Per (provider, GPU), and for its ``hosts`` riskiest hosts: the hours observed, interruptions,
    and the mean advertised vs learned hazard over those hours (``orchestrator.learning``)."""
    from orchestrator.learning import MarketModel

    model = MarketModel(store.exposure_tallies())
    out = []
    for provider, gpu, t, factor in model.groups():
        adv = t.expected / t.hours if t.hours else 0.0
        out.append({"provider": provider, "gpu": gpu, "host": "", "attempts": t.attempts, "hours": round(t.hours, 3),
                    "interruptions": t.interruptions, "advertised_per_hour": round(adv, 5),
                    "learned_per_hour": round(adv * factor, 5), "factor": round(factor, 4)})
        mine = []
        for p, g, host, h in model.hosts():
            if (p, g) != (provider, gpu) or not h.hours:
                continue
            f = model.host_factor(h, factor)
            a = h.expected / h.hours
            mine.append({"provider": p, "gpu": g, "host": host, "attempts": h.attempts, "hours": round(h.hours, 3),
                         "interruptions": h.interruptions, "advertised_per_hour": round(a, 5),
                         "learned_per_hour": round(a * f, 5), "factor": round(f, 4)})
        out += sorted(mine, key=lambda x: -x["factor"])[:hosts]
    return out


def _spec_and_estimate(job_file: Path):
    """The validated job and its estimate, calibrated by throughput measured on earlier runs."""
    from jobs.estimate import estimate

    spec = _load(job_file)
    config = _config()
    calibration: dict[str, float] = {}
    if config.db_path.is_file():
        with _store(config) as store:
            calibration = store.calibration(spec.base_model, spec.adapter or "full")
    return spec, estimate(spec, calibration)


@app.command()
def estimate(job_file: Path, json_out: JsonOpt = False) -> None:
    """VRAM, tokens, and hours and cost on each GPU model, before anything is rented."""
    from jobs.gpus import GPUS

    spec, est = _spec_and_estimate(job_file)
    gpus = max(1, spec.resources.gpus)
    rows = []
    for name, info in GPUS.items():
        hours = est.hours(name, 0 if name == "cpu" else gpus)
        fits = name == "cpu" or info.vram_gb >= est.vram_gb
        rows.append({"gpu": name, "count": 0 if name == "cpu" else gpus, "vram_gb": info.vram_gb,
                     "fits": fits, "hours": round(hours, 4) if hours is not None else None})
    if json_out:
        _emit_json({"estimate": est.to_dict(), "gpus": rows})
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
    from providers.registry import build_providers, gather_offers

    spec, est = _spec_and_estimate(job_file)
    config = _config()
    doc = spec.to_payload_dict()
    doc["checkpoint"]["store"] = doc["checkpoint"].get("store") or config.default_store  # as submit fills it
    built, broken = build_providers(config, spec.policy.providers, light=True)
    result = gather_offers(built, doc, est)
    problems = {**broken, **result.problems}
    disabled = {n: why for n, why in problems.items() if n in broken or n in result.unavailable}
    down = {n: why for n, why in problems.items() if n not in disabled}
    d = _decision(config, doc, est, result.offers, built, down, disabled)
    # the default: viable offers with a checked price; --all adds placeholders and rejections
    shown = [p for p in d.placements if show_all or (p.viable and not p.offer.placeholder)]
    hidden = sum(1 for p in d.placements if p.viable and p.offer.placeholder) if not show_all else 0
    if json_out:
        _emit_json({"decision": d.to_dict(),
                    "offers": [{**p.to_dict(), "launchable_now": (p.offer.provider, p.offer.offer_id) in d.ready}
                               for p in shown],
                    "hidden_placeholder_offers": hidden,
                    "problems": problems})
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


def _decision(config: Config, spec: dict[str, Any], est, offers_list, built, problems, disabled):
    """``decide`` with the inputs the daemon would use now: the store's caps and live attempts, the
    providers' health as the daemon last saw it, and which providers can launch."""
    from orchestrator.decide import JobView, Usage, decide
    from orchestrator.learning import MarketModel
    from orchestrator.spending import Caps

    now = time.time()
    down = {name: (why, None) for name, why in problems.items()}
    disabled = dict(disabled)
    live: list = []
    caps: list = []
    market = None
    checkpoint_s = None
    if config.db_path.is_file():
        with _store(config) as store:
            market = MarketModel(store.exposure_tallies())
            checkpoint_s = store.checkpoint_cost(spec["base_model"], spec.get("adapter") or "full")
            live = store.live_attempts()
            records = {e.attempt_id: e.data for a in live for e in store.events(a.job_id)
                       if e.kind == "attempt_created" and e.attempt_id == a.id}
            cap = Caps(store, config.budget_monthly_usd,
                       lambda a: float(records.get(a.id, {}).get("est_usd") or 0.0)).monthly(now, live)
            caps = [cap] if cap is not None else []
            for name, h in store.provider_health().items():
                if h["state"] == "backoff" and (h["until"] or 0) > now:
                    down.setdefault(name, (f"backing off: {h['reason']}", h["until"]))
                elif h["state"] == "disabled" and (h["until"] or 0) > now:
                    disabled.setdefault(name, h["reason"])
    counts: dict[str, int] = {}
    for a in live:
        counts[a.provider] = counts.get(a.provider, 0) + 1
    usage = Usage(live=counts, limits=dict(config.provider_limits), down=down, disabled=disabled,
                  launchable=frozenset(n for n, p in built.items() if p.launchable),
                  owned_tolerance=config.owned_tolerance, market=market)
    return decide(JobView("(file)", spec, checkpoint_s=checkpoint_s), est, offers_list, caps, usage, now)
