"""Correctness of lstmd.kernels against torch.nn.LSTM / nn.LSTMCell, for every backend that can run here.

Ground truth is torch.nn.LSTM (or nn.LSTMCell) in float64 on the CPU, with weights copied from a float32
module (exactly representable), on fresh random inputs. Each backend is compared at its own tolerance, stated
in CASES: an element passes when |actual - truth| <= rtol * (|truth| + max|truth|), i.e. relative, with a
floor relative to the tensor's scale so entries near zero are not held to an impossible bound.

Backends: "torch" on the CPU (the fp32 reference), "triton" on the CPU through TRITON_INTERPRET=1 (set in
conftest.py when there is no GPU), "triton" on CUDA (marked `cuda`; TF32 switched off for these comparisons,
and covered by its own looser test). Shapes: B events, S table rows, L layers, H hidden, I input, T steps.
"""

from __future__ import annotations

import os

import pytest
import torch
from lstmd.kernels import _checks, lstm_sequence, lstm_step_, reference

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_interp = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET unset (with a GPU the triton-cuda cases run)"),
]
_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")]

# (backend, device, rtol) — the tolerance of each backend against float64 nn.LSTM.
CASES = [
    pytest.param("torch", "cpu", 1e-5, id="torch-cpu"),  # fp32 reference: <= 1e-5 relative
    pytest.param("triton", "cpu", 1e-4, id="triton-interp", marks=_interp),  # interpreter: <= 1e-4
    pytest.param("triton", "cuda", 1e-4, id="triton-cuda", marks=_cuda),  # compiled, TF32 off: <= 1e-4
]
TRITON_CASES = [p for p in CASES if p.values[0] == "triton"]


@pytest.fixture(autouse=True)
def _strict_triton(monkeypatch):
    """NaN-poison every buffer the Triton launchers allocate (an unwritten element fails), and no TF32."""
    if INTERPRET or HAS_CUDA:
        from lstmd.kernels import triton_lstm

        monkeypatch.setattr(triton_lstm, "POISON_OUTPUTS", True)
        monkeypatch.setattr(triton_lstm, "ALLOW_TF32", False)
        triton_lstm.clear_weight_cache()


def assert_close(name: str, actual: torch.Tensor, truth: torch.Tensor, rtol: float) -> None:
    """Fail saying where and by how much `actual` differs from `truth` (rule: module docstring)."""
    actual = actual.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    err = (actual - truth).abs()
    bound = rtol * (truth.abs() + truth.abs().max())
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        where = ", ".join(f"{tuple(i)}: {actual[tuple(i)].item():.7g} vs {truth[tuple(i)].item():.7g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off by more than rtol={rtol:g}; "
            f"max abs err {err.nan_to_num(float('inf')).max().item():.3g}, "
            f"scale {truth.abs().max().item():.3g}; first: {where}"
        )


def make_model(IN: int, H: int, L: int, device: str, wdtype=torch.float32, seed: int = 0):
    """(params on `device` in wdtype, requiring grad; the float64 CPU nn.LSTM holding the same values)."""
    torch.manual_seed(seed)
    m = torch.nn.LSTM(IN, H, L, batch_first=True)
    with torch.no_grad():
        for p in m.parameters():  # round through wdtype so truth and kernel see identical weights
            p.copy_(p.to(wdtype).float())
    params = [
        tuple(
            getattr(m, f"{n}_l{k}").detach().to(device, wdtype).requires_grad_()
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        for k in range(L)
    ]
    return params, m.double()


def cells_of(m64: torch.nn.LSTM) -> list[torch.nn.LSTMCell]:
    """The per-layer nn.LSTMCell equivalents of a float64 nn.LSTM."""
    cells = []
    for k in range(m64.num_layers):
        cell = torch.nn.LSTMCell(m64.input_size if k == 0 else m64.hidden_size, m64.hidden_size).double()
        with torch.no_grad():
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, n).copy_(getattr(m64, f"{n}_l{k}"))
        cells.append(cell)
    return cells


# ----------------------------------------------------------------------------------------------------------
# lstm_sequence: forward and every gradient


@pytest.mark.parametrize(
    ("B", "T", "IN", "H", "L"),
    [
        (5, 1, 7, 48, 1),  # T = 1, odd shapes
        (5, 33, 7, 48, 2),  # T >= 33
        (17, 34, 7, 16, 3),  # B > BLOCK_B = 16: two programs per launch
        (3, 2, 20, 33, 3),  # H not a multiple of 16, I > H
        (3, 3, 5, 130, 2),  # BLOCK_H = 256: the wide-H block configuration (BLOCK_K = 16, 8 warps)
    ],
)
@pytest.mark.parametrize(("backend", "device", "rtol"), CASES)
def test_sequence_matches_nn_lstm(backend, device, rtol, B, T, IN, H, L):
    params, m64 = make_model(IN, H, L, device)
    torch.manual_seed(1)
    x = torch.randn(B, T, IN)
    h0, c0 = torch.randn(L, B, H), torch.randn(L, B, H)
    gy, gh, gc = torch.randn(B, T, H), torch.randn(L, B, H), torch.randn(L, B, H)

    ins = [t.to(device).requires_grad_() for t in (x, h0, c0)]
    y, (h_n, c_n) = lstm_sequence(*ins, params, backend=backend)
    loss = (y * gy.to(device)).sum() + (h_n * gh.to(device)).sum() + (c_n * gc.to(device)).sum()
    flat = [w for p in params for w in p]
    grads = torch.autograd.grad(loss, ins + flat)

    ins64 = [t.double().requires_grad_() for t in (x, h0, c0)]
    y64, (h64, c64) = m64(ins64[0], (ins64[1], ins64[2]))
    loss64 = (y64 * gy.double()).sum() + (h64 * gh.double()).sum() + (c64 * gc.double()).sum()
    names = [f"{n}_l{k}" for k in range(L) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    grads64 = torch.autograd.grad(loss64, ins64 + [getattr(m64, n) for n in names])

    assert_close("y", y, y64, rtol)
    assert_close("h_n", h_n, h64, rtol)
    assert_close("c_n", c_n, c64, rtol)
    for name, g, g64 in zip(["dx", "dh0", "dc0", *names], grads, grads64, strict=True):
        assert_close(name, g, g64, rtol)


@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_sequence_backward_is_deterministic(backend, device, rtol):
    params, _ = make_model(7, 48, 2, device)
    x = torch.randn(17, 5, 7, device=device, requires_grad=True)
    h0 = torch.zeros(2, 17, 48, device=device)
    flat = [w for p in params for w in p]
    runs = []
    for _ in range(2):
        y, (h_n, _c_n) = lstm_sequence(x, h0, h0, params, backend=backend)
        runs.append(torch.autograd.grad(y.square().sum() + h_n.sum(), [x, *flat]))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_reference_gradcheck_float64():
    """The reference backend's autograd graph, checked numerically in float64 (small shapes)."""
    torch.manual_seed(0)
    B, T, IN, H, L = 2, 3, 3, 4, 2
    x = torch.randn(B, T, IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(L, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(L, B, H, dtype=torch.float64, requires_grad=True)
    flat = [
        torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        for k in range(L)
        for shape in ((4 * H, IN if k == 0 else H), (4 * H, H), (4 * H,), (4 * H,))
    ]

    def fn(x, h0, c0, *w):
        params = [tuple(w[4 * k : 4 * k + 4]) for k in range(L)]
        y, (h_n, c_n) = reference.lstm_sequence(x, h0, c0, params)
        return y, h_n, c_n

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *flat))


# ----------------------------------------------------------------------------------------------------------
# lstm_step_: the fused step over the state tables


def _tables(L, S, H, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, S, H, generator=g).to(device), torch.randn(L, S, H, generator=g).to(device)


def _expected_step(m64, x, slots, h, c, reset=None):
    """Per layer nn.LSTMCell (float64) on the old rows; → (y [B, H], new h rows [L, B, H], new c rows)."""
    slots = slots.cpu()
    inp = x.double().cpu()
    hs, cs = [], []
    for k, cell in enumerate(cells_of(m64)):
        h_old, c_old = h[k].cpu()[slots].double(), c[k].cpu()[slots].double()
        if reset is not None:
            zero = reset.cpu()[:, None]
            h_old, c_old = h_old.masked_fill(zero, 0.0), c_old.masked_fill(zero, 0.0)
        h_new, c_new = cell(inp, (h_old, c_old))
        hs.append(h_new)
        cs.append(c_new)
        inp = h_new
    return inp, torch.stack(hs), torch.stack(cs)


def _check_step(name, rtol, slots, h, c, h_before, c_before, y, truth):
    y64, h64, c64 = truth
    assert_close(f"{name} y", y, y64, rtol)
    assert_close(f"{name} h rows", h[:, slots], h64, rtol)
    assert_close(f"{name} c rows", c[:, slots], c64, rtol)
    untouched = torch.ones(h.shape[1], dtype=torch.bool, device=h.device)
    untouched[slots] = False
    assert torch.equal(h[:, untouched], h_before[:, untouched]), f"{name}: an untouched h row changed"
    assert torch.equal(c[:, untouched], c_before[:, untouched]), f"{name}: an untouched c row changed"


@pytest.mark.parametrize(("L", "H"), [(1, 48), (2, 48), (3, 48), (2, 130)])
@pytest.mark.parametrize(("backend", "device", "rtol"), CASES)
def test_step_matches_lstmcell(backend, device, rtol, L, H):
    B, S, IN = 5, 11, 7
    params, m64 = make_model(IN, H, L, device)
    h, c = _tables(L, S, H, device)
    h_before, c_before = h.clone(), c.clone()
    slots = torch.tensor([9, 2, 5, 0, 7], device=device)
    x = torch.randn(B, IN, device=device)
    truth = _expected_step(m64, x, slots, h, c)
    y = lstm_step_(x, slots, h, c, params, backend=backend)
    _check_step("step", rtol, slots, h, c, h_before, c_before, y, truth)


@pytest.mark.parametrize("order", ["reversed", "rolled"])
@pytest.mark.parametrize(("backend", "device", "rtol"), CASES)
def test_step_programs_do_not_overwrite_each_other(backend, device, rtol, order):
    """Three programs (B=40 > 2·BLOCK_B) over a table whose every row is touched, slots permuted.

    With `reversed` program 0 owns rows 39..24 and program 2 rows 15..0; with `rolled` the rows event b
    writes are the rows event b+16 (the next program) would read if a design indexed a layer's input or output
    by event instead of by slot, or wrote rows before another program had read them. The interpreter runs
    programs one after another, so such a design fails here deterministically; L=3 so layers re-read what
    they wrote.
    """
    B, S, IN, H, L = 40, 40, 7, 16, 3
    params, m64 = make_model(IN, H, L, device)
    h, c = _tables(L, S, H, device)
    h_before, c_before = h.clone(), c.clone()
    ar = torch.arange(S, device=device)
    slots = ar.flip(0) if order == "reversed" else ar.roll(16)
    x = torch.randn(B, IN, device=device)
    truth = _expected_step(m64, x, slots, h, c)
    y = lstm_step_(x, slots, h, c, params, backend=backend)
    _check_step("permuted", rtol, slots, h, c, h_before, c_before, y, truth)


@pytest.mark.parametrize(("backend", "device", "rtol"), CASES)
def test_step_reset(backend, device, rtol):
    """Flagged streams start from zero state even if their rows hold NaN; the others continue."""
    B, S, IN, H, L = 6, 10, 7, 48, 2
    params, m64 = make_model(IN, H, L, device)
    h, c = _tables(L, S, H, device)
    slots = torch.tensor([1, 8, 3, 4, 0, 6], device=device)
    reset = torch.tensor([True, False, True, False, False, True], device=device)
    h[:, slots[reset]] = float("nan")
    c[:, slots[reset]] = float("inf")
    h_before, c_before = h.clone(), c.clone()
    x = torch.randn(B, IN, device=device)
    truth = _expected_step(m64, x, slots, h, c, reset)
    y = lstm_step_(x, slots, h, c, params, reset=reset, backend=backend)
    _check_step("reset", rtol, slots, h, c, h_before, c_before, y, truth)


@pytest.mark.parametrize(("backend", "device", "rtol"), CASES)
def test_step_empty_batch(backend, device, rtol):
    params, _ = make_model(7, 16, 2, device)
    h, c = _tables(2, 4, 16, device)
    h_before = h.clone()
    x, slots = torch.empty(0, 7, device=device), torch.empty(0, dtype=torch.long, device=device)
    y = lstm_step_(x, slots, h, c, params, backend=backend)
    assert y.shape == (0, 16)
    assert torch.equal(h, h_before)


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize(("backend", "device", "rtol"), CASES)
def test_single_steps_equal_one_sequence(backend, device, rtol, L):
    """T steps of lstm_step_ on scattered table rows == one lstm_sequence over the same T inputs."""
    B, S, T, IN, H = 5, 9, 6, 7, 48
    params, m64 = make_model(IN, H, L, device)
    h, c = _tables(L, S, H, device)
    slots = torch.tensor([4, 8, 0, 2, 6], device=device)
    h0, c0 = h[:, slots].clone(), c[:, slots].clone()
    x = torch.randn(B, T, IN, device=device)
    steps = torch.stack([lstm_step_(x[:, t], slots, h, c, params, backend=backend) for t in range(T)], dim=1)
    with torch.no_grad():
        y, (h_n, c_n) = lstm_sequence(x, h0, c0, params, backend=backend)
    # Both are compared with float64 truth at this backend's tolerance, so they agree to twice it.
    y64, (h64, c64) = m64(x.double().cpu(), (h0.double().cpu(), c0.double().cpu()))
    for name, got in (("steps y", steps), ("sequence y", y)):
        assert_close(name, got, y64, rtol)
    for name, got in (("table h", h[:, slots]), ("sequence h_n", h_n)):
        assert_close(name, got, h64, rtol)
    for name, got in (("table c", c[:, slots]), ("sequence c_n", c_n)):
        assert_close(name, got, c64, rtol)


# ----------------------------------------------------------------------------------------------------------
# bfloat16 weights, the weight cache, TF32, size limits


@pytest.mark.parametrize(("backend", "device", "rtol"), CASES)
def test_bf16_weights(backend, device, rtol):
    """bf16 weights, fp32 state and accumulation: same tolerance as fp32 against a float64 model holding the
    bf16-rounded weights; weight gradients come back in bf16 (8 bits of mantissa: 1e-2 relative)."""
    B, T, IN, H, L = 5, 4, 7, 48, 2
    params, m64 = make_model(IN, H, L, device, wdtype=torch.bfloat16)
    x = torch.randn(B, T, IN, device=device)
    h0, c0 = torch.randn(L, B, H, device=device), torch.randn(L, B, H, device=device)
    y, (h_n, _) = lstm_sequence(x, h0, c0, params, backend=backend)
    flat = [w for p in params for w in p]
    grads = torch.autograd.grad(y.sum() + h_n.sum(), flat)
    y64, (h64, _) = m64(x.double().cpu(), (h0.double().cpu(), c0.double().cpu()))
    names = [f"{n}_l{k}" for k in range(L) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    grads64 = torch.autograd.grad(y64.sum() + h64.sum(), [getattr(m64, n) for n in names])
    assert_close("y", y, y64, rtol)
    for name, g, g64 in zip(names, grads, grads64, strict=True):
        assert g.dtype == torch.bfloat16, name
        assert_close(name, g, g64, 1e-2)

    h, c = _tables(L, 8, H, device)
    slots = torch.tensor([7, 1, 3, 0, 5], device=device)
    truth = _expected_step(m64, x[:, 0], slots, h, c)
    y_step = lstm_step_(x[:, 0], slots, h, c, params, backend=backend)
    assert_close("step y", y_step, truth[0], rtol)


@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_weight_cache_sees_inplace_updates(backend, device, rtol):
    """The stacked, transposed weights are cached; an in-place optimizer-style update must invalidate them."""
    B, S, IN, H, L = 5, 8, 7, 16, 2
    params, _ = make_model(IN, H, L, device)
    slots = torch.tensor([0, 2, 4, 6, 7], device=device)
    x = torch.randn(B, IN, device=device)
    for round_ in range(2):
        h, c = _tables(L, S, H, device)
        h_ref, c_ref = h.clone(), c.clone()
        y = lstm_step_(x, slots, h, c, params, backend=backend)
        y_ref = lstm_step_(x, slots, h_ref, c_ref, params, backend="torch")
        assert_close(f"round {round_} y", y, y_ref, rtol)
        assert_close(f"round {round_} h", h, h_ref, rtol)
        with torch.no_grad():
            for w in params[1]:
                w.mul_(-0.5)  # what an optimizer step does: in place, _version bumps


@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_hidden_above_limit_raises(backend, device, rtol):
    from lstmd.kernels import triton_lstm

    H = triton_lstm.MAX_HIDDEN + 16
    params = [
        (torch.zeros(4 * H, 3, device=device), torch.zeros(4 * H, H, device=device),
         torch.zeros(4 * H, device=device), torch.zeros(4 * H, device=device))
    ]  # fmt: skip
    h = torch.zeros(1, 2, H, device=device)
    with pytest.raises(ValueError, match=r"hidden size H=528 .* limit of 512"):
        lstm_step_(torch.zeros(1, 3, device=device), torch.tensor([0], device=device), h, h.clone(), params,
                   backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match=r"hidden size H=528 .* limit of 512"):
        h0 = torch.zeros(1, 1, H, device=device)
        lstm_sequence(torch.zeros(1, 2, 3, device=device), h0, h0, params, backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_tf32_default(monkeypatch):
    """With TF32 on (the default on a GPU) the kernels still track float64 truth to 1e-2 relative."""
    from lstmd.kernels import triton_lstm

    monkeypatch.setattr(triton_lstm, "ALLOW_TF32", True)
    params, m64 = make_model(7, 48, 2, "cuda")
    x = torch.randn(5, 33, 7)
    h0 = torch.zeros(2, 5, 48)
    y, _ = lstm_sequence(x.cuda(), h0.cuda(), h0.cuda(), params)  # backend None → triton on CUDA
    y64, _ = m64(x.double(), (h0.double(), h0.double()))
    assert_close("y (tf32)", y, y64, 1e-2)


def test_default_backend_on_cpu_is_the_reference():
    assert _checks.resolve_backend(None, torch.device("cpu")) == "torch"
    assert _checks.resolve_backend(None, torch.device("cuda", 0)) == "triton"


# ----------------------------------------------------------------------------------------------------------
# The variants (triton_lstm.plan_step / plan_sequence), forced one by one: the same checks against float64 truth


def _step_plans():
    from lstmd.kernels.triton_lstm import StepPlan

    return [
        pytest.param(StepPlan("tiled", 16, 16), id="tiled-16x16"),  # H=48: three H tiles, the last one masked
        pytest.param(StepPlan("tiled", 32, 64), id="tiled-32x64"),  # H=130: three tiles of 64
        pytest.param(StepPlan("tiled", 64, 64), id="tiled-64x64-inplace"),  # H=48: one tile, rows in place
        pytest.param(StepPlan("rows", 32, 64), id="rows-32"),  # the original kernel, a larger row block
    ]


@pytest.mark.parametrize("plan", _step_plans())
@pytest.mark.parametrize(("L", "H", "B"), [(1, 48, 5), (3, 48, 40), (2, 130, 37)])
@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_step_variants_match_lstmcell(backend, device, rtol, L, H, B, plan, monkeypatch):
    """Every step variant: rows permuted over several programs and H tiles, a third of them reset (NaN rows),
    L layers re-reading what the previous layer wrote; untouched rows stay bit-identical."""
    from lstmd.kernels import triton_lstm

    if plan.block_h < H and plan.kind == "rows":
        pytest.skip("a rows plan holds all of H in one block")
    monkeypatch.setattr(triton_lstm, "FORCE_STEP_PLAN", plan)
    S, IN = B + 7, 7
    params, m64 = make_model(IN, H, L, device)
    h, c = _tables(L, S, H, device)
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(B))[:B].to(device)
    reset = (torch.arange(B) % 3 == 1).to(device)
    h[:, slots[reset]] = float("nan")
    c[:, slots[reset]] = float("inf")
    h_before, c_before = h.clone(), c.clone()
    x = torch.randn(B, IN, device=device)
    truth = _expected_step(m64, x, slots, h, c, reset)
    y = lstm_step_(x, slots, h, c, params, reset=reset, backend=backend)
    _check_step(f"{plan.kind} {plan.block_b}x{plan.block_h}", rtol, slots, h, c, h_before, c_before, y, truth)


@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_step_plan_follows_batch_and_hidden(backend, device, rtol):
    from lstmd.kernels.triton_lstm import plan_sequence, plan_step

    # The H200 sweep's choices (docs/benchmarks.md, "GPU"): rows up to H=128, tiled from H=256, at any B.
    assert plan_step(16384, 128).kind == "rows" and plan_step(4096, 64).kind == "rows"
    assert plan_step(256, 256).kind == "tiled" and plan_step(16384, 512).kind == "tiled"
    assert plan_sequence(256, 128).kind == "rows" and plan_sequence(256, 256).kind == "rows"
    assert plan_sequence(256, 512).kind == "steps" and plan_sequence(4096, 512).kind == "rows"


@pytest.mark.parametrize("H", [48, 260])
@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_warm_up_runs_every_plan_without_touching_anything(backend, device, rtol, H, monkeypatch):
    """warm_up launches each reachable plan (steps and sequences, forward and backward) on its own tensors: the
    caller's weights and their gradients are untouched. H=260 reaches the tiled step and the "steps" sequence."""
    from lstmd.kernels import triton_lstm

    params, _ = make_model(5, H, 2, device)
    before = [p.clone() for layer in params for p in layer]
    launched = []
    for name in ("_lstm_step_kernel", "_lstm_step_tiled_kernel", "_lstm_seq_fwd_kernel", "_lstm_seq_bwd_kernel",
                 "_lstm_seq_fwd_step_kernel", "_lstm_seq_bwd_step_kernel"):  # fmt: skip
        kernel = getattr(triton_lstm, name)
        monkeypatch.setattr(triton_lstm, name, _Recording(kernel, name, launched))
    triton_lstm.warm_up(params, step=True, sequence=True)
    expected = {"_lstm_step_tiled_kernel" if H >= 256 else "_lstm_step_kernel", "_lstm_seq_fwd_kernel",
                "_lstm_seq_bwd_kernel"}  # fmt: skip
    if H > 256:
        expected |= {"_lstm_seq_fwd_step_kernel", "_lstm_seq_bwd_step_kernel"}
    assert set(launched) == expected
    after = [p for layer in params for p in layer]
    assert all(torch.equal(a, b) and a.grad is None for a, b in zip(after, before, strict=True))


class _Recording:
    """A kernel stand-in that records the name of every launch and then launches the real kernel."""

    def __init__(self, kernel, name: str, launched: list) -> None:
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append(self.name)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="compiling is what is checked: needs a GPU")
def test_after_warm_up_new_sizes_compile_nothing():
    """After warm_up, steps and sequences at batch sizes, table sizes and window lengths it never saw launch
    without compiling (the GPU run's stalls were such compiles: kernels/triton_lstm.py, "Compiling")."""
    from lstmd.kernels import triton_lstm

    for H in (64, 256):
        params, _ = make_model(8, H, 2, "cuda")
        triton_lstm.warm_up(params, step=True, sequence=True)
        before = triton_lstm.compiled_variants()
        for B, S in ((7, 1001), (1000, 4099), (16384, 131073)):
            h, c = _tables(2, S, H, "cuda")
            x = torch.randn(B, 8, device="cuda")
            slots = torch.randperm(S, device="cuda")[:B]
            lstm_step_(x, slots, h, c, params, reset=torch.rand(B, device="cuda") < 0.5, backend="triton")
            lstm_step_(x, slots, h, c, params, backend="triton")
        for B, T in ((33, 5), (300, 17), (2000, 32)):
            leaves = [p.detach().clone().requires_grad_(True) for layer in params for p in layer]
            layers = [tuple(leaves[4 * k : 4 * k + 4]) for k in range(2)]
            h0 = torch.zeros(2, B, H, device="cuda")
            y, _ = lstm_sequence(torch.randn(B, T, 8, device="cuda"), h0, h0.clone(), layers, backend="triton")
            y.sum().backward()
        torch.cuda.synchronize()
        assert triton_lstm.compiled_variants() == before, f"H={H}: compiled after warm_up"


@pytest.mark.parametrize("block_h", [16, 64])
@pytest.mark.parametrize(
    ("B", "T", "IN", "H", "L"),
    [(5, 1, 7, 48, 1), (17, 5, 7, 33, 3), (3, 3, 5, 130, 2)],
)
@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_sequence_steps_variant_matches_nn_lstm(backend, device, rtol, B, T, IN, H, L, block_h, monkeypatch):
    """The one-launch-per-step sequence (H split in tiles): forward and every gradient against float64 nn.LSTM."""
    from lstmd.kernels import triton_lstm

    monkeypatch.setattr(triton_lstm, "FORCE_SEQUENCE_PLAN", triton_lstm.SequencePlan("steps", block_h))
    test_sequence_matches_nn_lstm(backend, device, rtol, B, T, IN, H, L)


@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_sequence_steps_backward_is_deterministic(backend, device, rtol, monkeypatch):
    from lstmd.kernels import triton_lstm

    monkeypatch.setattr(triton_lstm, "FORCE_SEQUENCE_PLAN", triton_lstm.SequencePlan("steps", 16))
    test_sequence_backward_is_deterministic(backend, device, rtol)


@pytest.mark.parametrize(("backend", "device", "rtol"), TRITON_CASES)
def test_step_with_prepared_weights_follows_a_reload(backend, device, rtol):
    """launch_step with weights the caller owns (what a CUDA graph captures): load_step_weights refreshes them in
    place, and the next step computes with the new weights."""
    from lstmd.kernels import triton_lstm

    B, S, IN, H, L = 6, 9, 7, 48, 2
    params, _ = make_model(IN, H, L, device)
    other, _ = make_model(IN, H, L, device, seed=3)
    weights = triton_lstm.prepare_step_weights(params)
    slots = torch.tensor([8, 0, 3, 5, 1, 6], device=device)
    x = torch.randn(B, IN, device=device)
    for round_, now in enumerate((params, other)):
        if round_:
            triton_lstm.load_step_weights(weights, now)
        h, c = _tables(L, S, H, device)
        h_ref, c_ref = h.clone(), c.clone()
        y = torch.empty(B, H, device=device)
        plan = triton_lstm.plan_step(B, H)
        triton_lstm.launch_step(x, slots, h, c, weights, None, y, plan)
        y_ref = lstm_step_(x, slots, h_ref, c_ref, now, backend="torch")
        assert_close(f"round {round_} y", y, y_ref, rtol)
        assert_close(f"round {round_} h", h, h_ref, rtol)


@pytest.mark.parametrize(("backend", "device", "rtol"), [p for p in TRITON_CASES if p.values[1] == "cpu"])
def test_bench_sweep_runs_through_the_interpreter(backend, device, rtol):
    """kernels/bench.py's GPU sweep, at tiny sizes on the CPU (no timing, no graph): every implementation runs,
    every row is complete, and the target summary reads the rows (scripts/gpu-check's first run depends on it)."""
    from lstmd.kernels import bench

    rows = bench.sweep(
        "cpu", S=64, hidden=(48,), batches=(20,), tbptt=[(5, 3, 2, 40)], timed=lambda fn: (fn(), 1.0)[1],
        graphed=lambda fn: fn, IN=7,
    )  # fmt: skip
    impls = {r["impl"] for r in rows}
    assert {"torch eager", "torch eager, CUDA graph", "triton tiled 64x32", "cuDNN nn.LSTM", "triton steps"} <= impls
    assert any(str(i).endswith("(auto)") for i in impls)
    assert all(r["ms"] == 1.0 and r["speedup"] is not None for r in rows)
    assert bench.targets(rows, hbm_gbps=1000.0) == []  # none of the target shapes at these sizes


def test_bench_targets_read_the_target_shapes():
    from lstmd.kernels import bench

    def row(op, shape, impl, ms, gbps=None):
        return {"op": op, "shape": shape, "impl": impl, "ms": ms, "GB/s": gbps}

    s4k, s16k = "B=4096 H=256 L=1 I=64 S=1e6", "B=16384 H=256 L=1 I=64 S=1e6"
    rows = [
        row("step", s4k, "torch eager", 0.5), row("step", s4k, "torch eager, CUDA graph", 0.15),
        row("step", s4k, "triton tiled 64x32 (auto)", 0.125), row("step", s4k, "triton rows 16x256", 0.25),
        row("step", s16k, "triton tiled 64x32 (auto)", 0.3, gbps=1600.0),
        row("tbptt fwd+bwd", "B=256 T=64 H=128 L=2 I=64", "triton steps (auto)", 2.0),
        row("tbptt fwd+bwd", "B=256 T=64 H=128 L=2 I=64", "cuDNN nn.LSTM", 1.0),
    ]  # fmt: skip
    got = {what: (measured, ok) for what, measured, ok in bench.targets(rows, hbm_gbps=3000.0)}
    assert got["step B=4096 H=256 >= 3x torch eager"] == ("4.00x", True)
    assert got["step B=4096 H=256 >= 1.5x eager CUDA graph"] == ("1.20x", False)
    assert got["step B=16384 H=256 >= 50% of HBM (measured copy)"] == ("53% (triton tiled 64x32 (auto))", True)
    assert got["TBPTT B=256 T=64 H=128 L=2 >= 1.0x cuDNN"] == ("0.50x", False)
