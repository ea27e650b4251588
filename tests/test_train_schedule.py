"""Recency-weighted window sampling (`train.sample_half_life`, daemon/recorder.py) and the learning-rate schedule
(`train.lr_half_life`, `train.lr_min`, daemon/trainer.py): the draw follows the weights (statistically, but
deterministic with a seed), ages count from each stream's own newest window, and the rate decays over rounds and
restarts with every optimizer reset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.workloads import PeriodicStreams
from lstmd.daemon.recorder import Recorder

from tests.test_train import FORECAST, feed_periodic

K2 = 4


def recorder(half_life: float, lengths: tuple[int, ...] = (64,)) -> Recorder:
    """A regression recorder whose stream k recorded lengths[k] events valued 1000 k + t, every target known."""
    rec = Recorder(1, 2, 1, 1, "regression", capacity=4, record_streams=4, record_steps=64, k2=K2,
                   sample_half_life=half_life)  # fmt: skip
    h = torch.zeros(1, 4, 2)
    for t in range(max(lengths)):
        slots = np.array([k for k, n in enumerate(lengths) if t < n])
        x = (1000 * slots + t).astype(np.float32)[:, None]
        rec.record(slots, x, np.full(slots.size, t), np.ones((slots.size, 1), np.float32), np.full(slots.size, t == 0),
                   h, h)  # fmt: skip
    return rec


def ages(rec: Recorder, n: int, seed: int) -> np.ndarray:
    """Draw n training windows; each one's stream and age in windows behind that stream's newest training window."""
    train, _ = rec.sample(n, 16, np.random.default_rng(seed))
    start = train.x[:, 0, 0]
    stream = (start // 1000).astype(int)
    newest = (rec.count[stream] // K2 - 1 - rec.holdout_windows) * K2
    return stream, ((newest - start % 1000) // K2).astype(int)


def test_newer_windows_are_drawn_more_often_by_the_half_life():
    rec = recorder(half_life=2.0)
    _, age = ages(rec, 40_000, seed=0)
    counts = np.bincount(age, minlength=15)
    expected = 0.5 ** (np.arange(15) / 2.0)
    expected = expected / expected.sum() * age.size
    np.testing.assert_allclose(counts[:6], expected[:6], rtol=0.05)  # the well-populated ages, within 5%
    assert counts[0] / counts[2] == pytest.approx(2.0, rel=0.06)
    assert counts[14] > 0, "old windows still appear"


def test_the_draw_is_deterministic_with_a_seed():
    rec = recorder(half_life=3.0)
    first, second, other = (ages(rec, 500, seed)[1] for seed in (7, 7, 8))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_no_half_life_draws_uniformly():
    _, age = ages(recorder(half_life=0.0), 40_000, seed=1)
    counts = np.bincount(age, minlength=15)
    assert counts.max() / counts.min() < 1.15, counts


def test_ages_count_from_each_streams_own_newest_window():
    """A short stream's newest window weighs what a long stream's newest does: recency is per stream."""
    stream, age = ages(recorder(half_life=1.0, lengths=(64, 24)), 40_000, seed=2)
    newest_long, newest_short = ((stream == k) & (age == 0) for k in (0, 1))
    assert newest_short.sum() / newest_long.sum() == pytest.approx(1.0, rel=0.1)
    assert age[stream == 1].max() == 4  # 24 events: 6 windows, the newest held out, 5 to train on


@pytest.mark.timeout(300)
def test_the_learning_rate_decays_over_rounds_and_restarts_with_a_reset(make_daemon, tmp_path):
    lr = 0.004
    daemon = make_daemon(**{**FORECAST, "train.lr": lr, "train.lr_half_life": 2.0, "train.lr_min": 0.4,
                            "train.reset_after_rejections": 0, "train.nice": 0})  # fmt: skip
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        feed_periodic(producer, PeriodicStreams(16, 2, seed=3), 40)
    trainer = daemon.trainer
    used = []
    for _ in range(4):
        number = admin.train_now()["round"]
        assert trainer.wait_for_round(number, timeout=600)
        used.append(trainer._optimizer.param_groups[0]["lr"])
    # round k trains at lr * max(lr_min, 0.5 ** ((k - 1) / half_life))
    np.testing.assert_allclose(used, [lr, lr * 0.5**0.5, lr * 0.5, lr * 0.4])
    assert admin.train_status()["settings"]["lr_now"] == pytest.approx(lr * 0.4)
    assert int(trainer.snapshot_tensors()["rounds_since_reset"]) == 4
    path = tmp_path / "model.safetensors"
    admin.export_model(path)
    admin.import_model(path)  # an operator's model: a fresh optimizer, and the schedule starts over
    number = admin.train_now()["round"]
    assert trainer.wait_for_round(number, timeout=600)
    assert trainer._optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_the_trainer_starts_before_the_events_socket_opens(make_daemon, monkeypatch):
    """The trainer's one-off start costs (torch.optim's imports, on CUDA the Triton compiles) come before the
    sockets open and endpoints.json names them: a producer that connects as soon as it can waits for none of it.
    (Before, a daemon with training answered its first event ~1.2 s after advertising itself on the 2-core CPU;
    on the first GPU runs the compiles made that seconds, inside lstmd bench's warm-up and beyond.)"""
    from lstmd.daemon.server import Daemon
    from lstmd.daemon.trainer import Trainer

    starting: list[Daemon] = []
    events_socket_when_the_trainer_started = []
    daemon_start, trainer_start = Daemon.start, Trainer.start

    def start_daemon(self):
        starting.append(self)
        daemon_start(self)

    def start_trainer(self):
        events_socket_when_the_trainer_started.append(starting[-1].net.events)
        trainer_start(self)

    monkeypatch.setattr(Daemon, "start", start_daemon)
    monkeypatch.setattr(Trainer, "start", start_trainer)
    daemon = make_daemon(**{"train.enabled": True})
    assert events_socket_when_the_trainer_started == [None], "the trainer started after the sockets opened"
    assert daemon.net.events is not None
