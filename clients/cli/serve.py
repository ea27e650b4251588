"""`lstmd serve` (run the daemon) and `lstmd demo` (the daemon plus a synthetic workload, live)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import tempfile
import time
from enum import StrEnum
from typing import Annotated, NoReturn

import numpy as np
import typer
from lstmd.clients.cli._common import ConfigOpt, SetOpt, console, fail, load_config_or_exit
from rich.live import Live
from rich.table import Table


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LogLevelOpt = Annotated[LogLevel, typer.Option("--log-level", help="How much the daemon logs.", case_sensitive=False)]


def _setup_logging(level: LogLevel) -> None:
    logging.basicConfig(level=level.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(config: ConfigOpt = None, set_: SetOpt = None, log_level: LogLevelOpt = LogLevel.info) -> None:
    """Run the daemon until SIGINT or SIGTERM."""
    _setup_logging(log_level)
    cfg = load_config_or_exit(config, set_)
    from lstmd.daemon.server import Daemon, StartupError

    try:
        daemon = Daemon(cfg)
        # Before start() writes endpoints.json: whoever sees that file may signal, and gets a clean stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: daemon.request_stop())
        # SIGHUP re-reads the client key directories, as `lstmd keys reload` does (start() loads [security]; a
        # daemon without it ignores the signal instead of dying of it)
        signal.signal(signal.SIGHUP, lambda *_: daemon.security is not None and daemon.security.request_reload())
        daemon.start()
    except StartupError as exc:
        raise fail(str(exc)) from None
    # Everything built so far (torch, the model, the tables' bookkeeping) lives as long as the process: keep it
    # out of every later garbage collection, so a full collection scans only what serving allocates. At half
    # the max rate the p99 went from 5.0-6.5 to 4.3-5.0 ms (3 interleaved runs, docs/benchmarks.md). Here and
    # not in Daemon: a process that starts several daemons (the tests) would pin each one's garbage.
    gc.collect()
    gc.freeze()
    daemon.serve_forever()
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown; call it only once everything is stopped and flushed.

    Training imports triton without using it on the CPU (torch's optimizers import torch._dynamo, which probes
    for triton), and at teardown triton's nanobind extension prints ~30 lines of "nanobind: leaked ..." after
    `lstmd stopped`. Nothing of ours is left for the teardown: the loop has stopped, the shutdown snapshot is
    written, the log closed, the threads joined. It ends the whole process, so tests run `serve` and `demo` as
    subprocesses, never through CliRunner.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def demo(
    streams: Annotated[int, typer.Option(help="Number of synthetic streams.", min=1)] = 1000,
    seconds: Annotated[float, typer.Option(help="How long to run (SIGINT or SIGTERM stop it sooner).")] = 20.0,
    set_: SetOpt = None,
    log_level: LogLevelOpt = LogLevel.warning,
) -> None:
    """Serve the embedded default model and stream a synthetic forecasting workload through it, live."""
    _setup_logging(log_level)
    console.print("lstmd demo: starting a daemon (loading torch takes a few seconds) ...", highlight=False)
    stopped_by: list[str] = []
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
            f"state.capacity={streams}",
            # Online training, quick rounds: the model error falls below the last-value forecast within seconds.
            "train.enabled=true",
            "train.interval=1.0",
            "train.k2=16",
            "train.record_steps=64",
            # The synthetic streams never change regime, so once the model has converged many rounds are no
            # better than the serving model (rejected, as they should be); that is no drift to restart from.
            "train.reset_after_rejections=0",
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
        # Stop at the next tick and print the summary on Ctrl-C and on SIGTERM (`timeout`, Kubernetes).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: stopped_by.append(signal.Signals(signum).name))
        workload = PeriodicStreams(streams, cfg.model.input_size, seed=cfg.model.seed)
        producer = Producer(daemon.endpoints["events"])
        console.print(
            f"lstmd demo: {streams} streams, model {cfg.model.num_layers}x{cfg.model.hidden_size} "
            f"({cfg.model.task}) on {daemon.device} with the {daemon.engine.backend_name} backend",
            highlight=False,
        )
        sent, started = 0, time.perf_counter()
        model_err = naive_err = 0.0
        previous, forecast = workload.next(), None
        try:
            with Live(console=console, refresh_per_second=4) as live:
                while not stopped_by and time.perf_counter() - started < seconds:
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
        version = daemon.engine.model.version
        console.line()
        if stopped_by:
            console.print(f"stopped by {stopped_by[0]} after {elapsed:.1f}s", highlight=False)
        console.print(
            f"done: {sent:,} events in {elapsed:.1f}s ({sent / elapsed:,.0f} events/s); model version {version}; "
            f"one-step error {model_err:.4f} (model) vs {naive_err:.4f} (last value)",
            highlight=False,
        )
    exit_now(0)


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
        if outcomes["rejected"]:
            table.caption = "rejected: a trained candidate no better than the serving model on held-out data"
    table.add_row("one-step error (model)", f"{model_err:.4f}")
    table.add_row("one-step error (last value)", f"{naive_err:.4f}")
    return table
