"""The per-stream adaptation as Triton kernels (kernels/triton_adaptation.py) against normalization.py's torch ops:
the same LSTM inputs, forecasts and table rows through resets (a dead row holding NaN included), reused slots,
forecast columns in a scrambled order, outliers and level shifts that clip, scales 10^6 apart, with and without the
level regressor, at sizes that are no power of two; and the engine serving a forecast model through them.

On the CPU these run through Triton's interpreter (float32 as on a GPU, in numpy's order: <= 1e-5 relative); the
`cuda` case compiles them (FMA contraction may move the last bits: the same tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.daemon import normalization as adaptation
from lstmd.daemon.engine import Engine
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import AdaptationLayout
from lstmd.daemon.state_store import StateStore
from lstmd.kernels import _checks

_interp = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not _checks.interpreter_active(), reason="TRITON_INTERPRET unset (a GPU runs the cuda case)"),
]
_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]
DEVICES = [pytest.param("cpu", marks=_interp), pytest.param("cuda", marks=_cuda)]


def reference_wave(layout, table, slots, reset, x, dx, columns, change):
    """normalization.py's torch ops on a gathered copy of the rows, as the engine runs them; writes them back."""
    rows = table.index_select(0, slots)
    if reset is not None:
        rows[reset] = layout.initial_row(table.device)
    rows = adaptation.adapt_begin(layout, rows, x, dx, columns)
    inputs = adaptation.stream_inputs(dx, rows[:, layout.field("scale")])
    out = adaptation.adapt_finish(layout, rows, x, change, columns)
    table.index_copy_(0, slots, rows)
    return inputs, out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", [0.0, 0.1, 0.37], ids=["no-level", "level-0.1", "level-0.37"])
@pytest.mark.parametrize("columns", [None, (4, 0, 2)], ids=["all-columns", "three-of-five"])
def test_the_kernels_match_the_torch_adaptation(device, level, columns):
    from lstmd.kernels.triton_adaptation import TritonAdaptation

    dev = torch.device(device)
    n_in, S, n = 5, 97, 37  # 37 rows: two programs of 32, the second partly masked
    cols = None if columns is None else torch.tensor(columns, device=dev)
    layout = AdaptationLayout(n_in, n_in if columns is None else len(columns), 0, level)
    table = layout.initial_row(dev).expand(S, -1).clone()
    table[5] = float("nan")  # a dead stream's row: whoever gets slot 5 starts over and must never read it
    expected = table.clone()
    kernels = TritonAdaptation(layout, table, layout.initial_row(dev), cols)
    rng = np.random.default_rng(0)
    scales = torch.tensor(10.0 ** rng.uniform(-3, 3, (S, 1)), dtype=torch.float32, device=dev)
    levels = torch.tensor(rng.normal(0, 5, (S, 1)), dtype=torch.float32, device=dev)
    last = torch.zeros(S, n_in, device=dev)
    seen = torch.zeros(S, dtype=torch.bool, device=dev)
    seen[5] = False
    picks = set()
    for t in range(60):
        slots = torch.tensor(rng.choice(S, n, replace=False), device=dev)
        noise = torch.tensor(rng.standard_normal((n, n_in)), dtype=torch.float32, device=dev)
        # half the streams are noise around their level (where the level helps), half random walks
        walk = slots[:, None] % 2 == 0
        x = torch.where(walk, last[slots] + noise * scales[slots], levels[slots] + noise * scales[slots])
        if t == 30:
            x[:4] += 1e4 * scales[slots[:4]]  # a level shift / outlier burst that clips
        reset = ~seen[slots] | torch.tensor(rng.random(n) < 0.03, device=dev)
        dx = torch.where(reset[:, None], 0.0, x - last[slots])
        last[slots], seen[slots] = x, True
        change = torch.tensor(rng.standard_normal((n, layout.outputs)), dtype=torch.float32, device=dev)
        wave_reset = reset if bool(reset.any()) else None
        got_inputs = kernels.begin(slots, wave_reset, x, dx)
        got = kernels.finish(slots, x, change)
        want_inputs, want = reference_wave(layout, expected, slots, wave_reset, x, dx, cols, change)
        torch.testing.assert_close(got_inputs, want_inputs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        if level:
            g, a = adaptation.guard_coefficients(layout, expected[slots])
            kinds = (g.flatten() > 0).long() + 2 * (a.flatten() > 0).long()
            picks |= {("last", "model", "level", "both")[k] for k in kinds.tolist()}
    touched = expected[:, layout.field("count")].squeeze(1) > 0
    got_rows, want_rows = table[touched], expected[touched]
    if level:  # sprev = (level - x) / scale: a noisy stream's level and value agree to a few ulps, which the small
        # scale then magnifies (1 ulp of a level of 5 at a scale of 1e-3 is 3e-4), in both implementations alike;
        # cs, ss and ms average products with sprev. Those four to 2e-3 (sprev is clipped at 4), the rest tightly.
        for name in ("sprev", "cs", "ss", "ms"):
            f = layout.field(name)
            torch.testing.assert_close(got_rows[:, f], want_rows[:, f], rtol=0, atol=2e-3)
            got_rows[:, f] = want_rows[:, f]
        # The level: an average of the stream's values, to their magnitude (a level may cross 0 and be tiny)
        f = layout.field("level")
        stream_c = last[touched] if cols is None else last[touched][:, cols]
        scale_c = want_rows[:, layout.field("scale")] if cols is None else want_rows[:, cols]
        bound = 1e-6 * (want_rows[:, f].abs() + stream_c.abs() + scale_c)
        assert bool(((got_rows[:, f] - want_rows[:, f]).abs() <= bound).all())
        got_rows[:, f] = want_rows[:, f]
    torch.testing.assert_close(got_rows, want_rows, rtol=1e-5, atol=1e-6)
    assert not level or {"model", "level", "both"} <= picks  # each of the guard's choices was served


def test_the_kernels_refuse_a_season_a_wrong_table_and_bad_columns():
    from lstmd.kernels.triton_adaptation import TritonAdaptation

    layout = AdaptationLayout(3, 2)
    table = layout.initial_row().expand(4, -1).clone()
    with pytest.raises(ValueError, match="no seasonal ring"):
        seasonal = AdaptationLayout(3, 2, season=4)
        TritonAdaptation(seasonal, seasonal.initial_row().expand(4, -1).clone(), seasonal.initial_row(), None)
    with pytest.raises(ValueError, match=r"contiguous float32 \[S, 12\]"):
        TritonAdaptation(layout, table.double(), layout.initial_row(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"forecast columns must be 2 indices in \[0, 3\)"):
        TritonAdaptation(layout, table, layout.initial_row(), torch.tensor([0, 3]))


@pytest.mark.parametrize("device", DEVICES)
def test_warm_up_leaves_the_table_alone(device):
    from lstmd.kernels.triton_adaptation import TritonAdaptation

    for level in (0.0, 0.1):
        layout = AdaptationLayout(3, 2, 0, level)
        table = layout.initial_row(torch.device(device)).expand(5, -1).clone()
        table[1] = 7.0
        before = table.clone()
        kernels = TritonAdaptation(layout, table, layout.initial_row(table.device), torch.tensor([2, 0]))
        kernels.warm_up()
        assert kernels.table is table and torch.equal(table, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", [0.0, 0.1], ids=["no-level", "level"])
def test_the_engine_serves_a_forecast_model_through_the_kernels(device, level):
    """serve.backend = triton: the adaptation runs as the two kernels (not torch ops), and the forecasts and rows
    equal the torch backend's within the Triton step's own tolerance (1e-4 relative, tests/test_daemon_triton.py)."""
    dev = torch.device(device)
    spec = ModelSpec(3, 24, 2, 2, "forecast", (2, 0))
    model = ServingModel.initial(spec, seed=3)
    engines = []
    for backend in ("triton", "torch"):
        store = StateStore(spec.num_layers, spec.hidden_size, 40, dev)
        engines.append(Engine(model, store, dev, backend, level=level))
    kernels, ops = engines
    assert kernels._adaptation_kernels and not ops._adaptation_kernels
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.standard_normal((25, 19, 3)), axis=0).astype(np.float32) * 10.0 ** rng.uniform(-2, 2, (19, 1))
    slots = rng.choice(40, 19, replace=False)
    for t, x in enumerate(walk.astype(np.float32)):
        fresh = np.full(19, t == 0) | (rng.random(19) < 0.05)
        got, want = kernels.step(x, slots, fresh), ops.step(x, slots, fresh)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    torch.testing.assert_close(kernels.store.adaptation, ops.store.adaptation, rtol=1e-4, atol=1e-5)
    assert kernels._kernels is not None and kernels._kernels.table is kernels.store.adaptation
