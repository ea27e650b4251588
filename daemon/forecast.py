"""Multi-step forecasts (one-to-many): an autoregressive rollout of N streams, k steps, on copies of their state.

Meaning (docs in /work/shared/DESIGN.md "Multi-step forecasts"): step j is what the daemon would answer if the
predicted events 1..j-1 arrived as the stream's next real events; nothing of the streams changes (state rows,
last events, sequence numbers, recorder, resend window, LRU order).

Exact semantics, from the serving step (daemon/engine.py) and daemon/normalization.py. Let e_0 be the stream's
last event (the forecast task's `LastEvents` row), (h, c) its state after it, `cols` the forecast columns,
P(e) = predictions(e, head(h_top), cols) (= head(h_top) for a model without a normalisation):
- step 1: p_1 = P(e_0), the last reply's prediction recomputed (no new LSTM step: the last reply already
  predicted the next event);
- step j > 1: the event e_{j-1} is fed: `exog[:, j-2]` when given, else e_{j-2} (the features held at their last
  value), with `cols` replaced by p_{j-1}. The LSTM sees it as the engine would, lstm_inputs(e_{j-1},
  e_{j-1} - e_{j-2}), one step on the scratch (h, c); then p_j = P(e_{j-1}).
So `exog[:, i]` holds the known features of future event i + 1; its forecast columns are ignored (the prediction
replaces them), and `exog[:, k - 1]` is not used (event k is what step k predicts) but is part of the shape the
contract fixes. A stream reset since its last event, or whose last event is not known (a restore that did not
bring it back), has nothing to continue from and is refused.

Batched: the N streams' (h, c) rows are copied into a scratch table once, then each step is one `lstm_step_`
launch for all N (the serving kernel backend) and one head; the normalisation is the model's own
`ForecastNormalization`, so a change to how the daemon predicts carries over here. The trainer's multi-step loss
(daemon/horizon.py) rolls out through the same three steps (`next_event`, `feed`, `model_forecast`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from lstmd.clients.protocol import MAX_FORECAST_HORIZON as MAX_HORIZON
from lstmd.daemon.normalization import Ring, adapt_begin, adapt_finish
from lstmd.kernels import lstm_step_

EXOG_NOT_FINITE = "exog holds NaN or Inf"


class ForecastError(ValueError):
    """A forecast request the caller must fix; the message says what was wrong."""


def not_a_forecast_model(task_name: str) -> str:
    return (
        f"forecasts need a model with task = forecast; the serving model's task is {task_name!r} "
        "(its replies already are its whole output)"
    )


def check_request(task_name: str, horizon: int, n: int, input_size: int, exog: np.ndarray | None,
                  max_streams: int, output_size: int, max_bytes: int) -> None:
    """Refuse what cannot be forecast before anything is computed: the result must fit in `max_bytes`
    (serve.max_message_bytes), so no request makes the daemon build a reply larger than a message it accepts."""
    if task_name != "forecast":
        raise ForecastError(not_a_forecast_model(task_name))
    if not 1 <= horizon <= MAX_HORIZON:
        raise ForecastError(f"horizon must be in 1..{MAX_HORIZON}, got {horizon}")
    if not 1 <= n <= max_streams:
        raise ForecastError(f"a forecast names 1..{max_streams} streams (serve.max_message_events), got {n}")
    size = n * horizon * output_size * 4
    if size > max_bytes:
        raise ForecastError(
            f"a forecast of {n} streams x {horizon} steps x {output_size} outputs is {size} bytes, over "
            f"serve.max_message_bytes = {max_bytes}: ask for fewer streams or a shorter horizon"
        )
    if exog is not None:
        if exog.shape != (n, horizon, input_size):
            raise ForecastError(
                f"exog must have shape [streams, horizon, input_size] = [{n}, {horizon}, {input_size}], "
                f"got {list(exog.shape)}"
            )
        if not np.isfinite(exog).all():
            raise ForecastError(EXOG_NOT_FINITE)


def slots_of(store, last_events, streams: list) -> tuple[np.ndarray, dict[int, str]]:
    """Each stream's slot (-1 where it cannot be forecast) and, for those, why (by position)."""
    slots = np.full(len(streams), -1, dtype=np.int64)
    errors: dict[int, str] = {}
    for i, stream in enumerate(streams):
        sid = store.resolve(stream)
        if sid is None:
            errors[i] = f"no stream {stream!r} holds state"
            continue
        slot = store.slot_of[sid]
        if store.needs_reset[slot]:
            errors[i] = f"stream {stream!r} was reset: its state starts from zero at its next event"
        elif bool(last_events.rows[slot].isnan().any()):
            errors[i] = f"stream {stream!r}: its last event is not known (restored without it); send one event first"
        else:
            slots[i] = slot
    return slots, errors


def next_event(last: torch.Tensor, pred: torch.Tensor, columns: torch.Tensor | None,
               known: torch.Tensor | None = None) -> torch.Tensor:
    """The event a rollout feeds after `last` [N, I]: `known` (exog's features of it) or `last` (held at their last
    value), with the forecast `columns` replaced by the prediction `pred` [N, O]. Out of place (differentiable in
    `pred`: the trainer's multi-step loss feeds events through here too, daemon/horizon.py)."""
    if columns is None:  # every feature is forecast
        return pred
    return (last if known is None else known).index_copy(1, columns, pred)


def feed(norm, layout, adapt: torch.Tensor | None, last: torch.Tensor, event: torch.Tensor,
         columns: torch.Tensor | None, ring: Ring | None = None) -> torch.Tensor:
    """What the LSTM sees for a rollout's `event` after `last`, as the serving step (daemon/engine.py) forms it.
    With "stream" inputs the streams' adaptation rows `adapt` are stepped with the event first (in place, as
    serving steps the real rows). They are running statistics, outside autograd: the scale is a constant for the
    gradient, as the trainer's recorded scales are; it is copied because the next step changes the rows."""
    dx = event - last
    if adapt is None:
        return event if norm is None else norm.lstm_inputs(event, dx)
    with torch.no_grad():
        adapt_begin(layout, adapt, event.detach(), dx.detach(), columns, ring)
    return norm.lstm_inputs(event, dx, adapt[:, layout.field("scale")].clone())


def model_forecast(norm, layout, adapt: torch.Tensor | None, last: torch.Tensor, head_out: torch.Tensor,
                   columns: torch.Tensor | None, guard: bool = True, ring: Ring | None = None) -> torch.Tensor:
    """The forecast in the data's units from the head's output after event `last`, as the serving step forms it.
    `guard` False (the trainer's rollouts): with "stream" inputs, the model's own forecast, last value + scale x
    predicted change, without the stream's gain (serving state, not a function of the weights; the one-step loss
    is on the unshrunk change too)."""
    if adapt is None:
        return head_out if norm is None else norm.predictions(last, head_out, columns)
    if guard:
        return adapt_finish(layout, adapt, last, head_out, columns, ring)
    scale = adapt[:, layout.field("scale")]
    if columns is not None:
        scale, last = scale.index_select(1, columns), last.index_select(1, columns)
    return torch.addcmul(last, scale.clone(), head_out)


@torch.inference_mode()
def rollout(engine, slots: np.ndarray, horizon: int, exog: np.ndarray | None = None) -> np.ndarray:
    """Forecasts [N, horizon, O] float32 for the (valid, distinct or not) `slots`; reads the tables only."""
    model, device = engine.model, engine.device
    norm, columns, layout = model.normalization, model.columns, engine.layout
    if norm is not None and norm.inputs == "stream" and not engine.guard:  # train.guard = false: as engine.step
        norm = dataclasses.replace(norm, inputs="change")
    slot_t = torch.from_numpy(slots).to(device)
    n = slot_t.shape[0]
    # The scratch table: copies of the streams' rows (index_select copies), stepped in place.
    h = engine.store.h.index_select(1, slot_t)
    c = engine.store.c.index_select(1, slot_t)
    rows = torch.arange(n, device=device)
    x = engine.stream_state.rows.index_select(0, slot_t)  # x_0: each stream's last event
    future = None if exog is None else torch.from_numpy(np.ascontiguousarray(exog, dtype=np.float32)).to(device)
    weight, bias = model.head
    # "stream" inputs: copies of the streams' adaptation rows (scale and guard, daemon/normalization.py), stepped
    # with each predicted event exactly as the serving step steps the real rows (engine.step).
    adapt = engine.store.adaptation.index_select(0, slot_t) if norm is not None and norm.inputs == "stream" else None
    seasonal = engine.store.seasonal
    ring = None if adapt is None or seasonal is None else Ring(seasonal.index_select(0, slot_t), rows)

    def predict(last: torch.Tensor) -> torch.Tensor:
        """The forecast from the scratch state's top layer, as the serving step forms it after event `last`."""
        return model_forecast(norm, layout, adapt, last, torch.addmm(bias, h[-1], weight.t()), columns, ring=ring)

    out = torch.empty(n, horizon, model.spec.output_size, device=device)
    pred = predict(x)  # step 1: the last reply's prediction
    out[:, 0] = engine.task.replies(pred)
    for j in range(1, horizon):
        # Feed e_j: the previous event (or exog's known features) with the forecast columns replaced by p_j.
        event = next_event(x, pred, columns, None if future is None else future[:, j - 1])
        inputs = feed(norm, layout, adapt, x, event, columns, ring)
        lstm_step_(inputs, rows, h, c, model.params, backend=engine.backends.kernel, validate_slots=False)
        x = event
        pred = predict(x)
        out[:, j] = engine.task.replies(pred)
    return out.cpu().numpy()


def forecast(daemon, streams: list, horizon: int, exog: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The control command's and the events socket's forecast: ([N, horizon, O] float32 with NaN rows for the
    streams that cannot be forecast, {position: why}). Raises ForecastError for a request that is wrong whole."""
    engine = daemon.engine
    spec = engine.model.spec
    serve = daemon.config.serve
    check_request(spec.task, horizon, len(streams), spec.input_size, exog, serve.max_message_events,
                  spec.output_size, serve.max_message_bytes)
    slots, errors = slots_of(daemon.store, engine.stream_state, streams)
    result = np.full((len(streams), horizon, spec.output_size), np.nan, dtype=np.float32)
    ok = np.flatnonzero(slots >= 0)
    if ok.size:
        result[ok] = rollout(engine, slots[ok], horizon, None if exog is None else exog[ok])
    return result, errors
