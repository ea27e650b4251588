"""`lstmd replay FILE.csv`: stream a CSV file's rows through a running daemon as events."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from lstmd.clients.cli._common import (
    ConfigOpt,
    JsonOpt,
    client_keys,
    console,
    fail,
    key_value_table,
    print_json,
    resolve_endpoint,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _columns(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def replay(
    path: Annotated[Path, typer.Argument(help="CSV file with a header row.")],
    stream_col: Annotated[str, typer.Option("--stream-col", help="Column holding the stream id.")] = "stream",
    feature_cols: Annotated[
        str | None,
        typer.Option("--features", help="Comma-separated feature columns (default: all other numeric)."),
    ] = None,
    target_col: Annotated[
        str | None, typer.Option("--target", help="Column holding the target, if any.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Events per message.")] = 256,
    rate: Annotated[float, typer.Option(help="Events per second at most; 0: as fast as possible.")] = 0.0,
    events: Annotated[
        str | None, typer.Option("--events", help="The daemon's events endpoint (default: from the config).")
    ] = None,
    config: ConfigOpt = None,
    json: JsonOpt = False,
) -> None:
    """Send a CSV file's rows as events (in file order) and summarise throughput and error."""
    from lstmd.clients import Producer, RejectedError

    if batch <= 0:
        raise fail(f"--batch must be positive, got {batch}")
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if stream_col not in header:
            raise fail(f"{path} has no stream column {stream_col!r}; columns: {', '.join(header)}")
        features = _columns(feature_cols) or [c for c in header if c not in (stream_col, target_col)]
        missing = [c for c in [*features, *([target_col] if target_col else [])] if c not in header]
        if missing:
            raise fail(f"{path} lacks column(s) {', '.join(missing)}; columns: {', '.join(header)}")
        rows = list(reader)
    if not rows:
        raise fail(f"{path} has no data rows")
    try:
        x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)
        y = np.array([float(r[target_col]) for r in rows], dtype=np.float32) if target_col else None
    except ValueError as exc:
        raise fail(f"{path}: a feature or target value is not a number ({exc})") from None
    ids = [r[stream_col] for r in rows]

    producer = Producer(events or resolve_endpoint(config, None, key="events"), **client_keys(config))
    preds = np.full((len(rows),), np.nan, dtype=np.float32)
    rejected = 0
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
                    result = producer.send_detailed(ids[lo:hi], x[lo:hi], None if y is None else y[lo:hi])
                except (RejectedError, TimeoutError) as exc:
                    raise fail(str(exc)) from None
                rejected += len(result.reasons)
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
        "rejected": rejected,
        "seconds": round(elapsed, 3),
        "events_per_s": round(len(rows) / elapsed, 1),
        "streams": len(set(ids)),
    }
    if y is not None:
        ok = np.isfinite(preds)
        summary["mae"] = float(np.abs(preds[ok] - y[ok]).mean()) if ok.any() else None
        summary["rmse"] = float(np.sqrt(((preds[ok] - y[ok]) ** 2).mean())) if ok.any() else None
    if json:
        print_json(summary)
    else:
        console.print(key_value_table(f"replayed {path.name}", summary))
