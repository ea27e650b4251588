"""Input checks for the public kernel functions, shared by every backend.

Each check raises ValueError naming the argument and what was expected, so a caller (the daemon's batcher, the
trainer) learns what it passed wrong instead of reading a Triton or ATen error from deep inside a launch.

Shapes: B events in the batch, S state-table rows, L layers, H hidden, I input, T time steps.
"""

from __future__ import annotations

import os
import sys

import torch

BACKENDS = ("triton", "torch")
# The Triton kernels' largest hidden size: one program holds four [16, H] fp32 gate tiles in registers
# (kernels/triton_lstm.py, "Limit"). kernels/backends.py serves larger models through the torch backend.
TRITON_MAX_HIDDEN = 512
STATE_DTYPE = torch.float32  # state and activations: fp32 always (the state integrates over a stream's life)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def _dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name}: expected dtype {want}, got {t.dtype}")


def check_params(params: object, device: torch.device) -> tuple[int, int, int]:
    """Check the per-layer weight tuples (torch.nn.LSTM layout); return (L, I, H)."""
    if not isinstance(params, (list, tuple)) or len(params) == 0:
        raise ValueError("params: expected a non-empty list of (w_ih, w_hh, b_ih, b_hh) tuples, one per layer")
    hidden = input_size = None
    wdtype = None
    for layer, p in enumerate(params):
        if not isinstance(p, (list, tuple)) or len(p) != 4:
            raise ValueError(f"params[{layer}]: expected a tuple (w_ih, w_hh, b_ih, b_hh)")
        w_ih, w_hh, b_ih, b_hh = (_tensor(f"params[{layer}][{k}]", t) for k, t in enumerate(p))
        if w_hh.dim() != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
            raise ValueError(f"params[{layer}] w_hh: expected shape [4H, H], got {_shape(w_hh)}")
        if hidden is None:
            hidden = w_hh.shape[1]
            if w_ih.dim() != 2:
                raise ValueError(f"params[0] w_ih: expected shape [4H, I], got {_shape(w_ih)}")
            input_size = w_ih.shape[1]
        elif w_hh.shape[1] != hidden:
            want = f"[{4 * hidden}, {hidden}]"
            raise ValueError(f"params[{layer}] w_hh: expected shape {want}, got {_shape(w_hh)}")
        want_in = input_size if layer == 0 else hidden
        for name, t, shape in (
            ("w_ih", w_ih, (4 * hidden, want_in)),
            ("b_ih", b_ih, (4 * hidden,)),
            ("b_hh", b_hh, (4 * hidden,)),
        ):
            if tuple(t.shape) != shape:
                raise ValueError(f"params[{layer}] {name}: expected shape {list(shape)}, got {_shape(t)}")
        for k, t in enumerate((w_ih, w_hh, b_ih, b_hh)):
            _same_device(f"params[{layer}][{k}]", t, device)
            _dtype(f"params[{layer}][{k}]", t, WEIGHT_DTYPES)
            if wdtype is None:
                wdtype = t.dtype
            elif t.dtype != wdtype:
                raise ValueError(f"params[{layer}][{k}]: expected every weight in {wdtype}, got {t.dtype}")
    return len(params), int(input_size), int(hidden)


def interpreter_active() -> bool:
    """Whether the Triton kernels run (or will run, once imported) through Triton's CPU interpreter."""
    loaded = sys.modules.get("lstmd.kernels.triton_lstm")
    if loaded is not None:  # fixed when the kernels were decorated; setting the variable later does nothing
        return loaded.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: object, device: torch.device) -> str:
    """None → "triton" on CUDA tensors, "torch" elsewhere; an explicit name is checked."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None, 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"backend: 'triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is "
            "imported (or CUDA tensors)"
        )
    return backend


def check_step(x, slots, h, c, params, reset, check_slot_values: bool = True) -> tuple[int, int, int, int, int]:
    """Check lstm_step_'s arguments; return (B, S, L, I, H)."""
    h = _tensor("h", h)
    c = _tensor("c", c)
    if h.dim() != 3:
        raise ValueError(f"h: expected a state table of shape [L, S, H], got {_shape(h)}")
    device = h.device
    L, n_in, H = check_params(params, device)
    _dtype("h", h, (STATE_DTYPE,))
    _dtype("c", c, (STATE_DTYPE,))
    if h.shape[0] != L or h.shape[2] != H:
        raise ValueError(f"h: expected shape [L={L}, S, H={H}] to match params, got {_shape(h)}")
    if c.shape != h.shape:
        raise ValueError(f"c: expected the same shape as h {_shape(h)}, got {_shape(c)}")
    _same_device("c", c, device)
    # The tables are updated in place through raw row offsets: a strided view would be written wrongly.
    for name, t in (("h", h), ("c", c)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous state table (it is updated in place)")
    S = h.shape[1]

    x = _tensor("x", x)
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ValueError(f"x: expected shape [B, I={n_in}], got {_shape(x)}")
    _dtype("x", x, (STATE_DTYPE,))
    _same_device("x", x, device)
    B = x.shape[0]

    slots = _tensor("slots", slots)
    if slots.dim() != 1 or slots.shape[0] != B:
        raise ValueError(f"slots: expected shape [B={B}], got {_shape(slots)}")
    _dtype("slots", slots, (torch.int64, torch.int32))
    _same_device("slots", slots, device)
    if B > 0 and check_slot_values:
        # One host sync for both checks: range and distinctness (duplicates would race on the same row).
        ordered = slots.sort().values
        dup = (ordered[1:] == ordered[:-1]).any().to(torch.int64)
        lo, hi, has_dup = torch.stack([ordered[0].to(torch.int64), ordered[-1].to(torch.int64), dup]).tolist()
        if lo < 0 or hi >= S:
            raise ValueError(f"slots: expected rows in [0, {S}), got values from {lo} to {hi}")
        if has_dup:
            raise ValueError("slots: expected distinct rows within one step, got duplicates")

    if reset is not None:
        reset = _tensor("reset", reset)
        if reset.dim() != 1 or reset.shape[0] != B:
            raise ValueError(f"reset: expected shape [B={B}], got {_shape(reset)}")
        _dtype("reset", reset, (torch.bool,))
        _same_device("reset", reset, device)
    return B, S, L, n_in, H


def check_sequence(x, h0, c0, params) -> tuple[int, int, int, int, int]:
    """Check lstm_sequence's arguments; return (B, T, L, I, H)."""
    x = _tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [B, T, I] (batch first), got {_shape(x)}")
    device = x.device
    L, n_in, H = check_params(params, device)
    B, T = x.shape[0], x.shape[1]
    if x.shape[2] != n_in:
        raise ValueError(f"x: expected shape [B, T, I={n_in}], got {_shape(x)}")
    if T < 1:
        raise ValueError("x: expected at least one time step (T >= 1)")
    _dtype("x", x, (STATE_DTYPE,))
    for name, t in (("h0", h0), ("c0", c0)):
        t = _tensor(name, t)
        if tuple(t.shape) != (L, B, H):
            raise ValueError(f"{name}: expected shape [L={L}, B={B}, H={H}], got {_shape(t)}")
        _dtype(name, t, (STATE_DTYPE,))
        _same_device(name, t, device)
    return B, T, L, n_in, H
