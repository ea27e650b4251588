"""`train.guard = false`: a "stream" forecast model served without the per-stream adaptation (scale and guard),
in the model's one scale per feature, as "change" inputs would be; what the switch is for is measuring what the
adaptation costs end to end (docs/benchmarks.md). Its replies, multi-step forecasts and untouched adaptation rows,
on the fused CPU step and the torch path, and the config refusing it where it cannot work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from lstmd.clients import Producer
from lstmd.daemon.config import ConfigError, load_config
from lstmd.daemon.engine import Engine
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import ForecastNormalization
from lstmd.daemon.state_store import StateStore

CPU = torch.device("cpu")
FORECAST = ["model.task=forecast", "model.input_size=3", "model.output_size=3"]


def engine(model: ServingModel, backend: str, guard: bool) -> Engine:
    store = StateStore(model.spec.num_layers, model.spec.hidden_size, 8, CPU)
    return Engine(model, store, CPU, backend, guard=guard)


@pytest.mark.parametrize("backend", ["auto", "torch"], ids=["fused-cpu-step", "torch"])
def test_without_the_guard_a_stream_model_is_served_in_its_one_scale(backend):
    """Replies equal those of the same weights with "change" inputs (last value + delta_scale * change, the LSTM
    seeing dx / delta_scale), and no stream's adaptation row is read or written."""
    spec = ModelSpec(3, 16, 1, 3, "forecast")
    norm = ForecastNormalization(torch.zeros(3), torch.ones(3), torch.tensor([0.5, 2.0, 30.0]), "stream")
    model = ServingModel.initial(spec, seed=3)
    stream = ServingModel(spec, model.tensors, normalization=norm)
    change = ServingModel(spec, model.tensors, normalization=dataclasses.replace(norm, inputs="change"))
    off, reference, on = engine(stream, backend, False), engine(change, backend, True), engine(stream, backend, True)
    rows = off.store.adaptation.clone()
    walk = np.cumsum(np.random.default_rng(0).standard_normal((40, 4, 3)), axis=0).astype(np.float32) * 10
    slots = np.array([5, 0, 7, 2])
    for t, x in enumerate(walk):
        fresh = np.full(4, t == 0)
        got = off.step(x, slots, fresh)
        np.testing.assert_array_equal(got, reference.step(x, slots, fresh))
        guarded = on.step(x, slots, fresh)
    torch.testing.assert_close(off.store.adaptation, rows, rtol=0, atol=0)
    assert not np.allclose(got, guarded), "with the guard (gain 0 at first: the last value) the replies differ"


def test_a_daemon_without_the_guard_serves_and_forecasts_in_the_models_scale(make_daemon):
    """End to end: the replies are the engine's without the guard, and a multi-step forecast's first step is the
    last reply (the rollout forms its inputs the same way)."""
    daemon = make_daemon(**{"model.task": "forecast", "model.input_size": 3, "model.output_size": 3,
                            "train.guard": False})  # fmt: skip
    assert daemon.engine.guard is False
    reference = engine(ServingModel.initial(daemon.engine.model.spec, daemon.config.model.seed), "auto", False)
    walk = np.cumsum(np.random.default_rng(1).standard_normal((12, 2, 3)), axis=0).astype(np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        for t, x in enumerate(walk):
            replies = producer.send(["a", "b"], x)
            np.testing.assert_allclose(replies, reference.step(x, np.array([0, 1]), np.full(2, t == 0)), rtol=1e-5,
                                       atol=1e-6)
        rollout = producer.forecast(["a", "b"], horizon=3)
    np.testing.assert_allclose(rollout[:, 0], replies, rtol=1e-5, atol=1e-6)
    assert np.isfinite(rollout).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.enabled=true"], r"training \(train.enabled = true\), the seasonal baseline \(train.season = 0\)"),
        (["train.season=12"], r"the seasonal baseline \(train.season = 12\)"),
        (["train.level_rate=0.2"], r"the level regressor \(train.level_rate = 0.2\) need"),
    ],
)
def test_the_config_refuses_the_guard_off_with_training_or_a_season(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[*FORECAST, "train.guard=false", *overrides], environ={})


def test_the_guard_is_on_by_default_and_can_be_switched_off_for_a_frozen_model():
    assert load_config(overrides=FORECAST, environ={}).train.guard is True
    assert load_config(overrides=[*FORECAST, "train.guard=false"], environ={}).train.guard is False
