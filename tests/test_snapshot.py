"""Snapshot files (checksum, atomic write) and the state store's snapshot round trip."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from lstmd.daemon import snapshot
from lstmd.daemon.snapshot import SnapshotError
from lstmd.daemon.state_store import StateStore


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(12, 5, generator=g),
        "state.h": torch.randn(2, 3, 7, generator=g),
        "state.empty": torch.zeros(2, 0, 7),  # no streams resident: zero-sized tensors round-trip too
        "state.ids": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "state.seq": torch.tensor([5, -1, 9], dtype=torch.int64),
    }


def test_round_trip_with_checksum(tmp_path):
    tensors = _tensors()
    path, size = snapshot.write(tmp_path, 4, tensors, {"model_version": "3"})
    assert path.name == "snapshot-000000000004.safetensors" and path.stat().st_size == size
    snap = snapshot.read(path)
    assert snap.segment == 4 and snap.metadata["model_version"] == "3"
    assert len(snap.metadata["checksum"]) == 8
    assert set(snap.tensors) == set(tensors)
    for name, tensor in tensors.items():
        torch.testing.assert_close(snap.tensors[name], tensor, rtol=0, atol=0)
    assert snapshot.list_snapshots(tmp_path) == [4]


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_parts_are_stored_under_their_name_and_come_back_without_it():
    """Each part names its own tensors; the snapshot adds `<part>.` and strips it (a dot in a part's own names
    stays: only the first dot ends the prefix)."""
    parts = {
        "trainer": {"rounds": torch.tensor(3), "optimizer.0.step": torch.tensor(7.0)},
        "versions": {"2.weight_ih_l0": torch.ones(4, 2), "index": torch.zeros(5, dtype=torch.uint8)},
    }
    flat = snapshot.join(parts)
    assert set(flat) == {"trainer.rounds", "trainer.optimizer.0.step", "versions.2.weight_ih_l0", "versions.index"}
    back = snapshot.split(flat)
    assert back.keys() == parts.keys()
    for part, tensors in parts.items():
        assert back[part].keys() == tensors.keys()
        assert all(torch.equal(back[part][k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="without a dot"):
        snapshot.join({"a.b": {"x": torch.zeros(1)}})


def test_flipped_bit_in_the_data_is_detected(tmp_path):
    path, size = snapshot.write(tmp_path, 1, _tensors(), {})
    _flip(path, size - 5)
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        snapshot.read(path)


def test_changed_metadata_value_is_detected(tmp_path):
    path, _ = snapshot.write(tmp_path, 1, _tensors(), {"model_version": "3"})
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"model_version":"3"', b'"model_version":"4"'))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        snapshot.read(path)


def test_changed_tensor_shape_is_detected(tmp_path):
    path, _ = snapshot.write(tmp_path, 1, _tensors(), {})
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header["state.seq"]["shape"] == [3]
    path.write_bytes(data.replace(b'"shape":[3]', b'"shape":[2]', 1))
    with pytest.raises(SnapshotError):
        snapshot.read(path)


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_torn_file_is_detected(tmp_path, keep):
    path, size = snapshot.write(tmp_path, 1, _tensors(), {})
    data = path.read_bytes()
    path.write_bytes(data[: keep % size])
    with pytest.raises(SnapshotError):
        snapshot.read(path)


def test_write_is_atomic_when_it_fails_midway(tmp_path, monkeypatch):
    first, _ = snapshot.write(tmp_path, 1, _tensors(), {"n": "first"})
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        snapshot.write(tmp_path, 2, _tensors(), {"n": "second"})
    monkeypatch.setattr(snapshot.os, "fsync", real_fsync)
    assert calls
    # Neither the final name nor a temporary is left; the previous snapshot is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert snapshot.read(first).metadata["n"] == "first"


def test_stale_temporary_from_a_crash_is_removed(tmp_path):
    stale = tmp_path / "snapshot-000000000009.safetensors.tmp"
    stale.write_bytes(b"half a snapshot")
    assert snapshot.list_snapshots(tmp_path) == []  # never mistaken for a snapshot
    assert snapshot.remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists()


def test_state_store_round_trip_keeps_ids_slots_and_bookkeeping():
    clock = [100.0]
    store = StateStore(2, 5, 16, torch.device("cpu"), clock=lambda: clock[0])
    ids = ["a", 7, "7", "ü-stream", 2**40]  # int 7 and str "7" are different streams
    admission = store.admit(ids, 100)
    slots = admission.slots
    store.h[:, slots] = torch.randn(2, len(ids), 5)
    store.c[:, slots] = torch.randn(2, len(ids), 5)
    store.last_seq[slots] = [4, -1, 9, 0, 123]
    store.touch(slots)
    store.drop("a")
    store.reset(7)
    clock[0] = 103.0
    saved = store.snapshot_tensors()

    restored = StateStore(2, 5, 16, torch.device("cpu"), clock=lambda: 50.0)
    restored.restore_tensors(saved)
    assert restored.slot_of == store.slot_of
    assert set(restored.slot_of) == {7, "7", "ü-stream", 2**40}
    assert restored.evicted.contains(["a", 7, "never"]).tolist() == [True, False, False]
    live = np.array(list(store.slot_of.values()))
    for name in ("last_seq", "events_applied", "needs_reset", "reset_by_command"):
        np.testing.assert_array_equal(getattr(restored, name)[live], getattr(store, name)[live], err_msg=name)
    torch.testing.assert_close(restored.h[:, live], store.h[:, live], rtol=0, atol=0)
    torch.testing.assert_close(restored.c[:, live], store.c[:, live], rtol=0, atol=0)
    np.testing.assert_allclose(restored.last_used[live], 50.0 - 3.0)  # idle ages survive, not timestamps
    # Free slots: the dropped stream's slot and every unused one; a new stream takes the lowest.
    assert len(restored._free) == 16 - 4
    assert restored.admit(["new"], 10).slots[0] == min(set(range(16)) - set(live.tolist()))


def test_state_store_restore_refuses_a_smaller_capacity():
    store = StateStore(1, 3, 8, torch.device("cpu"))
    store.admit([f"s{i}" for i in range(8)], 100)
    saved = store.snapshot_tensors()
    with pytest.raises(ValueError, match="beyond state.capacity"):
        StateStore(1, 3, 4, torch.device("cpu")).restore_tensors(saved)
    with pytest.raises(ValueError, match="this store holds"):
        StateStore(1, 4, 8, torch.device("cpu")).restore_tensors(saved)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_state_store_round_trip_on_cuda():
    """State tables on the GPU: the snapshot holds CPU copies, the restore puts rows back on the device."""
    device = torch.device("cuda")
    store = StateStore(2, 48, 64, device)
    slots = store.admit([f"g{i}" for i in range(37)], 100).slots
    store.h[:, torch.from_numpy(slots).to(device)] = torch.randn(2, 37, 48, device=device)
    store.touch(slots)
    saved = store.snapshot_tensors()
    assert all(t.device.type == "cpu" for t in saved.values())
    restored = StateStore(2, 48, 64, device)
    restored.restore_tensors(saved)
    assert restored.h.device.type == "cuda"
    take = torch.from_numpy(slots).to(device)
    torch.testing.assert_close(restored.h[:, take], store.h[:, take], rtol=0, atol=0)
