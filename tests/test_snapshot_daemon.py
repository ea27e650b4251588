"""Snapshots of a running daemon: `lstmd snapshot`, pruning with the log, the log-size trigger, training state."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from lstmd.clients.workloads import PeriodicStreams
from lstmd.daemon import snapshot, wal
from typer.testing import CliRunner

WAL_ON = {"durability.wal": True, "durability.snapshot_on_shutdown": False, "durability.snapshot_interval_s": 0}


def _send(daemon, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(n):
            producer.send([f"s{i}" for i in rng.integers(0, 20, size=6)], rng.standard_normal((6, 8)).astype("f4"))


def test_lstmd_snapshot_command_writes_one_and_prunes_the_log(make_daemon, tmp_path):
    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **{**WAL_ON, "durability.keep_snapshots": 2})
    runner = CliRunner()
    results = []
    for round_ in range(3):
        _send(daemon, 3, seed=round_)
        out = runner.invoke(app, ["snapshot", "--control", daemon.endpoints["control"], "--json"])
        assert out.exit_code == 0, out.output
        results.append(json.loads(out.output))
    last = results[-1]
    assert last["streams"] == len(daemon.store) and last["bytes"] > 0
    # Two snapshots kept; the log kept from the older one on, so either one can restore everything.
    kept = snapshot.list_snapshots(state)
    assert kept == [results[1]["wal_segment"], results[2]["wal_segment"]]
    assert wal.list_segments(state / "wal")[0] == kept[0]
    assert daemon.metrics.registry.get_sample_value("lstmd_last_snapshot_timestamp_seconds") > 0
    assert daemon.metrics.registry.get_sample_value("lstmd_snapshot_duration_seconds_count") >= 3
    assert daemon.metrics.registry.get_sample_value("lstmd_wal_bytes_total") > 0
    table = runner.invoke(app, ["snapshot", "--control", daemon.endpoints["control"]])
    assert table.exit_code == 0 and "lstmd snapshot" in table.output


def test_log_size_triggers_a_snapshot(make_daemon, tmp_path):
    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **{**WAL_ON, "durability.snapshot_wal_mb": 0.002})
    first = snapshot.list_snapshots(state)
    _send(daemon, 20)
    deadline = time.time() + 10
    while snapshot.list_snapshots(state) == first and time.time() < deadline:
        time.sleep(0.1)  # housekeeping looks once a second
    assert snapshot.list_snapshots(state) != first


FORECAST_TRAINING = {
    "model.task": "forecast",
    "model.input_size": 2,
    "model.output_size": 2,
    "model.hidden_size": 8,
    "train.enabled": True,
    "train.interval": 0.0,
    "train.k2": 8,
    "train.record_steps": 32,
    "train.batch": 16,
    "train.steps": 30,
    "train.lr": 0.02,
    "train.min_windows": 1,
}


def test_training_state_and_event_counts_survive_a_restart(make_daemon, tmp_path):
    state = tmp_path / "state"
    settings = {**FORECAST_TRAINING, **WAL_ON}
    first = make_daemon(state_dir=state, **settings)
    admin = Admin(first.endpoints["control"])
    workload = PeriodicStreams(12, 2, seed=5)
    with Producer(first.endpoints["events"]) as producer:
        for _ in range(40):
            producer.send(workload.ids, workload.next())
    status = admin.train_now(wait=60)
    admin.snapshot()  # model, optimizer, recorder and history in the snapshot ...
    with Producer(first.endpoints["events"]) as producer:
        for _ in range(5):  # ... and events after it only in the log
            producer.send(workload.ids, workload.next())
    version = first.engine.model.version
    recorded = first.recorder.recorded
    trainer_state = first.trainer.snapshot_tensors()
    versions = [v["version"] for v in admin.model_versions()]
    first.stop_and_join()

    second = make_daemon(state_dir=state, **settings)
    admin = Admin(second.endpoints["control"])
    assert second.engine.model.version == version == status["model_version"]
    for sid in workload.ids:  # applied-event counts equal events sent: none lost, none twice
        assert admin.stream(sid)["events"] == 45
    assert second.recorder.recorded == recorded  # the log's events were recorded again by the replay
    again = second.trainer.snapshot_tensors()
    assert again.keys() == trainer_state.keys()
    for name in trainer_state:
        assert torch.equal(again[name], trainer_state[name]), name
    assert [v["version"] for v in admin.model_versions()] == versions


def test_replay_records_logged_events_and_targets_exactly_as_serving_did(make_daemon, tmp_path):
    state = tmp_path / "state"
    settings = {
        **FORECAST_TRAINING,
        **WAL_ON,
        "model.task": "regression",
        "model.input_size": 3,
        "model.output_size": 1,
    }
    first = make_daemon(state_dir=state, **settings)
    rng = np.random.default_rng(3)
    ids = [f"r{i}" for i in range(10)]

    def send(n: int) -> None:
        with Producer(first.endpoints["events"]) as producer:
            for _ in range(n):
                x = rng.standard_normal((10, 3)).astype(np.float32)
                y = rng.standard_normal((10, 1)).astype(np.float32)
                y[::4] = np.nan  # some events carry no target
                producer.send(ids, x, targets=y)

    send(12)
    Admin(first.endpoints["control"]).snapshot()
    send(9)  # these reach the recorder again only through the replay
    before = first.recorder.snapshot_tensors()
    first.stop_and_join()
    second = make_daemon(state_dir=state, **settings)
    after = second.recorder.snapshot_tensors()
    assert before.keys() == after.keys()
    for name in before:
        if name != "last_write":  # idle ages move with the clock
            assert torch.equal(before[name], after[name]), name


def test_training_state_that_does_not_fit_is_skipped_not_fatal(make_daemon, tmp_path, caplog):
    """A new training configuration (or lstmd version): streams and model come back, training starts over."""
    import logging

    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **{**FORECAST_TRAINING, **WAL_ON})
    workload = PeriodicStreams(6, 2, seed=1)
    with Producer(first.endpoints["events"]) as producer:
        for _ in range(10):
            producer.send(workload.ids, workload.next())
    first.stop_and_join()
    with caplog.at_level(logging.INFO, logger="lstmd.durability"):
        second = make_daemon(state_dir=state, **{**FORECAST_TRAINING, **WAL_ON, "train.record_steps": 64})
    assert "recorder state in snapshot-" in caplog.text and "recorder starts without it" in caplog.text
    assert {Admin(second.endpoints["control"]).stream(s)["events"] for s in workload.ids} == {10}


def test_periodic_snapshot_is_written_in_the_background(make_daemon, tmp_path, monkeypatch):
    """The loop only captures (copies) the state; the file is written on a thread while serving goes on."""
    import threading

    from lstmd.daemon import snapshot as snapshot_module

    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **{**WAL_ON, "durability.snapshot_interval_s": 1})
    _send(daemon, 3)
    release, writing = threading.Event(), threading.Event()
    real_write = snapshot_module.write

    def slow_write(*args, **kwargs):
        writing.set()
        assert release.wait(30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(snapshot_module, "write", slow_write)
    before = snapshot.list_snapshots(state)
    assert writing.wait(10), "no periodic snapshot started"
    _send(daemon, 3, seed=1)  # served while the snapshot file is still being written
    assert snapshot.list_snapshots(state) == before
    release.set()
    deadline = time.time() + 10
    while snapshot.list_snapshots(state) == before and time.time() < deadline:
        time.sleep(0.05)
    assert snapshot.list_snapshots(state) != before


def test_forecast_last_events_survive_a_snapshot_restart(make_daemon, tmp_path):
    """A forecast model sees each stream's change since its previous event: that previous event must come back
    from the snapshot, or the first prediction after a restart would treat it as 'no change'."""
    settings = {**WAL_ON, "model.task": "forecast", "model.input_size": 2, "model.output_size": 2}
    workload = PeriodicStreams(6, 2, seed=9)
    events = [workload.next() for _ in range(8)]
    uninterrupted = make_daemon(state_dir=tmp_path / "reference", **settings)
    restarted = make_daemon(state_dir=tmp_path / "state", **settings)
    for daemon in (uninterrupted, restarted):
        with Producer(daemon.endpoints["events"]) as producer:
            for x in events[:7]:
                producer.send(workload.ids, x)
    Admin(restarted.endpoints["control"]).snapshot()
    restarted.stop_and_join()
    restarted = make_daemon(state_dir=tmp_path / "state", **settings)
    predictions = []
    for daemon in (uninterrupted, restarted):
        with Producer(daemon.endpoints["events"]) as producer:
            predictions.append(producer.send(workload.ids, events[7]))
    np.testing.assert_array_equal(predictions[0], predictions[1])


def test_parts_of_a_snapshot_written_when_they_named_their_own_prefix_restore_exactly(make_daemon, tmp_path):
    """tests/data/wal_v1's snapshot was written when the recorder, the trainer and the version history returned
    `<part>.x` names themselves (metadata `<part>_prefixed = 1`); now the snapshot adds and strips the prefix, and
    every part of that old file comes back as it was written."""
    fixture = Path(__file__).parent / "data" / "wal_v1"
    state = tmp_path / "state"
    shutil.copytree(fixture, state)
    shutil.rmtree(state / "wal")  # the snapshot alone: nothing replayed on top of it
    old = snapshot.split(snapshot.read(state / "snapshot-000000000002.safetensors").tensors)
    daemon = make_daemon(state_dir=state, **json.loads((fixture / "settings.json").read_text()))
    assert daemon.status()["durability"]["restored"]["records"] == 0
    for part in ("recorder", "trainer", "versions"):
        now = getattr(daemon, part).snapshot_tensors()
        assert now.keys() >= old[part].keys(), part  # the recorder has gained `scale` since (restored as 1)
        for name, tensor in old[part].items():
            if name != "last_write":  # idle ages move with the clock
                assert torch.equal(now[name], tensor), f"{part}.{name}"
