"""`lstmd bench --compare naive` end to end with tiny numbers: it runs both servers and reports (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from lstmd.clients.cli import app
from lstmd.clients.naive_server import NaiveLSTMServer
from lstmd.daemon.cpu_step import CpuStep
from lstmd.kernels import reference
from typer.testing import CliRunner


def test_bench_compare_naive_reports_both_servers(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--compare",
            "naive",
            "--streams",
            "40",
            "--hidden",
            "8",
            "--events-per-message",
            "10",
            "--duration",
            "0.5",
            "--warmup",
            "0.3",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lstmd / naive" in result.output
    summary = json.loads(out.read_text())
    runs = {r["server"]: r for r in summary["runs"]}
    assert set(runs) == {"lstmd", "naive"}
    for run in runs.values():
        assert run["events"] > 0 and run["errors"] == 0
        assert run["latency_ms"]["p50"] > 0
    assert runs["lstmd"]["batch_mean"] > 0
    assert runs["lstmd"]["daemon_latency_ms"]["p50"] > 0  # from the daemon's own histogram
    assert "inside the daemon" in result.output
    assert summary["speedup_vs_naive"] > 0


def test_bench_open_loop_against_a_running_daemon(make_daemon, tmp_path):
    daemon = make_daemon()
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--events",
            daemon.endpoints["events"],
            "--control",
            daemon.endpoints["control"],
            "--streams",
            "30",
            "--events-per-message",
            "10",
            "--rate",
            "2000",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (run,) = json.loads(out.read_text())["runs"]
    assert run["events"] > 0 and run["errors"] == 0
    assert run["workload"]["hidden_size"] == 24  # read from the daemon it drove


def test_bench_rejects_unknown_baseline():
    result = CliRunner().invoke(app, ["bench", "--compare", "triton"])
    assert result.exit_code != 0
    assert "naive" in result.output


def test_bench_help_from_the_installed_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "lstmd.clients.cli", "bench", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "--compare" in done.stdout


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize(("batch", "hidden", "inputs"), [(5, 48, 7), (1500, 24, 3)])
def test_cpu_step_matches_the_reference_kernel(batch, hidden, inputs, layers):
    """The daemon's CPU step (gate reorder, tanh-for-sigmoid, chunks) against lstmd.kernels.reference."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for layer in range(layers):
        n_in = inputs if layer == 0 else hidden
        params.append(
            tuple(
                torch.randn(*shape, generator=gen) * 0.3
                for shape in ((4 * hidden, n_in), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))
            )
        )
    model = type("Model", (), {"params": params})()
    S = 3 * batch
    h = torch.randn(layers, S, hidden, generator=gen)
    c = torch.randn(layers, S, hidden, generator=gen)
    h[:, 0] = float("nan")  # a dead row that is reset must come back finite
    slots = torch.randperm(S - 1, generator=gen)[:batch] + 1  # distinct rows, row 0 left for the dead one
    slots[0] = 0
    reset = torch.rand(batch, generator=gen) < 0.3
    reset[0] = True
    x = torch.randn(batch, inputs, generator=gen)
    h_ref, c_ref = h.clone(), c.clone()
    want = reference.lstm_step_(x, slots, h_ref, c_ref, params, reset)
    got = CpuStep()(model, x, slots, h, c, reset)
    # float32 throughout; tanh-for-sigmoid and the reordered GEMM differ from the reference by ~1e-7.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=2e-6, equal_nan=True)


def test_naive_server_keeps_state_per_stream():
    server = NaiveLSTMServer(3, 8)
    x = [0.1, -0.2, 0.3]
    first = server.predict("a", x)
    assert server.predict("b", x) == first  # a fresh stream starts from zero state
    assert server.predict("a", x) != first  # the same stream continues from its state
    assert np.isfinite(first).all() and len(server.states) == 2


def test_bench_rejects_a_rate_that_is_not_a_number_or_half():
    result = CliRunner().invoke(app, ["bench", "--rate", "fast"])
    assert result.exit_code != 0
    assert "half" in result.output
