"""Live fuzz: 10,000 mutated events frames and 2,000 mutated control frames against a real daemon, on raw
DEALER sockets, while well-formed "witness" streams are served by it and, identically, by a twin daemon that
sees no fuzz.

Asserted: the daemon (loop and I/O thread) stays alive; every frame is answered, a frame rejected whole with
exactly the reason and message the same decoder gives in process; the daemon's counters equal what the
replies said, by reason and by status (no `internal_error` anywhere); the witness streams' predictions, (h, c),
sequence numbers and event counts equal the twin's, also after a restart from the fuzzed daemon's state
directory (write-ahead log on). Control frames that decode to a command that changes state
(shutdown, drop, reset, snapshot) are not sent: they are drawn again.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq
from lstmd.clients import Admin, Producer, protocol
from lstmd.daemon import control
from lstmd.daemon.io import decode_events_request
from test_protocol_fuzz import _mutate, _seeds

# Fuzzed features hold Inf and NaN: the daemon's one-reduction finite check warns on them, as designed.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

EVENT_FRAMES = 10_000
CONTROL_FRAMES = 2_000
UNTIMED = {"idle_s": 0, "slot": 0}  # what may differ between two daemons with the same streams' history
SOCKETS = 16  # DEALERs, one request in flight each, so every reply belongs to a known frame
WITNESSES = [f"witness/{i}" for i in range(6)]
WITNESS_EVERY = 500  # events frames between two witness messages
DESTRUCTIVE = {"shutdown", "drop", "reset", "snapshot"}
# Per-event rejection messages (EventsReply.reasons) → the reason label the daemon counts them under.
EVENT_REASON_LABELS = {
    "features hold NaN or Inf": "non_finite",
    "is outside [0, 2^63 - 1)": "bad_seq",
    "sequence numbers are used up": "seq_exhausted",
    "stream id is empty": "bad_stream_id",
    "exceeds the limit of": "stream_id_too_long",
    "too many new streams": "too_many_new_streams",
    "capacity of": "capacity_exhausted",
}
SETTINGS = {
    "durability.wal": True,
    "state.capacity": 65536,
    "serve.max_message_events": 64,
    "serve.max_stream_id_length": 32,
}


def _label(why: str) -> str:
    labels = [label for text, label in EVENT_REASON_LABELS.items() if text in why]
    assert len(labels) == 1, f"unexpected per-event reason {why!r}"
    return labels[0]


def _split(frames: list[bytes]) -> list[bytes]:
    """What the daemon's ROUTER sees as the body: a leading empty frame is taken for a REQ delimiter."""
    return frames[1:] if frames and not frames[0] else frames


def _exchange(endpoint: str, frames: list[list[bytes]]) -> list[list[bytes]]:
    """Send every request, one in flight per socket on SOCKETS sockets; the reply frames of each, in order."""
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(SOCKETS):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        socks.append(sock)
    replies: list = [None] * len(frames)
    pending = iter(range(len(frames)))
    in_flight: dict[zmq.Socket, int] = {}
    poller = zmq.Poller()

    def send_next(sock) -> None:
        i = next(pending, None)
        if i is not None:
            sock.send_multipart(frames[i])
            in_flight[sock] = i

    try:
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
            send_next(sock)
        while in_flight:
            ready = dict(poller.poll(30_000))
            assert ready, f"no reply within 30 s to frames {sorted(in_flight.values())}"
            for sock in ready:
                reply = sock.recv_multipart()
                replies[in_flight.pop(sock)] = reply[1:] if len(reply) > 1 and not reply[0] else reply
                send_next(sock)
    finally:
        for sock in socks:
            sock.close()
    return replies


def _events_frames(rng: np.random.Generator) -> list[list[bytes]]:
    events, control_seeds = _seeds(rng)
    donors = events + control_seeds
    out = []
    while len(out) < EVENT_FRAMES:
        frames = _mutate(rng, events[len(out) % len(events)], donors)
        if frames:  # a DEALER cannot send a message of no frames
            out.append(frames)
    return out


def _control_frames(rng: np.random.Generator) -> list[list[bytes]]:
    events, control_seeds = _seeds(rng)
    safe = [f for f in control_seeds if protocol.decode_control(f).cmd not in DESTRUCTIVE]
    donors = events + control_seeds
    out = []
    while len(out) < CONTROL_FRAMES:
        frames = _mutate(rng, safe[len(out) % len(safe)], donors) if len(out) % 10 else safe[len(out) % len(safe)]
        if not frames:
            continue
        try:
            if protocol.decode_control(_split(frames)).cmd in DESTRUCTIVE:
                continue
        except protocol.ProtocolError:
            pass
        out.append(frames)
    return out


class Tally:
    """What the replies said, in the daemon's counters' terms."""

    def __init__(self) -> None:
        self.rejections: Counter = Counter()  # lstmd_rejections_total{reason}
        self.events: Counter = Counter()  # lstmd_events_total{status}
        self.control_rejections: Counter = Counter()  # lstmd_control_rejections_total{reason}
        self.commands: Counter = Counter()  # lstmd_control_commands_total{command, outcome}
        self.unavailable = 0  # lstmd_duplicates_unavailable_total: duplicates past the resend window

    def events_reply(self, status: bytes, reasons: dict[int, str]) -> None:
        self.events.update(protocol.STATUS_NAMES[s] for s in status)
        for i, why in reasons.items():  # a duplicate's reason says its prediction is gone: not a rejection
            if status[i] == protocol.DUPLICATE:
                self.unavailable += 1
            else:
                self.rejections[_label(why)] += 1


def _check_events(frames, reply_frames, limits, tally: Tally) -> None:
    reply = protocol.events_reply_decoder.decode(reply_frames[0])
    try:
        header, _, _ = decode_events_request(_split(frames), limits)
    except protocol.ProtocolError as exc:
        assert (reply.error_reason, reply.error) == (exc.reason, str(exc))
        tally.rejections[exc.reason] += 1
        return
    assert reply.error is None, reply.error
    assert len(reply.status) == len(header.streams)
    if header.kind == "targets":  # training is off: every item rejected, and not counted as events
        assert set(reply.status) <= {protocol.REJECTED}
        return
    tally.events_reply(reply.status, reply.reasons)
    assert len(reply_frames) == 2 and len(reply_frames[1]) == 4 * len(header.streams)


def _check_control(frames, reply_frame, tally: Tally) -> None:
    reply = protocol.control_reply_decoder.decode(reply_frame[0])
    assert reply.error is None or "internal error" not in reply.error, reply.error
    try:
        request = protocol.decode_control(_split(frames))
    except protocol.ProtocolError as exc:
        assert (reply.ok, reply.error) == (False, str(exc))
        tally.control_rejections[exc.reason] += 1
        return
    command = request.cmd if request.cmd in control.COMMANDS else "unknown"
    tally.commands[(command, "ok" if reply.ok else "error")] += 1


def _samples(daemon, name: str, label: str) -> Counter:
    out: Counter = Counter()
    for metric in daemon.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and sample.value:
                key = tuple(sample.labels[k] for k in label.split(",")) if "," in label else sample.labels[label]
                out[key] = int(sample.value)
    return out


def test_live_fuzz_is_answered_counted_and_touches_no_other_stream(make_daemon, capsys):
    started = time.perf_counter()
    fuzzed, twin = make_daemon(**SETTINGS), make_daemon(**SETTINGS)
    rng = np.random.default_rng(11)
    event_frames, control_frames = _events_frames(rng), _control_frames(rng)
    limits = fuzzed._events.limits
    tally = Tally()
    witness_x = rng.standard_normal((EVENT_FRAMES // WITNESS_EVERY + 1, len(WITNESSES), 8)).astype(np.float32)
    predictions = {"fuzzed": [], "twin": []}
    per_step = CONTROL_FRAMES // (EVENT_FRAMES // WITNESS_EVERY)
    with Producer(fuzzed.endpoints["events"]) as to_fuzzed, Producer(twin.endpoints["events"]) as to_twin:
        for step, start in enumerate(range(0, EVENT_FRAMES, WITNESS_EVERY)):
            # Alone in its batch on both daemons (no fuzz frame is in flight now), so the same arithmetic runs.
            seqs = [step] * len(WITNESSES)
            fuzzed_result = to_fuzzed.send_detailed(WITNESSES, witness_x[step], seqs=seqs)
            predictions["fuzzed"].append(fuzzed_result.predictions)
            predictions["twin"].append(to_twin.send(WITNESSES, witness_x[step], seqs=seqs))
            tally.events_reply(fuzzed_result.status.tobytes(), fuzzed_result.reasons)
            chunk = event_frames[start : start + WITNESS_EVERY]
            for frames, reply in zip(chunk, _exchange(fuzzed.endpoints["events"], chunk), strict=True):
                _check_events(frames, reply, limits, tally)
            part = control_frames[step * per_step : (step + 1) * per_step]  # control fuzz, interleaved
            for frames, reply in zip(part, _exchange(fuzzed.endpoints["control"], part), strict=True):
                _check_control(frames, reply, tally)

    admin, twin_admin = Admin(fuzzed.endpoints["control"], timeout=30), Admin(twin.endpoints["control"], timeout=30)
    admin.status()  # a control round trip: the loop has counted every batch it answered before it (counters
    # are read before the witnesses' states, whose `stream` commands count too)
    assert fuzzed._thread.is_alive() and fuzzed._io.is_alive()
    assert _samples(fuzzed, "lstmd_rejections_total", "reason") == tally.rejections
    assert _samples(fuzzed, "lstmd_events_total", "status") == tally.events
    assert _samples(fuzzed, "lstmd_control_rejections_total", "reason") == tally.control_rejections
    assert (fuzzed.metrics.registry.get_sample_value("lstmd_duplicates_unavailable_total") or 0) == tally.unavailable
    commands = _samples(fuzzed, "lstmd_control_commands_total", "command,outcome")
    commands[("status", "ok")] -= 1  # the round trip above
    assert +commands == tally.commands
    assert not _samples(fuzzed, "lstmd_evictions_total", "cause"), "the fuzz evicted streams: witnesses at risk"
    assert sum(tally.control_rejections.values()) + sum(tally.commands.values()) == CONTROL_FRAMES
    np.testing.assert_array_equal(np.stack(predictions["fuzzed"]), np.stack(predictions["twin"]))
    witnesses = {w: twin_admin.stream(w) | UNTIMED for w in WITNESSES}
    for witness in WITNESSES:
        assert admin.stream(witness) | UNTIMED == witnesses[witness], witness
    # What the fuzz left in the state directory (log, snapshot) restores: a restart gives the same witnesses.
    fuzzed.stop_and_join()
    restarted = make_daemon(state_dir=Path(fuzzed.config.state.dir), **SETTINGS)
    restarted_admin = Admin(restarted.endpoints["control"], timeout=30)
    for witness in WITNESSES:
        assert restarted_admin.stream(witness) | UNTIMED == witnesses[witness], witness
    with capsys.disabled():
        print(
            f"\nlive fuzz: {EVENT_FRAMES} events frames, {CONTROL_FRAMES} control frames in "
            f"{time.perf_counter() - started:.1f} s; rejected whole / per event: {dict(tally.rejections)}; "
            f"events: {dict(tally.events)}; control refused: {dict(tally.control_rejections)}; "
            f"commands run: {sum(tally.commands.values())}"
        )
