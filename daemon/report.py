"""What `lstmd status` shows: the loop's plain counters (`ServeStats`) and the report built from the daemon's parts.

The serving loop fills `ServeStats` as it answers (Prometheus gets the same numbers from daemon/metrics.py);
`status()` reads them with the parts' own reports (store, durability, trainer, I/O thread, security) when the
`status` control command runs, between two batches on the loop's thread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from lstmd.clients import protocol


@dataclass
class ServeStats:
    """Plain counters the loop fills; `lstmd status` reads them (Prometheus gets the same numbers)."""

    started: float = field(default_factory=time.time)
    batches: int = 0
    events: np.ndarray = field(default_factory=lambda: np.zeros(len(protocol.STATUS_NAMES), dtype=np.int64))
    rejections: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)  # "<what>_<reason>": dropped instead of queued


def status(daemon, version: str) -> dict:
    """The `status` command's answer for a started daemon (daemon/server.py's Daemon)."""
    spec, stats, events, io = daemon.spec, daemon.stats, daemon.net.events, daemon.net.io
    return {
        "version": version,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - stats.started, 3),
        "device": str(daemon.device),
        "backend": daemon.engine.backend_name,
        "endpoints": daemon.endpoints,
        "model": {**spec.__dict__, "version": daemon.engine.model.version},
        "streams": len(daemon.store),
        "capacity": daemon.store.capacity,
        "batches": stats.batches,
        "events": dict(zip(protocol.STATUS_NAMES, stats.events.tolist(), strict=True)),
        "rejections": dict(stats.rejections),
        "sequence_gaps": daemon.pipeline.sequence_gaps,
        "evictions": dict(stats.evictions),
        "evicted_filter": daemon.store.evicted.status(),
        "queue_depth": daemon.queue_depth(),
        "inflight_bytes": events.pending_bytes if events is not None else 0,
        "drops": dict(stats.drops),
        "io": io.status() if io is not None else {},
        "durability": daemon.durability.status(),
        "train": daemon.trainer.status() if daemon.trainer is not None else {"enabled": False},
        "security": {"curve": True, **daemon.security.counts()} if daemon.security else {"curve": False},
    }
