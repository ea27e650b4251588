"""The daemon with the write-ahead log on: restart = snapshot + replay, sequence numbers across restarts,
logged control changes, restore order when a snapshot is corrupt, and a failing disk (events rejected)."""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, DaemonError, Producer, RejectedError
from lstmd.daemon import snapshot, wal

WAL_ON = {"durability.wal": True, "durability.snapshot_on_shutdown": False, "durability.snapshot_interval_s": 0}
IDS = ["a", "b", 3, "ü", 17]


def _send_rounds(daemon, rounds: int, seed: int, start_seq: dict | None = None) -> dict:
    """Send `rounds` messages over IDS (some streams twice per message); returns the next seq per stream."""
    rng = np.random.default_rng(seed)
    seqs = dict(start_seq or dict.fromkeys(IDS, 0))
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(rounds):
            streams = [IDS[i] for i in rng.integers(0, len(IDS), size=7)]
            numbers = []
            for sid in streams:
                numbers.append(seqs[sid])
                seqs[sid] += 1
            producer.send(streams, rng.standard_normal((len(streams), 8)).astype(np.float32), seqs=numbers)
    return seqs


def _states(daemon) -> dict:
    admin = Admin(daemon.endpoints["control"])
    return {row["stream"]: admin.stream(row["stream"]) for row in admin.streams(limit=1000)}


def _assert_same_states(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for sid, w in want.items():
        g = got[sid]
        assert (g["events"], g["last_seq"]) == (w["events"], w["last_seq"]), sid
        # Replay re-runs the same waves, so the rows come back bit-for-bit on the same machine.
        np.testing.assert_allclose(g["h"], w["h"], rtol=0, atol=1e-6, err_msg=str(sid))
        np.testing.assert_allclose(g["c"], w["c"], rtol=0, atol=1e-6, err_msg=str(sid))


def test_restart_without_a_final_snapshot_replays_the_log(make_daemon, tmp_path, caplog):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **WAL_ON)
    _send_rounds(first, 12, seed=1)
    want = _states(first)
    first.stop_and_join()
    with caplog.at_level(logging.INFO, logger="lstmd.durability"):
        second = make_daemon(state_dir=state, **WAL_ON)
    assert "replayed 84 events in 12 records" in caplog.text
    assert second.status()["durability"]["restored"]["events"] == 84
    _assert_same_states(_states(second), want)


def test_sequence_numbers_survive_restarts(make_daemon, tmp_path):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **WAL_ON)
    x = np.ones((3, 8), dtype=np.float32)
    with Producer(first.endpoints["events"]) as producer:
        producer.send(["n", "n", "m"], x)  # daemon-assigned: n gets 0, 1; m gets 0
        producer.send(["s", "s", "s"], x, seqs=[0, 1, 2])
    first.stop_and_join()
    second = make_daemon(state_dir=state, **WAL_ON)
    with Producer(second.endpoints["events"]) as producer:
        # Already-applied numbers are duplicates after the restart too; the daemon goes on numbering at last + 1.
        result = producer.send_detailed(["s", "s", "s"], x, seqs=[1, 2, 3])
        assert result.status_names == ["duplicate", "duplicate", "ok"]
        producer.send(["n"], x[:1])
    admin = Admin(second.endpoints["control"])
    assert (admin.stream("n")["last_seq"], admin.stream("n")["events"]) == (2, 3)
    assert (admin.stream("s")["last_seq"], admin.stream("s")["events"]) == (3, 4)
    assert admin.stream("m")["last_seq"] == 0


def test_reset_drop_and_import_are_logged(make_daemon, tmp_path):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **WAL_ON)
    _send_rounds(first, 6, seed=2)
    admin = Admin(first.endpoints["control"])
    admin.reset("a")
    admin.drop(3)
    model = tmp_path / "m.safetensors"
    admin.export_model(model)
    assert admin.import_model(model)["version"] == 1
    want = _states(first)
    first.stop_and_join()
    second = make_daemon(state_dir=state, **WAL_ON)
    got = _states(second)
    _assert_same_states(got, want)
    assert 3 not in got
    assert np.allclose(got["a"]["h"], 0)  # the reset is pending: the next event starts from zero
    assert second.engine.model.version == 1
    with Producer(second.endpoints["events"]) as producer:
        result = producer.send_detailed(["a", 3], np.ones((2, 8), dtype=np.float32))
    assert result.status_names == ["state_reset", "state_reset"]


def test_corrupt_newest_snapshot_falls_back_to_the_previous_one_and_replays_more_log(make_daemon, tmp_path, caplog):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **WAL_ON)
    seqs = _send_rounds(first, 5, seed=3)
    admin = Admin(first.endpoints["control"])
    admin.snapshot()
    seqs = _send_rounds(first, 5, seed=4, start_seq=seqs)
    newest = admin.snapshot()
    _send_rounds(first, 5, seed=5, start_seq=seqs)
    want = _states(first)
    first.stop_and_join()
    path = state / newest["path"].rsplit("/", 1)[1]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="lstmd.durability"):
        second = make_daemon(state_dir=state, **WAL_ON)
    assert f"snapshot {path.name} is unusable (checksum mismatch" in caplog.text
    assert path.with_name(path.name + ".corrupt").exists() and not path.exists()
    restored = second.status()["durability"]["restored"]
    assert restored["events"] == 70 and restored["snapshot"] != path.name
    _assert_same_states(_states(second), want)


def test_torn_log_tail_is_cut_and_the_rest_restored(make_daemon, tmp_path, caplog):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **WAL_ON)
    _send_rounds(first, 4, seed=6)
    want = _states(first)
    first.stop_and_join()
    segment = wal.list_segments(state / "wal")[-1]
    path = wal.segment_path(state / "wal", segment)
    size = path.stat().st_size
    with path.open("ab") as f:  # a record whose write was cut short by the crash
        f.write(wal.encode_record(b"x" * 100) + b"x" * 40)
    with caplog.at_level(logging.INFO, logger="lstmd.durability"):
        second = make_daemon(state_dir=state, **WAL_ON)
    assert "torn record" in caplog.text and "48 bytes cut" in caplog.text
    assert path.stat().st_size == size or not path.exists()  # cut back (or pruned after the restore snapshot)
    _assert_same_states(_states(second), want)


def test_disk_full_rejects_events_and_keeps_state(make_daemon, tmp_path):
    daemon = make_daemon(**WAL_ON)
    x = np.ones((2, 8), dtype=np.float32)
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["d", "e"], x, seqs=[0, 0])
        before = _states(daemon)

        def disk_full(nbytes: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        daemon.durability.wal.fault = disk_full
        with pytest.raises(RejectedError, match="No space left on device") as info:
            producer.send(["d", "e"], x, seqs=[1, 1])
        assert info.value.result.status_names == ["rejected", "rejected"]
        # While the disk stays full, events are rejected before they are applied.
        with pytest.raises(RejectedError, match="write-ahead log append failed"):
            producer.send(["d"], x[:1], seqs=[1])
        _assert_same_states(_states(daemon), before)
        assert admin.status()["durability"]["wal_error"].endswith("No space left on device")
        registry = daemon.metrics.registry
        assert registry.get_sample_value("lstmd_rejections_total", {"reason": "wal_write_failed"}) == 2
        assert registry.get_sample_value("lstmd_rejections_total", {"reason": "wal_unavailable"}) == 1
        with pytest.raises(DaemonError, match="No space left"):
            admin.reset("d")  # a control change that cannot be logged is undone and reported
        daemon.durability.wal.fault = None
        # The same numbers again: applied now (not `duplicate`), because nothing was applied before.
        assert producer.send_detailed(["d", "e"], x, seqs=[1, 1]).status_names == ["ok", "ok"]
    assert admin.stream("d")["events"] == 2 and admin.status()["durability"]["wal_error"] is None


def test_unusable_state_dir_is_a_clear_startup_error(tmp_path):
    from conftest import daemon_overrides
    from lstmd.daemon.config import load_config
    from lstmd.daemon.server import Daemon, StartupError
    from prometheus_client import CollectorRegistry

    state = tmp_path / "state"
    state.mkdir()
    (state / "wal").write_text("a file where the log directory belongs")
    config = load_config(overrides=daemon_overrides(state, **WAL_ON), environ={})
    with pytest.raises(StartupError, match=r"cannot restore the state in .*state: File exists"):
        Daemon(config, registry=CollectorRegistry()).start()


def test_all_snapshots_corrupt_and_log_pruned_refuses_to_start(make_daemon, tmp_path):
    from lstmd.daemon.server import StartupError

    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **WAL_ON)
    _send_rounds(first, 2, seed=7)
    Admin(first.endpoints["control"]).snapshot()
    first.stop_and_join()
    for number in snapshot.list_snapshots(state):
        snapshot.snapshot_path(state, number).write_bytes(b"garbage")
    with pytest.raises(StartupError, match="no snapshot .* is usable"):
        make_daemon(state_dir=state, **WAL_ON)


def test_without_the_log_a_clean_shutdown_snapshot_is_restored(make_daemon, tmp_path):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state)  # durability.wal = false: no log, no per-batch work
    assert first.durability.wal is None
    _send_rounds(first, 3, seed=8)
    want = _states(first)
    first.stop_and_join()
    assert wal.list_segments(state / "wal") == []
    second = make_daemon(state_dir=state)
    _assert_same_states(_states(second), want)
    torch.testing.assert_close(second.engine.model.tensors["head.weight"], first.engine.model.tensors["head.weight"])


def test_restore_false_starts_empty_and_sets_old_files_aside(make_daemon, tmp_path):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **WAL_ON)
    _send_rounds(first, 3, seed=9)
    first.stop_and_join()
    second = make_daemon(state_dir=state, **{**WAL_ON, "durability.restore": False})
    assert len(second.store) == 0
    assert list(state.glob("snapshot-*.safetensors.not-restored")) and list(state.glob("wal/*.not-restored"))
    second.stop_and_join()
    third = make_daemon(state_dir=state, **WAL_ON)  # the set-aside state never comes back
    assert len(third.store) == 0
