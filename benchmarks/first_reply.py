"""Seconds from a fresh daemon's endpoints.json to its first reply, with training off and on.

    python benchmarks/first_reply.py [--runs 3] [--set section.key=value ...]

A producer that connects as soon as the daemon names its endpoints should not wait for the daemon's start-up. It
did, with training on: the trainer started after the sockets opened, and its one-off costs (torch.optim's
imports; on CUDA the Triton compiles of its sequence kernels) came before the first event was served
(docs/benchmarks.md, "GPU: the first runs"). This measures that gap. The daemon is forecast-task, CPU by default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lstmd.clients.producer import Producer

SETTINGS = ["model.task=forecast", "model.input_size=8", "model.output_size=8", "state.capacity=1000",
            "serve.device=cpu"]  # fmt: skip


def first_reply_s(train: bool, extra: list[str]) -> float:
    # Not clients.bench.start_daemon: it polls for endpoints.json every 50 ms and then waits 50 ms more, which would
    # hide most of the gap measured here (0.08 s with training off); this polls every 5 ms and times from the file.
    with tempfile.TemporaryDirectory() as state_dir:
        sets = ["serve.events=tcp://127.0.0.1:*", "serve.control=tcp://127.0.0.1:*", "serve.publish=",
                "serve.metrics=", f"state.dir={state_dir}", *SETTINGS, f"train.enabled={str(train).lower()}",
                *extra]  # fmt: skip
        cmd = [sys.executable, "-m", "lstmd.clients.cli", "serve", "--log-level", "warning"]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            endpoints = Path(state_dir) / "endpoints.json"
            while not endpoints.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"lstmd serve exited with {proc.returncode}")
                time.sleep(0.005)
            named_at = time.perf_counter()
            with Producer(json.loads(endpoints.read_text())["events"], timeout=120) as producer:
                producer.send(["a"], np.zeros((1, 8), np.float32))
            return time.perf_counter() - named_at
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    for train in (False, True):
        times = [round(first_reply_s(train, args.extra), 3) for _ in range(args.runs)]
        print(f"training {'on ' if train else 'off'}: {times} s")


if __name__ == "__main__":
    main()
