"""Multi-step forecasts (daemon/forecast.py): k-step rollouts for many streams, batched vs a naive per-stream loop.

Same run, one real daemon on loopback (CPU, torch backend), N streams fed `--warm` events each first:
- batched, over the wire: `Producer.forecast(all N streams, horizon=k)`, one request (the daemon's rollout: one
  step for all N per horizon step);
- batched, in process: `forecast.rollout` on the daemon's engine alone (no socket, no encoding);
- naive, in process: the same rollout called once per stream (a Python loop over the N streams), on a sample of
  `--naive` streams, scaled to N.
Events/s-equivalent: N * k predicted events per second. Best of `--rounds`.

    python benchmarks/forecast_rollout.py [--streams 10000] [--horizon 24] [--hidden 64] [--input 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from lstmd.clients import Producer
from lstmd.daemon import forecast
from lstmd.daemon.config import load_config
from lstmd.daemon.server import Daemon
from prometheus_client import CollectorRegistry


def _best(fn, rounds: int) -> float:
    fn()  # warm
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--horizon", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--input", type=int, default=4)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--naive", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n, k = args.streams, args.horizon
    with tempfile.TemporaryDirectory() as state_dir:
        overrides = [
            "serve.events='tcp://127.0.0.1:*'", "serve.control='tcp://127.0.0.1:*'",
            "serve.publish='tcp://127.0.0.1:*'", "serve.metrics='127.0.0.1:0'", "serve.device='cpu'",
            f"state.dir='{state_dir}'", f"state.capacity={n}", "model.task='forecast'",
            f"model.input_size={args.input}", f"model.output_size={args.input}", f"model.hidden_size={args.hidden}",
        ]
        daemon = Daemon(load_config(overrides=overrides, environ={}), registry=CollectorRegistry())
        daemon.start_in_thread()
        try:
            ids = list(range(n))
            rng = np.random.default_rng(0)
            with Producer(daemon.endpoints["events"], timeout=600) as producer:
                for _ in range(args.warm):
                    producer.send(ids, rng.normal(size=(n, args.input)).astype(np.float32))
                wire = _best(lambda: producer.forecast(ids, k), args.rounds)
            # In process, on the engine the daemon serves with; its loop is idle (no requests) meanwhile.
            engine = daemon.engine
            slots = np.array([daemon.store.slot_of[i] for i in ids], dtype=np.int64)
            batched = _best(lambda: forecast.rollout(engine, slots, k), args.rounds)
            sample = slots[: args.naive]
            naive = _best(lambda: [forecast.rollout(engine, sample[i : i + 1], k) for i in range(sample.size)],
                          1) * n / sample.size
        finally:
            daemon.stop_and_join()
    print(f"N={n} streams, horizon={k}, H={args.hidden}, I=O={args.input}, 1 layer, CPU torch backend")
    print(f"{'path':<40} | {'latency':>10} | {'events/s-equivalent':>20}")
    for name, seconds in (
        ("batched, Producer.forecast (wire)", wire),
        ("batched, forecast.rollout (in process)", batched),
        (f"naive per-stream loop (x{args.naive}, scaled)", naive),
    ):
        print(f"{name:<40} | {seconds * 1000:>8.1f} ms | {n * k / seconds:>20,.0f}")
    print(f"batched in process vs naive loop: {naive / batched:.0f}x")


if __name__ == "__main__":
    main()
