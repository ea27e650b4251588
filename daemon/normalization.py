"""Forecast normalisation: how a forecast model copes with level and scale drift.

A forecast model predicts the *change* from the stream's last value, on inputs standardised by statistics of
recent data:

    prediction = x + delta_scale * head(lstm((x - mean) / std))

so a model that has learnt nothing yet (head output near 0) is the naive last-value forecast, and a series that
trends or changes scale stays in range. The statistics belong to a model version: the trainer recomputes them
from the recorded recent events every round and publishes them together with the weights, so inference uses
the statistics the weights were trained with. They travel in the model file's metadata as one JSON string under
`forecast_normalization` (per input feature: `mean`, `std`, `delta_scale`); a forecast model file without it
is served as is (plain `nn.LSTM` + `nn.Linear` output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

METADATA_KEY = "forecast_normalization"


@dataclass(frozen=True)
class ForecastNormalization:
    mean: torch.Tensor  # [I]
    std: torch.Tensor  # [I], > 0
    delta_scale: torch.Tensor  # [I], > 0: typical size of one step's change

    def __post_init__(self) -> None:
        for name in ("mean", "std", "delta_scale"):
            value = getattr(self, name)
            if value.ndim != 1 or value.shape != self.mean.shape:
                raise ValueError(f"forecast normalisation {name} must be a vector like mean, got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"forecast normalisation {name} holds NaN or Inf")
        if (self.std <= 0).any() or (self.delta_scale <= 0).any():
            raise ValueError("forecast normalisation std and delta_scale must be positive")

    @classmethod
    def identity(cls, size: int) -> ForecastNormalization:
        return cls(torch.zeros(size), torch.ones(size), torch.ones(size))

    @classmethod
    def from_data(cls, x: torch.Tensor, dx: torch.Tensor) -> ForecastNormalization:
        """Statistics of recent events x [N, I] and of their one-step changes dx [M, I] (finite values only)."""
        mean = x.mean(0)
        # Floors keep a constant feature from blowing up its inputs once it moves: relative to its level.
        floor = 1e-4 * (mean.abs() + 1.0)
        std = torch.maximum(x.std(0, correction=0), floor)
        delta = dx.pow(2).mean(0).sqrt() if dx.shape[0] else torch.ones_like(mean)
        return cls(mean, std, torch.maximum(delta, floor))

    def to(self, device: torch.device) -> ForecastNormalization:
        return ForecastNormalization(self.mean.to(device), self.std.to(device), self.delta_scale.to(device))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the LSTM sees: standardised events (any leading shape, features last)."""
        return (x - self.mean) / self.std

    def predictions(self, x: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
        """The forecast in the data's units: last value plus the scaled predicted change."""
        return torch.addcmul(x, head_out, self.delta_scale)

    def to_json(self) -> str:
        return json.dumps({k: [float(v) for v in getattr(self, k).cpu()] for k in ("mean", "std", "delta_scale")})

    @classmethod
    def from_json(cls, text: str) -> ForecastNormalization:
        try:
            data = json.loads(text)
            return cls(*(torch.tensor(data[k], dtype=torch.float32) for k in ("mean", "std", "delta_scale")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"model file metadata {METADATA_KEY} is unreadable: {exc}") from None

    def equal(self, other: ForecastNormalization | None) -> bool:
        return other is not None and all(
            torch.equal(getattr(self, k).cpu(), getattr(other, k).cpu()) for k in ("mean", "std", "delta_scale")
        )
