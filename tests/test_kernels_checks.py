"""Input checks of lstmd.kernels' public functions: bad arguments raise ValueError naming the argument.

The checks run before any backend, so they are exercised on the CPU with the torch backend; the backend-name
checks cover the Triton side (H limit: see test_kernels.py::test_hidden_above_limit_raises).
Shapes: B=3 events, S=6 rows, L=2 layers, H=16 hidden, I=5 input, T=4 steps.
"""

from __future__ import annotations

import pytest
import torch
from lstmd.kernels import _checks, lstm_sequence, lstm_step_

B, S, L, H, IN, T = 3, 6, 2, 16, 5, 4


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.LSTM(IN, H, L)
    return [
        tuple(getattr(m, f"{n}_l{k}").detach().to(dtype) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        for k in range(L)
    ]


def _step_args():
    return {
        "x": torch.randn(B, IN),
        "slots": torch.tensor([4, 0, 2]),
        "h": torch.zeros(L, S, H),
        "c": torch.zeros(L, S, H),
        "params": _params(),
        "reset": None,
    }


def _seq_args():
    return {
        "x": torch.randn(B, T, IN),
        "h0": torch.zeros(L, B, H),
        "c0": torch.zeros(L, B, H),
        "params": _params(),
    }


def _bad_params_shape():
    p = _params()
    p[1] = (p[1][0][:, :-1], *p[1][1:])
    return p


def _mixed_dtypes():
    p = _params()
    p[0] = (p[0][0].bfloat16(), *p[0][1:])
    return p


STEP_CASES = [
    ("x", torch.randn(B, IN + 1), r"x: expected shape \[B, I=5\]"),
    ("x", torch.randn(B, IN, dtype=torch.float64), r"x: expected dtype torch.float32"),
    ("x", torch.randn(B + 1, IN), r"slots: expected shape \[B=4\]"),
    ("slots", torch.tensor([4, 0, 4]), r"slots: expected distinct rows"),
    ("slots", torch.tensor([4, 0, 6]), r"slots: expected rows in \[0, 6\), got values from 0 to 6"),
    ("slots", torch.tensor([-1, 0, 2]), r"slots: expected rows in \[0, 6\)"),
    ("slots", torch.tensor([4.0, 0.0, 2.0]), r"slots: expected dtype torch.int64 or torch.int32"),
    ("h", torch.zeros(L, H, S).transpose(1, 2), r"h: expected a contiguous state table"),
    ("h", torch.zeros(L + 1, S, H), r"h: expected shape \[L=2, S, H=16\]"),
    ("h", torch.zeros(S, H), r"h: expected a state table of shape \[L, S, H\]"),
    ("h", torch.zeros(L, S, H, dtype=torch.float64), r"h: expected dtype torch.float32"),
    ("c", torch.zeros(L, S + 1, H), r"c: expected the same shape as h"),
    ("c", torch.zeros(L, S, H, dtype=torch.bfloat16), r"c: expected dtype torch.float32"),
    ("reset", torch.tensor([1, 0, 1]), r"reset: expected dtype torch.bool"),
    ("reset", torch.tensor([True, False]), r"reset: expected shape \[B=3\]"),
    ("params", [], r"params: expected a non-empty list"),
    ("params", _bad_params_shape(), r"params\[1\] w_ih: expected shape \[64, 16\]"),
    ("params", _mixed_dtypes(), r"params\[0\]\[1\]: expected every weight in torch.bfloat16"),
    ("params", _params(torch.float16), r"params\[0\]\[0\]: expected dtype torch.float32 or torch.bfloat16"),
]


@pytest.mark.parametrize(("arg", "value", "message"), STEP_CASES)
def test_step_rejects(arg, value, message):
    args = _step_args()
    args[arg] = value
    before = args["h"].clone()
    with pytest.raises(ValueError, match=message):
        lstm_step_(**args, backend="torch")
    assert torch.equal(args["h"], before)  # nothing was written before the check failed


def test_slot_value_check_follows_validate_slots(monkeypatch):
    import lstmd.kernels as kernels

    args = {**_step_args(), "slots": torch.tensor([4, 0, 4])}
    monkeypatch.setattr(kernels, "VALIDATE_SLOTS", False)
    with pytest.raises(ValueError, match="slots: expected distinct rows"):
        lstm_step_(**args, backend="torch", validate_slots=True)  # the argument wins over the module default
    args = {**_step_args(), "slots": torch.tensor([4, 0, 2])}
    want = lstm_step_(**{**args, "h": args["h"].clone(), "c": args["c"].clone()}, backend="torch")
    got = lstm_step_(**args, backend="torch", validate_slots=False)  # valid slots: same result, check skipped
    assert torch.equal(want, got)


def test_step_rejects_non_contiguous_c():
    args = _step_args()
    args["c"] = torch.zeros(L, H, S).transpose(1, 2)
    with pytest.raises(ValueError, match=r"c: expected a contiguous state table"):
        lstm_step_(**args)


SEQ_CASES = [
    ("x", torch.randn(B, IN), r"x: expected shape \[B, T, I\] \(batch first\)"),
    ("x", torch.randn(B, T, IN + 2), r"x: expected shape \[B, T, I=5\]"),
    ("x", torch.randn(B, 0, IN), r"x: expected at least one time step"),
    ("x", torch.randn(B, T, IN).double(), r"x: expected dtype torch.float32"),
    ("h0", torch.zeros(L, B + 1, H), r"h0: expected shape \[L=2, B=3, H=16\]"),
    ("c0", torch.zeros(L, B, H).double(), r"c0: expected dtype torch.float32"),
    ("c0", None, r"c0: expected a torch.Tensor"),
]


@pytest.mark.parametrize(("arg", "value", "message"), SEQ_CASES)
def test_sequence_rejects(arg, value, message):
    args = _seq_args()
    args[arg] = value
    with pytest.raises(ValueError, match=message):
        lstm_sequence(**args)


@pytest.mark.parametrize("backend", ["cuda", "Triton", ""])
def test_bad_backend_name(backend):
    with pytest.raises(ValueError, match=r"backend: expected None, 'triton' or 'torch'"):
        lstm_step_(**_step_args(), backend=backend)
    with pytest.raises(ValueError, match=r"backend: expected None, 'triton' or 'torch'"):
        lstm_sequence(**_seq_args(), backend=backend)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_checks, "interpreter_active", lambda: False)
    with pytest.raises(ValueError, match=r"backend: 'triton' on cpu tensors needs TRITON_INTERPRET=1"):
        lstm_sequence(**_seq_args(), backend="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_wrong_device():
    args = _step_args()
    args["h"], args["c"] = args["h"].cuda(), args["c"].cuda()
    args["params"] = [tuple(w.cuda() for w in p) for p in args["params"]]
    with pytest.raises(ValueError, match=r"x: expected a tensor on cuda:0, got one on cpu"):
        lstm_step_(**args)


def test_wrong_device_meta():
    """Device mismatch without a GPU: a 'meta' table against CPU weights."""
    args = _step_args()
    args["h"] = torch.zeros(L, S, H, device="meta")
    args["c"] = torch.zeros(L, S, H, device="meta")
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]: expected a tensor on meta, got one on cpu"):
        lstm_step_(**args)
