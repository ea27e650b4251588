"""The drift policy: after `train.reset_after_rejections` rejected or diverged rounds in a row, the trainer
restarts from the serving weights with a fresh optimizer state; logged, counted, shown by `lstmd train status`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from lstmd.clients.workloads import PeriodicStreams
from typer.testing import CliRunner

from tests.test_train import FORECAST, feed_periodic

# A huge learning rate: every round ends far worse than serving (rejected) or non-finite (diverged). The trainer
# thread is not niced here: at nice 10 on a loaded machine (load ~4 on 2 cores) one round took over a minute.
DRIFTING = {**FORECAST, "train.lr": 1e6, "train.clip_norm": 1e6, "train.steps": 5, "train.nice": 0}


def train_round(daemon, admin: Admin) -> dict:
    """`train now`, then wait for the trainer itself to report the round finished and settled (a condition it
    notifies, not a wall-clock deadline: under load a round may take long, and that is not a failure)."""
    number = admin.train_now()["round"]
    assert daemon.trainer.wait_for_round(number, timeout=600), f"training round {number} never finished"
    return admin.train_status()


def trainer_weights(daemon) -> dict[str, torch.Tensor]:
    saved = daemon.trainer.snapshot_tensors()
    return {k.removeprefix("weights."): v for k, v in saved.items() if k.startswith("weights.")}


def serving_weights(daemon) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in daemon.engine.model.tensors.items()}


def resets_metric(daemon) -> float:
    return daemon.metrics.registry.get_sample_value("lstmd_train_resets_total")


def test_the_trainer_restarts_from_the_serving_weights_after_n_failed_rounds(make_daemon, caplog):
    daemon = make_daemon(**{**DRIFTING, "train.reset_after_rejections": 3})
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, PeriodicStreams(24, 2, seed=4), 40)
    assert resets_metric(daemon) == 0
    for n in (1, 2):
        status = train_round(daemon, admin)
        assert status["last_round"]["outcome"] in ("rejected", "diverged"), status["last_round"]
        assert status["consecutive_rejections"] == n and status["resets"] == 0
        if status["last_round"]["outcome"] == "rejected":  # a rejected round's weights stay the trainer's
            mine = trainer_weights(daemon)
            assert any(not torch.equal(mine[k], v) for k, v in serving_weights(daemon).items())
    with caplog.at_level(logging.WARNING, logger="lstmd.trainer"):
        status = train_round(daemon, admin)
    assert status["last_round"]["outcome"] in ("rejected", "diverged"), status["last_round"]
    assert status["consecutive_rejections"] == 0 and status["resets"] == 1
    assert status["settings"]["reset_after_rejections"] == 3
    assert resets_metric(daemon) == 1
    assert "3 rejected or diverged rounds in a row; restarting from the serving weights" in caplog.text
    # The trainer's weights are the serving weights again, and its optimizer state is fresh (Adam has none).
    mine, serving = trainer_weights(daemon), serving_weights(daemon)
    assert mine.keys() == serving.keys()
    assert all(torch.equal(mine[k], serving[k]) for k in serving)
    assert not any(k.startswith("optimizer.") for k in daemon.trainer.snapshot_tensors())
    assert status["model_version"] == 0, "nothing was published"
    # The streak starts over; `lstmd train status` shows it and the resets.
    train_round(daemon, admin)
    control = ["--control", daemon.endpoints["control"]]
    shown = json.loads(CliRunner().invoke(app, ["train", "status", *control, "--json"]).stdout)
    assert shown["consecutive_rejections"] == 1 and shown["resets"] == 1
    table = CliRunner().invoke(app, ["train", "status", *control]).stdout
    assert "rejected in a row" in table and "1 (a restart at 3); 1 restarts" in table, table
    # The counters survive a snapshot of the trainer.
    saved = daemon.trainer.snapshot_tensors()
    assert int(saved["resets"]) == 1 and int(saved["consecutive_rejections"]) == 1


def test_a_published_round_ends_the_streak(make_daemon):
    daemon = make_daemon(**{**FORECAST, "train.reset_after_rejections": 2, "train.nice": 0})
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, PeriodicStreams(24, 2, seed=3), 40)
    daemon.trainer.consecutive_rejections = 1  # as after one rejected round
    status = train_round(daemon, admin)
    assert status["last_round"]["outcome"] == "published", status["last_round"]
    assert status["consecutive_rejections"] == 0 and status["resets"] == 0


def test_zero_turns_the_policy_off(make_daemon):
    daemon = make_daemon(**{**DRIFTING, "train.reset_after_rejections": 0})
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, PeriodicStreams(24, 2, seed=4), 40)
    for n in (1, 2, 3, 4):
        status = train_round(daemon, admin)
        assert status["consecutive_rejections"] == n and status["resets"] == 0
    assert resets_metric(daemon) == 0


def test_reset_after_rejections_is_validated():
    from lstmd.daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.reset_after_rejections must be >= 0"):
        load_config(overrides=["train.reset_after_rejections=-1"], environ={})
