"""The serving loop's own work per event, in process: `Daemon._serve` over gathered batches (10k int streams,
8 messages x 1,000 events, H=64), replies to a sink, no sockets. Prints wall and process-CPU microseconds per
event (min and median over repeats). CPU time barely depends on what else runs on the machine, so two commits
can be compared on a busy one: run it from each commit's environment, alternating.

    python benchmarks/serve_hot_path.py [REPEATS] [LABEL]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import numpy as np
from lstmd.clients import protocol
from lstmd.daemon.config import load_config
from lstmd.daemon.io import EventsMessage
from lstmd.daemon.server import Daemon
from prometheus_client import CollectorRegistry

BATCHES, MESSAGES, EVENTS = 40, 8, 1000


class Sink:
    """Stands in for the events socket: replies go nowhere."""

    pending_bytes = 0

    def send(self, frames) -> None:
        pass

    def pending(self) -> int:
        return 0


def gathered(k: int, rng: np.random.Generator) -> list[EventsMessage]:
    out = []
    for m in range(MESSAGES):
        ids = (np.arange(EVENTS) + EVENTS * ((m + k) % 10)).tolist()
        header = protocol.EventsHeader(v=1, req=m, streams=ids, dim=8)
        x = rng.standard_normal((EVENTS, 8)).astype(np.float32)
        out.append(EventsMessage([b"p"], header, x, None, time.perf_counter()))
    return out


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    label = sys.argv[2] if len(sys.argv) > 2 else ""
    state_dir = tempfile.mkdtemp()
    overrides = [f"state.dir={state_dir!r}", "model.hidden_size=64", "state.capacity=20000", "serve.metrics=''"]
    daemon = Daemon(load_config(overrides=overrides, environ={}), registry=CollectorRegistry())
    daemon._events = Sink()
    rng = np.random.default_rng(0)
    batches = [gathered(k, rng) for k in range(BATCHES)]
    for batch in batches[:5]:  # warm up: streams created, kernels loaded
        daemon._serve(batch)
    wall, cpu = [], []
    per_run = BATCHES * MESSAGES * EVENTS / 1e6
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for batch in batches:
            daemon._serve(batch)
        wall.append((time.perf_counter() - w) / per_run)
        cpu.append((time.process_time() - c) / per_run)
    print(
        f"{label} wall us/event min {min(wall):.3f} median {statistics.median(wall):.3f}  "
        f"cpu us/event min {min(cpu):.3f} median {statistics.median(cpu):.3f}"
    )


if __name__ == "__main__":
    main()
