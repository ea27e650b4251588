"""Human-readable output of the `lstmd` read commands: durations, times, sizes, and the tables of `lstmd status`
and `lstmd train status` (one rendering of the training section for both). `--json` prints the daemon's data
unchanged; only this view is for people.

Keys the renderers do not know (a newer daemon's) are shown as they are in an "other" section, never dropped.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


def duration(seconds: float | None) -> str:
    """"850 ms", "42 s", "3 min 5 s", "2 h 14 min", "3 d 4 h"."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


def moment(unix_seconds: float | None, now: float | None = None) -> str:
    """A local time and how long ago: "14:03:07 (12 s ago)"; the date too when it was not today."""
    if not unix_seconds:
        return "-"
    now = time.time() if now is None else now
    same_day = time.localtime(unix_seconds)[:3] == time.localtime(now)[:3]
    stamp = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.localtime(unix_seconds))
    return f"{stamp} ({duration(max(0.0, now - unix_seconds))} ago)"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def counts(values: dict | None, zero: str = "none") -> str:
    """"ok 1,200, rejected 3" (zeros left out)."""
    shown = [f"{k} {number(v)}" for k, v in (values or {}).items() if v]
    return ", ".join(shown) or zero


def section(title: str, rows: list[tuple[str, str | Text]]) -> Table:
    """A titled two-column table; values are text, never markup (an error message may hold brackets)."""
    table = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(value))
    return table


def plain(value: Any) -> str:
    """A value the renderers do not know, readably: nested dicts as `key value` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(plain(v) for v in value) or "-"
    return number(value)


# ---- lstmd status -----------------------------------------------------------------------------------------

_STATUS_KEYS = {
    "version", "pid", "uptime_s", "device", "backend", "endpoints", "model", "streams", "capacity", "batches",
    "events", "rejections", "sequence_gaps", "evictions", "queue_depth", "durability", "train",
}  # fmt: skip


def status_view(data: dict) -> Group:
    """`lstmd status` for people: one titled section per concern."""
    model = data.get("model") or {}
    endpoints = data.get("endpoints") or {}
    parts: list = [
        section(
            "lstmd",
            [
                ("version", f"{data.get('version', '?')} (pid {data.get('pid', '?')})"),
                ("up for", duration(data.get("uptime_s"))),
                ("device", f"{data.get('device', '?')}, backend {data.get('backend', '?')}"),
                *((name, str(endpoints[name] or "off")) for name in ("events", "control", "publish", "metrics")
                  if name in endpoints),
            ],
        ),
        section("model", _model_rows(model)),
    ]
    capacity, streams = data.get("capacity") or 0, data.get("streams", 0)
    fill = f" ({streams / capacity:.0%} of {capacity:,})" if capacity else ""
    parts.append(
        section(
            "streams and events",
            [
                ("streams", f"{number(streams)}{fill}"),
                ("events", counts(data.get("events"))),
                ("batches", number(data.get("batches"))),
                ("queue depth", f"{number(data.get('queue_depth'))} messages"),
                ("rejections", counts(data.get("rejections"))),
                ("sequence gaps", number(data.get("sequence_gaps"))),
                ("evictions", counts(data.get("evictions"))),
            ],
        )
    )
    if data.get("durability"):
        parts.append(section("durability", _durability_rows(data["durability"])))
    train = data.get("train")
    parts.append(training_view(train) if train else section("training", [("state", "off")]))
    other = [(k, plain(v)) for k, v in data.items() if k not in _STATUS_KEYS]
    if other:
        parts.append(section("other", other))
    return Group(*_spaced(parts))


def _spaced(parts: list) -> list:
    out: list = []
    for part in parts:
        out += [part, ""]
    return out[:-1]


def _model_rows(model: dict) -> list[tuple[str, str]]:
    layers = model.get("num_layers", "?")
    rows = [
        ("version", number(model.get("version"))),
        ("task", str(model.get("task", "?"))),
        (
            "shape",
            f"{model.get('input_size', '?')} inputs -> {layers} x LSTM({model.get('hidden_size', '?')}) -> "
            f"{model.get('output_size', '?')} outputs",
        ),
    ]
    if model.get("forecast_columns"):
        rows.append(("forecasts", ", ".join(map(str, model["forecast_columns"]))))
    known = {"version", "task", "input_size", "hidden_size", "num_layers", "output_size", "forecast_columns"}
    return rows + [(k, plain(v)) for k, v in model.items() if k not in known]


def _durability_rows(d: dict) -> list[tuple[str, str]]:
    if d.get("wal"):
        segment = f"segment {d.get('wal_segment', '?')}, {size(d.get('wal_segment_bytes'))}"
        wal = f"on, fsync {d.get('fsync', '?')}; {segment}"
    else:
        wal = "off (events since the last snapshot are lost on a crash)"
    rows = [("write-ahead log", wal)]
    if d.get("wal_error"):
        rows.append(("log error", Text(str(d["wal_error"]), style="bold red")))
    rows.append(("snapshots", number(d.get("snapshots"))))
    restored = d.get("restored") or {}
    if restored.get("snapshot") or restored.get("records"):
        rows.append(
            (
                "restored",
                f"{restored.get('snapshot') or 'no snapshot'}, {number(restored.get('streams'))} streams, "
                f"{number(restored.get('events'))} logged events replayed, in {duration(restored.get('seconds'))}",
            )
        )
    else:
        rows.append(("restored", "nothing (a fresh start)"))
    known = {"wal", "fsync", "wal_segment", "wal_segment_bytes", "wal_error", "snapshots", "restored"}
    return rows + [(k, plain(v)) for k, v in d.items() if k not in known]


# ---- training (lstmd status, lstmd train status) ----------------------------------------------------------


def training_view(data: dict) -> Table:
    """The trainer's state, rounds, last round, recorder and settings, as `train status` and `status` show it."""
    if not data.get("enabled"):
        return section("training", [("state", "off (start the daemon with --set train.enabled=true)")])
    state = "paused (lstmd train resume)" if data.get("paused") else "on"
    rows = [
        ("state", state),
        ("rounds", f"{number(data.get('rounds'))} ({counts(data.get('outcomes'), zero='none finished')})"),
    ]
    if data.get("requested"):
        rows.append(("requested", f"{number(data['requested'])} by `lstmd train now`"))
    if data.get("next_round"):  # what the next scheduled round waits for (new data, the interval, a pause)
        rows.append(("next round", str(data["next_round"])))
    streak, limit = data.get("consecutive_rejections", 0), (data.get("settings") or {}).get("reset_after_rejections")
    restarts = f"{number(data.get('resets', 0))} restarts from the serving weights so far"
    rows.append(("rejected in a row", f"{streak} (a restart at {limit}); {restarts}" if limit else f"{streak}"))
    last = data.get("last_round")
    if last:
        rows.append(("last round", _last_round(last)))
    else:
        rows.append(("last round", "none yet"))
    if "model_version" in data:
        rows.append(("serving version", number(data["model_version"])))
    rec = data.get("recorder") or {}
    if rec:
        rows.append(
            (
                "recorder",
                f"{number(rec.get('streams'))} of {number(rec.get('max_streams'))} streams x "
                f"{number(rec.get('steps_per_stream'))} steps, {number(rec.get('events_recorded'))} events, "
                f"{size(rec.get('memory_bytes'))}",
            )
        )
        rows.append(
            (
                "windows",
                f"{number(rec.get('training_windows'))} to train on, {number(rec.get('holdout_windows'))} held out",
            )
        )
        if "sequences_total" in rec:  # model.output = "end": the windows above are labelled whole sequences
            rows.append(
                (
                    "sequences",
                    f"{number(rec['sequences_kept'])} kept of {number(rec['sequences_total'])} finished (up to "
                    f"{number(rec.get('max_sequence'))} steps each), {number(rec.get('sequences_dropped'))} "
                    "dropped (recorded from mid-sequence)",
                )
            )
        if rec.get("targets_joined") or rec.get("targets_unmatched"):
            rows.append(
                (
                    "delayed targets",
                    f"{number(rec.get('targets_joined'))} joined, {number(rec.get('targets_unmatched'))} unmatched",
                )
            )
    s = data.get("settings") or {}
    if s:
        every = f"every {duration(s.get('interval'))}" if s.get("interval") else "on request"
        if s.get("interval_events"):
            every += f" or {number(s['interval_events'])} events"
        rows.append(
            (
                "settings",
                f"{every}; {number(s.get('steps'))} {s.get('optimizer', '?')} steps (lr {number(s.get('lr'))}) of "
                f"{number(s.get('batch'))} windows x {number(s.get('k2'))} steps; clip {number(s.get('clip_norm'))}, "
                f"tolerance {number(s.get('tolerance'))}, {number(s.get('torch_threads'))} torch threads",
            )
        )
    guard = data.get("guard")
    if guard:  # forecast models: the per-stream guard against the last value (daemon/normalization.py)
        ratios = guard.get("error_vs_last_value") or {}
        shown = ", ".join(f"{k} {number(v)}" for k, v in ratios.items() if v is not None) or "not measured yet"
        rows.append(
            (
                "guard",
                f"{number(guard.get('fallback_streams'))} of {number(guard.get('streams'))} streams served the last "
                f"value; mean gain {number(guard.get('mean_gain'))}; squared error / last value's: {shown}",
            )
        )
        if guard.get("season"):  # train.season: the second baseline, seasonal naive
            rows.append(
                (
                    "seasonal baseline",
                    f"lag {number(guard['season'])}: {number(guard.get('seasonal_streams'))} streams lean on it; "
                    f"mean weight {number(guard.get('mean_seasonal_weight'))}",
                )
            )
        if guard.get("level_rate"):  # train.level_rate: the second regressor, each stream's own level
            rows.append(
                (
                    "level regressor",
                    f"rate {number(guard['level_rate'])}: {number(guard.get('level_streams'))} streams lean on it; "
                    f"mean weight {number(guard.get('mean_level_weight'))}",
                )
            )
    known = {
        "enabled", "paused", "rounds", "requested", "outcomes", "consecutive_rejections", "resets", "last_round",
        "recorder", "settings", "model_version", "next_round", "new_data_since_last_round", "guard",
    }  # fmt: skip
    rows += [(k, plain(v)) for k, v in data.items() if k not in known]
    return section("training", rows)


def _last_round(last: dict) -> str:
    outcome = "pending (offered to the serving loop)" if last.get("pending") else last.get("outcome", "?")
    text = f"#{last.get('round', '?')} {outcome}"
    if last.get("reason"):
        text += f" ({last['reason']})"
    if last.get("finished"):
        text += f", {moment(last['finished'])}, took {duration(last.get('duration_s'))}"
    losses = [
        f"{label} {number(last.get(key))}"
        for label, key in (
            ("train loss", "train_loss"),
            ("holdout: serving", "holdout_serving"),
            ("candidate", "holdout_candidate"),
            ("last value", "holdout_baseline"),
            ("seasonal naive", "holdout_seasonal"),  # train.season only
        )
        if last.get(key) is not None
    ]
    if losses:
        text += "; " + ", ".join(losses)
    if last.get("windows"):
        text += f" over {number(last['windows'])} windows"
    return text


# ---- streams, model, snapshot -----------------------------------------------------------------------------


def stream_row(row: dict) -> dict[str, str]:
    """One line of `lstmd streams list`: the idle time as a duration; keys a newer daemon adds kept."""
    names = {"last_seq": "last seq", "idle_s": "idle"}
    out = {}
    for key, value in row.items():
        out[names.get(key, key)] = duration(value) if key == "idle_s" else plain(value)
    return out


def stream_view(info: dict) -> Table:
    """`lstmd streams show` for people: counters, idle time, and the state's norm per layer (not the vectors)."""
    rows = []
    for key, value in info.items():
        if key in ("stream", "h", "c", "last_x"):  # vectors are for scripts (--json)
            continue
        if key == "idle_s":
            rows.append(("idle", duration(value)))
        elif key in ("h_norm", "c_norm") and isinstance(value, list):
            per_layer = ", ".join(f"{v:.4g}" + (f" (layer {i})" if len(value) > 1 else "") for i, v in enumerate(value))
            rows.append((f"|{key[0]}|", per_layer))
        else:
            rows.append((key.replace("_", " "), plain(value)))
    return section(f"stream {info.get('stream')!r}", rows)


def model_view(info: dict) -> Table:
    return section("model", _model_rows(info))


def snapshot_view(data: dict) -> Table:
    rows = [
        ("file", str(data.get("path", "?"))),
        ("streams", number(data.get("streams"))),
        ("size", size(data.get("bytes"))),
        ("took", duration(data.get("seconds"))),
        ("model version", number(data.get("model_version"))),
        ("log segment", f"{number(data.get('wal_segment'))} (the log before it can go)"),
        ("removed", ", ".join(data.get("removed") or []) or "nothing"),
    ]
    known = {"path", "streams", "bytes", "seconds", "model_version", "wal_segment", "removed"}
    return section("lstmd snapshot", rows + [(k, plain(v)) for k, v in data.items() if k not in known])
