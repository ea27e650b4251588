"""The serving model: stacked LSTM weights (torch.nn.LSTM layout) plus a linear output head, and its file.

The model file is safetensors with tensor names exactly as `torch.nn.LSTM(batch_first=True).state_dict()`
plus `head.weight` / `head.bias` of an `nn.Linear(H, O)`; metadata holds the sizes and the task. Loading the
file into those two torch modules reproduces the daemon's predictions: head(lstm(x)) for regression, its softmax
over the classes for classification (replies are class probabilities; training still takes cross-entropy of the
head's logits).

Forecast models carry two more metadata entries, both JSON strings:
- `forecast_columns`: the feature columns (indices into an event's features) the model predicts for the next
  event, e.g. `[2]`; output_size = their number. Written for every forecast model (all columns when the config
  chose none); a file without it predicts all features.
- `forecast_normalization`: the statistics of daemon/normalization.py. The LSTM sees normalised inputs and the
  head predicts the scaled change of the chosen columns from their last value, so plain
  `head(lstm(x))` is not the forecast. `lstmd.daemon.normalization.predict_file_sequence(lstm, head, metadata, x)`
  applies what the metadata describes to whole streams x [B, T, I] (from each stream's first event) and returns
  the daemon's predictions [B, T, O]; read the metadata with `safetensors.safe_open(path, "pt").metadata()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import safetensors.torch
import torch
from lstmd.daemon.model_header import model_file_metadata
from lstmd.daemon.normalization import COLUMNS_KEY, ForecastNormalization, read_columns
from lstmd.daemon.normalization import METADATA_KEY as NORMALIZATION_KEY
from lstmd.kernels import Params

TASKS = ("regression", "classification", "forecast")


@dataclass(frozen=True)
class ModelSpec:
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    task: str
    # forecast: the feature columns predicted for the next event; () = all of them (stored canonically: a list
    # naming every column in order is ()). Always () for other tasks.
    forecast_columns: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        columns = tuple(int(c) for c in self.forecast_columns)
        if columns == tuple(range(self.input_size)):
            columns = ()
        object.__setattr__(self, "forecast_columns", columns)

    @property
    def target_columns(self) -> list[int]:
        """Forecast: the columns of the next event that are the target (all when none were chosen)."""
        return list(self.forecast_columns) or list(range(self.input_size))

    def to_metadata(self) -> dict[str, str]:
        meta = {k: str(v) for k, v in self.__dict__.items() if k != "forecast_columns"}
        if self.task == "forecast":
            meta[COLUMNS_KEY] = json.dumps(self.target_columns)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelSpec:
        missing = [
            k for k in ("input_size", "hidden_size", "num_layers", "output_size", "task") if k not in meta
        ]
        if missing:
            raise ValueError(f"model file metadata lacks {', '.join(missing)}")
        try:
            sizes = [int(meta[k]) for k in ("input_size", "hidden_size", "num_layers", "output_size")]
        except ValueError as exc:
            raise ValueError(f"model file metadata has a non-integer size: {exc}") from None
        columns = read_columns(meta) if meta["task"] == "forecast" else None
        if columns is not None:
            if len(set(columns)) != len(columns) or not all(0 <= c < sizes[0] for c in columns):
                raise ValueError(
                    f"model file metadata {COLUMNS_KEY} {columns} must be distinct indices below input_size {sizes[0]}"
                )
            if len(columns) != sizes[3]:
                raise ValueError(
                    f"model file metadata {COLUMNS_KEY} {columns} names {len(columns)} columns, "
                    f"but output_size is {sizes[3]}"
                )
        return cls(*sizes, meta["task"], tuple(columns or ()))

    def mismatch(self, other: ModelSpec) -> str:
        """What differs from `other` (the daemon's), in words; empty when nothing does."""
        if self == other:
            return ""
        if self.forecast_columns != other.forecast_columns:
            return (
                f"the model forecasts feature columns {self.target_columns}, "
                f"but model.forecast_columns says {other.target_columns}"
            )
        differ = [
            f"{name} {mine} where the daemon has {theirs}"
            for name in ("input_size", "hidden_size", "num_layers", "output_size", "task")
            if (mine := getattr(self, name)) != (theirs := getattr(other, name))
        ]
        return f"it has {', '.join(differ)}"


def tensor_names(spec: ModelSpec) -> list[str]:
    names = []
    for k in range(spec.num_layers):
        names += [f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}"]
    return [*names, "head.weight", "head.bias"]


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, shapes = spec.hidden_size, {}
    for k in range(spec.num_layers):
        in_k = spec.input_size if k == 0 else H
        shapes |= {
            f"weight_ih_l{k}": (4 * H, in_k),
            f"weight_hh_l{k}": (4 * H, H),
            f"bias_ih_l{k}": (4 * H,),
            f"bias_hh_l{k}": (4 * H,),
        }
    return shapes | {"head.weight": (spec.output_size, H), "head.bias": (spec.output_size,)}


class ServingModel:
    """Weights the serving loop reads. Published versions are immutable: the trainer builds a new one."""

    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, torch.Tensor],
        version: int = 0,
        normalization: ForecastNormalization | None = None,
    ) -> None:
        shapes = expected_shapes(spec)
        for name, shape in shapes.items():
            if name not in tensors:
                raise ValueError(f"model lacks tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"model tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}"
                )
            if not torch.isfinite(tensors[name]).all():
                raise ValueError(f"model tensor {name!r} holds NaN or Inf")
        extra = set(tensors) - set(shapes)
        if extra:
            raise ValueError(f"model has unexpected tensors {sorted(extra)}")
        if normalization is not None and (spec.task != "forecast" or normalization.mean.shape != (spec.input_size,)):
            raise ValueError(f"forecast normalisation does not fit a {spec.task} model of input_size {spec.input_size}")
        self.spec = spec
        self.tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
        self.version = version
        # Forecast models with chosen columns: their indices (on the weights' device) for the engine; else None.
        self.columns = (
            torch.tensor(spec.forecast_columns, dtype=torch.long, device=self.tensors["head.bias"].device)
            if spec.task == "forecast" and spec.forecast_columns
            else None
        )
        # Forecast models only (daemon/normalization.py): standardised inputs, predicted change from the last value.
        self.normalization = normalization

    @classmethod
    def initial(cls, spec: ModelSpec, seed: int) -> ServingModel:
        """Fresh weights exactly as torch.nn.LSTM / nn.Linear initialise them under `seed`."""
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            lstm = torch.nn.LSTM(spec.input_size, spec.hidden_size, spec.num_layers, batch_first=True)
            head = torch.nn.Linear(spec.hidden_size, spec.output_size)
        finally:
            torch.random.set_rng_state(generator_state)
        model = cls.from_modules(spec, lstm, head)
        if spec.task == "forecast":
            model.normalization = ForecastNormalization.identity(spec.input_size)
        return model

    @classmethod
    def from_modules(cls, spec: ModelSpec, lstm: torch.nn.LSTM, head: torch.nn.Linear, version: int = 0):
        tensors = dict(lstm.state_dict()) | {f"head.{k}": v for k, v in head.state_dict().items()}
        return cls(spec, tensors, version)

    def to(self, device: torch.device) -> ServingModel:
        norm = None if self.normalization is None else self.normalization.to(device)
        return ServingModel(self.spec, {k: v.to(device) for k, v in self.tensors.items()}, self.version, norm)

    @property
    def params(self) -> Params:
        t = self.tensors
        return [
            (t[f"weight_ih_l{k}"], t[f"weight_hh_l{k}"], t[f"bias_ih_l{k}"], t[f"bias_hh_l{k}"])
            for k in range(self.spec.num_layers)
        ]

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors["head.weight"], self.tensors["head.bias"]

    def to_modules(self) -> tuple[torch.nn.LSTM, torch.nn.Linear]:
        s = self.spec
        lstm = torch.nn.LSTM(s.input_size, s.hidden_size, s.num_layers, batch_first=True)
        head = torch.nn.Linear(s.hidden_size, s.output_size)
        lstm.load_state_dict({k: v.cpu() for k, v in self.tensors.items() if not k.startswith("head.")})
        head.load_state_dict(
            {"weight": self.tensors["head.weight"].cpu(), "bias": self.tensors["head.bias"].cpu()}
        )
        return lstm, head

    def to_bytes(self) -> bytes:
        meta = self.spec.to_metadata() | {"version": str(self.version), "format": "lstmd-model-1"}
        if self.normalization is not None:
            meta[NORMALIZATION_KEY] = self.normalization.to_json()
        return safetensors.torch.save(
            {k: v.cpu().contiguous() for k, v in self.tensors.items()}, metadata=meta
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ServingModel:
        meta = model_file_metadata(data, "the model file")  # "... is not a safetensors model file" (a CSV, a .pt)
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"not a readable safetensors model file: {exc}") from None
        spec = ModelSpec.from_metadata(meta)
        if spec.task not in TASKS:
            raise ValueError(f"model file task {spec.task!r} is not one of {TASKS}")
        norm = ForecastNormalization.from_json(meta[NORMALIZATION_KEY]) if NORMALIZATION_KEY in meta else None
        return cls(spec, tensors, int(meta.get("version", 0)), norm)

