"""Multi-step forecasts (daemon/forecast.py) on real daemons: the rollout equals a reference nn.LSTM + head rollout
on copies of the streams' state, step 1 is the last reply's prediction, nothing of the streams changes, refusals
say what was wrong; `Admin.forecast` and `lstmd forecast` over real sockets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, DaemonError, Producer, protocol
from lstmd.clients.cli import app
from lstmd.clients.producer import RejectedError
from lstmd.daemon.model import ServingModel
from lstmd.daemon.normalization import ForecastNormalization
from typer.testing import CliRunner

# Three features; the model forecasts columns 2 and 0; no training (the weights stay what the test imports).
SPEC = {
    "model.task": "forecast",
    "model.input_size": 3,
    "model.output_size": 2,
    "model.forecast_columns": [2, 0],
    "model.hidden_size": 8,
    "model.num_layers": 2,
}
STREAMS = ["a", "b", 7]


def serve_random_model(daemon, tmp_path) -> ServingModel:
    """Random weights and a non-trivial normalisation, imported through the control socket."""
    g = torch.Generator().manual_seed(3)
    base = daemon.engine.model
    tensors = {k: torch.randn(v.shape, generator=g) * 0.4 for k, v in base.tensors.items()}
    # "change" inputs: the reference below forms them by hand (the per-stream "stream" inputs are checked
    # against a twin daemon in test_stream_inputs_rollout_is_what_the_daemon_answers_to_those_events).
    norm = ForecastNormalization(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 0.5, 1.5]),
                                 torch.tensor([0.3, 1.7, 0.8]), "change")
    model = ServingModel(base.spec, tensors, 0, norm)
    path = tmp_path / "random.safetensors"
    path.write_bytes(model.to_bytes())
    Admin(daemon.endpoints["control"]).import_model(path)
    return model


def feed(daemon, ticks: int = 5) -> np.ndarray:
    rng = np.random.default_rng(1)
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(ticks):
            last = producer.send(STREAMS, rng.normal(size=(len(STREAMS), 3)).astype(np.float32) * 3)
    return last


def reference(model: ServingModel, info: dict, horizon: int, exog: np.ndarray | None) -> np.ndarray:
    """One stream, by hand: nn.LSTM + nn.Linear from the model's tensors, the state and last event of `info`."""
    spec, norm = model.spec, model.normalization
    lstm = torch.nn.LSTM(spec.input_size, spec.hidden_size, spec.num_layers, batch_first=True)
    lstm.load_state_dict({k: v for k, v in model.tensors.items() if not k.startswith("head.")})
    head = torch.nn.Linear(spec.hidden_size, spec.output_size)
    head.load_state_dict({"weight": model.tensors["head.weight"], "bias": model.tensors["head.bias"]})
    cols = list(spec.forecast_columns)
    h, c = torch.tensor(info["h"])[:, None], torch.tensor(info["c"])[:, None]  # [L, 1, H]
    x = torch.tensor(info["last_x"])
    with torch.no_grad():
        out = [x[cols] + norm.delta_scale[cols] * head(h[-1, 0])]
        for j in range(1, horizon):
            event = (x if exog is None else torch.from_numpy(exog[j - 1])).clone()
            event[cols] = out[-1]
            _, (h, c) = lstm(((event - x) / norm.delta_scale)[None, None], (h, c))
            x = event
            out.append(x[cols] + norm.delta_scale[cols] * head(h[-1, 0]))
    return torch.stack(out).numpy()


def streams_state(daemon) -> dict:
    store, rec = daemon.store, daemon.recorder
    state = {
        "h": store.h.clone(), "c": store.c.clone(), "last_x": daemon.engine.stream_state.rows.clone(),
        "last_seq": store.last_seq.copy(), "events": store.events_applied.copy(),
        "needs_reset": store.needs_reset.copy(),
        "resend_key": store.resend_key.copy(), "resend_out": store.resend_out.copy(),
        "last_used": store.last_used.copy(), "slot_of": dict(store.slot_of),
    }
    if rec is not None:
        state |= {f"rec.{k}": v.copy() for k, v in vars(rec).items() if isinstance(v, np.ndarray)}
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]) or (value.isnan() == after[name].isnan()).all() and torch.equal(
                value.nan_to_num(), after[name].nan_to_num()), name
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, after[name], err_msg=name)
        else:
            assert value == after[name], name


@pytest.mark.parametrize("with_exog", [False, True])
def test_rollouts_equal_a_reference_rollout_and_change_nothing(make_daemon, tmp_path, with_exog):
    daemon = make_daemon(**SPEC, **{"train.enabled": True, "train.interval": 0.0, "serve.resend_window": 4})
    model = serve_random_model(daemon, tmp_path)
    last_reply = feed(daemon)
    admin = Admin(daemon.endpoints["control"])
    infos = [admin.stream(s) for s in STREAMS]
    rng = np.random.default_rng(2)
    for k in (1, 7, 24):
        exog = rng.normal(size=(len(STREAMS), k, 3)).astype(np.float32) if with_exog else None
        before = streams_state(daemon)
        args = {} if exog is None else {"exog": exog.ravel().tolist()}
        result = admin.call("forecast", streams=STREAMS, horizon=k, **args)
        assert_same_state(before, streams_state(daemon))
        assert result["errors"] == {} and result["horizon"] == k
        got = np.array(result["forecasts"], dtype=np.float32)
        assert got.shape == (len(STREAMS), k, 2)
        # Step 1 is the last reply's prediction (the same head on the same state; the serving step may sum in
        # another order, hence the tolerance of a float32 rounding or two).
        np.testing.assert_allclose(got[:, 0], last_reply, rtol=1e-5, atol=1e-5)
        for i, info in enumerate(infos):
            expected = reference(model, info, k, None if exog is None else exog[i])
            np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-4)
    # The streams then go on exactly as if no forecast had been asked: replies still continue their own state.
    assert [admin.stream(s)["last_seq"] for s in STREAMS] == [info["last_seq"] for info in infos]


def test_admin_forecast_and_refusals(make_daemon, tmp_path):
    daemon = make_daemon(**SPEC)
    serve_random_model(daemon, tmp_path)
    feed(daemon, 2)
    admin = Admin(daemon.endpoints["control"])
    rows = admin.forecast("a", 5)
    assert np.array(rows).shape == (5, 2)
    assert admin.forecast("7", 2) == admin.call("forecast", streams=[7], horizon=2)["forecasts"][0]  # digits find 7
    with pytest.raises(DaemonError, match="no stream 'nope' holds state"):
        admin.forecast("nope", 3)
    mixed = admin.call("forecast", streams=["a", "nope"], horizon=3)
    assert mixed["forecasts"][1] is None and mixed["errors"] == {"1": "no stream 'nope' holds state"}
    assert mixed["forecasts"][0] == rows[:3]
    for horizon in (0, 1025):
        with pytest.raises(DaemonError, match="horizon"):
            admin.forecast("a", horizon)
    wrong_shape = r"exog must hold streams x horizon x input_size = 1 x 2 x 3 = 6 values, got 5"
    with pytest.raises(DaemonError, match=wrong_shape):
        admin.call("forecast", streams=["a"], horizon=2, exog=[0.0] * 5)
    with pytest.raises(DaemonError, match="exog holds NaN or Inf"):
        admin.call("forecast", streams=["a"], horizon=2, exog=[float("nan")] * 6)
    admin.reset("a")
    with pytest.raises(DaemonError, match="stream 'a' was reset"):
        admin.forecast("a", 3)


def test_a_forecast_larger_than_a_message_is_refused(make_daemon, tmp_path):
    daemon = make_daemon(**SPEC, **{"serve.max_message_bytes": 4096})
    serve_random_model(daemon, tmp_path)
    feed(daemon, 1)
    with pytest.raises(DaemonError, match=r"a forecast of 1 streams x 600 steps x 2 outputs is 4800 bytes, over "
                       r"serve.max_message_bytes = 4096: ask for fewer streams or a shorter horizon"):
        Admin(daemon.endpoints["control"]).forecast("a", 600)
    with Producer(daemon.endpoints["events"]) as producer:
        with pytest.raises(RejectedError, match=r"forecast refused \(bad_forecast\): a forecast of 3 streams x 200"):
            producer.forecast(STREAMS, 200)
        assert producer.forecast(STREAMS, 100).shape == (3, 100, 2)


def test_models_that_are_not_forecasts_refuse(make_daemon):
    daemon = make_daemon(**{"model.task": "regression", "model.input_size": 2, "model.output_size": 1})
    refusal = "forecasts need a model with task = forecast; the serving model's task is 'regression'"
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a"], np.zeros((1, 2), np.float32))
        with pytest.raises(RejectedError, match=rf"forecast refused \(not_forecast\): {refusal}"):
            producer.forecast(["a"], 3)
    with pytest.raises(DaemonError, match=refusal):
        Admin(daemon.endpoints["control"]).forecast("a", 3)


def test_cli_forecast(make_daemon, tmp_path):
    daemon = make_daemon(**SPEC)
    serve_random_model(daemon, tmp_path)
    feed(daemon, 2)
    control = daemon.endpoints["control"]
    expected = Admin(control).forecast("b", 4)
    runner = CliRunner()
    result = runner.invoke(app, ["forecast", "b", "--horizon", "4", "--control", control, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"stream": "b", "horizon": 4, "forecast": expected}
    table = runner.invoke(app, ["forecast", "b", "-k", "4", "--control", control])
    assert table.exit_code == 0, table.output
    assert "forecast of stream b" in table.output and "output 1:" in table.output
    missing = runner.invoke(app, ["forecast", "zz", "--control", control])
    assert missing.exit_code == 1 and "no stream 'zz' holds state" in missing.output
    # One real process, as a script would run it.
    proc = subprocess.run(
        [sys.executable, "-m", "lstmd.clients.cli", "forecast", "b", "--horizon", "4", "--control", control, "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["forecast"] == expected


def test_producer_forecast_over_the_events_socket(make_daemon, tmp_path):
    """The wire request (header kind "forecast"): the same numbers as the control command, exog included, state
    untouched, per-stream and whole-message refusals."""
    daemon = make_daemon(**SPEC, **{"train.enabled": True, "train.interval": 0.0})
    serve_random_model(daemon, tmp_path)
    last_reply = feed(daemon)
    admin = Admin(daemon.endpoints["control"])
    exog = np.random.default_rng(5).normal(size=(len(STREAMS), 7, 3)).astype(np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        before = streams_state(daemon)
        plain = producer.forecast(STREAMS, 7)
        given = producer.forecast(STREAMS, 7, exog=exog)
        assert_same_state(before, streams_state(daemon))
        assert plain.shape == given.shape == (3, 7, 2)
        np.testing.assert_allclose(plain[:, 0], last_reply, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(plain, admin.call("forecast", streams=STREAMS, horizon=7)["forecasts"])
        by_control = admin.call("forecast", streams=STREAMS, horizon=7, exog=exog.ravel().tolist())["forecasts"]
        np.testing.assert_array_equal(given, np.array(by_control, dtype=np.float32))
        assert not np.array_equal(plain[:, 1:], given[:, 1:])  # the known features did change the rollout
        with pytest.raises(RejectedError, match=r"1 of 2 streams cannot be forecast: stream #1 \(stream 'x'\): no "):
            producer.forecast(["a", "x"], 3)
        with pytest.raises(RejectedError, match=r"forecast refused \(bad_horizon\): horizon must be in 1..1024"):
            producer.forecast(["a"], 2000)
        with pytest.raises(RejectedError, match=r"\(bad_shape\): events have 2 features, the model's input_size is 3"):
            producer.forecast(["a"], 2, exog=np.zeros((1, 2, 2)))
        with pytest.raises(ValueError, match=r"exog must have shape \[streams, horizon, input_size\] = \[1, 2, 3\]"):
            producer.forecast(["a"], 2, exog=np.zeros((1, 3, 3)))
        with pytest.raises(RejectedError, match=r"forecast refused \(bad_exog\): exog holds NaN or Inf"):
            producer.forecast(["a"], 2, exog=np.full((1, 2, 3), np.inf))
        # The events path goes on as before: the next reply continues the untouched state.
        assert producer.send(["a"], np.zeros((1, 3), np.float32)).shape == (1, 2)
    assert admin.stream("a")["last_seq"] == before["last_seq"][daemon.store.slot_of["a"]] + 1


@pytest.mark.parametrize(
    ("frames", "reason", "message"),
    [
        (lambda: protocol.encode_forecast(1, ["a"], 3, 2)[:1], "malformed", "expected 2 or 3 frames"),
        (lambda: [*protocol.encode_forecast(1, ["a"], 3, 2), b""], "malformed", "a forecast message has 2 frames"),
        (lambda: protocol.encode_forecast(1, ["a"], 0, 2), "bad_horizon", r"horizon must be in 1..1024, got 0"),
        (lambda: protocol.encode_forecast(1, ["a"], 1025, 2), "bad_horizon", "got 1025"),
        (lambda: protocol.encode_forecast(1, [], 3, 2), "bad_shape", "names no stream"),
        (lambda: [protocol.encode_forecast(1, ["a"], 3, 2)[0], b"\0" * 20], "bad_shape",
         r"exog frame holds 5 float32 values, expected 1 events x 6"),
    ],
)
def test_forecast_requests_decode_totally(frames, reason, message):
    with pytest.raises(protocol.ProtocolError, match=message) as caught:
        protocol.decode_events(frames())
    assert caught.value.reason == reason
    header, exog, targets = protocol.decode_events(protocol.encode_forecast(1, ["a", 2], 3, 2, np.ones((2, 3, 2))))
    assert header.kind == "forecast" and header.horizon == 3 and exog.shape == (2, 3, 2) and targets is None


def test_stream_inputs_rollout_is_what_the_daemon_answers_to_those_events(make_daemon):
    """The default "stream" inputs (per-stream scale and guard): step j of a forecast equals the reply a twin
    daemon gives when the predicted events 1..j-1 are sent to it as real events (the contract's definition)."""
    settings = {**SPEC, "train.forecast_inputs": "stream"}
    daemon, twin = make_daemon(**settings), make_daemon(**settings)
    assert daemon.engine.model.normalization.inputs == "stream"
    feed(daemon, ticks=6)
    last = feed(twin, ticks=6)
    horizon = 5
    got = np.asarray(Admin(daemon.endpoints["control"]).forecast("a", horizon), dtype=np.float32)
    np.testing.assert_allclose(got[0], last[0], rtol=1e-5, atol=1e-5)  # step 1: the last reply
    event = np.asarray(Admin(twin.endpoints["control"]).stream("a")["last_x"], dtype=np.float32)
    with Producer(twin.endpoints["events"]) as producer:
        for j in range(1, horizon):
            event[[2, 0]] = got[j - 1]  # the predicted event: forecast columns replaced, the rest held
            reply = producer.send(["a"], event[None].astype(np.float32))
            np.testing.assert_allclose(got[j], reply[0], rtol=1e-4, atol=1e-5, err_msg=f"step {j + 1}")
