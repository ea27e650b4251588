"""The wire format between producers/admins and the daemon: the one definition both sides import.

Imports only msgspec and numpy (no torch, no triton), so producers in ordinary services can use it.

Events socket (ZeroMQ DEALER → daemon ROUTER), one request = frames
    [EventsHeader (msgpack), features (float32 little-endian, N*I), targets (optional, N*D)]
and one reply = frames [EventsReply (msgpack), predictions (float32 little-endian, N*O)].
Control socket (DEALER → ROUTER): [ControlRequest (msgpack)] → [ControlReply (msgpack)].
Prediction PUB socket (daemon XPUB → SUB): one message per serving batch, frames
    [PREDICTIONS_TOPIC, PublishedBatch (msgpack), predictions (float32 little-endian, N*O)]
where row i of the predictions is the answer to event (streams[i], seqs[i]); only applied events are published
(not duplicates or rejections; with model.output = "end", rows of events other than ends are NaN, as in their
replies). `batch` counts the batches the daemon handed to its publisher: a gap means batches
were dropped (the publish queue was full, or this subscriber's queue was: ZeroMQ drops for a subscriber that
does not keep up, never blocks). Filtering by stream is the subscriber's (see decode_published); subscribe to the
topic. Nothing is published while no one subscribes.

Arrays travel as raw buffers, not per-element msgpack, so neither side builds a Python object per value.

Decoding is total: `decode_events` and `decode_control` either return a typed, size-checked request or raise
ProtocolError with a short reason label and a message saying what was wrong; no other exception escapes them
for any input. The limits they enforce (the daemon's configured limits come on top, see daemon/config.py):
- Frames: events requests have 2 or 3 frames, control requests 1. An events frame over `serve.max_message_bytes`
  is answered `frame_too_large`; ZeroMQ drops (and disconnects the peer of) any frame over twice that on the
  events socket and over MAX_CONTROL_BYTES on the control socket, before Python sees it.
- Events header: at most `max_header_bytes(max_events, max_id_chars)` bytes, checked before it is decoded;
  typed msgpack (unknown fields refused), at most MAX_EVENTS stream ids and sequence numbers, strings valid
  UTF-8, every container of the declared type, so nesting depth is bounded by the schema.
- Arrays: `dim` and `target_dim` in 1..MAX_ROW_VALUES; the features frame must hold exactly N*dim float32
  values (N = number of stream ids), the targets frame exactly N*target_dim values of its dtype; the byte
  length is checked before any array is viewed.
- Sequence ends (`ends`, optional, one bool per event): exactly N of them when present; a daemon serving
  `model.output = "every"` refuses a message that marks any event as an end (`ends_not_served`).
- Sequence numbers: within [0, SEQ_LIMIT) = [0, 2^63 - 1). An events request carrying one outside is answered
  per event (`bad_seq`), a delayed-targets request whole. The daemon assigns a stream's next number as
  last + 1 only while that stays below SEQ_LIMIT (`seq_exhausted` after), so no number ever overflows int64.
- Control requests: `cmd` at most MAX_COMMAND_CHARS characters, `args` a map of at most MAX_CONTROL_ARGS
  values, each a scalar (str, int, float, bool, nil) or a list of scalars, then checked against the command's
  own schema in CONTROL_ARGS (a command not named there gets them unchecked).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import numpy as np

PROTOCOL_VERSION = 1

# Per-event status codes carried in EventsReply.status (one byte per event, in event order).
OK = 0  # applied; prediction valid
DUPLICATE = 1  # sequence number already applied: not applied again; its original prediction (serve.resend_window)
STATE_RESET = 2  # applied, but the stream's state had been dropped (evicted/reset) and started from zero
REJECTED = 3  # not applied; EventsReply.reasons[index] says why; prediction NaN
STATUS_NAMES = ("ok", "duplicate", "state_reset", "rejected")

# Per-event flags carried in EventsReply.flags (one byte per event, bits or-ed) by a daemon serving whole-sequence
# outputs (`model.output = "end"`, many-to-one); empty from a daemon serving one output per event ("every").
# With "end", only the reply to an end event (EventsHeader.ends) carries a prediction, the sequence's output
# (class probabilities for classification, values for regression); every other applied event's row is NaN and
# flagged NO_OUTPUT, so a NaN row is never mistaken for a prediction. The stream's (h, c) goes back to zero after
# an end, and the next event's reply is flagged SEQUENCE_START (so is the first event of a new, reset or evicted
# stream: each starts a sequence from zero state). A duplicate answers from the resend window: the end event's
# original output, or NO_OUTPUT for a kept non-end event.
FLAG_NO_OUTPUT = 1  # no prediction by design: not a sequence's end (the row is NaN)
FLAG_SEQUENCE_START = 2  # the event started a new sequence from zero state

StreamId = str | int
FEATURE_DTYPE = np.dtype("<f4")
TARGET_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}

# Limits of the protocol itself (see the module docstring).
SEQ_LIMIT = 2**63 - 1  # sequence numbers are < this, so a daemon-assigned last + 1 always fits an int64
MAX_EVENTS = 1 << 20  # stream ids (and sequence numbers) in one events header
MAX_ROW_VALUES = 1 << 20  # dim and target_dim: values per event
MAX_CONTROL_BYTES = 64 * 1024 * 1024  # one control request frame (an imported model travels in it, base64)
MAX_COMMAND_CHARS = 64
MAX_FORECAST_HORIZON = 1024  # steps in one forecast (daemon/forecast.py)
MAX_CONTROL_ARGS = 16
_HEADER_FIXED_BYTES = 256  # every field of an EventsHeader but the two per-event lists, with room to spare


class EventsHeader(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """First frame of an events request. Fields at their defaults are not sent, so a producer that uses no newer
    field (`ends`, `kind`) is understood by daemons that predate it."""

    v: int  # protocol version
    req: int  # request id chosen by the producer, echoed in the reply
    streams: Annotated[list[StreamId], msgspec.Meta(max_length=MAX_EVENTS)]  # one id per event, in event order
    dim: int  # features per event (the model's input_size)
    # Per-stream sequence numbers, one per event; None: the daemon assigns them. Range: see SEQ_LIMIT.
    seqs: Annotated[list[int], msgspec.Meta(max_length=MAX_EVENTS)] | None = None
    targets: Literal["float32", "int64"] | None = None  # dtype of the optional third frame
    # Whole-sequence outputs (model.output = "end"): one flag per event, True where the event ends its stream's
    # sequence; None: no event does. Events requests only.
    ends: Annotated[list[bool], msgspec.Meta(max_length=MAX_EVENTS)] | None = None
    target_dim: int = 0  # values per event in the targets frame
    # "targets": delayed targets for events already sent, named by (stream, seq); frames [header, targets],
    # `seqs` required, `dim` 0. Answered with an EventsReply: status ok (joined) or rejected per item, no
    # predictions frame.
    # "forecast": a multi-step forecast of each named stream, computed on copies of its state (nothing of the
    # stream changes); frames [header, exog], the exog frame empty or N*horizon*dim float32 known future features
    # (dim = input_size). Answered with an EventsReply per stream (ok, or rejected with the reason) and a
    # predictions frame of N*horizon*O values (out_dim = horizon*O; NaN rows for rejected streams).
    kind: Literal["events", "targets", "forecast"] = "events"
    horizon: int = 0  # "forecast": steps ahead, 1..MAX_FORECAST_HORIZON


class EventsReply(msgspec.Struct, kw_only=True):
    """First frame of an events reply. `error` set means the whole message was rejected."""

    v: int
    req: int
    version: int = 0  # model version that produced the predictions
    out_dim: int = 0
    status: bytes = b""  # one status code per event
    reasons: dict[int, str] = {}  # event index -> why it was rejected
    flags: bytes = b""  # model.output = "end": one byte of FLAG_* bits per event; empty otherwise
    error: str | None = None
    error_reason: str | None = None  # short machine-readable reason for a whole-message rejection


ArgScalar = str | int | float | bool | None
ArgValue = ArgScalar | list[ArgScalar]


class ControlRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A control request. `args` values are scalars or lists of scalars: nesting is at most two deep, so
    decoding needs no recursion whatever the bytes say."""

    v: int
    cmd: Annotated[str, msgspec.Meta(max_length=MAX_COMMAND_CHARS)]
    args: Annotated[dict[str, ArgValue], msgspec.Meta(max_length=MAX_CONTROL_ARGS)] = {}


# The arguments each control command takes (checked by the daemon's I/O thread before the command runs; the
# handler gets them as a dict, defaults filled in). A command not named here gets its args unchecked.
class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


class StreamArgs(msgspec.Struct, forbid_unknown_fields=True):
    stream: StreamId


class StreamsArgs(msgspec.Struct, forbid_unknown_fields=True):
    limit: int = 100


class ImportModelArgs(msgspec.Struct, forbid_unknown_fields=True):
    """One of the two: a safetensors model file, or a Keras .keras / .h5 file the daemon converts."""

    safetensors_b64: str | None = None
    keras_b64: str | None = None

    def __post_init__(self) -> None:  # msgspec turns the ValueError into a validation error (bad_args)
        if (self.safetensors_b64 is None) == (self.keras_b64 is None):
            raise ValueError("import_model takes exactly one of safetensors_b64 and keras_b64")


class RollbackArgs(msgspec.Struct, forbid_unknown_fields=True):
    version: int | None = None  # None: the version before the serving one



class ForecastArgs(msgspec.Struct, forbid_unknown_fields=True):
    """A multi-step forecast of `streams` (the daemon also bounds their number by serve.max_message_events);
    `exog`: known future features, [streams, horizon, input_size] flattened row-major (None: held at the last
    event's values)."""

    streams: Annotated[list[StreamId], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]
    horizon: Annotated[int, msgspec.Meta(ge=1, le=MAX_FORECAST_HORIZON)]
    exog: list[float] | None = None


CONTROL_ARGS: dict[str, type[msgspec.Struct]] = {
    **dict.fromkeys(
        [
            "status",
            "model_info",
            "export_model",
            "train_status",
            "train_now",
            "train_pause",
            "train_resume",
            "model_versions",
            "config",
            "shutdown",
            "snapshot",
            "keys_reload",
        ],
        NoArgs,
    ),
    **dict.fromkeys(["stream", "reset", "drop"], StreamArgs),
    "streams": StreamsArgs,
    "import_model": ImportModelArgs,
    "model_rollback": RollbackArgs,
    "forecast": ForecastArgs,
}


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


# What msgspec raises for bytes that are not a message of the expected type: DecodeError (ValidationError
# included) for bad msgpack, wrong types and broken limits, UnicodeDecodeError for a string that is not UTF-8,
# RecursionError for nesting deeper than the interpreter's limit (possible only where a value is skipped).
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def max_header_bytes(max_events: int, max_id_chars: int) -> int:
    """The largest events header a daemon with these limits can accept: checked before decoding it."""
    # Per event: a string id of max_id_chars characters (<= 4 UTF-8 bytes each, 5 bytes of msgpack prefix) or
    # an integer id (<= 9 bytes), a sequence number (<= 9 bytes) and an end flag (1 byte).
    per_event = max(5 + 4 * max_id_chars, 9) + 9 + 1
    return _HEADER_FIXED_BYTES + min(max_events, MAX_EVENTS) * per_event


def encode_events(
    req: int,
    streams: list[StreamId],
    features: np.ndarray,
    targets: np.ndarray | None = None,
    seqs: list[int] | None = None,
    ends: list[bool] | None = None,
) -> list[bytes | memoryview]:
    """Frames of one events request. `features` is [N, I] float32; `targets` [N] or [N, D]; `ends` one bool per
    event (True: the event ends its stream's sequence, model.output = "end")."""
    features = np.ascontiguousarray(features, dtype=FEATURE_DTYPE)
    if features.ndim != 2 or features.shape[0] != len(streams):
        raise ValueError(
            f"features must be [N, I] with N = len(streams) = {len(streams)}, got {features.shape}"
        )
    if seqs is not None and len(seqs) != len(streams):
        raise ValueError(f"seqs must have one number per event ({len(streams)}), got {len(seqs)}")
    if ends is not None and len(ends) != len(streams):
        raise ValueError(f"ends must have one flag per event ({len(streams)}), got {len(ends)}")
    target_kind, target_dim, frames_tail = None, 0, []
    if targets is not None:
        targets = np.asarray(targets)
        target_kind = "int64" if np.issubdtype(targets.dtype, np.integer) else "float32"
        targets = np.ascontiguousarray(targets, dtype=TARGET_DTYPES[target_kind])
        if targets.shape[0] != len(streams):
            raise ValueError(f"targets must have one row per event ({len(streams)}), got {targets.shape}")
        target_dim = 1 if targets.ndim == 1 else int(np.prod(targets.shape[1:]))
        frames_tail = [_raw(targets)]
    header = EventsHeader(
        v=PROTOCOL_VERSION,
        req=req,
        streams=list(streams),
        dim=features.shape[1],
        seqs=None if seqs is None else [int(s) for s in seqs],
        targets=target_kind,
        target_dim=target_dim,
        ends=None if ends is None else [bool(e) for e in ends],
    )
    return [encode(header), _raw(features), *frames_tail]


def _raw(array: np.ndarray) -> memoryview | bytes:
    """A C-contiguous array's bytes without a copy (a view of no elements cannot be cast, hence b"")."""
    return memoryview(array).cast("B") if array.size else b""


def decode_events(
    frames: list, header_limit: int | None = None
) -> tuple[EventsHeader, np.ndarray | None, np.ndarray | None]:
    """Validate and view one events request; raises ProtocolError naming what was wrong (and nothing else).

    Arrays are numpy views over the received frames (no copy). `header_limit`: the most bytes the header
    frame may have (see max_header_bytes), checked before decoding it. Per-event checks (finite values, id
    length, sequence number range) are the daemon's: they reject single events, not the message.
    """
    if not 2 <= len(frames) <= 3:
        raise ProtocolError(
            "malformed", f"expected 2 or 3 frames (header, features[, targets]), got {len(frames)}"
        )
    header_size = memoryview(frames[0]).nbytes
    if header_limit is not None and header_size > header_limit:
        raise ProtocolError(
            "oversized", f"header of {header_size} bytes exceeds this daemon's limit of {header_limit} bytes"
        )
    try:
        header = events_header_decoder.decode(frames[0])
    except _UNDECODABLE as exc:
        raise ProtocolError("malformed", f"bad header: {_why(exc)}") from None
    _check_version(header.v)
    if header.ends is not None and header.kind != "events":
        raise ProtocolError("malformed", f"a {header.kind} message carries no end flags")
    if header.kind == "targets":
        return header, None, _decode_delayed_targets(header, frames)
    if header.kind == "forecast":
        return header, _decode_forecast_exog(header, frames), None
    n = len(header.streams)
    features = _view_rows(frames[1], FEATURE_DTYPE, n, header.dim, "features", "dim")
    if header.seqs is not None and len(header.seqs) != n:
        raise ProtocolError("bad_shape", f"seqs has {len(header.seqs)} numbers for {n} events")
    if header.ends is not None and len(header.ends) != n:
        raise ProtocolError("bad_shape", f"ends has {len(header.ends)} flags for {n} events")
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
    return [encode(header), _raw(targets)]


def encode_forecast(req: int, streams: list[StreamId], horizon: int, dim: int, exog=None) -> list:
    """A forecast request's frames; `exog` None or [N, horizon, dim] known future features."""
    if exog is not None:
        exog = np.ascontiguousarray(exog, dtype=FEATURE_DTYPE)
        if exog.shape != (len(streams), horizon, dim):
            raise ValueError(
                f"exog must have shape [streams, horizon, input_size] = [{len(streams)}, {horizon}, {dim}], "
                f"got {list(exog.shape)}"
            )
    header = EventsHeader(v=PROTOCOL_VERSION, req=req, streams=list(streams), dim=dim, kind="forecast",
                          horizon=horizon)
    return [encode(header), b"" if exog is None else _raw(exog)]


def _decode_forecast_exog(header: EventsHeader, frames: list) -> np.ndarray | None:
    """The exog [N, horizon, dim] view of a forecast request, or None when its frame is empty."""
    if len(frames) != 2:
        raise ProtocolError("malformed", f"a forecast message has 2 frames (header, exog), got {len(frames)}")
    if header.seqs is not None or header.targets is not None or header.target_dim:
        raise ProtocolError("malformed", "a forecast message carries no sequence numbers or targets")
    if not 1 <= header.horizon <= MAX_FORECAST_HORIZON:
        raise ProtocolError("bad_horizon", f"horizon must be in 1..{MAX_FORECAST_HORIZON}, got {header.horizon}")
    if not header.streams:
        raise ProtocolError("bad_shape", "a forecast message names no stream")
    if memoryview(frames[1]).nbytes == 0:
        return None
    n = len(header.streams)
    rows = _view_rows(frames[1], FEATURE_DTYPE, n, header.horizon * header.dim, "exog", "horizon * dim")
    return rows.reshape(n, header.horizon, header.dim)


def _decode_delayed_targets(header: EventsHeader, frames: list) -> np.ndarray:
    n = len(header.streams)
    if len(frames) != 2:
        raise ProtocolError("malformed", f"a targets message has 2 frames (header, targets), got {len(frames)}")
    if header.seqs is None or len(header.seqs) != n:
        raise ProtocolError("bad_shape", "a targets message needs one sequence number per stream")
    outside = [s for s in header.seqs if not 0 <= s < SEQ_LIMIT]
    if outside:
        raise ProtocolError("bad_seq", f"sequence number {outside[0]} is outside [0, 2^63 - 1)")
    if header.targets is None or header.target_dim <= 0:
        raise ProtocolError("bad_shape", "a targets message must announce its targets dtype and target_dim")
    return _view_rows(frames[1], TARGET_DTYPES[header.targets], n, header.target_dim, "targets", "target_dim")


def _view_rows(frame, dtype: np.dtype, n: int, width: int, what: str, width_name: str) -> np.ndarray:
    """The frame as an [n, width] array view (no copy); ProtocolError if its size does not say so.

    The byte length is checked first, in Python integers: numpy never sees a buffer of the wrong size."""
    if width <= 0:
        raise ProtocolError("bad_shape", f"{width_name} must be positive, got {width}")
    if width > MAX_ROW_VALUES:  # also keeps numpy's shape arithmetic far from overflowing, even for 0 events
        raise ProtocolError("bad_shape", f"{width_name} of {width} exceeds the protocol's limit of {MAX_ROW_VALUES}")
    size = memoryview(frame).nbytes
    if size % dtype.itemsize:
        raise ProtocolError(
            "bad_shape", f"{what} frame of {size} bytes is not a whole number of {dtype.name} values"
        )
    if size != n * width * dtype.itemsize:
        raise ProtocolError(
            "bad_shape",
            f"{what} frame holds {size // dtype.itemsize} {dtype.name} values, expected {n} events x {width}",
        )
    return np.frombuffer(frame, dtype=dtype).reshape(n, width)


def seq_array(seqs: list[int]) -> np.ndarray:
    """Sequence numbers as int64; one that no int64 holds (>= 2^63, from a msgpack uint64) becomes SEQ_LIMIT,
    which is out of range as well, so the caller rejects it by the same range test [0, SEQ_LIMIT)."""
    try:
        return np.asarray(seqs, dtype=np.int64)
    except OverflowError:
        return np.asarray([min(s, SEQ_LIMIT) for s in seqs], dtype=np.int64)


def _check_version(v: int) -> None:
    if v != PROTOCOL_VERSION:
        raise ProtocolError("protocol_version", f"unknown protocol version {v}; this daemon speaks {PROTOCOL_VERSION}")


def decode_control(frames: list) -> ControlRequest:
    """Validate one control request (the frames after the routing envelope); raises ProtocolError (and
    nothing else) naming what was wrong. The returned request's args are the command's checked arguments
    as a dict with defaults filled in (CONTROL_ARGS), or the args as sent for a command not named there."""
    if len(frames) != 1:
        raise ProtocolError("malformed", f"a control request is one frame, got {len(frames)}")
    try:
        request = control_request_decoder.decode(frames[0])
    except _UNDECODABLE as exc:
        raise ProtocolError("malformed", f"malformed control request: {_why(exc)}") from None
    _check_version(request.v)
    schema = CONTROL_ARGS.get(request.cmd)
    if schema is not None:
        try:
            args = msgspec.convert(request.args, schema)
        except msgspec.ValidationError as exc:
            raise ProtocolError("bad_args", f"bad arguments for {request.cmd!r}: {exc}") from None
        request.args = msgspec.structs.asdict(args)
    return request


def _why(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a string (a stream id?) is not valid UTF-8: {exc.reason}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def encode_reply(reply: EventsReply, predictions: np.ndarray | None) -> list:
    frames: list = [encode(reply)]
    if predictions is not None:
        frames.append(_raw(np.ascontiguousarray(predictions, dtype=FEATURE_DTYPE)))
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
