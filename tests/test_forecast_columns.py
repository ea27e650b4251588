"""Forecasts of chosen feature columns (`model.forecast_columns`) over real sockets: validation, targets, serving,
training, and the exported model file (weights + metadata) reproducing the daemon's predictions."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from lstmd.clients import Admin, DaemonError, Producer
from lstmd.clients.workloads import PeriodicStreams
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import predict_file_sequence

from tests.test_train import TINY, feed_periodic, recorded_row

# Three features per event; the model forecasts only the last one.
COLUMNS = {
    **TINY,
    "model.task": "forecast",
    "model.input_size": 3,
    "model.output_size": 1,
    "model.forecast_columns": [2],
}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.forecast_columns=[3]"], r"model.forecast_columns \[3\]: \[3\] out of range for model.input_size 3"),
        (["model.forecast_columns=[-1]"], "out of range"),
        (["model.forecast_columns=[1, 1]", "model.output_size=2"], "names a column twice"),
        (["model.forecast_columns=[0, 2]"], r"model.output_size \(1\) must equal the number of model.forecast_columns"),
        (["model.forecast_columns=[]"], r"model.output_size \(1\) must equal model.input_size \(3\)"),
        (["model.task=regression"], "model.forecast_columns is for model.task = forecast only"),
    ],
)
def test_forecast_columns_are_validated(overrides, message):
    from lstmd.daemon.config import ConfigError, load_config

    base = ["model.task=forecast", "model.input_size=3", "model.output_size=1", "model.forecast_columns=[2]"]
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=base + overrides, environ={})


def test_forecast_columns_from_the_environment_and_in_the_spec():
    from lstmd.daemon.config import load_config

    environ = {
        "LSTMD_MODEL__TASK": "forecast",
        "LSTMD_MODEL__INPUT_SIZE": "4",
        "LSTMD_MODEL__OUTPUT_SIZE": "2",
        "LSTMD_MODEL__FORECAST_COLUMNS": "[3, 0]",
    }
    assert load_config(environ=environ).model.forecast_columns == [3, 0]
    spec = ModelSpec(4, 8, 1, 2, "forecast", (3, 0))
    assert spec.to_metadata()["forecast_columns"] == "[3, 0]"
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec
    # Every column in order is the default; a file written before the key existed means all columns.
    everything = ModelSpec(3, 8, 1, 3, "forecast", (0, 1, 2))
    assert everything == ModelSpec(3, 8, 1, 3, "forecast")
    old = {k: v for k, v in everything.to_metadata().items() if k != "forecast_columns"}
    assert ModelSpec.from_metadata(old) == everything
    with pytest.raises(ValueError, match="names 1 columns, but output_size is 2"):
        ModelSpec.from_metadata(spec.to_metadata() | {"forecast_columns": "[1]"})


def with_zero_head(model: ServingModel) -> ServingModel:
    tensors = dict(model.tensors) | {"head.weight": torch.zeros_like(model.tensors["head.weight"])}
    tensors["head.bias"] = torch.zeros_like(model.tensors["head.bias"])
    return ServingModel(model.spec, tensors, 0, model.normalization)


def test_a_model_that_predicts_no_change_answers_the_last_value_of_the_columns(make_daemon, tmp_path):
    """Head output 0 (what an untrained model's is near): every prediction is exactly the event's column 2 (without
    the guard's level regressor, which would mix in the pull toward the stream's level), and the recorder's targets
    are the next event's column 2."""
    daemon = make_daemon(**COLUMNS, **{"train.level_rate": 0.0})
    admin = Admin(daemon.endpoints["control"])
    assert admin.model_info()["forecast_columns"] == [2]
    path = tmp_path / "zero.safetensors"
    path.write_bytes(with_zero_head(daemon.engine.model).to_bytes())
    assert admin.import_model(path)["version"] == 1
    rng = np.random.default_rng(0)
    xs = (rng.standard_normal((6, 2, 3)) * 10 + 100).astype(np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        for x in xs:
            preds = producer.send(["a", "b"], x)
            assert preds.shape == (2, 1)
            np.testing.assert_array_equal(preds, x[:, [2]])
    rec = daemon.recorder
    assert rec.y.shape[2] == 1
    row = recorded_row(daemon, "a")
    np.testing.assert_array_equal(rec.y[row, :5], xs[1:, 0, [2]])
    assert rec.y_ok[row, :5].all() and not rec.y_ok[row, 5:].any()
    np.testing.assert_array_equal(rec.dx[row, 1:6], np.diff(xs[:, 0], axis=0))  # the LSTM sees every feature


def test_training_publishes_and_the_model_file_reproduces_the_daemon(make_daemon, tmp_path):
    # The global-scale "change" inputs, whose formula is checked by hand below (tests/test_learning.py checks the
    # per-stream "stream" inputs, the default, against the file).
    daemon = make_daemon(**COLUMNS, **{"train.forecast_inputs": "change"})
    admin = Admin(daemon.endpoints["control"])
    workload = PeriodicStreams(24, 3, seed=11)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
        status = admin.train_now(wait=60)
        last = status["last_round"]
        assert last["outcome"] == "published", last
        assert last["holdout_candidate"] < last["holdout_serving"], "the loss falls on a learnable series"
        assert status["model_version"] == 1
        # New streams (zero state, first event known): what the daemon answers under version 1.
        fresh = PeriodicStreams(4, 3, seed=12)
        events = np.stack([fresh.next() for _ in range(12)], axis=1)  # [B, T, I]
        served = np.stack(
            [producer.send([f"new{i}" for i in range(4)], events[:, t]) for t in range(events.shape[1])], axis=1
        )
    assert served.shape == (4, 12, 1)

    path = tmp_path / "v1.safetensors"
    admin.export_model(path)
    # The file: tensor names exactly nn.LSTM's + head.*, and metadata naming the columns and the normalisation.
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["forecast_columns"] == "[2]" and "forecast_normalization" in metadata
    lstm = torch.nn.LSTM(int(metadata["input_size"]), int(metadata["hidden_size"]), batch_first=True)
    head = torch.nn.Linear(int(metadata["hidden_size"]), int(metadata["output_size"]))
    lstm.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("head.")})
    head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
    expected = predict_file_sequence(lstm, head, metadata, torch.from_numpy(events))
    np.testing.assert_allclose(served, expected.numpy(), rtol=1e-4, atol=1e-4)
    # The same by hand: the LSTM sees every feature's scaled change, the head the change of column 2.
    from lstmd.daemon.normalization import ForecastNormalization

    norm = ForecastNormalization.from_json(metadata["forecast_normalization"])
    x = torch.from_numpy(events)
    dx = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
    with torch.no_grad():
        y, _ = lstm(dx / norm.delta_scale if norm.inputs == "change" else (x - norm.mean) / norm.std)
        by_hand = x[..., [2]] + norm.delta_scale[[2]] * head(y)
    np.testing.assert_allclose(served, by_hand.numpy(), rtol=1e-4, atol=1e-4)


def other_columns_file(tmp_path) -> str:
    path = tmp_path / "columns-1.safetensors"
    path.write_bytes(ServingModel.initial(ModelSpec(3, 8, 1, 1, "forecast", (1,)), seed=0).to_bytes())
    return str(path)


def test_a_model_file_with_other_columns_is_refused_at_start(make_daemon, tmp_path):
    from lstmd.daemon.config import ConfigError

    # Refused as the configuration is read: the file defines the model, and the config sets other columns.
    with pytest.raises(ConfigError, match=r"forecast_columns \[1\] where model.forecast_columns = \[2\]"):
        make_daemon(**{**COLUMNS, "model.path": other_columns_file(tmp_path)})


def test_a_model_file_with_other_columns_is_refused_on_import(make_daemon, tmp_path):
    daemon = make_daemon(**COLUMNS)
    admin = Admin(daemon.endpoints["control"])
    with pytest.raises(DaemonError, match=r"forecasts feature columns \[1\], but model.forecast_columns says \[2\]"):
        admin.import_model(other_columns_file(tmp_path))
    assert admin.model_info()["version"] == 0
