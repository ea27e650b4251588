"""Forecast normalisation: how a forecast model copes with level and scale drift, per stream, and the guard that
keeps its forecasts from losing to the last value.

A forecast model sees each stream's *change* since its previous event, scaled by the typical size of one step's
change, and predicts the next change in the same units. With `inputs = "stream"` (the default) that scale is
the stream's own, kept per stream in the state store, and the predicted change is shrunk per stream by the
guard's gain g in [0, 1] (below, "per-stream adaptation and the guard"):

    d_t = clip((x_t - x_{t-1}) / scale_t, -4, 4)      (d = 0 at a stream's first event, and after a reset)
    prediction_t = x_t[cols] + scale_t[cols] * g_t * head(lstm(d_1 .. d_t))

With `inputs = "change"` the scale is the model's `delta_scale` (one per feature, from recent events of all
streams) and there is no gain: prediction_t = x_t[cols] + delta_scale[cols] * head(lstm(d_1 .. d_t)).

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
engine keeps every stream's last event (`Engine.last_x`) to form the changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

METADATA_KEY = "forecast_normalization"
COLUMNS_KEY = "forecast_columns"
INPUTS = ("stream", "change", "level")


@dataclass(frozen=True)
class ForecastNormalization:
    mean: torch.Tensor  # [I]
    std: torch.Tensor  # [I], > 0
    delta_scale: torch.Tensor  # [I], > 0: typical size of one step's change
    # What the LSTM sees: "stream" (x_t - x_{t-1}) / the stream's own scale (StreamAdaptation, the default),
    # "change" (x_t - x_{t-1}) / delta_scale, or "level" (x - mean) / std.
    inputs: str = "stream"

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
    def identity(cls, size: int, inputs: str = "stream") -> ForecastNormalization:
        return cls(torch.zeros(size), torch.ones(size), torch.ones(size), inputs)

    @classmethod
    def from_data(cls, x: torch.Tensor, dx: torch.Tensor, inputs: str = "stream") -> ForecastNormalization:
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

    def lstm_inputs(self, x: torch.Tensor, dx: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """What the LSTM sees, from events x and their changes dx = x_t - x_{t-1} (any leading shape); `scale`:
        each event's stream scale (StreamAdaptation), needed by "stream" inputs."""
        if self.inputs == "stream":
            return stream_inputs(dx, scale)
        if self.inputs == "change":
            return dx / self.delta_scale
        return (x - self.mean) / self.std

    def predictions(self, x: torch.Tensor, head_out: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The forecast in the data's units: last value plus the scaled predicted change, of the forecast
        `columns` (an index tensor; None: every feature)."""
        if columns is None:
            return torch.addcmul(x, head_out, self.delta_scale)
        return torch.addcmul(x.index_select(-1, columns), head_out, self.delta_scale.index_select(0, columns))

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
    if norm.inputs == "stream":  # event by event: the stream's scale and guard evolve with it
        B, T, _ = x.shape
        rows = initial_rows(B, x.shape[2], head.out_features)
        state, out = None, []
        for t in range(T):
            previous = x[:, t - 1] if t else x[:, 0]
            rows, dx = adapt_begin(rows, x[:, t], previous, torch.full((B,), t == 0), index)
            y, state = lstm(stream_inputs(dx, rows["scale"]).unsqueeze(1), state)
            out.append(adapt_finish(rows, x[:, t], head(y[:, 0]), index))
        return torch.stack(out, 1)
    dx = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)  # 0 at a stream's first event
    y, _ = lstm(norm.lstm_inputs(x, dx))
    return norm.predictions(x, head(y), index)


# ---- per-stream adaptation and the guard ("stream" inputs) ---------------------------------------------------
#
# Every forecast stream keeps, in the state store (one preallocated row per slot, updated for a whole wave with a
# few tensor ops: no per-stream Python work):
#   scale [I]   its typical |change| per feature: a running mean over its first 1/SCALE_RATE changes, then an
#               exponential average; a change larger than SCALE_CLIP scales moves it by SCALE_CLIP scales at most
#               (an outlier burst or a level shift does not blow the scale up, real growth still wins in a few steps)
#   count       events since the stream (re)started
#   prev [O]    the model's last predicted change, in units of the scale it was made with (not shrunk)
#   cross, dd [O]  exponential averages (rate GAIN_RATE) of target*prev and prev*prev, where target is the change
#               that then happened in the same units, clipped at CLIP
#   err [3]     exponential averages of the squared error (summed over columns, same units) of the served
#               forecast, the model's unshrunk forecast and the last value (metrics and `lstmd train status`)
# The served forecast is  x_t[cols] + scale[cols] * gain * change  with  gain = clamp(cross / dd, 0, 1): the least-
# squares factor by which this stream's recent predicted changes should have been shrunk toward the last value.
# A model that is no help on a stream gets gain 0 there, i.e. the last-value forecast (counted as a fallback
# stream); one that helps keeps gain near 1. A stream starts with cross = 0, dd = GAIN_PRIOR: a ridge prior toward
# the last value, so a stream's forecasts start as the last value and move toward the model as it proves itself.

SCALE_RATE = 0.05
SCALE_CLIP = 10.0
CLIP = 4.0  # inputs and scored or trained targets are clipped at this many scales: outliers, level shifts
GAIN_RATE = 0.02  # memory of the guard's statistics: about 50 events
GAIN_PRIOR = 0.05
FALLBACK_GAIN = 0.1  # a stream whose gain is below this in every column counts as falling back to the last value
ADAPTATION_FIELDS = ("scale", "count", "prev", "cross", "dd", "err")


def adaptation_shapes(input_size: int, output_size: int) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the adaptation fields (the state store allocates [capacity, *shape])."""
    return {"scale": (input_size,), "count": (), "prev": (output_size,), "cross": (output_size,),
            "dd": (output_size,), "err": (3,)}  # fmt: skip


def stream_inputs(dx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a "stream" model's LSTM sees: each change in units of its stream's scale, clipped."""
    return (dx / scale).clamp(-CLIP, CLIP)


def gain(cross: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    return (cross / dd.clamp_min(1e-12)).clamp(0.0, 1.0)


def adapt_begin(rows: dict[str, torch.Tensor], x: torch.Tensor, previous: torch.Tensor, fresh: torch.Tensor,
                columns: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One event per row: score the previous forecast, update the scale. `rows`: the streams' adaptation fields
    (gathered, [B, ...]); x [B, I]; previous [B, I] their previous events (x where unknown); fresh [B] bool: the
    stream starts over here. Returns the new fields (the change's scale in `scale`) and the changes (0 where a
    stream starts)."""
    n = torch.where(fresh, 0.0, rows["count"])
    start = (n == 0).unsqueeze(1)
    dx = torch.where(start, 0.0, x - previous)
    s_prev = rows["scale"]
    col = (lambda t: t) if columns is None else (lambda t: t.index_select(-1, columns))
    # The forecast made at the previous event (its own scale is set from the second event on) meets its target.
    scored = (n >= 2).unsqueeze(1)
    target = (col(dx) / col(s_prev)).clamp(-CLIP, CLIP)
    h, cross, dd = rows["prev"], rows["cross"], rows["dd"]
    g = gain(cross, dd)
    errors = torch.stack(
        [(target - g * h).square().sum(1), (target - h).square().sum(1), target.square().sum(1)], 1
    )
    prior = torch.full_like(cross, GAIN_PRIOR)
    cross = torch.where(start, 0.0, torch.where(scored, torch.lerp(cross, target * h, GAIN_RATE), cross))
    dd = torch.where(start, prior, torch.where(scored, torch.lerp(dd, h * h, GAIN_RATE), dd))
    err = torch.where(start, 0.0, torch.where(scored, torch.lerp(rows["err"], errors, GAIN_RATE), rows["err"]))
    # The scale: unknown at a start (a tiny floor relative to the level), then running mean, then the average.
    size = dx.abs()
    size = torch.where(n.unsqueeze(1) >= 2, torch.minimum(size, SCALE_CLIP * s_prev), size)
    rate = torch.clamp(1.0 / n.clamp_min(1.0), min=SCALE_RATE).unsqueeze(1)
    floor = 1e-6 * x.abs() + 1e-12
    scale = torch.where(n.unsqueeze(1) >= 1, torch.lerp(s_prev, size, rate), floor).maximum(floor)
    return {"scale": scale, "count": n + 1, "prev": h, "cross": cross, "dd": dd, "err": err}, dx


def adapt_finish(rows: dict[str, torch.Tensor], x: torch.Tensor, change: torch.Tensor,
                 columns: torch.Tensor | None) -> torch.Tensor:
    """The served forecast from the model's predicted `change` [B, O] (units of the stream scale); keeps it in
    rows["prev"] for the next event's scoring."""
    rows["prev"] = change
    s = rows["scale"] if columns is None else rows["scale"].index_select(1, columns)
    last = x if columns is None else x.index_select(1, columns)
    return torch.addcmul(last, s, gain(rows["cross"], rows["dd"]) * change)


def initial_rows(batch: int, input_size: int, output_size: int, device=None) -> dict[str, torch.Tensor]:
    return {k: torch.zeros((batch, *shape), device=device) for k, shape in adaptation_shapes(
        input_size, output_size).items()}


def guard_summary(table: dict[str, torch.Tensor], occupied: torch.Tensor) -> dict:
    """The guard over every stream that has had a forecast scored (`occupied` [capacity] bool: slots in use):
    streams, fallback streams, mean gain and the error ratios of `lstmd train status` and the metrics."""
    if not table:
        return {}
    live = occupied & (table["count"] >= 3)
    g = gain(table["cross"][live], table["dd"][live])
    err = table["err"][live].sum(0)  # served, model, last value
    naive = float(err[2]) if g.shape[0] else 0.0
    ratio = (lambda v: round(float(v) / naive, 4) if naive > 0 else None)
    return {
        "streams": int(g.shape[0]),
        "fallback_streams": int((g < FALLBACK_GAIN).all(1).sum()),
        "mean_gain": round(float(g.mean()), 4) if g.numel() else None,
        "error_vs_last_value": {"served": ratio(err[0]), "model": ratio(err[1])},
    }
