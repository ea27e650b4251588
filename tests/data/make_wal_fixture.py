"""Makes tests/data/wal_v1/: a small state directory (one snapshot + WAL segments) written by the lstmd of the
commit that runs this script, and expected.json with every resident stream's state at the moment it stopped.

Run once, on the code whose on-disk format the fixture pins (it was made on main 3c22808, before the WAL
codec moved into daemon/wal_records.py):  python tests/data/make_wal_fixture.py
tests/test_wal_fixture.py restores the directory with today's code and checks the states come back exactly.
Every record kind is in the log: events (with and without targets, daemon-assigned seqs), delayed targets,
an eviction, a reset, a new serving model (import), a train pause, and probe-free appends after a snapshot.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import daemon_overrides  # noqa: E402
from lstmd.clients import Admin, Producer  # noqa: E402
from lstmd.daemon.config import load_config  # noqa: E402
from lstmd.daemon.server import Daemon  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

OUT = Path(__file__).resolve().parent / "wal_v1"
SETTINGS = {
    "durability.wal": True,
    "durability.snapshot_on_shutdown": False,
    "durability.snapshot_interval_s": 0,
    "state.capacity": 6,
    "train.enabled": True,
    "train.interval": 3600,
    "train.k2": 4,
    "train.holdout_windows": 1,  # the default when the fixture was written (now 2); stated, so the file still loads
    "train.record_streams": 8,
    "train.record_steps": 8,
    "model.input_size": 4,
    "model.hidden_size": 8,
    "model.seed": 7,
}


def main() -> None:
    work = Path(tempfile.mkdtemp()) / "state"
    config = load_config(overrides=daemon_overrides(work, **SETTINGS), environ={})
    daemon = Daemon(config, registry=CollectorRegistry())
    daemon.start_in_thread()
    rng = np.random.default_rng(5)
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        for i in range(6):
            streams = ["a", "b", "a", 3, "ü"]
            producer.send(streams, rng.standard_normal((5, 4)).astype(np.float32), seqs=None)
            if i == 2:
                admin.snapshot()
        producer.send(["a", "b"], rng.standard_normal((2, 4)).astype(np.float32),
                      targets=rng.standard_normal((2, 1)).astype(np.float32))
        producer.send_targets(["b", 3], [3, 2], rng.standard_normal((2, 1)).astype(np.float32))
        admin.reset("b")
        admin.train_pause()
        exported = Path(tempfile.mkdtemp()) / "model.safetensors"
        admin.export_model(exported)
        admin.import_model(exported)
        # Capacity 6: three new streams evict the least recently used ones.
        for k in range(3):
            producer.send([f"new{k}", "a"], rng.standard_normal((2, 4)).astype(np.float32))
    states = {str(row["stream"]): admin.stream(row["stream"]) for row in admin.streams(limit=100)}
    daemon.stop_and_join()
    if OUT.exists():
        shutil.rmtree(OUT)
    shutil.copytree(work, OUT, ignore=shutil.ignore_patterns("*.lock", "lock", "endpoints.json"))
    keep = ("events", "last_seq", "h", "c")
    (OUT / "settings.json").write_text(json.dumps(SETTINGS, indent=1) + "\n")
    (OUT / "expected.json").write_text(
        json.dumps({sid: {k: s[k] for k in keep} for sid, s in states.items()}, indent=1) + "\n"
    )
    print(sorted(p.relative_to(OUT).as_posix() for p in OUT.rglob("*")))


if __name__ == "__main__":
    main()
