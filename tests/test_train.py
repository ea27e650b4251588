"""Online training over real sockets with a tiny model: publish, reject, diverge, pause/resume/now, rollback,
delayed targets, windows that start from the real state, the recorder's memory bound, snapshots."""

from __future__ import annotations

import time

import numpy as np
import pytest
import safetensors.torch
import torch
from lstmd.clients import Admin, DaemonError, Producer
from lstmd.clients.workloads import PeriodicStreams
from lstmd.daemon.model import ServingModel
from lstmd.daemon.recorder import Recorder
from lstmd.kernels import lstm_sequence

TINY = {
    "model.hidden_size": 8,
    "train.enabled": True,
    "train.interval": 0.0,  # rounds only on `train now` unless a test says otherwise
    "train.k2": 8,
    "train.record_steps": 32,
    "train.batch": 16,
    "train.steps": 30,
    "train.lr": 0.02,
    "train.min_windows": 1,
}
FORECAST = {**TINY, "model.task": "forecast", "model.input_size": 2, "model.output_size": 2}
REGRESSION = {**TINY, "model.task": "regression", "model.input_size": 3, "model.output_size": 1}


def feed_periodic(producer: Producer, workload: PeriodicStreams, ticks: int) -> np.ndarray:
    preds = None
    for _ in range(ticks):
        preds = producer.send(workload.ids, workload.next())
    return preds


def exported_tensors(admin: Admin, path) -> dict[str, torch.Tensor]:
    admin.export_model(path)
    return safetensors.torch.load_file(str(path))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"tensor {name} differs"


def test_version_increases_when_the_holdout_loss_falls(make_daemon):
    daemon = make_daemon(**FORECAST)
    admin = Admin(daemon.endpoints["control"])
    workload = PeriodicStreams(24, 2, seed=3)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
        status = admin.train_now(wait=60)
        last = status["last_round"]
        assert last["outcome"] == "published", last
        assert last["holdout_candidate"] <= last["holdout_serving"]
        assert status["model_version"] == 1 and status["outcomes"]["published"] == 1
        # The reply names the version that answered.
        result = producer.send_detailed(workload.ids, workload.next())
        assert result.version == 1
    versions = admin.model_versions()
    assert [v["version"] for v in versions] == [1, 0]
    assert versions[0]["source"] == "train" and versions[0]["serving"]
    assert versions[0]["holdout_loss"] == pytest.approx(last["holdout_candidate"])
    assert daemon.metrics.registry.get_sample_value("lstmd_train_rounds_total", {"outcome": "published"}) == 1
    assert daemon.metrics.registry.get_sample_value("lstmd_model_version") == 1


def test_a_diverging_round_is_rejected_and_serving_is_unchanged(make_daemon, tmp_path):
    daemon = make_daemon(**{**FORECAST, "train.lr": 1e6, "train.clip_norm": 1e6})
    admin = Admin(daemon.endpoints["control"])
    workload = PeriodicStreams(24, 2, seed=4)
    before = exported_tensors(admin, tmp_path / "before.safetensors")
    probe = np.full((1, 2), 0.25, np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
        first = producer.send(["probe-a"], probe)
        status = admin.train_now(wait=60)
        assert status["last_round"]["outcome"] in ("rejected", "diverged"), status["last_round"]
        assert status["model_version"] == 0 and status["outcomes"]["published"] == 0
        # A fresh stream gets exactly the prediction it got before the round.
        np.testing.assert_array_equal(producer.send(["probe-b"], probe), first)
    assert_same_tensors(exported_tensors(admin, tmp_path / "after.safetensors"), before)


def test_non_finite_loss_is_counted_as_diverged_and_never_published(make_daemon, tmp_path):
    daemon = make_daemon(**REGRESSION)
    admin = Admin(daemon.endpoints["control"])
    before = exported_tensors(admin, tmp_path / "before.safetensors")
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(16)]
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(40):
            # Finite targets whose squared error overflows float32: the loss turns Inf.
            producer.send(ids, rng.standard_normal((16, 3)), targets=np.full(16, 3e38, np.float32))
    status = admin.train_now(wait=60)
    assert status["last_round"]["outcome"] == "diverged", status["last_round"]
    assert status["model_version"] == 0
    assert daemon.metrics.registry.get_sample_value("lstmd_train_rounds_total", {"outcome": "diverged"}) == 1
    assert_same_tensors(exported_tensors(admin, tmp_path / "after.safetensors"), before)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_pause_resume_and_now(make_daemon):
    daemon = make_daemon(**{**FORECAST, "train.interval": 0.2, "train.steps": 2, "train.nice": 0})
    admin, trainer = Admin(daemon.endpoints["control"]), daemon.trainer
    gauge = lambda: daemon.metrics.registry.get_sample_value("lstmd_train_enabled")  # noqa: E731
    assert gauge() == 1
    workload = PeriodicStreams(8, 2, seed=5)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 20)
        for n in (1, 2):  # a scheduled round needs data recorded since the previous one
            assert trainer.wait_for_round(n, timeout=600), f"periodic round {n}"
            feed_periodic(producer, workload, 2)
        assert admin.train_pause() == {"paused": True}
        assert gauge() == 0
        version = admin.model_info()["version"]
        # A round that was running when we paused finishes (and is not published).
        wait_for(lambda: not trainer._running and not (trainer.last and trainer.last.pending), what="round end")
        settled = admin.train_status()["rounds"]
        feed_periodic(producer, workload, 4)  # new data: a round would be due, were it not paused
        time.sleep(0.8)
        paused = admin.train_status()
        assert paused["paused"] and paused["rounds"] == settled, "no rounds start while paused"
        assert paused["next_round"].startswith("paused")
        assert admin.model_info()["version"] == version, "no weights change while paused"
        # `train now` runs a round even while paused.
        number = admin.train_now()["round"]
        assert number == settled + 1 and trainer.wait_for_round(number, timeout=600)
        assert admin.train_resume() == {"paused": False}
        assert gauge() == 1
        for n in (settled + 2, settled + 3):
            feed_periodic(producer, workload, 2)
            assert trainer.wait_for_round(n, timeout=600), f"round {n} after resume"


def test_rollback_restores_earlier_weights_exactly(make_daemon, tmp_path):
    daemon = make_daemon(**FORECAST)
    admin = Admin(daemon.endpoints["control"])
    v0 = exported_tensors(admin, tmp_path / "v0.safetensors")
    other = ServingModel.initial(daemon.spec, seed=123)
    (tmp_path / "other.safetensors").write_bytes(other.to_bytes())
    assert admin.import_model(tmp_path / "other.safetensors")["version"] == 1
    workload = PeriodicStreams(24, 2, seed=6)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
    assert admin.train_now(wait=60)["model_version"] == 2
    v2 = exported_tensors(admin, tmp_path / "v2.safetensors")

    assert admin.rollback() == {"version": 3, "weights_of": 1, "previous": 2}  # default: the one before
    assert_same_tensors(exported_tensors(admin, tmp_path / "v3.safetensors"), dict(other.tensors))
    assert admin.rollback(0)["version"] == 4
    assert_same_tensors(exported_tensors(admin, tmp_path / "v4.safetensors"), v0)
    assert admin.rollback(2)["weights_of"] == 2
    assert_same_tensors(exported_tensors(admin, tmp_path / "v5.safetensors"), v2)
    # The normalisation statistics come back with the weights: predictions are the same as under version 2.
    restored = ServingModel.from_bytes((tmp_path / "v5.safetensors").read_bytes())
    assert restored.normalization.equal(
        ServingModel.from_bytes((tmp_path / "v2.safetensors").read_bytes()).normalization
    )
    with pytest.raises(DaemonError, match="version 99 is not kept"):
        admin.rollback(99)
    listing = admin.model_versions()
    assert [v["version"] for v in listing] == [5, 4, 3, 2, 1, 0]
    assert listing[0]["source"] == "rollback to 2"


def test_history_is_bounded(make_daemon, tmp_path):
    daemon = make_daemon(**{**FORECAST, "train.history": 3})
    admin = Admin(daemon.endpoints["control"])
    path = tmp_path / "m.safetensors"
    for seed in range(5):
        path.write_bytes(ServingModel.initial(daemon.spec, seed=seed).to_bytes())
        admin.import_model(path)
    assert [v["version"] for v in admin.model_versions()] == [5, 4, 3]
    with pytest.raises(DaemonError, match="not kept"):
        admin.rollback(1)


def recorded_row(daemon, stream) -> int:
    return int(daemon.recorder.row_of_slot[daemon.store.slot_of[stream]])


def test_delayed_targets_are_joined_to_their_events(make_daemon):
    daemon = make_daemon(**REGRESSION)
    rng = np.random.default_rng(1)
    with Producer(daemon.endpoints["events"]) as producer:
        for seq in range(10):
            producer.send(["a", "b"], rng.standard_normal((2, 3)), seqs=[seq, seq + 100])
        # An event that carries its target at once.
        producer.send(["a"], rng.standard_normal((1, 3)), targets=np.array([[7.5]], np.float32), seqs=[10])
        joined = producer.send_targets(
            ["a", "b", "a", "nobody", "b"], [3, 105, 99, 0, 7], np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
        )
    np.testing.assert_array_equal(joined, [True, True, False, False, False])
    rec = daemon.recorder
    a, b = recorded_row(daemon, "a"), recorded_row(daemon, "b")
    assert rec.y[a, 3, 0] == 1.0 and rec.y_ok[a, 3] and rec.seq[a, 3] == 3
    assert rec.y[b, 5, 0] == 2.0 and rec.y_ok[b, 5] and rec.seq[b, 5] == 105
    assert rec.y[a, 10, 0] == 7.5 and rec.y_ok[a, 10]
    assert rec.y_ok[a].sum() == 2 and rec.y_ok[b].sum() == 1
    status = Admin(daemon.endpoints["control"]).train_status()["recorder"]
    assert status["targets_joined"] == 2 and status["targets_unmatched"] == 3


def test_delayed_targets_without_training_are_answered_not_joined(make_daemon):
    daemon = make_daemon(**{"model.task": "regression"})
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a"], np.zeros((1, 8), np.float32), seqs=[0])
        assert not producer.send_targets(["a"], [0], np.array([1.0], np.float32)).any()
        with pytest.raises(Exception, match="target"):
            producer.send(["a"], np.zeros((1, 8), np.float32), targets=np.zeros((1, 3), np.float32))


def test_training_windows_start_from_the_state_the_stream_really_had(make_daemon):
    """Running lstm_sequence from a window's recorded (h0, c0) over its events reproduces the served predictions."""
    daemon = make_daemon(**{**REGRESSION, "model.num_layers": 2})
    rng = np.random.default_rng(2)
    ids = ["x", "y", "z"]
    served = {sid: [] for sid in ids}
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(37):  # not a whole number of windows
            subset = [sid for sid in ids if rng.random() < 0.8]
            if not subset:
                continue
            preds = producer.send(subset, rng.standard_normal((len(subset), 3)))
            for sid, p in zip(subset, preds, strict=True):
                served[sid].append(p)
    rec, model = daemon.recorder, daemon.engine.model
    checked = 0
    with rec.lock:
        rows, ws, _, _ = rec.available()
    for row, w in zip(rows.tolist(), ws.tolist(), strict=True):
        windows = rec._copy(np.array([row]), np.array([w]))
        y, _ = lstm_sequence(
            torch.from_numpy(windows.x), torch.from_numpy(windows.h0), torch.from_numpy(windows.c0), model.params
        )
        weight, bias = model.head
        preds = (y @ weight.t() + bias)[0].detach().numpy()
        sid = daemon.store.id_of[int(rec.slot_of_row[row])]
        count = int(rec.count[row])
        T = rec.x.shape[1]
        start = count - ((count - w * rec.k2) % T)  # absolute position of the window's first event
        np.testing.assert_allclose(preds, np.stack(served[sid][start : start + rec.k2]), rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked >= 6


def test_recorder_memory_stays_within_its_bound_with_many_streams(make_daemon):
    daemon = make_daemon(
        **{**FORECAST, "train.record_streams": 50, "train.record_steps": 16, "train.holdout_windows": 1,
           "state.capacity": 5000}  # fmt: skip
    )
    bound = daemon.recorder.nbytes
    rec = daemon.recorder
    # x, dx, scale, y; y_ok, seq; h0, c0 (2 windows); state_ok; count, generation, last_write, slot_of_row; row_of_slot
    expected = 50 * 16 * 8 * 4 + 50 * 16 * (1 + 8) + 2 * 50 * 2 * 1 * 8 * 4 + 50 * 2 + 50 * 8 * 4 + 5000 * 8
    assert bound == expected
    rng = np.random.default_rng(3)
    with Producer(daemon.endpoints["events"]) as producer:
        for start in range(0, 4000, 500):
            ids = [f"s{i}" for i in range(start, start + 500)]
            for _ in range(3):
                producer.send(ids, rng.standard_normal((500, 2)))
    assert len(daemon.store) == 4000
    assert rec.streams == 50 and rec.nbytes == bound
    assert sum(a.nbytes for a in vars(rec).values() if isinstance(a, np.ndarray)) == bound
    status = Admin(daemon.endpoints["control"]).train_status()["recorder"]
    assert status["streams"] == 50 and status["memory_bytes"] == bound


def test_recorder_gives_idle_rows_to_new_streams():
    now = [0.0]
    rec = Recorder(
        1, 4, 2, 2, "forecast", capacity=10, record_streams=2, record_steps=8, k2=4, idle_s=5.0, clock=lambda: now[0]
    )
    h = torch.zeros(1, 10, 4)

    def record(slots):
        slots = np.array(slots)
        rec.record(
            slots,
            np.ones((len(slots), 2), np.float32),
            np.zeros(len(slots), np.int64),
            None,
            np.ones(len(slots), bool),
            h,
            h,
        )

    record([0, 1, 2])  # two rows: slot 2 is not recorded
    assert sorted(rec.row_of_slot[:2].tolist()) == [0, 1] and rec.row_of_slot[2] == -1
    now[0] = 3.0
    record([1])
    now[0] = 6.0  # slot 0 idle for 6 s, slot 1 for 3 s
    record([2])
    assert rec.row_of_slot[2] >= 0 and rec.row_of_slot[0] == -1 and rec.row_of_slot[1] >= 0


def test_snapshot_tensors_round_trip(make_daemon):
    daemon = make_daemon(**FORECAST)
    admin = Admin(daemon.endpoints["control"])
    workload = PeriodicStreams(24, 2, seed=7)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
    admin.train_now(wait=60)
    fresh = make_daemon(**FORECAST)
    for part in ("recorder", "trainer"):
        saved = getattr(daemon, part).snapshot_tensors()
        assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in saved.values())
        getattr(fresh, part).restore_tensors(saved)
        again = getattr(fresh, part).snapshot_tensors()
        assert saved.keys() == again.keys()
        for name in saved:
            if name != "last_write":  # idle ages move with the clock
                assert torch.equal(saved[name], again[name]), name
    assert any(k.startswith("optimizer.") for k in daemon.trainer.snapshot_tensors())
    fresh.versions.restore_tensors(daemon.versions.snapshot_tensors(), daemon.spec)
    assert fresh.versions.listing(1) == daemon.versions.listing(1)
    for version in (0, 1):
        assert_same_tensors(fresh.versions.get(version).tensors, daemon.versions.get(version).tensors)


@pytest.mark.parametrize("inputs", ["change", "level"])
def test_forecast_model_file_carries_its_normalisation(inputs):
    """Loading the file into nn.LSTM + nn.Linear and applying the metadata's formula reproduces the daemon."""
    from lstmd.daemon.engine import Engine
    from lstmd.daemon.model import ModelSpec
    from lstmd.daemon.normalization import ForecastNormalization
    from lstmd.daemon.state_store import StateStore

    spec = ModelSpec(3, 5, 1, 3, "forecast")
    model = ServingModel.initial(spec, seed=0)
    stats = torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 1, 4]), torch.tensor([0.5, 0.1, 1])
    model.normalization = ForecastNormalization(*stats, inputs)
    loaded = ServingModel.from_bytes(model.to_bytes())
    assert loaded.normalization.equal(model.normalization)
    lstm, head = loaded.to_modules()
    x = torch.randn(1, 6, 3)
    norm = loaded.normalization
    dx = torch.cat([torch.zeros(1, 1, 3), x[:, 1:] - x[:, :-1]], dim=1)  # 0 at the stream's first event
    lstm_in = dx / norm.delta_scale if inputs == "change" else (x - norm.mean) / norm.std
    with torch.no_grad():
        y, _ = lstm(lstm_in)
        expected = x + norm.delta_scale * head(y)
    # The same through the serving path, one event at a time, for two streams interleaved.
    store = StateStore(1, 5, 4, torch.device("cpu"))
    engine = Engine(loaded, store, torch.device("cpu"), "torch")
    got = []
    for t in range(6):
        both = np.concatenate([x[0, t : t + 1].numpy(), np.ones((1, 3), np.float32) * t])
        got.append(engine.step(both, np.array([2, 0]), np.array([t == 0, t == 0]))[:1])
    np.testing.assert_allclose(np.concatenate(got), expected[0].numpy(), rtol=1e-4, atol=1e-5)


def test_forecast_targets_are_the_next_events_and_changes_are_recorded(make_daemon):
    daemon = make_daemon(**FORECAST)
    xs = np.arange(10, dtype=np.float32).reshape(5, 2) ** 2
    with Producer(daemon.endpoints["events"]) as producer:
        for x in xs:
            producer.send(["s", "other"], np.stack([x, -x]))
    rec = daemon.recorder
    row = recorded_row(daemon, "s")
    np.testing.assert_array_equal(rec.x[row, :5], xs)
    np.testing.assert_array_equal(rec.y[row, :4], xs[1:])
    assert rec.y_ok[row, :4].all() and not rec.y_ok[row, 4:].any()
    np.testing.assert_array_equal(rec.dx[row, :5], np.concatenate([np.zeros((1, 2)), np.diff(xs, axis=0)]))


def test_windows_changed_during_the_copy_are_replaced():
    """sample() copies without the lock; a row that starts over meanwhile must not leak torn windows."""
    rec = Recorder(1, 4, 1, 1, "forecast", capacity=4, record_streams=2, record_steps=8, k2=2)
    h = torch.zeros(1, 4, 4)
    for t in range(8):
        slots = np.array([0, 1])
        x = np.array([[0.0], [1.0]], np.float32) + 10 * t  # row of slot 0: even tens, slot 1: odd
        rec.record(slots, x, np.full(2, t), None, np.full(2, t == 0), h, h)
    original = rec._copy

    def copy_while_slot_0_restarts(rows, ws):
        rec.record(np.array([0]), np.array([[5.0]], np.float32), np.array([99]), None, np.array([True]), h, h)
        return original(rows, ws)

    rec._copy = copy_while_slot_0_restarts
    train, held = rec.sample(64, 16, np.random.default_rng(0))
    assert len(train) == 64 and len(held) == 1
    assert (train.x % 10 == 1).all() and (held.x % 10 == 1).all(), "only slot 1's windows survive"


def test_forecast_change_is_zero_when_the_previous_event_is_unknown():
    """A slot whose last event is not known (as after a restore without it) starts like a new stream."""
    from lstmd.daemon.engine import Engine
    from lstmd.daemon.model import ModelSpec
    from lstmd.daemon.state_store import StateStore

    spec = ModelSpec(2, 4, 1, 2, "forecast")
    model = ServingModel.initial(spec, seed=1)
    x = np.array([[3.0, -1.0]], np.float32)
    answers = []
    for fresh in (True, False):
        engine = Engine(model, StateStore(1, 4, 2, torch.device("cpu")), torch.device("cpu"), "torch")
        answers.append(engine.step(x, np.array([1]), np.array([fresh])))
        saved = engine.snapshot_tensors(torch.tensor([1]))
        np.testing.assert_array_equal(saved["last_x"].numpy(), x)
    np.testing.assert_array_equal(answers[0], answers[1])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_rounds_learn_from_targets_carried_by_events(make_daemon, task):
    """Labels (int64) or values (float32) in the events' targets frame train the model; bad labels are dropped."""
    classes = 3 if task == "classification" else 1
    daemon = make_daemon(**{**REGRESSION, "model.task": task, "model.output_size": classes})
    admin = Admin(daemon.endpoints["control"])
    rng = np.random.default_rng(4)
    ids = [f"s{i}" for i in range(24)]
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(40):
            x = rng.standard_normal((24, 3)).astype(np.float32)
            if task == "classification":
                labels = np.argmax(x, axis=1).astype(np.int64)  # learnable from the current event alone
                labels[0] = 7  # out of range: not recorded, not an error
                producer.send(ids, x, targets=labels)
            else:
                producer.send(ids, x, targets=(x[:, 0] - 2 * x[:, 1]).astype(np.float32))
    status = admin.train_now(wait=60)
    assert status["last_round"]["outcome"] == "published", status["last_round"]
    assert status["last_round"]["holdout_candidate"] < status["last_round"]["holdout_serving"]
    if task == "classification":  # stream s0 only ever had the out-of-range label
        assert not daemon.recorder.y_ok[recorded_row(daemon, "s0")].any()


def test_rounds_start_every_interval_events(make_daemon):
    daemon = make_daemon(**{**FORECAST, "train.interval_events": 240, "train.steps": 2})
    admin = Admin(daemon.endpoints["control"])
    workload = PeriodicStreams(24, 2, seed=9)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 9)  # 216 events: below the trigger
        time.sleep(0.3)
        assert admin.train_status()["rounds"] == 0
        feed_periodic(producer, workload, 1)  # 240
        wait_for(lambda: admin.train_status()["rounds"] == 1, what="a round after 240 events")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.k2=16", "train.record_steps=40"], "multiple of train.k2"),
        (["train.holdout_windows=4", "train.k2=32", "train.record_steps=128"], "holdout_windows + 1"),
        (["train.lr=0"], "train.lr must be positive"),
        (["train.nice=-5"], "train.nice must be >= 0"),
        (["train.optimizer=rmsprop"], "train.optimizer"),
    ],
)
def test_training_settings_are_validated(overrides, message):
    from lstmd.daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        load_config(overrides=overrides, environ={})


def test_recorder_restore_that_does_not_fit_changes_nothing(make_daemon):
    daemon = make_daemon(**FORECAST)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, PeriodicStreams(8, 2, seed=1), 10)
    saved = daemon.recorder.snapshot_tensors()
    before = {k: v.clone() for k, v in saved.items()}
    broken = dict(saved)
    broken["seq"] = saved["seq"][:-1]  # one array of the wrong shape, late in the list
    fresh = make_daemon(**FORECAST)
    untouched = fresh.recorder.snapshot_tensors()
    with pytest.raises(ValueError, match="recorder.seq in the snapshot has shape"):
        fresh.recorder.restore_tensors(broken)
    after = fresh.recorder.snapshot_tensors()
    for name in untouched:
        if name != "last_write":
            assert torch.equal(untouched[name], after[name]), name
    assert all(torch.equal(before[k], saved[k]) for k in saved)
