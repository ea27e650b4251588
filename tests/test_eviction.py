"""Eviction memory that is bounded and never silent: evicted ids go into a Bloom filter of fixed size
(`state.remember_evicted` ids at `state.evicted_false_positive_rate`), so every evicted stream's next event is
answered `state_reset` however many were evicted (the old list forgot all but the newest 1M), the false-positive
rate is what the configuration says, and the filter survives restarts (snapshot, and the log's evict records)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer
from lstmd.daemon.config import ConfigError, load_config
from lstmd.daemon.state_store import EvictedFilter, StateStore

# A test-sized filter: sized for 100 ids, then fed 50-200 times that many.
TINY_FILTER = {"state.capacity": 64, "state.remember_evicted": 100, "state.evicted_false_positive_rate": 0.01}


def test_every_evicted_id_is_flagged_far_beyond_the_filter_size():
    store = StateStore(1, 4, 64, torch.device("cpu"), remember_evicted=100, evicted_false_positive_rate=0.01)
    ids = [f"stream-{i}" for i in range(10_000)] + list(range(10_000))  # str and int ids
    for start in range(0, len(ids), 32):
        store.touch(store.admit(ids[start : start + 32], 64).slots)
    assert store.evicted.added == len(ids) - 64  # all but the resident ones
    resident = set(store.slot_of)
    evicted = [sid for sid in ids if sid not in resident]
    flagged = []
    for start in range(0, len(evicted), 32):
        admission = store.admit(evicted[start : start + 32], 64)
        flagged.append(admission.was_dropped)
        store.touch(admission.slots)
    assert np.concatenate(flagged).all(), "an evicted stream came back without state_reset"


def test_the_false_positive_rate_is_the_configured_one_at_the_configured_size():
    bloom = EvictedFilter(1000, 0.01)
    assert bloom.hashes == 7 and bloom.size == 9592  # -n ln p / ln 2^2 bits, rounded up to whole bytes
    bloom.add([f"evicted-{i}" for i in range(1000)])
    assert bloom.contains([f"evicted-{i}" for i in range(1000)]).all()
    never = bloom.contains([f"new-{i}" for i in range(100_000)]).mean()
    assert 0.005 < never < 0.015, never  # deterministic hashes: this exact value every run
    assert 0.005 < bloom.status()["false_positive_rate"] < 0.015
    # "42" and 42 are different streams.
    one = EvictedFilter(1000, 0.01)
    one.add(["42"])
    assert one.contains(["42", 42]).tolist() == [True, False]


def test_a_daemon_flags_every_one_of_thousands_of_evicted_streams(make_daemon):
    daemon = make_daemon(**TINY_FILTER)
    x = np.ones((50, 8), np.float32)
    streams = [f"s{i}" for i in range(5_000)]  # 50x what the filter is sized for
    with Producer(daemon.endpoints["events"]) as producer:
        for start in range(0, len(streams), 50):
            assert set(producer.send_detailed(streams[start : start + 50], x).status_names) <= {"ok", "state_reset"}
        status = Admin(daemon.endpoints["control"]).status()
        assert status["evictions"]["capacity"] == 5_000 - 64
        assert status["evicted_filter"]["ids_added"] == 5_000 - 64 and status["evicted_filter"]["sized_for"] == 100
        back = []
        for start in range(0, 5_000 - 64, 50):  # the first 4,936 were evicted
            back += producer.send_detailed(streams[start : start + 50], x).status_names[: 5_000 - 64 - start]
    assert back == ["state_reset"] * (5_000 - 64)


@pytest.mark.parametrize("clean", [True, False], ids=["clean-restart", "crash"])
def test_the_filter_survives_a_restart(make_daemon, tmp_path, clean):
    options = {**TINY_FILTER, "state.capacity": 4, "durability.wal": True, "durability.fsync": "always"}
    options["durability.snapshot_on_shutdown"] = clean  # without: the log's evict records rebuild it
    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **options)
    x = np.ones((1, 8), np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        for i in range(20):
            producer.send([f"s{i}"], x)
    daemon.stop_and_join()
    again = make_daemon(state_dir=state, **options)
    assert again.store.evicted.added == 16
    with Producer(again.endpoints["events"]) as producer:
        assert producer.send_detailed([f"s{i}" for i in range(4)], np.ones((4, 8), np.float32)).status_names == [
            "state_reset"
        ] * 4


@pytest.mark.parametrize(
    "setting, message",
    [
        ("state.evicted_false_positive_rate=0", "state.evicted_false_positive_rate must be > 0 and < 1"),
        ("state.evicted_false_positive_rate=nan", "state.evicted_false_positive_rate must be a finite number"),
        ("state.remember_evicted=0", "state.remember_evicted must be >= 1"),
        ("serve.resend_window=-1", "serve.resend_window must be >= 0"),
    ],
)
def test_the_sizes_are_validated(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[setting], environ={})


def test_a_snapshot_from_before_the_filter_keeps_its_evicted_ids():
    store = StateStore(1, 4, 8, torch.device("cpu"))
    store.touch(store.admit(["a", "b"], 10).slots)
    saved = {k: v for k, v in store.snapshot_tensors().items() if not k.startswith("evicted")}
    old_list = msgspec.msgpack.encode([["gone", "capacity"], [42, "ttl"]])  # the former bounded list
    saved["dropped"] = torch.frombuffer(bytearray(old_list), dtype=torch.uint8)
    restored = StateStore(1, 4, 8, torch.device("cpu"))
    restored.restore_tensors(saved)
    assert restored.admit(["gone", 42, "new"], 10).was_dropped.tolist() == [True, True, False]
