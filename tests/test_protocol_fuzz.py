"""In-process fuzzing of the daemon's decoders: events requests (`daemon.io.decode_events_request`, which wraps
`protocol.decode_events`) and control requests (`protocol.decode_control`).

The property: for any frames, the decoder returns a request consistent with its limits (array shapes, counts,
argument types) or raises protocol.ProtocolError with a known reason, and nothing else. Two sources of cases:
hypothesis strategies over the msgspec schema (right and wrong types per field, then byte mutations:
truncation, bit flips, splices, huge container counts) for structure, and a seeded numpy mutation loop over
valid requests for volume (> 100,000 cases in all, a few seconds). The case count is printed.
"""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lstmd.clients import protocol
from lstmd.daemon.io import EventsLimits, decode_events_request

LIMITS = EventsLimits(input_size=8, max_events=64, header_limit=protocol.max_header_bytes(64, 32), target_dim=1)
# Every other case decodes as a daemon serving whole-sequence outputs (model.output = "end"): end flags accepted.
LIMITS_ENDS = EventsLimits(**{**LIMITS.__dict__, "ends": True})
EVENTS_REASONS = {
    "malformed", "protocol_version", "bad_shape", "bad_target_shape", "oversized", "bad_seq", "bad_horizon", "bad_exog",
    "ends_not_served",
}
CONTROL_REASONS = {"malformed", "protocol_version", "bad_args"}
MUTATION_CASES = 110_000  # the numpy loop's share; hypothesis adds its examples on top
HYPOTHESIS = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

counted = {"events": 0, "control": 0}


def check_events(frames: list) -> None:
    counted["events"] += 1
    limits = LIMITS_ENDS if counted["events"] % 2 else LIMITS
    try:
        header, features, targets = decode_events_request(frames, limits)
    except protocol.ProtocolError as exc:
        assert exc.reason in EVENTS_REASONS, exc.reason
        assert str(exc)
        return
    n = len(header.streams)
    assert all(type(s) in (str, int) for s in header.streams)
    assert header.seqs is None or len(header.seqs) == n
    if header.ends is not None:  # only on events requests, one bool per event, a True only where ends are served
        assert header.kind == "events" and len(header.ends) == n and all(type(e) is bool for e in header.ends)
        assert limits.ends or not any(header.ends)
    if header.kind == "targets":
        assert features is None and header.seqs is not None
        assert all(0 <= s < protocol.SEQ_LIMIT for s in header.seqs)
    elif header.kind == "forecast":  # exog: None (empty frame) or whole, finite events per horizon step
        assert 1 <= n <= LIMITS.max_events and 1 <= header.horizon <= protocol.MAX_FORECAST_HORIZON
        assert features is None or (
            features.shape == (n, header.horizon, LIMITS.input_size) and np.isfinite(features).all()
        )
    else:
        assert n <= LIMITS.max_events
        assert features.shape == (n, LIMITS.input_size) and features.dtype == protocol.FEATURE_DTYPE
    if targets is not None:
        assert targets.shape == (n, LIMITS.target_dim)
        assert targets.dtype == protocol.TARGET_DTYPES[header.targets]


def check_control(frames: list) -> None:
    counted["control"] += 1
    try:
        request = protocol.decode_control(frames)
    except protocol.ProtocolError as exc:
        assert exc.reason in CONTROL_REASONS, exc.reason
        assert str(exc)
        return
    assert isinstance(request.cmd, str) and len(request.cmd) <= protocol.MAX_COMMAND_CHARS
    scalar = (str, int, float, bool, type(None))
    for value in request.args.values():
        assert type(value) in scalar or (type(value) is list and all(type(v) in scalar for v in value))
    schema = protocol.CONTROL_ARGS.get(request.cmd)
    if schema is not None:
        assert set(request.args) == set(schema.__struct_fields__)


# ---- hypothesis: the schema, right and wrong ------------------------------------------------------------------

ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**63 - 1, 2**63 - 2, 2**63]))
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=12), st.binary(max_size=8)
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
stream_ids = st.one_of(st.text(max_size=40), ints)


def _field(good, bad=anything):
    return st.one_of(good, good, good, bad)  # mostly right, sometimes any type at all


@st.composite
def events_requests(draw) -> list:
    n = draw(st.integers(0, 6))
    fields = {
        "v": draw(_field(st.sampled_from([1, 1, 1, 2, 0]))),
        "req": draw(_field(ints)),
        "streams": draw(_field(st.lists(stream_ids, min_size=n, max_size=n))),
        "dim": draw(_field(st.sampled_from([8, 8, 0, -1, 7, 2**62]))),
    }
    if draw(st.booleans()):
        fields["seqs"] = draw(_field(st.lists(ints, min_size=n, max_size=n) | st.lists(ints, max_size=8)))
    if draw(st.booleans()):
        flags = st.lists(st.booleans(), min_size=n, max_size=n) | st.lists(st.booleans(), max_size=8)
        fields["ends"] = draw(_field(flags))
    if draw(st.booleans()):
        fields["targets"] = draw(_field(st.sampled_from(["float32", "int64", "float64"])))
        fields["target_dim"] = draw(_field(st.sampled_from([1, 1, 0, 2, -3])))
    if draw(st.integers(0, 4)) == 0:
        fields["kind"] = draw(_field(st.sampled_from(["targets", "events", "other"])))
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.text(max_size=6))] = draw(anything)
    header = msgspec.msgpack.encode(fields)
    width = {"float32": 4, "int64": 8}
    data = [draw(st.sampled_from([n * 8 * 4, n * 8 * 4, n * 4, n * 8 * 4 + 1, 33, 0]))]
    if "targets" in fields or draw(st.integers(0, 5)) == 0:
        kind = fields.get("targets")
        data.append(draw(st.sampled_from([n * (width.get(kind, 4) if isinstance(kind, str) else 4), n * 4 - 1, 7])))
    frames = [header] + [bytes(max(0, size)) for size in data]
    if draw(st.integers(0, 9)) == 0:
        frames = frames[: draw(st.integers(0, len(frames)))] + draw(st.lists(st.binary(max_size=16), max_size=2))
    return frames


@st.composite
def control_requests(draw) -> list:
    cmd = draw(st.one_of(st.sampled_from(sorted(protocol.CONTROL_ARGS)), st.text(max_size=80)))
    fields = {"v": draw(_field(st.sampled_from([1, 1, 2]))), "cmd": draw(_field(st.just(cmd)))}
    if draw(st.booleans()):
        keys = st.sampled_from(["stream", "limit", "safetensors_b64", "version", "x"]) | st.text(max_size=8)
        fields["args"] = draw(
            _field(st.dictionaries(keys, scalars, max_size=4) | st.dictionaries(keys, anything, max_size=20))
        )
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.text(max_size=6))] = draw(anything)
    frames = [msgspec.msgpack.encode(fields)]
    if draw(st.integers(0, 19)) == 0:
        frames = frames * draw(st.integers(0, 3))
    return frames


@st.composite
def mutated(draw, frames: list) -> list:
    """Byte mutations of one frame: truncation, bit flips, splices, huge container counts."""
    if not frames:
        return frames
    i = draw(st.integers(0, len(frames) - 1))
    b = bytearray(frames[i])
    op = draw(st.sampled_from(["truncate", "flip", "splice", "huge", "none"]))
    if op == "truncate" and b:
        b = b[: draw(st.integers(0, len(b) - 1))]
    elif op == "flip" and b:
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(b) - 1))
            b[at] ^= 1 << draw(st.integers(0, 7))
    elif op == "splice":
        at = draw(st.integers(0, len(b)))
        b[at:at] = draw(st.binary(max_size=24))
    elif op == "huge" and b:
        at = draw(st.integers(0, len(b) - 1))
        b[at : at + 1] = draw(
            st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xf0"])
        )
    return [*frames[:i], bytes(b), *frames[i + 1 :]]


@HYPOTHESIS
@given(st.data())
def test_events_decode_is_total_over_the_schema(data):
    frames = data.draw(events_requests())
    check_events(frames)
    check_events(data.draw(mutated(frames)))


@HYPOTHESIS
@given(st.data())
def test_control_decode_is_total_over_the_schema(data):
    frames = data.draw(control_requests())
    check_control(frames)
    check_control(data.draw(mutated(frames)))


# ---- volume: a seeded numpy mutation loop over valid requests ------------------------------------------------


def _seeds(rng: np.random.Generator) -> tuple[list[list[bytes]], list[list[bytes]]]:
    events = []
    for n in (0, 1, 2, 5, 17):
        streams = [f"s{i}" if i % 2 else i * 7919 for i in range(n)]
        x = rng.standard_normal((n, 8)).astype(np.float32)
        seqs = rng.integers(0, 2**62, n).tolist()
        events.append([bytes(f) for f in protocol.encode_events(n, streams, x)])
        events.append([bytes(f) for f in protocol.encode_events(n, streams, x, rng.standard_normal(n), seqs)])
        ends = (rng.random(n) < 0.3).tolist()
        events.append([bytes(f) for f in protocol.encode_events(n, streams, x, rng.integers(0, 3, n), seqs, ends)])
        events.append([bytes(f) for f in protocol.encode_targets(n, streams, seqs, rng.integers(0, 3, n))])
        events.append([bytes(f) for f in protocol.encode_forecast(n, streams, 3, 8, rng.standard_normal((n, 3, 8)))])
    args = {"stream": "s1", "limit": 5, "safetensors_b64": "AAAA", "version": 1, "streams": ["s1", 7], "horizon": 3}
    control = []
    for cmd, schema in protocol.CONTROL_ARGS.items():
        fields = {k: args[k] for k in schema.__struct_fields__ if k in args}
        control.append([protocol.encode(protocol.ControlRequest(v=1, cmd=cmd, args=fields))])
    control.append([protocol.encode(protocol.ControlRequest(v=1, cmd="not_a_command", args={"a": 1.5, "b": None}))])
    return events, control


_HUGE = [
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdb\x7f\xff\xff\xff",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
]
_INTERESTING = np.array([0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xD3, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x80], np.uint8)


def _mutate(rng: np.random.Generator, frames: list[bytes], donors: list[list[bytes]]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.integers(1, 4)):
        op = rng.integers(0, 8)
        i = int(rng.integers(0, len(frames))) if frames else 0
        b = np.frombuffer(frames[i], np.uint8).copy() if frames else np.zeros(0, np.uint8)
        if op == 0 and b.size:  # bit flips
            at = rng.integers(0, b.size, rng.integers(1, 9))
            b[at] ^= (1 << rng.integers(0, 8, at.size)).astype(np.uint8)
        elif op == 1 and b.size:  # interesting bytes (msgpack type markers, extremes)
            at = rng.integers(0, b.size, rng.integers(1, 4))
            b[at] = rng.choice(_INTERESTING, at.size)
        elif op == 2 and b.size:  # truncation
            b = b[: rng.integers(0, b.size)]
        elif op == 3:  # splice with another seed's bytes
            donor = donors[rng.integers(0, len(donors))]
            other = np.frombuffer(donor[rng.integers(0, len(donor))], np.uint8)
            cut, take = rng.integers(0, b.size + 1), rng.integers(0, other.size + 1)
            b = np.concatenate([b[:cut], other[take:], b[cut:]][: rng.integers(2, 4)])
        elif op == 4 and b.size:  # a huge container count or integer where a marker was
            at = rng.integers(0, b.size)
            huge = np.frombuffer(_HUGE[rng.integers(0, len(_HUGE))], np.uint8)
            b = np.concatenate([b[:at], huge, b[at + 1 :]])
        elif op == 5 and b.size:  # a byte range repeated
            lo = rng.integers(0, b.size)
            hi = rng.integers(lo, min(b.size, lo + 16) + 1)
            b = np.concatenate([b[:hi], b[lo:hi], b[hi:]])
        elif op == 6:  # a frame dropped or added
            if frames and rng.integers(0, 2):
                del frames[i]
                continue
            frames.insert(i, rng.bytes(int(rng.integers(0, 12))))
            continue
        if frames:
            frames[i] = b.tobytes()
    return frames


def test_decoders_are_total_under_a_seeded_mutation_loop(capsys):
    rng = np.random.default_rng(20261127)
    events, control = _seeds(rng)
    donors = events + control
    before = dict(counted)
    for case in range(MUTATION_CASES):
        if case % 8 == 7:
            check_control(_mutate(rng, control[case % len(control)], donors))
        else:
            check_events(_mutate(rng, events[case % len(events)], donors))
    ran = {k: counted[k] - before[k] for k in counted}
    assert sum(ran.values()) == MUTATION_CASES
    with capsys.disabled():
        print(
            f"\nprotocol fuzz: {ran['events']} events + {ran['control']} control cases in the mutation loop; "
            f"{sum(counted.values())} cases in this module so far (hypothesis included)"
        )


def test_protocol_imports_without_torch():
    code = "import sys, lstmd.clients.protocol, lstmd.clients; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
