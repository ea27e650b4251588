"""Keras models into lstmd models: Keras 3 `.keras` archives and legacy `.h5` files, converted exactly or refused.

Read with the standard library (the archive's zip and `config.json`) and h5py (the weights); never TensorFlow or
keras, so the daemon and `lstmd model convert` need neither. What converts (docs/models.md is the user's table):

- a `Sequential` model, or a functional one whose layers form one chain from its single input to its single
  output, of one or more `LSTM` layers (all with the same `units`: nn.LSTM has one hidden_size) and one final
  `Dense`. `Dropout`-family layers between them are skipped: they are the identity at inference, as are the
  LSTMs' `dropout` / `recurrent_dropout`.
- `LSTM` weights: Keras's gate order (i, f, c, o) is torch's (i, f, g, o), so the kernels are only transposed
  (`kernel` [in, 4H] -> `weight_ih_l{k}` [4H, in], `recurrent_kernel` -> `weight_hh_l{k}`); Keras's one bias
  goes to `bias_ih_l{k}` and `bias_hh_l{k}` is zero (`use_bias=False`: both zero).
- `Dense` -> `head`: `kernel` [H, O] transposed to `head.weight`, `bias` (zero without one). A linear Dense is a
  regression model; a softmax Dense (O >= 2) a classification model, whose replies are the class probabilities
  (daemon/engine.py applies the softmax), so lstmd answers what Keras's `predict` does.
- `stateful`, `unroll`, `unit_forget_bias`, initialisers, regularisers and constraints change nothing at
  inference. A final LSTM with `return_sequences=False` (many-to-one) converts too: lstmd answers after every
  event, and its answer after a sequence's last event is Keras's.

Everything else is refused with a KerasImportError naming the layer and the reason, never served as a silently
different model: other recurrent layers (GRU, SimpleRNN, Bidirectional, ConvLSTM, RNN(cell)), activations other
than tanh / sigmoid, `go_backwards`, `return_state`, `time_major`, `Masking` (and any other layer between the
LSTMs), a Dense that is not last, a Dense activation other than linear or softmax, compute dtypes other than
float32, nested models and branching graphs.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from lstmd.clients.admin import is_keras_file
from lstmd.daemon.model import ModelSpec, ServingModel

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"

# The identity at inference: Keras applies them only with training=True.
INFERENCE_IDENTITY = ("Dropout", "SpatialDropout1D", "GaussianDropout", "GaussianNoise", "AlphaDropout")
REFUSAL_REASONS = {
    "Bidirectional": "a bidirectional layer reads each sequence backwards too, but a stream's future events "
    "have not arrived when lstmd answers",
    "GRU": "GRU cells are not LSTM cells; lstmd serves LSTMs only",
    "SimpleRNN": "SimpleRNN cells are not LSTM cells; lstmd serves LSTMs only",
    "RNN": "a generic RNN(cell) layer cannot be checked to be a plain LSTM; use keras.layers.LSTM",
    "Masking": "masked steps leave a Keras LSTM's state unchanged, but lstmd advances a stream on every event",
    "ConvLSTM1D": "ConvLSTM cells are convolutions, not nn.LSTM's matrix products",
    "ConvLSTM2D": "ConvLSTM cells are convolutions, not nn.LSTM's matrix products",
    "ConvLSTM3D": "ConvLSTM cells are convolutions, not nn.LSTM's matrix products",
    "CuDNNLSTM": "CuDNNLSTM carries two biases in another layout; save the model with keras.layers.LSTM",
}
MODEL_CLASSES = ("Sequential", "Functional", "Model")


class KerasImportError(ValueError):
    """The file is not a Keras model lstmd can serve exactly; the message names the layer and the reason."""


@dataclass(frozen=True)
class _Layer:
    name: str
    class_name: str
    config: dict


def is_keras_bytes(data: bytes) -> bool:
    """Whether `data` is a Keras file (a .keras archive or HDF5) rather than a safetensors model (or a torch .pt)."""
    return is_keras_file(data)


def convert_keras(data: bytes) -> ServingModel:
    """The lstmd model of a Keras file's bytes (`.keras` archive or legacy `.h5`); KerasImportError if it cannot
    be converted exactly."""
    try:
        import h5py
    except ImportError:
        raise KerasImportError(
            "reading Keras files needs h5py, which is not installed: pip install 'lstmd[keras]'"
        ) from None
    if data.startswith(ZIP_SIGNATURE):
        config, weights = _read_keras_archive(data, h5py)
    elif data.startswith(HDF5_SIGNATURE):
        config, weights = _read_legacy_h5(data, h5py)
    else:
        raise KerasImportError("not a Keras file: neither a .keras archive (zip) nor a legacy .h5 (HDF5) file")
    return _convert(_chain(config), weights)


# ---- reading the two formats ---------------------------------------------------------------------------------


def _read_keras_archive(data: bytes, h5py) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Keras 3 archive: config.json (the model's layers) and model.weights.h5, whose `layers/<key>` groups hold
    each layer's variables in creation order under `vars/0, 1, ...` (an LSTM's under `cell/vars`)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config = json.loads(archive.read("config.json"))
            weights_file = archive.read("model.weights.h5")
    except KeyError as exc:
        raise KerasImportError(f"the .keras archive lacks {exc.args[0]}") from None
    except (zipfile.BadZipFile, ValueError) as exc:
        raise KerasImportError(f"not a readable .keras archive: {exc}") from None
    weights: dict[str, list[np.ndarray]] = {}
    with h5py.File(io.BytesIO(weights_file), "r") as h5:
        groups = h5.get("layers")
        if groups is None:
            raise KerasImportError("the .keras archive's model.weights.h5 has no 'layers' group")
        keys = _keras3_layer_keys(config)
        for key, group in groups.items():
            # Keras 3 records the layer's own name on its vars group; older files only have the generated key.
            named = group.get("vars")
            name = named.attrs.get("name") if named is not None else None
            name = name.decode() if isinstance(name, bytes) else name or keys.get(key, key)
            variables = group["cell"]["vars"] if "cell" in group else named
            if variables is None:
                continue
            weights[name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
    return config, weights


def _keras3_layer_keys(config: dict) -> dict[str, str]:
    """Keras 3's weights-file key for each layer name: its class in snake case, `_1`, `_2`, ... for repeats, in
    the model's layer order (Sequential models leave their InputLayer out)."""
    layers = _model_layers(config)
    if config.get("class_name") == "Sequential":
        layers = [layer for layer in layers if layer.get("class_name") != "InputLayer"]
    used: dict[str, int] = {}
    keys = {}
    for layer in layers:
        base = _snake_case(layer.get("class_name", ""))
        key = base if base not in used else f"{base}_{used[base] + 1}"
        used[base] = used[base] + 1 if base in used else 0
        keys[key] = _layer_name(layer)
    return keys


def _snake_case(name: str) -> str:
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _read_legacy_h5(data: bytes, h5py) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Legacy HDF5 model: the `model_config` attribute (JSON) and `model_weights/<layer>`, whose `weight_names`
    attribute lists the layer's datasets in order."""
    weights: dict[str, list[np.ndarray]] = {}
    with h5py.File(io.BytesIO(data), "r") as h5:
        raw = h5.attrs.get("model_config")
        if raw is None:
            raise KerasImportError(
                "the .h5 file has no model_config: it holds weights only (save_weights); save the whole model "
                "with model.save('model.keras') or model.save('model.h5')"
            )
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        root = h5.get("model_weights", h5)  # very old files keep the layers at the root
        for name, group in root.items():
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
            weights[name] = [np.asarray(group[n]) for n in names]
    return config, weights


# ---- the model's layers as one chain -------------------------------------------------------------------------


def _model_layers(config: dict) -> list[dict]:
    inner = config.get("config", {})
    layers = inner if isinstance(inner, list) else inner.get("layers")  # Keras 2.2 kept the list as the config
    if not isinstance(layers, list):
        raise KerasImportError(f"the model config ({config.get('class_name')!r}) lists no layers")
    return layers


def _layer_name(layer: dict) -> str:
    return str(layer.get("config", {}).get("name") or layer.get("name") or layer.get("class_name"))


def _chain(config: dict) -> list[_Layer]:
    """The model's layers from input to output; refused unless they form one unbranched chain."""
    kind = config.get("class_name")
    if kind not in MODEL_CLASSES:
        raise KerasImportError(f"the file holds a {kind!r}, not a Sequential or functional Keras model")
    raw = _model_layers(config)
    for layer in raw:
        if layer.get("class_name") in MODEL_CLASSES:
            raise KerasImportError(
                f"layer {_layer_name(layer)!r} ({layer['class_name']}) is a nested model; build one flat model"
            )
    layers = [_Layer(_layer_name(r), str(r.get("class_name")), r.get("config", {})) for r in raw]
    if kind == "Sequential":
        return layers
    by_name = {layer.name: layer for layer in layers}
    inbound = {_layer_name(r): _inbound_names(r) for r in raw}
    for name, sources in inbound.items():
        if len(sources) > 1 or (not sources and by_name[name].class_name != "InputLayer"):
            raise KerasImportError(
                f"layer {name!r} ({by_name[name].class_name}) takes {len(sources)} inputs: only a chain of "
                "layers, each fed by the one before, can be converted"
            )
    inputs = _endpoints(config["config"].get("input_layers"))
    outputs = _endpoints(config["config"].get("output_layers"))
    if len(inputs) != 1 or len(outputs) != 1:
        raise KerasImportError(
            f"the model has {len(inputs)} inputs and {len(outputs)} outputs: lstmd serves one of each"
        )
    order, name = [], outputs[0]
    while True:
        order.append(by_name[name])
        if not inbound[name]:
            break
        name = inbound[name][0]
    if name != inputs[0] or len(order) != len(layers):
        unused = sorted(set(by_name) - {layer.name for layer in order})
        raise KerasImportError(
            f"the layers do not form one chain from input {inputs[0]!r} to output {outputs[0]!r}"
            + (f" (off the chain: {', '.join(unused)})" if unused else "")
        )
    return order[::-1]


def _inbound_names(layer: dict) -> list[str]:
    """Names of the layers feeding `layer`, from either config format (Keras 3 nodes of `keras_history`
    tensors; legacy nested lists [name, node, tensor, kwargs])."""
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise KerasImportError(
            f"layer {_layer_name(layer)!r} ({layer.get('class_name')}) is called {len(nodes)} times: only a chain "
            "of layers, each used once, can be converted"
        )
    names: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            if "keras_history" in value:
                names.append(str(value["keras_history"][0]))
                return
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
                names.append(value[0])
                return
            for item in value:
                walk(item)

    walk(nodes)
    return names


def _endpoints(value) -> list[str]:
    """`input_layers` / `output_layers`: ["name", 0, 0] (one) or [["name", 0, 0], ...]."""
    if not value:
        return []
    if isinstance(value[0], str):
        return [value[0]]
    return [str(item[0]) for item in value]


# ---- conversion ----------------------------------------------------------------------------------------------


def _activation(value) -> str:
    if isinstance(value, dict):  # Keras 3 serialises some activations as {"class_name": ..., "config": ...}
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("class_name")
    return str(value if value is not None else "linear")


def _dtype(config: dict) -> str:
    value = config.get("dtype", "float32")
    if isinstance(value, dict):
        value = value.get("config", {}).get("name", "float32")
    return str(value or "float32")


def _check_lstm(layer: _Layer, last: bool) -> None:
    c, where = layer.config, f"layer {layer.name!r} (LSTM)"
    for key, want in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        got = _activation(c.get(key, want))
        if got != want:
            raise KerasImportError(f"{where} uses {key}={got!r}: nn.LSTM computes with {want} only")
    for key, reason in (
        ("go_backwards", "it reads each sequence backwards, but a stream's future events have not arrived"),
        ("return_state", "it returns its state as extra outputs, so the model is not LSTM -> Dense"),
        ("time_major", "time-major inputs are a different model layout; save it batch-major"),
    ):
        if c.get(key):
            raise KerasImportError(f"{where} has {key}=True: {reason}")
    if not last and not c.get("return_sequences", False):
        raise KerasImportError(
            f"{where} has return_sequences=False but feeds another LSTM: every LSTM but the last must return "
            "sequences"
        )
    if _dtype(c) != "float32":
        raise KerasImportError(f"{where} computes in {_dtype(c)}: lstmd computes in float32, so answers would differ")


def _lstm_stack_and_head(chain: list[_Layer]) -> tuple[list[_Layer], _Layer]:
    """The LSTM layers and the final Dense of a layer chain (skipping inputs and inference-time identities), or
    KerasImportError naming the first layer that does not fit that shape."""
    skipped = ("InputLayer", *INFERENCE_IDENTITY)
    layers = [layer for layer in chain if layer.class_name not in skipped]
    if not layers:
        raise KerasImportError("the model has no layers to convert")
    for i, layer in enumerate(layers):
        where = f"layer {layer.name!r} ({layer.class_name})"
        if layer.class_name in REFUSAL_REASONS:
            raise KerasImportError(f"{where}: {REFUSAL_REASONS[layer.class_name]}")
        if layer.class_name == "Dense" and i != len(layers) - 1:
            raise KerasImportError(f"{where} is not the last layer: lstmd's only Dense is the output head")
        if layer.class_name not in ("LSTM", "Dense"):
            raise KerasImportError(
                f"{where}: only LSTM layers and one final Dense convert (Dropout layers are skipped); "
                f"{layer.class_name} has no nn.LSTM counterpart"
            )
    *lstms, dense = layers
    if dense.class_name != "Dense":
        raise KerasImportError(f"the model ends with {dense.class_name} {dense.name!r}: lstmd needs a final Dense head")
    if not lstms:
        raise KerasImportError(f"layer {dense.name!r} (Dense) has no LSTM before it: nothing to serve per stream")
    return lstms, dense


def _convert(chain: list[_Layer], weights: dict[str, list[np.ndarray]]) -> ServingModel:
    lstms, dense = _lstm_stack_and_head(chain)
    units = {layer.name: int(layer.config.get("units", 0)) for layer in lstms}
    if len(set(units.values())) > 1:
        raise KerasImportError(
            f"the LSTM layers have different units ({', '.join(f'{k}: {v}' for k, v in units.items())}): "
            "nn.LSTM stacks layers of one hidden_size"
        )
    hidden = next(iter(units.values()))
    tensors: dict[str, torch.Tensor] = {}
    input_size = None
    for k, layer in enumerate(lstms):
        _check_lstm(layer, last=k == len(lstms) - 1)
        kernel, recurrent, bias = _lstm_weights(layer, weights, hidden)
        if k == 0:
            input_size = kernel.shape[0]
        elif kernel.shape[0] != hidden:
            raise KerasImportError(f"layer {layer.name!r} (LSTM) kernel has {kernel.shape[0]} input rows, not {hidden}")
        # Keras gates (i, f, c, o) are torch's (i, f, g, o): transposing the kernels is the whole conversion.
        tensors |= {
            f"weight_ih_l{k}": _tensor(kernel.T),
            f"weight_hh_l{k}": _tensor(recurrent.T),
            f"bias_ih_l{k}": _tensor(bias),
            f"bias_hh_l{k}": torch.zeros(4 * hidden),
        }
    activation = _activation(dense.config.get("activation"))
    outputs = int(dense.config.get("units", 0))
    if activation not in ("linear", "softmax"):
        raise KerasImportError(
            f"layer {dense.name!r} (Dense) has activation {activation!r}: lstmd's head is linear (regression) or "
            "softmax (classification)"
        )
    if activation == "softmax" and outputs < 2:
        raise KerasImportError(f"layer {dense.name!r} (Dense) is a softmax over {outputs} unit: it always answers 1")
    if _dtype(dense.config) != "float32":
        raise KerasImportError(
            f"layer {dense.name!r} (Dense) computes in {_dtype(dense.config)}: lstmd computes in float32"
        )
    kernel, bias = _dense_weights(dense, weights, hidden, outputs)
    tensors |= {"head.weight": _tensor(kernel.T), "head.bias": _tensor(bias)}
    task = "classification" if activation == "softmax" else "regression"
    spec = ModelSpec(int(input_size), hidden, len(lstms), outputs, task)
    try:
        return ServingModel(spec, tensors)
    except ValueError as exc:  # NaN/Inf weights, or shapes the checks above missed
        raise KerasImportError(f"the converted model is not servable: {exc}") from None


def _tensor(array: np.ndarray) -> torch.Tensor:
    # float16/bfloat16 weights widen to float32 exactly; the copy makes the tensor contiguous after a transpose.
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _variables(layer: _Layer, weights: dict[str, list[np.ndarray]], count: int, use_bias: bool) -> list[np.ndarray]:
    found = weights.get(layer.name)
    expected = count if use_bias else count - 1
    if found is None or len(found) != expected:
        raise KerasImportError(
            f"layer {layer.name!r} ({layer.class_name}) has {0 if found is None else len(found)} weight arrays in "
            f"the file, expected {expected}"
        )
    return found


def _lstm_weights(layer: _Layer, weights, hidden: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    use_bias = layer.config.get("use_bias", True)
    found = _variables(layer, weights, 3, use_bias)
    kernel, recurrent = found[0], found[1]
    bias = found[2] if use_bias else np.zeros(4 * hidden, np.float32)
    if kernel.ndim != 2 or kernel.shape[1] != 4 * hidden or recurrent.shape != (hidden, 4 * hidden) or bias.shape != (
        4 * hidden,
    ):
        raise KerasImportError(
            f"layer {layer.name!r} (LSTM) weights have shapes {kernel.shape}, {recurrent.shape}, {bias.shape}; "
            f"expected (inputs, {4 * hidden}), ({hidden}, {4 * hidden}), ({4 * hidden},)"
        )
    return kernel, recurrent, bias


def _dense_weights(layer: _Layer, weights, hidden: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    use_bias = layer.config.get("use_bias", True)
    found = _variables(layer, weights, 2, use_bias)
    kernel = found[0]
    bias = found[1] if use_bias else np.zeros(outputs, np.float32)
    if kernel.shape != (hidden, outputs) or bias.shape != (outputs,):
        raise KerasImportError(
            f"layer {layer.name!r} (Dense) weights have shapes {kernel.shape}, {bias.shape}; "
            f"expected ({hidden}, {outputs}), ({outputs},)"
        )
    return kernel, bias
