"""Delayed targets (`Producer.send_targets`) in the write-ahead log: logged before they are joined and answered,
replayed in order with the logged batches, so the recorder after a restart (clean stop or SIGKILL) equals the
one before; a failing disk rejects them and joins nothing; with the log off nothing is logged."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import numpy as np
import safetensors.torch
import torch
from lstmd.clients import Admin, Producer
from lstmd.daemon import wal
from lstmd.daemon import wal_records as records

SETTINGS = {
    "durability.wal": True,
    "durability.fsync": "always",
    "durability.snapshot_on_shutdown": False,
    "durability.snapshot_interval_s": 0,
    "model.task": "regression",
    "model.input_size": 3,
    "model.output_size": 1,
    "model.hidden_size": 8,
    "train.enabled": True,
    "train.interval": 0.0,  # no rounds unless asked: the recorder changes only through events and targets
    "train.k2": 8,
    "train.record_steps": 32,
    "train.min_windows": 1,
}
IDS = [f"r{i}" for i in range(6)] + [7, "ü"]


def _workload(daemon) -> dict:
    """Events (some without targets), late targets before and after a snapshot, and events after those targets
    that wrap the recorder's ring past some of them (so replay must join them where serving did, not at the end).
    """
    rng = np.random.default_rng(11)
    seq = 0
    counts = {}
    with Producer(daemon.endpoints["events"]) as producer:

        def send(rounds: int) -> None:
            nonlocal seq
            for _ in range(rounds):
                x = rng.standard_normal((len(IDS), 3)).astype(np.float32)
                y = np.full((len(IDS), 1), np.nan, np.float32)
                y[::3] = rng.standard_normal((len(y[::3]), 1))  # most targets arrive later, some never
                producer.send(IDS, x, targets=y, seqs=[seq] * len(IDS))
                seq += 1

        def late(seqs: range, streams=IDS) -> np.ndarray:
            pairs = [(sid, s) for s in seqs for sid in streams]
            y = rng.standard_normal(len(pairs)).astype(np.float32)
            return producer.send_targets([p[0] for p in pairs], [p[1] for p in pairs], y)

        send(12)
        assert late(range(0, 4)).all()
        Admin(daemon.endpoints["control"]).snapshot()
        counts["at_snapshot"] = daemon.recorder.targets_joined
        assert late(range(4, 10)).all()  # events before the snapshot, targets only in the log
        send(10)
        assert late(range(12, 18), IDS[:5]).all()
        send(24)  # the ring (32 events per stream) wraps past seqs 12 and 13
        assert not late(range(1, 3)).any()  # no longer kept: unmatched, counted
        assert not late(range(5, 6), ["never-seen"]).any()
        assert late(range(40, 46)).all()
    counts["joined"] = daemon.recorder.targets_joined
    return counts


def _assert_same_recorder(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        if name != "last_write":  # idle ages move with the clock
            assert torch.equal(before[name], after[name]), name


def test_targets_record_round_trips_through_a_log_segment(tmp_path):
    streams = ["a", 3, "ü", 2**40]
    seqs = np.array([0, 5, 2**40, 7], dtype=np.int64)
    targets = np.array([[1.5, -2.0], [np.nan, 0.25], [3.0, 4.0], [-0.0, 1e-30]], dtype=np.float32)
    log = wal.WriteAheadLog(tmp_path, 0, "always")
    log.append([records.encode(records.TargetsRecord(streams, seqs, targets)), records.encode(records.ProbeRecord())])
    log.close()
    scan = wal.read_segment(wal.segment_path(tmp_path, 0), 0)
    assert scan.clean and len(scan.records) == 2
    assert msgspec.msgpack.decode(scan.records[0])[0] == records.TARGETS
    record = records.decode(scan.records[0])
    got_streams, got_seqs, got_targets = record.streams, record.seqs, record.targets
    assert got_streams == streams and [type(s) for s in got_streams] == [str, int, str, int]
    assert got_seqs.dtype == np.int64 and np.array_equal(got_seqs, seqs)
    assert got_targets.dtype == np.float32 and got_targets.shape == (4, 2)
    assert got_targets.tobytes() == targets.tobytes()  # bit for bit, NaN and -0.0 included


def test_late_targets_after_the_snapshot_are_replayed_in_order(make_daemon, tmp_path):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **SETTINGS)
    counts = _workload(first)
    assert counts["joined"] > counts["at_snapshot"]  # the restart must get the rest from the log
    before = first.recorder.snapshot_tensors()
    first.stop_and_join()
    second = make_daemon(state_dir=state, **SETTINGS)
    assert second.status()["durability"]["restored"]["snapshot"] is not None
    _assert_same_recorder(before, second.recorder.snapshot_tensors())
    assert second.recorder.targets_joined == counts["joined"]


def test_late_targets_survive_sigkill(make_daemon, tmp_path):
    """A real SIGKILL right after the last acknowledged target: no clean stop, no final snapshot."""
    state, dump = tmp_path / "state", tmp_path / "before.safetensors"
    tests = Path(__file__).resolve().parent
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(tests)!r})
        import safetensors.torch
        from conftest import daemon_overrides
        from prometheus_client import CollectorRegistry
        from lstmd.daemon.config import load_config
        from lstmd.daemon.server import Daemon
        import test_wal_targets as t

        config = load_config(overrides=daemon_overrides({str(state)!r}, **t.SETTINGS), environ={{}})
        daemon = Daemon(config, registry=CollectorRegistry())
        daemon.start_in_thread()
        t._workload(daemon)
        safetensors.torch.save_file(daemon.recorder.snapshot_tensors(), {str(dump)!r})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    before = safetensors.torch.load_file(dump)
    second = make_daemon(state_dir=state, **SETTINGS)
    assert second.status()["durability"]["restored"]["records"] > 0
    _assert_same_recorder(before, second.recorder.snapshot_tensors())


def test_failing_disk_rejects_late_targets_and_joins_none(make_daemon, tmp_path):
    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **SETTINGS)
    x = np.ones((2, 3), dtype=np.float32)
    y = np.array([0.5, -0.5], dtype=np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["d", "e"], x, seqs=[0, 0])
        before = daemon.recorder.snapshot_tensors()

        def disk_full(nbytes: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        daemon.durability.wal.fault = disk_full
        assert not producer.send_targets(["d", "e"], [0, 0], y).any()  # rejected: not joined, not acknowledged
        assert not producer.send_targets(["d"], [0], y[:1]).any()  # still failing
        after = daemon.recorder.snapshot_tensors()
        _assert_same_recorder(before, after)
        registry = daemon.metrics.registry
        assert registry.get_sample_value("lstmd_rejections_total", {"reason": "wal_write_failed"}) == 2
        assert registry.get_sample_value("lstmd_rejections_total", {"reason": "wal_unavailable"}) == 1
        assert daemon.status()["rejections"]["wal_write_failed"] == 2
        daemon.durability.wal.fault = None
        assert producer.send_targets(["d", "e"], [0, 0], y).all()  # the resend joins once the disk is back
    assert daemon.durability.wal.error is None
    want = daemon.recorder.snapshot_tensors()
    daemon.stop_and_join()
    again = make_daemon(state_dir=state, **SETTINGS)
    _assert_same_recorder(want, again.recorder.snapshot_tensors())


def test_without_the_log_targets_are_joined_and_nothing_is_logged(make_daemon, monkeypatch):
    daemon = make_daemon(**{**SETTINGS, "durability.wal": False})
    assert daemon.durability.wal is None

    def must_not_log(*args):
        raise AssertionError("log_targets called with durability.wal = false")

    monkeypatch.setattr(daemon.durability, "log_targets", must_not_log)
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["d"], np.ones((1, 3), dtype=np.float32), seqs=[0])
        assert producer.send_targets(["d"], [0], [1.0]).all()
