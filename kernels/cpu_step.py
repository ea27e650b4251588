"""The serving step on the CPU: `lstm_step_`'s contract plus the output head, specialised for the daemon's hot path.

Same arithmetic as the reference backend (`lstmd.kernels.reference`, torch.nn.LSTM layout and gate order), with
weights prepared once per published model, the batch processed in cache-sized chunks, and every intermediate
written into preallocated buffers. Two implementations of a chunk:

- **fused** (default where `kernels/_cpu_kernel.c` was built at install): torch runs the two GEMMs (MKL); the C
  extension gathers the old rows (reset rows as zeros) and runs the cell's element-wise part with the scatter
  of the new rows in one pass, with the GIL released. Four calls per layer and chunk instead of ~14 torch ops.
- **torch** (where no C compiler was available, or `fused=False`): gates reordered to (i, f, o, g) with the
  rows of i, f, o halved, so one `tanh_` over all 4H columns gives tanh(g) and, through
  sigmoid(z) = 0.5 * tanh(z / 2) + 0.5, the three sigmoids (torch's CPU `tanh_` ran 2x faster than
  `sigmoid_`); gather with `index_select(out=)`, scatter with `index_put_`.

Both agree with the reference to ~3e-7 (tests/test_bench.py). Rows go in chunks of about 1 MiB of gates (1,024
rows at H=64), which stay in L2. A wave is split into contiguous parts over `threads` threads (the caller and
a pool): its rows are distinct state-table slots, so the parts touch disjoint rows and need no lock. Each
thread runs torch with one intra-op thread and its own buffers, and torch and the C kernel release the GIL
while they compute, so the parts run on different cores. This is not torch's OpenMP pool, whose idle
workers spin against the I/O thread and the producers on a small host (docs/benchmarks.md, "End to end").
The head runs inside each part too, on rows still in that core's cache.

Forecast models with per-stream adaptation (daemon/normalization.py) hand the step a `FusedAdaptation`: the fused
chunk then runs normalization.adapt_begin in layer 0's gather pass (the LSTM's inputs come out of it) and
adapt_finish right after the chunk's head, so each stream's adaptation row is touched twice within one chunk
instead of in two passes of its own over the wave (docs/benchmarks.md, "Issue 15, third session").

Shapes: B events in the batch, S state-table rows, L layers, H hidden, I input, O outputs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from lstmd.kernels.tuning import adopt_torch_threads

try:
    from lstmd.kernels import _cpu_kernel
except ImportError:  # installed without a C compiler: the torch implementation serves
    _cpu_kernel = None

# Rows per chunk: gates of about 1 MiB (4H float32 per row) stay in L2; 512-1024 rows at H=64 were best in a
# sweep of 256/512/1024/all on this machine.
_GATE_BYTES_PER_CHUNK = 1 << 20
# A wave is split over threads only when every part gets at least this many rows: below it, the hand-off to
# the pool (tens of µs) costs more than the part's step saves.
_MIN_ROWS_PER_PART = 256


def fused_available() -> bool:
    """Whether the C extension was built (pip install needs a C compiler for it)."""
    return _cpu_kernel is not None


@dataclass(frozen=True, eq=False)
class FusedAdaptation:
    """What the fused step needs to run the per-stream adaptation (normalization.adapt_begin/adapt_finish, no season;
    with or without the level regressor) inside its pass, the same for every wave of a model (the caller keeps one:
    the step checks it once); the wave's events come with each call, the step's `x` is then each event's change dx,
    and it returns the guarded forecast events[cols] + scale * gain * change (with the level: events[cols] + scale *
    (g * change + a * the change to the level))."""

    # [S, I + 1 + 4 O] float32 (I + 1 + 9 O with the level): the state store's adaptation rows, updated in place
    table: torch.Tensor
    init: torch.Tensor  # [width] float32: a stream's row before its first event (reset rows start from it)
    columns: torch.Tensor | None  # [O] int64: the forecast columns; None: every feature
    steps: torch.Tensor  # [k, 2] float32: the scale's rate and the guard's weight by count (normalization)
    clip: float
    scale_clip: float
    floor: float
    level: float = 0.0  # train.level_rate (normalization.AdaptationLayout.level); 0: no level regressor


class CpuStep:
    """Advance rows of the state tables one step in place and return the head's outputs."""

    def __init__(self, threads: int = 1, fused: bool | None = None) -> None:
        if threads < 1:
            raise ValueError(f"CpuStep needs at least one thread, got {threads}")
        if fused and _cpu_kernel is None:
            raise RuntimeError("the fused CPU step needs lstmd.kernels._cpu_kernel, which was not built")
        self.fused = _cpu_kernel is not None if fused is None else fused
        self.threads = threads
        # adopt_torch_threads: without it the pool's GEMMs forked OpenMP teams (py-spy: its head GEMV took as
        # long as its main GEMM).
        self._pool = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="lstmd-step", initializer=adopt_torch_threads)
            if threads > 1
            else None
        )
        self._model = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None
        self._chunk = 0
        self._buffers: list[dict[str, torch.Tensor]] = []  # one set per part: parts run at the same time
        # The FusedAdaptation last checked, with (capacity, I, O) and its C calls' fixed arguments.
        self._adaptation: tuple | None = None

    @property
    def name(self) -> str:
        return f"cpu-fused-{_cpu_kernel.ISA}" if self.fused else "cpu-torch"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _prepare(self, model) -> None:
        params = model.params
        H = params[0][1].shape[1]
        layers = []
        for w_ih, w_hh, b_ih, b_hh in params:
            w_ih, w_hh, bias = w_ih.float(), w_hh.float(), b_ih.float() + b_hh.float()
            if not self.fused:  # internal gate order and halved sigmoid rows (module docstring)
                order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
                scale = torch.ones(4 * H)
                scale[: 3 * H] = 0.5  # sigmoid(z) = 0.5 * tanh(z / 2) + 0.5
                w_ih, w_hh, bias = w_ih[order] * scale[:, None], w_hh[order] * scale[:, None], bias[order] * scale
            layers.append((w_ih.t().contiguous(), w_hh.t().contiguous(), bias.contiguous()))  # [I_l, 4H], [H, 4H]
        self._layers = layers
        weight, bias = model.head
        self._head = (weight.float().t().contiguous(), bias.float().contiguous())  # [H, O], [O]
        self._chunk = rows = max(64, _GATE_BYTES_PER_CHUNK // (16 * H))
        n_in, n_out = layers[0][0].shape[0], weight.shape[0]
        self._buffers = [
            {
                "gates": torch.empty(rows, 4 * H),
                "h": torch.empty(rows, H),
                "c": torch.empty(rows, H),
                "inp": torch.empty(rows, H),
                # the fused adaptation's: the LSTM's inputs, finish's factors (and with the level its offsets) and
                # the head's predicted changes
                "scaled": torch.empty(rows, n_in),
                "factor": torch.empty(rows, n_out),
                "offset": torch.empty(rows, n_out),
                "change": torch.empty(rows, n_out),
            }
            for _ in range(self.threads)
        ]
        self._model = model

    def __call__(
        self,
        model,  # ServingModel: prepared again when a new one is published
        x: torch.Tensor,  # [B, I] float32
        slots: torch.Tensor,  # [B] int64, distinct rows (guaranteed by the state store and the waves)
        h: torch.Tensor,  # [L, S, H] float32, updated in place at `slots`
        c: torch.Tensor,  # [L, S, H] float32, updated in place at `slots`
        reset: torch.Tensor | None = None,  # [B] bool: start those rows from zero
        adapt: FusedAdaptation | None = None,  # forecast: x is dx, adapted in the pass (fused only)
        events: torch.Tensor | None = None,  # [B, I] float32 with `adapt`: the wave's events
    ) -> torch.Tensor:  # [B, O]: the head applied to the last layer's new h (with `adapt`: the guarded forecast)
        if model is not self._model:
            self._prepare(model)
        B = x.shape[0]
        if self.fused:
            w_in_t, w_h_t, _ = self._layers[0]
            _check_fused_operands(x, slots, h, c, reset, len(self._layers), w_in_t.shape[0], w_h_t.shape[0])
            if adapt is not None:
                fixed = self._check_adaptation(adapt, x, h.shape[1], events)
        elif adapt is not None:
            raise ValueError("the per-stream adaptation runs inside the fused CPU step only")
        x = x.contiguous()
        out = torch.empty(B, self._head[0].shape[1])
        if adapt is not None:  # h's layer 0 starts at h's own pointer
            adapt = _AdaptationCall(fixed, x.data_ptr(), events.data_ptr(), out.data_ptr(), h.data_ptr())
        parts = max(1, min(self.threads, B // _MIN_ROWS_PER_PART))
        bounds = [B * p // parts for p in range(parts + 1)]
        step_rows = self._fused_rows if self.fused else self._torch_rows
        futures = [
            self._pool.submit(step_rows, p, bounds[p], bounds[p + 1], x, slots, h, c, reset, out, adapt)
            for p in range(1, parts)
        ]
        try:
            step_rows(0, bounds[0], bounds[1], x, slots, h, c, reset, out, adapt)
        finally:
            for future in futures:  # wait for every part before returning, even if this one failed
                future.result()
        return out

    def _check_adaptation(self, adapt: FusedAdaptation, dx: torch.Tensor, capacity: int, events) -> tuple:
        """_check_adaptation once per FusedAdaptation (the same object wave after wave: ~5 µs a wave otherwise), the
        wave's events every time; returns the C calls' fixed arguments."""
        n_out = self._head[0].shape[1]
        key = (capacity, dx.shape[1], n_out)
        if self._adaptation is None or self._adaptation[0] is not adapt or self._adaptation[1] != key:
            _check_adaptation(adapt, dx, capacity, n_out)
            table = adapt.table
            fixed = (table.data_ptr(), table.shape[0], table.shape[1], _ptr(adapt.columns), dx.shape[1], n_out,
                     adapt.init.data_ptr(), adapt.steps.data_ptr(), adapt.steps.shape[0], adapt.clip, adapt.scale_clip,
                     adapt.floor, self._head[0].shape[0], adapt.level)  # fmt: skip
            self._adaptation = (adapt, key, fixed)
        if events is None or events.dtype != torch.float32 or not events.is_contiguous() or (
            events.shape != dx.shape or events.device.type != "cpu"
        ):
            raise ValueError(f"fused adaptation: events must be a contiguous float32 {list(dx.shape)} CPU tensor")
        return self._adaptation[2]

    def _chunks(self, begin: int, end: int, slots: torch.Tensor):
        """(start, stop, slots[start:stop]) for the chunks of rows begin..end (one part of a wave)."""
        for start in range(begin, end, self._chunk):
            stop = min(end, start + self._chunk)
            yield start, stop, slots[start:stop]

    @torch.inference_mode()
    def _fused_rows(self, part, begin, end, x, slots, h, c, reset, out, adapt) -> None:
        """Rows begin..end with part `part`'s buffers: GEMMs in torch, gather and cell (and with `adapt`, the
        adaptation around them) in the C extension."""
        buf, H, (w_out, b_out) = self._buffers[part], h.shape[2], self._head
        for start, stop, rows in self._chunks(begin, end, slots):
            n = stop - start
            rows_ptr = rows.data_ptr()
            reset_ptr = 0 if reset is None else reset[start:stop].data_ptr()
            gates, h_old = buf["gates"][:n], buf["h"][:n]
            inp = x[start:stop] if adapt is None else adapt.begin(buf, start, n, rows_ptr, reset_ptr)
            for layer, (w_in_t, w_h_t, bias) in enumerate(self._layers):
                if layer or adapt is None:  # with `adapt`, layer 0's rows were gathered in its pass
                    _cpu_kernel.gather_rows(h[layer].data_ptr(), rows_ptr, reset_ptr, h_old.data_ptr(), n, H)
                torch.mm(inp, w_in_t, out=gates)
                gates.addmm_(h_old, w_h_t)
                h_new = buf["inp"][:n]
                _cpu_kernel.lstm_cell(
                    gates.data_ptr(), bias.data_ptr(), c[layer].data_ptr(), h[layer].data_ptr(), rows_ptr, reset_ptr,
                    h_new.data_ptr(), n, H,
                )  # fmt: skip
                inp = h_new
            if adapt is None:
                torch.addmm(b_out, h_new, w_out, out=out[start:stop])
                continue
            adapt.finish(buf, start, n, rows_ptr, torch.addmm(b_out, h_new, w_out, out=buf["change"][:n]))

    @torch.inference_mode()
    def _torch_rows(self, part, begin, end, x, slots, h, c, reset, out, adapt) -> None:
        """Rows begin..end with part `part`'s buffers, torch ops only (inference mode is per thread)."""
        buf, H, (w_out, b_out) = self._buffers[part], h.shape[2], self._head
        for start, stop, rows in self._chunks(begin, end, slots):
            n = stop - start
            gates, h_old, c_old = buf["gates"][:n], buf["h"][:n], buf["c"][:n]
            zero = None if reset is None else reset[start:stop].unsqueeze(1)
            inp = x[start:stop]
            for layer, (w_in_t, w_h_t, bias) in enumerate(self._layers):
                torch.index_select(h[layer], 0, rows, out=h_old)
                torch.index_select(c[layer], 0, rows, out=c_old)
                if zero is not None:
                    # masked_fill, not a multiply: a reset row may hold NaN (a dead stream), and 0 * NaN = NaN.
                    h_old.masked_fill_(zero, 0.0)
                    c_old.masked_fill_(zero, 0.0)
                torch.addmm(bias, inp, w_in_t, out=gates)
                gates.addmm_(h_old, w_h_t)
                gates.tanh_()
                gates[:, : 3 * H].mul_(0.5).add_(0.5)  # i, f, o: sigmoids
                i, f, o, g = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H], gates[:, 3 * H :]
                c_old.mul_(f).addcmul_(i, g)  # c' = f * c + i * tanh(g)
                h_new = buf["inp"][:n]
                torch.tanh(c_old, out=h_new)
                h_new.mul_(o)  # h' = o * tanh(c')
                h[layer].index_put_((rows,), h_new)
                c[layer].index_put_((rows,), c_old)
                inp = h_new
            torch.addmm(b_out, inp, w_out, out=out[start:stop])


def _check_fused_operands(x, slots, h, c, reset, layers, input_size, hidden) -> None:
    """The C kernel takes raw pointers: wrong dtypes, shapes, layouts or out-of-range slots would corrupt memory."""
    if not (h.dtype == c.dtype == x.dtype == torch.float32):
        raise ValueError(f"fused CPU step: x, h and c must be float32, got {x.dtype}, {h.dtype}, {c.dtype}")
    if h.shape != c.shape or h.dim() != 3 or h.shape[0] != layers or h.shape[2] != hidden:
        raise ValueError(f"fused CPU step: h and c must be [{layers}, S, {hidden}], got {tuple(h.shape)}")
    if not (h.is_contiguous() and c.is_contiguous()):
        raise ValueError("fused CPU step: h and c must be contiguous")
    if x.dim() != 2 or x.shape[1] != input_size:
        raise ValueError(f"fused CPU step: x must be [B, {input_size}], got {tuple(x.shape)}")
    if slots.dtype != torch.int64 or slots.dim() != 1 or not slots.is_contiguous() or slots.shape[0] != x.shape[0]:
        raise ValueError(f"fused CPU step: slots must be a contiguous int64 [{x.shape[0]}], got {slots.dtype}")
    if reset is not None and (reset.dtype != torch.bool or not reset.is_contiguous() or reset.shape != slots.shape):
        raise ValueError("fused CPU step: reset must be a contiguous bool tensor shaped like slots")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= h.shape[1]):
        raise ValueError(f"fused CPU step: slots must lie in [0, {h.shape[1]})")


# ---- per-stream adaptation of forecast models (daemon/normalization.py), inside the fused chunk -------------


class _AdaptationCall:
    """One wave's adaptation as the C calls' arguments: the FusedAdaptation's fixed ones (CpuStep._check_adaptation)
    and the wave's pointers, so that a chunk adds only its offsets (a tensor view per argument and chunk cost ~1 µs
    each)."""

    def __init__(self, fixed: tuple, dx: int, events: int, out: int, h0: int) -> None:
        table, S, width, self.columns, self.n_in, self.n_out, self.init, *rates, self.H, self.level = fixed
        self.table, self.rates = (table, S, width), tuple(rates)
        self.dx, self.events, self.out, self.h0 = dx, events, out, h0

    def begin(self, buf, start: int, n: int, rows_ptr: int, reset_ptr: int) -> torch.Tensor:
        """normalization.adapt_begin and stream_inputs for the chunk's rows with layer 0's gather into buf["h"], in
        one C pass: returns the LSTM's inputs clip(dx / new scale), leaves scale[cols] * gain in buf["factor"]
        (with the level: the guard's g there, and a * the change to the level in buf["offset"])."""
        scaled = buf["scaled"][:n]
        _cpu_kernel.adapt_begin(
            *self.table, rows_ptr, self.columns, n, self.n_in, self.n_out, reset_ptr, self.init,
            self.dx + 4 * start * self.n_in, scaled.data_ptr(), buf["factor"].data_ptr(), *self.rates, self.h0,
            buf["h"].data_ptr(), self.H, self.level, self.events + 4 * start * self.n_in, buf["offset"].data_ptr(),
        )  # fmt: skip
        return scaled

    def finish(self, buf, start: int, n: int, rows_ptr: int, change: torch.Tensor) -> None:
        """normalization.adapt_finish for the chunk: keeps each row's predicted `change` [n, O] and writes the
        guarded forecast events[cols] + factor * change into the wave's output rows start..start + n."""
        _cpu_kernel.adapt_finish(
            *self.table, rows_ptr, self.columns, n, self.n_in, self.n_out, buf["factor"].data_ptr(),
            self.events + 4 * start * self.n_in, change.data_ptr(), self.out + 4 * start * self.n_out, self.level,
            buf["offset"].data_ptr(),
        )  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_adaptation(adapt: FusedAdaptation, dx: torch.Tensor, capacity: int, n_out: int) -> None:
    """What the C side cannot see (it checks slot and column ranges and the row width itself), but the wave's
    events (CpuStep._check_adaptation checks those every wave)."""
    table, n_in = adapt.table, dx.shape[1]
    if table.dtype != torch.float32 or table.dim() != 2 or not table.is_contiguous() or table.device.type != "cpu":
        raise ValueError("fused adaptation: the table must be a contiguous float32 [S, width] CPU tensor")
    if table.shape[0] != capacity:
        raise ValueError(f"fused adaptation: the table has {table.shape[0]} rows, the state tables {capacity}")
    init = adapt.init
    if init.shape != (table.shape[1],) or init.dtype != torch.float32 or not init.is_contiguous():
        raise ValueError(f"fused adaptation: init must be a contiguous float32 [{table.shape[1]}]")
    steps = adapt.steps
    if steps.dim() != 2 or steps.shape[1] != 2 or steps.dtype != torch.float32 or not steps.is_contiguous():
        raise ValueError("fused adaptation: steps must be a contiguous float32 [k, 2]")
    columns = adapt.columns
    if columns is None and n_out != n_in:
        raise ValueError(f"fused adaptation: {n_out} outputs without forecast columns need {n_out} inputs, got {n_in}")
    if columns is not None and (
        columns.dtype != torch.int64 or not columns.is_contiguous() or columns.shape != (n_out,)
    ):
        raise ValueError(f"fused adaptation: columns must be a contiguous int64 [{n_out}]")
