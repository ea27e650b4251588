"""The per-stream adaptation fused into the CPU step's chunked pass (kernels/cpu_step.py FusedAdaptation, the C
extension's adapt_begin/adapt_finish) against normalization.py's torch version: same forecasts and same rows,
through resets, reused slots, forecast columns, clipped outliers and level shifts, scales 10^6 apart, sizes that
are no power of two and waves of several chunks over two threads; indices out of range are refused, never
written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.daemon import normalization
from lstmd.daemon.engine import Engine
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.state_store import StateStore
from lstmd.kernels.cpu_step import CpuStep, FusedAdaptation, fused_available

pytestmark = pytest.mark.skipif(not fused_available(), reason="the C extension was not built")
CPU = torch.device("cpu")


def engine(model: ServingModel, backend: str, capacity: int = 16, threads: int = 1, level: float = 0.0) -> Engine:
    store = StateStore(model.spec.num_layers, model.spec.hidden_size, capacity, CPU)
    return Engine(model, store, CPU, backend, step_threads=threads, level=level)


def assert_same(fused: Engine, reference: Engine, x: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> None:
    got, want = fused.step(x, slots, fresh), reference.step(x, slots, fresh)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("level", [0.0, 0.1, 0.37], ids=["no-level", "level-0.1", "level-0.37"])
@pytest.mark.parametrize("columns", [(), (0, 2)], ids=["all-columns", "two-of-three"])
def test_the_fused_adaptation_matches_the_torch_one(columns, level):
    """With the level regressor too (train.level_rate): its level, scoring and the guard's choice among the model,
    the level and their mix, which the varied streams below each pick at some point."""
    spec = ModelSpec(3, 12, 1, len(columns) or 3, "forecast", columns)
    model = ServingModel.initial(spec, seed=4)
    fused, reference = engine(model, "auto", level=level), engine(model, "torch", level=level)
    assert fused._fused_adaptation and not reference._fused_adaptation
    rng = np.random.default_rng(0)
    streams = 6
    scales = np.array([1.0, 1e3, 1e-3, 1.0, 5.0, 1e-2], np.float32)[:, None]
    walk = np.cumsum(rng.standard_normal((120, streams, 3)), axis=0).astype(np.float32) * scales
    walk[:, 3:] = rng.standard_normal((120, 3, 3)) * scales[3:] + 7.0  # noise around a level: where the level helps
    walk[60:63, 1] += 1e5  # an outlier burst on the large stream
    slots = np.array([3, 9, 0, 15, 7, 4])
    picks = set()  # what the guard served the streams: the last value, the model's change, the level's, or a mix
    for t, x in enumerate(walk):
        order = rng.permutation(streams)[: rng.integers(1, streams + 1)]  # waves of varying membership
        fresh = np.full(order.size, t == 0) | (rng.random(order.size) < 0.02)  # resets now and then
        assert_same(fused, reference, x[order], slots[order], fresh)
        if level:
            g, a = normalization.guard_coefficients(reference.layout, reference.store.adaptation[slots])
            kinds = (g.flatten() > 0).long() + 2 * (a.flatten() > 0).long()
            picks |= {("last", "model", "level", "both")[k] for k in kinds.tolist()}
    torch.testing.assert_close(fused.store.adaptation, reference.store.adaptation, rtol=2e-5, atol=1e-6)
    assert not level or {"model", "level", "both"} <= picks


@pytest.mark.parametrize("level", [0.0, 0.2], ids=["no-level", "level"])
def test_the_fused_adaptation_matches_over_chunks_threads_reused_slots_and_clipping(level):
    """I = 5, H = 200 (chunks of 327 rows), O = 3 of 5 columns in a scrambled order, two layers, waves of 700
    events over two threads (two parts of several chunks each); slots handed to new streams of another scale
    (reused: fresh), a level shift and outliers that the scale and the targets clip."""
    spec = ModelSpec(5, 200, 2, 3, "forecast", (4, 0, 2))
    model = ServingModel.initial(spec, seed=7)
    fused, reference = engine(model, "auto", 1000, threads=2, level=level), engine(model, "torch", 1000, level=level)
    assert fused._fused_adaptation and fused._cpu_step.threads == 2
    rng = np.random.default_rng(1)
    n, ticks = 700, 30
    scales = (10.0 ** rng.uniform(-3, 3, (n, 1))).astype(np.float32)
    walk = (np.cumsum(rng.standard_normal((ticks, n, 5)), axis=0) * scales).astype(np.float32)
    walk[12:, :50] += (1e4 * scales[:50]).astype(np.float32)  # a level shift of 10^4 scales on 50 streams
    walk[20, 100:110] *= -1e6  # outliers
    slots = rng.choice(1000, n, replace=False)
    for t, x in enumerate(walk):
        fresh = np.full(n, t == 0)
        if t in (8, 16, 24):  # 40 slots go to new streams of another scale
            reused = rng.choice(n, 40, replace=False)
            fresh[reused] = True
            walk[t:, reused] = walk[t:, reused] * 1e3 + 5.0
            x = walk[t]
        assert_same(fused, reference, x, slots, fresh)
    torch.testing.assert_close(fused.store.adaptation, reference.store.adaptation, rtol=2e-5, atol=1e-6)


def test_the_fused_adaptation_refuses_out_of_range_slots_columns_and_mismatched_tables():
    spec = ModelSpec(2, 8, 1, 1, "forecast", (0,))
    model = ServingModel.initial(spec, seed=0)
    layout = normalization.AdaptationLayout(2, 1)
    store = StateStore(1, 8, 4, CPU)
    store.enable_adaptation(layout.initial_row())
    step = CpuStep(1, fused=True)
    dx, events = torch.ones(2, 2), torch.ones(2, 2)
    steps = normalization.count_steps(CPU)
    consts = (normalization.CLIP, normalization.SCALE_CLIP, normalization.SCALE_FLOOR)
    before = store.adaptation.clone()

    def call(slots, columns=torch.tensor([0]), table=store.adaptation, events=events, init=store.adaptation_init,
             level=0.0):  # fmt: skip
        adapt = FusedAdaptation(table, init, columns, steps, *consts, level)
        return step(model, dx, slots, store.h, store.c, None, adapt, events)

    with pytest.raises(ValueError, match="slots must lie in"):
        call(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="a column outside"):
        call(torch.tensor([1, 2]), columns=torch.tensor([2]))
    with pytest.raises(ValueError, match="the table has 5 rows, the state tables 4"):
        call(torch.tensor([1, 2]), table=layout.initial_row().expand(5, -1).clone())
    with pytest.raises(ValueError, match="init must be a contiguous float32"):
        call(torch.tensor([1, 2]), table=torch.zeros(4, layout.width + 1))
    with pytest.raises(ValueError, match="a row width other than"):
        call(torch.tensor([1, 2]), table=torch.zeros(4, layout.width + 1), init=torch.zeros(layout.width + 1))
    with pytest.raises(ValueError, match=r"a row width other than I \+ 1 \+ 4 O \(I \+ 1 \+ 9 O with the level\)"):
        call(torch.tensor([1, 2]), level=0.1)  # a table without the level's fields
    with pytest.raises(ValueError, match="events must be a contiguous float32"):
        call(torch.tensor([1, 2]), events=torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="columns must be a contiguous int64"):
        call(torch.tensor([1, 2]), columns=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="events must be a contiguous float32"):
        call(torch.tensor([1, 2]), events=None)
    with pytest.raises(ValueError, match="inside the fused CPU step only"):
        CpuStep(1, fused=False)(model, dx, torch.tensor([1, 2]), store.h, store.c, None,
                                FusedAdaptation(store.adaptation, store.adaptation_init, None, steps, *consts), events)
    torch.testing.assert_close(store.adaptation, before, rtol=0, atol=0)
    assert call(torch.tensor([1, 2])).shape == (2, 1)  # and the same call with valid operands goes through
