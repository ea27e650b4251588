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
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from lstmd.clients.bench import LSTMD_COMMAND, free_tcp_port

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


def measure(setting: dict, per_message: int, producers: int, seconds: float, workdir: Path) -> dict:
    from lstmd.clients import Admin, Producer

    events, control = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
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
    proc = subprocess.Popen([*LSTMD_COMMAND, "serve", "--config", str(config)], env=env, stdout=log, stderr=log)
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


def append_cost(events_per_batch: int, batches: int, workdir: Path) -> dict:
    """Per-batch cost of the log alone, per policy: encode a batch's record as the loop does, append it."""
    import msgspec
    from lstmd.daemon.wal import WriteAheadLog

    rng = np.random.default_rng(0)
    ids = [f"stream-{i}" for i in rng.integers(0, STREAMS, size=events_per_batch)]
    x = rng.standard_normal((events_per_batch, INPUT)).astype(np.float32)
    idx = np.arange(events_per_batch, dtype=np.int64)
    encode = msgspec.msgpack.Encoder().encode
    out = {}
    for policy in ("never", "interval", "always"):
        directory = workdir / policy
        directory.mkdir(parents=True)
        log = WriteAheadLog(directory, 0, policy, interval_ms=1000)
        times = []
        for _ in range(batches):
            t0 = time.perf_counter()
            payload = encode(("E", [ids], x.tobytes(), INPUT, idx.tobytes(), idx.tobytes(), bytes(len(idx)), []))
            log.append([payload])
            times.append(time.perf_counter() - t0)
        log.close()
        out[policy] = {"median_us": float(np.median(times) * 1e6), "p99_us": float(np.percentile(times, 99) * 1e6)}
    out["bytes_per_event"] = (len(payload) + 8) / events_per_batch
    return out


def capture_cost(streams: int) -> float:
    """Seconds the serving loop pauses for a background snapshot: copying the resident rows (median of 5)."""
    import torch
    from lstmd.daemon.state_store import StateStore

    store = StateStore(1, HIDDEN, streams, torch.device("cpu"))
    store.admit(list(range(streams)), streams)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        store.snapshot_tensors()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def restore_cost(streams: int, events: int, workdir: Path) -> dict:
    """Snapshot of `streams` resident streams (time, bytes), then replay of `events` logged events after SIGKILL."""
    from lstmd.clients import Admin, Producer

    events_ep, control = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    workdir.mkdir(parents=True)
    config = workdir / "lstmd.toml"
    config.write_text(
        f"[model]\ninput_size = {INPUT}\nhidden_size = {HIDDEN}\n"
        f"[serve]\nevents = '{events_ep}'\ncontrol = '{control}'\npublish = ''\nmetrics = ''\ndevice = 'cpu'\n"
        f"[state]\ndir = '{workdir / 'state'}'\ncapacity = {streams}\n"
        "[durability]\nwal = true\nfsync = 'never'\nsnapshot_interval_s = 0\nsnapshot_wal_mb = 0\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    log = (workdir / "daemon.log").open("wb")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([*LSTMD_COMMAND, "serve", "--config", str(config)], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        while True:
            try:
                Admin(control, timeout=0.5).status()
                return proc
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start; see {workdir / 'daemon.log'}") from None

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, INPUT)).astype(np.float32)
    proc = start()
    try:
        with Producer(events_ep, timeout=60) as producer:
            for first in range(0, streams, 1000):
                producer.send(list(range(first, min(first + 1000, streams))), x[: min(1000, streams - first)])
            snap = Admin(control, timeout=600).snapshot()
            for _ in range(events // 1000):
                producer.send(rng.integers(0, streams, size=1000).tolist(), x)
        proc.kill()
        proc.wait()
        proc = start()
        restored = Admin(control).status()["durability"]["restored"]
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return {
        "streams": streams,
        "capture_seconds": capture_cost(streams),
        "snapshot_seconds": snap["seconds"],
        "snapshot_mb": snap["bytes"] / 1e6,
        "replayed_events": restored["events"],
        "restore_seconds": restored["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per setting and repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--restore-streams", type=int, default=100_000, help="streams for the snapshot/restore cost")
    parser.add_argument("--restore-events", type=int, default=500_000, help="logged events replayed after SIGKILL")
    parser.add_argument("--append-only", action="store_true", help="only the per-batch log cost (seconds)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.append_only:
        with tempfile.TemporaryDirectory(prefix="lstmd-fsync-") as tmp:
            for n in (1, 256, 4096):
                r = append_cost(n, 2000, Path(tmp) / f"n{n}")
                print(
                    f"{n:5d} events/batch: "
                    + "; ".join(
                        f"{p} {r[p]['median_us']:.0f} us (p99 {r[p]['p99_us']:.0f})"
                        for p in ("never", "interval", "always")
                    )
                    + f"; {r['bytes_per_event']:.0f} B/event"
                )
        return
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
        restore = restore_cost(args.restore_streams, args.restore_events, Path(tmp) / "restore")
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
    summary["restore"] = restore
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"\nmedian of {args.repeats} x {args.seconds:g}s; {os.cpu_count()} CPUs; {platform.platform()}")
    for workload in WORKLOADS:
        per_setting = summary[workload]
        print(f"\n{workload}")
        print("| setting | events/s | vs WAL off | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
        for name, r in per_setting.items():
            print(
                f"| {name} | {r['events_per_s']:,.0f} | {r['ratio_vs_wal_off']:.2f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            )
    r = summary["restore"]
    print(
        f"\nsnapshot of {r['streams']:,} streams (H={HIDDEN}): {r['snapshot_seconds']:.2f}s, "
        f"{r['snapshot_mb']:.1f} MB (loop pause for a background one: {r['capture_seconds'] * 1e3:.0f} ms); "
        f"restart after SIGKILL replayed {r['replayed_events']:,} logged events in {r['restore_seconds']:.2f}s "
        f"({r['replayed_events'] / max(r['restore_seconds'], 1e-9):,.0f} events/s, snapshot load included)"
    )


if __name__ == "__main__":
    main()
