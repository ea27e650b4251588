"""The multi-step training loss of forecast models (`train.horizon` = k > 1): forecasts beyond one step improve too.

From the teacher-forced state after every position t of every window (the recorded events fed as they came), the
model is rolled out k - 1 further steps on its own predictions, exactly as a forecast rollout is served
(daemon/forecast.py: `next_event`, `feed`, `model_forecast`, the same normalisation code), and scored at every
step j = 1..k against the window's real event t + j. The loss is the mean over horizons of each horizon's mean
squared error over the positions whose target lies inside the window and is known, in the units of today's
one-step loss (daemon/tasks.py ForecastTask): the stream's scale at the origin t, per step of lead time. Step 1
is the one-step loss itself; step j compares the forecast's change since x_t with the real change, the target
clipped at CLIP * j scales (CLIP per step, as the one-step target, so an outlier or a level shift cannot dominate
a round), and divides the difference by j. Why per step: a forecast's error grows with its lead time, about in
proportion on trending and seasonal series, so undivided squared errors weigh horizon j about j^2 times the first
and the far horizons drown the near ones. Measured (benchmarks/multistep.py, docs/benchmarks.md "Multi-step
accuracy"): undivided, train.horizon = 24 was worse than train.horizon = 1 at every reported horizon on both
series; divided by sqrt(j), mixed (better far ahead on one series, worse everywhere on the other); divided by j,
the better compromise.

How it is batched: the teacher-forced part stays with the trainer's sequence backend (`lstm_sequence`, or torch's
own LSTM op on the CPU), layer by layer, since the rollouts start from every layer's (h, c) at every position and
the sequence contract returns only the top layer's h. Each layer's cell states c_t follow from its h sequence:
the gates at t depend only on x_t and h_{t-1}, so one GEMM over all positions gives them, and c_t = f_t c_{t-1} +
i_t g_t is a linear recurrence, solved by a parallel scan in log2(T) rounds. Then all B x T positions roll out
together, one batched LSTM cell (plain torch ops, differentiable in every weight) per extra step: no Python loop
over positions (step j keeps only positions 0..T-j, whose targets lie inside the window).

Two choices, stated: the rollout feeds the model's own forecast, without the guard's per-stream gain (serving
state, not a function of the weights; the one-step loss trains the unshrunk change too), so a stream whose gain is
1 is served exactly this rollout. With "stream" inputs the rollout's scale is stepped by the serving code from the
recorded scale at the origin, as a stream past its first 1 / SCALE_RATE events steps it (the recorder keeps no
event counts), and is a constant for the gradient like the recorded scales. Features outside the forecast columns
are held at their last value, as a forecast without `exog` holds them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lstmd.daemon.forecast import feed, model_forecast, next_event
from lstmd.daemon.normalization import CLIP, AdaptationLayout

Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # w_ih, w_hh, b_ih, b_hh (nn.LSTM layout)
# The event count the rollout's adaptation rows claim: past the scale's warm-up, so it moves at SCALE_RATE.
MATURE_COUNT = 1e6


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s_t = a_t * s_{t-1} + b_t along dim 1 with s_{-1} = 0, for every t at once (Hillis-Steele: log2(T) rounds of
    elementwise ops; a pair (a, b) composes with an earlier one as (a a', a b' + b)). Differentiable."""
    d, steps = 1, a.shape[1]
    while d < steps:
        b = torch.cat([b[:, :d], torch.addcmul(b[:, d:], a[:, d:], b[:, :-d])], 1)
        a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], 1)
        d *= 2
    return b


def cell_states(inputs: torch.Tensor, h: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                layer: Layer) -> torch.Tensor:
    """One layer's c after every position [B, T, H], from its inputs [B, T, I_l], its outputs h [B, T, H] (the
    sequence backend's) and its start state h0, c0 [B, H]."""
    w_ih, w_hh, b_ih, b_hh = layer
    h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], 1)
    gates = inputs @ w_ih.t() + h_prev @ w_hh.t() + (b_ih + b_hh)
    i, f, g, _ = gates.chunk(4, -1)
    forget, write = torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g)
    # c_{-1} = c0 enters as part of the first position's write.
    write = torch.cat([torch.addcmul(write[:, :1], forget[:, :1], c0.unsqueeze(1)), write[:, 1:]], 1)
    return linear_scan(forget, write)


def teacher_states(sequence: Callable, inputs: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                   layers: list[Layer]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's (h, c) after every position, each [B, T, H]: the sequence backend layer by layer (its contract
    returns the top layer's outputs only), the c's from cell_states."""
    hs, cs = [], []
    for k, layer in enumerate(layers):
        h, _ = sequence(inputs, h0[k : k + 1], c0[k : k + 1], [layer])
        cs.append(cell_states(inputs, h, h0[k], c0[k], layer))
        hs.append(h)
        inputs = h
    return hs, cs


def cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM cell step (nn.LSTMCell's, gate order i, f, g, o) in differentiable torch ops."""
    w_ih, w_hh, b_ih, b_hh = layer
    i, f, g, o = (x @ w_ih.t() + h @ w_hh.t() + (b_ih + b_hh)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def horizon_errors(pred: torch.Tensor | None, data: dict, columns: torch.Tensor | None,
                   j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step j's errors [B, T - j + 1, O] of forecasts made at positions 0..T-j (`pred` [B, T - j + 1, O] in data
    units; None: the last value) against the real event t + j, in units of the stream's scale at t per step of
    lead time (divided by j), the target change clipped at CLIP * j; and which of them count [B, T - j + 1] (the
    target known)."""
    cols = (lambda t: t) if columns is None else (lambda t: t.index_select(-1, columns))
    n = data["x"].shape[1] - j + 1
    last, scale = cols(data["x"][:, :n]), cols(data["scale"][:, :n])
    target = ((data["y"][:, j - 1 :] - last) / scale).clamp(-CLIP * j, CLIP * j)
    change = 0.0 if pred is None else (pred - last) / scale
    return (change - target) / j, data["mask"][:, j - 1 :]


def _mean_over_horizons(losses: list[torch.Tensor], counts: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the horizons' losses over those with at least one known target."""
    present = torch.stack(counts) > 0
    return (torch.stack(losses) * present).sum() / present.sum().clamp_min(1)


def _masked_mse(err: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.unsqueeze(-1).to(err.dtype)
    count = m.sum()
    return (err.pow(2) * m).sum() / (count * err.shape[-1]).clamp_min(1), count


def _adaptation_rows(layout: AdaptationLayout, scale: torch.Tensor) -> torch.Tensor:
    """Adaptation rows for rollouts from every position: the recorded scale after the origin event [M, I]."""
    rows = layout.initial_row(scale.device).expand(scale.shape[0], -1).clone()
    rows[:, layout.field("scale")] = scale
    rows[:, layout.field("count")] = MATURE_COUNT
    return rows


def multistep_loss(task, sequence: Callable, layers: list[Layer], head: tuple[torch.Tensor, torch.Tensor], norm,
                   data: dict, columns: torch.Tensor | None, horizon: int) -> torch.Tensor:
    """The k-step loss of a forecast model with these weights on the windows `data` (the trainer's tensors: x, dx,
    scale, y, mask, h0, c0); `sequence`: the trainer's lstm_sequence. (Horizon 1 keeps the trainer's own path.)"""
    x = data["x"]
    B, T, size = x.shape
    inputs = x if norm is None else norm.lstm_inputs(x, data["dx"], data["scale"])
    hs, cs = teacher_states(sequence, inputs, data["h0"], data["c0"], layers)
    head_w, head_b = head
    out = hs[-1] @ head_w.t() + head_b  # [B, T, O]: the one-step outputs
    first = task.loss(out, data, norm, columns)
    # Every position at once: M = B * T rollouts. Adaptation rows only for "stream" inputs, as forecast.py.
    M = B * T
    h = [t.reshape(M, -1) for t in hs]
    c = [t.reshape(M, -1) for t in cs]
    last = x.reshape(M, size)
    layout = AdaptationLayout(size, head_w.shape[0])
    adapt = _adaptation_rows(layout, data["scale"].reshape(M, size)) if norm is not None and norm.inputs == "stream" \
        else None
    pred = model_forecast(norm, layout, adapt, last, out.reshape(M, -1), columns, guard=False)
    losses, counts = [first], [data["mask"].sum()]
    for j in range(2, horizon + 1):
        # Step j scores positions 0..T-j only (the others' targets lie past the window): drop the rest's rollouts.
        keep = lambda t, n=T - j + 1: t.reshape(B, -1, t.shape[-1])[:, :n].reshape(B * n, -1)  # noqa: E731
        h, c, last, pred = [keep(t) for t in h], [keep(t) for t in c], keep(last), keep(pred)
        adapt = None if adapt is None else keep(adapt)
        event = next_event(last, pred, columns)
        inp = feed(norm, layout, adapt, last, event, columns)
        for k, layer in enumerate(layers):
            h[k], c[k] = cell(inp, h[k], c[k], layer)
            inp = h[k]
        last = event
        pred = model_forecast(norm, layout, adapt, last, torch.addmm(head_b, h[-1], head_w.t()), columns, guard=False)
        loss, count = _masked_mse(*horizon_errors(pred.reshape(B, T - j + 1, -1), data, columns, j))
        losses.append(loss)
        counts.append(count)
    return _mean_over_horizons(losses, counts)


def multistep_baseline(task, data: dict, columns: torch.Tensor | None, horizon: int) -> torch.Tensor:
    """The last-value forecast's k-step loss on the same windows, in the same units as multistep_loss."""
    losses, counts = [task.baseline_loss(data, columns)], [data["mask"].sum()]
    for j in range(2, horizon + 1):
        loss, count = _masked_mse(*horizon_errors(None, data, columns, j))
        losses.append(loss)
        counts.append(count)
    return _mean_over_horizons(losses, counts)
