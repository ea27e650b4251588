"""`lstmd replay`: it says which columns it sends, handles gaps only when told how (and counts them), exits
non-zero when the daemon rejected rows, scores finite rows only and next to the last-value baseline."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from lstmd.clients import Admin
from lstmd.clients.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def replay(daemon, csv_path, *args: str):
    result = runner.invoke(app, ["replay", str(csv_path), "--events", daemon.endpoints["events"], *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def write(tmp_path, lines: list[str], name: str = "e.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(**{"model.input_size": 2})


def test_default_columns_are_printed_and_a_text_time_column_is_left_out(daemon, tmp_path):
    lines = ["time,sensor,a,b,y"] + [f"2026-01-01T00:00:{i:02d},s{i % 2},{i % 5},{i % 3},{i % 4}" for i in range(30)]
    result = replay(daemon, write(tmp_path, lines), "--stream-col", "sensor", "--target", "y")
    assert result.exit_code == 0, result.output
    assert "features a, b, target 'y'" in result.stdout
    assert "not numeric, left out: time" in result.stdout
    assert Admin(daemon.endpoints["control"]).status()["events"]["ok"] == 30


def test_a_numeric_column_that_only_increases_gets_a_note(daemon, tmp_path):
    lines = ["stream,t,a"] + [f"{i % 3},{1000 + i},{(i * 7) % 5}" for i in range(30)]
    result = replay(daemon, write(tmp_path, lines), "--json")
    # Two columns for an input_size of 2: the daemon takes them; the note says what `t` looks like.
    assert result.exit_code == 0, result.output
    assert "'t' only increases (a time or row index?)" in result.stderr
    assert json.loads(result.stdout)["features"] == ["t", "a"]
    chosen = replay(daemon, write(tmp_path, lines + ["1,1030,4"]), "--features", "a,a", "--json")
    assert chosen.exit_code == 0 and "only increases" not in chosen.stderr


@pytest.mark.parametrize("gap", ["", "NaN", "nan", "inf"])
def test_a_gap_is_an_error_naming_its_line_and_column(daemon, tmp_path, gap):
    lines = ["stream,a,b,y"] + [f"{i % 2},{i},{i},{i}" for i in range(10)]
    lines[4] = f"1,3,{gap},3"  # file line 5
    result = replay(daemon, write(tmp_path, lines), "--target", "y")
    assert result.exit_code == 1
    assert "line 5, column 'b': empty or NaN (1 rows have gaps)" in result.stderr
    assert "--skip-missing" in result.stderr and "--fill VALUE" in result.stderr
    assert Admin(daemon.endpoints["control"]).status()["events"].get("ok", 0) == 0  # nothing was sent


def test_skip_missing_and_fill_count_what_they_did(daemon, tmp_path):
    lines = ["stream,a,b,y"] + [f"{i % 2},{i},{i},{i}" for i in range(20)]
    lines[3] = "0,2,,2"
    lines[8] = "1,7,7,nan"
    path = write(tmp_path, lines)
    skipped = replay(daemon, path, "--target", "y", "--skip-missing", "--json")
    assert skipped.exit_code == 0, skipped.output
    summary = json.loads(skipped.stdout)
    assert summary["events"] == 18 and summary["skipped_rows"] == 2 and summary["filled_cells"] == 0
    assert "left out 2 rows" in skipped.stderr
    filled = replay(daemon, path, "--target", "y", "--fill", "0", "--json")
    assert filled.exit_code == 0, filled.output
    summary = json.loads(filled.stdout)
    assert summary["events"] == 20 and summary["filled_cells"] == 2 and summary["skipped_rows"] == 0
    assert "filled 2 empty or NaN cells with 0" in filled.stderr
    both = replay(daemon, path, "--skip-missing", "--fill", "0")
    assert both.exit_code == 1 and "exclude each other" in both.stderr


def test_rejected_rows_make_the_exit_code_1_and_are_named(daemon, tmp_path):
    lines = ["stream,a,b,y"] + [f"s{i % 2},{i},{i},{i}" for i in range(12)]
    lines[6] = ",5,5,5"  # an empty stream id: the daemon rejects that event (line 7)
    result = replay(daemon, write(tmp_path, lines), "--target", "y", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["rejected"] == 1 and summary["events"] == 12
    assert "the daemon rejected 1 of 12 rows: line 7 (stream ''): stream id is empty" in result.stderr
    # Scores cover finite rows only: the rejected row's NaN prediction does not turn the error into NaN.
    assert summary["mae"] is not None and np.isfinite(summary["mae"])


def test_error_stands_next_to_the_last_value_baseline(daemon, tmp_path):
    # y is the stream's previous y: the last-value baseline is exact (0) on every row after each stream's first.
    rows, last = [], {}
    for i in range(40):
        stream = f"s{i % 4}"
        last[stream] = y = last.get(stream, 0.0) + 1.0
        rows.append(f"{stream},{i % 7},{i % 3},{y}")
    result = replay(daemon, write(tmp_path, ["stream,a,b,y", *rows]), "--target", "y", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["scored"] == 36  # each stream's first row has no previous target
    assert summary["baseline_mae"] == pytest.approx(1.0) and summary["baseline_rmse"] == pytest.approx(1.0)
    assert summary["mae"] > 0
    table = replay(daemon, write(tmp_path, ["stream,a,b,y", *rows], "t.csv"), "--target", "y")
    assert "baseline_mae" in table.stdout and "scored" in table.stdout


def test_bad_values_are_one_line_naming_the_cell(daemon, tmp_path):
    lines = ["stream,a,b"] + [f"{i},{i},{i}" for i in range(5)]
    lines[2] = "1,x1,1"
    result = replay(daemon, write(tmp_path, lines), "--features", "a,b")
    assert result.exit_code == 1 and "line 3, column 'a': 'x1' is not a number" in result.stderr


def test_nothing_listening_fails_within_the_timeout(tmp_path):
    path = write(tmp_path, ["stream,a,b", "1,1,1"])
    result = runner.invoke(app, ["replay", str(path), "--events", "tcp://127.0.0.1:1", "--timeout", "0.3"])
    assert result.exit_code == 1 and "no daemon answered at tcp://127.0.0.1:1" in result.stderr


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: its import raises ImportError
    path = write(tmp_path, ["stream,a,y", "1,1,1"])
    result = runner.invoke(app, ["replay", str(path), "--target", "y", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "pip install 'lstmd[bench]'" in result.stderr


def test_plot_draws_predictions_and_targets(daemon, tmp_path):
    pytest.importorskip("matplotlib")
    lines = ["stream,a,b,y"] + [f"s{i % 6},{i % 7},{i % 3},{i % 5}" for i in range(60)]
    png = tmp_path / "p.png"
    result = replay(daemon, write(tmp_path, lines), "--target", "y", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plotted 4 streams" in result.stdout


def test_end_column_sends_sequence_ends_and_scores_end_rows_only(make_daemon, tmp_path):
    """A model served with model.output = "end": the end column's rows are answered (and equal nn.LSTM + head over
    each whole sequence), only they need a target, and the error is over them, next to each stream's previous
    sequence's label."""
    import torch

    daemon = make_daemon(**{"model.input_size": 2, "model.output": "end"})
    rng = np.random.default_rng(5)
    rows, sequences, labels = [], {}, []
    current: dict[str, list] = {}
    lengths = {f"s{k}": iter([1, 4, 2, 3, 1, 3, 2, 4] * 3) for k in range(3)}  # sequence lengths, per stream
    wanted = {stream: next(it) for stream, it in lengths.items()}
    for i in range(60):
        stream = f"s{i % 3}"
        x = rng.standard_normal(2).round(3)
        current.setdefault(stream, []).append(x)
        end = len(current[stream]) == wanted[stream]
        if end:
            wanted[stream] = next(lengths[stream])
        label = f"{rng.standard_normal():.3f}" if end else ""  # only end rows carry a label
        rows.append(f"{stream},{x[0]},{x[1]},{label},{'yes' if end else ''}")
        if end:
            sequences.setdefault(stream, []).append(np.stack(current.pop(stream)))
            labels.append((stream, float(label)))
    csv_path = write(tmp_path, ["stream,a,b,y,done", *rows])
    result = replay(daemon, csv_path, "--target", "y", "--end-col", "done", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    ends = sum(len(v) for v in sequences.values())
    assert summary["sequences"] == ends and summary["events"] == 60
    assert summary["scored"] == ends - 3  # each stream's first sequence has no previous label
    # The model's answers on the end rows, recomputed: nn.LSTM + head over each whole sequence from zero state.
    lstm, head = daemon.engine.model.to_modules()
    with torch.no_grad():
        preds = {s: [float(head(lstm(torch.from_numpy(xs.astype(np.float32))[None])[0][0, -1])[0])
                     for xs in seqs] for s, seqs in sequences.items()}
    order = {s: iter(p) for s, p in preds.items()}
    by_stream = [(s, y, next(order[s])) for s, y in labels]
    last, errors = {}, []
    for stream, y, pred in by_stream:
        if stream in last:
            errors.append(abs(pred - y))
        last[stream] = y
    assert summary["mae"] == pytest.approx(float(np.mean(errors)), rel=1e-4)
    bad = replay(daemon, write(tmp_path, ["stream,a,b,y,done", "s0,1,2,3,maybe"], "bad.csv"), "--end-col", "done")
    assert bad.exit_code != 0 and "line 2" in bad.output and "'maybe' is not an end flag" in bad.output
