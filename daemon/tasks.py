"""Task policy: one object per `model.task` (regression, classification, forecast), the only place that knows them.

A task owns what differs between tasks: the size of a target row (on the wire and in the recorder), how a batch's
targets are joined and cleaned, the training loss, the normalisation hooks of the serving step (forecast: the
change since each stream's previous event, the last values added back to the prediction), the replies' output
transform (classification: class probabilities), and any per-stream task state (forecast: each stream's last
event, `LastEvents`, snapshotted with the streams). The serving loop, the engine, the recorder wiring, the trainer
and the durability code ask the task instead of testing `spec.task`; adding a task means adding a class here and
naming it in TASKS.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from lstmd.daemon.model import ModelSpec
from lstmd.daemon.normalization import CLIP


class LastEvents:
    """Forecast: every slot's last event, [capacity, I] next to the state tables; NaN marks "not known" (start,
    a reset, or a restore that did not bring it back), and that event's change then counts as 0."""

    def __init__(self, capacity: int, input_size: int, device: torch.device) -> None:
        self.rows = torch.full((capacity, input_size), float("nan"), device=device)

    def previous(self, x: torch.Tensor, slots: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
        """Each slot's previous event (x itself where not known, so the change is 0); then remember x."""
        previous = self.rows.index_select(0, slots)
        unknown = previous.isnan()
        if reset is not None:
            unknown |= reset.unsqueeze(1)
        previous = torch.where(unknown, x, previous)
        self.rows.index_copy_(0, slots, x)
        return previous

    def known(self, slot: int, reset_pending: bool) -> list[float] | None:
        """The event a slot's next change is taken from, or None when not known (what `lstmd streams show` says)."""
        row = self.rows[slot]
        return None if reset_pending or bool(row.isnan().any()) else [float(v) for v in row.cpu()]

    def snapshot_tensors(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_x": self.rows.index_select(0, slots.to(self.rows.device)).cpu()}

    def restore_tensors(self, tensors: dict[str, torch.Tensor], slots: torch.Tensor) -> None:
        if "last_x" in tensors:
            self.rows.index_copy_(0, slots.to(self.rows.device), tensors["last_x"].to(self.rows.device))


class Task:
    """The policy every task answers; the defaults are regression's."""

    name = "regression"
    # Delayed and in-message targets are joined to recorded events (forecast: the next events are the targets).
    takes_targets = True
    normalizes = False  # the model may carry ForecastNormalization (daemon/normalization.py)

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @property
    def wire_target_dim(self) -> int:
        """Values per event a targets frame must hold; 0: not checked."""
        return self.spec.output_size

    @property
    def recorded_target_size(self) -> int:
        """Width of a recorded target row."""
        return self.spec.output_size

    def columns(self, device: torch.device) -> torch.Tensor | None:
        """Forecast: the predicted feature columns as an index tensor; None: every feature (or not a forecast)."""
        return None

    def stream_state(self, capacity: int, device: torch.device) -> LastEvents | None:
        """Per-stream state the task keeps beside the hidden state; None: none."""
        return None

    def clean_targets(self, targets: np.ndarray) -> np.ndarray:
        """[n, D] targets as received → as recorded (rows that teach nothing become NaN), in place."""
        return targets

    def batch_targets(self, targets: list, counts: list[int], n: int) -> np.ndarray | None:
        """[n, D] float32 targets of a batch from its messages' targets (None or [n_m, D]), NaN rows where an event
        has none; None when none has (or the task takes none)."""
        if not self.takes_targets or all(t is None for t in targets):
            return None
        out = np.full((n, self.recorded_target_size), np.nan, dtype=np.float32)
        offset = 0
        for message_targets, count in zip(targets, counts, strict=True):
            if message_targets is not None:
                out[offset : offset + count] = message_targets
            offset += count
        return self.clean_targets(out)

    def replies(self, out: torch.Tensor) -> torch.Tensor:
        """The head's output → what replies carry."""
        return out

    def loss(self, out, data, norm, columns) -> torch.Tensor:
        """Mean loss over known targets; `out` [B, T, O] is the head's output for the recorded windows `data`
        (x [B, T, I], y, mask, and for forecasts each event's stream scale)."""
        return _masked_mse(out - data["y"], data["mask"])


class RegressionTask(Task):
    pass


class ClassificationTask(Task):
    name = "classification"

    @property
    def wire_target_dim(self) -> int:
        return 1  # one class label per event

    @property
    def recorded_target_size(self) -> int:
        return 1

    def clean_targets(self, targets: np.ndarray) -> np.ndarray:
        labels = targets[:, 0]  # a label outside 0..O-1 teaches nothing: drop it
        targets[~((labels >= 0) & (labels < self.spec.output_size))] = np.nan
        return targets

    def replies(self, out: torch.Tensor) -> torch.Tensor:
        return out.softmax(-1)  # class probabilities, as a Keras softmax head's

    def loss(self, out, data, norm, columns) -> torch.Tensor:
        labels, mask = data["y"][..., 0].long(), data["mask"]
        return F.cross_entropy(out[mask], labels[mask]) if mask.any() else out.sum() * 0


class ForecastTask(Task):
    name = "forecast"
    takes_targets = False
    normalizes = True

    @property
    def wire_target_dim(self) -> int:
        return 0

    @property
    def recorded_target_size(self) -> int:
        return self.spec.output_size  # the chosen columns of the next event

    def columns(self, device: torch.device) -> torch.Tensor | None:
        if not self.spec.forecast_columns:
            return None
        return torch.tensor(self.spec.forecast_columns, dtype=torch.long, device=device)

    def stream_state(self, capacity: int, device: torch.device) -> LastEvents:
        return LastEvents(capacity, self.spec.input_size, device)

    def loss(self, out, data, norm, columns) -> torch.Tensor:
        """Forecast errors in units of each stream's own scale at each event (recorded from the state store), the
        target change clipped at normalization.CLIP scales: every stream counts alike whatever its scale (1000x
        apart in one daemon), an outlier burst or a level shift cannot dominate a round, and models with
        different normalisations are compared in the same units."""
        return _masked_mse(self._error(norm, data, columns, out), data["mask"])

    def baseline_loss(self, data, columns) -> torch.Tensor:
        """The last-value forecast's loss on the same windows, in the same units as loss()."""
        return _masked_mse(self._error(None, data, columns, None), data["mask"])

    def seasonal_loss(self, data, columns) -> torch.Tensor:
        """With train.season: the seasonal-naive forecast's loss on the same windows, in the same units as loss().
        data["seasonal"] holds each position's lagged event (the recorder's holdout windows), NaN where the lag was
        not recorded: the last value there, as the guard serves until a stream has shown a whole season; the
        change is clipped as the guard clips it (normalization.adapt_finish)."""
        cols = (lambda t: t) if columns is None else (lambda t: t.index_select(-1, columns))
        s, last = cols(data["scale"]), cols(data["x"])
        change = ((cols(data["seasonal"]) - last) / s).nan_to_num_(0.0).clamp_(-CLIP, CLIP)
        return _masked_mse(change - ((data["y"] - last) / s).clamp(-CLIP, CLIP), data["mask"])

    def _error(self, norm, data, columns, out) -> torch.Tensor:
        """Predicted minus actual change in stream scales; `out`: the head's output, None: the last value."""
        cols = (lambda t: t) if columns is None else (lambda t: t.index_select(-1, columns))
        x = data["x"]
        s, last = cols(data["scale"]), cols(x)
        target = ((data["y"] - last) / s).clamp(-CLIP, CLIP)
        if out is None:
            return -target
        if norm is None:
            change = (out - last) / s
        elif norm.inputs == "stream":
            change = out
        else:
            change = (norm.predictions(x, out, columns) - last) / s
        return change - target


def _masked_mse(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(err.dtype)
    return (err.pow(2) * m).sum() / (m.sum() * err.shape[-1]).clamp_min(1)


TASKS: dict[str, type[Task]] = {t.name: t for t in (RegressionTask, ClassificationTask, ForecastTask)}


def task_for(spec: ModelSpec) -> Task:
    """The policy object of `spec.task`."""
    try:
        return TASKS[spec.task](spec)
    except KeyError:
        raise ValueError(f"model task {spec.task!r} is not one of {tuple(TASKS)}") from None
