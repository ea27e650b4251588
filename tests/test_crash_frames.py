"""Regression tests: every frame that crashed the daemon or its I/O thread in issue 11's probe, sent as is.

Each runs against a real daemon on loopback and checks that the sender gets a reply with a reason, that the
daemon (loop and I/O thread) keeps serving, and that another stream's state did not change.
"""

from __future__ import annotations

import base64

import msgspec
import numpy as np
import pytest
import zmq
from lstmd.clients import Admin, Producer, protocol

SEQ_LIMIT = 2**63 - 1
FEATURES = np.arange(16, dtype=np.float32).reshape(2, 8) / 16


def _header(**fields) -> bytes:
    return msgspec.msgpack.encode({"v": 1, "req": 7, "streams": ["a", "b"], "dim": 8} | fields)


def _request(endpoint: str, frames: list, timeout_ms: int = 10_000) -> list[bytes]:
    """Send raw frames on a fresh DEALER, return the reply's frames (fails the test if none comes)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply: the daemon did not answer this frame"
        return sock.recv_multipart()
    finally:
        sock.close()


def _events_reply(daemon, frames: list) -> protocol.EventsReply:
    return protocol.events_reply_decoder.decode(_request(daemon.endpoints["events"], frames)[0])


def _control_reply(daemon, frame: bytes) -> protocol.ControlReply:
    return protocol.control_reply_decoder.decode(_request(daemon.endpoints["control"], [frame])[0])


def _rejections(daemon, reason: str) -> float:
    """lstmd_rejections_total{reason}, read after a control round trip: the loop counts after it replies."""
    Admin(daemon.endpoints["control"], timeout=10).status()
    return daemon.metrics.registry.get_sample_value("lstmd_rejections_total", {"reason": reason}) or 0.0


@pytest.fixture
def served(make_daemon):
    """A daemon with a witness stream "keep" that has state; yields (daemon, admin, producer, keep_state)."""
    daemon = make_daemon()
    admin = Admin(daemon.endpoints["control"], timeout=10)
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["keep", "keep"], FEATURES)
        yield daemon, admin, producer, admin.stream("keep")


def _still_serving(daemon, admin, producer, keep_state) -> None:
    """The loop answers events, the I/O thread answers control, and "keep" kept its state."""
    assert daemon._io.is_alive(), "the I/O thread died"
    assert daemon._thread.is_alive(), "the serving loop died"
    assert admin.stream("keep")["h"] == keep_state["h"]
    assert admin.stream("keep")["c"] == keep_state["c"]
    assert producer.send(["other"], FEATURES[:1]).shape == (1, 1)


def test_features_frame_not_a_multiple_of_the_element_size(served):
    daemon, admin, producer, keep = served
    reply = _events_reply(daemon, [_header(), b"\0" * 33])  # was: ValueError out of np.frombuffer, process exit
    assert reply.error_reason == "bad_shape"
    assert "33 bytes is not a whole number of float32 values" in reply.error
    assert reply.req == 7
    _still_serving(daemon, admin, producer, keep)


def test_targets_frame_not_a_multiple_of_the_element_size(served):
    daemon, admin, producer, keep = served
    frames = [_header(targets="int64", target_dim=1), FEATURES.tobytes(), b"\0" * 15]
    reply = _events_reply(daemon, frames)
    assert reply.error_reason == "bad_shape"
    assert "targets frame of 15 bytes" in reply.error
    delayed = [_header(kind="targets", dim=0, seqs=[0, 1], targets="float32", target_dim=1), b"\0" * 7]
    assert _events_reply(daemon, delayed).error_reason == "bad_shape"
    _still_serving(daemon, admin, producer, keep)


@pytest.mark.parametrize("seq", [2**63, 2**64 - 1, SEQ_LIMIT, -1])
def test_sequence_numbers_outside_the_range_are_rejected_per_event(served, seq):
    daemon, admin, producer, keep = served
    reply = _events_reply(daemon, [_header(streams=["s", "t"], seqs=[seq, 3]), FEATURES.tobytes()])
    assert reply.error is None
    assert list(reply.status) == [protocol.REJECTED, protocol.OK]
    assert reply.reasons[0] == f"sequence number {seq} is outside [0, 2^63 - 1)"
    assert _rejections(daemon, "bad_seq") == 1
    _still_serving(daemon, admin, producer, keep)


def test_delayed_targets_with_a_sequence_number_outside_the_range_are_rejected(served):
    daemon, admin, producer, keep = served
    frames = [_header(kind="targets", dim=0, seqs=[2**64 - 1, 0], targets="float32", target_dim=1), b"\0" * 8]
    reply = _events_reply(daemon, frames)
    assert reply.error_reason == "bad_seq"
    assert "18446744073709551615 is outside" in reply.error
    _still_serving(daemon, admin, producer, keep)


def test_a_bit_flipped_stream_id_is_answered_not_fatal(served):
    daemon, admin, producer, keep = served
    header = bytearray(_header(streams=["sensor-1", "sensor-2"]))
    at = header.index(b"sensor-1")
    header[at] ^= 0x80  # "s" (0x73) becomes 0xf3: the start of a 4-byte UTF-8 sequence that is not there
    reply = _events_reply(daemon, [bytes(header), FEATURES.tobytes()])
    assert reply.error_reason == "malformed"
    assert "not valid UTF-8" in reply.error
    assert reply.req == 7  # the id is still read (skipped strings are not checked), so the producer matches it
    _still_serving(daemon, admin, producer, keep)


def test_seq_at_the_limit_is_refused_and_the_stream_keeps_counting(served):
    """Was: seq = 2^63-1 accepted, then daemon-assigned numbers wrapped (every later event `duplicate`)."""
    daemon, admin, producer, keep = served
    with pytest.raises(Exception, match="outside"):
        producer.send(["edge"], FEATURES[:1], seqs=[SEQ_LIMIT])
    result = producer.send_detailed(["edge", "edge"], FEATURES)  # daemon-assigned: 0, 1
    assert result.status_names == ["ok", "ok"]
    assert admin.stream("edge")["last_seq"] == 1
    _still_serving(daemon, admin, producer, keep)


def test_a_stream_whose_numbers_are_used_up_is_refused_not_wrapped(served):
    """Was: after the largest number, daemon-assigned ones wrapped to -2^63, and an explicit one then crashed the
    loop (`Counters can only be incremented by non-negative amounts`)."""
    daemon, admin, producer, keep = served
    top = SEQ_LIMIT - 1
    assert producer.send_detailed(["edge"], FEATURES[:1], seqs=[top]).status_names == ["ok"]
    state = admin.stream("edge")
    result = producer.send_detailed(["edge"], FEATURES[:1])  # daemon-assigned: would be 2^63 - 1
    assert result.status_names == ["rejected"]
    assert "sequence numbers are used up" in result.reasons[0]
    assert admin.stream("edge")["h"] == state["h"]
    assert admin.stream("edge")["last_seq"] == top
    assert producer.send_detailed(["edge"], FEATURES[:1], seqs=[5]).status_names == ["duplicate"]
    assert producer.send_detailed(["edge"], FEATURES[:1], seqs=[top]).status_names == ["duplicate"]
    assert _rejections(daemon, "seq_exhausted") == 1
    assert daemon.metrics.registry.get_sample_value("lstmd_sequence_gaps_total") == 0
    _still_serving(daemon, admin, producer, keep)


def test_gaps_near_the_limit_are_counted_exactly(served):
    """Two gaps of ~2^63 in one wave: their sum overflowed an int64 and made the gap counter raise; summed in
    Python, it then outgrew what `lstmd status` can encode (found by the live fuzz)."""
    daemon, admin, producer, keep = served
    producer.send(["g1", "g2"], FEATURES, seqs=[0, 0])
    result = producer.send_detailed(["g1", "g2"], FEATURES, seqs=[SEQ_LIMIT - 1, SEQ_LIMIT - 1])
    assert result.status_names == ["ok", "ok"]
    assert admin.status()["sequence_gaps"] == SEQ_LIMIT  # saturated: 2 * (2^63 - 3) fits no int64
    assert daemon.metrics.registry.get_sample_value("lstmd_sequence_gaps_total") == float(2 * (SEQ_LIMIT - 2))
    result = producer.send_detailed(["g1"], FEATURES[:1], seqs=[SEQ_LIMIT - 1])  # status still encodes after
    assert result.status_names == ["duplicate"]
    assert admin.status()["sequence_gaps"] == SEQ_LIMIT
    _still_serving(daemon, admin, producer, keep)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]


@pytest.mark.parametrize(
    "frame",
    [
        # args holding 100,000 nested arrays (was: RecursionError, the I/O thread died, control dead for good)
        b"\x83"
        + b"".join(map(msgspec.msgpack.encode, ["v", 1, "cmd", "status", "args"]))
        + b"\x81\xa1a"
        + _nested(100_000),
        _nested(100_000),  # the whole request nested
    ],
    ids=["nested-args", "nested-request"],
)
def test_deeply_nested_control_request_does_not_kill_the_io_thread(served, frame):
    daemon, admin, producer, keep = served
    reply = _control_reply(daemon, frame)
    assert not reply.ok
    assert reply.error.startswith("malformed control request: Expected")
    assert daemon.metrics.registry.get_sample_value("lstmd_control_rejections_total", {"reason": "malformed"}) == 1
    _still_serving(daemon, admin, producer, keep)


@pytest.mark.parametrize(
    ("cmd", "args", "reason", "message"),
    [
        ("import_model", {"safetensors_b64": 5}, "bad_args", "got `int` - at `$.safetensors_b64`"),
        ("import_model", {}, "bad_args", "exactly one of safetensors_b64 and keras_b64"),
        ("import_model", {"safetensors_b64": "AA", "keras_b64": "AA"}, "bad_args", "exactly one of"),
        ("streams", {"limit": "ten"}, "bad_args", "Expected `int`, got `str` - at `$.limit`"),
        ("stream", {"stream": 1.5}, "bad_args", "Expected `int | str`, got `float`"),
        ("model_rollback", {"version": "x"}, "bad_args", "Expected `int | null`, got `str`"),
        ("status", {"verbose": True}, "bad_args", "unknown field `verbose`"),
    ],
)
def test_control_requests_with_bad_arguments_are_refused_before_running(served, cmd, args, reason, message):
    daemon, admin, producer, keep = served
    reply = _control_reply(daemon, msgspec.msgpack.encode({"v": 1, "cmd": cmd, "args": args}))
    assert not reply.ok
    assert message in reply.error
    assert "internal error" not in reply.error
    assert daemon.metrics.registry.get_sample_value("lstmd_control_rejections_total", {"reason": reason}) == 1
    _still_serving(daemon, admin, producer, keep)


@pytest.mark.parametrize(
    ("cmd", "args", "message"),
    [
        ("import_model", {"safetensors_b64": "é"}, "cannot import model"),
        ("import_model", {"safetensors_b64": base64.b64encode(b"\xff" * 64).decode()}, "not a safetensors model file"),
        ("stream", {"stream": "²"}, "no stream '²' holds state"),  # "²".isdigit() but int("²") raises
        ("stream", {"stream": "--5"}, "no stream '--5' holds state"),
        ("streams", {"limit": -1}, "limit must be positive"),
        ("model_rollback", {"version": 2**63}, "is not kept"),
    ],
)
def test_control_requests_that_leaked_exception_text_get_a_plain_error(served, cmd, args, message):
    daemon, admin, producer, keep = served
    reply = _control_reply(daemon, msgspec.msgpack.encode({"v": 1, "cmd": cmd, "args": args}))
    assert not reply.ok
    assert message in reply.error
    assert "internal error" not in reply.error
    outcome = {"command": cmd, "outcome": "error"}
    assert daemon.metrics.registry.get_sample_value("lstmd_control_commands_total", outcome) == 1
    _still_serving(daemon, admin, producer, keep)


def test_a_failing_command_answers_generically_and_counts_internal_error(served, monkeypatch):
    daemon, admin, producer, keep = served
    from lstmd.daemon import control

    def broken(daemon, args):
        raise TypeError("secret detail of a bug")

    monkeypatch.setitem(control.COMMANDS, "model_info", broken)
    monkeypatch.setitem(control.COMMANDS, "model_versions", lambda daemon, args: [object()])  # not encodable
    for cmd in ("model_info", "model_versions"):
        reply = _control_reply(daemon, msgspec.msgpack.encode({"v": 1, "cmd": cmd}))
        assert reply.error == f"internal error in {cmd!r} (details are in the daemon's log)"
        outcome = {"command": cmd, "outcome": "internal_error"}
        assert daemon.metrics.registry.get_sample_value("lstmd_control_commands_total", outcome) == 1
    _still_serving(daemon, admin, producer, keep)


def test_a_failing_decode_or_step_answers_generically_and_counts_internal_error(served, monkeypatch):
    daemon, admin, producer, keep = served
    from lstmd.daemon import io

    real = io.decode_events_request
    monkeypatch.setattr(io, "decode_events_request", lambda body, limits: 1 / 0)
    reply = _events_reply(daemon, [_header(), FEATURES.tobytes()])
    assert reply.error_reason == "internal_error"
    assert "ZeroDivisionError" not in reply.error and "division" not in reply.error
    monkeypatch.setattr(io, "decode_events_request", real)

    def broken_step(*args, **kwargs):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(daemon.engine, "step", broken_step)
    reply = _events_reply(daemon, [_header(streams=["x", "y"]), FEATURES.tobytes()])
    assert reply.error_reason == "internal_error"
    assert reply.req == 7
    assert "secret" not in reply.error
    monkeypatch.undo()
    assert _rejections(daemon, "internal_error") == 2
    _still_serving(daemon, admin, producer, keep)


def test_an_oversized_header_is_refused_before_it_is_decoded(make_daemon):
    daemon = make_daemon(**{"serve.max_message_events": 4, "serve.max_stream_id_length": 8})
    limit = protocol.max_header_bytes(4, 8)
    header = _header(streams=["a", "b"], pad="x" * limit)  # an unknown field: refused only if it were decoded
    reply = _events_reply(daemon, [header, FEATURES.tobytes()])
    assert reply.error_reason == "oversized"
    assert f"exceeds this daemon's limit of {limit} bytes" in reply.error


def test_a_control_frame_over_the_cap_is_dropped_and_control_keeps_working(make_daemon, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_CONTROL_BYTES", 4096)  # read when the I/O thread binds its socket
    daemon = make_daemon()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoints["control"])
    try:
        sock.send(msgspec.msgpack.encode({"v": 1, "cmd": "import_model", "args": {"safetensors_b64": "A" * 8192}}))
        assert not sock.poll(500), "a frame over the cap was answered: it was read"
    finally:
        sock.close()
    assert daemon._io.is_alive()
    assert Admin(daemon.endpoints["control"], timeout=10).status()["streams"] == 0
