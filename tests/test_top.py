"""`lstmd top`: quantiles and rates from two scrapes, and one frame (`--once`) against a live metrics server."""

from __future__ import annotations

import io
import json
import math
import shutil
import signal
import socket
import subprocess
import time

import pytest
import typer
from lstmd.clients.cli.top import Scrape, compute_view, histogram_quantile, metrics_url, render, top
from lstmd.daemon.metrics import Metrics
from prometheus_client import CollectorRegistry
from rich.console import Console
from typer.testing import CliRunner

runner = CliRunner()


def top_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(top)
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps `top` a subcommand
    return app


@pytest.fixture
def served():
    """A Metrics object with a daemon's worth of values, on an ephemeral port."""
    metrics = Metrics(CollectorRegistry())
    metrics.set_build_info("9.9.9", "torch", "cpu")
    metrics.set_ready(True)
    metrics.capacity.set(1000)
    metrics.active_streams.set(250)
    metrics.queue_depth.set(3)
    metrics.model_version.set(7)
    metrics.train_loss.set(0.125)
    metrics.rejections.labels("bad_shape").inc(4)
    metrics.evictions.labels("ttl").inc(2)
    metrics.train_rounds.labels("published").inc(6)
    metrics.last_snapshot.set(time.time() - 30)
    server = metrics.serve_http("127.0.0.1:0")
    yield metrics, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.001, 0.0), (0.01, 50.0), (0.1, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.001 + 0.009 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 0.98)
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    # Past the last finite bound, Prometheus answers that bound.
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1


def test_rates_and_quantiles_come_from_the_difference_of_two_scrapes() -> None:
    def scrape(at: float, ok: float, fast: float, slow: float) -> Scrape:
        samples = {
            ("lstmd_events_total", (("status", "ok"),)): ok,
            ("lstmd_event_latency_seconds_bucket", (("le", "0.001"),)): fast,
            ("lstmd_event_latency_seconds_bucket", (("le", "0.1"),)): fast + slow,
            ("lstmd_event_latency_seconds_bucket", (("le", "+Inf"),)): fast + slow,
        }
        return Scrape(at, samples)

    # Before the window everything was fast; inside it, every event took 1..100 ms.
    old, new = scrape(100.0, 1000, 1000, 0), scrape(102.0, 1400, 1000, 400)
    view = compute_view("x:1", new, old)
    assert view.events_per_s == pytest.approx(200.0)
    assert view.window_s == pytest.approx(2.0)
    assert 0.001 < view.latency_p50_s < 0.1
    first_frame = compute_view("x:1", new, None)
    assert first_frame.events_per_s == 0.0 and math.isnan(first_frame.latency_p50_s)  # no window yet
    # Nothing happened in the next window: no latency (not the lifetime's), no rate.
    idle = compute_view("x:1", scrape(104.0, 1400, 1000, 400), new)
    assert idle.events_per_s == 0.0 and math.isnan(idle.latency_p50_s) and math.isnan(idle.latency_p99_s)
    assert "- (no events)" in _text(render(idle))


def _text(renderable, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_a_frame_fits_80_columns_and_uses_more_when_there() -> None:
    labels = {"status": "ok"}
    samples = {("lstmd_events_total", tuple(labels.items())): 10.0}
    for reason in ("bad_shape", "non_finite", "stream_id_too_long", "wal_write_failed"):
        samples[("lstmd_rejections_total", (("reason", reason),))] = 12345.0
    samples[("lstmd_build_info", (("backend", "cpu-fused-avx512"), ("device", "cpu"), ("version", "0.1.0")))] = 1
    old, new = Scrape(0.0, samples), Scrape(2.0, dict(samples))
    view = compute_view("127.0.0.1:9108", new, old)
    narrow = _text(render(view, 80), width=200)  # laid out for 80 columns, printed where nothing would wrap it
    assert max(len(line.rstrip()) for line in narrow.splitlines()) <= 80, narrow
    assert "rates over the last 2.0 s" in narrow and "cpu-fused-avx512 on cpu" in narrow
    wide = _text(render(view, 120), width=120)
    assert len(wide.splitlines()) < len(narrow.splitlines())  # sections side by side


def test_a_restarted_daemon_does_not_show_negative_rates() -> None:
    old = Scrape(0.0, {("lstmd_events_total", (("status", "ok"),)): 5000.0})
    new = Scrape(1.0, {("lstmd_events_total", (("status", "ok"),)): 10.0})
    assert compute_view("x:1", new, old).events_per_s == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("127.0.0.1:9108", "http://127.0.0.1:9108/metrics"),
        ("0.0.0.0:9108", "http://127.0.0.1:9108/metrics"),
        ("http://host:1/", "http://host:1/metrics"),
    ],
)
def test_metrics_url(address: str, url: str) -> None:
    assert metrics_url(address) == url


def test_once_prints_one_frame(served) -> None:
    _, address = served
    result = runner.invoke(top_app(), ["top", "--metrics", address, "--once", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    for text in ["9.9.9", "ready", "250 / 1,000 (25%)", "bad_shape", "published=6", "0.1250", "Serving"]:
        assert text in result.output, (text, result.output)


def test_once_json_reports_the_numbers(served, monkeypatch) -> None:
    from lstmd.clients.cli import top as top_module

    metrics, address = served
    metrics.event_latency.observe(5.0)  # before the window: not in its quantiles
    real_scrape, scrapes = top_module.scrape, []

    def scrape_then_traffic(*args, **kwargs):
        result = real_scrape(*args, **kwargs)
        if not scrapes:  # right after the window's first scrape: these are inside it
            for _ in range(20):
                metrics.event_latency.observe(0.002)
                metrics.batch_size.observe(8)
        scrapes.append(result)
        return result

    monkeypatch.setattr(top_module, "scrape", scrape_then_traffic)
    result = runner.invoke(top_app(), ["top", "--metrics", address, "--once", "--json", "--interval", "0.05"])
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.output  # valid JSON: nothing observed is null
    view = json.loads(result.output)
    assert view["version"] == "9.9.9" and view["device"] == "cpu" and view["ready"] is True
    assert view["active_streams"] == 250 and view["capacity"] == 1000 and view["queue_depth"] == 3
    assert view["rejections"] == {"bad_shape": 4.0}
    assert view["evictions"]["ttl"] == 2.0
    assert view["model_version"] == 7 and view["train_loss"] == 0.125
    assert 0.001 <= view["latency_p99_s"] <= 0.0025
    assert view["batch_mean"] == 8.0
    assert 25 <= view["snapshot_age_s"] <= 120


def test_unreachable_daemon_is_one_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    result = runner.invoke(top_app(), ["top", "--metrics", f"127.0.0.1:{port}", "--once", "--interval", "0.05"])
    assert result.exit_code == 1
    assert "cannot read" in result.output and "--metrics" in result.output
    assert "Traceback" not in result.output


def test_json_needs_once() -> None:
    result = runner.invoke(top_app(), ["top", "--metrics", "127.0.0.1:1", "--json"])
    assert result.exit_code == 2


def test_installed_entry_point_runs_top_once(served) -> None:
    from lstmd.clients.cli import app

    if "top" not in {command.name or command.callback.__name__ for command in app.registered_commands}:
        pytest.skip("`top` is not registered in lstmd.clients.cli yet (app.command()(top.top))")
    _, address = served
    lstmd = shutil.which("lstmd")
    assert lstmd, "the lstmd entry point is not installed (pip install -e .)"
    result = subprocess.run(
        [lstmd, "top", "--metrics", address, "--once", "--interval", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "lstmd top" in result.stdout and "9.9.9" in result.stdout


def test_piped_top_prints_frame_after_frame(served) -> None:
    """Not a terminal: no in-place redraw (which printed nothing), one frame per interval; Ctrl-C ends it."""
    _, address = served
    proc = subprocess.Popen(
        [shutil.which("lstmd") or "lstmd", "top", "--metrics", address, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen, deadline = [], time.monotonic() + 60
        while len([line for line in seen if line.startswith("lstmd top")]) < 3:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, seen
            seen.append(line)
        assert any("rates over the last" in line for line in seen)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
