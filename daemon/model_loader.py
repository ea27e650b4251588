"""The model a daemon starts from: `[model] path` (a safetensors model file, or a Keras `.keras` / `.h5` file
converted exactly) checked against the `[model]` config, or fresh weights from `model.seed` without a path.

Used at start and by `Durability` as the state a directory without a snapshot begins with.
"""

from __future__ import annotations

from pathlib import Path

from lstmd.daemon.config import ModelConfig
from lstmd.daemon.keras_import import convert_keras, is_keras_bytes
from lstmd.daemon.model import ModelSpec, ServingModel


class ModelFileError(ValueError):
    """`model.path` cannot be served: unreadable, not a model file, or not the configured model (says which)."""


def load_initial_model(m: ModelConfig) -> ServingModel:
    spec = ModelSpec(m.input_size, m.hidden_size, m.num_layers, m.output_size, m.task, tuple(m.forecast_columns))
    if not m.path:
        return ServingModel.initial(spec, m.seed)
    try:
        data = Path(m.path).read_bytes()
        # a Keras .keras / .h5 file is converted exactly or refused (KerasImportError is a ValueError)
        model = convert_keras(data) if is_keras_bytes(data) else ServingModel.from_bytes(data)
    except OSError as exc:
        raise ModelFileError(f"model.path {m.path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ModelFileError(f"model.path {m.path}: {exc}") from None
    if model.spec != spec:
        raise ModelFileError(f"model.path {m.path} does not fit the [model] config: {model.spec.mismatch(spec)}")
    return model
