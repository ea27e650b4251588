"""daemon/wal_records.py: every record kind survives encode → decode exactly, and the payloads keep the byte
layout of the table (the layout older logs were written in; tests/test_wal_fixture.py replays such a log)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from lstmd.daemon import wal_records as records


def test_events_record_round_trips_with_and_without_targets():
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    labels = np.array([[1], [0]], dtype=np.int64)
    for targets in ([None, None], [None, labels]):
        record = records.events_record([["a", 2], ["ü", 2]], features, np.array([3, 0, 1]), [5, 0, 9],
                                       [False, True, False], targets)
        got = records.decode(records.encode(record))
        assert got.message_streams == [["a", 2], ["ü", 2]]
        assert got.features.tobytes() == features[[3, 0, 1]].tobytes()
        assert got.idx.tolist() == [3, 0, 1] and got.seqs.tolist() == [5, 0, 9]
        assert got.fresh.tolist() == [False, True, False]
        if targets[1] is None:
            assert got.message_targets == []
        else:
            first, second = got.batch_targets()
            assert first is None and second.dtype == np.int64 and second.tolist() == [[1], [0]]


@pytest.mark.parametrize(
    "record",
    [
        records.ModelRecord(b"\x00model bytes"),
        records.EvictRecord(["a", 7, "ü"], "capacity"),
        records.ResetRecord([2**40]),
        records.ProbeRecord(),
        records.PauseRecord(True),
    ],
)
def test_side_records_round_trip(record):
    assert records.decode(records.encode(record)) == record


def test_payload_layout_is_the_documented_one():
    # The first element is the kind letter; the fields follow in the table's order.
    assert msgspec.msgpack.decode(records.encode(records.EvictRecord(["a"], "idle"))) == ["X", ["a"], "idle"]
    assert msgspec.msgpack.decode(records.encode(records.PauseRecord(False))) == ["Z", False]
    seqs = np.array([4], dtype=np.int64)
    payload = msgspec.msgpack.decode(records.encode(records.TargetsRecord(["s"], seqs, np.ones((1, 2)))))
    assert payload == ["T", ["s"], seqs.tobytes(), 2, np.ones((1, 2), dtype=np.float32).tobytes()]


def test_an_unknown_kind_says_a_newer_lstmd_wrote_it():
    with pytest.raises(records.UnknownRecord, match="unknown kind 'Q'.*newer lstmd"):
        records.decode(msgspec.msgpack.encode(["Q", 1]))
