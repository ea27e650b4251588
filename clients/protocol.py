"""The wire format between producers/admins and the daemon: the one definition both sides import.

Imports only msgspec and numpy (no torch, no triton), so producers in ordinary services can use it.

Events socket (ZeroMQ DEALER → daemon ROUTER), one request = frames
    [EventsHeader (msgpack), features (float32 little-endian, N*I), targets (optional, N*D)]
and one reply = frames [EventsReply (msgpack), predictions (float32 little-endian, N*O)].
Control socket (DEALER → ROUTER): [ControlRequest (msgpack)] → [ControlReply (msgpack)].
Prediction PUB socket (daemon XPUB → SUB): one message per serving batch, frames
    [PREDICTIONS_TOPIC, PublishedBatch (msgpack), predictions (float32 little-endian, N*O)]
where row i of the predictions is the answer to event (streams[i], seqs[i]); only applied events are published
(not duplicates or rejections). `batch` counts the batches the daemon handed to its publisher: a gap means batches
were dropped (the publish queue was full, or this subscriber's queue was: ZeroMQ drops for a subscriber that
does not keep up, never blocks). Filtering by stream is the subscriber's (see decode_published); subscribe to the
topic. Nothing is published while no one subscribes.

Arrays travel as raw buffers, not per-element msgpack, so neither side builds a Python object per value.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np

PROTOCOL_VERSION = 1

# Per-event status codes carried in EventsReply.status (one byte per event, in event order).
OK = 0  # applied; prediction valid
DUPLICATE = 1  # sequence number already applied: not applied again; prediction NaN
STATE_RESET = 2  # applied, but the stream's state had been dropped (evicted/reset) and started from zero
REJECTED = 3  # not applied; EventsReply.reasons[index] says why; prediction NaN
STATUS_NAMES = ("ok", "duplicate", "state_reset", "rejected")

StreamId = str | int
FEATURE_DTYPE = np.dtype("<f4")
TARGET_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}


class EventsHeader(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """First frame of an events request."""

    v: int  # protocol version
    req: int  # request id chosen by the producer, echoed in the reply
    streams: list[StreamId]  # one id per event, in event order
    dim: int  # features per event (the model's input_size)
    seqs: list[int] | None = None  # per-stream sequence numbers, one per event; None: the daemon assigns them
    targets: Literal["float32", "int64"] | None = None  # dtype of the optional third frame
    target_dim: int = 0  # values per event in the targets frame
    # "targets": delayed targets for events already sent, named by (stream, seq); frames [header, targets],
    # `seqs` required, `dim` 0. Answered with an EventsReply: status ok (joined) or rejected per item, no
    # predictions frame.
    kind: Literal["events", "targets"] = "events"


class EventsReply(msgspec.Struct, kw_only=True):
    """First frame of an events reply. `error` set means the whole message was rejected."""

    v: int
    req: int
    version: int = 0  # model version that produced the predictions
    out_dim: int = 0
    status: bytes = b""  # one status code per event
    reasons: dict[int, str] = {}  # event index -> why it was rejected
    error: str | None = None
    error_reason: str | None = None  # short machine-readable reason for a whole-message rejection


class ControlRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    v: int
    cmd: str
    args: dict[str, Any] = {}


class ControlReply(msgspec.Struct, kw_only=True):
    ok: bool
    result: Any = None
    error: str | None = None


PREDICTIONS_TOPIC = b"predictions"


class PublishedBatch(msgspec.Struct, kw_only=True):
    """Header of one message on the PUB socket: the predictions of one serving batch."""

    batch: int  # 1, 2, ... per batch handed to the publisher since the daemon started; a gap: batches dropped
    version: int  # model version that produced the predictions
    out_dim: int  # values per prediction (O)
    streams: list[StreamId]  # one id per prediction row
    seqs: list[int]  # the event's sequence number in its stream


_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
events_header_decoder = msgspec.msgpack.Decoder(EventsHeader)
events_reply_decoder = msgspec.msgpack.Decoder(EventsReply)
control_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
published_decoder = msgspec.msgpack.Decoder(PublishedBatch)


class ProtocolError(ValueError):
    """A message that does not follow this protocol; `reason` is the short label counted by the daemon."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode_events(
    req: int,
    streams: list[StreamId],
    features: np.ndarray,
    targets: np.ndarray | None = None,
    seqs: list[int] | None = None,
) -> list[bytes | memoryview]:
    """Frames of one events request. `features` is [N, I] float32; `targets` [N] or [N, D]."""
    features = np.ascontiguousarray(features, dtype=FEATURE_DTYPE)
    if features.ndim != 2 or features.shape[0] != len(streams):
        raise ValueError(
            f"features must be [N, I] with N = len(streams) = {len(streams)}, got {features.shape}"
        )
    if seqs is not None and len(seqs) != len(streams):
        raise ValueError(f"seqs must have one number per event ({len(streams)}), got {len(seqs)}")
    target_kind, target_dim, frames_tail = None, 0, []
    if targets is not None:
        targets = np.asarray(targets)
        target_kind = "int64" if np.issubdtype(targets.dtype, np.integer) else "float32"
        targets = np.ascontiguousarray(targets, dtype=TARGET_DTYPES[target_kind])
        if targets.shape[0] != len(streams):
            raise ValueError(f"targets must have one row per event ({len(streams)}), got {targets.shape}")
        target_dim = 1 if targets.ndim == 1 else int(np.prod(targets.shape[1:]))
        frames_tail = [memoryview(targets).cast("B")]
    header = EventsHeader(
        v=PROTOCOL_VERSION,
        req=req,
        streams=list(streams),
        dim=features.shape[1],
        seqs=None if seqs is None else [int(s) for s in seqs],
        targets=target_kind,
        target_dim=target_dim,
    )
    return [encode(header), memoryview(features).cast("B"), *frames_tail]


def decode_events(frames: list) -> tuple[EventsHeader, np.ndarray, np.ndarray | None]:
    """Validate and view one events request; raises ProtocolError naming what was wrong.

    Arrays are numpy views over the received frames (no copy). Per-event checks (finite values, id length)
    are the daemon's: they reject single events, not the message.
    """
    if not 2 <= len(frames) <= 3:
        raise ProtocolError(
            "malformed", f"expected 2 or 3 frames (header, features[, targets]), got {len(frames)}"
        )
    try:
        header = events_header_decoder.decode(frames[0])
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", f"bad header: {exc}") from None
    if header.v != PROTOCOL_VERSION:
        raise ProtocolError(
            "protocol_version", f"unknown protocol version {header.v}; this daemon speaks {PROTOCOL_VERSION}"
        )
    if header.kind == "targets":
        return header, None, _decode_delayed_targets(header, frames)
    n = len(header.streams)
    features = _view_rows(frames[1], FEATURE_DTYPE, n, header.dim, "features", "dim")
    if header.seqs is not None and len(header.seqs) != n:
        raise ProtocolError("bad_shape", f"seqs has {len(header.seqs)} numbers for {n} events")
    targets = None
    if header.targets is not None:
        if len(frames) != 3:
            raise ProtocolError("malformed", "header announces targets but the targets frame is missing")
        targets = _view_rows(frames[2], TARGET_DTYPES[header.targets], n, header.target_dim, "targets", "target_dim")
    elif len(frames) == 3:
        raise ProtocolError("malformed", "a targets frame was sent but the header does not announce it")
    return header, features, targets


def encode_targets(
    req: int, streams: list[StreamId], seqs: list[int], targets: np.ndarray
) -> list[bytes | memoryview]:
    """Frames of one delayed-targets message: targets [N] or [N, D] for the events (streams[i], seqs[i])."""
    targets = np.asarray(targets)
    kind = "int64" if np.issubdtype(targets.dtype, np.integer) else "float32"
    targets = np.ascontiguousarray(targets, dtype=TARGET_DTYPES[kind])
    if len(seqs) != len(streams) or targets.shape[0] != len(streams):
        raise ValueError(
            f"need one sequence number and one target row per stream ({len(streams)}), "
            f"got {len(seqs)} and {targets.shape[0]}"
        )
    header = EventsHeader(
        v=PROTOCOL_VERSION,
        req=req,
        streams=list(streams),
        dim=0,
        seqs=[int(s) for s in seqs],
        targets=kind,
        target_dim=1 if targets.ndim == 1 else int(np.prod(targets.shape[1:])),
        kind="targets",
    )
    return [encode(header), memoryview(targets).cast("B")]


def _decode_delayed_targets(header: EventsHeader, frames: list) -> np.ndarray:
    n = len(header.streams)
    if len(frames) != 2:
        raise ProtocolError("malformed", f"a targets message has 2 frames (header, targets), got {len(frames)}")
    if header.seqs is None or len(header.seqs) != n:
        raise ProtocolError("bad_shape", "a targets message needs one sequence number per stream")
    if header.targets is None or header.target_dim <= 0:
        raise ProtocolError("bad_shape", "a targets message must announce its targets dtype and target_dim")
    return _view_rows(frames[1], TARGET_DTYPES[header.targets], n, header.target_dim, "targets", "target_dim")


def _view_rows(frame, dtype: np.dtype, n: int, width: int, what: str, width_name: str) -> np.ndarray:
    """The frame as an [n, width] array view (no copy); ProtocolError if its size does not say so."""
    if width <= 0:
        raise ProtocolError("bad_shape", f"{width_name} must be positive, got {width}")
    values = np.frombuffer(frame, dtype=dtype)
    if values.size != n * width:
        raise ProtocolError(
            "bad_shape", f"{what} frame holds {values.size} {dtype.name} values, expected {n} events x {width}"
        )
    return values.reshape(n, width)


def encode_reply(reply: EventsReply, predictions: np.ndarray | None) -> list:
    frames: list = [encode(reply)]
    if predictions is not None:
        frames.append(memoryview(np.ascontiguousarray(predictions, dtype=FEATURE_DTYPE)).cast("B"))
    return frames


def decode_reply(frames: list) -> tuple[EventsReply, np.ndarray | None]:
    reply = events_reply_decoder.decode(frames[0])
    if reply.error is not None or len(frames) < 2:
        return reply, None
    preds = np.frombuffer(frames[1], dtype=FEATURE_DTYPE).reshape(len(reply.status), reply.out_dim)
    return reply, preds


def decode_published(frames: list) -> tuple[PublishedBatch, np.ndarray]:
    """One PUB message → (header, predictions [N, O] float32 view); ProtocolError if it is not one."""
    if len(frames) != 3 or bytes(frames[0]) != PREDICTIONS_TOPIC:
        raise ProtocolError("malformed", f"expected 3 frames (topic, header, predictions), got {len(frames)}")
    try:
        header = published_decoder.decode(frames[1])
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", f"bad published header: {exc}") from None
    if len(header.seqs) != len(header.streams):
        raise ProtocolError("bad_shape", f"{len(header.seqs)} seqs for {len(header.streams)} streams")
    return header, _view_rows(frames[2], FEATURE_DTYPE, len(header.streams), header.out_dim, "predictions", "out_dim")
