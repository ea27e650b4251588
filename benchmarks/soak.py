"""Soak: hours-long behaviour in minutes of numbers. N minutes (default 30) at half the daemon's max rate, with
online training and the write-ahead log on; the daemon's RSS and the event latency p99 per minute, and a plot.

One `lstmd serve` subprocess (forecast task, so training learns from the events themselves: no labels needed;
WAL with fsync = interval). First a closed-loop run finds the max rate on this machine with training and the WAL
on; then the open-loop producers offer half of it, one measured minute after another (latency from the scheduled
send, so queueing is charged; see lstmd.clients.bench). Memory that only grows, or a p99 that drifts up, is what
this is for: the per-minute table shows both.

    python benchmarks/soak.py [--minutes 30] [--json docs/soak.json] [--plot docs/soak.png]

Needs the `bench` extra (matplotlib) for the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from lstmd.clients.bench import Workload, daemon_status, measure, start_daemon

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Training and durability on, as a production daemon runs: a round every 10 s on the recorded events.
OVERRIDES = [
    "model.task=forecast",
    "model.output_size=8",
    "train.enabled=true",
    "train.interval=10",
    "durability.wal=true",
    "durability.fsync=interval",
]


def soak(minutes: int, workload: Workload, probe_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="lstmd-soak-") as state_dir:
        server, endpoints = start_daemon(workload, Path(state_dir), OVERRIDES)
        try:
            events, control, metrics = endpoints["events"], endpoints["control"], endpoints.get("metrics")
            probe = measure("lstmd", events, replace(workload, duration_s=probe_s, rate=0), server, control, metrics)
            rate = round(probe.events_per_s / 2)
            print(f"max rate (closed loop, training + WAL on): {probe.events_per_s:,.0f} events/s; soaking at {rate:,}")
            minutes_out = []
            for minute in range(1, minutes + 1):
                server.rss_peak = 0
                run = measure(
                    "lstmd", events, replace(workload, duration_s=60.0, rate=rate), server, control, metrics
                )
                status = daemon_status(control)
                row = {
                    "minute": minute,
                    "events_per_s": run.events_per_s,
                    "errors": run.errors,
                    "p50_ms": run.latency_ms["p50"],
                    "p99_ms": run.latency_ms["p99"],
                    "daemon_p99_ms": (run.daemon_latency_ms or {}).get("p99"),
                    "rss_peak_mib": run.server_rss_mib,
                    "rss_end_mib": round(server.rss() / 2**20, 1),
                    "model_version": status["model"]["version"],
                    "train_rounds": status["train"].get("rounds"),
                }
                minutes_out.append(row)
                print(
                    f"minute {minute:3d}: {row['events_per_s']:>10,.0f} events/s, p99 {row['p99_ms']:8.2f} ms "
                    f"(in daemon {row['daemon_p99_ms']}), RSS peak {row['rss_peak_mib']} MiB, "
                    f"model version {row['model_version']}, errors {row['errors']}",
                    flush=True,
                )
        finally:
            server.stop()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "workload": asdict(workload),
        "overrides": OVERRIDES,
        "max_rate_events_per_s": probe.events_per_s,
        "rate_events_per_s": rate,
        "minutes": minutes_out,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["minutes"]
    x = [r["minute"] for r in rows]
    fig, (rss, p99) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rss.plot(x, [r["rss_peak_mib"] for r in rows], marker="o")
    rss.set_ylabel("daemon RSS peak (MiB)")
    rss.set_ylim(bottom=0)
    p99.plot(x, [r["p99_ms"] for r in rows], marker="o", label="producer (send → reply)")
    p99.plot(x, [r["daemon_p99_ms"] for r in rows], marker=".", label="in the daemon (≤ bucket)")
    p99.set_ylabel("p99 latency (ms)")
    p99.set_xlabel("minute")
    p99.set_ylim(bottom=0)
    p99.legend()
    fig.suptitle(f"lstmd soak: {result['rate_events_per_s']:,} events/s, training + WAL on")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--probe", type=float, default=10.0, help="seconds of the closed-loop max-rate run")
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--events-per-message", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=DOCS / "soak.json")
    parser.add_argument("--plot", type=Path, default=DOCS / "soak.png")
    args = parser.parse_args()
    workload = Workload(streams=args.streams, events_per_message=args.events_per_message, warmup_s=2.0)
    result = soak(args.minutes, workload, args.probe)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
