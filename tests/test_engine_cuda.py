"""The CUDA serving step (daemon/device_step.py): what runs without a GPU, and the graph checks for the first GPU.

On the CPU, DeviceStep runs its whole host logic (bucketing, packed staging, padding rows to the scratch slot,
two alternating buffers, publishing by copying into its own weights) with plain copies and no capture; it must
give what the engine's CPU path gives with the same kernel backend. The `cuda` cases compare graph replay with
the uncaptured step; they have not run yet (no GPU in the session that wrote them): scripts/gpu-check runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.daemon import device_step
from lstmd.daemon.device_step import DeviceStep, bucket_for, fill_staging, staging_bytes, staging_views
from lstmd.daemon.engine import Engine
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.state_store import StateStore
from lstmd.kernels import _checks

HAS_CUDA = torch.cuda.is_available()
_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")]
_interp = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not _checks.interpreter_active(), reason="TRITON_INTERPRET unset (a GPU runs the cuda case)"),
]


def test_buckets_are_powers_of_two_from_16():
    assert [bucket_for(n) for n in (1, 15, 16, 17, 100, 4096, 4097, 16384)] == [
        16, 16, 16, 32, 128, 4096, 8192, 16384
    ]  # fmt: skip
    for bad in (0, device_step.MAX_BUCKET + 1):
        with pytest.raises(ValueError, match="larger waves go in chunks"):
            bucket_for(bad)


def test_staging_packs_slots_features_and_resets_and_pads_to_the_scratch_slot():
    n_in, bucket = 3, 32
    buffer = torch.full((staging_bytes(64, n_in),), 0xAB, dtype=torch.uint8)
    views = staging_views(buffer, bucket, n_in)
    assert [v.data_ptr() - buffer.data_ptr() for v in views] == [0, 8 * bucket, 8 * bucket + 4 * bucket * n_in]
    assert views[1].data_ptr() % 16 == 0 or buffer.data_ptr() % 16 != 0  # x 16-byte aligned when the buffer is
    slots = np.array([5, 2, 9], dtype=np.int64)
    x = np.arange(9, dtype=np.float32).reshape(3, n_in)
    fresh = np.array([False, True, False])
    fill_staging(tuple(v.numpy() for v in views), x, slots, fresh, scratch=77)
    s, xs, r = views
    assert s.tolist() == [5, 2, 9] + [77] * (bucket - 3)
    assert r.tolist() == [False, True, False] + [True] * (bucket - 3)
    assert torch.equal(xs[:3], torch.from_numpy(x))
    assert (buffer[staging_bytes(bucket, n_in) :] == 0xAB).all(), "wrote past the bucket's bytes"


def _model(task: str, seed: int, n_in=5, H=24, L=2, n_out=3, device="cpu") -> ServingModel:
    spec = ModelSpec(n_in, H, L, n_out if task != "forecast" else n_in, task)
    return ServingModel.initial(spec, seed).to(torch.device(device))


def _waves(rng, S, n_in, n_waves=6):
    """Waves of distinct slots, sizes that are not powers of two, some streams fresh (their rows hold junk)."""
    for k in range(n_waves):
        n = int(rng.integers(1, S // 2))
        slots = rng.choice(S, n, replace=False).astype(np.int64)
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        fresh = rng.random(n) < (0.5 if k == 0 else 0.1)
        yield x, slots, fresh


def _run_pair(task, backend, device="cpu", graphs=False, swap_at=None):
    """The same waves through the engine's own path (CPU) or an uncaptured DeviceStep, and through a DeviceStep."""
    S, n_in = 40, 5
    model = _model(task, 0, device=device)
    other = _model(task, 1, device=device)
    spec = model.spec
    dev = torch.device(device)
    ref_store = StateStore(spec.num_layers, spec.hidden_size, S, dev)
    store = StateStore(spec.num_layers, spec.hidden_size, S, dev)
    for s in (ref_store, store):  # junk in every row: padding and resets must not read or spread it
        s.h.copy_(torch.randn(s.h.shape, generator=torch.Generator().manual_seed(3)))
        s.c.copy_(torch.randn(s.c.shape, generator=torch.Generator().manual_seed(4)))
    if device == "cpu":
        ref = Engine(model, ref_store, dev, backend)
        ref_step = ref.step
        ref_swap = ref.swap_model
    else:
        ref = DeviceStep(model, ref_store, backend, dev, cuda_graphs=False)
        current = {"model": model}
        ref_step = lambda f, s, r: ref.step(current["model"], f, s, r)  # noqa: E731
        ref_swap = lambda m: current.update(model=m)  # noqa: E731
    step = DeviceStep(model, store, backend, dev, cuda_graphs=graphs)
    serving = model
    rng = np.random.default_rng(11)
    for k, (x, slots, fresh) in enumerate(_waves(rng, S, n_in)):
        if k == swap_at:
            serving = other
            ref_swap(other)
        want = ref_step(x, slots, fresh)
        got = step.step(serving, x, slots, fresh)
        yield k, want, got, ref_store, store, step


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_device_step_on_cpu_matches_the_engine(task):
    """Padding to the scratch slot changes nothing: predictions and every state row as the engine's own CPU
    path with the torch backend gives them; a model published half-way is copied in and used from that wave."""
    for k, want, got, ref_store, store, step in _run_pair(task, "torch", swap_at=3):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"wave {k}")
        torch.testing.assert_close(store.h, ref_store.h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(store.c, ref_store.c, rtol=1e-6, atol=1e-6)
        assert store.h.data_ptr() == step.h.data_ptr() and store.h.shape == ref_store.h.shape


@pytest.mark.parametrize("task", [pytest.param(t, marks=_interp) for t in ("regression", "classification")])
def test_device_step_triton_interpreter_matches_the_engine(task):
    """The Triton kernels (interpreter) through DeviceStep's prepared weights, against the engine's torch path."""
    for k, want, got, ref_store, store, _step in _run_pair(task, "triton", swap_at=2):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"wave {k}")
        torch.testing.assert_close(store.h, ref_store.h, rtol=1e-4, atol=1e-5)


def test_waves_over_the_largest_bucket_go_in_chunks(monkeypatch):
    monkeypatch.setattr(device_step, "MAX_BUCKET", 32)
    S, n_in = 100, 5
    model = _model("regression", 0)
    dev = torch.device("cpu")
    ref = Engine(model, StateStore(2, 24, S, dev), dev, "torch")
    store = StateStore(2, 24, S, dev)
    step = DeviceStep(model, store, "torch", dev, cuda_graphs=False)
    for n in (75, 64, 33):  # three chunks (two in flight, then one more), two full ones, one and a row
        slots = np.random.default_rng(n).permutation(S)[:n].astype(np.int64)
        x = np.random.default_rng(n + 1).standard_normal((n, n_in)).astype(np.float32)
        fresh = np.random.default_rng(n + 2).random(n) < 0.3
        want = ref.step(x, slots, fresh)
        np.testing.assert_allclose(step.step(model, x, slots, fresh), want, rtol=1e-6, atol=1e-6, err_msg=f"n={n}")
        torch.testing.assert_close(store.h, ref.store.h, rtol=1e-6, atol=1e-6)


def test_two_waves_may_be_pending_not_three():
    dev = torch.device("cpu")
    model = _model("regression", 0)
    step = DeviceStep(model, StateStore(2, 24, 10, dev), "torch", dev, cuda_graphs=False)
    x = np.zeros((1, 5), dtype=np.float32)
    first = step.submit(model, x, np.array([0]), np.array([True]))
    second = step.submit(model, x, np.array([1]), np.array([True]))
    with pytest.raises(RuntimeError, match="two waves are pending"):
        step.submit(model, x, np.array([2]), np.array([True]))
    assert first.result().shape == (1, 3) and second.result().shape == (1, 3)
    with pytest.raises(RuntimeError, match="already taken"):
        first.result()


def test_replaced_store_tables_are_refused():
    dev = torch.device("cpu")
    model = _model("regression", 0)
    store = StateStore(2, 24, 10, dev)
    step = DeviceStep(model, store, "torch", dev, cuda_graphs=False)
    store.h = torch.zeros_like(store.h)
    with pytest.raises(RuntimeError, match="tables were replaced"):
        step.step(model, np.zeros((1, 5), dtype=np.float32), np.array([0]), np.array([True]))


# ---- on a GPU (not run yet: no GPU was lent to the session that wrote these) ----------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=_cuda)])
def test_graph_replay_matches_the_uncaptured_step(device, task, backend, monkeypatch):
    """Captured per bucket and replayed (weights published half-way copied into the captured tensors) against
    the same DeviceStep launching eagerly: the same kernels on the same inputs, so equal to rounding."""
    from lstmd.kernels import triton_lstm

    monkeypatch.setattr(triton_lstm, "ALLOW_TF32", False)
    seen = set()
    for k, want, got, ref_store, store, step in _run_pair(task, backend, device=device, graphs=True, swap_at=3):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"wave {k}")
        torch.testing.assert_close(store.h, ref_store.h, rtol=1e-5, atol=1e-6)
        seen = set(step._graphs)
    assert seen, "no graph was captured"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=_cuda)])
def test_engine_on_cuda_serves_through_graphs(device):
    """The engine's GPU branch: buckets captured on first use, predictions as the CPU engine's (TF32 allowed)."""
    S, n_in = 64, 5
    model = _model("regression", 0)
    cpu = Engine(model, StateStore(2, 24, S, torch.device("cpu")), torch.device("cpu"), "torch")
    gpu = Engine(model, StateStore(2, 24, S, torch.device(device)), torch.device(device), "auto", cuda_graphs=True)
    rng = np.random.default_rng(5)
    for x, slots, fresh in _waves(rng, S, n_in, n_waves=8):
        np.testing.assert_allclose(gpu.step(x, slots, fresh), cpu.step(x, slots, fresh), rtol=1e-2, atol=1e-3)
    assert gpu._device_step._graphs


def test_forecast_models_step_through_the_engine_not_the_device_step():
    """Per-stream adaptation (daemon/normalization.py) is not in DeviceStep: it refuses forecast models, and the
    engine's CUDA branch never builds it for one."""
    dev = torch.device("cpu")
    model = _model("forecast", 0)
    with pytest.raises(ValueError, match="forecast models step through the engine"):
        DeviceStep(model, StateStore(2, 24, 10, dev), "torch", dev, cuda_graphs=False)
