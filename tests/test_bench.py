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
from lstmd.kernels import reference
from lstmd.kernels.cpu_step import CpuStep
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
            "--out",
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
            "--out",
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


@pytest.mark.parametrize("fused", [True, False], ids=["fused-c", "torch-ops"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize(("batch", "hidden", "inputs"), [(5, 48, 7), (1500, 24, 3), (700, 37, 5)])
def test_cpu_step_matches_the_reference_kernel(batch, hidden, inputs, layers, threads, fused):
    """The daemon's CPU step (fused C kernel or torch ops, chunks, parts on threads, the head) against
    lstmd.kernels.reference and the head as a plain linear layer."""
    gen = torch.Generator().manual_seed(batch + hidden + layers)
    params = []
    for layer in range(layers):
        n_in = inputs if layer == 0 else hidden
        params.append(
            tuple(
                torch.randn(*shape, generator=gen) * 0.3
                for shape in ((4 * hidden, n_in), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))
            )
        )
    head = (torch.randn(3, hidden, generator=gen), torch.randn(3, generator=gen))
    model = type("Model", (), {"params": params, "head": head})()
    S = 3 * batch
    h = torch.randn(layers, S, hidden, generator=gen)
    c = torch.randn(layers, S, hidden, generator=gen)
    h[:, 0] = float("nan")  # a dead row that is reset must come back finite
    c[:, 0] = float("nan")
    slots = torch.randperm(S - 1, generator=gen)[:batch] + 1  # distinct rows, row 0 left for the dead one
    slots[0] = 0
    reset = torch.rand(batch, generator=gen) < 0.3
    reset[0] = True
    x = torch.randn(batch, inputs, generator=gen) * 3  # wide enough to reach the activations' saturated ends
    h_ref, c_ref = h.clone(), c.clone()
    want = torch.nn.functional.linear(reference.lstm_step_(x, slots, h_ref, c_ref, params, reset), *head)
    step = CpuStep(threads, fused=fused)
    try:
        got = step(model, x, slots, h, c, reset)
    finally:
        step.close()
    # float32 throughout; the fused kernel's exp polynomial and rational sigmoid/tanh, and the torch path's
    # tanh-for-sigmoid and reordered GEMM, differ from the reference by ~1e-7 per activation.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=2e-6, equal_nan=True)
    assert torch.isfinite(h[:, slots]).all() and torch.isfinite(c[:, slots]).all()  # the dead row came back


def test_fused_cpu_step_refuses_operands_that_would_corrupt_memory():
    """The C kernel takes raw pointers: out-of-range slots and wrong dtypes/layouts are refused before it runs."""
    model = type("Model", (), {"params": [tuple(torch.zeros(*s) for s in ((8, 2), (8, 2), (8,), (8,)))],
                               "head": (torch.zeros(1, 2), torch.zeros(1))})()  # fmt: skip
    h, c, x = torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), torch.zeros(2, 2)
    step = CpuStep(fused=True)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 4\)"):
        step(model, x, torch.tensor([1, 4]), h, c)
    with pytest.raises(ValueError, match="slots must lie"):
        step(model, x, torch.tensor([-1, 0]), h, c)
    with pytest.raises(ValueError, match="float32"):
        step(model, x.double(), torch.tensor([0, 1]), h, c)
    with pytest.raises(ValueError, match="contiguous"):
        step(model, x, torch.tensor([0, 1]), h.transpose(1, 2).contiguous().transpose(1, 2), c)
    with pytest.raises(ValueError, match="int64"):
        step(model, x, torch.tensor([0, 1], dtype=torch.int32), h, c)
    with pytest.raises(ValueError, match=r"must be \[1, S, 2\]"):  # a wider table would overrun the buffers
        step(model, x, torch.tensor([0, 1]), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match=r"x must be \[B, 2\]"):
        step(model, torch.zeros(2, 5), torch.tensor([0, 1]), h, c)
    assert (h == 0).all() and (c == 0).all()  # nothing was written


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
