"""The write-ahead log: applied events (and state changes outside the event path) appended before the reply.

Layout: the state directory holds `wal/wal-<segment>.log` files, numbered upwards. A snapshot records the first
segment it does *not* contain; the log is rotated to a new segment just before a snapshot, and segments older
than the oldest kept snapshot are deleted afterwards (daemon/recovery.py), so any kept snapshot plus the
segments from its number on reproduce the state.

Segment file = 16-byte header (magic b"LSTMDWL1", segment number u64 LE), then records:

    length u32 LE | crc32 u32 LE | payload (length bytes)

where the crc32 (zlib) covers the length field and the payload, so a torn tail (a partial record after a crash
mid-write) and a corrupted record are both detected: `read_segment` stops at the first bad record and says
where, and recovery truncates the segment there. One serving batch is one `append` call: one `writev` of all
its records, then one fsync under `fsync = always` (group commit).

fsync policies (Redis's appendfsync): `always`: fdatasync before the batch is acknowledged; `interval`: a
background thread fdatasyncs every `interval_ms` when something was written (a power failure loses at most that
window, a process crash nothing: every acknowledged batch is in the page cache); `never`: left to the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lstmd.wal")

MAGIC = b"LSTMDWL1"
FILE_HEADER = struct.Struct("<8sQ")  # magic, segment number
RECORD_HEADER = struct.Struct("<II")  # payload length, crc32(length bytes + payload)
MAX_RECORD = 1 << 31  # a length above this is corruption, not a record
_SEGMENT_NAME = re.compile(r"^wal-(\d{12})\.log$")


class WalError(OSError):
    """Appending to the log failed (disk full, unwritable directory, I/O error): nothing was acknowledged."""


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"wal-{segment:012d}.log"


def list_segments(directory: Path) -> list[int]:
    """Segment numbers present in `directory`, ascending."""
    if not directory.is_dir():
        return []
    found = (_SEGMENT_NAME.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def encode_record(payload: bytes) -> bytes:
    """The length + crc32 header of one record (the payload follows it in the file)."""
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", zlib.crc32(payload, zlib.crc32(length)))


@dataclass
class SegmentScan:
    """What `read_segment` found: the good records, and where (and why) reading stopped early, if it did."""

    records: list[memoryview]
    good_bytes: int  # file offset just after the last good record (where a truncation would cut)
    size: int  # file size
    problem: str | None  # None: the whole file is good

    @property
    def clean(self) -> bool:
        return self.problem is None


def read_segment(path: Path, segment: int | None = None) -> SegmentScan:
    """Read every good record of a segment; stop at the first torn or corrupt one and say what was wrong."""
    data = memoryview(path.read_bytes())
    size = len(data)
    if size < FILE_HEADER.size:
        why = "empty file" if size == 0 else f"torn file header ({size} of {FILE_HEADER.size} bytes)"
        return SegmentScan([], 0, size, None if size == 0 else why)
    magic, number = FILE_HEADER.unpack_from(data)
    if magic != MAGIC:
        return SegmentScan([], 0, size, f"not a WAL segment (magic {bytes(magic)!r})")
    if segment is not None and number != segment:
        return SegmentScan([], 0, size, f"header names segment {number}, the file name {segment}")
    records: list[memoryview] = []
    offset = FILE_HEADER.size
    while offset < size:
        if size - offset < RECORD_HEADER.size:
            return SegmentScan(records, offset, size, f"torn record header at byte {offset}")
        length, crc = RECORD_HEADER.unpack_from(data, offset)
        start = offset + RECORD_HEADER.size
        if length > MAX_RECORD or start + length > size:
            return SegmentScan(
                records, offset, size, f"torn record at byte {offset} (needs {length} bytes, {size - start} left)"
            )
        payload = data[start : start + length]
        if zlib.crc32(payload, zlib.crc32(data[offset : offset + 4])) != crc:
            return SegmentScan(records, offset, size, f"checksum mismatch in the record at byte {offset}")
        records.append(payload)
        offset = start + length
    return SegmentScan(records, offset, size, None)


def truncate(path: Path, size: int) -> None:
    """Cut a segment at `size` bytes (after its last good record) and make that durable."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """The open log: appends records to the newest segment; rotates to a new one before a snapshot.

    Used by the serving loop only, except the interval flusher thread, which syncs the open file descriptor
    (`_lock` keeps it from syncing a descriptor that rotation is closing).
    """

    def __init__(
        self,
        directory: Path,
        segment: int,
        fsync: str = "interval",
        interval_ms: float = 1000.0,
        on_bytes: Callable[[int], None] | None = None,
        on_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.interval_s = interval_ms / 1000
        self.on_bytes = on_bytes or (lambda n: None)
        self.on_fsync = on_fsync or (lambda seconds: None)
        # Fault injection for tests: called with the bytes about to be written; raise OSError to simulate a
        # failing disk (ENOSPC, EIO) exactly where a real write would fail.
        self.fault: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self._dirty = False
        self._fd = -1
        self._size = 0
        self.segment = -1
        self.error: str | None = None  # the last append's failure, until an append succeeds again
        self._open(segment)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if fsync == "interval":
            self._flusher = threading.Thread(target=self._flush_periodically, name="lstmd-wal-fsync", daemon=True)
            self._flusher.start()

    # ---- appending ------------------------------------------------------------------------------------------

    def append(self, payloads: list[bytes]) -> int:
        """Write the records of one batch with one writev (group commit); fsync now under `always`.

        Returns the bytes written. On failure the segment is cut back to where it was (no partial record
        stays behind) and WalError says why; the caller must not acknowledge the batch.
        """
        parts: list[bytes] = []
        for payload in payloads:
            parts.append(encode_record(payload))
            parts.append(payload)
        total = sum(len(p) for p in parts)
        start = self._size
        try:
            if self._fd < 0:  # a rotation failed earlier (disk full): start a fresh segment now
                self._open(self.segment + 1)
                start = self._size
            if self.fault is not None:
                self.fault(total)
            written = os.writev(self._fd, parts)
            while written < total:  # a short write (rare): write the rest from where it stopped
                rest = b"".join(parts)[written:]
                written += os.write(self._fd, rest)
            self._size = start + total
            if self.fsync == "always":
                self._sync()
            else:
                self._dirty = True
        except OSError as exc:
            self._rollback(start)
            self.error = f"write-ahead log append failed: {exc.strerror or exc}"
            raise WalError(exc.errno or errno.EIO, self.error) from None
        self.error = None
        self.on_bytes(total)
        return total

    def _rollback(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            os.lseek(self._fd, size, os.SEEK_SET)
            self._size = size
        except OSError as exc:  # the next append fails too, and recovery truncates the torn record at start
            log.error("could not cut the WAL segment back to %d bytes after a failed write: %s", size, exc)

    def _sync(self) -> None:
        started = time.perf_counter()
        os.fdatasync(self._fd)
        self.on_fsync(time.perf_counter() - started)

    def sync(self) -> None:
        """fsync now whatever the policy (rotation, shutdown)."""
        with self._lock:
            if self._fd >= 0:
                self._sync()
                self._dirty = False

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._dirty:
                continue
            with self._lock:
                if self._fd < 0:
                    continue
                self._dirty = False
                try:
                    self._sync()
                except OSError as exc:
                    self._dirty = True
                    log.error("WAL fsync failed: %s", exc.strerror or exc)

    # ---- segments -------------------------------------------------------------------------------------------

    def _open(self, segment: int) -> None:
        path = segment_path(self.directory, segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, FILE_HEADER.pack(MAGIC, segment))
            os.fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size, self.segment = fd, FILE_HEADER.size, segment

    def rotate(self) -> int:
        """Sync and close the current segment and start the next; returns the new segment's number.

        Everything appended before this call is in segments below the returned number.
        """
        with self._lock:
            if self._fd >= 0:
                self._sync()
                os.close(self._fd)
                self._fd = -1
            self._dirty = False
            self._open(self.segment + 1)
        return self.segment

    @property
    def size(self) -> int:
        """Bytes in the current segment."""
        return self._size

    def close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(5)
        with self._lock:
            if self._fd >= 0:
                try:
                    self._sync()
                finally:
                    os.close(self._fd)
                    self._fd = -1
