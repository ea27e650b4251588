"""Throughput cost of durability: events/s with the write-ahead log off, and on under each fsync policy.

One run measures every setting on the same machine, interleaved (off, never, interval, always, off, ...), each
against a fresh `lstmd serve` subprocess, and reports ratios against `wal = false` from the same run. Two
workloads: small messages (1 event each, many producers: one fsync per gathered batch is what `always` costs
per acknowledgement) and large ones (256 events each: the log's bytes and the group commit amortised).

    python benchmarks/fsync_cost.py --seconds 5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SETTINGS = {  # name -> [durability] keys
    "wal off": {"wal": "false"},
    "fsync never": {"wal": "true", "fsync": "'never'"},
    "fsync interval (1000 ms)": {"wal": "true", "fsync": "'interval'", "fsync_interval_ms": "1000"},
    "fsync always": {"wal": "true", "fsync": "'always'"},
}
WORKLOADS = {  # name -> (events per message, concurrent producers)
    "1 event/message, 16 producers": (1, 16),
    "256 events/message, 4 producers": (256, 4),
}
INPUT, HIDDEN, STREAMS = 8, 64, 10_000


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lstmd() -> list[str]:
    exe = Path(sys.executable).with_name("lstmd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lstmd.clients.cli"]


def measure(setting: dict, per_message: int, producers: int, seconds: float, workdir: Path) -> dict:
    from lstmd.clients import Admin, Producer

    events, control = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    workdir.mkdir(parents=True)
    config = workdir / "lstmd.toml"
    durability = "".join(f"{k} = {v}\n" for k, v in setting.items())
    config.write_text(
        f"[model]\ninput_size = {INPUT}\nhidden_size = {HIDDEN}\n"
        f"[serve]\nevents = '{events}'\ncontrol = '{control}'\npublish = ''\nmetrics = ''\ndevice = 'cpu'\n"
        f"[state]\ndir = '{workdir / 'state'}'\ncapacity = {STREAMS}\n"
        f"[durability]\nsnapshot_interval_s = 0\nsnapshot_on_shutdown = false\n{durability}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    log = (workdir / "daemon.log").open("wb")
    proc = subprocess.Popen([*_lstmd(), "serve", "--config", str(config)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                Admin(control, timeout=0.3).status()
                break
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start; see {workdir / 'daemon.log'}") from None
        counts = [0] * producers
        latencies: list[list[float]] = [[] for _ in range(producers)]
        start = threading.Barrier(producers + 1)
        stop_at = [0.0]

        def produce(worker: int) -> None:
            rng = np.random.default_rng(worker)
            with Producer(events, timeout=30) as producer:
                # Warm up (new streams, first allocation), then measure.
                ids = rng.integers(0, STREAMS, size=(64, per_message)).tolist()
                x = rng.standard_normal((per_message, INPUT)).astype(np.float32)
                for row in ids[:4]:
                    producer.send(row, x)
                start.wait()
                i = 0
                while time.perf_counter() < stop_at[0]:
                    t0 = time.perf_counter()
                    producer.send(ids[i % 64], x)
                    latencies[worker].append(time.perf_counter() - t0)
                    counts[worker] += per_message
                    i += 1

        threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
        for t in threads:
            t.start()
        stop_at[0] = time.perf_counter() + 1e9
        start.wait()
        begin = time.perf_counter()
        stop_at[0] = begin + seconds
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - begin
        lat = np.concatenate([np.asarray(x) for x in latencies])
        return {
            "events_per_s": sum(counts) / elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
        }
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per setting and repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict = {w: {s: [] for s in SETTINGS} for w in WORKLOADS}
    with tempfile.TemporaryDirectory(prefix="lstmd-fsync-") as tmp:
        run = 0
        for repeat in range(args.repeats):
            for workload, (per_message, producers) in WORKLOADS.items():
                for name, setting in SETTINGS.items():
                    r = measure(setting, per_message, producers, args.seconds, Path(tmp) / f"run{run}")
                    run += 1
                    results[workload][name].append(r)
                    if not args.json:
                        print(f"[{repeat}] {workload:32s} {name:26s} {r['events_per_s']:>10,.0f} events/s", flush=True)
    summary = {}
    for workload, per_setting in results.items():
        base = np.median([r["events_per_s"] for r in per_setting["wal off"]])
        summary[workload] = {
            name: {
                "events_per_s": float(np.median([r["events_per_s"] for r in rs])),
                "ratio_vs_wal_off": float(np.median([r["events_per_s"] for r in rs]) / base),
                "p50_ms": float(np.median([r["p50_ms"] for r in rs])),
                "p99_ms": float(np.median([r["p99_ms"] for r in rs])),
            }
            for name, rs in per_setting.items()
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"\nmedian of {args.repeats} x {args.seconds:g}s; {os.cpu_count()} CPUs; {platform.platform()}")
    for workload, per_setting in summary.items():
        print(f"\n{workload}")
        print("| setting | events/s | vs WAL off | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
        for name, r in per_setting.items():
            print(
                f"| {name} | {r['events_per_s']:,.0f} | {r['ratio_vs_wal_off']:.2f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            )


if __name__ == "__main__":
    main()
