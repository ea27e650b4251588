"""`lstmd bench`: end-to-end throughput and latency, optionally side by side with the naive per-event server."""

from __future__ import annotations

from dataclasses import asdict
from json import dumps
from pathlib import Path
from typing import Annotated

import typer
from lstmd.clients.cli._common import (
    ControlOpt,
    JsonOpt,
    SetOpt,
    call_or_exit,
    client_keys,
    console,
    err_console,
    fail,
    print_json,
)
from rich.table import Table


def bench(
    streams: Annotated[int, typer.Option(help="Number of streams (ids spread over the producers).")] = 10_000,
    input_size: Annotated[int, typer.Option("--input-size", help="Features per event (I).")] = 8,
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden size (H) of a daemon the bench starts.")] = 64,
    layers: Annotated[int, typer.Option("--layers", help="LSTM layers (L) of a daemon the bench starts.")] = 1,
    events_per_message: Annotated[
        int, typer.Option("--events-per-message", help="Events per request (real producers batch).")
    ] = 1000,
    duration: Annotated[float, typer.Option(help="Measured seconds per server.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Unmeasured seconds before the window.")] = 2.0,
    rate: Annotated[
        str,
        typer.Option(
            help="Offered events/s in total (open loop); 0: as fast as replies come back; 'half': a closed-loop "
            "run, then an open-loop run at half its rate (the latency target's setting)."
        ),
    ] = "0",
    inflight: Annotated[int, typer.Option(help="Messages outstanding per producer (closed loop).")] = 8,
    producers: Annotated[int, typer.Option(help="Producer processes.")] = 1,
    ids: Annotated[str, typer.Option(help="Stream id kind: int or str.")] = "int",
    compare: Annotated[
        str | None, typer.Option(help="Also run this baseline on the same workload: naive.", show_default=False)
    ] = None,
    curve: Annotated[
        bool,
        typer.Option(
            "--curve", help="Also run lstmd with CurveZMQ security on every socket (keys made for the run)."
        ),
    ] = False,
    naive_duration: Annotated[
        float | None, typer.Option(help="Measured seconds for the baseline (default: --duration).")
    ] = None,
    events: Annotated[
        str | None,
        typer.Option("--events", help="Target a running daemon's events endpoint instead of starting one."),
    ] = None,
    control: ControlOpt = None,
    set_: SetOpt = None,
    daemon_log: Annotated[
        Path | None,
        typer.Option("--daemon-log", metavar="FILE", help="Keep the log of each daemon the bench starts (appended)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", metavar="FILE", help="Also write the numbers as JSON to FILE.")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Measure end-to-end events/s and latency; --compare naive runs the per-event baseline too."""
    from lstmd.clients import bench as b

    if compare not in (None, "naive"):
        raise typer.BadParameter("the only baseline is 'naive'", param_hint="--compare")
    if ids not in ("int", "str"):
        raise typer.BadParameter("int or str", param_hint="--ids")
    try:
        half = rate == "half"
        rate_value = 0.0 if half else float(rate)
    except ValueError:
        raise typer.BadParameter("events/s as a number, or 'half'", param_hint="--rate") from None
    if curve and events:
        raise typer.BadParameter("--curve starts a daemon of its own: leave out --events", param_hint="--curve")
    if control and not events:
        raise typer.BadParameter("--control needs --events (the daemon to drive)", param_hint="--control")
    for name, value in (("--streams", streams), ("--events-per-message", events_per_message)):
        if value <= 0:
            raise typer.BadParameter("must be positive", param_hint=name)
    keys = client_keys(None) if events else None  # a running daemon with CURVE: --server-key/--client-key
    if events and control:
        model = call_or_exit(b.daemon_status, control, keys)["model"]
        input_size, hidden, layers = model["input_size"], model["hidden_size"], model["num_layers"]
    if out is not None and not out.parent.is_dir():
        raise fail(f"--out {out}: the folder {out.parent} does not exist")
    workload = b.Workload(
        streams=streams,
        input_size=input_size,
        hidden_size=hidden,
        num_layers=layers,
        events_per_message=events_per_message,
        duration_s=duration,
        warmup_s=warmup,
        rate=rate_value,
        inflight=inflight,
        producers=producers,
        id_kind=ids,
    )
    err_console.print(
        f"lstmd bench: {streams:,} streams, I={input_size} H={hidden} L={layers}, {events_per_message} events "
        f"per message, {producers} producer(s), "
        + (f"open loop at {rate_value:,.0f} events/s" if rate_value > 0 else f"{inflight} in flight each"),
        highlight=False,
    )
    results = []
    try:
        err_console.print("running lstmd ...", highlight=False)
        run = {"events": events, "control": control, "overrides": set_, "client_keys": keys, "daemon_log": daemon_log}
        results.append(b.run_lstmd(workload, **run))
        if half:
            half_rate = results[0].events_per_s / 2
            err_console.print(f"running lstmd open loop at {half_rate:,.0f} events/s ...", highlight=False)
            at_half = b.Workload(**{**asdict(workload), "rate": half_rate})
            results.append(b.run_lstmd(at_half, **run))
            results[-1].server = "lstmd@50%"
        if curve:
            err_console.print("running lstmd with CURVE security ...", highlight=False)
            results.append(b.run_lstmd(workload, overrides=set_, curve=True, daemon_log=daemon_log))
        if compare == "naive":
            err_console.print("running the naive per-event server ...", highlight=False)
            naive = b.Workload(**{**asdict(workload), "duration_s": naive_duration or duration})
            results.append(b.run_naive(naive))
    except (RuntimeError, TimeoutError) as exc:
        raise fail(str(exc)) from None
    summary = b.summarize(results)
    if out is not None:
        try:
            out.write_text(dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise fail(f"cannot write {out}: {exc.strerror or exc}") from None
    if json:
        print_json(summary)
    (err_console if json else console).print(_table(summary))  # with --json, stdout is the JSON only
    if any(r.errors for r in results):
        raise fail("some events were rejected or answered wrongly (see the errors column)")


def _table(summary: dict) -> Table:
    table = Table(title="lstmd bench (latency in ms, send to reply)", title_justify="left")
    for column in ("server", "events/s", "p50", "p99", "p99.9", "cpu", "rss MiB", "batch", "errors"):
        table.add_column(column, justify="left" if column == "server" else "right", no_wrap=True)

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in summary["runs"]:
        lat = r["latency_ms"]
        table.add_row(
            r["server"],
            f"{r['events_per_s']:,.0f}",
            f"{lat['p50']:.2f}",
            f"{lat['p99']:.2f}",
            f"{lat['p99.9']:.2f}",
            fmt(r["server_cpu_cores"], ".2f"),
            fmt(r["server_rss_mib"], ",.0f"),
            fmt(r["batch_mean"], ",.0f"),
            str(r["errors"]),
        )
    captions = []
    for r in summary["runs"]:
        inside = r.get("daemon_latency_ms")
        if inside:
            captions.append(
                f"{r['server']} inside the daemon (receipt → reply): p50 ≤ {inside['p50']:g} ms, "
                f"p99 ≤ {inside['p99']:g} ms"
            )
    stolen = [f"{r['server']} {r['host_steal']:.0%}" for r in summary["runs"] if (r.get("host_steal") or 0) >= 0.02]
    if stolen:  # a shared VM: the hypervisor ran other guests on these CPUs during the window
        captions.append(f"CPU time stolen by the hypervisor during the window: {', '.join(stolen)}")
    if summary.get("curve_vs_plain") is not None:
        captions.append(f"lstmd with CURVE / without = {summary['curve_vs_plain']:.0%} of the events/s")
    if summary.get("speedup_vs_naive") is not None:
        captions.append(f"lstmd / naive = {summary['speedup_vs_naive']:,.0f}x on the same workload")
    table.caption = "\n".join(captions) or None
    return table
