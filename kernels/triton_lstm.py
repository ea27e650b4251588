"""Triton backend: the fused step over a resident state table, and the sequence forward/backward for TBPTT.

Dimension legend (every shape comment below uses it):
    B: events (streams) in the batch      S: state-table rows (slots)      L: layers
    H: hidden size                        I: input size of layer 0         T: time steps
    K: the reduction length of one matrix product (I or H for the gates, 4H for the backward)

Layers of this module, as in Liger-Kernel's ops:
    _lstm_step_kernel, _lstm_step_tiled_kernel, _scatter_rows_kernel,
    _lstm_seq_fwd_kernel, _lstm_seq_bwd_kernel, _lstm_seq_fwd_step_kernel, _lstm_seq_bwd_step_kernel
                                                                     private @triton.jit kernels
    plan_step, plan_sequence                                         the one choice of variant, by B and H
    lstm_step_, launch_step, _LSTMSequence, lstm_sequence            launchers / autograd.Function / public
    warm_up                                                          every reachable variant compiled up front

Variants (each chosen by plan_step / plan_sequence; FORCE_STEP_PLAN / FORCE_SEQUENCE_PLAN force one for tests
and the benchmark; the public contract of lstmd.kernels does not change with the variant):
    step "rows"       one launch; a program owns 16 whole rows through all L layers (the original design below)
    step "tiled"      one launch per layer over (row blocks of 64, H tiles of 32), then one scatter launch: 4x
                      fewer weight reads per row than "rows" at large B, and B/64 · H/32 programs
    sequence "rows"   one launch per layer and direction, a program loops over T for 16 whole rows
    sequence "steps"  one launch per time step over (row blocks of 16, H tiles of 32): more programs at small B
They are checked against nn.LSTM / nn.LSTMCell under the interpreter (tests/test_kernels.py) and, compiled, on
an H200 (scripts/gpu-check, 2026-11-28); the plans are chosen from that run's sweep (docs/benchmarks.md, "GPU").

Compiling: Triton compiles a kernel the first time it is launched with a new specialisation, in the launching
thread, holding the GIL for a while per variant. The integers that change from call to call (B, S, T, t,
layer) are therefore `do_not_specialize` (else B % 16 == 0 or t == 1 would each be a variant of its own), and
`warm_up` launches every variant the daemon can reach before it serves. On the first GPU run, without either, an
open-loop run's new batch sizes gave a 2.2 s p99; with both, 20 ms (docs/benchmarks.md, "GPU").

Design (why it is shaped like this):
- ("rows" variants) One program owns whole rows: all H of a block of BLOCK_B streams, and all L layers. Slots
  are distinct, so the rows a program reads are exactly the rows it writes, and no program of the launch ever
  reads a row another one writes. Within a program a `tl.debug_barrier()` separates the last read of a row from its
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
  spill up to 1.2 KB per thread at H=512: slow there, not wrong. The block sizes were chosen by compiling
  without a GPU; the plans (which variant at which B and H) by the first GPU run's timings.
- Parallelism: a "rows" launch has cdiv(B, 16) programs, so a TBPTT window of B=256 keeps 16 SMs busy.
  Splitting H across programs needs all of a row's previous h before any program goes on, so the split variants
  ("tiled", "steps") pay with one launch per layer or per time step instead of a grid-wide barrier, which the
  interpreter could not run (it runs programs one after another). In a CUDA graph those launches cost little.

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
from lstmd.kernels import _checks
from lstmd.kernels.reference import Params

MAX_HIDDEN = _checks.TRITON_MAX_HIDDEN  # see the module docstring: four fp32 accumulators of [16, 512] per program
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
def _sequence_cell_backward(dh, dc_next, gates_ptr, g_tile, H, cs_ptr, c_rows, offs_h, dg_ptr, tile_mask):
    """One time step's cell backward of the sequence kernels: from dh (the gradient reaching h_t) and dc_next
    (reaching c_t through time) store the gate pre-activation gradients in `dg` and return dc_{t-1}."""
    gi = tl.load(gates_ptr + g_tile, mask=tile_mask, other=0.0)
    gf = tl.load(gates_ptr + g_tile + H, mask=tile_mask, other=0.0)
    gg = tl.load(gates_ptr + g_tile + 2 * H, mask=tile_mask, other=0.0)
    go = tl.load(gates_ptr + g_tile + 3 * H, mask=tile_mask, other=0.0)
    c_prev = tl.load(cs_ptr + c_rows[:, None] + offs_h[None, :], mask=tile_mask, other=0.0)
    c_t = tl.load(cs_ptr + (c_rows + H)[:, None] + offs_h[None, :], mask=tile_mask, other=0.0)
    tc = _tanh(c_t)
    dc = dc_next + dh * go * (1.0 - tc * tc)
    tl.store(dg_ptr + g_tile, dc * gg * gi * (1.0 - gi), mask=tile_mask)
    tl.store(dg_ptr + g_tile + H, dc * c_prev * gf * (1.0 - gf), mask=tile_mask)
    tl.store(dg_ptr + g_tile + 2 * H, dc * gi * (1.0 - gg * gg), mask=tile_mask)
    tl.store(dg_ptr + g_tile + 3 * H, dh * tc * go * (1.0 - go), mask=tile_mask)
    return dc * gf


@triton.jit
def _sequence_cell(acc_i, acc_f, acc_g, acc_o, c_prev, gates_ptr, g_tile, H, hs_ptr, cs_ptr, s_tile, tile_mask):
    """One time step's cell of the sequence kernels: the activated gates go to `gates` (the backward pass reads
    them), the new h and c to the per-step tables at `s_tile`; returns (h, c)."""
    gi = _sigmoid(acc_i)
    gf = _sigmoid(acc_f)
    gg = _tanh(acc_g)
    go = _sigmoid(acc_o)
    c = gf * c_prev + gi * gg
    h = go * _tanh(c)
    tl.store(gates_ptr + g_tile, gi, mask=tile_mask)
    tl.store(gates_ptr + g_tile + H, gf, mask=tile_mask)
    tl.store(gates_ptr + g_tile + 2 * H, gg, mask=tile_mask)
    tl.store(gates_ptr + g_tile + 3 * H, go, mask=tile_mask)
    tl.store(hs_ptr + s_tile, h, mask=tile_mask)
    tl.store(cs_ptr + s_tile, c, mask=tile_mask)
    return h, c


@triton.jit(do_not_specialize=("B", "S"))
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


@triton.jit(do_not_specialize=("B", "T"))
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
        s_tile = (prev_rows + H)[:, None] + offs_h[None, :]
        h, c = _sequence_cell(acc_i, acc_f, acc_g, acc_o, c, gates_ptr, g_tile, H, hs_ptr, cs_ptr, s_tile, tile_mask)
        # Step t+1 reads h_t back from hs in BLOCK_K slices, through other threads than the writers.
        tl.debug_barrier()


@triton.jit(do_not_specialize=("B", "T"))
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
        y_tile = ((b64 * T + t) * H)[:, None] + offs_h[None, :]
        dh = dh_rec + tl.load(dy_ptr + y_tile, mask=tile_mask, other=0.0)
        c_rows = (b64 * (T + 1) + t) * H
        dc = _sequence_cell_backward(dh, dc, gates_ptr, g_tile, H, cs_ptr, c_rows, offs_h, dg_ptr, tile_mask)
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


@triton.jit(do_not_specialize=("B", "S", "layer"))
def _lstm_step_tiled_kernel(
    inp_ptr,  # [B, K_in] fp32, dense by event: x for layer 0, the previous layer's new h (its `hn`) otherwise
    slots_ptr,  # [B] int64, distinct rows of the tables
    reset_ptr,  # [B] int8 (read only if HAS_RESET)
    h_ptr,  # [L, S, H] fp32 table
    c_ptr,  # [L, S, H] fp32 table
    w_in_ptr,  # [K_in, 4H] this layer's w_ih transposed
    w_h_ptr,  # [H, 4H] this layer's w_hh transposed
    bias_ptr,  # [4H] fp32, this layer's b_ih + b_hh
    hn_ptr,  # [B, H] fp32 out, dense by event: this layer's new h
    B,
    K_in,
    S,
    H,
    layer,  # this launch's layer: its rows are (slot + layer * S)
    HAS_RESET: tl.constexpr,
    IN_PLACE: tl.constexpr,  # one H tile per row block: write the new h rows straight into the table
    SCATTER_PREV: tl.constexpr,  # write the previous layer's new h (inp) into its table rows, this tile's columns
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,  # the columns of H one program computes (a tile, not necessarily all of H)
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """One layer of the step for a [BLOCK_B rows, BLOCK_H columns] tile of every gate; grid (row blocks, H tiles).

    A tile needs the whole old h row for R·h, so when H is split over programs no program may write a layer's h
    rows during that layer's launch: the new h goes to the dense `hn` buffer, and the next layer's launch (which
    reads layer l's rows of no table) scatters it, tile by tile; the last layer's is scattered by
    _scatter_rows_kernel. c is read and written by the tile that owns those columns only, so it is updated in
    place. With a single H tile (IN_PLACE) a program owns whole rows, as in _lstm_step_kernel.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    tile_mask = b_mask[:, None] & h_mask[None, :]
    b64 = offs_b.to(tl.int64)
    slots = tl.load(slots_ptr + offs_b, mask=b_mask, other=0).to(tl.int64)
    if HAS_RESET:  # noqa: SIM108 (a constexpr branch)
        keep = b_mask & (tl.load(reset_ptr + offs_b, mask=b_mask, other=1) == 0)
    else:
        keep = b_mask
    rows = (slots + layer * S) * H
    zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_i = zero + tl.load(bias_ptr + offs_h, mask=h_mask, other=0.0)[None, :]
    acc_f = zero + tl.load(bias_ptr + H + offs_h, mask=h_mask, other=0.0)[None, :]
    acc_g = zero + tl.load(bias_ptr + 2 * H + offs_h, mask=h_mask, other=0.0)[None, :]
    acc_o = zero + tl.load(bias_ptr + 3 * H + offs_h, mask=h_mask, other=0.0)[None, :]
    acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
        acc_i, acc_f, acc_g, acc_o, inp_ptr, b64 * K_in, b_mask, w_in_ptr, K_in, H, offs_h, h_mask, BLOCK_K, PREC
    )
    acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
        acc_i, acc_f, acc_g, acc_o, h_ptr, rows, keep, w_h_ptr, H, H, offs_h, h_mask, BLOCK_K, PREC
    )
    row_tile = rows[:, None] + offs_h[None, :]
    c_old = tl.load(c_ptr + row_tile, mask=keep[:, None] & h_mask[None, :], other=0.0)
    c_new = _sigmoid(acc_f) * c_old + _sigmoid(acc_i) * _tanh(acc_g)
    h_new = _sigmoid(acc_o) * _tanh(c_new)
    dense_tile = (b64 * H)[:, None] + offs_h[None, :]
    tl.store(hn_ptr + dense_tile, h_new, mask=tile_mask)
    if SCATTER_PREV:
        # Layer l-1's table rows are read by no program of this launch (its new h comes from `inp`).
        prev_tile = ((slots + (layer - 1) * S) * H)[:, None] + offs_h[None, :]
        prev = tl.load(inp_ptr + dense_tile, mask=tile_mask, other=0.0)
        tl.store(h_ptr + prev_tile, prev, mask=tile_mask)
    # Every thread has read this tile's old h (the K loop) and c before any thread overwrites them.
    tl.debug_barrier()
    tl.store(c_ptr + row_tile, c_new, mask=tile_mask)
    if IN_PLACE:
        tl.store(h_ptr + row_tile, h_new, mask=tile_mask)


@triton.jit(do_not_specialize=("B", "S", "layer"))
def _scatter_rows_kernel(
    src_ptr,  # [B, H] fp32, dense by event
    slots_ptr,  # [B] int64
    h_ptr,  # [L, S, H] fp32 table
    B,
    S,
    H,
    layer,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """table[layer, slots[b], :] = src[b, :]: the last layer's new h, after the tiled step's last launch."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b < B)[:, None] & (offs_h < H)[None, :]
    slots = tl.load(slots_ptr + offs_b, mask=offs_b < B, other=0).to(tl.int64)
    val = tl.load(src_ptr + (offs_b.to(tl.int64) * H)[:, None] + offs_h[None, :], mask=mask, other=0.0)
    tl.store(h_ptr + ((slots + layer * S) * H)[:, None] + offs_h[None, :], val, mask=mask)


@triton.jit(do_not_specialize=("B", "T", "t"))
def _lstm_seq_fwd_step_kernel(
    xw_ptr,  # [B, T, 4H] fp32: x @ w_ih^T + b_ih + b_hh
    wh_ptr,  # [H, 4H] w_hh transposed
    hs_ptr,  # [B, T+1, H] fp32: reads hs[:, t], writes hs[:, t+1]
    cs_ptr,  # [B, T+1, H] fp32: reads cs[:, t], writes cs[:, t+1]
    gates_ptr,  # [B, T, 4H] fp32 out: activated gates at step t
    B,
    T,
    H,
    t,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,  # a tile of H: the grid is (row blocks, H tiles)
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """Time step t of the sequence forward for one [BLOCK_B, BLOCK_H] tile: one launch per step, so H can be
    split over programs (the whole h_{t-1} row was written by the previous launch) and a small batch still fills
    the GPU. Nothing written here is read by this launch: it reads index t and writes index t+1."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    tile_mask = b_mask[:, None] & h_mask[None, :]
    b64 = offs_b.to(tl.int64)
    g_tile = ((b64 * T + t) * (4 * H))[:, None] + offs_h[None, :]
    acc_i = tl.load(xw_ptr + g_tile, mask=tile_mask, other=0.0)
    acc_f = tl.load(xw_ptr + g_tile + H, mask=tile_mask, other=0.0)
    acc_g = tl.load(xw_ptr + g_tile + 2 * H, mask=tile_mask, other=0.0)
    acc_o = tl.load(xw_ptr + g_tile + 3 * H, mask=tile_mask, other=0.0)
    prev_rows = (b64 * (T + 1) + t) * H
    acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
        acc_i, acc_f, acc_g, acc_o, hs_ptr, prev_rows, b_mask, wh_ptr, H, H, offs_h, h_mask, BLOCK_K, PREC
    )
    c_prev = tl.load(cs_ptr + prev_rows[:, None] + offs_h[None, :], mask=tile_mask, other=0.0)
    s_tile = (prev_rows + H)[:, None] + offs_h[None, :]
    _sequence_cell(acc_i, acc_f, acc_g, acc_o, c_prev, gates_ptr, g_tile, H, hs_ptr, cs_ptr, s_tile, tile_mask)


@triton.jit(do_not_specialize=("B", "T", "t"))
def _lstm_seq_bwd_step_kernel(
    dy_ptr,  # [B, T, H] fp32: dL/dh_t from outside the recurrence
    dhn_ptr,  # [B, H] fp32: dL/dh_n (read at the first launch, t = T-1)
    dc_ptr,  # [B, H] fp32 in/out: dL/dc carried between launches (dL/dc_n before the first), times f_{t+1}
    gates_ptr,  # [B, T, 4H] fp32: activated gates saved by the forward
    cs_ptr,  # [B, T+1, H] fp32: c0 and c_t saved by the forward
    w_ptr,  # [4H, H] w_hh: dh_t through time = dgates_{t+1} @ w_hh
    dg_ptr,  # [B, T, 4H] fp32: reads dgates_{t+1}, writes dgates_t
    dh0_ptr,  # [B, H] fp32 out (the FINAL launch only)
    B,
    T,
    H,
    t,  # the step this launch computes dgates for; FINAL: 0 (dh0 = dgates_0 @ w_hh)
    FIRST: tl.constexpr,  # t = T-1: the gradient through time is dL/dh_n
    FINAL: tl.constexpr,  # after t = 0: only dh0 = dgates_0 @ w_hh
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """One reverse time step of the sequence backward for a [BLOCK_B, BLOCK_H] tile; launches t = T-1 .. 0, then
    one FINAL launch. The product through time needs all 4H columns of dgates_{t+1}, which the previous launch
    wrote; dL/dc stays with the tile that owns its columns, in dc_ptr between launches."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    tile_mask = b_mask[:, None] & h_mask[None, :]
    b64 = offs_b.to(tl.int64)
    state_tile = (b64 * H)[:, None] + offs_h[None, :]
    if FIRST:
        dh_rec = tl.load(dhn_ptr + state_tile, mask=tile_mask, other=0.0)
    else:
        # dgates of the step after this one (t+1; for FINAL, t = 0 itself) @ w_hh
        nxt = t if FINAL else t + 1
        dh_rec = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        n_rows = (b64 * T + nxt) * (4 * H)
        for k0 in range(0, 4 * H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < 4 * H
            a = tl.load(dg_ptr + n_rows[:, None] + offs_k[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(
                w_ptr + offs_k[:, None].to(tl.int64) * H + offs_h[None, :],
                mask=k_mask[:, None] & h_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            dh_rec = tl.dot(a, w, dh_rec, input_precision=PREC)
    if FINAL:
        tl.store(dh0_ptr + state_tile, dh_rec, mask=tile_mask)
    else:
        g_tile = ((b64 * T + t) * (4 * H))[:, None] + offs_h[None, :]
        dh = dh_rec + tl.load(dy_ptr + ((b64 * T + t) * H)[:, None] + offs_h[None, :], mask=tile_mask, other=0.0)
        c_rows = (b64 * (T + 1) + t) * H
        dc_next = tl.load(dc_ptr + state_tile, mask=tile_mask, other=0.0)
        dc = _sequence_cell_backward(dh, dc_next, gates_ptr, g_tile, H, cs_ptr, c_rows, offs_h, dg_ptr, tile_mask)
        tl.store(dc_ptr + state_tile, dc, mask=tile_mask)


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


class StepWeights(NamedTuple):
    """The step's weight layouts (see _step_layout)."""

    wx0: torch.Tensor  # [I, 4H] layer 0's w_ih transposed
    wxr: torch.Tensor  # [L-1, H, 4H] w_ih of layers 1.. transposed (wx0 when L == 1: never read)
    wh: torch.Tensor  # [L, H, 4H] w_hh transposed
    bias: torch.Tensor  # [L, 4H] fp32, b_ih + b_hh


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


class StepPlan(NamedTuple):
    """How one step is launched: "rows" (one launch, a program owns BLOCK_B whole rows through all L layers) or
    "tiled" (one launch per layer over (row blocks, H tiles), plus one scatter launch unless a tile is all of H)."""

    kind: str  # "rows" or "tiled"
    block_b: int
    block_h: int  # tiled: the H columns of one program's tile (a power of two >= 16)


# The tiled step's tile: 64 rows x 32 columns of H (tiled_config says why this one)
TILED_STEP = StepPlan("tiled", 64, 32)


def rows_step(H: int) -> StepPlan:
    """The "rows" step plan at hidden size H: 16 whole rows per program."""
    return StepPlan("rows", 16, max(16, triton.next_power_of_2(H)))


# The tiled step's last launch copies [B, H] rows: tiles of 32 x 64, 4 warps (a copy; nothing to tune yet).
SCATTER_BLOCKS = (32, 64)
SCATTER_WARPS = 4
# Tests and the benchmark force a plan here (None: plan_step decides).
FORCE_STEP_PLAN: StepPlan | None = None


def plan_step(B: int, H: int) -> StepPlan:
    """The launch plan for a step of B events at hidden size H: the one place the variant is chosen.

    From the H200 sweep (docs/benchmarks.md, "GPU", 2026-11-28; L=1, I=64, fp32 weights, TF32): up to H=128 the
    single-launch "rows" kernel is as fast or faster at every B (B=16384: 0.061 ms against tiled's 0.085; B=4096
    in a CUDA graph: 0.023 against 0.028). From H=256 the tiled variant wins at every B measured (256 to
    16384): a "rows" program reads the whole 4H·(I+H) weight matrix for its 16 rows, a tiled one 64 rows' worth
    per H tile (H=256, B=16384: 0.22 ms against 0.37; H=512, B=256: 0.037 against 0.149). B is kept in the
    signature: the crossover may move with L or I, which the sweep did not vary.
    """
    if FORCE_STEP_PLAN is not None:
        return FORCE_STEP_PLAN
    if H >= 256:
        return TILED_STEP
    return rows_step(H)


def tiled_config(plan: StepPlan, H: int, on_cuda: bool) -> LaunchConfig:
    """Warps, BLOCK_K and stages of the tiled step for its [block_b, block_h] tile.

    Chosen by compiling for sm_90 (compile_check), not by timing. Tiled step, fp32 weights, TF32:
    64x32 tile, 8 warps, BLOCK_K=32, 2 stages: 184 registers, no spill, 48 KB shared;
    64x64 tile, 8 warps, BLOCK_K=16, 1 stage: 255 registers and 32 B spilled; 32x64, 4 warps: 112 B spilled.
    """
    tile = plan.block_b * plan.block_h  # elements of one gate accumulator
    prec = "tf32" if (ALLOW_TF32 and on_cuda) else "ieee"
    if tile <= 2048:
        return LaunchConfig(plan.block_b, plan.block_h, 32, 8 if tile >= 2048 else 4, 2, prec)
    return LaunchConfig(plan.block_b, plan.block_h, 16, 8, 1, prec)


def lstm_step_(
    x: torch.Tensor,  # [B, I] fp32
    slots: torch.Tensor,  # [B] int64/int32, distinct
    h: torch.Tensor,  # [L, S, H] fp32, contiguous, updated in place
    c: torch.Tensor,  # [L, S, H] fp32, contiguous, updated in place
    params: Params,
    reset: torch.Tensor | None = None,  # [B] bool
    out: torch.Tensor | None = None,  # [B, H] fp32, optional preallocated output, written completely
    plan: StepPlan | None = None,  # None: plan_step(B, H)
) -> torch.Tensor:  # [B, H]
    """gather rows → all L cells → scatter rows. Arguments are assumed checked (see _checks)."""
    L, S, H = h.shape
    B, n_in = x.shape
    launch_config(H, h.device.type == "cuda")  # the H limit
    y = out if out is not None else _new((B, H), h.device)
    if B == 0:
        return y
    return launch_step(x, slots, h, c, _cache.get("step", params, _step_layout), reset, y, plan or plan_step(B, H))


def prepare_step_weights(params: Params) -> StepWeights:
    """The step's weight layouts for `params`, outside the cache: a caller that captures the step in a CUDA graph
    owns these tensors and refreshes them in place with `load_step_weights` when the weights change."""
    with torch.no_grad():
        return StepWeights(*_step_layout(params))


def load_step_weights(weights: StepWeights, params: Params) -> None:
    """Copy the layouts of new `params` (same shapes and dtypes) into `weights`' tensors, in place."""
    with torch.no_grad():
        for dst, src in zip(weights, _step_layout(params), strict=True):
            dst.copy_(src)


def launch_step(
    x: torch.Tensor,  # [B, I] fp32
    slots: torch.Tensor,  # [B] int64
    h: torch.Tensor,  # [L, S, H]
    c: torch.Tensor,  # [L, S, H]
    weights: StepWeights | tuple,  # _step_layout(params)
    reset: torch.Tensor | None,  # [B] bool
    y: torch.Tensor,  # [B, H] out
    plan: StepPlan,
) -> torch.Tensor:
    """The launches of one step with prepared weights; no host synchronisation, so a CUDA graph can capture it."""
    L, S, H = h.shape
    B, n_in = x.shape
    on_cuda = h.device.type == "cuda"
    wx0, wxr, wh, bias = weights
    x = x.contiguous()
    slots = slots.to(torch.int64).contiguous()
    reset_arg = reset.to(torch.int8).contiguous() if reset is not None else slots  # placeholder, never read
    if plan.kind == "rows":
        cfg = launch_config(H, on_cuda)._replace(block_b=plan.block_b)
        _lstm_step_kernel[(triton.cdiv(B, cfg.block_b),)](
            x, slots, reset_arg, h, c, wx0, wxr, wh, bias, y,
            B, n_in, S, H,
            L=L, HAS_RESET=reset is not None, **cfg.constexprs(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return y
    if plan.kind != "tiled":
        raise ValueError(f"plan: unknown step variant {plan.kind!r} (expected 'rows' or 'tiled')")
    cfg = tiled_config(plan, H, on_cuda)
    h_tiles = triton.cdiv(H, cfg.block_h)
    in_place = h_tiles == 1
    grid = (triton.cdiv(B, cfg.block_b), h_tiles)
    # Layers l < L-1 write their new h into one of two dense buffers: launch l+1 reads buffer l while it
    # writes the other. The last layer writes y.
    dense = [_new((B, H), h.device) for _ in range(min(L - 1, 2))]
    inp, k_in = x, n_in
    for layer in range(L):
        hn = y if layer == L - 1 else dense[layer % 2]
        w_in = wx0 if layer == 0 else wxr[layer - 1]
        _lstm_step_tiled_kernel[grid](
            inp, slots, reset_arg, h, c, w_in, wh[layer], bias[layer], hn,
            B, k_in, S, H, layer,
            HAS_RESET=reset is not None, IN_PLACE=in_place, SCATTER_PREV=(layer > 0 and not in_place),
            **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        inp, k_in = hn, H
    if not in_place:
        sb, sh = SCATTER_BLOCKS
        _scatter_rows_kernel[(triton.cdiv(B, sb), triton.cdiv(H, sh))](
            y, slots, h, B, S, H, L - 1, BLOCK_B=sb, BLOCK_H=sh, num_warps=SCATTER_WARPS
        )
    return y


# ----------------------------------------------------------------------------------------------------------
# The sequence: forward and backward per layer, wrapped in one autograd.Function over the whole stack


class SequencePlan(NamedTuple):
    """How the sequence kernels run: "rows" (one launch per layer and direction, a program owns BLOCK_B whole
    rows and loops over T) or "steps" (one launch per time step over (row blocks, H tiles) of block_h columns)."""

    kind: str  # "rows" or "steps"
    block_h: int  # steps: the H columns of one program's tile


# Tests and the benchmark force a plan here (None: plan_sequence decides).
FORCE_SEQUENCE_PLAN: SequencePlan | None = None
STEPS_MAX_B = 512  # plan_sequence: the largest window batch that may run as "steps"
STEPS_SEQUENCE = SequencePlan("steps", 32)  # H tiles of 32 (_steps_config)


def rows_sequence(H: int) -> SequencePlan:
    """The "rows" sequence plan at hidden size H: a program owns 16 whole rows through T."""
    return SequencePlan("rows", max(16, triton.next_power_of_2(H)))


def plan_sequence(B: int, H: int) -> SequencePlan:
    """The sequence variant for a window of B streams at hidden size H.

    From the H200 sweep (docs/benchmarks.md, "GPU", 2026-11-28; forward + backward): "rows" (one launch per layer
    and direction) beat "steps" (T launches forward and T+1 backward per layer, H split in tiles of 32) at
    B=256, T=64, H=128, L=2 (3.5 ms against 11.5) and at B=64, T=32, H=256 (2.5 against 4.0), and tied at
    B=256, T=64, H=256, L=2 (10.6 against 10.4). "steps" is kept for H > 256 at small B, where a "rows" program's
    four [16, H] accumulators spill (compile_check) and cdiv(B, 16) programs leave most SMs idle: not timed yet.
    """
    if FORCE_SEQUENCE_PLAN is not None:
        return FORCE_SEQUENCE_PLAN
    if B <= STEPS_MAX_B and H > 256:
        return STEPS_SEQUENCE
    return rows_sequence(H)


def _steps_config(plan: SequencePlan, on_cuda: bool) -> LaunchConfig:
    prec = "tf32" if (ALLOW_TF32 and on_cuda) else "ieee"
    return LaunchConfig(16, plan.block_h, 32, 4, 2, prec)


def _layer_forward(xw: torch.Tensor, wh_t: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, plan: SequencePlan):
    """xw [B, T, 4H], wh_t [H, 4H], h0/c0 [B, H] → hs, cs [B, T+1, H] (index 0: initial), gates [B, T, 4H]."""
    B, T, H4 = xw.shape
    H = H4 // 4
    on_cuda = xw.device.type == "cuda"
    hs = _new((B, T + 1, H), xw.device)
    cs = _new((B, T + 1, H), xw.device)
    hs[:, 0] = h0
    cs[:, 0] = c0
    gates = _new((B, T, 4 * H), xw.device)
    if plan.kind == "steps":
        cfg = _steps_config(plan, on_cuda)
        grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
        for t in range(T):
            _lstm_seq_fwd_step_kernel[grid](
                xw, wh_t, hs, cs, gates, B, T, H, t,
                **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        return hs, cs, gates
    cfg = launch_config(H, on_cuda)
    _lstm_seq_fwd_kernel[(triton.cdiv(B, cfg.block_b),)](
        xw, wh_t, hs, cs, gates,
        B, T, H,
        **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return hs, cs, gates


def _layer_backward(dy, dhn, dcn, gates, cs, w_hh, plan: SequencePlan):
    """The reverse-time recurrence: → dgates [B, T, 4H], dh0 [B, H], dc0 [B, H]."""
    B, T, H4 = gates.shape
    H = H4 // 4
    on_cuda = gates.device.type == "cuda"
    dg = _new((B, T, 4 * H), gates.device)
    dh0 = _new((B, H), gates.device)
    if plan.kind == "steps":
        cfg = _steps_config(plan, on_cuda)
        grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_h))
        dc = dcn.clone()  # carried between launches; dc0 at the end
        launches = [(t, t == T - 1, False) for t in range(T - 1, -1, -1)] + [(0, False, True)]
        for t, first, final in launches:
            _lstm_seq_bwd_step_kernel[grid](
                dy, dhn, dc, gates, cs, w_hh, dg, dh0, B, T, H, t,
                FIRST=first, FINAL=final, **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        return dg, dh0, dc
    dc0 = _new((B, H), gates.device)
    cfg = launch_config(H, on_cuda)
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
        plan = plan_sequence(x.shape[0], params[0][1].shape[1])
        inp = x
        saved, h_n, c_n = [], [], []
        for layer, (w_ih, _w_hh, _b_ih, _b_hh) in enumerate(params):
            wh_t, bias = layout[layer]
            B, T, _ = inp.shape
            # Hoisted input projection: one GEMM over B·T rows; the kernel only does R·h and the gate math.
            xw = torch.addmm(bias, inp.reshape(B * T, -1), w_ih.t().float()).view(B, T, -1)
            hs, cs, gates = _layer_forward(xw, wh_t, h0[layer], c0[layer], plan)
            saved += [inp, hs, cs, gates]
            h_n.append(hs[:, T])
            c_n.append(cs[:, T])
            inp = hs[:, 1:]
        ctx.num_layers = L
        ctx.plan = plan
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
            dg, dh0s[layer], dc0s[layer] = _layer_backward(d_out, dhn, dcn, gates, cs, w_hh.contiguous(), ctx.plan)
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


# ----------------------------------------------------------------------------------------------------------
# Compiling up front


def _kernels() -> tuple:
    return (_lstm_step_kernel, _lstm_step_tiled_kernel, _scatter_rows_kernel, _lstm_seq_fwd_kernel,
            _lstm_seq_bwd_kernel, _lstm_seq_fwd_step_kernel, _lstm_seq_bwd_step_kernel)  # fmt: skip


def compiled_variants() -> int:
    """How many compiled variants the kernels of this module hold in this process (0 under the interpreter)."""
    caches = (getattr(k, "device_caches", {}) for k in _kernels())
    return sum(len(entry[0]) for cache in caches for entry in cache.values())


def warm_up(params: Params, *, step: bool = True, sequence: bool = False) -> int:
    """Launch every variant the daemon can reach with `params`' shapes and dtypes, on their device, on throwaway
    tensors: the step's plans at the smallest and largest batches, each with and without resets, and (sequence)
    the sequence plans forward and backward. Nothing the caller owns is written. Called before the daemon serves
    (see the module docstring, "Compiling"); returns the number of variants compiled, 0 when all were cached."""
    device = params[0][1].device
    before = compiled_variants()
    L, H, n_in = len(params), params[0][1].shape[1], params[0][0].shape[1]
    gen = torch.Generator(device=device).manual_seed(0)
    if step:
        B = 16
        h = torch.zeros(L, B + 1, H, device=device)
        c = torch.zeros_like(h)
        x = torch.rand(B, n_in, device=device, generator=gen)
        slots = torch.arange(1, B + 1, device=device)
        weights = prepare_step_weights(params)
        for plan in {plan_step(b, H) for b in (1, 1 << 14)}:  # any B runs any plan: 16 rows will do
            for reset in (None, torch.ones(B, dtype=torch.bool, device=device)):
                launch_step(x, slots, h, c, weights, reset, torch.empty(B, H, device=device), plan)
    if sequence:
        with torch.enable_grad():
            layers = [tuple(w.detach().clone().requires_grad_(True) for w in layer) for layer in params]
            batches = {}  # one batch size per reachable plan
            for b in (16, STEPS_MAX_B + 1):
                batches.setdefault(plan_sequence(b, H), b)
            for B in batches.values():
                x = torch.rand(B, 2, n_in, device=device, generator=gen)
                h0 = torch.zeros(L, B, H, device=device)
                y, (h_n, c_n) = lstm_sequence(x, h0, h0.clone(), layers)
                (y.sum() + h_n.sum() + c_n.sum()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return compiled_variants() - before
