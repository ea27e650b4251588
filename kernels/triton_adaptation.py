"""The per-stream adaptation of forecast models (daemon/normalization.py) as two Triton kernels, for the step on
CUDA (and on the CPU through the interpreter, as the tests run it).

As torch ops the adaptation is a gather of the wave's rows, about 25 elementwise ops (about 50 with the level
regressor's guard_coefficients) and a scatter back: on a GPU each op is a launch of its own, a few µs each
whatever the wave's size. Here it is two launches per wave, in place on the state store's adaptation table:

    adapt_begin   per row: a reset row starts from the initial row; score the previous forecast (the guard's
                  running averages, and the level's), update the scale and count, move the level, write the LSTM's
                  inputs clip(dx / scale), and the guard's choice: `factor` = scale[c] * gain (no level), or
                  `factor` = g, `offset` = a * sprev (with the level: normalization.guard_coefficients)
    adapt_finish  per row, after the head: keep the model's predicted change; out = x[c] + factor * change, or
                  with the level x[c] + scale[c] * (g * change + a * sprev)

The arithmetic is normalization.py's, lerp included (torch's two-sided form); tests/test_triton_adaptation.py
compares both with it. No season: the seasonal ring stays in torch ops. Slots are distinct within a wave (the
daemon's waves guarantee it), so every program writes only its own rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lstmd.daemon import normalization
from lstmd.daemon.normalization import AdaptationLayout

MAX_BLOCK_R = 32  # rows per program, at most; each row is a few dozen floats
TILE_ELEMENTS = 512  # rows x columns per program, 4 per thread at 4 warps: 32 rows of 64 spilled 624 B/thread (sm_90)


def rows_per_program(n_in: int, n_out: int) -> int:
    """BLOCK_R for a model's widths: MAX_BLOCK_R rows, fewer where the features are many."""
    width = triton.next_power_of_2(max(n_in, n_out))
    return max(1, min(MAX_BLOCK_R, TILE_ELEMENTS // width))


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's CPU and CUDA form: from the nearer end, so a weight of 1 lands exactly on `end`."""
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _clip(v, bound):
    return tl.where(v < -bound, -bound, tl.where(v > bound, bound, v))  # NaN stays NaN, as torch.clamp


@triton.jit
def _unit(v):
    return tl.where(v < 0.0, 0.0, tl.where(v > 1.0, 1.0, v))


@triton.jit
def _field(table_ptr, init_ptr, base, offsets, fresh, mask):
    """[rows, k] of each row's fields at `offsets` ([1, k]), the initial row's where the row starts over."""
    value = tl.load(table_ptr + base[:, None] + offsets, mask=mask, other=0.0)
    initial = tl.load(init_ptr + offsets + 0 * base[:, None], mask=mask, other=0.0)
    return tl.where(fresh[:, None], initial, value)


@triton.jit
def _next_scale(s_old, dx, rate, scale_clip, floor_at):
    """The scale after a change dx: a change counts at most scale_clip scales; never below floor_at."""
    size = tl.abs(dx)
    cap = s_old * scale_clip
    s = _lerp(s_old, tl.where(size < cap, size, cap), rate)
    return tl.where(s < floor_at, floor_at, s)


@triton.jit(do_not_specialize=("B",))
def _adapt_begin_kernel(
    table_ptr, init_ptr, slots_ptr, reset_ptr, x_ptr, dx_ptr, cols_ptr, steps_ptr,  # in (table: in and out)
    inputs_ptr, factor_ptr, offset_ptr,  # out: [B, IN], [B, OUT], [B, OUT]
    B, W, IN, OUT, NSTEPS, clip_at, scale_clip, floor_at, level_rate, level_rest,
    HAS_RESET: tl.constexpr, LEVEL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < B
    base = tl.load(slots_ptr + rows, mask=live, other=0) * W  # int64: tables past 2^31 floats
    if HAS_RESET:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        fresh = tl.load(reset_ptr + rows, mask=live, other=0) != 0
    else:
        fresh = rows < 0
    i = tl.arange(0, BLOCK_I)[None, :]
    m_i = live[:, None] & (i < IN)
    j = tl.arange(0, BLOCK_O)[None, :]
    m_o = live[:, None] & (j < OUT)
    c = tl.load(cols_ptr + j, mask=j < OUT, other=0)
    p = IN + 1 + j  # prev, then cross, dd, tt (and sprev, cs, ss, ms, level) every OUT fields

    # Every field this program reads, before any is written: a row's scale is read per forecast column and written
    # per input, by other threads of the program (the barrier below keeps the old values for the reads).
    count = tl.load(table_ptr + base + IN, mask=live, other=0.0)
    count = tl.where(fresh, tl.load(init_ptr + IN + 0 * rows), count)
    s_old = _field(table_ptr, init_ptr, base, i, fresh, m_i)
    s_old_c = _field(table_ptr, init_ptr, base, c, fresh, m_o)
    h = _field(table_ptr, init_ptr, base, p, fresh, m_o)
    cross = _field(table_ptr, init_ptr, base, p + OUT, fresh, m_o)
    dd = _field(table_ptr, init_ptr, base, p + 2 * OUT, fresh, m_o)
    tt = _field(table_ptr, init_ptr, base, p + 3 * OUT, fresh, m_o)
    if LEVEL:
        sp_old = _field(table_ptr, init_ptr, base, p + 4 * OUT, fresh, m_o)
        cs = _field(table_ptr, init_ptr, base, p + 5 * OUT, fresh, m_o)
        ss = _field(table_ptr, init_ptr, base, p + 6 * OUT, fresh, m_o)
        ms = _field(table_ptr, init_ptr, base, p + 7 * OUT, fresh, m_o)
        level = _field(table_ptr, init_ptr, base, p + 8 * OUT, fresh, m_o)
    tl.debug_barrier()

    k = tl.minimum(count.to(tl.int32), NSTEPS - 1)
    rate = tl.load(steps_ptr + 2 * k, mask=live, other=0.0)[:, None]
    weight = tl.load(steps_ptr + 2 * k + 1, mask=live, other=0.0)[:, None]
    # the scale's update and the LSTM's inputs
    dx = tl.load(dx_ptr + rows[:, None] * IN + i, mask=m_i, other=0.0)
    s_new = _next_scale(tl.where(m_i, s_old, 1.0), dx, rate, scale_clip, floor_at)
    tl.store(table_ptr + base[:, None] + i, s_new, mask=m_i)
    tl.store(inputs_ptr + rows[:, None] * IN + i, _clip(dx / s_new, clip_at), mask=m_i)
    # the previous forecasts meet their target (in the scale they were made with)
    s_old_c = tl.where(m_o, s_old_c, 1.0)
    dx_c = tl.load(dx_ptr + rows[:, None] * IN + c, mask=m_o, other=0.0)
    s_c = _next_scale(s_old_c, dx_c, rate, scale_clip, floor_at)  # = the new scale at column c, same arithmetic
    target = _clip(dx_c / s_old_c, clip_at)
    cross = _lerp(cross, target * h, weight)
    dd = _lerp(dd, h * h, weight)
    tt = _lerp(tt, target * target, weight)
    if LEVEL:
        cs = _lerp(cs, target * sp_old, weight)
        ss = _lerp(ss, sp_old * sp_old, weight)
        ms = _lerp(ms, h * sp_old, weight)
        # the level moves toward this event (weight 1 at a stream's first: it starts there)
        x_c = tl.load(x_ptr + rows[:, None] * IN + c, mask=m_o, other=0.0)
        level = _lerp(level, x_c, (tl.where(count == 0.0, level_rest, 0.0) + level_rate)[:, None])
        sp = _clip((level - x_c) / s_c, clip_at)
        # normalization.guard_coefficients: the best of the model alone, the level alone and both
        g0 = _unit(cross / tl.where(dd > 1e-12, dd, 1e-12))
        a1 = _unit(cs / tl.where(ss > 1e-12, ss, 1e-12))
        e0 = (g0 * dd - 2.0 * cross) * g0
        e1 = (a1 * ss - 2.0 * cs) * a1
        det = dd * ss - ms * ms
        det = tl.where(det > 1e-12, det, 1e-12)
        g2 = _unit((cross * ss - cs * ms) / det)
        a2 = _unit((cs * dd - cross * ms) / det)
        e2 = (g2 * dd - 2.0 * cross) * g2 + (a2 * ss - 2.0 * cs) * a2 + 2.0 * (g2 * a2) * ms
        alone = e1 < e0
        both = (e2 < e0) & (e2 < e1)  # e2 < torch.minimum(e0, e1), NaN included (false)
        g = tl.where(both, g2, tl.where(alone, 0.0, g0))
        a = tl.where(both, a2, tl.where(alone, a1, 0.0))
        tl.store(table_ptr + base[:, None] + p + 4 * OUT, sp, mask=m_o)
        tl.store(table_ptr + base[:, None] + p + 5 * OUT, cs, mask=m_o)
        tl.store(table_ptr + base[:, None] + p + 6 * OUT, ss, mask=m_o)
        tl.store(table_ptr + base[:, None] + p + 7 * OUT, ms, mask=m_o)
        tl.store(table_ptr + base[:, None] + p + 8 * OUT, level, mask=m_o)
        tl.store(factor_ptr + rows[:, None] * OUT + j, g, mask=m_o)
        tl.store(offset_ptr + rows[:, None] * OUT + j, a * sp, mask=m_o)
    else:
        tl.store(factor_ptr + rows[:, None] * OUT + j, s_c * _unit(cross / tl.where(dd > 1e-12, dd, 1e-12)), mask=m_o)
    tl.store(table_ptr + base[:, None] + p, h, mask=m_o)  # a reset row's prev comes from the initial row
    tl.store(table_ptr + base[:, None] + p + OUT, cross, mask=m_o)
    tl.store(table_ptr + base[:, None] + p + 2 * OUT, dd, mask=m_o)
    tl.store(table_ptr + base[:, None] + p + 3 * OUT, tt, mask=m_o)
    tl.store(table_ptr + base + IN, count + 1.0, mask=live)


@triton.jit(do_not_specialize=("B",))
def _adapt_finish_kernel(
    table_ptr, slots_ptr, x_ptr, cols_ptr, change_ptr, factor_ptr, offset_ptr, out_ptr,
    B, W, IN, OUT, LEVEL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < B
    base = tl.load(slots_ptr + rows, mask=live, other=0) * W
    j = tl.arange(0, BLOCK_O)[None, :]
    m_o = live[:, None] & (j < OUT)
    c = tl.load(cols_ptr + j, mask=j < OUT, other=0)
    at = rows[:, None] * OUT + j
    change = tl.load(change_ptr + at, mask=m_o, other=0.0)
    tl.store(table_ptr + base[:, None] + IN + 1 + j, change, mask=m_o)
    x_c = tl.load(x_ptr + rows[:, None] * IN + c, mask=m_o, other=0.0)
    factor = tl.load(factor_ptr + at, mask=m_o, other=0.0)
    if LEVEL:
        s_c = tl.load(table_ptr + base[:, None] + c, mask=m_o, other=0.0)
        out = x_c + s_c * (factor * change + tl.load(offset_ptr + at, mask=m_o, other=0.0))
    else:
        out = x_c + factor * change
    tl.store(out_ptr + at, out, mask=m_o)


class TritonAdaptation:
    """The two kernels for one adaptation table (the state store's) and layout; begin() before the step returns
    the LSTM's inputs, finish() after the head the served forecasts. One wave at a time: begin's factors wait in
    this object for its finish."""

    def __init__(self, layout: AdaptationLayout, table: torch.Tensor, init: torch.Tensor, columns: torch.Tensor | None):
        if layout.season:
            raise ValueError("the Triton adaptation has no seasonal ring: with train.season it runs as torch ops")
        if table.dtype != torch.float32 or not table.is_contiguous() or table.shape[1] != layout.width:
            raise ValueError(f"the adaptation table must be a contiguous float32 [S, {layout.width}]")
        if init.shape != (layout.width,) or init.device != table.device:
            raise ValueError(f"init must be a float32 [{layout.width}] on the table's device")
        self.layout, self.table, self.init = layout, table, init.float().contiguous()
        self.model_columns = columns  # as given: the caller's key for "the same model's columns"
        n_in, n_out = layout.inputs, layout.outputs
        cols = torch.arange(n_in) if columns is None else columns.detach().cpu()
        if cols.shape != (n_out,) or int(cols.min()) < 0 or int(cols.max()) >= n_in:
            raise ValueError(f"forecast columns must be {n_out} indices in [0, {n_in}), got {cols.tolist()}")
        self.columns = cols.to(table.device, torch.int64).contiguous()
        self.steps = normalization.count_steps(table.device)
        self.block_r = rows_per_program(n_in, n_out)
        # the reset pointer of a wave that resets no row (HAS_RESET off: never read; one dtype, so one variant)
        self._no_reset = torch.zeros(1, dtype=torch.bool, device=table.device)
        self._factor = self._offset = None

    def begin(self, slots: torch.Tensor, reset: torch.Tensor | None, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """normalization.adapt_begin + stream_inputs for the wave (slots distinct, [B] int64; x, dx [B, I]
        float32): updates the table's rows in place and returns the LSTM's inputs [B, I]."""
        B, n_in, n_out = slots.shape[0], self.layout.inputs, self.layout.outputs
        x, dx = x.float().contiguous(), dx.float().contiguous()
        inputs = torch.empty(B, n_in, device=x.device)
        self._factor = torch.empty(B, n_out, device=x.device)
        self._offset = torch.empty(B, n_out, device=x.device) if self.layout.level else self._factor
        if B:
            level = float(self.layout.level)
            reset_arg = self._no_reset if reset is None else reset.contiguous()
            _adapt_begin_kernel[(triton.cdiv(B, self.block_r),)](
                self.table, self.init, slots, reset_arg, x, dx, self.columns, self.steps, inputs, self._factor,
                self._offset, B, self.table.shape[1], n_in, n_out, self.steps.shape[0], normalization.CLIP,
                normalization.SCALE_CLIP, normalization.SCALE_FLOOR, level, 1.0 - level, HAS_RESET=reset is not None,
                LEVEL=bool(level), BLOCK_R=self.block_r, BLOCK_I=triton.next_power_of_2(n_in),
                BLOCK_O=triton.next_power_of_2(n_out),
            )  # fmt: skip
        return inputs

    def finish(self, slots: torch.Tensor, x: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """normalization.adapt_finish for the wave begin() prepared: keeps `change` [B, O] (the head's output) in
        the rows, returns the served forecasts [B, O]."""
        B, n_out = slots.shape[0], self.layout.outputs
        out = torch.empty(B, n_out, device=change.device)
        if B:
            _adapt_finish_kernel[(triton.cdiv(B, self.block_r),)](
                self.table, slots, x.float().contiguous(), self.columns, change.float().contiguous(), self._factor,
                self._offset, out, B, self.table.shape[1], self.layout.inputs, n_out, LEVEL=bool(self.layout.level),
                BLOCK_R=self.block_r, BLOCK_O=triton.next_power_of_2(n_out),
            )  # fmt: skip
        return out

    def warm_up(self) -> None:
        """Compile every variant (with and without resets) before serving, on a scratch table of two rows."""
        device = self.table.device
        scratch = TritonAdaptation(self.layout, self.init.expand(2, -1).clone(), self.init, self.model_columns)
        slots, x = torch.arange(2, device=device), torch.zeros(2, self.layout.inputs, device=device)
        for reset in (None, torch.ones(2, dtype=torch.bool, device=device)):
            scratch.begin(slots, reset, x, x)
            scratch.finish(slots, x, torch.zeros(2, self.layout.outputs, device=device))
