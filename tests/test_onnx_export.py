"""ONNX export (daemon/onnx_export.py) and stream state export: `lstmd model export --format onnx` and
`lstmd streams show ID --state-out FILE`, run in onnxruntime from the exported state, answer the daemon's next
events as the daemon does, and leave the state the daemon holds after them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from lstmd.clients import Producer
from lstmd.clients.cli import app
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import ForecastNormalization
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("task", "layers", "inputs", "outputs"), [("regression", 2, 5, 3), ("classification", 3, 4, 5)]
)
def test_onnx_graph_continues_streams_from_their_exported_state(make_daemon, tmp_path, task, layers, inputs, outputs):
    daemon = make_daemon(**{
        "model.task": task, "model.num_layers": layers, "model.input_size": inputs, "model.output_size": outputs,
        "model.hidden_size": 11, "model.seed": 7,
    })
    control = ["--control", daemon.endpoints["control"]]
    ids = ["a", 9]
    rng = np.random.default_rng(1)
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(7):  # a history, so the state is not zero
            producer.send(ids, rng.standard_normal((2, inputs)).astype(np.float32))

        states = []
        for stream in ids:
            path = tmp_path / f"state-{stream}.safetensors"
            assert invoke("streams", "show", str(stream), "--state-out", str(path), *control).exit_code == 0
            states.append(load_file(path))
            with safe_open(path, "np") as f:
                assert f.metadata() == {"stream": str(stream), "last_seq": "6", "events": "7"}  # seqs from 0
        assert states[0]["h"].shape == (layers, 11) and states[0]["h"].dtype == np.float32

        graph = tmp_path / "model.onnx"
        exported = invoke("model", "export", str(graph), "--format", "onnx", *control)
        assert exported.exit_code == 0 and "(onnx)" in exported.stdout
        proto = onnx.load(graph)
        assert proto.opset_import[0].version >= 17
        assert [i.name for i in proto.graph.input] == ["x", "h0", "c0"]
        assert [o.name for o in proto.graph.output] == ["y", "hn", "cn"]

        following = rng.standard_normal((2, 6, inputs)).astype(np.float32)
        replies = np.stack([producer.send(ids, np.ascontiguousarray(following[:, t])) for t in range(6)], axis=1)

    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    h0 = np.stack([s["h"] for s in states], axis=1)  # [L, H] per stream -> [L, B, H]
    c0 = np.stack([s["c"] for s in states], axis=1)
    y, hn, cn = session.run(None, {"x": following, "h0": h0, "c0": c0})
    np.testing.assert_allclose(y, replies, rtol=0, atol=1e-5)
    for b, stream in enumerate(ids):
        after = json.loads(invoke("streams", "show", str(stream), "--json", *control).stdout)
        np.testing.assert_allclose(hn[:, b], np.array(after["h"], np.float32), rtol=0, atol=1e-5)
        np.testing.assert_allclose(cn[:, b], np.array(after["c"], np.float32), rtol=0, atol=1e-5)
    if task == "classification":
        np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("inputs", ["change", "level"])
def test_forecast_graph_normalises_as_the_daemon_does(make_daemon, tmp_path, inputs):
    """A forecast model with real normalisation statistics and chosen columns: the graph, fed each stream's
    exported state and last event (x_prev; NaN for a reset stream), answers the daemon's next replies."""
    spec = ModelSpec(3, 11, 2, 2, "forecast", (0, 2))
    model = ServingModel.initial(spec, seed=5)
    gen = torch.Generator().manual_seed(2)
    model.normalization = ForecastNormalization(
        torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5, torch.rand(3, generator=gen) + 0.2, inputs
    )
    path = tmp_path / "forecast.safetensors"
    path.write_bytes(model.to_bytes())
    daemon = make_daemon(**{
        "model.task": "forecast", "model.input_size": 3, "model.output_size": 2, "model.forecast_columns": [0, 2],
        "model.hidden_size": 11, "model.num_layers": 2, "model.path": str(path),
    })
    control = ["--control", daemon.endpoints["control"]]
    ids = ["a", 9]
    rng = np.random.default_rng(3)
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(5):
            producer.send(ids, rng.standard_normal((2, 3)).astype(np.float32))
        assert invoke("streams", "reset", "9", *control).exit_code == 0  # its next event starts afresh
        states = []
        for stream in ids:
            out = tmp_path / f"state-{stream}.safetensors"
            assert invoke("streams", "show", str(stream), "--state-out", str(out), *control).exit_code == 0
            states.append(load_file(out))
        assert np.isfinite(states[0]["x_prev"]).all() and np.isnan(states[1]["x_prev"]).all()
        graph = tmp_path / "forecast.onnx"
        assert invoke("model", "export", str(graph), "--format", "onnx", *control).exit_code == 0
        following = rng.standard_normal((2, 6, 3)).astype(np.float32)
        replies = np.stack([producer.send(ids, np.ascontiguousarray(following[:, t])) for t in range(6)], axis=1)

    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feed = {
        "x": following,
        "h0": np.stack([s["h"] for s in states], axis=1),
        "c0": np.stack([s["c"] for s in states], axis=1),
    }
    if inputs == "change":
        feed["x_prev"] = np.stack([s["x_prev"] for s in states])
    y, _, _ = session.run(None, feed)
    np.testing.assert_allclose(y, replies, rtol=0, atol=1e-5)
