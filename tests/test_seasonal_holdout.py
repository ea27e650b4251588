"""The trainer's holdout with `train.season`: the recorder hands the held-out windows each position's seasonal lag
(exactly, NaN where the stream's recorded history does not reach it), the round reports the seasonal-naive loss
beside the last value's, and a candidate worse than the better of the two baselines is not published."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from lstmd.daemon.recorder import Recorder
from typer.testing import CliRunner

SEASON = 12


def test_holdout_windows_carry_each_positions_seasonal_lag():
    """Two streams, x = position (+ 100 for the second): the newest window of a long stream has every lag, that of a
    short one lacks the lag before its start; training windows carry none."""
    rec = Recorder(1, 4, 1, 1, "forecast", capacity=4, record_streams=2, record_steps=16, k2=4, season=6)
    h = torch.zeros(1, 4, 4)
    for t in range(22):
        slots = np.array([0, 1]) if t < 8 else np.array([0])
        x = (np.array([[0.0], [100.0]], np.float32) + t)[: slots.size]
        rec.record(slots, x, np.full(slots.size, t), None, np.full(slots.size, t == 0), h, h)
    train, held = rec.sample(32, 16, np.random.default_rng(0))
    assert train.seasonal is None and held.seasonal is not None
    by_start = {float(w[0, 0]): s[:, 0] for w, s in zip(held.x, held.seasonal, strict=True)}
    # Stream 0: 22 events, its newest complete window holds positions 16..19; lags p + 1 - 6 = 11..14.
    np.testing.assert_array_equal(by_start[16.0], [11.0, 12.0, 13.0, 14.0])
    # Stream 1: 8 events, newest window 4..7; the lag of position 4 (-1) precedes the stream.
    np.testing.assert_array_equal(by_start[104.0], [np.nan, 100.0, 101.0, 102.0])


def periodic(steps: int, seed: int) -> np.ndarray:
    """A sharp pattern repeating every SEASON events, a little noise: seasonal naive is near perfect on it."""
    rng = np.random.default_rng(seed)
    pattern = rng.standard_normal(SEASON) * 3.0
    return (np.tile(pattern, steps // SEASON + 1)[:steps] + rng.standard_normal(steps) * 0.01).astype(np.float32)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("season", [SEASON, 0], ids=["season", "no-season"])
def test_a_candidate_worse_than_seasonal_naive_is_not_published(make_daemon, season):
    """Strongly periodic streams, where seasonal naive beats the last value by far: with the season configured the
    round reports both baselines and rejects the candidate (worse than seasonal naive; a huge tolerance lets it pass
    the comparison with the serving model, so only the baseline stops it). Without it, the same candidate is
    published: the serving model is the only bar there."""
    daemon = make_daemon(
        **{"model.task": "forecast", "model.input_size": 1, "model.output_size": 1, "train.enabled": True,
           "train.interval": 0, "train.season": season, "train.tolerance": 1000.0}  # fmt: skip
    )
    series = np.stack([periodic(192, seed=s) for s in range(4)], axis=1)[:, :, None]
    with Producer(daemon.endpoints["events"]) as producer:
        for x in series:
            producer.send(["a", "b", "c", "d"], x)
    report = Admin(daemon.endpoints["control"]).train_now(wait=120)["last_round"]
    if season:
        assert report["outcome"] == "rejected", report
        assert "worse than the seasonal-naive forecast's" in report["reason"], report
        assert report["holdout_seasonal"] < 0.01 * report["holdout_baseline"], "seasonal naive beats the last value"
        assert report["holdout_candidate"] > report["holdout_seasonal"], report
        assert daemon.engine.model.version == 0, "nothing was published"
        table = CliRunner().invoke(app, ["train", "status", "--control", daemon.endpoints["control"]]).stdout
        assert "seasonal naive" in table and "seasonal-naive" in table, table  # the loss and the reason
    else:
        assert report["outcome"] == "published" and report["holdout_seasonal"] is None, report
