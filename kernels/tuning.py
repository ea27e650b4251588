"""Process-wide tuning of the threads that run torch ops: torch's thread count and the GIL switch interval.

Both settings are global to the process, so they are set here only, by name, and every thread that runs torch
ops adopts them at its start. Why each value: docs/benchmarks.md ("End to end", "Latency at half rate",
"Online learning").
"""

from __future__ import annotations

import sys

import torch

# The interpreter's GIL switch interval while serving (Python's default is 5 ms). The CPU step's pool thread
# needs the GIL between its GEMMs and C calls, and a thread waiting for it while another runs Python waits up
# to this long: p99 at ~70% load fell about 3x at 1 ms against 5 ms.
SERVE_SWITCH_INTERVAL_S = 0.001
# With the trainer running, its Python competes with the loop for the GIL too; 0.5 ms kept the event p50
# during a round at ~1.0-1.2x idle, against ~1.8x at the default.
TRAIN_SWITCH_INTERVAL_S = 0.0005


def set_torch_threads(threads: int) -> None:
    """Set torch's intra-op thread count for the process (0 leaves it). Threads started later adopt it."""
    if threads > 0:
        torch.set_num_threads(threads)


def adopt_torch_threads() -> None:
    """Give the calling thread the process's torch thread count. torch keeps one global count, but OpenMP (and
    MKL through it) keeps one per thread, and a thread started later begins at one per core: a GEMM there forks
    a team that spins against the serving loop. Call at the start of every thread that runs torch ops."""
    torch.set_num_threads(torch.get_num_threads())


def limit_switch_interval(seconds: float) -> None:
    """Lower the GIL switch interval to at most `seconds` (never raises it: the smallest asker wins)."""
    sys.setswitchinterval(min(sys.getswitchinterval(), seconds))
