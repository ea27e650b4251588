"""Watching predictions: the Subscriber client and `lstmd watch` against a real daemon's PUB socket."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from lstmd.clients import Producer, Subscriber


def _produce_until(endpoint: str, done: threading.Event, streams: list) -> None:
    """Send events for `streams` until `done`: a subscription takes a moment to reach the daemon, and nothing
    is published before it has."""
    rng = np.random.default_rng(0)
    with Producer(endpoint) as producer:
        while not done.wait(0.02):
            producer.send(streams, rng.standard_normal((len(streams), 8), dtype=np.float32))


@pytest.fixture
def producing(make_daemon):
    daemon = make_daemon()
    done = threading.Event()
    streams = ["a", "b", 7]
    thread = threading.Thread(target=_produce_until, args=(daemon.endpoints["events"], done, streams), daemon=True)
    thread.start()
    yield daemon
    done.set()
    thread.join(10)


def test_subscriber_yields_each_applied_prediction_of_the_streams_asked_for(producing) -> None:
    seen = []
    with Subscriber(producing.endpoints["publish"], streams=["b", 7], timeout=20) as sub:
        for prediction in sub:
            seen.append(prediction)
            if len(seen) == 20:
                break
        missed = sub.missed_batches
    assert {p.stream for p in seen} == {"b", 7}
    for stream in ("b", 7):
        seqs = [p.seq for p in seen if p.stream == stream]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) or missed  # in order, none lost unless dropped
    assert all(p.values.shape == (1,) and np.isfinite(p.values).all() and p.version == 0 for p in seen)


def test_subscriber_times_out_with_a_clear_message(make_daemon) -> None:
    daemon = make_daemon()
    with Subscriber(daemon.endpoints["publish"], timeout=0.3) as sub, pytest.raises(TimeoutError, match="within"):
        next(iter(sub))


def test_subscriber_key_errors_are_clear(tmp_path) -> None:
    from lstmd.clients.curve import CurveKeyError

    with pytest.raises(CurveKeyError, match="client_key is not"):
        Subscriber("tcp://127.0.0.1:1", server_key=str(tmp_path / "server.key"))
    with pytest.raises(CurveKeyError, match="server key"):
        Subscriber("tcp://127.0.0.1:1", server_key=str(tmp_path / "none.key"), client_key=str(tmp_path / "c"))


def test_lstmd_watch_json_prints_n_prediction_lines_and_exits(producing) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lstmd.clients.cli", "watch", "a", "7", "--json", "--count", "5", "--timeout", "30",
         "--publish", producing.endpoints["publish"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 5
    assert {line["stream"] for line in lines} <= {"a", 7}
    assert all(set(line) == {"stream", "seq", "version", "values"} and len(line["values"]) == 1 for line in lines)


def test_lstmd_watch_table_shows_the_streams(producing) -> None:
    from lstmd.clients.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app, ["watch", "--count", "6", "--timeout", "30", "--publish", producing.endpoints["publish"]]
    )
    assert result.exit_code == 0, result.output
    assert "lstmd watch" in result.output and "b" in result.output and "7" in result.output
