"""The multi-step training loss (`train.horizon`, daemon/horizon.py): horizon 1 is today's loss bit for bit, horizon k
equals a hand-written nn.LSTMCell + head rollout from every position (loss and every gradient), the config refuses
what cannot work, and a daemon trains with horizon 6 and publishes."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.workloads import PeriodicStreams
from lstmd.daemon.config import ConfigError, load_config
from lstmd.daemon.horizon import linear_scan, multistep_baseline, multistep_loss
from lstmd.daemon.metrics import Metrics
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import CLIP, SCALE_CLIP, SCALE_FLOOR, SCALE_RATE, ForecastNormalization
from lstmd.daemon.recorder import Recorder
from lstmd.daemon.tasks import ForecastTask
from lstmd.daemon.trainer import Trainer
from prometheus_client import CollectorRegistry

from tests.test_train import FORECAST, feed_periodic

I, H, O, COLUMNS = 3, 5, 2, [2, 0]  # noqa: E741 (the sizes' usual letters)


def window(B: int = 3, T: int = 7, L: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of recorded forecast windows: events x, their changes dx, the streams' scales, the next
    events' forecast columns y (some unknown), and start states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T + 1, I, generator=g).cumsum(1)
    mask = torch.rand(B, T, generator=g) > 0.15
    return {
        "x": x[:, :T],
        "dx": torch.cat([torch.zeros(B, 1, I), x[:, 1:T] - x[:, : T - 1]], 1),
        "scale": 0.5 + torch.rand(B, T, I, generator=g),
        "y": x[:, 1:, COLUMNS],
        "mask": mask,
        "h0": 0.3 * torch.randn(L, B, H, generator=g),
        "c0": 0.3 * torch.randn(L, B, H, generator=g),
    }


def weights(L: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(L):
        size = I if k == 0 else H
        out += [0.4 * torch.randn(4 * H, size, generator=g), 0.4 * torch.randn(4 * H, H, generator=g),
                0.1 * torch.randn(4 * H, generator=g), 0.1 * torch.randn(4 * H, generator=g)]  # fmt: skip
    out += [0.4 * torch.randn(O, H, generator=g), 0.1 * torch.randn(O, generator=g)]
    return [w.requires_grad_(True) for w in out]


def norm_of(data: dict, inputs: str) -> ForecastNormalization:
    return ForecastNormalization.from_data(data["x"].reshape(-1, I), data["dx"].reshape(-1, I), inputs)


def make_trainer(L: int, horizon: int) -> Trainer:
    config = load_config(overrides=[
        "model.task=forecast", f"model.input_size={I}", f"model.output_size={O}", f"model.hidden_size={H}",
        f"model.num_layers={L}", f"model.forecast_columns={COLUMNS}", f"train.horizon={horizon}", "train.k2=8",
    ], environ={})  # fmt: skip
    spec = ModelSpec(I, H, L, O, "forecast", tuple(COLUMNS))
    recorder = Recorder(L, H, I, O, "forecast", 8, 4, 32, 8, columns=COLUMNS)
    model = ServingModel.initial(spec, 0)
    metrics = Metrics(CollectorRegistry())
    return Trainer(config.train, spec, recorder, lambda: model, metrics, torch.device("cpu"))


def layers_of(params: list[torch.Tensor], L: int):
    return [tuple(params[4 * k : 4 * k + 4]) for k in range(L)]


@pytest.mark.parametrize("L", [1, 2])
def test_horizon_one_is_todays_loss_bit_for_bit(L):
    data, params = window(L=L), weights(L)
    norm, trainer = norm_of(data, "stream"), make_trainer(L, 1)
    task, columns = ForecastTask(trainer.spec), torch.tensor(COLUMNS)
    # Today's loss, as the trainer formed it before train.horizon: the whole sequence, the head, the task's loss.
    seq, _ = trainer._sequence(norm.lstm_inputs(data["x"], data["dx"], data["scale"]), data["h0"], data["c0"],
                               layers_of(params, L))
    today = task.loss(seq @ params[-2].t() + params[-1], data, norm, columns)
    assert torch.equal(trainer._loss(params, norm, data), today)
    assert torch.equal(trainer.baseline_loss(data), task.baseline_loss(data, columns))
    # The multi-step loss at horizon 1 is the same loss (its sequence runs one layer at a time).
    multi = multistep_loss(task, trainer._sequence, layers_of(params, L), (params[-2], params[-1]), norm, data,
                           columns, 1)
    assert torch.equal(multi, today) if L == 1 else torch.allclose(multi, today, rtol=1e-6, atol=1e-7)
    assert torch.equal(multistep_baseline(task, data, columns, 1), task.baseline_loss(data, columns))


def reference_loss(params, data, norm, L: int, horizon: int, baseline: bool = False) -> torch.Tensor:
    """By hand: for every window b and position t, nn.LSTMCell layers over events 0..t from the window's start
    state, then horizon - 1 steps fed the model's own forecast (the scale stepped as serving steps it), each step
    scored against event t + j in units of the scale at t per step of lead time."""
    cells = []
    for k in range(L):
        cell = torch.nn.LSTMCell(I if k == 0 else H, H)
        for name, p in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), params[4 * k : 4 * k + 4], strict=True):
            del cell._parameters[name]
            setattr(cell, name, p)  # the very tensors: gradients flow to them
        cells.append(cell)
    head = lambda h: h @ params[-2].t() + params[-1]  # noqa: E731
    stream, cols = norm.inputs == "stream", COLUMNS
    x, dx, scale, y, mask = data["x"], data["dx"], data["scale"], data["y"], data["mask"]
    B, T, _ = x.shape
    sums, counts = [0.0] * horizon, [0] * horizon

    def step(state, inp):
        out = []
        for k, cell in enumerate(cells):
            h, c = cell(inp, state[k])
            out.append((h, c))
            inp = h
        return out

    def forecast(last, s, h_top):
        change = head(h_top)
        return last[cols] + (s[cols] if stream else norm.delta_scale[cols]) * change

    for b in range(B):
        state = [(data["h0"][k, b : b + 1], data["c0"][k, b : b + 1]) for k in range(L)]
        for t in range(T):
            seen = dx[b, t] / scale[b, t] if stream else dx[b, t] / norm.delta_scale
            state = step(state, seen.clamp(-CLIP, CLIP).unsqueeze(0) if stream else seen.unsqueeze(0))
            roll, last, s = state, x[b, t], scale[b, t]
            pred = forecast(last, s, roll[-1][0][0])
            for j in range(1, horizon + 1):
                if j > 1:
                    event = last.clone()
                    event[cols] = pred
                    change = event - last
                    if stream:  # serving's scale step for a stream past its warm-up; a statistic, no gradient
                        s = torch.maximum(s.lerp(torch.minimum(change.abs(), s * SCALE_CLIP), SCALE_RATE),
                                          torch.tensor(SCALE_FLOOR)).detach()
                        seen = (change / s).clamp(-CLIP, CLIP)
                    else:
                        seen = change / norm.delta_scale
                    roll = step(roll, seen.unsqueeze(0))
                    last = event
                    pred = forecast(last, s, roll[-1][0][0])
                at = t + j - 1
                if at >= T or not mask[b, at]:
                    continue
                origin, s0 = x[b, t, cols], scale[b, t, cols]
                target = ((y[b, at] - origin) / s0).clamp(-CLIP * j, CLIP * j)
                moved = 0.0 if baseline else (pred - origin) / s0
                sums[j - 1] = sums[j - 1] + (((moved - target) / j) ** 2).sum()  # per step of lead time
                counts[j - 1] += 1
    losses = [sums[j] / (counts[j] * O) for j in range(horizon) if counts[j]]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("L,inputs", [(1, "stream"), (2, "stream"), (1, "change")])
def test_horizon_k_equals_a_hand_written_rollout_with_gradients(L, inputs):
    horizon = 4
    data = window(L=L, seed=L)
    norm = norm_of(data, inputs)
    trainer = make_trainer(L, horizon)
    task, columns = ForecastTask(trainer.spec), torch.tensor(COLUMNS)
    params = weights(L, seed=7)
    loss = trainer._loss(params, norm, data)
    grads = torch.autograd.grad(loss, params)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    ref = reference_loss(ref_params, data, norm, L, horizon)
    ref_grads = torch.autograd.grad(ref, ref_params)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The candidate check's baseline: the last value on the same k-step objective.
    baseline = multistep_baseline(task, data, columns, horizon)
    assert trainer.baseline_loss(data).item() == baseline.item()
    assert baseline.item() == pytest.approx(reference_loss(params, data, norm, L, horizon, baseline=True).item(),
                                            rel=1e-6)
    # A longer horizon is a different objective (the one-step loss is only its first term).
    assert not math.isclose(loss.item(), make_trainer(L, 1)._loss(params, norm, data).item(), rel_tol=1e-3)


def test_linear_scan_solves_the_recurrence():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 11, 3, generator=g), torch.randn(2, 11, 3, generator=g)
    s, want = torch.zeros(2, 3), []
    for t in range(11):
        s = a[:, t] * s + b[:, t]
        want.append(s)
    torch.testing.assert_close(linear_scan(a, b), torch.stack(want, 1))


def test_the_config_refuses_a_horizon_that_cannot_work():
    refused = r"train.horizon = 3 is for model.task = forecast only \(task is 'regression'\)"
    with pytest.raises(ConfigError, match=refused):
        load_config(overrides=["train.horizon=3"], environ={})
    with pytest.raises(ConfigError, match=r"train.horizon \(40\) must not exceed train.k2 \(32\)"):
        load_config(overrides=["model.task=forecast", "model.output_size=8", "train.horizon=40"], environ={})
    with pytest.raises(ConfigError, match="train.horizon"):
        load_config(overrides=["model.task=forecast", "model.output_size=8", "train.horizon=0"], environ={})
    assert load_config(overrides=["train.horizon=1"], environ={}).train.horizon == 1  # any task: today's loss


def test_a_daemon_trains_with_horizon_6_and_publishes(make_daemon):
    daemon = make_daemon(**{**FORECAST, "train.horizon": 6})
    admin = Admin(daemon.endpoints["control"])
    workload = PeriodicStreams(24, 2, seed=3)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
        outcomes = [admin.train_now(wait=120)["last_round"] for _ in range(2)]
        status = admin.train_status()
        forecast = producer.forecast(workload.ids[:3], horizon=6)
    assert status["settings"]["horizon"] == 6
    assert any(o["outcome"] == "published" for o in outcomes), outcomes
    for o in outcomes:
        assert math.isfinite(o["holdout_candidate"]) and math.isfinite(o["holdout_baseline"]), o
        if o["outcome"] == "published":
            assert o["holdout_candidate"] <= o["holdout_serving"]
    assert status["model_version"] >= 1
    assert forecast.shape == (3, 6, 2) and np.isfinite(forecast).all()


def test_the_holdout_check_judges_on_the_k_step_objective(make_daemon):
    """A round's holdout losses are the k-step losses of the models it compares and of the last value on the held-out
    windows, not the one-step ones."""
    horizon = 4
    daemon = make_daemon(**{**FORECAST, "train.horizon": horizon})
    admin = Admin(daemon.endpoints["control"])
    workload = PeriodicStreams(12, 2, seed=5)
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, workload, 40)
        report = admin.train_now(wait=120)["last_round"]
    assert report["outcome"] in ("published", "rejected"), report
    # Nothing was recorded since: the recorder's held-out windows are the round's (all of them: fewer than its cap).
    trainer = daemon.trainer
    _, holdout = daemon.recorder.sample(1, 1024, np.random.default_rng(0))
    data = trainer._to_device(holdout)
    task, columns = trainer.task, trainer.task.columns(torch.device("cpu"))
    # Serving now: the candidate if it was published, else the model it was compared against.
    model = daemon.engine.model
    judged = report["holdout_candidate" if report["outcome"] == "published" else "holdout_serving"]
    loss = multistep_loss(task, trainer._sequence, model.params, model.head, model.normalization, data, columns,
                          horizon)
    assert judged == pytest.approx(loss.item(), rel=1e-5)
    baseline = multistep_baseline(task, data, columns, horizon).item()
    assert report["holdout_baseline"] == pytest.approx(baseline, rel=1e-6)
    one_step = task.baseline_loss(data, columns).item()
    assert not math.isclose(report["holdout_baseline"], one_step, rel_tol=1e-3)


def test_the_benchmarks_baselines_are_the_last_value_and_the_value_whole_seasons_before():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multistep.py"
    spec = importlib.util.spec_from_file_location("multistep_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x, origins = np.arange(100, dtype=np.float32), np.array([5, 50])
    out = bench.baselines(x, 12, origins)
    assert (out["last value"] == x[origins, None]).all()
    target = origins[:, None] + np.arange(1, bench.FORECAST_STEPS + 1)  # x[t] = t: a forecast names its source
    seasons_back = np.where(target - 12 <= origins[:, None], target - 12, target - 24)
    want = np.where(seasons_back >= 0, seasons_back, np.nan)
    np.testing.assert_array_equal(out["seasonal naive"], want)


def test_trainer_warm_up_compiles_the_sequence_for_the_serving_shapes():
    """Trainer.start() calls warm_up_kernels on CUDA (before the daemon serves); here it runs the Triton sequence
    kernels through the interpreter on the serving model's shapes: forward and backward of every reachable plan,
    with the trainer's weights and optimizer untouched."""
    from lstmd.kernels.backends import Backends

    trainer = make_trainer(2, 1)
    trainer.backends = Backends(step="triton", sequence="triton")
    assert trainer.warm_up_kernels() == 0  # the interpreter compiles nothing: it ran, and raised nothing
    assert trainer._params == [] and trainer.rounds == 0
