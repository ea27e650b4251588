"""The `lstmd` command line: through typer's CliRunner against an in-process daemon, and as a real
subprocess of the installed entry point (serve, status, replay, shutdown by signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_admin_commands_through_clirunner(make_daemon, tmp_path):
    daemon = make_daemon()
    control = ["--control", daemon.endpoints["control"]]
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a", 7], np.ones((2, 8), np.float32))

    status = json.loads(invoke("status", *control, "--json").stdout)
    assert status["streams"] == 2 and status["events"]["ok"] == 2
    shown = invoke("status", *control).stdout
    for text in ("streams and events", "ok 2", "up for", "durability", "nothing (a fresh start)", "training"):
        assert text in shown, (text, shown)
    assert "{'ok'" not in shown and "uptime_s" not in shown  # no dict reprs, no raw keys

    listed = json.loads(invoke("streams", "list", *control, "--json").stdout)
    assert {row["stream"] for row in listed} == {"a", 7}
    shown = json.loads(invoke("streams", "show", "7", *control, "--json").stdout)  # digits find the int id
    assert shown["stream"] == 7 and len(shown["h"][0]) == 24

    assert invoke("streams", "reset", "a", *control).exit_code == 0
    assert invoke("streams", "drop", "a", *control).exit_code == 0
    missing = invoke("streams", "show", "a", *control)
    assert missing.exit_code == 1 and "no stream 'a'" in missing.stderr

    info = json.loads(invoke("model", "info", *control, "--json").stdout)
    assert info["hidden_size"] == 24 and info["version"] == 0
    path = tmp_path / "m.safetensors"
    assert invoke("model", "export", str(path), *control).exit_code == 0
    imported = invoke("model", "import", str(path), *control)
    assert imported.exit_code == 0 and "version 1" in imported.stdout
    cfg = json.loads(invoke("config", "show", *control, "--json").stdout)
    assert cfg["model"]["hidden_size"] == 24


def test_client_errors_are_one_line_without_traceback(tmp_path):
    result = invoke("status", "--control", "tcp://127.0.0.1:1", "--json")
    assert result.exit_code == 1
    assert "is `lstmd serve` running?" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhidden = 3\n")
    result = invoke("status", "--config", str(bad))
    assert result.exit_code == 2 and "unknown key model.hidden; did you mean model.hidden_size?" in result.stderr


def test_replay_csv_through_clirunner(make_daemon, tmp_path):
    daemon = make_daemon(**{"model.input_size": 2})
    csv_path = tmp_path / "events.csv"
    rows = ["sensor,temp,load,target"] + [f"s{i % 3},{i * 0.1:.2f},{i % 5},{i * 0.2:.2f}" for i in range(40)]
    csv_path.write_text("\n".join(rows) + "\n")
    result = invoke(
        "replay",
        str(csv_path),
        "--stream-col",
        "sensor",
        "--features",
        "temp,load",
        "--target",
        "target",
        "--events",
        daemon.endpoints["events"],
        "--batch",
        "16",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["events"] == 40 and summary["streams"] == 3 and summary["rejected"] == 0
    assert summary["mae"] is not None and summary["mae"] > 0
    assert Admin(daemon.endpoints["control"]).status()["events"]["ok"] == 40
    wrong = invoke("replay", str(csv_path), "--stream-col", "nope", "--events", daemon.endpoints["events"])
    assert wrong.exit_code == 1 and "no stream column 'nope'" in wrong.stderr


def _lstmd() -> list[str]:
    exe = Path(sys.executable).with_name("lstmd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lstmd.clients.cli"]


def test_real_subprocess_serve_status_replay_and_sigterm(tmp_path):
    config = tmp_path / "lstmd.toml"
    config.write_text(
        "[model]\ninput_size = 3\nhidden_size = 16\n"
        "[serve]\nevents = 'tcp://127.0.0.1:*'\ncontrol = 'tcp://127.0.0.1:*'\npublish = ''\nmetrics = ''\n"
        f"[state]\ndir = '{tmp_path / 'state'}'\ncapacity = 1000\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    proc = subprocess.Popen(
        [*_lstmd(), "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not (tmp_path / "state" / "endpoints.json").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "daemon did not start"
            time.sleep(0.1)
        csv_path = tmp_path / "e.csv"
        csv_path.write_text("stream,a,b,c\n" + "".join(f"{i % 4},{i},{i},{i}\n" for i in range(20)))
        replay = subprocess.run(
            [*_lstmd(), "replay", str(csv_path), "--config", str(config), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["events"] == 20
        status = subprocess.run(
            [*_lstmd(), "status", "--config", str(config), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["streams"] == 4
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "lstmd stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.hidden_size=abc"], 'model.hidden_size must be an integer >= 1, got "abc"'),
        (["--set", "nosuch.key=1"], "there is no [nosuch] section"),
        (["--set", "model.task=forecast", "--set", "model.output_size=2"], "must equal model.input_size"),
    ],
)
def test_serve_rejects_bad_config_with_one_line(args, message, tmp_path):
    result = subprocess.run(
        [*_lstmd(), "serve", "--set", f"state.dir={tmp_path}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_serve_reports_a_port_in_use(make_daemon, tmp_path):
    daemon = make_daemon()
    taken = daemon.endpoints["events"]
    result = subprocess.run(
        [
            *_lstmd(),
            "serve",
            "--set",
            f"serve.events={taken}",
            "--set",
            "serve.control=tcp://127.0.0.1:*",
            "--set",
            "serve.publish=",
            "--set",
            "serve.metrics=",
            "--set",
            f"state.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot bind the events socket to {taken}" in result.stderr and "Traceback" not in result.stderr
