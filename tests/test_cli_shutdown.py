"""Quiet, honest start and stop of `lstmd serve` and `lstmd demo`, as real processes: the startup log names every
endpoint, a fresh start's snapshot is not called a restore, a stop with training on ends at `lstmd stopped`
(no third-party leak report after it), and the demo prints its summary on SIGINT and on SIGTERM."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


def _lstmd() -> list[str]:
    exe = Path(sys.executable).with_name("lstmd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lstmd.clients.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the leak report came from triton")
def test_serve_with_training_stops_at_lstmd_stopped_and_names_every_endpoint(tmp_path):
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            *_lstmd(),
            "serve",
            *("--set", "serve.events=tcp://127.0.0.1:*"),
            *("--set", "serve.control=tcp://127.0.0.1:*"),
            *("--set", "serve.publish=tcp://127.0.0.1:*"),
            *("--set", "serve.metrics=127.0.0.1:0"),
            *("--set", f"state.dir={state}"),
            *("--set", "train.enabled=true"),  # the trainer's optimizer is what imported triton
            *("--set", "durability.wal=true"),  # a fresh start with the log on writes a snapshot at once
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (state / "endpoints.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)
        endpoints = json.loads((state / "endpoints.json").read_text())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    serving = next(line for line in err.splitlines() if " serving (device " in line)
    for name in ("events", "control", "publish", "metrics"):
        assert f"{name} {endpoints[name]}" in serving, (name, serving)
    assert "(start)" in err and "(restore)" not in err, err
    assert err.rstrip().endswith("lstmd stopped"), err[-2000:]  # nothing after it: no "nanobind: leaked ..."
    assert "nanobind" not in err and "leaked" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_prints_its_summary_when_stopped_by_a_signal(sig):
    proc = subprocess.Popen(
        [*_lstmd(), "demo", "--streams", "50", "--seconds", "600"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "streams, model" in line:  # printed once the signal handlers are in place
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(180), "".join(lines) + proc.stderr.read() if proc.poll() is not None else "".join(lines)
        assert lines[0].startswith("lstmd demo: starting a daemon")  # said before torch loads
        proc.send_signal(sig)
        err = proc.stderr.read()
        proc.wait(60)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, err
    assert f"stopped by {sig.name}" in out and "done: " in out and "events/s" in out, out
    assert "Traceback" not in err and "nanobind" not in err, err
    assert "rejected or diverged rounds in a row" not in err
