"""The write-ahead log file format: round trip, empty log, torn tail, corrupt record, failing disk, fsync policies."""

from __future__ import annotations

import errno
import time

import pytest
from lstmd.daemon import wal
from lstmd.daemon.wal import FILE_HEADER, RECORD_HEADER, WalError, WriteAheadLog


def _log(tmp_path, fsync="never", **kwargs) -> WriteAheadLog:
    return WriteAheadLog(tmp_path, 0, fsync, **kwargs)


def _payloads(n: int) -> list[bytes]:
    return [f"record {i} ".encode() * (i + 1) for i in range(n)]


def test_round_trip_keeps_every_record_in_order(tmp_path):
    log = _log(tmp_path)
    written = _payloads(7)
    log.append(written[:3])  # one batch = several records, one write
    log.append(written[3:])
    log.close()
    scan = wal.read_segment(wal.segment_path(tmp_path, 0), 0)
    assert scan.clean
    assert [bytes(r) for r in scan.records] == written
    assert scan.good_bytes == scan.size


def test_empty_log_and_header_only_segment_have_no_records(tmp_path):
    empty = tmp_path / "wal-000000000005.log"
    empty.write_bytes(b"")  # a crash between creating the file and writing its header
    scan = wal.read_segment(empty, 5)
    assert (scan.records, scan.clean) == ([], True)
    _log(tmp_path).close()
    scan = wal.read_segment(wal.segment_path(tmp_path, 0), 0)
    assert (scan.records, scan.clean, scan.size) == ([], True, FILE_HEADER.size)
    assert wal.list_segments(tmp_path) == [0, 5]
    assert wal.list_segments(tmp_path / "missing") == []


@pytest.mark.parametrize("cut", [1, RECORD_HEADER.size - 1, RECORD_HEADER.size, RECORD_HEADER.size + 3])
def test_torn_tail_is_detected_and_truncated_after_the_last_good_record(tmp_path, cut):
    log = _log(tmp_path)
    written = _payloads(4)
    log.append(written[:3])
    good = log.size
    log.append(written[3:])
    log.close()
    path = wal.segment_path(tmp_path, 0)
    data = path.read_bytes()
    # The last record torn: only `cut` bytes of it reached the disk.
    path.write_bytes(data[: good + cut])
    scan = wal.read_segment(path, 0)
    assert not scan.clean and "torn" in scan.problem
    assert [bytes(r) for r in scan.records] == written[:3]
    assert scan.good_bytes == good
    wal.truncate(path, scan.good_bytes)
    again = wal.read_segment(path, 0)
    assert again.clean and len(again.records) == 3


def test_corrupt_record_stops_reading_at_that_record(tmp_path):
    log = _log(tmp_path)
    written = _payloads(5)
    for payload in written:
        log.append([payload])
    log.close()
    path = wal.segment_path(tmp_path, 0)
    data = bytearray(path.read_bytes())
    # Flip one bit inside the third record's payload.
    offset = FILE_HEADER.size + sum(RECORD_HEADER.size + len(p) for p in written[:2])
    data[offset + RECORD_HEADER.size + 2] ^= 0x10
    path.write_bytes(bytes(data))
    scan = wal.read_segment(path, 0)
    assert "checksum mismatch" in scan.problem
    assert [bytes(r) for r in scan.records] == written[:2]
    assert scan.good_bytes == offset


def test_corrupt_length_field_is_detected(tmp_path):
    log = _log(tmp_path)
    log.append([b"a" * 100, b"b" * 100])
    log.close()
    path = wal.segment_path(tmp_path, 0)
    data = bytearray(path.read_bytes())
    data[FILE_HEADER.size] = 50  # the first record now claims 50 bytes: its crc covers the length too
    path.write_bytes(bytes(data))
    scan = wal.read_segment(path, 0)
    assert scan.records == [] and "checksum mismatch" in scan.problem


def test_segment_header_is_checked(tmp_path):
    path = tmp_path / "wal-000000000001.log"
    path.write_bytes(b"NOTAWAL!" + bytes(8))
    assert "not a WAL segment" in wal.read_segment(path, 1).problem
    _log(tmp_path).close()
    assert "header names segment 0" in wal.read_segment(wal.segment_path(tmp_path, 0), 3).problem


def test_failing_write_raises_and_leaves_no_partial_record(tmp_path):
    log = _log(tmp_path)
    log.append([b"first"])
    size = log.size

    def disk_full(nbytes: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    log.fault = disk_full
    with pytest.raises(WalError, match="No space left on device") as info:
        log.append([b"second"])
    assert info.value.errno == errno.ENOSPC
    assert log.error is not None and log.size == size
    log.fault = None
    log.append([b"third"])
    assert log.error is None
    log.close()
    scan = wal.read_segment(wal.segment_path(tmp_path, 0), 0)
    assert scan.clean and [bytes(r) for r in scan.records] == [b"first", b"third"]


def test_rotate_starts_the_next_segment(tmp_path):
    log = _log(tmp_path)
    log.append([b"in 0"])
    assert log.rotate() == 1
    log.append([b"in 1"])
    log.close()
    assert wal.list_segments(tmp_path) == [0, 1]
    assert [bytes(r) for r in wal.read_segment(wal.segment_path(tmp_path, 1), 1).records] == [b"in 1"]


def test_fsync_policies(tmp_path):
    syncs = {policy: [] for policy in ("always", "interval", "never")}
    for policy, seen in syncs.items():
        (tmp_path / policy).mkdir()
        log = WriteAheadLog(tmp_path / policy, 0, policy, interval_ms=20, on_fsync=seen.append)
        for _ in range(5):
            log.append([b"x" * 10])
        if policy == "interval":
            deadline = time.time() + 5
            while not seen and time.time() < deadline:
                time.sleep(0.01)
        count = len(seen)
        log.close()
        syncs[policy] = count
    assert syncs["always"] == 5  # one fsync per batch (group commit), before it is acknowledged
    assert 1 <= syncs["interval"] < 5  # the background flusher, not the appends
    assert syncs["never"] == 0
