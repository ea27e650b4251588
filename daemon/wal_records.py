"""The write-ahead log's record kinds: every kind's encode and decode, the one definition of the on-disk payloads.

daemon/wal.py frames each payload (length, crc32) into segment files; this module says what a payload holds. A
payload is one msgpack array whose first element is the kind; arrays travel as raw little-endian buffers.

| kind | record         | fields after the kind (msgpack array)                                                   |
|------|----------------|-----------------------------------------------------------------------------------------|
| "E"  | EventsRecord   | streams per message [[id, ...], ...]; features bytes (f32, n x dim, wave order); dim;   |
|      |                | idx bytes (i64 [n], each event's index in the batch); seqs bytes (i64 [n]);             |
|      |                | fresh bytes (bool [n], state started from zero); targets per message: [] when no message |
|      |                | had targets, else [None or [dtype name, D, bytes (protocol.TARGET_DTYPES, n_m x D)], ...] |
| "S"  | EventsRecord   | the fields of "E", then ends bytes (bool [n], wave order: the event ended its stream's   |
|      | with ends      | sequence, model.output = "end"); written only for a batch with at least one end        |
| "M"  | ModelRecord    | the serving model file (bytes, the safetensors format of ServingModel.to_bytes)        |
| "X"  | EvictRecord    | stream ids [id, ...]; cause (str: capacity, idle, drop)                                 |
| "R"  | ResetRecord    | stream ids [id, ...] (`lstmd streams reset`)                                            |
| "P"  | ProbeRecord    | nothing (written while appends fail, to learn when the disk takes writes again)        |
| "T"  | TargetsRecord  | stream ids [id, ...]; seqs bytes (i64 [n]); D; targets bytes (f32 [n, D])               |
| "Z"  | PauseRecord    | paused (bool: `lstmd train pause` / `resume`)                                           |

The layout is the one lstmd wrote before this module existed (tests/data/wal_v1 pins it, see
tests/test_wal_fixture.py): change a kind only by adding a new kind letter, so old logs keep replaying.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
from lstmd.clients import protocol

EVENTS, MODEL, EVICT, RESET, PROBE, TARGETS, PAUSE = "E", "M", "X", "R", "P", "T", "Z"
SEQUENCE_EVENTS = "S"  # "E" plus each event's end flag: a log without ends stays readable by older lstmd

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class UnknownRecord(ValueError):
    """A payload whose kind this lstmd does not know (written by a newer one)."""


@dataclass
class EventsRecord:
    """One serving batch's applied events, in the order they were stepped (wave order)."""

    message_streams: list[list]  # each message's stream ids, as received
    features: np.ndarray  # [n, dim] float32, row j = the event at batch index idx[j]
    idx: np.ndarray  # [n] int64
    seqs: np.ndarray  # [n] int64, the numbers actually used (daemon-assigned ones included)
    fresh: np.ndarray  # [n] bool
    message_targets: list  # [] or per message None / [dtype name, D, raw bytes]
    ends: np.ndarray | None = None  # [n] bool, wave order: the event ended its sequence; None: no event did

    def batch_targets(self) -> list[np.ndarray | None]:
        """Each message's targets array (None where it had none), as the serving loop received them."""
        return [
            None if t is None else np.frombuffer(t[2], dtype=protocol.TARGET_DTYPES[t[0]]).reshape(-1, t[1])
            for t in self.message_targets
        ]


@dataclass
class ModelRecord:
    model_bytes: bytes


@dataclass
class EvictRecord:
    streams: list
    cause: str


@dataclass
class ResetRecord:
    streams: list


@dataclass
class ProbeRecord:
    pass


@dataclass
class TargetsRecord:
    streams: list
    seqs: np.ndarray  # [n] int64
    targets: np.ndarray  # [n, D] float32


@dataclass
class PauseRecord:
    paused: bool


Record = EventsRecord | ModelRecord | EvictRecord | ResetRecord | ProbeRecord | TargetsRecord | PauseRecord


def events_record(
    batch_streams: list[list], features: np.ndarray, idx, seqs, fresh, targets: list, ends=None
) -> EventsRecord:
    """An EventsRecord of a batch: `features` is the whole batch [N, dim]; `targets` per message (None or the
    array as received); `ends` [n] bool in wave order or None."""
    encoded = [None if t is None else [_target_dtype(t), t.shape[1], t.tobytes()] for t in targets]
    return EventsRecord(
        batch_streams,
        features[idx],
        np.asarray(idx, dtype=np.int64),
        np.asarray(seqs, dtype=np.int64),
        np.asarray(fresh, dtype=bool),
        encoded if any(t is not None for t in encoded) else [],
        np.asarray(ends, dtype=bool) if ends is not None and np.any(ends) else None,
    )


def _target_dtype(targets: np.ndarray) -> str:
    for name, dtype in protocol.TARGET_DTYPES.items():
        if targets.dtype == dtype:
            return name
    raise ValueError(f"targets of dtype {targets.dtype} have no WAL encoding")


def encode(record: Record) -> bytes:
    """The payload of one record (see the table above)."""
    match record:
        case EventsRecord():
            features = np.ascontiguousarray(record.features, dtype=np.float32)
            fields = (
                EVENTS if record.ends is None else SEQUENCE_EVENTS,
                record.message_streams,
                features.tobytes(),
                features.shape[1],
                record.idx.astype(np.int64, copy=False).tobytes(),
                record.seqs.astype(np.int64, copy=False).tobytes(),
                record.fresh.astype(bool, copy=False).tobytes(),
                record.message_targets,
            )
            return _encode(fields if record.ends is None else (*fields, record.ends.astype(bool, copy=False).tobytes()))
        case ModelRecord():
            return _encode((MODEL, record.model_bytes))
        case EvictRecord():
            return _encode((EVICT, list(record.streams), record.cause))
        case ResetRecord():
            return _encode((RESET, list(record.streams)))
        case ProbeRecord():
            return _encode((PROBE,))
        case TargetsRecord():
            targets = np.ascontiguousarray(record.targets, dtype=np.float32)
            seqs = np.asarray(record.seqs, dtype=np.int64)
            return _encode((TARGETS, list(record.streams), seqs.tobytes(), targets.shape[1], targets.tobytes()))
        case PauseRecord():
            return _encode((PAUSE, bool(record.paused)))
    raise TypeError(f"not a WAL record: {record!r}")


def decode(payload: bytes) -> Record:
    """The record of one payload; UnknownRecord for a kind this code does not know."""
    fields = _decode(payload)
    kind = fields[0]
    if kind in (EVENTS, SEQUENCE_EVENTS):
        _, streams, x_bytes, dim, idx_bytes, seq_bytes, fresh_bytes, targets = fields[:8]
        return EventsRecord(
            streams,
            np.frombuffer(x_bytes, dtype=np.float32).reshape(-1, dim),
            np.frombuffer(idx_bytes, dtype=np.int64),
            np.frombuffer(seq_bytes, dtype=np.int64),
            np.frombuffer(fresh_bytes, dtype=bool),
            targets,
            np.frombuffer(fields[8], dtype=bool) if kind == SEQUENCE_EVENTS else None,
        )
    if kind == MODEL:
        return ModelRecord(fields[1])
    if kind == EVICT:
        return EvictRecord(fields[1], fields[2])
    if kind == RESET:
        return ResetRecord(fields[1])
    if kind == PROBE:
        return ProbeRecord()
    if kind == TARGETS:
        _, streams, seq_bytes, dim, target_bytes = fields
        targets = np.frombuffer(target_bytes, dtype=np.float32).reshape(-1, dim)
        return TargetsRecord(streams, np.frombuffer(seq_bytes, dtype=np.int64), targets)
    if kind == PAUSE:
        return PauseRecord(bool(fields[1]))
    raise UnknownRecord(f"write-ahead log record of unknown kind {kind!r}: written by a newer lstmd?")
