"""Output that reads well: `status` and `train status` as titled sections with human durations and times (one
rendering of the training section for both), `--json` unchanged, `--json` a flag everywhere (bench --out FILE)."""

from __future__ import annotations

import json
import re

import numpy as np
from lstmd.clients import Admin, Producer
from lstmd.clients.cli import app
from lstmd.clients.cli._format import duration, moment, size
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_durations_times_and_sizes():
    assert [duration(s) for s in (0.0123, 4.25, 42, 185, 8040, 200000)] == [
        "12 ms", "4.2 s", "42 s", "3 min 5 s", "2 h 14 min", "2 d 7 h",
    ]  # fmt: skip
    assert moment(1000.0, now=1012.0).endswith("(12 s ago)") and moment(None) == "-"
    assert size(14459392) == "13.8 MiB" and size(512) == "512 B"


def test_status_and_train_status_read_the_same_and_json_is_unchanged(make_daemon):
    daemon = make_daemon(
        **{"model.input_size": 2, "train.enabled": True, "train.interval": 0.0, "train.k2": 4,
           "train.record_steps": 8, "train.holdout_windows": 1, "train.min_windows": 1, "durability.wal": True}
    )  # fmt: skip
    control = ["--control", daemon.endpoints["control"]]
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(12):
            ids = [f"s{i}" for i in range(8)]
            producer.send(ids, np.random.rand(8, 2).astype(np.float32), targets=np.random.rand(8).astype(np.float32))
    admin = Admin(daemon.endpoints["control"])
    admin.train_now(wait=120)

    raw = admin.status()
    as_json = json.loads(invoke("status", *control, "--json"))
    assert set(as_json) == set(raw) and as_json["train"]["rounds"] == raw["train"]["rounds"]
    assert as_json["events"] == raw["events"] and as_json["endpoints"] == raw["endpoints"]

    status = invoke("status", *control)
    train = invoke("train", "status", *control)
    for text in ("last round", "#1 ", "ago), took", "rejected in a row", "recorder", "8 of 1,024 streams"):
        assert text in status and text in train, text
    for name, endpoint in raw["endpoints"].items():
        assert re.search(rf"{name}\s+{re.escape(endpoint)}", status), (name, status)
    assert "up for" in status and "write-ahead log  on, fsync interval" in status
    # No epoch floats, dict reprs or raw keys for people.
    assert not re.search(r"\b1\d{9}\.\d", status + train), status + train
    assert "{'" not in status + train and "uptime_s" not in status and "last_round." not in train


def test_streams_model_and_snapshot_views(make_daemon):
    daemon = make_daemon(**{"durability.wal": True})
    control = ["--control", daemon.endpoints["control"]]
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a", 7], np.ones((2, 8), np.float32))
    listed = invoke("streams", "list", *control)
    assert "streams (all; --limit shows more)" in listed and "last seq" in listed and " ms " in listed
    shown = invoke("streams", "show", "a", *control)
    assert "|h|" in shown and "idle" in shown and "[" not in shown  # norms, not lists
    info = invoke("model", "info", *control)
    assert "8 inputs -> 1 x LSTM(24) -> 1 outputs" in info
    snap = invoke("snapshot", *control)
    assert "lstmd snapshot" in snap and "KiB" in snap and re.search(r"streams\s+2\b", snap), snap


def test_bench_json_is_a_flag_and_out_writes_a_file(make_daemon, tmp_path):
    daemon = make_daemon()
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench",
            *("--events", daemon.endpoints["events"], "--control", daemon.endpoints["control"]),
            *("--streams", "20", "--events-per-message", "10", "--rate", "1000"),
            *("--duration", "0.3", "--warmup", "0.1", "--json", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # stdout is the JSON alone; the table went to stderr
    assert printed == json.loads(out.read_text()) and printed["runs"][0]["events"] > 0
    assert "lstmd bench (latency in ms" in result.stderr
