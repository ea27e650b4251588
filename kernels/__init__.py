"""lstmd.kernels: the LSTM step over a resident per-stream state table, and the sequence kernel for TBPTT.

Public contract (stable; the design brief's "Kernels" section): weights in torch.nn.LSTM layout, gate order
(i, f, g, o).

    y = lstm_step_(x, slots, h, c, params, reset=None, backend=None)
    y, (h_n, c_n) = lstm_sequence(x, h0, c0, params, backend=None)

Shapes: B events in the batch, S state-table rows, L layers, H hidden, I input, T time steps.
    x [B, I]; slots [B] distinct int rows; h, c [L, S, H] float32 tables updated in place; reset [B] bool;
    x [B, T, I] (batch first); h0, c0 [L, B, H]; params: one (w_ih, w_hh, b_ih, b_hh) per layer,
    float32 or bfloat16 (state and accumulation stay float32).

backend: None picks Triton for CUDA tensors and the PyTorch reference elsewhere; "triton" (on the CPU it
needs TRITON_INTERPRET=1 set before triton is imported); "torch". Bad arguments raise ValueError naming
the argument.
The Triton module is imported on first use, so serving on the CPU never imports triton. Side by side in this
package: `reference.py` (PyTorch), `triton_lstm.py` (Triton), `cpu_step.py` + `_cpu_kernel.c` (the daemon's CPU
serving step), `backends.py` (which one runs where), `tuning.py` (process-wide thread settings).
Variants: the Triton backend picks a launch plan by B and H (triton_lstm.plan_step / plan_sequence: one program
per 16 whole rows, or H split in tiles over programs with one launch per layer or per time step); the choice is
internal and does not change this contract.
Precision: on a GPU the Triton kernels' matrix products use TF32 (lstmd.kernels.triton_lstm.ALLOW_TF32 = False
for full fp32); the reference follows torch's own TF32 settings. H is limited to 512 on the Triton backend
(ValueError above it).
"""

from __future__ import annotations

import torch
from lstmd.kernels import _checks, reference
from lstmd.kernels.reference import Params

__all__ = ["Params", "VALIDATE_SLOTS", "lstm_sequence", "lstm_step_"]

# Checking slot values (range, duplicates) costs one device→host sync per lstm_step_ on CUDA, a few µs against
# a ~10 µs step. A caller that guarantees distinct in-range slots itself (the daemon's state store) may set
# lstmd.kernels.VALIDATE_SLOTS = False; shapes, dtypes and devices are always checked (no sync).
VALIDATE_SLOTS = True


def _triton():
    from lstmd.kernels import triton_lstm

    return triton_lstm


def lstm_step_(
    x: torch.Tensor,
    slots: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    params: Params,
    reset: torch.Tensor | None = None,
    backend: str | None = None,
    *,
    validate_slots: bool | None = None,
) -> torch.Tensor:
    """Advance the streams at `slots` one step through all layers, in place; return the last layer's h [B, H].

    Not differentiable: it serves, and it writes the state tables in place. `validate_slots=False` skips the
    range/duplicate check of the slot values (one device→host sync on CUDA) for a caller that guarantees them;
    None follows VALIDATE_SLOTS.
    """
    check = VALIDATE_SLOTS if validate_slots is None else validate_slots
    _checks.check_step(x, slots, h, c, params, reset, check_slot_values=check)
    chosen = _checks.resolve_backend(backend, h.device)
    with torch.no_grad():
        if chosen == "triton":
            return _triton().lstm_step_(x, slots, h, c, params, reset)
        return reference.lstm_step_(x, slots, h, c, params, reset)


def lstm_sequence(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    params: Params,
    backend: str | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run the stacked LSTM over x [B, T, I] from (h0, c0); differentiable in x, h0, c0 and every weight.

    Returns y [B, T, H] (the last layer's h at every step) and (h_n, c_n) [L, B, H].
    """
    _checks.check_sequence(x, h0, c0, params)
    chosen = _checks.resolve_backend(backend, x.device)
    if chosen == "triton":
        return _triton().lstm_sequence(x, h0, c0, params)
    return reference.lstm_sequence(x, h0, c0, params)
