"""`lstmd top`: a live terminal view of a daemon's Prometheus metrics, for a host without Grafana.

Reads the daemon's /metrics endpoint (serve.metrics) over HTTP, so it needs no control socket and no torch.
Rates and latency quantiles come from the difference between two scrapes, the way Prometheus computes
`rate()` and `histogram_quantile()` over a window, so the numbers match the dashboard's.
"""

from __future__ import annotations

import math
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Annotated

import typer
from lstmd.clients.cli._common import (
    ConfigOpt,
    JsonOpt,
    TimeoutOpt,
    console,
    fail,
    print_json,
    resolve_endpoint,
)
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

Labels = tuple[tuple[str, str], ...]

MetricsOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        help="The daemon's metrics host:port (default: serve.metrics of --config, else 127.0.0.1:9108).",
        show_default=False,
    ),
]


@dataclass
class Scrape:
    """One read of /metrics: sample (name, sorted labels) -> value, and when it was taken."""

    at: float
    samples: dict[tuple[str, Labels], float]

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """Values of `name` keyed by one label (the series' other labels summed)."""
        out: dict[str, float] = {}
        for (sample, labels), value in self.samples.items():
            if sample == name:
                key = dict(labels).get(label, "")
                out[key] = out.get(key, 0.0) + value
        return out

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) pairs of a histogram, sorted by bound."""
        return sorted(
            (float(dict(labels)["le"]), value)
            for (sample, labels), value in self.samples.items()
            if sample == f"{histogram}_bucket"
        )


@dataclass
class View:
    """The numbers `lstmd top` shows; also what `--once --json` prints."""

    address: str
    version: str = "?"
    backend: str = "?"
    device: str = "?"
    ready: bool = False
    window_s: float = 0.0
    events_per_s: float = 0.0
    events_per_s_by_status: dict[str, float] = field(default_factory=dict)
    latency_p50_s: float = math.nan
    latency_p99_s: float = math.nan
    batch_mean: float = math.nan
    batch_p99: float = math.nan
    step_p99_s: float = math.nan
    queue_depth: float = 0.0
    active_streams: float = 0.0
    capacity: float = 0.0
    evictions: dict[str, float] = field(default_factory=dict)
    rejections: dict[str, float] = field(default_factory=dict)
    rejections_per_s: float = 0.0
    model_version: float = 0.0
    train_enabled: bool = False
    train_rounds: dict[str, float] = field(default_factory=dict)
    train_loss: float = math.nan
    holdout_loss: dict[str, float] = field(default_factory=dict)
    model_age_s: float | None = None
    snapshot_age_s: float | None = None
    wal_bytes_per_s: float = 0.0
    device_memory_bytes: dict[str, float] = field(default_factory=dict)


def metrics_url(address: str) -> str:
    """http://host:port/metrics for "host:port" (a wildcard bind address is reached on loopback)."""
    if address.startswith(("http://", "https://")):
        return address if address.rstrip("/").endswith("/metrics") else address.rstrip("/") + "/metrics"
    host, _, port = address.rpartition(":")
    if host in {"", "0.0.0.0", "::", "[::]"}:
        host = "127.0.0.1"
    return f"http://{host}:{port}/metrics"


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """Read and parse the exposition at `url`. Raises OSError when the daemon cannot be reached."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Scrape(time.time(), samples)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile of cumulative buckets, interpolated linearly inside a bucket as Prometheus does.

    NaN with no observations; the highest finite bound when the quantile falls in the +Inf bucket.
    """
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


def _delta_buckets(new: Scrape, old: Scrape | None, histogram: str) -> list[tuple[float, float]]:
    """The histogram's observations inside the window; empty without a window (the first frame) or when nothing
    was observed in it, so an idle daemon shows no latency rather than its lifetime's."""
    if old is None:
        return []
    now = new.buckets(histogram)
    before = dict(old.buckets(histogram))
    delta = [(bound, count - before.get(bound, 0.0)) for bound, count in now]
    if any(count < 0 for _, count in delta):
        return now  # the daemon restarted inside the window: everything since its start is inside the window
    return delta


def _rate(new: Scrape, old: Scrape | None, name: str, **labels: str) -> float:
    if old is None or new.at <= old.at:
        return 0.0
    now, before = new.value(name, **labels), old.value(name, **labels)
    if now is None:
        return 0.0
    before = 0.0 if before is None or before > now else before  # a restart resets counters
    return (now - before) / (new.at - old.at)


def _age(new: Scrape, name: str) -> float | None:
    stamp = new.value(name)
    return None if not stamp else max(0.0, new.at - stamp)


def compute_view(address: str, new: Scrape, old: Scrape | None) -> View:
    """Turn two scrapes (old may be None: totals only, no rates yet) into the numbers on screen."""
    view = View(address=address, window_s=0.0 if old is None else new.at - old.at)
    build = next((dict(labels) for (name, labels) in new.samples if name == "lstmd_build_info"), {})
    view.version, view.backend, view.device = (build.get(k, "?") for k in ("version", "backend", "device"))
    view.ready = new.value("lstmd_ready") == 1
    statuses = new.by_label("lstmd_events_total", "status")
    view.events_per_s_by_status = {s: _rate(new, old, "lstmd_events_total", status=s) for s in statuses}
    view.events_per_s = sum(view.events_per_s_by_status.values())
    latency = _delta_buckets(new, old, "lstmd_event_latency_seconds")
    view.latency_p50_s = histogram_quantile(0.5, latency)
    view.latency_p99_s = histogram_quantile(0.99, latency)
    batches = _delta_buckets(new, old, "lstmd_batch_size_events")
    view.batch_p99 = histogram_quantile(0.99, batches)
    count_rate = _rate(new, old, "lstmd_batch_size_events_count")
    if count_rate > 0:
        view.batch_mean = _rate(new, old, "lstmd_batch_size_events_sum") / count_rate
    view.step_p99_s = histogram_quantile(0.99, _delta_buckets(new, old, "lstmd_step_duration_seconds"))
    view.queue_depth = new.value("lstmd_input_queue_depth_messages") or 0.0
    view.active_streams = new.value("lstmd_active_streams") or 0.0
    view.capacity = new.value("lstmd_state_capacity_streams") or 0.0
    view.evictions = new.by_label("lstmd_evictions_total", "cause")
    view.rejections = new.by_label("lstmd_rejections_total", "reason")
    view.rejections_per_s = sum(_rate(new, old, "lstmd_rejections_total", reason=r) for r in view.rejections)
    view.model_version = new.value("lstmd_model_version") or 0.0
    view.train_enabled = new.value("lstmd_train_enabled") == 1
    view.train_rounds = new.by_label("lstmd_train_rounds_total", "outcome")
    loss = new.value("lstmd_train_loss")
    view.train_loss = math.nan if loss is None else loss
    view.holdout_loss = new.by_label("lstmd_holdout_loss", "model")
    view.model_age_s = _age(new, "lstmd_last_publish_timestamp_seconds")
    view.snapshot_age_s = _age(new, "lstmd_last_snapshot_timestamp_seconds")
    view.wal_bytes_per_s = _rate(new, old, "lstmd_wal_bytes_total")
    view.device_memory_bytes = new.by_label("lstmd_device_memory_bytes", "kind")
    return view


# --- rendering ---------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.{digits}f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.{digits}f}k"
    return f"{value:,.{digits}f}" if value != int(value) else f"{int(value):,}"


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _pairs(values: dict[str, float], skip_zero: bool = False) -> str:
    shown = {k: v for k, v in values.items() if v or not skip_zero}
    return "  ".join(f"{k}={_num(v, 0)}" for k, v in sorted(shown.items())) or ("0" if values else "-")


def _section(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def render(view: View, width: int = 80) -> Group:
    """The rich renderable for one frame: sections side by side from 100 columns, else one under the other, so
    an 80-column terminal (or a pipe) gets lines that fit."""
    ready = Text("ready", style="bold green") if view.ready else Text("not ready", style="bold red")
    header = Text.assemble(("lstmd top  ", "bold"), f"{view.address}  ", ready)
    windowed = view.window_s > 0
    subheader = Text(
        f"v{view.version}, {view.backend} on {view.device}; "
        + (f"rates over the last {view.window_s:.1f} s" if windowed else "rates from the next frame on"),
        style="dim",
    )
    fill = f" ({view.active_streams / view.capacity:.0%})" if view.capacity else ""
    changed = f"(changed {_seconds(view.model_age_s)} ago)" if view.model_age_s is not None else ""
    if not windowed:
        rate = latency = batch = step = rejections_per_s = "-"
    else:
        by_status = _pairs(view.events_per_s_by_status, skip_zero=True)
        rate = f"{_num(view.events_per_s, 0)}" + (f"  ({by_status})" if view.events_per_s else "")
        idle = math.isnan(view.latency_p50_s)
        latency = "- (no events)" if idle else f"p50 {_seconds(view.latency_p50_s)}  p99 {_seconds(view.latency_p99_s)}"
        batch = "-" if math.isnan(view.batch_mean) else f"mean {_num(view.batch_mean)}  p99 {_num(view.batch_p99, 0)}"
        step = _seconds(view.step_p99_s)
        rejections_per_s = _num(view.rejections_per_s, 2)
    serving = _section(
        "Serving",
        [
            ("events/s", rate),
            ("latency", latency),
            ("batch size", batch),
            ("step p99", step),
            ("queue depth", _num(view.queue_depth, 0)),
            ("rejections/s", rejections_per_s),
        ],
    )
    streams = _section(
        "Streams",
        [
            ("active", f"{_num(view.active_streams, 0)} / {_num(view.capacity, 0)}{fill}"),
            ("evictions", _pairs(view.evictions, skip_zero=True)),
            (
                "device memory",
                "  ".join(f"{k} {_bytes(v)}" for k, v in sorted(view.device_memory_bytes.items())) or "-",
            ),
        ],
    )
    training = _section(
        "Model and training",
        [
            ("model version", f"{_num(view.model_version, 0)}  {changed}"),
            ("training", "on" if view.train_enabled else "off/paused"),
            ("rounds", _pairs(view.train_rounds, skip_zero=True)),
            ("train loss", _num(view.train_loss, 4)),
            (
                "holdout loss",
                "  ".join(f"{k} {_num(v, 4)}" for k, v in sorted(view.holdout_loss.items())) or "-",
            ),
        ],
    )
    durability = _section(
        "Durability",
        [
            (
                "snapshot age",
                _seconds(view.snapshot_age_s) if view.snapshot_age_s is not None else "none yet",
            ),
            ("WAL", f"{_bytes(view.wal_bytes_per_s)}/s" if windowed else "-"),
        ],
    )
    by_count = sorted(view.rejections.items(), key=lambda item: -item[1])
    rejections = _section("Rejections by reason (total)", [(r, _num(n, 0)) for r, n in by_count])
    if width >= 100:
        grid = Table.grid(padding=(1, 2))
        grid.add_row(serving, streams)
        grid.add_row(training, durability)
        parts = [header, subheader, grid]
    else:
        parts = [header, subheader, serving, streams, training, durability]
    if view.rejections:
        parts.append(rejections)
    return Group(*parts)


def top(
    metrics: MetricsOpt = None,
    config: ConfigOpt = None,
    interval: Annotated[float, typer.Option("--interval", "-n", help="Seconds between refreshes.", min=0.05)] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame (rates over --interval) and exit.")] = False,
    timeout: TimeoutOpt = 3.0,
    json: JsonOpt = False,
) -> None:
    """Watch the daemon's throughput, latency, streams, training and snapshots live in the terminal.

    Piped (not a terminal), it prints one frame per --interval, one after another.
    """
    address = metrics or _configured_address(config)
    url = metrics_url(address)
    if json and not once:
        raise typer.BadParameter("--json prints one frame: use it with --once", param_hint="--json")
    if once:
        try:
            first = scrape(url, timeout)
            time.sleep(interval)
            view = compute_view(address, scrape(url, timeout), first)
        except (OSError, ValueError, HTTPException) as exc:  # HTTPException: not a port, not HTTP
            message = f"cannot read {url}: {_reason(exc)}. Is the daemon running? Pass --metrics host:port."
            raise fail(message) from None
        if json:  # no NaN in JSON: a number that has no value (nothing observed in the window) is null
            print_json(_no_nan(asdict(view)))
        else:
            console.print(render(view, console.width))
        return
    previous: Scrape | None = None

    def frame() -> RenderableType:
        nonlocal previous
        try:
            current = scrape(url, timeout)
        except (OSError, ValueError, HTTPException) as exc:  # HTTPException: not a port, not HTTP
            previous = None
            return Text(f"cannot read {url}: {_reason(exc)} (retrying every {interval:g} s; Ctrl-C quits)", "bold red")
        view, previous = compute_view(address, current, previous), current
        return render(view, console.width)

    try:
        if not console.is_terminal:  # a pipe or a file: frames one after another, nothing redrawn in place
            while True:
                try:
                    console.print(frame())
                    console.print()
                    console.file.flush()
                except BrokenPipeError:  # `lstmd top | head`: the reader has had enough
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
                    return
                time.sleep(interval)
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                live.update(frame(), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


def _no_nan(value):
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _configured_address(config: Path | None) -> str:
    """serve.metrics from --config (or LSTMD_SERVE__METRICS), else the default 127.0.0.1:9108."""
    address = resolve_endpoint(config, None, key="metrics")
    if not address:
        raise fail("the daemon's config sets no serve.metrics address: pass --metrics host:port")
    return address


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc)
