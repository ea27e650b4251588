"""Per-stream adaptation and the forecast guard (daemon/normalization.py): scales 1000x apart, a level shift, an
outlier burst, a model worse than the last value, snapshots of the per-stream state, and the file reproducing
the daemon."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from lstmd.daemon.config import model_file_metadata
from lstmd.daemon.engine import Engine
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import (
    CLIP,
    FALLBACK_GAIN,
    AdaptationLayout,
    gain,
    guard_summary,
    predict_file_sequence,
)
from lstmd.daemon.state_store import StateStore
from typer.testing import CliRunner

CPU = torch.device("cpu")


def field(engine: Engine, name: str) -> torch.Tensor:
    return engine.store.adaptation[:, engine.layout.field(name)]


def engine_for(model: ServingModel, capacity: int = 8) -> Engine:
    store = StateStore(model.spec.num_layers, model.spec.hidden_size, capacity, CPU)
    return Engine(model, store, CPU, "torch")


def run(engine: Engine, series: np.ndarray) -> np.ndarray:
    """Feed series [T, streams, I] (stream k at slot k) event by event; the forecasts [T, streams, O]."""
    slots = np.arange(series.shape[1])
    return np.stack([engine.step(x, slots, np.full(len(slots), t == 0)) for t, x in enumerate(series)])


def random_walk(steps: int, streams: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.standard_normal((steps, streams, 1)), axis=0).astype(np.float32)


def biased_model(bias: float) -> ServingModel:
    """A forecast model that always predicts a change of `bias` stream scales: right on a stream drifting up at
    about that rate, wrong on one drifting down or not at all."""
    spec = ModelSpec(1, 4, 1, 1, "forecast")
    model = ServingModel.initial(spec, seed=0)
    model.tensors["head.weight"].zero_()
    model.tensors["head.bias"].fill_(bias)
    return model


def test_a_stream_1000x_larger_gets_the_same_forecasts_in_its_own_units():
    """Per-stream scales: the shared model sees both streams alike, whatever their units."""
    small = random_walk(200, 1, seed=1)
    series = np.concatenate([small, 1000 * small], axis=1)
    out = run(engine_for(ServingModel.initial(ModelSpec(1, 8, 1, 1, "forecast"), seed=3)), series)
    np.testing.assert_allclose(out[:, 1], 1000 * out[:, 0], rtol=1e-4, atol=1e-3)
    # and the model is no constant in disguise: its forecasts differ from the last value
    assert np.abs(out[1:, 0] - series[1:, 0]).max() > 1e-3


def test_a_level_shift_does_not_blow_up_the_scale_or_the_inputs():
    rng = np.random.default_rng(2)
    x = np.cumsum(rng.standard_normal(300) * 0.1).astype(np.float32)
    x[150:] += 50.0  # 500 typical changes at once
    engine = engine_for(ServingModel.initial(ModelSpec(1, 8, 1, 1, "forecast"), seed=0))
    scales = []
    for t, v in enumerate(x):
        engine.step(np.array([[v]], np.float32), np.array([0]), np.array([t == 0]))
        scales.append(float(field(engine, "scale")[0, 0]))
    before, jump = scales[149], scales[150]
    assert 0.05 < before < 0.2
    assert jump < before * 1.5, "one jump moves the scale by a bounded step (SCALE_CLIP scales at most)"
    assert scales[-1] < 0.2, "and it forgets it"
    inputs = torch.clamp(torch.tensor(50.0) / jump, -CLIP, CLIP)
    assert inputs == CLIP, "the model sees the shift clipped at CLIP scales"


def test_an_outlier_burst_leaves_the_forecasts_near_the_last_value_afterwards():
    rng = np.random.default_rng(4)
    x = np.cumsum(rng.standard_normal(400) * 0.1).astype(np.float32)
    clean = x.copy()
    x[200:203] += np.array([30.0, -25.0, 40.0], np.float32)  # three wild events
    engine = engine_for(ServingModel.initial(ModelSpec(1, 8, 1, 1, "forecast"), seed=0))
    forecasts = run(engine, x[:, None, None])[:, 0, 0]
    after = slice(230, 399)
    model_err = np.abs(forecasts[after] - clean[231:400]).mean()
    last_err = np.abs(clean[230:399] - clean[231:400]).mean()
    assert model_err < 1.1 * last_err, (model_err, last_err)
    assert float(field(engine, "scale")[0, 0]) < 0.2


def test_the_guard_falls_back_to_the_last_value_where_the_model_is_worse():
    """One model, two streams: it helps on one (gain stays high), hurts on the other (gain -> 0, the last value
    is served there, counted as a fallback stream)."""
    rng = np.random.default_rng(5)
    t = np.arange(600, dtype=np.float32)
    up = 0.1 * t + rng.standard_normal(600).astype(np.float32) * 0.02  # drifts up by about one scale a step
    down = -0.1 * t + rng.standard_normal(600).astype(np.float32) * 0.02
    series = np.stack([up, down], axis=1)[:, :, None]
    engine = engine_for(biased_model(1.0))
    out = run(engine, series)[:, :, 0]
    g = gain(field(engine, "cross")[:2], field(engine, "dd")[:2])[:, 0]
    assert g[0] > 0.8 and g[1] < FALLBACK_GAIN, g
    late = slice(300, 599)
    err = np.abs(out[late] - series[301:600, :, 0]).mean(0)
    naive = np.abs(series[300:599, :, 0] - series[301:600, :, 0]).mean(0)
    assert err[0] < 0.5 * naive[0], "where the model helps it is used"
    assert err[1] <= 1.02 * naive[1], "where it hurts the last value is served"
    summary = guard_summary(engine.layout, engine.store.adaptation, torch.tensor([True, True] + [False] * 6))
    assert summary["streams"] == 2 and summary["fallback_streams"] == 1
    served, model = summary["error_vs_last_value"]["served"], summary["error_vs_last_value"]["model"]
    assert served < model, summary


def test_the_model_file_reproduces_the_daemon_with_the_guard():
    """predict_file_sequence runs the same per-stream scale and guard as the serving path."""
    model = ServingModel.initial(ModelSpec(2, 6, 1, 2, "forecast"), seed=7)
    loaded = ServingModel.from_bytes(model.to_bytes())
    assert loaded.normalization.inputs == "stream"
    series = np.concatenate([random_walk(80, 1, 8), 300 * random_walk(80, 1, 9)], axis=2)  # [T, 1, 2]
    out = run(engine_for(loaded), series)[:, 0]
    lstm, head = loaded.to_modules()
    metadata = model_file_metadata(model.to_bytes(), "test")
    expected = predict_file_sequence(lstm, head, metadata, torch.from_numpy(series[:, 0])[None])[0]
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-3)


def test_the_per_stream_state_survives_a_snapshot_and_a_restart(make_daemon, tmp_path):
    settings = {"model.task": "forecast", "model.input_size": 1, "model.output_size": 1, "durability.wal": True}
    series = np.concatenate([random_walk(40, 2, 11), 1000 * random_walk(40, 1, 12)], axis=1)
    uninterrupted = make_daemon(state_dir=tmp_path / "reference", **settings)
    restarted = make_daemon(state_dir=tmp_path / "state", **settings)
    ids = ["a", "b", "big"]
    for daemon in (uninterrupted, restarted):
        with Producer(daemon.endpoints["events"]) as producer:
            for x in series[:30]:
                producer.send(ids, x)
    Admin(restarted.endpoints["control"]).snapshot()
    before = restarted.store.adaptation.clone()
    restarted.stop_and_join()
    restarted = make_daemon(state_dir=tmp_path / "state", **settings)
    slots = [restarted.store.slot_of[i] for i in ids]
    torch.testing.assert_close(restarted.store.adaptation[slots], before[slots], rtol=0, atol=0)
    assert (before[slots, restarted.engine.layout.field("count")] == 30).all()
    answers = []
    for daemon in (uninterrupted, restarted):
        with Producer(daemon.endpoints["events"]) as producer:
            answers.append(np.stack([producer.send(ids, x) for x in series[30:]]))
    np.testing.assert_array_equal(answers[0], answers[1])


def test_a_state_store_snapshot_carries_the_adaptation_rows():
    initial = AdaptationLayout(2, 1).initial_row()
    store = StateStore(1, 4, 6, CPU)
    store.enable_adaptation(initial)
    admitted = store.admit(["x", "y"], max_new=2)
    slots = torch.from_numpy(np.asarray(admitted.slots))
    store.adaptation[slots] = torch.randn(2, initial.shape[0])
    saved = store.snapshot_tensors()
    other = StateStore(1, 4, 6, CPU)
    other.enable_adaptation(initial)
    other.restore_tensors(saved)
    torch.testing.assert_close(other.adaptation[slots], store.adaptation[slots], rtol=0, atol=0)
    older = {k: v for k, v in saved.items() if k != "adaptation"}
    other.restore_tensors(older)  # a snapshot from before: those streams start their adaptation over
    torch.testing.assert_close(other.adaptation[slots], initial.expand(2, -1))


@pytest.mark.timeout(120)
def test_train_status_and_metrics_report_the_guard(make_daemon):
    daemon = make_daemon(
        **{"model.task": "forecast", "model.input_size": 1, "model.output_size": 1, "train.enabled": True,
           "train.interval": 0, "train.k2": 8, "train.record_steps": 32, "train.min_windows": 1}  # fmt: skip
    )
    series = random_walk(40, 3, 13)
    with Producer(daemon.endpoints["events"]) as producer:
        for x in series:
            producer.send(["a", "b", "c"], x)
    admin = Admin(daemon.endpoints["control"])
    status = admin.train_now(wait=60)
    guard = status["guard"]
    assert guard["streams"] == 3 and 0 <= guard["fallback_streams"] <= 3
    # the level regressor is on by default for these models (train.level_rate = 0.1)
    assert set(guard["error_vs_last_value"]) == {"served", "model", "level"} and guard["level_rate"] == 0.1
    last = status["last_round"]
    if last["outcome"] != "skipped":
        assert last["holdout_baseline"] is not None and last["holdout_baseline"] > 0
    daemon.metrics.set_guard(daemon.guard_summary())
    registry = daemon.metrics.registry
    assert registry.get_sample_value("lstmd_forecast_fallback_streams") == guard["fallback_streams"]
    assert registry.get_sample_value("lstmd_forecast_error_ratio", {"forecast": "served"}) is not None
    table = CliRunner().invoke(app, ["train", "status", "--control", daemon.endpoints["control"]]).stdout
    assert "guard" in table and "served the last value" in table


def test_onnx_export_refuses_a_stream_scaled_forecast_model():
    pytest.importorskip("onnx")
    from lstmd.daemon.onnx_export import OnnxExportError, to_onnx

    model = ServingModel.initial(ModelSpec(2, 4, 1, 2, "forecast"), seed=0)
    with pytest.raises(OnnxExportError, match="per-stream state is not part of an ONNX graph"):
        to_onnx(model)
