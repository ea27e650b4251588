"""The guard's second baseline, seasonal naive (`train.season`, daemon/normalization.py): a periodic stream falls
back toward it and is never served worse than it, the ring it reads from is kept per slot, survives a snapshot and
the log's replay, reproduces in the model file's predictions and in multi-step forecasts, and the config refuses
what cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from lstmd.daemon.config import ConfigError, load_config, model_file_metadata
from lstmd.daemon.engine import Engine
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import AdaptationLayout, guard_coefficients, guard_summary, predict_file_sequence
from lstmd.daemon.state_store import StateStore
from typer.testing import CliRunner

CPU = torch.device("cpu")
SEASON = 12


def engine_for(model: ServingModel, season: int, capacity: int = 4) -> Engine:
    store = StateStore(model.spec.num_layers, model.spec.hidden_size, capacity, CPU)
    return Engine(model, store, CPU, "torch", season=season)


def run(engine: Engine, series: np.ndarray) -> np.ndarray:
    """Feed series [T, streams, I] (stream k at slot k) event by event; the forecasts [T, streams, O]."""
    slots = np.arange(series.shape[1])
    return np.stack([engine.step(x, slots, np.full(len(slots), t == 0)) for t, x in enumerate(series)])


def periodic(steps: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """A strongly periodic stream (period SEASON, a sharp weekly-like pattern) with a little noise: [steps]."""
    rng = np.random.default_rng(seed)
    pattern = rng.standard_normal(SEASON) * 3.0
    return (np.tile(pattern, steps // SEASON + 1)[:steps] + rng.standard_normal(steps) * noise).astype(np.float32)


def test_a_periodic_stream_is_served_no_worse_than_seasonal_naive():
    """An untrained model (no help) on a periodic stream: the guard moves to the seasonal-naive forecast, far
    better than the last value and never worse than seasonal naive on the held-out second half; a random walk
    beside it (no season to find) keeps the last value."""
    x = periodic(720, seed=1)
    walk = np.cumsum(np.random.default_rng(2).standard_normal(720)).astype(np.float32)
    series = np.stack([x, walk], axis=1)[:, :, None]
    model = ServingModel.initial(ModelSpec(1, 8, 1, 1, "forecast"), seed=0)
    engine = engine_for(model, SEASON)
    out = run(engine, series)[:, :, 0]
    held = slice(360, 719)  # forecasts made at t for t + 1, scored on the second half
    actual = series[361:720, :, 0]
    served = np.square(out[held] - actual).mean(0)
    last = np.square(series[360:719, :, 0] - actual).mean(0)
    seasonal = np.square(series[361 - SEASON : 720 - SEASON, :, 0] - actual).mean(0)
    assert served[0] <= 1.02 * seasonal[0], (served, seasonal)
    assert served[0] < 0.05 * last[0], (served, last)
    assert served[1] <= 1.02 * last[1], "no season in a random walk: the last value stays"
    g, a = guard_coefficients(engine.layout, engine.store.adaptation[:2])
    assert a[0, 0] > 0.9 and a[1, 0] < 0.5, a
    summary = guard_summary(engine.layout, engine.store.adaptation, torch.tensor([True, True, False, False]))
    assert summary["season"] == SEASON and summary["seasonal_streams"] == 1
    ratios = summary["error_vs_last_value"]
    # over both streams (a random walk's seasonal naive is far worse than its last value): below either baseline
    assert ratios["served"] < min(1.0, ratios["seasonal"]), ratios


def test_the_guard_keeps_a_model_that_beats_both_baselines():
    """Where the model's change is right, the guard serves it (not the seasonal naive): the coefficients are a
    least-squares choice, not a preference for a baseline."""
    layout = AdaptationLayout(1, 1, SEASON)
    row = layout.initial_row()
    f = layout.field
    # recent scored forecasts: the model's change m equals the target t, seasonal naive s is half right
    row[f("cross")], row[f("dd")], row[f("tt")] = 1.0, 1.0, 1.0
    row[f("cs")], row[f("ss")], row[f("ms")] = 0.5, 1.0, 0.5
    g, a = guard_coefficients(layout, row[None])
    assert float(g) == pytest.approx(1.0) and float(a) == pytest.approx(0.0)


def test_the_model_file_reproduces_the_daemon_with_a_season():
    model = ServingModel.initial(ModelSpec(2, 6, 1, 2, "forecast"), seed=7)
    loaded = ServingModel.from_bytes(model.to_bytes())
    series = np.stack([periodic(90, seed=3), 100 * periodic(90, seed=4)], axis=1)[:, None, :]  # [T, 1, 2]
    out = run(engine_for(loaded, 7), series)[:, 0]
    lstm, head = loaded.to_modules()
    metadata = model_file_metadata(model.to_bytes(), "test")
    expected = predict_file_sequence(lstm, head, metadata, torch.from_numpy(series[:, 0])[None], season=7)[0]
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-3)


def test_the_seasonal_ring_costs_what_the_docs_say():
    layout = AdaptationLayout(8, 8, 52)
    store = StateStore(1, 4, 10, CPU)
    store.enable_adaptation(layout.initial_row(), 52, 8)
    assert layout.ring_bytes() == 4 * 52 * 8
    assert store.seasonal.nbytes == 10 * layout.ring_bytes()
    none = StateStore(1, 4, 10, CPU)
    none.enable_adaptation(AdaptationLayout(8, 8).initial_row())
    assert none.seasonal is None


@pytest.mark.parametrize("snapshot_on_shutdown", [True, False], ids=["snapshot", "log-replay"])
def test_the_seasonal_ring_survives_a_restart(make_daemon, tmp_path, snapshot_on_shutdown):
    """Restored from a snapshot, or rebuilt by replaying the write-ahead log: the ring and the rows are exactly
    as before, and later answers equal those of a daemon that never stopped."""
    settings = {"model.task": "forecast", "model.input_size": 1, "model.output_size": 1, "train.season": 5,
                "durability.wal": True, "durability.snapshot_on_shutdown": snapshot_on_shutdown}  # fmt: skip
    series = np.stack([periodic(40, seed=s) for s in (5, 6, 7)], axis=1)[:, :, None]
    series[:, 2] *= 1000
    assert_state_survives_a_restart(make_daemon, tmp_path, settings, series,
                                    [lambda store: store.seasonal, lambda store: store.adaptation])


def assert_state_survives_a_restart(make_daemon, tmp_path, settings: dict, series: np.ndarray, tables) -> None:
    """Streams a, b, big get series[:27] on two daemons; one restarts (from its snapshot or its log, as `settings`
    say): each per-stream table `tables` names (store -> tensor) holds exactly what it held, and the answers to
    series[27:] and a 6-step forecast equal the uninterrupted daemon's (a rollout steps copies of the tables)."""
    uninterrupted = make_daemon(state_dir=tmp_path / "reference", **settings)
    restarted = make_daemon(state_dir=tmp_path / "state", **settings)
    ids = ["a", "b", "big"]
    for daemon in (uninterrupted, restarted):
        with Producer(daemon.endpoints["events"]) as producer:
            for x in series[:27]:
                producer.send(ids, x)
    slots = [restarted.store.slot_of[i] for i in ids]
    before = [table(restarted.store)[slots].clone() for table in tables]
    restarted.stop_and_join()
    restarted = make_daemon(state_dir=tmp_path / "state", **settings)
    slots = [restarted.store.slot_of[i] for i in ids]
    for table, kept in zip(tables, before, strict=True):
        torch.testing.assert_close(table(restarted.store)[slots], kept, rtol=0, atol=0)
    answers = []
    for daemon in (uninterrupted, restarted):
        with Producer(daemon.endpoints["events"]) as producer:
            answers.append(np.stack([producer.send(ids, x) for x in series[27:]]))
            answers.append(producer.forecast(ids, horizon=6))
    np.testing.assert_array_equal(answers[0], answers[2])
    np.testing.assert_array_equal(answers[1], answers[3])


def assert_rollout_equals_feeding_its_predictions(make_daemon, settings: dict, series: np.ndarray, table) -> None:
    """Step j of a one-stream rollout equals the reply to the predicted events 1..j-1 fed as real ones to a twin
    daemon that saw the same `series`, and the rollout leaves the per-stream state `table(daemon)` untouched (it
    steps copies exactly as the serving step steps the real one)."""
    twin, daemon = make_daemon(**settings), make_daemon(**settings)
    for d in (twin, daemon):
        with Producer(d.endpoints["events"]) as producer:
            for x in series[:, None, None]:
                producer.send(["s"], x)
    with Producer(daemon.endpoints["events"]) as producer:
        before = table(daemon).clone()
        rollout = producer.forecast(["s"], horizon=9)[0]
        torch.testing.assert_close(table(daemon), before, rtol=0, atol=0)
    with Producer(twin.endpoints["events"]) as producer:
        fed = [rollout[0]]
        for j in range(1, 9):
            fed.append(producer.send(["s"], rollout[j - 1][None])[0])
    np.testing.assert_allclose(np.stack(fed), rollout, rtol=1e-5, atol=1e-5)


def test_a_multi_step_forecast_with_a_season_equals_feeding_its_own_predictions(make_daemon):
    settings = {"model.task": "forecast", "model.input_size": 1, "model.output_size": 1, "train.season": 4}
    assert_rollout_equals_feeding_its_predictions(make_daemon, settings, periodic(30, seed=9),
                                                  lambda d: d.store.seasonal)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.task=forecast", "model.output_size=8", "train.season=1"], "train.season = 1 is the last value"),
        (["train.season=12"], "for model.task = forecast"),
        (["model.task=forecast", "model.output_size=8", "train.season=12", "train.forecast_inputs=change"],
         "train.forecast_inputs = stream"),
    ],
)
def test_the_config_refuses_a_season_that_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, environ={})


def test_a_season_is_accepted_for_a_forecast_model():
    config = load_config(overrides=["model.task=forecast", "model.output_size=8", "train.season=52"], environ={})
    assert config.train.season == 52


@pytest.mark.timeout(120)
def test_train_status_metrics_and_the_cli_report_the_seasonal_baseline(make_daemon):
    daemon = make_daemon(
        **{"model.task": "forecast", "model.input_size": 1, "model.output_size": 1, "train.enabled": True,
           "train.interval": 0, "train.season": SEASON}  # fmt: skip
    )
    series = np.stack([periodic(240, seed=s) for s in (10, 11)], axis=1)[:, :, None]
    with Producer(daemon.endpoints["events"]) as producer:
        for x in series:
            producer.send(["p", "q"], x)
    guard = Admin(daemon.endpoints["control"]).train_status()["guard"]
    assert guard["season"] == SEASON and guard["seasonal_streams"] == 2, guard
    assert guard["error_vs_last_value"]["seasonal"] < 0.1, "seasonal naive is far better on a periodic stream"
    assert guard["error_vs_last_value"]["served"] <= 1.02 * guard["error_vs_last_value"]["seasonal"], guard
    daemon.metrics.set_guard(daemon.guard_summary())
    registry = daemon.metrics.registry
    assert registry.get_sample_value("lstmd_forecast_seasonal_streams") == 2
    ratio = registry.get_sample_value("lstmd_forecast_error_ratio", {"forecast": "seasonal"})
    assert ratio == pytest.approx(guard["error_vs_last_value"]["seasonal"])
    table = CliRunner().invoke(app, ["train", "status", "--control", daemon.endpoints["control"]]).stdout
    assert "seasonal baseline" in table and f"lag {SEASON}: 2 streams lean on it" in table
