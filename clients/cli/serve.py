"""`lstmd serve` (run the daemon) and `lstmd demo` (the daemon plus a synthetic workload, live)."""

from __future__ import annotations

import gc
import logging
import signal
import tempfile
import time
from typing import Annotated

import numpy as np
import typer
from lstmd.clients.cli._common import ConfigOpt, SetOpt, console, fail, load_config_or_exit
from rich.live import Live
from rich.table import Table

LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(config: ConfigOpt = None, set_: SetOpt = None, log_level: LogLevelOpt = "info") -> None:
    """Run the daemon until SIGINT or SIGTERM."""
    _setup_logging(log_level)
    cfg = load_config_or_exit(config, set_)
    from lstmd.daemon.server import Daemon, StartupError

    try:
        daemon = Daemon(cfg)
        daemon.start()
    except StartupError as exc:
        raise fail(str(exc)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: daemon.request_stop())
    if daemon.security is not None:  # SIGHUP re-reads the client key directories, as `lstmd keys reload` does
        signal.signal(signal.SIGHUP, lambda *_: daemon.security.request_reload())
    # Everything built so far (torch, the model, the tables' bookkeeping) lives as long as the process: keep it
    # out of every later garbage collection, so a full collection scans only what serving allocates. At half
    # the max rate the p99 went from 5.0-6.5 to 4.3-5.0 ms (3 interleaved runs, docs/benchmarks.md). Here and
    # not in Daemon: a process that starts several daemons (the tests) would pin each one's garbage.
    gc.collect()
    gc.freeze()
    daemon.serve_forever()


def demo(
    streams: Annotated[int, typer.Option(help="Number of synthetic streams.")] = 1000,
    seconds: Annotated[float, typer.Option(help="How long to run.")] = 20.0,
    set_: SetOpt = None,
    log_level: LogLevelOpt = "warning",
) -> None:
    """Serve the embedded default model and stream a synthetic forecasting workload through it, live."""
    _setup_logging(log_level)
    with tempfile.TemporaryDirectory(prefix="lstmd-demo-") as state_dir:
        overrides = [
            "model.task=forecast",
            "model.input_size=2",
            "model.output_size=2",
            "model.hidden_size=32",
            "serve.events=tcp://127.0.0.1:*",
            "serve.control=tcp://127.0.0.1:*",
            "serve.publish=",
            "serve.metrics=",
            f"state.dir={state_dir}",
            f"state.capacity={max(streams, 1)}",
            # Online training, quick rounds: the model error falls below the last-value forecast within seconds.
            "train.enabled=true",
            "train.interval=1.0",
            "train.k2=16",
            "train.record_steps=64",
            *(set_ or []),
        ]
        cfg = load_config_or_exit(None, overrides)
        from lstmd.clients import Producer
        from lstmd.clients.workloads import PeriodicStreams
        from lstmd.daemon.server import Daemon, StartupError

        try:
            daemon = Daemon(cfg)
            daemon.start_in_thread()
        except StartupError as exc:
            raise fail(str(exc)) from None
        workload = PeriodicStreams(streams, cfg.model.input_size, seed=cfg.model.seed)
        producer = Producer(daemon.endpoints["events"])
        console.print(
            f"lstmd demo: {streams} streams, model {cfg.model.num_layers}x{cfg.model.hidden_size} "
            f"({cfg.model.task}) on {daemon.device} with the {daemon.engine.backend_name} backend"
        )
        sent, started = 0, time.perf_counter()
        model_err = naive_err = 0.0
        previous, forecast = workload.next(), None
        try:
            with Live(console=console, refresh_per_second=4) as live:
                while time.perf_counter() - started < seconds:
                    current = workload.next()
                    if forecast is not None:
                        # Exponential averages of the one-step error: the model vs "same as last value".
                        model_err = 0.9 * model_err + 0.1 * float(np.abs(forecast - current).mean())
                        naive_err = 0.9 * naive_err + 0.1 * float(np.abs(previous - current).mean())
                    forecast = producer.send(workload.ids, current)
                    previous = current
                    sent += streams
                    elapsed = time.perf_counter() - started
                    live.update(_demo_table(sent, elapsed, model_err, naive_err, daemon))
        finally:
            producer.close()
            daemon.stop_and_join()
        elapsed = time.perf_counter() - started
        console.line()
        console.print(f"done: {sent} events in {elapsed:.1f}s ({sent / elapsed:,.0f} events/s)")


def _demo_table(sent: int, elapsed: float, model_err: float, naive_err: float, daemon) -> Table:
    table = Table(title="lstmd demo", show_header=False, title_justify="left")
    table.add_column("metric", style="bold cyan")
    table.add_column("value", justify="right")
    table.add_row("events sent", f"{sent:,}")
    table.add_row("throughput", f"{sent / max(elapsed, 1e-9):,.0f} events/s")
    table.add_row("model version", str(daemon.engine.model.version))
    if daemon.trainer is not None:
        outcomes = daemon.trainer.outcomes
        table.add_row("training rounds", ", ".join(f"{k} {v}" for k, v in outcomes.items() if v) or "-")
    table.add_row("one-step error (model)", f"{model_err:.4f}")
    table.add_row("one-step error (last value)", f"{naive_err:.4f}")
    return table
