"""Keras import (daemon/keras_import.py): models built and fitted with Keras 3 itself (torch backend, no
TensorFlow), saved as `.keras` and legacy `.h5`, imported into a running daemon and streamed event by event: the
replies equal Keras's `predict` within 1e-5. Every model that cannot be converted exactly is built with Keras too
and refused with a message naming the layer and the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.admin import DaemonError
from lstmd.clients.cli import app
from lstmd.daemon.keras_import import KerasImportError, convert_keras
from lstmd.daemon.model import ServingModel
from lstmd.daemon.normalization import predict_file_sequence
from typer.testing import CliRunner

STREAMS, STEPS = 3, 9  # odd sizes throughout


@pytest.fixture(scope="module")
def keras():
    """Keras 3 on the torch backend, imported once per module (the import takes seconds)."""
    os.environ["KERAS_BACKEND"] = "torch"  # read once, when keras is first imported
    import keras

    assert keras.backend.backend() == "torch"
    keras.utils.set_random_seed(3)
    return keras


def _fit_and_save(keras, model, x, y, loss, path):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)  # a few steps, so the weights are no longer initial
    model.save(path.with_suffix(".keras"))
    model.save(path.with_suffix(".h5"))


@pytest.fixture(scope="module")
def keras_models(keras, tmp_path_factory):
    """Fitted Keras models, each saved in both formats, with the sequences to stream and Keras's predictions."""
    L, folder = keras.layers, tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(5)
    cases = {}

    # 1 layer, regression, a prediction per step (return_sequences=True: many-to-many)
    x = rng.standard_normal((12, STEPS, 5)).astype(np.float32)
    model = keras.Sequential([keras.Input((None, 5)), L.LSTM(7, return_sequences=True, name="seq7"), L.Dense(2)])
    _fit_and_save(keras, model, x, rng.standard_normal((12, STEPS, 2)).astype(np.float32), "mse", folder / "one")
    cases["one"] = dict(layers=1, input=5, hidden=7, output=2, task="regression", many_to_one=False)

    # 2 layers with Dropout between, softmax over 4 classes: classification, replies are probabilities
    x = rng.standard_normal((12, STEPS, 3)).astype(np.float32)
    model = keras.Sequential([
        keras.Input((None, 3)), L.LSTM(9, return_sequences=True, dropout=0.1), L.Dropout(0.2),
        L.LSTM(9, return_sequences=True, recurrent_dropout=0.1), L.Dense(4, activation="softmax"),
    ])
    labels = rng.integers(0, 4, (12, STEPS))
    _fit_and_save(keras, model, x, labels, "sparse_categorical_crossentropy", folder / "two")
    cases["two"] = dict(layers=2, input=3, hidden=9, output=4, task="classification", many_to_one=False)

    # 3 layers, functional, the last LSTM without a bias and without return_sequences (many-to-one)
    x = rng.standard_normal((12, STEPS, 6)).astype(np.float32)
    inputs = keras.Input((None, 6))
    h = L.LSTM(5, return_sequences=True, name="first")(inputs)
    h = L.LSTM(5, return_sequences=True)(h)
    h = L.LSTM(5, use_bias=False, name="last")(h)
    model = keras.Model(inputs, L.Dense(1, name="out")(h))
    _fit_and_save(keras, model, x, rng.standard_normal((12, 1)).astype(np.float32), "mse", folder / "three")
    cases["three"] = dict(layers=3, input=6, hidden=5, output=1, task="regression", many_to_one=True)

    for name, case in cases.items():
        case["x"] = rng.standard_normal((STREAMS, STEPS, case["input"])).astype(np.float32)
        model = keras.saving.load_model(folder / f"{name}.keras")
        case["expected"] = np.asarray(model.predict(case["x"], verbose=0))
        case["path"] = folder / name
    return cases


def _daemon_for(make_daemon, case):
    return make_daemon(**{
        "model.input_size": case["input"], "model.hidden_size": case["hidden"], "model.num_layers": case["layers"],
        "model.output_size": case["output"], "model.task": case["task"],
    })


def _stream(daemon, x: np.ndarray, ids) -> np.ndarray:
    """Every stream's events one step at a time through the daemon: replies [N, T, O]."""
    with Producer(daemon.endpoints["events"]) as producer:
        return np.stack([producer.send(ids, np.ascontiguousarray(x[:, t])) for t in range(x.shape[1])], axis=1)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("name", ["one", "two", "three"])
def test_imported_keras_model_answers_as_keras_predict(make_daemon, keras_models, name, suffix):
    case = keras_models[name]
    daemon = _daemon_for(make_daemon, case)
    admin = Admin(daemon.endpoints["control"])
    assert admin.import_model(case["path"].with_suffix(suffix))["version"] == 1
    assert admin.model_versions()[0]["source"] == "import keras"
    replies = _stream(daemon, case["x"], [f"{name}-{i}" for i in range(STREAMS)])
    # many-to-one: Keras answers once per sequence, which is lstmd's answer after the sequence's last event
    got = replies[:, -1] if case["many_to_one"] else replies
    assert got.shape == case["expected"].shape
    np.testing.assert_allclose(got, case["expected"], rtol=0, atol=1e-5)
    if case["task"] == "classification":
        np.testing.assert_allclose(replies.sum(-1), 1.0, atol=1e-5)


def test_serve_a_keras_file_from_the_first_event(make_daemon, keras_models):
    """`[model] path` may name a Keras file: the daemon starts serving its conversion."""
    case = keras_models["three"]
    daemon = make_daemon(**{
        "model.input_size": case["input"], "model.hidden_size": case["hidden"], "model.num_layers": case["layers"],
        "model.output_size": case["output"], "model.task": case["task"],
        "model.path": str(case["path"].with_suffix(".h5")),
    })
    replies = _stream(daemon, case["x"], ["p0", "p1", "p2"])
    np.testing.assert_allclose(replies[:, -1], case["expected"], rtol=0, atol=1e-5)


def test_without_h5py_the_message_says_what_to_install(keras_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` raises ImportError
    with pytest.raises(KerasImportError, match=r"needs h5py, which is not installed: pip install 'lstmd\[keras\]'"):
        convert_keras(keras_models["one"]["path"].with_suffix(".keras").read_bytes())


def test_convert_offline_writes_a_model_file_torch_reproduces(keras_models, tmp_path):
    """`lstmd model convert`: the file loads into nn.LSTM + nn.Linear (the model file contract) and answers as
    Keras does; the h5 and .keras files of one model convert to the same tensors."""
    case = keras_models["two"]
    runner = CliRunner()
    paths = {}
    for suffix in (".keras", ".h5"):
        paths[suffix] = tmp_path / f"two{suffix}.safetensors"
        result = runner.invoke(app, ["model", "convert", str(case["path"].with_suffix(suffix)), str(paths[suffix])])
        assert result.exit_code == 0, result.stderr
        assert "2 LSTM layer(s) of 9" in result.stdout and "classification" in result.stdout
    model = ServingModel.from_bytes(paths[".keras"].read_bytes())
    other = ServingModel.from_bytes(paths[".h5"].read_bytes())
    assert all(torch.equal(model.tensors[k], other.tensors[k]) for k in model.tensors)
    assert torch.count_nonzero(model.tensors["bias_hh_l1"]) == 0
    lstm, head = model.to_modules()
    got = predict_file_sequence(lstm, head, model.spec.to_metadata(), torch.from_numpy(case["x"]))
    np.testing.assert_allclose(got.numpy(), case["expected"], rtol=0, atol=1e-5)


def test_installed_entry_point_converts_keras_to_onnx(keras_models, tmp_path):
    """A real `lstmd model convert` process, Keras .h5 straight to ONNX: onnxruntime from zero state answers as
    Keras's predict."""
    import onnxruntime

    case = keras_models["one"]
    exe = Path(sys.executable).with_name("lstmd")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "lstmd.clients.cli"]
    target = tmp_path / "one.onnx"
    result = subprocess.run(
        [*command, "model", "convert", str(case["path"].with_suffix(".h5")), str(target)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    zero = np.zeros((case["layers"], STREAMS, case["hidden"]), np.float32)
    y, _, _ = session.run(None, {"x": case["x"], "h0": zero, "c0": zero})
    np.testing.assert_allclose(y, case["expected"], rtol=0, atol=1e-5)


def test_cli_import_of_a_keras_file_and_a_mismatched_config(make_daemon, keras_models):
    case = keras_models["one"]
    daemon = _daemon_for(make_daemon, case)
    control = ["--control", daemon.endpoints["control"]]
    runner = CliRunner()
    result = runner.invoke(app, ["model", "import", str(case["path"].with_suffix(".h5")), *control])
    assert result.exit_code == 0 and "model version 1" in result.stdout
    wrong = runner.invoke(app, ["model", "import", str(keras_models["two"]["path"].with_suffix(".keras")), *control])
    assert wrong.exit_code == 1
    assert "cannot import model" in wrong.stderr and "hidden_size 9 where the daemon has 7" in wrong.stderr


# ---- refusals --------------------------------------------------------------------------------------------------


def _refused_models(keras):
    """(name, model, the message's distinctive part): each must be refused, naming its layer."""
    L = keras.layers
    seq = lambda *layers, features=3: keras.Sequential([keras.Input((None, features)), *layers])  # noqa: E731
    inputs = keras.Input((None, 3))
    return_state, _, _ = L.LSTM(4, return_sequences=True, return_state=True, name="stateful_out")(inputs)
    branch_a = L.LSTM(4, return_sequences=True, name="a")(inputs)
    branch_b = L.LSTM(4, return_sequences=True, name="b")(inputs)
    shared, four = L.LSTM(4, return_sequences=True, name="twice"), keras.Input((None, 4))  # the same layer twice
    return [
        ("bidirectional", seq(L.Bidirectional(L.LSTM(4, return_sequences=True), name="bi"), L.Dense(1)),
         "layer 'bi' (Bidirectional): a bidirectional layer reads each sequence backwards too"),
        ("gru", seq(L.GRU(4, return_sequences=True, name="g"), L.Dense(1)), "layer 'g' (GRU): GRU cells"),
        ("simple_rnn", seq(L.SimpleRNN(4, name="s"), L.Dense(1)), "layer 's' (SimpleRNN)"),
        ("relu", seq(L.LSTM(4, activation="relu", name="r"), L.Dense(1)),
         "layer 'r' (LSTM) uses activation='relu': nn.LSTM computes with tanh only"),
        ("hard_sigmoid", seq(L.LSTM(4, recurrent_activation="hard_sigmoid", name="hs"), L.Dense(1)),
         "layer 'hs' (LSTM) uses recurrent_activation='hard_sigmoid'"),
        ("masking", seq(L.Masking(0.0, name="m"), L.LSTM(4), L.Dense(1)),
         "layer 'm' (Masking): masked steps leave a Keras LSTM's state unchanged"),
        ("go_backwards", seq(L.LSTM(4, go_backwards=True, name="back"), L.Dense(1)),
         "layer 'back' (LSTM) has go_backwards=True"),
        ("return_state", keras.Model(inputs, L.Dense(1)(return_state)),
         "layer 'stateful_out' (LSTM) has return_state=True"),
        ("layer_between", seq(L.LSTM(4, return_sequences=True), L.LayerNormalization(name="norm"), L.LSTM(4),
                              L.Dense(1)),
         "layer 'norm' (LayerNormalization): only LSTM layers and one final Dense convert"),
        ("dense_between", seq(L.LSTM(4, return_sequences=True), L.Dense(4, name="mid"), L.LSTM(4), L.Dense(1)),
         "layer 'mid' (Dense) is not the last layer"),
        ("two_dense", seq(L.LSTM(4), L.Dense(4, name="hidden_dense"), L.Dense(1)),
         "layer 'hidden_dense' (Dense) is not the last layer"),
        ("sigmoid_head", seq(L.LSTM(4), L.Dense(1, activation="sigmoid", name="p")),
         "layer 'p' (Dense) has activation 'sigmoid'"),
        ("softmax_one", seq(L.LSTM(4), L.Dense(1, activation="softmax", name="one")),
         "layer 'one' (Dense) is a softmax over 1 unit"),
        ("units_differ", seq(L.LSTM(4, return_sequences=True, name="u4"), L.LSTM(5, name="u5"), L.Dense(1)),
         "different units (u4: 4, u5: 5)"),
        ("no_head", seq(L.LSTM(4, name="last_lstm")), "ends with LSTM 'last_lstm'"),
        ("no_lstm", seq(L.Dense(2, name="only")), "layer 'only' (Dense) has no LSTM before it"),
        ("branches", keras.Model(inputs, L.Dense(1)(L.Add(name="join")([branch_a, branch_b]))),
         "layer 'join' (Add) takes 2 inputs"),
        ("shared", keras.Model(four, L.Dense(1)(shared(shared(four)))), "layer 'twice' (LSTM) is called 2 times"),
        ("mixed_precision", seq(L.LSTM(4, dtype="mixed_float16", name="half"), L.Dense(1)),
         "layer 'half' (LSTM) computes in mixed_float16"),
        ("nested", seq(keras.Sequential([L.LSTM(4)], name="inner"), L.Dense(1)),
         "layer 'inner' (Sequential) is a nested model"),
    ]


@pytest.fixture(scope="module")
def refused_files(keras, tmp_path_factory):
    folder = tmp_path_factory.mktemp("refused")
    files = []
    for name, model, message in _refused_models(keras):
        for suffix in (".keras", ".h5"):
            model.save(folder / f"{name}{suffix}")
            files.append((folder / f"{name}{suffix}", message))
    return files


def test_every_inexact_model_is_refused_with_layer_and_reason(refused_files):
    assert len(refused_files) == 40
    for path, message in refused_files:
        with pytest.raises(KerasImportError) as caught:
            convert_keras(path.read_bytes())
        assert message in str(caught.value), (path.name, str(caught.value))


def test_refusals_reach_the_cli_and_the_daemon(make_daemon, refused_files):
    path, message = next((p, m) for p, m in refused_files if p.name == "gru.h5")
    result = CliRunner().invoke(app, ["model", "convert", str(path), str(path.with_suffix(".safetensors"))])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not path.with_suffix(".safetensors").exists()
    daemon = make_daemon(**{"model.input_size": 3, "model.hidden_size": 4, "model.output_size": 1})
    admin = Admin(daemon.endpoints["control"])
    with pytest.raises(DaemonError, match="cannot import Keras model: layer 'g' \\(GRU\\)"):
        admin.import_model(path)
    assert admin.model_info()["version"] == 0


def test_refused_legacy_options_and_weights_only_files(keras, keras_models, tmp_path):
    """time_major exists only in tf.keras 2 files (edited into a legacy .h5 here); a save_weights file has no
    model to convert; `stateful` and `unroll` change nothing at inference and convert."""
    path = tmp_path / "time_major.h5"
    shutil.copy(keras_models["one"]["path"].with_suffix(".h5"), path)
    with h5py.File(path, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        config["config"]["layers"][1]["config"]["time_major"] = True
        h5.attrs["model_config"] = json.dumps(config)
    with pytest.raises(KerasImportError, match="layer 'seq7' \\(LSTM\\) has time_major=True"):
        convert_keras(path.read_bytes())

    L = keras.layers
    model = keras.Sequential([keras.Input((4, 3), batch_size=2), L.LSTM(4, stateful=True, unroll=True), L.Dense(2)])
    model.save_weights(tmp_path / "w.weights.h5")
    with pytest.raises(KerasImportError, match="holds weights only"):
        convert_keras((tmp_path / "w.weights.h5").read_bytes())
    model.save(tmp_path / "stateful.keras")
    spec = convert_keras((tmp_path / "stateful.keras").read_bytes()).spec
    assert (spec.input_size, spec.hidden_size, spec.num_layers, spec.output_size) == (3, 4, 1, 2)
    with pytest.raises(KerasImportError, match="neither a .keras archive"):
        convert_keras(b"not a model")
