"""The per-stream adaptation fused into the CPU step's C extension (kernels/_cpu_kernel.c adapt_begin/adapt_finish)
against normalization.py's torch version: same forecasts and same rows, through resets, forecast columns and
scales 10^6 apart; indices out of range are refused, never written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.daemon import normalization
from lstmd.daemon.engine import Engine
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.state_store import StateStore
from lstmd.kernels.cpu_step import fused_adapt_begin, fused_adapt_finish, fused_available

pytestmark = pytest.mark.skipif(not fused_available(), reason="the C extension was not built")
CPU = torch.device("cpu")


def engine(model: ServingModel, backend: str, capacity: int = 16) -> Engine:
    return Engine(model, StateStore(model.spec.num_layers, model.spec.hidden_size, capacity, CPU), CPU, backend)


@pytest.mark.parametrize("columns", [(), (0, 2)], ids=["all-columns", "two-of-three"])
def test_the_fused_adaptation_matches_the_torch_one(columns):
    spec = ModelSpec(3, 12, 1, len(columns) or 3, "forecast", columns)
    model = ServingModel.initial(spec, seed=4)
    fused, reference = engine(model, "auto"), engine(model, "torch")
    assert fused._fused_adaptation and not reference._fused_adaptation
    rng = np.random.default_rng(0)
    streams = 6
    scales = np.array([1.0, 1e3, 1e-3, 1.0, 5.0, 1e-2], np.float32)[:, None]
    walk = np.cumsum(rng.standard_normal((120, streams, 3)), axis=0).astype(np.float32) * scales
    walk[60:63, 1] += 1e5  # an outlier burst on the large stream
    slots = np.array([3, 9, 0, 15, 7, 4])
    for t, x in enumerate(walk):
        order = rng.permutation(streams)[: rng.integers(1, streams + 1)]  # waves of varying membership
        fresh = np.full(order.size, t == 0) | (rng.random(order.size) < 0.02)  # resets now and then
        got = fused.step(x[order], slots[order], fresh)
        want = reference.step(x[order], slots[order], fresh)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * float(np.abs(want).max()))
    torch.testing.assert_close(fused.store.adaptation, reference.store.adaptation, rtol=2e-5, atol=1e-6)


def test_the_fused_adaptation_refuses_out_of_range_slots_and_columns():
    layout = normalization.AdaptationLayout(2, 1)
    table = layout.initial_row().expand(4, -1).clone()
    before = table.clone()
    dx = torch.ones(2, 2)
    steps = normalization.count_steps(CPU)
    args = (normalization.CLIP, normalization.SCALE_CLIP, normalization.SCALE_FLOOR)
    with pytest.raises(ValueError, match="a slot outside"):
        fused_adapt_begin(table, torch.tensor([1, 4]), None, layout.initial_row(), dx, torch.tensor([0]), steps, *args)
    with pytest.raises(ValueError, match="a column outside"):
        fused_adapt_begin(table, torch.tensor([1, 2]), None, layout.initial_row(), dx, torch.tensor([2]), steps, *args)
    with pytest.raises(ValueError, match="a slot outside"):
        fused_adapt_finish(table, torch.tensor([-1, 0]), torch.ones(2, 1), dx, torch.ones(2, 1), torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous int64"):
        fused_adapt_finish(
            table, torch.tensor([0, 1], dtype=torch.int32), torch.ones(2, 1), dx, torch.ones(2, 1), torch.tensor([0])
        )
    torch.testing.assert_close(table, before, rtol=0, atol=0)
