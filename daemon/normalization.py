"""Forecast normalisation: how a forecast model copes with level and scale drift.

A forecast model sees each stream's *change* since its previous event, scaled by the typical size of one step's
change, and predicts the next change in the same units:

    d_t = (x_t - x_{t-1}) / delta_scale        (d = 0 at a stream's first event, and after a reset)
    prediction_t = x_t[cols] + delta_scale[cols] * head(lstm(d_1 .. d_t))

so a model that has learnt nothing yet (head output near 0) is the naive last-value forecast, and neither the
level nor a trend of the series ever leaves the range the weights were trained on. `cols` are the forecast
columns (`model.forecast_columns`, all features by default): the LSTM always sees every feature, the head
predicts the change of the chosen columns only. Level inputs, (x - mean) /
std, remain available as `inputs = "level"`, but on the weekly CO2 record an LSTM fed levels did no better than
the last value while one fed changes was 23% better (offline check, docs/benchmarks.md "Online learning").

The statistics belong to a model version: the trainer recomputes them from recorded recent events every round
and publishes them with the weights. They travel in the model file's metadata as one JSON string under
`forecast_normalization` (`inputs`, and per feature `mean`, `std`, `delta_scale`); a forecast model file
without it is served as is (plain `nn.LSTM` + `nn.Linear` output). The columns travel as a JSON list under
`forecast_columns`. `predict_file_sequence` applies both to a model file's torch modules (daemon/model.py). The
forecast task keeps every stream's last event (daemon/tasks.py `LastEvents`) to form the changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

METADATA_KEY = "forecast_normalization"
COLUMNS_KEY = "forecast_columns"
INPUTS = ("change", "level")


@dataclass(frozen=True)
class ForecastNormalization:
    mean: torch.Tensor  # [I]
    std: torch.Tensor  # [I], > 0
    delta_scale: torch.Tensor  # [I], > 0: typical size of one step's change
    inputs: str = "change"  # what the LSTM sees: "change" (x_t - x_{t-1}) / delta_scale, or "level" (x - mean) / std

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"forecast normalisation inputs must be one of {INPUTS}, got {self.inputs!r}")
        for name in ("mean", "std", "delta_scale"):
            value = getattr(self, name)
            if value.ndim != 1 or value.shape != self.mean.shape:
                raise ValueError(f"forecast normalisation {name} must be a vector like mean, got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"forecast normalisation {name} holds NaN or Inf")
        if (self.std <= 0).any() or (self.delta_scale <= 0).any():
            raise ValueError("forecast normalisation std and delta_scale must be positive")

    @classmethod
    def identity(cls, size: int, inputs: str = "change") -> ForecastNormalization:
        return cls(torch.zeros(size), torch.ones(size), torch.ones(size), inputs)

    @classmethod
    def from_data(cls, x: torch.Tensor, dx: torch.Tensor, inputs: str = "change") -> ForecastNormalization:
        """Statistics of recent events x [N, I] and of their one-step changes dx [M, I] (finite values only)."""
        mean = x.mean(0)
        # Floors keep a constant feature from blowing up its inputs once it moves: relative to its level.
        floor = 1e-4 * (mean.abs() + 1.0)
        std = torch.maximum(x.std(0, correction=0), floor)
        delta = dx.pow(2).mean(0).sqrt() if dx.shape[0] else torch.ones_like(mean)
        return cls(mean, std, torch.maximum(delta, floor), inputs)

    def to(self, device: torch.device) -> ForecastNormalization:
        return ForecastNormalization(
            self.mean.to(device), self.std.to(device), self.delta_scale.to(device), self.inputs
        )

    def lstm_inputs(self, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """What the LSTM sees, from events x and their changes dx = x_t - x_{t-1} (any leading shape)."""
        if self.inputs == "change":
            return dx / self.delta_scale
        return (x - self.mean) / self.std

    def predictions(self, x: torch.Tensor, head_out: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The forecast in the data's units: last value plus the scaled predicted change, of the forecast
        `columns` (an index tensor; None: every feature)."""
        if columns is None:
            return torch.addcmul(x, head_out, self.delta_scale)
        return torch.addcmul(x.index_select(-1, columns), head_out, self.delta_scale.index_select(0, columns))

    def target_scale(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """delta_scale of the forecast columns: the unit forecast errors are measured in."""
        return self.delta_scale if columns is None else self.delta_scale.index_select(0, columns)

    def to_json(self) -> str:
        stats = {k: [float(v) for v in getattr(self, k).cpu()] for k in ("mean", "std", "delta_scale")}
        return json.dumps({"inputs": self.inputs, **stats})

    @classmethod
    def from_json(cls, text: str) -> ForecastNormalization:
        try:
            data = json.loads(text)
            stats = [torch.tensor(data[k], dtype=torch.float32) for k in ("mean", "std", "delta_scale")]
            return cls(*stats, data.get("inputs", "level"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"model file metadata {METADATA_KEY} is unreadable: {exc}") from None

    def equal(self, other: ForecastNormalization | None) -> bool:
        return (
            other is not None
            and self.inputs == other.inputs
            and all(
                torch.equal(getattr(self, k).cpu(), getattr(other, k).cpu()) for k in ("mean", "std", "delta_scale")
            )
        )


def read_columns(metadata: dict[str, str]) -> list[int] | None:
    """The forecast columns a model file's metadata names (None: the key is absent, i.e. all features)."""
    if COLUMNS_KEY not in metadata:
        return None
    try:
        columns = json.loads(metadata[COLUMNS_KEY])
        if not isinstance(columns, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in columns):
            raise ValueError("expected a JSON list of integers")
    except ValueError as exc:
        raise ValueError(f"model file metadata {COLUMNS_KEY} is unreadable: {exc}") from None
    return columns


@torch.no_grad()
def predict_file_sequence(
    lstm: torch.nn.LSTM, head: torch.nn.Linear, metadata: dict[str, str], x: torch.Tensor
) -> torch.Tensor:
    """A model file's predictions for whole streams x [B, T, I] (batch first, each from its first event, zero
    state), with the torch modules the file loads into and its metadata: what the daemon answers for the same
    events. Forecast files apply their normalisation and columns; classification files answer softmax(head(lstm(x)))
    (class probabilities); other files plain head(lstm(x))."""
    if metadata.get("task") != "forecast" or METADATA_KEY not in metadata:
        y, _ = lstm(x)
        return head(y).softmax(-1) if metadata.get("task") == "classification" else head(y)
    norm = ForecastNormalization.from_json(metadata[METADATA_KEY])
    columns = read_columns(metadata)
    index = None if columns is None else torch.tensor(columns, dtype=torch.long)
    dx = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)  # 0 at a stream's first event
    y, _ = lstm(norm.lstm_inputs(x, dx))
    return norm.predictions(x, head(y), index)
