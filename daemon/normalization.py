"""Forecast normalisation: how a forecast model copes with level and scale drift, per stream, and the guard that
keeps its forecasts from losing to the last value (and, with `train.season`, to the seasonal-naive forecast).

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
forecast task keeps every stream's last event (daemon/tasks.py `LastEvents`) to form the changes.
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
    lstm: torch.nn.LSTM, head: torch.nn.Linear, metadata: dict[str, str], x: torch.Tensor, season: int = 0,
    level: float = 0.0,
) -> torch.Tensor:
    """A model file's predictions for whole streams x [B, T, I] (batch first, each from its first event, zero
    state), with the torch modules the file loads into and its metadata: what the daemon answers for the same
    events (`season`, `level`: the daemon's train.season and train.level_rate). Forecast files apply their
    normalisation and columns; classification files answer softmax(head(lstm(x))) (class probabilities); other
    files plain head(lstm(x))."""
    if metadata.get("task") != "forecast" or METADATA_KEY not in metadata:
        y, _ = lstm(x)
        return head(y).softmax(-1) if metadata.get("task") == "classification" else head(y)
    norm = ForecastNormalization.from_json(metadata[METADATA_KEY])
    columns = read_columns(metadata)
    index = None if columns is None else torch.tensor(columns, dtype=torch.long)
    if norm.inputs == "stream":  # event by event: the stream's scale and guard evolve with it
        B, T, _ = x.shape
        layout = AdaptationLayout(x.shape[2], head.out_features, season, level)
        rows = layout.initial_row().expand(B, -1).clone()
        ring = Ring(torch.zeros(B, season, head.out_features), torch.arange(B)) if season else None
        state, out = None, []
        for t in range(T):
            dx = x[:, t] - x[:, t - 1] if t else torch.zeros_like(x[:, 0])
            rows = adapt_begin(layout, rows, x[:, t], dx, index, ring)
            y, state = lstm(stream_inputs(dx, rows[:, layout.field("scale")]).unsqueeze(1), state)
            out.append(adapt_finish(layout, rows, x[:, t], head(y[:, 0]), index, ring))
        return torch.stack(out, 1)
    dx = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)  # 0 at a stream's first event
    y, _ = lstm(norm.lstm_inputs(x, dx))
    return norm.predictions(x, head(y), index)


# ---- per-stream adaptation and the guard ("stream" inputs) ---------------------------------------------------
#
# Every forecast stream keeps one packed row in the state store's adaptation table ([capacity, width], float32,
# on the device; AdaptationLayout says where each field is), updated for a whole wave with one gather, about
# twenty elementwise tensor ops and one scatter: no per-stream Python work.
#   scale [I]   its typical |change| per feature: a running mean over its first 1/SCALE_RATE changes, then an
#               exponential average; a change larger than SCALE_CLIP scales moves it by SCALE_CLIP scales at most
#               (an outlier burst or a level shift does not blow the scale up, real growth still wins in a few steps)
#   count       events since the stream (re)started
#   prev [O]    the model's last predicted change, in units of the scale it was made with (not shrunk)
#   cross, dd, tt [O]  exponential averages (rate GAIN_RATE) of target*prev, prev*prev and target*target, where
#               target is the change that then happened, in the same units, clipped at CLIP
# The served forecast is  x_t[cols] + scale[cols] * gain * change  with  gain = clamp(cross / dd, 0, 1): the least-
# squares factor by which this stream's recent predicted changes should have been shrunk toward the last value.
# A model that is no help on a stream gets gain 0 there, i.e. the last-value forecast (counted as a fallback
# stream); one that helps keeps gain near 1. A stream starts with cross = 0, dd = GAIN_PRIOR: a ridge prior toward
# the last value, so a stream's forecasts start as the last value and move toward the model as it proves itself.
# The recent squared errors follow from the same averages: last value tt, model tt - 2 cross + dd, served (at the
# current gain) tt - 2 g cross + g^2 dd.
# With train.season (layout.season = s > 0) four more fields per column follow: sprev, the seasonal-naive change
# x[k + 1 - s] - x[k] forecast at the previous event (stream scales, clipped), and cs, ss, ms, the averages of
# target*sprev, sprev*sprev and prev*sprev; the values come from a ring of each stream's last s events (Ring, the
# state store's `seasonal` table) and guard_coefficients picks the served mix of model and seasonal naive.
# With train.level_rate (layout.level = r > 0) the same four fields hold a level regressor instead, the local-level
# (simple exponential smoothing) forecast: sprev = (level - x_t) / scale, clipped, where level [O] (a fifth field)
# is the stream's exponential average of its own values at rate r; (0, 1) is then the SES forecast, and the guard's
# mix of the model and that pull toward the recent level helps mean-reverting noisy series (Nile: docs/benchmarks.md
# "Issue 15, level regressor"). The two are exclusive (train.season or train.level_rate); the level is on by default
# (0.1, where it applies: config.served_level_rate).
# On the CPU the engine runs this arithmetic (the level included, not a season) in the C extension instead, inside the
# fused step's pass over the rows (kernels/cpu_step.py FusedAdaptation; tests/test_fused_adaptation.py compares the
# two); on CUDA, with a season, and in rollouts on copies it runs as the torch ops below.

SCALE_RATE = 0.05
SCALE_CLIP = 10.0
CLIP = 4.0  # inputs and scored or trained targets are clipped at this many scales: outliers, level shifts
GAIN_RATE = 0.02  # memory of the guard's statistics: about 50 events
GAIN_PRIOR = 0.05
FALLBACK_GAIN = 0.1  # a stream whose gain is below this in every column counts as falling back to the last value
SCALE_FLOOR = 1e-12
_FIRST = 1e30  # "no scale yet": caps nothing, and multiplies a gain of exactly 0 at a stream's first event


@dataclass(frozen=True)
class AdaptationLayout:
    """Where each per-stream field sits in a packed adaptation row (I inputs, O forecast columns; with a season,
    the seasonal-naive baseline's fields after the others)."""

    inputs: int
    outputs: int
    season: int = 0  # train.season: the seasonal-naive lag; 0: none
    level: float = 0.0  # train.level_rate: the rate of each stream's average level (the second regressor); 0: none

    def __post_init__(self) -> None:
        if self.season and self.level:
            raise ValueError("the guard's second regressor is the seasonal naive or the level, not both")

    @property
    def mixed(self) -> bool:
        """Whether the guard mixes a second regressor (seasonal naive or level) into the model's change."""
        return bool(self.season or self.level)

    @property
    def width(self) -> int:
        return self.inputs + 1 + (4 + 4 * self.mixed + bool(self.level)) * self.outputs

    def field(self, name: str) -> slice:
        i, o = self.inputs, self.outputs
        start = {"scale": 0, "count": i, "prev": i + 1, "cross": i + 1 + o, "dd": i + 1 + 2 * o,
                 "tt": i + 1 + 3 * o, "sprev": i + 1 + 4 * o, "cs": i + 1 + 5 * o, "ss": i + 1 + 6 * o,
                 "ms": i + 1 + 7 * o, "level": i + 1 + 8 * o}[name]  # fmt: skip
        return slice(start, start + (1 if name == "count" else o if name != "scale" else i))

    def initial_row(self, device=None) -> torch.Tensor:
        """A stream's row before its first event."""
        row = torch.zeros(self.width, device=device)
        row[self.field("scale")] = _FIRST
        row[self.field("dd")] = GAIN_PRIOR
        if self.mixed:
            row[self.field("ss")] = GAIN_PRIOR  # the same ridge prior: the second regressor earns its weight too
        return row

    def ring_bytes(self) -> int:
        """Bytes per stream of the seasonal ring (the state store's `seasonal` table): season values of each
        forecast column, float32."""
        return 4 * self.season * self.outputs


def stream_inputs(dx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a "stream" model's LSTM sees: each change in units of its stream's scale, clipped."""
    return (dx / scale).clamp(-CLIP, CLIP)


def gain(cross: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    return (cross / dd.clamp_min(1e-12)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class Ring:
    """The seasonal ring of a wave's streams: `table` [S, season, O] (the state store's, or a scratch copy) and
    `slots` [B] each row's index into it. Row b's event k (from 0 since its start) goes to column k % season, so the
    seasonal-naive forecast of the next event, x[k + 1 - season], sits at column (k + 1) % season once k + 1 >=
    season. Columns are written before they are read, so a stream that starts over needs no clearing."""

    table: torch.Tensor
    slots: torch.Tensor

    def flat(self, column: torch.Tensor) -> torch.Tensor:
        season = self.table.shape[1]
        return self.slots * season + column.long() % season


def adapt_begin(layout: AdaptationLayout, rows: torch.Tensor, x: torch.Tensor, dx: torch.Tensor,
                columns: torch.Tensor | None, ring: Ring | None = None) -> torch.Tensor:
    """One event per row: score the previous forecast, update the scale. `rows` [B, width]: the streams' rows,
    a gathered copy (initial rows where a stream starts over), updated in place and returned; x [B, I]; dx [B, I]
    their changes (0 at a start); `ring` (layout.season > 0): where this event's forecast columns are kept.
    rows[:, field("scale")] is then the scale of this change; adapt_finish adds the new prediction. With
    layout.level the stream's level moves toward this event (it starts at the stream's first value)."""
    f = layout.field
    s_prev, n, h = rows[:, f("scale")], rows[:, f("count")], rows[:, f("prev")]
    col = (lambda t: t) if columns is None else (lambda t: t.index_select(-1, columns))
    # Every op here costs a few microseconds per wave whatever its size, so: the weights that depend on the count
    # come from one table lookup, masks multiply (torch.where costs ~8 multiplies on the CPU), and the fields update
    # in place (a torch.cat of them cost as much as all the arithmetic).
    steps = count_steps(rows.device)
    rate, weight = steps.index_select(0, n.squeeze(1).clamp(max=steps.shape[0] - 1).long()).unbind(1)
    rate, weight = rate.unsqueeze(1), weight.unsqueeze(1)
    # The forecast made at the previous event (scored from the stream's third event: the first has no scale and
    # the second a scale of one change) meets its target.
    target = (col(dx) / col(s_prev)).clamp_(-CLIP, CLIP)
    rows[:, f("cross")].lerp_(target * h, weight)
    rows[:, f("dd")].lerp_(h * h, weight)
    if layout.mixed:  # the second regressor's forecast made at the previous event meets the same target
        sp = rows[:, f("sprev")]
        rows[:, f("cs")].lerp_(target * sp, weight)
        rows[:, f("ss")].lerp_(sp * sp, weight)
        rows[:, f("ms")].lerp_(h * sp, weight)
    rows[:, f("tt")].lerp_(target.square_(), weight)
    # The scale: _FIRST at a stream's first event (its change is 0), the first change sets it (rate 1), then a
    # running mean, then the average; a change counts at most SCALE_CLIP scales (_FIRST caps nothing). Never 0:
    # a stream that has not moved yet sees its first move as CLIP scales.
    size = torch.minimum(dx.abs(), s_prev * SCALE_CLIP)
    s_prev.lerp_(size, rate).clamp_(min=SCALE_FLOOR)
    if layout.level:  # rate 1 at the first event (count 0): the level starts at the stream's first value
        rows[:, f("level")].lerp_(col(x), n.eq(0).mul(1.0 - layout.level).add_(layout.level))
    n.add_(1.0)
    if ring is not None:
        ring.table.view(-1, ring.table.shape[2]).index_copy_(0, ring.flat(n.squeeze(1) - 1), col(x))
    return rows


_STEPS: dict[torch.device, torch.Tensor] = {}


def count_steps(device: torch.device) -> torch.Tensor:
    """[k, 2]: the scale's rate and the guard's weight for a stream that has seen k events (the last row: all
    later counts). Rate 0 at the first event (no change yet), then 1/k (a running mean), then SCALE_RATE; weight 0
    for the first two events (no scored forecast yet), then GAIN_RATE."""
    if device not in _STEPS:
        k = torch.arange(int(1 / SCALE_RATE) + 2, dtype=torch.float64)
        rate = torch.where(k >= 1, (1 / k.clamp_min(1)).clamp_min(SCALE_RATE), 0.0)
        _STEPS[device] = torch.stack([rate, (k >= 2) * GAIN_RATE], 1).float().to(device)
    return _STEPS[device]


def adapt_finish(layout: AdaptationLayout, rows: torch.Tensor, x: torch.Tensor, change: torch.Tensor,
                 columns: torch.Tensor | None, ring: Ring | None = None) -> torch.Tensor:
    """The served forecast from the model's predicted `change` [B, O] (units of the stream scale); keeps it in the
    rows for the next event's scoring. With a `ring`, the seasonal-naive change joins it, with layout.level the
    change to the stream's level (guard_coefficients)."""
    f = layout.field
    rows[:, f("prev")] = change
    s = rows[:, f("scale")]
    if columns is not None:
        s, x = s.index_select(1, columns), x.index_select(1, columns)
    if not layout.mixed:
        return torch.addcmul(x, s, gain(rows[:, f("cross")], rows[:, f("dd")]).mul_(change))
    if layout.level:  # the level as a change in stream scales, clipped like every target
        sp = ((rows[:, f("level")] - x) / s).clamp_(-CLIP, CLIP)
    else:
        # The seasonal-naive forecast x[k + 1 - season] as a change in stream scales, clipped like every target (an
        # outlier a season ago must not come back whole); 0 (the last value) until a full season was seen.
        n = rows[:, f("count")]
        seasonal = ring.table.view(-1, ring.table.shape[2]).index_select(0, ring.flat(n.squeeze(1)))
        sp = ((seasonal - x) / s).clamp_(-CLIP, CLIP).mul_(n >= layout.season)
    rows[:, f("sprev")] = sp
    g, a = guard_coefficients(layout, rows)
    return torch.addcmul(x, s, g.mul_(change).addcmul_(a, sp))


def guard_coefficients(layout: AdaptationLayout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """With a season (or a level): the weights (g, a) of the model's change m and the seasonal-naive change s (or
    the change to the stream's level) in the served change g m + a s, per stream and column, from the running
    averages of the products of m, s and the target t. Three candidates, each a least-squares fit over [0, 1]: the
    model alone (g = cross / dd, a = 0), the seasonal naive alone (g = 0, a = cs / ss) and both (the 2x2 normal
    equations, clamped); the one with the least expected squared error E(g, a) = tt - 2 g cross - 2 a cs + g^2 dd +
    2 g a ms + a^2 ss is served. (0, 0) is the last value and (0, 1) the seasonal naive (or the level's SES
    forecast), both inside the first two candidates' ranges, so on the stream's recent scored forecasts the served
    one is never worse than the better of the two baselines."""
    f, o = layout.field, layout.outputs
    # One contiguous copy of the fields cross .. ms: elementwise ops on the rows' strided columns cost ~4x as much.
    block = rows[:, f("cross").start : f("ms").stop].contiguous()
    cross, dd, cs, ss, ms = (block[:, k * o : (k + 1) * o] for k in (0, 1, 4, 5, 6))
    # Each candidate's E(g, a) - tt (tt is the same for all three), mostly in place: a wave's temporaries cost more
    # than its arithmetic. The pick is by comparisons (a tie keeps the earlier candidate), not an argmin over a
    # stacked candidate dimension, which took ~4 ms per wave of 5,000 x 8 on the CPU.
    g0, a1 = gain(cross, dd), gain(cs, ss)
    e0 = (g0 * dd).sub_(cross, alpha=2).mul_(g0)
    e1 = (a1 * ss).sub_(cs, alpha=2).mul_(a1)
    det = torch.addcmul(dd * ss, ms, ms, value=-1).clamp_min_(1e-12)
    g2 = torch.addcmul(cross * ss, cs, ms, value=-1).div_(det).clamp_(0.0, 1.0)
    a2 = torch.addcmul(cs * dd, cross, ms, value=-1).div_(det).clamp_(0.0, 1.0)
    e2 = (g2 * dd).sub_(cross, alpha=2).mul_(g2).add_((a2 * ss).sub_(cs, alpha=2).mul_(a2))
    e2.addcmul_(g2 * a2, ms, value=2)
    alone = e1 < e0  # the second regressor alone beats the model alone
    g, a = g0.masked_fill_(alone, 0.0), a1.masked_fill_(~alone, 0.0)
    both = e2 < torch.minimum(e0, e1)
    return torch.where(both, g2, g), torch.where(both, a2, a)


def guard_summary(layout: AdaptationLayout | None, table: torch.Tensor | None, occupied: torch.Tensor) -> dict:
    """The guard over every stream that has had a forecast scored (`occupied` [capacity] bool: slots in use):
    streams, fallback streams, mean gain and the error ratios of `lstmd train status` and the metrics."""
    if table is None or layout is None:
        return {}
    f = layout.field
    live = table[occupied & (table[:, f("count")].squeeze(1) >= 3)]
    cross, dd, tt = live[:, f("cross")], live[:, f("dd")], live[:, f("tt")]
    g = gain(cross, dd)
    a = torch.zeros_like(g)
    served = tt - 2 * g * cross + g * g * dd
    if layout.mixed:
        cs, ss, ms = live[:, f("cs")], live[:, f("ss")], live[:, f("ms")]
        g, a = guard_coefficients(layout, live)
        served = tt - 2 * g * cross - 2 * a * cs + g * g * dd + 2 * g * a * ms + a * a * ss
    naive = float(tt.sum())
    ratio = (lambda v: round(float(v.sum()) / naive, 4) if naive > 0 else None)
    out = {
        "streams": int(live.shape[0]),
        "fallback_streams": int(((g < FALLBACK_GAIN) & (a < FALLBACK_GAIN)).all(1).sum()),
        "mean_gain": round(float(g.mean()), 4) if g.numel() else None,
        "error_vs_last_value": {"served": ratio(served), "model": ratio(tt - 2 * cross + dd)},
    }
    if layout.season:  # the second baseline: how it does, and how many streams lean on it
        out["season"] = layout.season
        out["seasonal_streams"] = int((a >= 0.5).any(1).sum())
        out["mean_seasonal_weight"] = round(float(a.mean()), 4) if a.numel() else None
        out["error_vs_last_value"]["seasonal"] = ratio(tt - 2 * cs + ss)
    if layout.level:  # the same for the level regressor
        out["level_rate"] = layout.level
        out["level_streams"] = int((a >= 0.5).any(1).sum())
        out["mean_level_weight"] = round(float(a.mean()), 4) if a.numel() else None
        out["error_vs_last_value"]["level"] = ratio(tt - 2 * cs + ss)
    return out
