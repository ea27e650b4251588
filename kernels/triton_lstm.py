"""Triton backend: the fused step over a resident state table, and the sequence forward/backward for TBPTT.

Dimension legend (every shape comment below uses it):
    B: events (streams) in the batch      S: state-table rows (slots)      L: layers
    H: hidden size                        I: input size of layer 0         T: time steps
    K: the reduction length of one matrix product (I or H for the gates, 4H for the backward)

Layers of this module, as in Liger-Kernel's ops:
    _lstm_step_kernel, _lstm_seq_fwd_kernel, _lstm_seq_bwd_kernel   private @triton.jit kernels
    lstm_step_, _LSTMSequence, lstm_sequence                         launchers / autograd.Function / public

Design (why it is shaped like this):
- One program owns whole rows: all H of a block of BLOCK_B streams, and all L layers. Slots are distinct,
  so the rows a program reads are exactly the rows it writes, and no program of the launch ever reads a row
  another one writes. Within a program a `tl.debug_barrier()` separates the last read of a row from its
  overwrite (the threads of one program read and write different parts of the row).
- The matrix products are K-looped from global memory: the left operand (x, or h of the previous layer or
  step) is re-read in BLOCK_K slices. For the step, layer l+1 reads layer l's new h back from the table rows
  this program has just written; for the sequence, step t reads h_{t-1} back from the output buffer. Register
  tensors cannot be sliced along K in Triton, and a whole [H, 4H] weight does not fit in registers past H≈64.
- Programs of one launch never wait for each other (no grid barrier), so the interpreter runs them, and a
  program may be scheduled in any order on the GPU.
- `tl.dot` wants M, N, K >= 16 on a GPU: BLOCK_B, BLOCK_H, BLOCK_K are all >= 16 and masked; the interpreter
  would accept smaller ones, the compiler would not.
- Precision: state, activations and accumulation are float32. Weights may be bfloat16 (upcast after the load,
  so they cost half the bytes and the products stay fp32). On a GPU `tl.dot` uses TF32 unless ALLOW_TF32 is
  False (about 1e-3 relative per product; tests switch it off for the tight comparisons).
- Limit: H <= MAX_HIDDEN. Four [BLOCK_B, BLOCK_H] fp32 gate accumulators live in registers; at BLOCK_B=16,
  H=512 that is 128 KB, half of an H100 SM's register file. Larger H raises ValueError. Compiled for sm_90
  (compile_check.py), every kernel fits in shared memory up to H=512, but registers saturate from H=128 and
  spill up to 1.2 KB per thread at H=512: slow there, not wrong. No GPU was available when this was written,
  so nothing here is timed; the first GPU run (`pytest -m cuda`) is the real launch test.
- Parallelism: a launch has cdiv(B, 16) programs, so a TBPTT window of B=256 keeps 16 SMs busy. Splitting H
  across programs would need a grid-wide barrier per time step (or one launch per step), which this design
  avoids so that the interpreter can run it.

Weight re-layouts (transposed [K, 4H] weights, b_ih + b_hh) are cached per parameter set and rebuilt when any
weight tensor's `_version` changes, i.e. after an in-place optimizer update. Writes through `.data` bypass the
version counter; call `clear_weight_cache()` after those.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from lstmd.kernels.reference import Params

MAX_HIDDEN = 512  # see the module docstring: four fp32 accumulators of [16, 512] per program
ALLOW_TF32 = True  # GPU only; the interpreter always computes in fp32
POISON_OUTPUTS = False  # tests set this: freshly allocated outputs are NaN, so an unwritten element shows


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: no libdevice call, so the interpreter runs it too; absolute error ~1e-7.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _accumulate_gates(
    acc_i,  # [BLOCK_B, BLOCK_H] fp32, gate i (input)
    acc_f,  # [BLOCK_B, BLOCK_H] fp32, gate f (forget)
    acc_g,  # [BLOCK_B, BLOCK_H] fp32, gate g (cell candidate)
    acc_o,  # [BLOCK_B, BLOCK_H] fp32, gate o (output)
    a_ptr,  # base of the left operand
    a_rows,  # [BLOCK_B] int64 element offset of each row of the left operand
    a_mask,  # [BLOCK_B] rows to read (masked rows read 0: padding, or a reset stream's state)
    w_ptr,  # [K, 4H] transposed weights (fp32 or bf16), gate q in columns [qH, (q+1)H)
    K,
    H,
    offs_h,  # [BLOCK_H]
    h_mask,  # [BLOCK_H]
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc_q += a[:, :K] @ w[:, qH:(q+1)H] for the four gates, K-looped from global memory."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] + offs_k[None, :], mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = w_ptr + offs_k[:, None].to(tl.int64) * (4 * H) + offs_h[None, :]
        w_mask = k_mask[:, None] & h_mask[None, :]
        w = tl.load(w_tile, mask=w_mask, other=0.0).to(tl.float32)
        acc_i = tl.dot(a, w, acc_i, input_precision=PREC)
        w = tl.load(w_tile + H, mask=w_mask, other=0.0).to(tl.float32)
        acc_f = tl.dot(a, w, acc_f, input_precision=PREC)
        w = tl.load(w_tile + 2 * H, mask=w_mask, other=0.0).to(tl.float32)
        acc_g = tl.dot(a, w, acc_g, input_precision=PREC)
        w = tl.load(w_tile + 3 * H, mask=w_mask, other=0.0).to(tl.float32)
        acc_o = tl.dot(a, w, acc_o, input_precision=PREC)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _lstm_step_kernel(
    x_ptr,  # [B, I] fp32
    slots_ptr,  # [B] int64, distinct rows of the tables
    reset_ptr,  # [B] int8, 1 = start this stream from zero state (read only if HAS_RESET)
    h_ptr,  # [L, S, H] fp32, updated in place at `slots`
    c_ptr,  # [L, S, H] fp32, updated in place at `slots`
    wx0_ptr,  # [I, 4H] layer 0's w_ih transposed
    wxr_ptr,  # [L-1, H, 4H] w_ih of layers 1.. transposed (unused when L == 1)
    wh_ptr,  # [L, H, 4H] w_hh transposed
    bias_ptr,  # [L, 4H] fp32, b_ih + b_hh
    y_ptr,  # [B, H] fp32 out: the last layer's new h
    B,
    IN,  # I (renamed: ruff E741)
    S,
    H,
    L: tl.constexpr,
    HAS_RESET: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    tile_mask = b_mask[:, None] & h_mask[None, :]
    slots = tl.load(slots_ptr + offs_b, mask=b_mask, other=0).to(tl.int64)
    if HAS_RESET:  # noqa: SIM108 (a constexpr branch: the unused load is not even compiled)
        # A reset stream reads its old state as zeros: the mask does the reset, no zeroing pass.
        keep = b_mask & (tl.load(reset_ptr + offs_b, mask=b_mask, other=1) == 0)
    else:
        keep = b_mask
    h_new = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for layer in tl.static_range(L):
        rows = (slots + layer * S) * H  # [BLOCK_B] int64 offsets of this layer's rows
        bias = bias_ptr + layer * 4 * H + offs_h
        zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        acc_i = zero + tl.load(bias, mask=h_mask, other=0.0)[None, :]
        acc_f = zero + tl.load(bias + H, mask=h_mask, other=0.0)[None, :]
        acc_g = zero + tl.load(bias + 2 * H, mask=h_mask, other=0.0)[None, :]
        acc_o = zero + tl.load(bias + 3 * H, mask=h_mask, other=0.0)[None, :]
        if layer == 0:
            acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
                acc_i, acc_f, acc_g, acc_o, x_ptr, offs_b.to(tl.int64) * IN, b_mask, wx0_ptr, IN, H,
                offs_h, h_mask, BLOCK_K, PREC,
            )  # fmt: skip
        else:
            # Input of layer l = new h of layer l-1: this program's own rows, stored just above.
            acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
                acc_i, acc_f, acc_g, acc_o, h_ptr, (slots + (layer - 1) * S) * H, b_mask,
                wxr_ptr + (layer - 1) * H * 4 * H, H, H, offs_h, h_mask, BLOCK_K, PREC,
            )  # fmt: skip
        acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
            acc_i, acc_f, acc_g, acc_o, h_ptr, rows, keep, wh_ptr + layer * H * 4 * H, H, H,
            offs_h, h_mask, BLOCK_K, PREC,
        )  # fmt: skip
        row_tile = rows[:, None] + offs_h[None, :]
        c_old = tl.load(c_ptr + row_tile, mask=keep[:, None] & h_mask[None, :], other=0.0)
        c_new = _sigmoid(acc_f) * c_old + _sigmoid(acc_i) * _tanh(acc_g)
        h_new = _sigmoid(acc_o) * _tanh(c_new)
        # Every thread of this program has finished reading these rows (h for the products, c above) before
        # any thread overwrites them; other programs never touch them (slots are distinct).
        tl.debug_barrier()
        tl.store(h_ptr + row_tile, h_new, mask=tile_mask)
        tl.store(c_ptr + row_tile, c_new, mask=tile_mask)
        # The next layer reads these rows back through other threads than the ones that wrote them.
        tl.debug_barrier()
    tl.store(y_ptr + offs_b[:, None].to(tl.int64) * H + offs_h[None, :], h_new, mask=tile_mask)


@triton.jit
def _lstm_seq_fwd_kernel(
    xw_ptr,  # [B, T, 4H] fp32: x @ w_ih^T + b_ih + b_hh, hoisted out of the recurrence
    wh_ptr,  # [H, 4H] w_hh transposed
    hs_ptr,  # [B, T+1, H] fp32: hs[:, 0] = h0 on entry; the kernel writes hs[:, t+1] = h_t
    cs_ptr,  # [B, T+1, H] fp32: cs[:, 0] = c0 on entry; the kernel writes cs[:, t+1] = c_t
    gates_ptr,  # [B, T, 4H] fp32 out: activated gates (i, f, g, o), saved for the backward
    B,
    T,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    tile_mask = b_mask[:, None] & h_mask[None, :]
    b64 = offs_b.to(tl.int64)
    c = tl.load(cs_ptr + (b64 * (T + 1))[:, None] * H + offs_h[None, :], mask=tile_mask, other=0.0)
    for t in range(T):
        g_rows = (b64 * T + t) * (4 * H)  # [BLOCK_B] offsets into xw / gates at step t
        g_tile = g_rows[:, None] + offs_h[None, :]
        acc_i = tl.load(xw_ptr + g_tile, mask=tile_mask, other=0.0)
        acc_f = tl.load(xw_ptr + g_tile + H, mask=tile_mask, other=0.0)
        acc_g = tl.load(xw_ptr + g_tile + 2 * H, mask=tile_mask, other=0.0)
        acc_o = tl.load(xw_ptr + g_tile + 3 * H, mask=tile_mask, other=0.0)
        prev_rows = (b64 * (T + 1) + t) * H  # h_{t-1}, written by this program at the previous step
        acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
            acc_i, acc_f, acc_g, acc_o, hs_ptr, prev_rows, b_mask, wh_ptr, H, H, offs_h, h_mask, BLOCK_K, PREC
        )
        gi = _sigmoid(acc_i)
        gf = _sigmoid(acc_f)
        gg = _tanh(acc_g)
        go = _sigmoid(acc_o)
        c = gf * c + gi * gg
        h = go * _tanh(c)
        tl.store(gates_ptr + g_tile, gi, mask=tile_mask)
        tl.store(gates_ptr + g_tile + H, gf, mask=tile_mask)
        tl.store(gates_ptr + g_tile + 2 * H, gg, mask=tile_mask)
        tl.store(gates_ptr + g_tile + 3 * H, go, mask=tile_mask)
        s_tile = (prev_rows + H)[:, None] + offs_h[None, :]
        tl.store(hs_ptr + s_tile, h, mask=tile_mask)
        tl.store(cs_ptr + s_tile, c, mask=tile_mask)
        # Step t+1 reads h_t back from hs in BLOCK_K slices, through other threads than the writers.
        tl.debug_barrier()


@triton.jit
def _lstm_seq_bwd_kernel(
    dy_ptr,  # [B, T, H] fp32: dL/dh_t from outside the recurrence (the layer above, or the loss)
    dhn_ptr,  # [B, H] fp32: dL/dh_n
    dcn_ptr,  # [B, H] fp32: dL/dc_n
    gates_ptr,  # [B, T, 4H] fp32: activated gates saved by the forward
    cs_ptr,  # [B, T+1, H] fp32: c0 and c_t saved by the forward
    w_ptr,  # [4H, H] w_hh in its own layout: dh_{t-1} = dgates_t @ w_hh
    dg_ptr,  # [B, T, 4H] fp32 out: dL/d(pre-activation gates)
    dh0_ptr,  # [B, H] fp32 out
    dc0_ptr,  # [B, H] fp32 out
    B,
    T,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    tile_mask = b_mask[:, None] & h_mask[None, :]
    b64 = offs_b.to(tl.int64)
    state_tile = (b64 * H)[:, None] + offs_h[None, :]
    dh_rec = tl.load(dhn_ptr + state_tile, mask=tile_mask, other=0.0)  # gradient reaching h_t through time
    dc = tl.load(dcn_ptr + state_tile, mask=tile_mask, other=0.0)
    for step in range(T):
        t = T - 1 - step
        g_rows = (b64 * T + t) * (4 * H)
        g_tile = g_rows[:, None] + offs_h[None, :]
        gi = tl.load(gates_ptr + g_tile, mask=tile_mask, other=0.0)
        gf = tl.load(gates_ptr + g_tile + H, mask=tile_mask, other=0.0)
        gg = tl.load(gates_ptr + g_tile + 2 * H, mask=tile_mask, other=0.0)
        go = tl.load(gates_ptr + g_tile + 3 * H, mask=tile_mask, other=0.0)
        c_rows = (b64 * (T + 1) + t) * H
        c_prev = tl.load(cs_ptr + c_rows[:, None] + offs_h[None, :], mask=tile_mask, other=0.0)
        c_t = tl.load(cs_ptr + (c_rows + H)[:, None] + offs_h[None, :], mask=tile_mask, other=0.0)
        y_tile = ((b64 * T + t) * H)[:, None] + offs_h[None, :]
        dh = dh_rec + tl.load(dy_ptr + y_tile, mask=tile_mask, other=0.0)
        tc = _tanh(c_t)
        dc = dc + dh * go * (1.0 - tc * tc)
        tl.store(dg_ptr + g_tile, dc * gg * gi * (1.0 - gi), mask=tile_mask)
        tl.store(dg_ptr + g_tile + H, dc * c_prev * gf * (1.0 - gf), mask=tile_mask)
        tl.store(dg_ptr + g_tile + 2 * H, dc * gi * (1.0 - gg * gg), mask=tile_mask)
        tl.store(dg_ptr + g_tile + 3 * H, dh * tc * go * (1.0 - go), mask=tile_mask)
        dc = dc * gf
        # dh_{t-1} = dgates_t @ w_hh reads the row just stored, in BLOCK_K slices, through other threads.
        tl.debug_barrier()
        dh_rec = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, 4 * H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < 4 * H
            a_mask = b_mask[:, None] & k_mask[None, :]
            a = tl.load(dg_ptr + g_rows[:, None] + offs_k[None, :], mask=a_mask, other=0.0)
            w = tl.load(
                w_ptr + offs_k[:, None].to(tl.int64) * H + offs_h[None, :],
                mask=k_mask[:, None] & h_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            dh_rec = tl.dot(a, w, dh_rec, input_precision=PREC)
    tl.store(dh0_ptr + state_tile, dh_rec, mask=tile_mask)
    tl.store(dc0_ptr + state_tile, dc, mask=tile_mask)


# Whether the kernels above were decorated under TRITON_INTERPRET=1 (then they run on CPU tensors, slowly).
INTERPRETED = type(_lstm_step_kernel).__name__ == "InterpretedFunction"

# ----------------------------------------------------------------------------------------------------------
# Launch configuration and the weight cache


class LaunchConfig(NamedTuple):
    block_b: int
    block_h: int
    block_k: int
    num_warps: int
    num_stages: int
    prec: str  # tl.dot input precision: "tf32" or "ieee"

    def constexprs(self) -> dict[str, object]:
        return {"BLOCK_B": self.block_b, "BLOCK_H": self.block_h, "BLOCK_K": self.block_k, "PREC": self.prec}


def launch_config(H: int, on_cuda: bool) -> LaunchConfig:
    """Block sizes, warps and pipeline stages for hidden size H (the same for all three kernels)."""
    if H > MAX_HIDDEN:
        raise ValueError(
            f"params: hidden size H={H} is above the Triton backend's limit of {MAX_HIDDEN} (one program "
            "holds four [16, H] fp32 gate tiles in registers); use backend='torch' for larger H"
        )
    block_h = max(16, triton.next_power_of_2(H))
    # BLOCK_B = 16 is tl.dot's minimum M. The rest was chosen by compiling for sm_90 without a GPU
    # (python -m lstmd.kernels.compile_check; registers and spill bytes from cuobjdump), not by timing — no GPU
    # was available; the bench sweep is where to tune it. At H=128, fp32 weights, L=2, the step kernel:
    #   4 warps, BLOCK_K=32, 2 stages: 255 registers + 392 B spilled;  8 warps, BLOCK_K=16, 2 stages: 190, none.
    # Stages: Triton's default of 3 needs 264 KB of shared memory at BLOCK_H=512, over the H100's 227 KB per
    # block; from BLOCK_H=256 one stage spills less (sequence backward at H=512: 1240 B vs 3880 B with 2).
    block_k = 16
    num_warps = 8
    num_stages = 2 if block_h <= 128 else 1
    prec = "tf32" if (ALLOW_TF32 and on_cuda) else "ieee"
    return LaunchConfig(16, block_h, block_k, num_warps, num_stages, prec)


def _new(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An output buffer the kernel must fill completely; NaN-poisoned under tests so a gap shows."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


class _WeightCache:
    """Derived weight layouts, keyed on the identity and `_version` of every weight tensor.

    An optimizer step updates parameters in place, which bumps `_version`, so the next call rebuilds. The
    entry holds weak references so a freed tensor whose id() is reused can never hit a stale entry.
    """

    def __init__(self, maxsize: int = 8) -> None:
        self._entries: OrderedDict[tuple, tuple[list, tuple[int, ...], object]] = OrderedDict()
        self._maxsize = maxsize

    def get(self, kind: str, params: Params, build: Callable[[Params], object]) -> object:
        flat = [t for p in params for t in p]
        if any(t.is_inference() for t in flat):  # inference tensors have no version counter: never cache
            with torch.no_grad():
                return build(params)
        key = (kind, *(id(t) for t in flat))
        versions = tuple(t._version for t in flat)
        entry = self._entries.get(key)
        if entry is not None:
            refs, cached_versions, value = entry
            if cached_versions == versions and all(r() is t for r, t in zip(refs, flat, strict=True)):
                self._entries.move_to_end(key)
                return value
        with torch.no_grad():
            value = build(params)
        self._entries[key] = ([weakref.ref(t) for t in flat], versions, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


_cache = _WeightCache()


def clear_weight_cache() -> None:
    """Forget every cached weight layout (needed only after writes that bypass `_version`, e.g. via .data)."""
    _cache.clear()


def _step_layout(params: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w_ih0 = params[0][0]
    wx0 = w_ih0.t().contiguous()  # [I, 4H]
    # [L-1, H, 4H]; when L == 1 the kernel never reads it, any tensor will do.
    wxr = torch.stack([p[0].t() for p in params[1:]]).contiguous() if len(params) > 1 else wx0
    wh = torch.stack([p[1].t() for p in params]).contiguous()  # [L, H, 4H]
    bias = torch.stack([p[2].float() + p[3].float() for p in params]).contiguous()  # [L, 4H] fp32
    return wx0, wxr, wh, bias


def _seq_layout(params: Params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Per layer: w_hh^T [H, 4H] for the forward's R·h, fp32 b_ih + b_hh [4H]. (The backward uses w_hh as it is.)
    return [(p[1].t().contiguous(), p[2].float() + p[3].float()) for p in params]


# ----------------------------------------------------------------------------------------------------------
# The step


def lstm_step_(
    x: torch.Tensor,  # [B, I] fp32
    slots: torch.Tensor,  # [B] int64/int32, distinct
    h: torch.Tensor,  # [L, S, H] fp32, contiguous, updated in place
    c: torch.Tensor,  # [L, S, H] fp32, contiguous, updated in place
    params: Params,
    reset: torch.Tensor | None = None,  # [B] bool
    out: torch.Tensor | None = None,  # [B, H] fp32, optional preallocated output, written completely
) -> torch.Tensor:  # [B, H]
    """One launch: gather rows → all L cells → scatter rows. Arguments are assumed checked (see _checks)."""
    L, S, H = h.shape
    B, n_in = x.shape
    cfg = launch_config(H, h.device.type == "cuda")
    y = out if out is not None else _new((B, H), h.device)
    if B == 0:
        return y
    wx0, wxr, wh, bias = _cache.get("step", params, _step_layout)
    x = x.contiguous()
    slots = slots.to(torch.int64).contiguous()
    reset_arg = reset.to(torch.int8).contiguous() if reset is not None else slots  # placeholder, never read
    grid = (triton.cdiv(B, cfg.block_b),)
    _lstm_step_kernel[grid](
        x, slots, reset_arg, h, c, wx0, wxr, wh, bias, y,
        B, n_in, S, H,
        L=L, HAS_RESET=reset is not None, **cfg.constexprs(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


# ----------------------------------------------------------------------------------------------------------
# The sequence: forward and backward per layer, wrapped in one autograd.Function over the whole stack


def _layer_forward(xw: torch.Tensor, wh_t: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
    """xw [B, T, 4H], wh_t [H, 4H], h0/c0 [B, H] → hs, cs [B, T+1, H] (index 0: initial), gates [B, T, 4H]."""
    B, T, H4 = xw.shape
    H = H4 // 4
    cfg = launch_config(H, xw.device.type == "cuda")
    hs = _new((B, T + 1, H), xw.device)
    cs = _new((B, T + 1, H), xw.device)
    hs[:, 0] = h0
    cs[:, 0] = c0
    gates = _new((B, T, 4 * H), xw.device)
    _lstm_seq_fwd_kernel[(triton.cdiv(B, cfg.block_b),)](
        xw, wh_t, hs, cs, gates,
        B, T, H,
        **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return hs, cs, gates


def _layer_backward(dy, dhn, dcn, gates, cs, w_hh):
    """The reverse-time recurrence: → dgates [B, T, 4H], dh0 [B, H], dc0 [B, H]."""
    B, T, H4 = gates.shape
    H = H4 // 4
    cfg = launch_config(H, gates.device.type == "cuda")
    dg = _new((B, T, 4 * H), gates.device)
    dh0 = _new((B, H), gates.device)
    dc0 = _new((B, H), gates.device)
    _lstm_seq_bwd_kernel[(triton.cdiv(B, cfg.block_b),)](
        dy, dhn, dcn, gates, cs, w_hh, dg, dh0, dc0,
        B, T, H,
        **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return dg, dh0, dc0


class _LSTMSequence(torch.autograd.Function):
    """Stacked LSTM over [B, T, I]. Inputs: x, h0, c0, then the 4L weights flattened layer by layer."""

    @staticmethod
    def forward(ctx, x, h0, c0, *weights):
        L = len(weights) // 4
        params = [tuple(weights[4 * k : 4 * k + 4]) for k in range(L)]
        layout = _cache.get("sequence", params, _seq_layout)
        inp = x
        saved, h_n, c_n = [], [], []
        for layer, (w_ih, _w_hh, _b_ih, _b_hh) in enumerate(params):
            wh_t, bias = layout[layer]
            B, T, _ = inp.shape
            # Hoisted input projection: one GEMM over B·T rows; the kernel only does R·h and the gate math.
            xw = torch.addmm(bias, inp.reshape(B * T, -1), w_ih.t().float()).view(B, T, -1)
            hs, cs, gates = _layer_forward(xw, wh_t, h0[layer], c0[layer])
            saved += [inp, hs, cs, gates]
            h_n.append(hs[:, T])
            c_n.append(cs[:, T])
            inp = hs[:, 1:]
        ctx.num_layers = L
        ctx.save_for_backward(*saved, *weights)
        y = inp.contiguous()
        return y, torch.stack(h_n), torch.stack(c_n)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is kernels, not a graph: no double backward
    def backward(ctx, dy, dh_n, dc_n):
        L = ctx.num_layers
        saved = ctx.saved_tensors
        acts, weights = saved[: 4 * L], saved[4 * L :]
        params = [tuple(weights[4 * k : 4 * k + 4]) for k in range(L)]
        B, T, _ = acts[0].shape
        H = params[0][1].shape[1]
        dev = acts[0].device
        zeros_state = torch.zeros(B, H, device=dev)
        d_out = dy.contiguous() if dy is not None else torch.zeros(B, T, H, device=dev)
        dh0s, dc0s = [None] * L, [None] * L
        grads: list[torch.Tensor | None] = [None] * (4 * L)
        for layer in reversed(range(L)):
            inp, hs, cs, gates = acts[4 * layer : 4 * layer + 4]
            w_ih, w_hh, b_ih, b_hh = params[layer]
            dhn = dh_n[layer].contiguous() if dh_n is not None else zeros_state
            dcn = dc_n[layer].contiguous() if dc_n is not None else zeros_state
            dg, dh0s[layer], dc0s[layer] = _layer_backward(d_out, dhn, dcn, gates, cs, w_hh.contiguous())
            # Weight gradients as plain GEMMs over all B·T rows: deterministic, no atomics.
            dg2 = dg.view(B * T, -1)  # [B·T, 4H]
            h_prev = hs[:, :T].reshape(B * T, H)  # h_{t-1} for every t
            db = dg2.sum(0)
            grads[4 * layer : 4 * layer + 4] = [
                (dg2.t() @ inp.reshape(B * T, -1)).to(w_ih.dtype),
                (dg2.t() @ h_prev).to(w_hh.dtype),
                db.to(b_ih.dtype),
                db.to(b_hh.dtype),
            ]
            d_out = (dg2 @ w_ih.float()).view(B, T, -1)  # gradient of this layer's input
        return d_out, torch.stack(dh0s), torch.stack(dc0s), *grads


def lstm_sequence(
    x: torch.Tensor,  # [B, T, I] fp32
    h0: torch.Tensor,  # [L, B, H] fp32
    c0: torch.Tensor,  # [L, B, H] fp32
    params: Params,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:  # y [B, T, H], (h_n, c_n) [L, B, H]
    """Stacked LSTM over T steps through the Triton kernels; differentiable in x, h0, c0 and every weight."""
    launch_config(params[0][1].shape[1], x.device.type == "cuda")  # the H limit, raised before any work
    weights = [t for p in params for t in p]
    y, h_n, c_n = _LSTMSequence.apply(x.contiguous(), h0.contiguous(), c0.contiguous(), *weights)
    return y, (h_n, c_n)
