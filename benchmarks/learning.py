"""Does online training help, and does it leave inference alone? Three parts, each printing a table.

1. synthetic: `PeriodicStreams` (many streams, 2 channels: sinusoids + offset + drift + noise) with a regime
   change half-way (`shift()`: new frequencies, amplitudes, offsets). After the change it prints, per block
   of events, the mean absolute one-step error of
     (a)  the frozen initial model (a daemon with training off, same seed),
     (a') the model frozen at the change (the online model's weights at the change, training off after it),
     (b)  the naive last-value forecast,
     (c)  lstmd with online training.
   Target: (c) <= (a) / 2 and (c) < (b) within the first block of events after the change.
2. co2: one real public series, the weekly Mauna Loa CO2 record 1958-2001 (2,284 weeks, shipped inside
   statsmodels: `pip install statsmodels`, or the `lstmd[bench]` extra), a trending, seasonal series, as one
   stream. Same predictors (a), (b), (c).
3. latency: the daemon as a real `lstmd serve` subprocess; a producer sends small messages back to back and
   times each reply, first with no round running, then while rounds run back to back.

In parts 1 and 2 the benchmark asks for a round every `--round-every` events per stream and waits for it (the
producer pauses), so the errors do not depend on how fast the machine trains; part 3 measures what training
concurrently costs the serving path.

    python benchmarks/learning.py                   # all three parts
    python benchmarks/learning.py --part synthetic  # or co2, latency
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lstmd.clients.bench import free_tcp_port

SERVE_LOOPBACK = [
    "serve.events=tcp://127.0.0.1:*",
    "serve.control=tcp://127.0.0.1:*",
    "serve.publish=",
    "serve.metrics=",
    "serve.device=cpu",
]


def start_daemon(state_dir: Path, overrides: list[str]):
    from lstmd.daemon.config import load_config
    from lstmd.daemon.server import Daemon
    from prometheus_client import CollectorRegistry

    config = load_config(overrides=[*SERVE_LOOPBACK, f"state.dir={state_dir}", *overrides], environ={})
    daemon = Daemon(config, registry=CollectorRegistry())
    daemon.start_in_thread()
    return daemon


def run_learning(
    series: np.ndarray,  # [ticks, streams, dim]: every stream's events, tick by tick
    change: int,  # tick of the regime change (errors are reported from here on)
    model: list[str],
    train: list[str],
    round_every: int,  # ticks between training rounds
    blocks: list[tuple[int, int]],  # (first tick, end tick) ranges to report, relative to `change`
    label: str,
) -> dict:
    from lstmd.clients import Admin, Producer

    ticks, n, dim = series.shape
    ids = list(range(n))
    with tempfile.TemporaryDirectory(prefix="lstmd-learning-") as tmp:
        online = start_daemon(Path(tmp) / "online", [*model, "train.enabled=true", "train.interval=0", *train])
        frozen = start_daemon(Path(tmp) / "frozen", model)
        at_change = start_daemon(Path(tmp) / "at-change", model)
        admin = Admin(online.endpoints["control"])
        producers = {
            k: Producer(d.endpoints["events"]) for k, d in (("c", online), ("a", frozen), ("a_change", at_change))
        }
        errors = {k: np.full(ticks, np.nan) for k in ("a", "a_change", "b", "c")}
        forecasts: dict[str, np.ndarray | None] = dict.fromkeys(("a", "a_change", "c"))
        rounds, published, started = 0, 0, time.perf_counter()
        try:
            for t in range(ticks):
                x = series[t]
                if t > 0:
                    errors["b"][t] = np.abs(series[t - 1] - x).mean()
                    for k, f in forecasts.items():
                        errors[k][t] = np.abs(f - x).mean()
                if t == change:  # (a'): the online weights as they are at the change, frozen from here on
                    path = Path(tmp) / "at-change.safetensors"
                    admin.export_model(path)
                    Admin(at_change.endpoints["control"]).import_model(path)
                for k, producer in producers.items():
                    forecasts[k] = producer.send(ids, x)
                if t > 0 and t % round_every == 0:
                    status = admin.train_now(wait=120)
                    rounds += 1
                    published += status["last_round"]["outcome"] == "published"
        finally:
            for producer in producers.values():
                producer.close()
            for daemon in (online, frozen, at_change):
                daemon.stop_and_join()
    elapsed = time.perf_counter() - started
    rows = []
    for lo, hi in blocks:
        sl = slice(change + lo, min(change + hi, ticks))
        rows.append(
            {
                "ticks": (lo, hi),
                "events": ((lo) * n, (min(change + hi, ticks) - change) * n),
                **{k: float(np.nanmean(v[sl])) for k, v in errors.items()},
            }
        )
    before = slice(max(1, change - blocks[0][1]), change)
    return {
        "label": label,
        "streams": n,
        "ticks": ticks,
        "change": change,
        "rounds": rounds,
        "published": published,
        "seconds": round(elapsed, 1),
        "before_change": {k: float(np.nanmean(v[before])) for k, v in errors.items()},
        "blocks": rows,
    }


def print_learning(result: dict) -> None:
    print(f"\n## {result['label']}")
    print(
        f"{result['streams']} stream(s), {result['ticks']} ticks, change at tick {result['change']}; "
        f"{result['rounds']} training rounds ({result['published']} published) in {result['seconds']} s"
    )
    bc = result["before_change"]
    print(f"just before the change: (a) {bc['a']:.4f}  (a') {bc['a_change']:.4f}  (b) {bc['b']:.4f}  (c) {bc['c']:.4f}")
    print(
        "| events after the change | (a) frozen initial | (a') frozen at change | (b) last value | (c) online "
        "| (c) <= (a)/2 | (c) < (b) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in result["blocks"]:
        lo, hi = row["events"]
        print(
            f"| {lo:,}-{hi:,} | {row['a']:.4f} | {row['a_change']:.4f} | {row['b']:.4f} | {row['c']:.4f} | "
            f"{'yes' if row['c'] <= row['a'] / 2 else 'no'} | {'yes' if row['c'] < row['b'] else 'no'} |"
        )


def part_synthetic(args) -> dict:
    from lstmd.clients.workloads import PeriodicStreams

    workload = PeriodicStreams(args.streams, 2, seed=args.seed)
    ticks = 2 * args.half
    series = np.empty((ticks, args.streams, 2), np.float32)
    for t in range(ticks):
        if t == args.half:
            workload.shift()
        series[t] = workload.next()
    edges = [e for e in (0, 25, 50, 100, 200, 400, 800) if e < args.half] + [args.half]
    return run_learning(
        series,
        args.half,
        [
            "model.task=forecast",
            "model.input_size=2",
            "model.output_size=2",
            "model.hidden_size=32",
            f"model.seed={args.seed}",
            f"state.capacity={args.streams}",
        ],
        ["train.k2=16", "train.record_steps=64", "train.batch=64", "train.steps=20", "train.lr=0.003"],
        args.round_every,
        list(zip(edges[:-1], edges[1:], strict=True)),
        f"synthetic: {args.streams} periodic streams, regime change half-way",
    )


def load_co2() -> np.ndarray:
    try:
        import statsmodels.api as sm
    except ImportError:
        sys.exit("the co2 part needs statsmodels: pip install statsmodels (or pip install -e '.[bench]')")
    data = sm.datasets.co2.load_pandas().data["co2"]
    return data.interpolate().bfill().to_numpy(np.float32)  # 59 missing weeks, filled linearly


def part_co2(args) -> dict:
    co2 = load_co2()
    series = co2[:, None, None]  # one stream, one feature
    half = len(co2) // 2
    quarter = (len(co2) - half) // 4
    return run_learning(
        series,
        half,
        [
            "model.task=forecast",
            "model.input_size=1",
            "model.output_size=1",
            "model.hidden_size=16",
            f"model.seed={args.seed}",
            "state.capacity=4",
        ],
        [
            "train.k2=16",
            "train.record_steps=512",  # ten years of weeks: one stream needs the history
            "train.holdout_windows=4",  # a year of weeks held out: one window of one stream is too noisy a check
            "train.batch=32",
            "train.steps=5",  # 20 steps per round on so few windows overfits (0.41 vs 0.37 after the change)
            "train.lr=0.003",
            "train.min_windows=1",
            *args.co2_set,
        ],
        args.co2_round_every,
        [(0, quarter), (quarter, 2 * quarter), (2 * quarter, 3 * quarter), (3 * quarter, 4 * quarter + 1)],
        "co2: weekly Mauna Loa CO2 (statsmodels.datasets.co2), 1958-2001, second half",
    )


# ---- part 3: latency --------------------------------------------------------------------------------------


def _latencies(producer, ids, rng, seconds: float) -> np.ndarray:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = rng.standard_normal((len(ids), 2)).astype(np.float32)
        t0 = time.perf_counter()
        producer.send(ids, x)
        out.append(time.perf_counter() - t0)
    return np.array(out)


def part_latency(args) -> dict:
    from lstmd.clients import Admin, Producer

    events, control = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    results = {}
    for threads in args.threads:
        with tempfile.TemporaryDirectory(prefix="lstmd-latency-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "lstmd.clients.cli",
                "serve",
                "--log-level",
                "warning",
                "--set",
                f"serve.events={events}",
                "--set",
                f"serve.control={control}",
                "--set",
                "serve.publish=",
                "--set",
                "serve.metrics=",
                "--set",
                "serve.device=cpu",
                "--set",
                f"state.dir={tmp}",
                "--set",
                "model.task=forecast",
                "--set",
                "model.input_size=2",
                "--set",
                "model.output_size=2",
                "--set",
                "model.hidden_size=32",
                "--set",
                "train.enabled=true",
                "--set",
                "train.interval=0",
                "--set",
                "train.k2=16",
                "--set",
                "train.record_steps=64",
                "--set",
                f"train.threads={threads}",
            ]
            proc = subprocess.Popen(cmd)
            try:
                admin = Admin(control, timeout=60)
                deadline = time.monotonic() + 60
                while True:
                    try:
                        admin.status()
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise
                ids = list(range(args.latency_streams))
                rng = np.random.default_rng(0)
                with Producer(events) as producer:
                    _latencies(producer, ids, rng, 2.0)  # warm up and fill the recorder
                    idle = _latencies(producer, ids, rng, args.latency_seconds)
                    # Rounds back to back: ask for far more than can finish while we measure.
                    for _ in range(1000):
                        admin.call("train_now")
                    time.sleep(0.2)
                    rounds_before = admin.train_status()["rounds"]
                    busy = _latencies(producer, ids, rng, args.latency_seconds)
                    status = admin.train_status()
                    admin.train_pause()
                rounds = status["rounds"] - rounds_before
                last = status["last_round"] or {}
            finally:
                proc.terminate()
                proc.wait(30)
        q = lambda a, p: float(np.percentile(a, p) * 1e3)  # noqa: E731
        results[threads] = {
            "idle_p50_ms": q(idle, 50),
            "idle_p99_ms": q(idle, 99),
            "training_p50_ms": q(busy, 50),
            "training_p99_ms": q(busy, 99),
            "rounds_during": rounds,
            "round_s": last.get("duration_s"),
            "sends_idle": len(idle),
            "sends_training": len(busy),
        }
    return {"streams_per_message": args.latency_streams, "by_threads": results}


def print_latency(result: dict) -> None:
    print(f"\n## latency: {result['streams_per_message']} events per message, reply round trip (client side)")
    print(
        "| train.threads | idle p50 | idle p99 | training p50 | training p99 | p50 ratio | p99 ratio | rounds | round |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for threads, r in result["by_threads"].items():
        print(
            f"| {threads} | {r['idle_p50_ms']:.2f} ms | {r['idle_p99_ms']:.2f} ms | {r['training_p50_ms']:.2f} ms | "
            f"{r['training_p99_ms']:.2f} ms | {r['training_p50_ms'] / r['idle_p50_ms']:.2f}x | "
            f"{r['training_p99_ms'] / r['idle_p99_ms']:.2f}x | {r['rounds_during']} | {r['round_s']} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "synthetic", "co2", "latency"], default="all")
    parser.add_argument("--streams", type=int, default=200, help="synthetic streams")
    parser.add_argument("--half", type=int, default=1200, help="synthetic ticks before (and after) the change")
    parser.add_argument("--round-every", type=int, default=20, help="synthetic: ticks between training rounds")
    parser.add_argument("--co2-round-every", type=int, default=13, help="co2: weeks between training rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--co2-set", nargs="*", default=[], help="extra config overrides for the co2 part")
    parser.add_argument("--latency-streams", type=int, default=100)
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="train.threads settings to time")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    print(
        f"# lstmd learning benchmark: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPU cores"
    )
    results = {}
    if args.part in ("all", "synthetic"):
        results["synthetic"] = part_synthetic(args)
        print_learning(results["synthetic"])
    if args.part in ("all", "co2"):
        results["co2"] = part_co2(args)
        print_learning(results["co2"])
    if args.part in ("all", "latency"):
        results["latency"] = part_latency(args)
        print_latency(results["latency"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
