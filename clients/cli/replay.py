"""`lstmd replay FILE.csv`: stream a CSV file's rows through a running daemon as events, and score the replies.

It says what it sends (the feature and target columns), what it did with gaps (`--skip-missing`, `--fill`;
without either a gap is an error naming its row and column), and what came back: rows the daemon rejected make
the exit code 1, and the error (over rows with a finite prediction and target) stands next to the last-value
baseline's (each stream's previous target), so a number means something. `--plot` draws a few streams.
With `--end-col` (a model served with `model.output = "end"`) a column marks the events that end their stream's
sequence: only those are answered with a prediction, only they need a target (a label on another row is not sent),
and the error is over end rows, next to each stream's previous sequence's label.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from lstmd.clients.cli._common import (
    ConfigOpt,
    JsonOpt,
    TimeoutOpt,
    client_keys,
    console,
    err_console,
    fail,
    key_value_table,
    print_json,
    require_listener,
    resolve_endpoint,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

PLOTTED_STREAMS = 4  # --plot: the streams with the most rows, one panel each


def _columns(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _number(text: str) -> float | None:
    """The cell's value; NaN for a gap (empty, or a NaN/inf literal: the daemon refuses non-finite values);
    None when it is not a number at all."""
    text = text.strip()
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else math.nan


_TRUE, _FALSE = {"1", "true", "yes", "y", "t"}, {"", "0", "false", "no", "n", "f"}


def _flag(text: str) -> bool | None:
    """An end-column cell: 1/true/yes (an end), 0/false/no or empty (not); None when it is neither."""
    text = text.strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _default_features(header: list[str], rows: list[dict], exclude: set[str]) -> tuple[list[str], list[str]]:
    """(numeric columns, non-numeric columns) among the header's columns not in `exclude`."""
    numeric, other = [], []
    for column in header:
        if column in exclude:
            continue
        (numeric if all(_number(r[column] or "") is not None for r in rows) else other).append(column)
    return numeric, other


def _only_increasing(values: np.ndarray) -> bool:
    """A column that never decreases over the file and takes many values looks like a time or row index."""
    finite = values[np.isfinite(values)]
    return len(np.unique(finite)) > max(2, len(finite) // 2) and bool(np.all(np.diff(finite) >= 0))


def replay(
    path: Annotated[Path, typer.Argument(help="CSV file with a header row.")],
    stream_col: Annotated[str, typer.Option("--stream-col", help="Column holding the stream id.")] = "stream",
    feature_cols: Annotated[
        str | None,
        typer.Option("--features", help="Comma-separated feature columns, in model order (default: all other "
                     "numeric columns).", show_default=False),
    ] = None,
    target_col: Annotated[
        str | None, typer.Option("--target", help="Column holding the target, if any.", show_default=False)
    ] = None,
    end_col: Annotated[
        str | None,
        typer.Option("--end-col", help='Column marking the events that end a sequence (1/true/yes; a model served '
                     'with model.output = "end"); only those need a target.', show_default=False),
    ] = None,
    skip_missing: Annotated[
        bool, typer.Option("--skip-missing", help="Leave out rows with an empty or NaN feature or target.")
    ] = False,
    fill: Annotated[
        float | None,
        typer.Option("--fill", help="Put VALUE into empty or NaN feature and target cells.", show_default=False),
    ] = None,
    batch: Annotated[int, typer.Option(help="Events per message.", min=1)] = 256,
    rate: Annotated[float, typer.Option(help="Events per second at most; 0: as fast as possible.", min=0)] = 0.0,
    events: Annotated[
        str | None,
        typer.Option("--events", help="The daemon's events endpoint (default: from the config).", show_default=False),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Draw predictions vs targets of a few streams to FILE.png (needs matplotlib).",
                     show_default=False),
    ] = None,
    config: ConfigOpt = None,
    timeout: TimeoutOpt = 3.0,
    json: JsonOpt = False,
) -> None:
    """Send a CSV file's rows as events (in file order); summarise throughput, rejections and error."""
    from lstmd.clients import Producer, RejectedError

    if skip_missing and fill is not None:
        raise fail("--skip-missing and --fill exclude each other: leave gapped rows out, or fill them")
    if fill is not None and not math.isfinite(fill):
        raise fail(f"--fill must be a finite number, got {fill}")
    if plot is not None:
        if target_col is None:
            raise fail("--plot draws predictions against targets: name the target column with --target")
        try:
            import matplotlib  # noqa: F401  (checked before anything is sent)
        except ImportError:
            raise fail("--plot needs matplotlib, which is optional: pip install 'lstmd[bench]'") from None
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if stream_col not in header:
            raise fail(f"{path} has no stream column {stream_col!r}; columns: {', '.join(header)}")
        try:
            rows = list(reader)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise fail(f"{path} is not a readable CSV file ({exc})") from None
    if not rows:
        raise fail(f"{path} has no data rows")
    features = _columns(feature_cols)
    not_numeric: list[str] = []
    if features is None:
        features, not_numeric = _default_features(header, rows, {stream_col, target_col, end_col})
    missing = [c for c in [*features, *([target_col] if target_col else []), *([end_col] if end_col else [])]
               if c not in header]
    if missing:
        raise fail(f"{path} lacks column(s) {', '.join(missing)}; columns: {', '.join(header)}")
    if not features:
        raise fail(f"{path} has no numeric feature column; name them with --features")

    # Row i of the file is line i + 2 (the header is line 1): messages name lines, as an editor shows them.
    columns = [*features, *([target_col] if target_col else [])]
    values = np.empty((len(rows), len(columns)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            value = _number(row[column] or "")
            if value is None:
                raise fail(f"{path} line {i + 2}, column {column!r}: {row[column]!r} is not a number")
            values[i, j] = value
    ends = _ends(path, rows, end_col) if end_col else None
    gaps = ~np.isfinite(values)
    if ends is not None and target_col:  # a row that ends no sequence has no label: its empty target is no gap
        gaps[~ends, len(features)] = False
    gapped_rows = gaps.any(axis=1)
    skipped = filled = 0
    if gapped_rows.any():
        if skip_missing:
            skipped = int(gapped_rows.sum())
            keep = ~gapped_rows
            rows = [r for r, k in zip(rows, keep, strict=True) if k]
            values = values[keep]
            ends = None if ends is None else ends[keep]
            lines = np.flatnonzero(keep) + 2
        elif fill is not None:
            filled = int(gaps.sum())
            values[gaps] = fill
            lines = np.arange(len(rows)) + 2
        else:
            i, j = np.argwhere(gaps)[0]
            raise fail(
                f"{path} line {i + 2}, column {columns[j]!r}: empty or NaN ({int(gapped_rows.sum())} rows have "
                "gaps); pass --skip-missing to leave those rows out or --fill VALUE to fill the gaps"
            )
    else:
        lines = np.arange(len(rows)) + 2
    if not rows:
        raise fail(f"every row of {path} has a gap; nothing to send (--fill VALUE fills them instead)")
    x = values[:, : len(features)].astype(np.float32)
    y = values[:, len(features)].astype(np.float32) if target_col else None
    if y is not None and ends is not None:
        y[~ends] = np.nan  # not an end: no label is sent (the daemon records NaN as "no target")
    ids = [r[stream_col] for r in rows]

    say = err_console if json else console  # with --json, stdout carries the JSON only
    say.print(
        f"replay {path.name}: {len(rows):,} rows, stream column {stream_col!r}, features {', '.join(features)}"
        + (f", target {target_col!r}" if target_col else ", no target (no error is computed)")
        + (f", sequence ends {end_col!r} ({int(ends.sum()):,} sequences)" if ends is not None else ""),
        highlight=False,
    )
    if not_numeric:
        say.print(f"  not numeric, left out: {', '.join(not_numeric)}", highlight=False)
    if feature_cols is None:
        for j, column in enumerate(features):
            if _only_increasing(x[:, j]):
                say.print(
                    f"  note: {column!r} only increases (a time or row index?); --features leaves it out",
                    highlight=False,
                )
    if skipped:
        say.print(f"  left out {skipped:,} rows with an empty or NaN cell (--skip-missing)", highlight=False)
    if filled:
        say.print(f"  filled {filled:,} empty or NaN cells with {fill:g} (--fill)", highlight=False)

    endpoint = events or resolve_endpoint(config, None, key="events")
    require_listener(endpoint, timeout, "the events endpoint")
    producer = Producer(endpoint, **client_keys(config))
    preds = np.full((len(rows),), np.nan, dtype=np.float32)
    reasons: dict[int, str] = {}
    started = time.perf_counter()
    progress = Progress(
        TextColumn("replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=json,
    )
    try:
        with progress:
            task = progress.add_task("events", total=len(rows))
            for lo in range(0, len(rows), batch):
                hi = min(lo + batch, len(rows))
                try:
                    result = producer.send_detailed(ids[lo:hi], x[lo:hi], None if y is None else y[lo:hi],
                                                    ends=None if ends is None else ends[lo:hi].tolist())
                except (RejectedError, TimeoutError) as exc:
                    raise fail(f"{exc} (rows of lines {lines[lo]}-{lines[hi - 1]})") from None
                reasons |= {lo + i: why for i, why in result.reasons.items()}
                preds[lo:hi] = result.predictions[:, 0]
                progress.advance(task, hi - lo)
                if rate > 0:  # pace: the batch ending at `hi` is due at hi / rate seconds
                    ahead = hi / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        time.sleep(ahead)
    finally:
        producer.close()
    elapsed = time.perf_counter() - started
    summary = {
        "events": len(rows),
        "rejected": len(reasons),
        "skipped_rows": skipped,
        "filled_cells": filled,
        "seconds": round(elapsed, 3),
        "events_per_s": round(len(rows) / elapsed, 1),
        "streams": len(set(ids)),
        "features": features,
        "target": target_col,
    }
    if ends is not None:
        summary["sequences"] = int(ends.sum())
    if y is not None:
        summary |= _scores(ids, preds, y)
    if json:
        print_json(summary)
    else:
        shown = {**summary, "features": ", ".join(features), "target": target_col or "-"}
        shown = {k: "-" if v is None else f"{v:.6g}" if isinstance(v, float) else v for k, v in shown.items()}
        console.print(key_value_table(f"replayed {path.name}", shown))
    if plot is not None:
        _plot(plot, ids, preds, y, target_col)
        say.print(f"plotted {min(PLOTTED_STREAMS, len(set(ids)))} streams to {plot}", highlight=False)
    if reasons:
        first = sorted(reasons.items())[:3]
        detail = "; ".join(f"line {lines[i]} (stream {ids[i]!r}): {why}" for i, why in first)
        raise fail(f"the daemon rejected {len(reasons):,} of {len(rows):,} rows: {detail}")


def _ends(path: Path, rows: list[dict], column: str) -> np.ndarray:
    """[rows] bool: the end column's flags; a cell that is no flag is an error naming its line."""
    out = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        flag = _flag(row[column] or "")
        if flag is None:
            raise fail(f"{path} line {i + 2}, column {column!r}: {row[column]!r} is not an end flag (1/0, true/false, "
                       "yes/no or empty)")
        out[i] = flag
    return out


def _scores(ids: list[str], preds: np.ndarray, y: np.ndarray) -> dict:
    """MAE and RMSE of the model and of the last-value baseline (a stream's previous target), over the rows
    where both exist and are finite: the model's rejected rows and each stream's first row are left out. Rows
    without a target (not a sequence's end) neither count nor become a baseline."""
    last: dict[str, float] = {}
    baseline = np.full_like(y, np.nan)
    for i, stream in enumerate(ids):
        baseline[i] = last.get(stream, np.nan)
        if np.isfinite(y[i]):
            last[stream] = y[i]
    scored = np.isfinite(preds) & np.isfinite(y) & np.isfinite(baseline)
    out: dict = {"scored": int(scored.sum())}
    for name, guess in (("", preds), ("baseline_", baseline)):
        err = (guess[scored] - y[scored]).astype(np.float64)
        out[f"{name}mae"] = float(np.abs(err).mean()) if scored.any() else None
        out[f"{name}rmse"] = float(np.sqrt((err**2).mean())) if scored.any() else None
    return out


def _plot(path: Path, ids: list[str], preds: np.ndarray, y: np.ndarray, target: str) -> None:
    """Predictions vs targets of the streams with the most rows, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    index: dict[str, list[int]] = {}
    for i, stream in enumerate(ids):
        index.setdefault(stream, []).append(i)
    chosen = sorted(index, key=lambda s: -len(index[s]))[:PLOTTED_STREAMS]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 2.4 * len(chosen)), squeeze=False, sharex=False)
    for ax, stream in zip(axes[:, 0], chosen, strict=True):
        rows = np.asarray(index[stream])
        ax.plot(y[rows], label=f"{target} (actual)", color="black", linewidth=1)
        ax.plot(preds[rows], label="prediction", color="tab:blue", linewidth=1)
        ax.set_title(f"stream {stream}", fontsize=9, loc="left")
        ax.set_xlabel("event of the stream")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
