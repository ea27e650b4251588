"""`lstmd train status|now|pause|resume` and `lstmd model versions|rollback` through typer's CliRunner."""

from __future__ import annotations

import json

from lstmd.clients import Producer
from lstmd.clients.cli import app
from lstmd.clients.workloads import PeriodicStreams
from typer.testing import CliRunner

from tests.test_train import FORECAST

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_train_and_model_history_commands(make_daemon):
    daemon = make_daemon(**FORECAST)
    control = ["--control", daemon.endpoints["control"]]
    workload = PeriodicStreams(24, 2, seed=8)
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(40):
            producer.send(workload.ids, workload.next())
    status = json.loads(invoke("train", "status", *control, "--json").stdout)
    assert status["enabled"] and not status["paused"] and status["rounds"] == 0
    assert status["recorder"]["streams"] == 24
    assert "training" in invoke("train", "status", *control).stdout
    assert "paused" in invoke("train", "pause", *control).stdout
    assert json.loads(invoke("train", "status", *control, "--json").stdout)["paused"]
    now = invoke("train", "now", *control)
    assert now.exit_code == 0 and "round 1: published" in now.stdout, now.stdout
    assert "resumed" in invoke("train", "resume", *control).stdout

    versions = json.loads(invoke("model", "versions", *control, "--json").stdout)
    assert [v["version"] for v in versions] == [1, 0]
    assert "model versions" in invoke("model", "versions", *control).stdout
    rolled = invoke("model", "rollback", *control)
    assert rolled.exit_code == 0 and "weights of version 0 as version 2" in rolled.stdout
    assert "weights of version 1 as version 3" in invoke("model", "rollback", "1", *control).stdout
    missing = invoke("model", "rollback", "42", *control)
    assert missing.exit_code == 1 and "not kept" in missing.output and "Traceback" not in missing.output


def test_train_commands_when_training_is_disabled(make_daemon):
    daemon = make_daemon()
    control = ["--control", daemon.endpoints["control"]]
    assert "training is disabled" in invoke("train", "status", *control).stdout
    result = invoke("train", "now", *control)
    assert result.exit_code == 1 and "train.enabled=true" in result.output
