"""Whole-sequence outputs (model.output = "end"): what answering only end events and resetting after them costs the
serving pipeline, against one output per event ("every").

Same run, in process (no sockets, CPU, the daemon's own step): two daemons' `Pipeline.serve` on the same batches of
`--batch` events over `--streams` streams, a fraction `--ends` of them marking a sequence end for "end". Pairs of
measurements alternate their order; the first two pairs warm up. Prints the median microseconds per event of each
and their ratio.

    python benchmarks/sequence_outputs.py [--streams 10000] [--batch 1024] [--ends 0.1] [--hidden 64] [--pairs 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from lstmd.daemon.config import load_config
from lstmd.daemon.server import Daemon
from prometheus_client import CollectorRegistry


def _daemon(output: str, streams: int, hidden: int, state_dir: str) -> Daemon:
    config = load_config(
        overrides=[f'model.output="{output}"', f"model.hidden_size={hidden}", f"state.capacity={2 * streams}",
                   f'state.dir="{state_dir}"', 'serve.device="cpu"', 'serve.metrics=""'],
        environ={},
    )
    return Daemon(config, registry=CollectorRegistry())  # not started: only its pipeline runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ends", type=float, default=0.1, help="fraction of events that end a sequence")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--batches", type=int, default=20, help="batches per measurement")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as every_dir, tempfile.TemporaryDirectory() as end_dir:
        daemons = {"every": _daemon("every", args.streams, args.hidden, every_dir),
                   "end": _daemon("end", args.streams, args.hidden, end_dir)}
        x = rng.standard_normal((args.batch, 8)).astype(np.float32)
        per_event: dict[str, list[float]] = {name: [] for name in daemons}
        for pair in range(args.pairs):
            ids = rng.integers(0, args.streams, args.batch).tolist()
            ends = (rng.random(args.batch) < args.ends).tolist()
            order = list(daemons) if pair % 2 else list(daemons)[::-1]
            for name in order:
                started = time.perf_counter()
                for _ in range(args.batches):
                    daemons[name].pipeline.serve([ids], [None], x, [None], [ends] if name == "end" else None)
                per_event[name].append((time.perf_counter() - started) / (args.batches * args.batch))
    medians = {name: float(np.median(times[2:])) for name, times in per_event.items()}
    for name, median in medians.items():
        print(f"{name}: median {median * 1e6:.2f} us/event ({args.pairs - 2} measurements of {args.batches} batches "
              f"of {args.batch})")
    print(f"end / every: {medians['end'] / medians['every']:.3f}")


if __name__ == "__main__":
    main()
