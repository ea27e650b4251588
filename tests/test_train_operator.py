"""Training that respects the operator: no scheduled round without new data, `model import`/`rollback` reset the
trainer to the installed weights (fresh optimizer) so they stick, and `train pause` survives a restart (the
snapshot, and the write-ahead log after a crash)."""

from __future__ import annotations

import json
import time

import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from lstmd.clients.workloads import PeriodicStreams
from lstmd.daemon.model import ServingModel
from typer.testing import CliRunner

from tests.test_train import FORECAST, feed_periodic, wait_for
from tests.test_train_reset import serving_weights, trainer_weights

# Scheduled rounds every 0.2 s; the trainer thread not niced, so a loaded machine only slows it.
LIVE = {**FORECAST, "train.interval": 0.2, "train.steps": 2, "train.nice": 0}


def idle(trainer) -> bool:
    """No round running, none waiting for the loop, and every recorded event already seen by a round."""
    last = trainer.last
    return not trainer._running and not (last is not None and last.pending) and trainer._data_seen() == (
        trainer._data_mark
    )


def test_no_scheduled_round_without_new_data(make_daemon):
    daemon = make_daemon(**LIVE)
    admin, trainer = Admin(daemon.endpoints["control"]), daemon.trainer
    workload = PeriodicStreams(8, 2, seed=5)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 20)
        assert trainer.wait_for_round(1, timeout=600)
        wait_for(lambda: idle(trainer), timeout=600, what="the rounds to catch up with the data")
        rounds, version = trainer.rounds, daemon.engine.model.version
        time.sleep(1.5)  # 7 intervals with nothing new: not one round, not one version
        status = admin.train_status()
        assert status["rounds"] == rounds and status["model_version"] == version
        assert status["new_data_since_last_round"] == 0
        assert status["next_round"].startswith("waiting for new events")
        # One more tick of data: the schedule resumes.
        feed_periodic(producer, workload, 1)
        assert admin.train_status()["new_data_since_last_round"] == 8
        assert trainer.wait_for_round(rounds + 1, timeout=600)
    # `train now` runs even without new data: the operator asked for it.
    wait_for(lambda: idle(trainer), timeout=600, what="the last scheduled round")
    number = admin.train_now()["round"]
    assert trainer.wait_for_round(number, timeout=600)
    assert admin.train_status()["rounds"] == number


def assert_trainer_starts_from(daemon, weights: dict[str, torch.Tensor]) -> None:
    mine = trainer_weights(daemon)
    assert mine.keys() == weights.keys()
    assert all(torch.equal(mine[k], weights[k]) for k in weights), "trainer weights are not the installed ones"
    saved = daemon.trainer.snapshot_tensors()
    assert not any(k.startswith("optimizer.") for k in saved), "the optimizer state is not fresh"
    assert int(saved["consecutive_rejections"]) == 0


def test_rollback_and_import_reset_the_trainer_and_stick(make_daemon, tmp_path):
    daemon = make_daemon(**LIVE)
    admin, trainer = Admin(daemon.endpoints["control"]), daemon.trainer
    v0 = serving_weights(daemon)
    workload = PeriodicStreams(24, 2, seed=6)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
        wait_for(lambda: idle(trainer) and trainer.outcomes["published"] >= 1, timeout=600, what="a trained version")
        trained = daemon.engine.model.version
        assert trained >= 1 and trainer.snapshot_tensors().keys() & {"optimizer.0.step"}

        rolled = admin.rollback(0)
        assert rolled["weights_of"] == 0 and rolled["version"] == trained + 1
        assert_trainer_starts_from(daemon, v0)  # no round was running: applied at once
        time.sleep(1.5)  # idle: the rollback stays the serving version
        assert admin.model_info()["version"] == rolled["version"]
        assert admin.train_status()["next_round"].startswith("waiting for new events")

        other = ServingModel.initial(daemon.spec, seed=123)
        (tmp_path / "other.safetensors").write_bytes(other.to_bytes())
        imported = admin.import_model(tmp_path / "other.safetensors")["version"]
        assert_trainer_starts_from(daemon, {k: v.cpu() for k, v in other.tensors.items()})
        # New data: the trainer trains the imported weights, and its candidate descends from them.
        feed_periodic(producer, workload, 40)
        number = admin.train_now()["round"]
        assert trainer.wait_for_round(number, timeout=600)
    last = admin.train_status()["last_round"]
    versions = admin.model_versions()  # newest first
    # A scheduled round (train.interval 0.2 s) may publish between the new events and train_now: every version
    # after the import is then a trained one, and the import is the version they descend from.
    newer = [v for v in versions if v["version"] > imported]
    assert all(v["source"] == "train" for v in newer), versions
    assert any(v["version"] == imported for v in versions), versions
    if last["outcome"] == "published":
        assert newer and versions[0]["source"] == "train"
    assert admin.model_info()["version"] == (newer[0]["version"] if newer else imported)


def test_an_install_during_a_round_discards_it(make_daemon):
    daemon = make_daemon(**FORECAST)
    trainer = daemon.trainer
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, PeriodicStreams(24, 2, seed=7), 40)
    other = ServingModel.initial(daemon.spec, seed=321)
    installed = {k: v.cpu().clone() for k, v in other.tensors.items()}
    with trainer._lock:
        trainer._running = 1  # as while the thread runs a round: the reset must wait for it
        trainer.reset_to(other, "import")
        assert trainer._pending_reset is not None
        trainer._running = 0
    report = trainer.run_round()  # a round starts from the pending weights, not from its own
    assert report.outcome in ("published", "rejected", "diverged"), report
    assert trainer._pending_reset is None and trainer._lineage == {other.version}
    mine = trainer_weights(daemon)
    if report.outcome != "diverged":
        assert any(not torch.equal(mine[k], installed[k]) for k in installed), "the round trained them"


def pause_state(daemon) -> dict:
    control = ["--control", daemon.endpoints["control"]]
    shown = json.loads(CliRunner().invoke(app, ["train", "status", *control, "--json"]).stdout)
    gauge = daemon.metrics.registry.get_sample_value("lstmd_train_enabled")
    table = CliRunner().invoke(app, ["train", "status", *control]).stdout
    assert ("paused (lstmd train resume)" in table) == shown["paused"] and "next round" in table
    return {"paused": shown["paused"], "next_round": shown["next_round"], "gauge": gauge}


def test_pause_survives_a_clean_restart(make_daemon, tmp_path):
    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **FORECAST)
    Admin(daemon.endpoints["control"]).train_pause()
    daemon.stop_and_join()  # the shutdown snapshot holds it
    again = make_daemon(state_dir=state, **FORECAST)
    shown = pause_state(again)
    assert shown["paused"] and shown["gauge"] == 0 and shown["next_round"].startswith("paused")
    Admin(again.endpoints["control"]).train_resume()
    again.stop_and_join()
    third = make_daemon(state_dir=state, **FORECAST)
    assert not pause_state(third)["paused"] and pause_state(third)["gauge"] == 1


def test_pause_survives_a_crash_through_the_log(make_daemon, tmp_path):
    # No shutdown snapshot: only the write-ahead log carries the pause, as after kill -9.
    crashy = {**FORECAST, "durability.wal": True, "durability.fsync": "always"}
    crashy["durability.snapshot_on_shutdown"] = False
    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **crashy)
    Admin(daemon.endpoints["control"]).train_pause()
    daemon.stop_and_join()
    again = make_daemon(state_dir=state, **crashy)
    assert again.durability.restored["records"] >= 1
    shown = pause_state(again)
    assert shown["paused"] and shown["gauge"] == 0
    Admin(again.endpoints["control"]).train_resume()
    again.stop_and_join()
    assert not pause_state(make_daemon(state_dir=state, **crashy))["paused"]
