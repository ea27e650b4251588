"""PyTorch reference backend: the same contract as the Triton kernels, in plain torch ops.

It serves the CPU and is what the Triton kernels are tested against (together with torch.nn.LSTM).

Shapes: B events in the batch, S state-table rows, L layers, H hidden, I input, T time steps.
Weights are in torch.nn.LSTM layout and gate order (i, f, g, o).
"""

from __future__ import annotations

import torch

Params = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _cell(
    x: torch.Tensor,  # [B, I_l]
    h: torch.Tensor,  # [B, H]
    c: torch.Tensor,  # [B, H]
    w_ih: torch.Tensor,  # [4H, I_l]
    w_hh: torch.Tensor,  # [4H, H]
    bias: torch.Tensor,  # [4H] (b_ih + b_hh)
) -> tuple[torch.Tensor, torch.Tensor]:
    gates = torch.addmm(bias, x, w_ih.t()) + h @ w_hh.t()
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def lstm_step_(
    x: torch.Tensor,  # [B, I]
    slots: torch.Tensor,  # [B] int64, distinct
    h: torch.Tensor,  # [L, S, H] updated in place at `slots`
    c: torch.Tensor,  # [L, S, H] updated in place at `slots`
    params: Params,
    reset: torch.Tensor | None = None,  # [B] bool
) -> torch.Tensor:  # [B, H]
    """Advance the streams at `slots` by one step through all layers; return the last layer's new h."""
    inp = x
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(params):
        h_old = h[layer].index_select(0, slots)
        c_old = c[layer].index_select(0, slots)
        if reset is not None:
            # masked_fill, not a multiply: a reset row may hold NaN (a dead stream), and 0 * NaN = NaN.
            zero = reset.unsqueeze(1)
            h_old, c_old = h_old.masked_fill(zero, 0.0), c_old.masked_fill(zero, 0.0)
        w_ih_, w_hh_, bias = w_ih.to(h.dtype), w_hh.to(h.dtype), b_ih.to(h.dtype) + b_hh.to(h.dtype)
        h_new, c_new = _cell(inp.to(h.dtype), h_old, c_old, w_ih_, w_hh_, bias)
        h[layer].index_copy_(0, slots, h_new)
        c[layer].index_copy_(0, slots, c_new)
        inp = h_new
    return inp


def lstm_sequence(
    x: torch.Tensor,  # [B, T, I]
    h0: torch.Tensor,  # [L, B, H]
    c0: torch.Tensor,  # [L, B, H]
    params: Params,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:  # y [B, T, H], (h_n, c_n) [L, B, H]
    """Run L stacked layers over T steps; differentiable through autograd in every input and weight."""
    inp = x
    h_n, c_n = [], []
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(params):
        w_ih_, w_hh_ = w_ih.to(x.dtype), w_hh.to(x.dtype)
        # Hoisted input projection: one GEMM over B*T instead of T small ones.
        xw = torch.matmul(inp, w_ih_.t()) + (b_ih.to(x.dtype) + b_hh.to(x.dtype))  # [B, T, 4H]
        h, c = h0[layer], c0[layer]
        outs = []
        for t in range(x.shape[1]):
            gates = xw[:, t] + h @ w_hh_.t()
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        inp = torch.stack(outs, dim=1)
        h_n.append(h)
        c_n.append(c)
    return inp, (torch.stack(h_n), torch.stack(c_n))
