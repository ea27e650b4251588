"""The daemon's sockets: the events ROUTER the serving loop reads and answers itself, and the I/O thread for the rest.

Events: `EventsSocket` is used by the serving loop's thread only. libzmq's own I/O threads (C, no GIL) receive
and buffer; the loop reads, decodes and answers between steps, so an event crosses no Python thread. (It was an
I/O thread handing decoded messages over a queue and taking replies back over an inproc socket: both
hand-offs ran under the loop's GIL, and the I/O thread's share of it delayed replies by up to the interpreter's
switch interval; see docs/benchmarks.md, "End to end".) Decoding and validation happen here: the loop receives
typed headers and numpy views over the received frames, and a message that cannot be decoded is answered here
with an error reply. Decoding is total (clients/protocol.py lists the limits): whatever bytes arrive, the sender
gets a reply with a reason, and an unexpected exception while decoding is answered `internal_error` (counted,
logged with its traceback, never shown to the client) instead of reaching the loop.

The I/O thread owns the control ROUTER, the prediction XPUB and the inproc PULL on which the loop hands back
control replies and predictions to publish (ZeroMQ sockets are not thread-safe: every socket is used by one
thread only, except the loop's own PUSH end). It owns no state. It decodes control requests into typed,
checked requests (`protocol.decode_control`), so the loop only runs them; a request that cannot be decoded
travels to the loop as a refusal, which the loop answers and counts (the metrics are the loop's).

Memory under abuse is bounded in bytes, not messages (docs/operations.md, "Memory bound"): requests read from the
events socket wait in `EventsSocket`'s pending queue within a per-peer and a total byte budget (beyond it a
request is answered `overloaded`); an events frame over serve.max_message_bytes is answered `frame_too_large`
(libzmq's own cap, FRAME_CAP_FACTOR times that, closes the connection of a bigger one); replies go out without
blocking, and one to a peer that is gone or does not read is dropped and counted instead of queued; predictions
to publish pass a byte budget (`PublishBudget`) on their way to the I/O thread, which forwards each batch as one
message; control requests wait for the loop in the `Inbox`, within serve.max_control_inbox_bytes (beyond it the
I/O thread answers `overloaded`). The I/O thread is supervised: a failure
in it is logged and the thread carries on, up to a limit, after which `/healthz` answers 503 with the reason.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq
from lstmd.clients import protocol
from lstmd.daemon import forecast
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("lstmd.io")

CONTROL, PUBLISH = b"C", b"P"  # first frame of a message on the outbox: where it goes
# Python objects a decoded header holds per event (a list slot, an int or short str, a seq), counted towards the
# in-flight budget with the raw feature and target frames.
_HEADER_BYTES_PER_EVENT = 96
# Requests moved from the events socket into the pending queue per call, so a flood cannot keep the loop reading.
_FILL_MESSAGES = 1024
# libzmq's receive queue per events connection, in messages, at least: with one or two, each message waits for
# libzmq's own I/O thread to be woken to read the next (a pipelining producer would stall on it).
_MIN_RCVHWM = 4
# libzmq's own frame cap on the events socket, as a multiple of serve.max_message_bytes: frames between the two are
# read and answered `frame_too_large`; libzmq closes the connection of a bigger one without a reason to count.
FRAME_CAP_FACTOR = 2
# libzmq's reply queue per events connection, in messages, at least: one batch answers up to one message per
# event at once, faster than libzmq's I/O thread moves them to the connection; below this a reading peer would
# lose replies to the burst.
_MIN_SNDHWM = 1024
# Peers whose replies failed as unroutable (gone), remembered to skip their queued requests; libzmq never reuses a
# generated routing id, so an entry cannot hide a later peer. Oldest forgotten first.
_GONE_PEERS = 4096
# The I/O thread's supervision: after this many failures within the window it stops and /healthz turns 503.
IO_MAX_FAILURES, IO_FAILURE_WINDOW_S = 5, 60.0


@dataclass
class EventsMessage:
    """One decoded events request, waiting for the serving loop."""

    envelope: list  # ROUTER routing frames to send the reply back
    header: protocol.EventsHeader
    features: np.ndarray  # [n, I] float32, a view over the received frame
    targets: np.ndarray | None  # [n, D]
    received: float  # perf_counter when the loop read it, for the latency histogram
    nbytes: int = 0  # what it holds, counted in the in-flight budgets while it waits (set by EventsSocket)


@dataclass
class TargetsMessage:
    """Delayed targets for events already applied, named by (stream, seq), waiting for the serving loop."""

    envelope: list
    header: protocol.EventsHeader
    targets: np.ndarray  # [n, D]
    nbytes: int = 0


@dataclass
class ForecastMessage:
    """A multi-step forecast request (daemon/forecast.py), answered between two batches without changing state."""

    envelope: list
    header: protocol.EventsHeader
    exog: np.ndarray | None  # [n, horizon, I] float32, a view over the received frame
    nbytes: int = 0


@dataclass
class ControlMessage:
    envelope: list
    request: protocol.ControlRequest | None  # None when refused
    refused: tuple[str, str] | None = None  # (reason label, message for the client): not decodable
    role: str | None = None  # the client key's role from the ZAP User-Id (daemon/auth.py); None: no CURVE
    nbytes: int = 0  # the request's received bytes, counted in the inbox's budget while it waits (Inbox)


class Inbox:
    """What the I/O thread hands the serving loop: control requests, bounded in bytes, and the stop sentinel.

    The I/O thread `reserve`s each control request's received size before it decodes it; a request that would take
    the bytes waiting past `limit` (serve.max_control_inbox_bytes) is refused and answered `overloaded` by that
    thread, so a flood of large requests (a model import travels as one, up to protocol.MAX_CONTROL_BYTES) cannot
    queue without bound while the loop is busy. One request always fits an empty inbox. `get_nowait` gives a
    request's bytes (ControlMessage.nbytes) back as the loop takes it. Safe from any thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit and self.used:
                return False
            self.used += nbytes
            return True

    def put(self, item) -> None:
        """Queue a control request (its bytes reserved first) or the stop sentinel."""
        self._queue.put(item)

    def get_nowait(self):
        """The oldest item; raises queue.Empty when there is none."""
        item = self._queue.get_nowait()
        if isinstance(item, ControlMessage) and item.nbytes:
            with self._lock:
                self.used -= item.nbytes
        return item

    def qsize(self) -> int:
        return self._queue.qsize()


# What a client is told when handling its message raised unexpectedly; the traceback goes to the log only.
INTERNAL_ERROR_DECODING = (
    "internal error while decoding the message (details are in the daemon's log); nothing was applied"
)


@dataclass(frozen=True)
class EventsLimits:
    """What the daemon accepts on its events socket, beyond the protocol's own limits."""

    input_size: int
    max_events: int
    header_limit: int | None = None  # bytes of the header frame; None: only the protocol's limits
    target_dim: int = 0  # values per event a targets frame must hold; 0: not checked
    task: str | None = None  # the model's task: forecast requests need "forecast"; None: not checked
    ends: bool = False  # model.output = "end": events may end their sequence; False: a marked end is refused


class _RequestId(msgspec.Struct):
    """The request id alone, read from a header that failed to decode, to echo it in the error reply."""

    req: int = 0


_request_id_decoder = msgspec.msgpack.Decoder(_RequestId)


def decode_events_request(body: list, limits: EventsLimits) -> tuple[protocol.EventsHeader, object, object]:
    """(header, features, targets) of one events or delayed-targets request, checked against `limits`;
    raises protocol.ProtocolError (and nothing else) naming what was wrong."""
    header, features, targets = protocol.decode_events(body, limits.header_limit)
    if targets is not None and limits.target_dim and header.target_dim != limits.target_dim:
        raise protocol.ProtocolError(
            "bad_target_shape",
            f"events carry {header.target_dim} target values each, the model's task takes {limits.target_dim}",
        )
    if header.kind == "targets":
        return header, None, targets
    # Refused whole here, so a decodable forecast is answered per stream (unless its result would exceed
    # serve.max_message_bytes: daemon/forecast.py refuses that whole).
    if header.kind == "forecast":
        if limits.task is not None and limits.task != "forecast":
            raise protocol.ProtocolError("not_forecast", forecast.not_a_forecast_model(limits.task))
        if features is not None and not np.isfinite(features).all():
            raise protocol.ProtocolError("bad_exog", forecast.EXOG_NOT_FINITE)
    # A forecast's exog holds whole events too; without exog (empty frame) its dim says nothing.
    if header.dim != limits.input_size and not (header.kind == "forecast" and features is None):
        raise protocol.ProtocolError(
            "bad_shape", f"events have {header.dim} features, the model's input_size is {limits.input_size}"
        )
    if len(header.streams) > limits.max_events:
        raise protocol.ProtocolError(
            "oversized", f"message holds {len(header.streams)} events, limit is {limits.max_events}"
        )
    # Refused rather than ignored: a producer that marks ends expects the stream's state to start over after them.
    if header.ends is not None and not limits.ends and any(header.ends):
        raise protocol.ProtocolError(
            "ends_not_served",
            'events marked as sequence ends, but this daemon serves model.output = "every" (one prediction per '
            'event, state carried on): whole-sequence outputs need model.output = "end"',
        )
    return header, features, targets


@dataclass(frozen=True)
class EventsBudgets:
    """Byte budgets of the events socket (serve.max_inflight_bytes, serve.max_peer_inflight_bytes)."""

    max_inflight_bytes: int = 256 * 2**20  # requests read and not yet taken by the loop, all peers together
    max_peer_inflight_bytes: int = 64 * 2**20  # the same for one peer; also its reply queue's size in libzmq
    max_reply_bytes: int = 2**20  # the largest reply the loop can send (sizes the reply queue in messages)


class PublishBudget:
    """Bytes of predictions handed to the I/O thread and not yet published (serve.publish_queue_bytes).

    The loop reserves before it hands a batch over and drops the batch (counted) when the budget is spent; the
    I/O thread releases after sending. So a publisher that falls behind costs dropped predictions, never memory
    or the loop's time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit and self.used:  # one batch always fits an empty queue
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class BindError(RuntimeError):
    """A socket could not be bound (port in use, bad address)."""


def _bind(sock: zmq.Socket, endpoint: str, what: str, secure=None) -> str:
    """Bind `sock`; `secure(sock, what)` first makes it a CURVE server (daemon/auth.py), when security is on."""
    if secure is not None:
        secure(sock, what)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise BindError(f"cannot bind the {what} socket to {endpoint}: {exc.strerror}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _router(ctx: zmq.Context, rcvhwm: int, sndhwm: int, mandatory: bool) -> zmq.Socket:
    """A ROUTER for requests (events, control), one second at close to flush the last replies.

    mandatory: a reply that cannot be queued (peer gone, or its queue of `sndhwm` messages full because it does
    not read) raises at once (SNDTIMEO 0) for the caller to drop and count; else libzmq drops it silently."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, int(mandatory))
    sock.setsockopt(zmq.SNDTIMEO, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    return sock


def _waiting(sock: zmq.Socket):
    """Every message already queued on `sock`, as frames, without blocking; stops when none is left."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return


def _split_envelope(frames: list) -> tuple[list, list]:
    """ROUTER frames → (envelope, body). A REQ peer adds an empty delimiter frame; a DEALER does not."""
    if len(frames) > 1 and len(frames[1].bytes if hasattr(frames[1], "bytes") else frames[1]) == 0:
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


class EventsSocket:
    """The events ROUTER, used by the serving loop's thread only: receive and decode requests, send replies."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        input_size: int,
        max_message_events: int,
        max_message_bytes: int,
        on_message_rejected,  # callback(reason: str)
        target_dim: int = 0,  # values per event a targets frame must hold; 0: not checked
        max_stream_id_length: int | None = None,  # bounds the header's size before it is decoded; None: not
        budgets: EventsBudgets | None = None,
        on_dropped: Callable[[str, str], None] = lambda what, reason: None,  # (reply|request, reason), counted
        secure=None,  # callback(socket, name) making a socket a CURVE server before it binds; None: plain
        task: str | None = None,  # the model's task (forecast requests); None: not checked
        ends: bool = False,  # model.output = "end": end flags accepted
    ) -> None:
        header_limit = (
            None
            if max_stream_id_length is None
            else protocol.max_header_bytes(max_message_events, max_stream_id_length)
        )
        self.limits = EventsLimits(input_size, max_message_events, header_limit, target_dim, task, ends)
        self.on_message_rejected = on_message_rejected
        self.on_dropped = on_dropped
        self.budgets = budgets or EventsBudgets()
        b = self.budgets
        # libzmq's queues count messages: sized here so that, at the largest message each may hold, a peer's
        # receive queue and its reply queue each stay within the per-peer byte budget, but not below the floors.
        self.sock = _router(
            ctx,
            rcvhwm=max(_MIN_RCVHWM, b.max_peer_inflight_bytes // (FRAME_CAP_FACTOR * max_message_bytes)),
            sndhwm=max(_MIN_SNDHWM, b.max_peer_inflight_bytes // b.max_reply_bytes),
            mandatory=True,
        )
        # Frames over max_message_bytes are answered `frame_too_large` (counted under that reason) by receive().
        # libzmq cannot say why it closed a connection, so its own cap (MAXMSGSIZE) sits above ours, at
        # FRAME_CAP_FACTOR times: a frame past that is not read at all, its connection is closed and only the I/O
        # thread's monitor sees it, as a disconnect.
        self.max_frame_bytes = max_message_bytes
        self.sock.setsockopt(zmq.MAXMSGSIZE, FRAME_CAP_FACTOR * max_message_bytes)
        # Decoded requests waiting for the loop, one queue per peer (routing id), oldest first; the dict's order is
        # the peers' turn order.
        self._queues: dict[bytes, collections.deque] = {}
        self._waiting_requests = 0
        self.pending_bytes = 0
        self._peer_bytes: dict[bytes, int] = {}  # routing id -> bytes of its requests in _queues
        self._gone: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        try:
            if secure is not None:  # this socket's one monitor (below) reports its failed handshakes too
                secure(self.sock, "events", monitor=False)
            self.endpoint = _bind(self.sock, endpoint, "events")
        except BindError:
            self.sock.close(linger=0)
            raise
        # Connection events for the I/O thread (the monitor's PAIR is handed over before that thread starts):
        # disconnects, and with CURVE the handshakes that failed before ZAP (IOThread's on_handshake_failed).
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)

    def close(self) -> None:
        self.sock.disable_monitor()
        self.sock.close()

    def wait(self, timeout_ms: float) -> bool:
        """Block up to timeout_ms for a request (the GIL is released while waiting); True if one is waiting.

        With requests already pending, what arrived meanwhile joins them first (once per batch the loop gathers):
        a peer's new request then takes its turn among the others instead of waiting out their backlog."""
        if self._waiting_requests:
            self._fill()
            return True
        return bool(self.sock.poll(max(0, math.ceil(timeout_ms)), zmq.POLLIN))  # ZeroMQ counts whole ms

    def take(self) -> EventsMessage | TargetsMessage | ForecastMessage | None:
        """The next request for the loop, or None when none is waiting: peers take turns, one request each, and
        each peer's requests keep their order.

        Moves what the socket holds into the per-peer queues when they are empty (an empty socket costs an
        exception in pyzmq: not once per request; `wait` does it between batches), so libzmq's queues stay short
        and what the daemon holds is counted in bytes; requests of a peer known to be gone are skipped."""
        if not self._waiting_requests:
            self._fill()
        while self._queues:
            peer, queue_ = next(iter(self._queues.items()))
            del self._queues[peer]
            if peer in self._gone:  # its replies cannot be delivered: do not compute them
                for message in queue_:
                    self._forget(peer, message)
                    self.on_dropped("request", "peer_gone")
                continue
            message = queue_.popleft()
            if queue_:
                self._queues[peer] = queue_  # to the back of the turn order
            self._forget(peer, message)
            return message
        return None

    def put_back(self, message: EventsMessage) -> None:
        """Hand back the request take() returned last, unserved (the loop's batch is full): it is again first in its
        peer's queue, its peer first in the turn order, and its bytes count against the budgets again."""
        peer = message.envelope[0].bytes
        queue_ = self._queues.pop(peer, None) or collections.deque()
        queue_.appendleft(message)
        self._queues = {peer: queue_, **self._queues}
        self._waiting_requests += 1
        self.pending_bytes += message.nbytes
        self._peer_bytes[peer] = self._peer_bytes.get(peer, 0) + message.nbytes

    def _forget(self, peer: bytes, message) -> None:
        self._waiting_requests -= 1
        self.pending_bytes -= message.nbytes
        left = self._peer_bytes[peer] - message.nbytes
        if left:
            self._peer_bytes[peer] = left
        else:
            del self._peer_bytes[peer]

    def _fill(self) -> None:
        """Decoded requests from the socket into the per-peer queues, within the budgets; excess answered
        `overloaded` (counted). At most _FILL_MESSAGES per call: the loop steps between two fills."""
        b = self.budgets
        for _ in range(_FILL_MESSAGES):
            message = self.receive()
            if message is None:
                return
            n = len(message.header.streams)
            array = message.exog if isinstance(message, ForecastMessage) else message.targets
            message.nbytes = (
                (message.features.nbytes if isinstance(message, EventsMessage) else 0)
                + (array.nbytes if array is not None else 0)
                + n * _HEADER_BYTES_PER_EVENT
            )
            peer = message.envelope[0].bytes
            peer_bytes = self._peer_bytes.get(peer, 0)
            # One request always fits an idle daemon's budgets: a limit below one message would refuse it forever.
            if self._waiting_requests and (
                peer_bytes + message.nbytes > b.max_peer_inflight_bytes
                or self.pending_bytes + message.nbytes > b.max_inflight_bytes
            ):
                which = "peer" if peer_bytes + message.nbytes > b.max_peer_inflight_bytes else "total"
                self.on_message_rejected("overloaded")
                reply = protocol.EventsReply(
                    v=protocol.PROTOCOL_VERSION,
                    req=message.header.req,
                    error=f"the daemon is overloaded: {which} in-flight bytes at the limit; resend later",
                    error_reason="overloaded",
                )
                self.send([*message.envelope, protocol.encode(reply)])
                continue
            queue_ = self._queues.get(peer)
            if queue_ is None:
                self._queues[peer] = queue_ = collections.deque()
            queue_.append(message)
            self._waiting_requests += 1
            self.pending_bytes += message.nbytes
            self._peer_bytes[peer] = peer_bytes + message.nbytes

    def pending(self) -> int:
        """Requests waiting for the loop (its queue depth gauge)."""
        return self._waiting_requests

    def receive(self) -> EventsMessage | TargetsMessage | ForecastMessage | None:
        """The next decodable request, or None when none is waiting; undecodable ones are answered and skipped."""
        for frames in _waiting(self.sock):
            received = time.perf_counter()
            envelope, body = _split_envelope(frames)
            largest = max((len(frame) for frame in body), default=0)
            if largest > self.max_frame_bytes:
                why = f"a frame of {largest} bytes, over this daemon's serve.max_message_bytes = {self.max_frame_bytes}"
                self._reject(envelope, body, "frame_too_large", why)
                continue
            try:
                header, features, targets = decode_events_request(body, self.limits)
            except protocol.ProtocolError as exc:
                self._reject(envelope, body, exc.reason, str(exc))
                continue
            except Exception:  # last resort: a bug here must cost one message, not the loop
                log.exception("internal error decoding an events message; answered internal_error")
                self._reject(envelope, body, "internal_error", INTERNAL_ERROR_DECODING)
                continue
            if header.kind == "targets":
                return TargetsMessage(envelope, header, targets)
            if header.kind == "forecast":
                return ForecastMessage(envelope, header, features)
            return EventsMessage(envelope, header, features, targets, received)
        return None

    def send(self, frames: list) -> bool:
        """Send a reply without blocking; one that cannot be queued is dropped and counted: False."""
        try:
            self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # the peer's reply queue is full: it is not reading
            self.on_dropped("reply", "peer_not_reading")
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.on_dropped("reply", "peer_gone")
            peer = frames[0].bytes if isinstance(frames[0], zmq.Frame) else bytes(frames[0])
            self._gone[peer] = None
            if len(self._gone) > _GONE_PEERS:
                self._gone.popitem(last=False)
        return False

    def _reject(self, envelope: list, body: list, reason: str, why: str) -> None:
        """Answer a message rejected whole, echoing its request id when the header is at least that readable."""
        req = 0
        limit = self.limits.header_limit
        with contextlib.suppress(Exception):  # anything unreadable, or not a msgpack map: req 0
            if limit is None or memoryview(body[0]).nbytes <= limit:  # an oversized header is not read at all
                req = _request_id_decoder.decode(body[0]).req
        self.on_message_rejected(reason)
        reply = protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=req, error=why, error_reason=reason)
        self.send([*envelope, protocol.encode(reply)])


class IOThread(threading.Thread):
    """Control requests in, control replies and published predictions out, connection events counted.

    Supervised: an exception out of one pass of its poll loop is logged, counted (`on_failure`) and the loop goes
    on with the same sockets; after IO_MAX_FAILURES within IO_FAILURE_WINDOW_S it stops, and `health()` (what
    /healthz answers) reports it with the last error until the daemon is restarted."""

    def __init__(
        self,
        ctx: zmq.Context,
        inbox: Inbox,
        control_endpoint: str,
        publish_endpoint: str,
        *,
        publish_budget: PublishBudget | None = None,
        publish_hwm: int = 1000,  # messages per subscriber libzmq queues before it drops for that subscriber
        monitor: zmq.Socket | None = None,  # the events socket's monitor PAIR (EventsSocket.monitor)
        on_failure: Callable[[], None] = lambda: None,
        on_disconnect: Callable[[], None] = lambda: None,
        on_handshake_failed: Callable[[dict], None] = lambda event: None,  # the events socket's, with CURVE
        on_control_overloaded: Callable[[], None] = lambda: None,  # a control request refused: the inbox is full
        clock: Callable[[], float] = time.monotonic,
        secure=None,  # as EventsSocket's
    ) -> None:
        super().__init__(name="lstmd-io", daemon=True)
        self.secured = secure is not None
        self.inbox = inbox
        self.outbox_endpoint = f"inproc://lstmd-outbox-{id(self)}"
        self._stop_requested = threading.Event()
        self.publish_budget = publish_budget or PublishBudget(64 * 2**20)
        self.monitor = monitor
        self.on_failure = on_failure
        self.on_disconnect = on_disconnect
        self.on_handshake_failed = on_handshake_failed
        self.on_control_overloaded = on_control_overloaded
        self._clock = clock
        self.failures: collections.deque[float] = collections.deque()  # times of failures in the window
        self.restarts = 0  # failures the thread carried on after
        self.last_error: str | None = None
        self.gave_up: str | None = None  # why the thread stopped for good
        self.last_beat = clock()
        self.control = _router(ctx, rcvhwm=1000, sndhwm=1000, mandatory=False)
        self.control.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_CONTROL_BYTES)
        self.outbox = ctx.socket(zmq.PULL)
        self.outbox.bind(self.outbox_endpoint)
        self.publisher = None
        self.subscribers = 0  # subscriptions seen on the XPUB; predictions are published only when > 0
        try:
            self.endpoints = {"control": _bind(self.control, control_endpoint, "control", secure)}
            if publish_endpoint:
                self.publisher = ctx.socket(zmq.XPUB)
                self.publisher.setsockopt(zmq.LINGER, 0)
                # Lossy per subscriber (XPUB's default): a full queue drops for that subscriber only, and the
                # batch counter in each message shows it the gap; one slow subscriber never blocks the others.
                self.publisher.setsockopt(zmq.SNDHWM, publish_hwm)
                # Pass every (un)subscription through, duplicates included, so the count stays exact.
                self.publisher.setsockopt(zmq.XPUB_VERBOSE, 1)
                self.publisher.setsockopt(zmq.XPUB_VERBOSER, 1)
                self.endpoints["publish"] = _bind(self.publisher, publish_endpoint, "publish", secure)
        except BindError:
            self.close()
            raise

    def stop(self) -> None:
        self._stop_requested.set()

    def close(self) -> None:
        for sock in (self.control, self.outbox, self.publisher, self.monitor):
            if sock is not None:
                sock.close(linger=0 if sock is self.monitor else None)

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.control, self.outbox, self.publisher, self.monitor):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop_requested.is_set():
                try:
                    self._poll_once(poller)
                except zmq.ContextTerminated:  # the daemon is shutting down under us: nothing left to send
                    return
                except Exception as exc:
                    if not self._carry_on(exc):
                        return
            with contextlib.suppress(zmq.ContextTerminated):
                self._drain_outbox()  # answer what the loop handed back before it stopped
        finally:
            self.close()

    def _poll_once(self, poller: zmq.Poller) -> None:
        ready = dict(poller.poll(50))
        self.last_beat = self._clock()
        if self.outbox in ready:
            self._drain_outbox()
        if self.control in ready:
            self._receive_control()
        if self.publisher is not None and self.publisher in ready:
            self._receive_subscriptions()
        if self.monitor is not None and self.monitor in ready:
            self._receive_monitor()

    def _carry_on(self, exc: Exception) -> bool:
        """Log and count a failure; False once there were too many in the window (the thread then stops)."""
        now = self._clock()
        self.failures.append(now)
        while self.failures and now - self.failures[0] > IO_FAILURE_WINDOW_S:
            self.failures.popleft()
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.on_failure()
        if len(self.failures) >= IO_MAX_FAILURES:
            self.gave_up = (
                f"the I/O thread stopped after {len(self.failures)} failures within {IO_FAILURE_WINDOW_S:g}s "
                f"(control and publishing are down; restart the daemon); last: {self.last_error}"
            )
            log.critical("%s", self.gave_up, exc_info=exc)
            return False
        self.restarts += 1
        log.error("the I/O thread failed and carries on (%d in the last %gs)", len(self.failures),
                  IO_FAILURE_WINDOW_S, exc_info=exc)
        return True

    def health(self, stall_timeout_s: float) -> str:
        """'' while the thread serves; else why not (what /healthz reports)."""
        if self.gave_up:
            return self.gave_up
        if self._stop_requested.is_set() or self.ident is None:
            return ""  # stopping, or not started yet
        if not self.is_alive():
            return f"the I/O thread exited unexpectedly; last error: {self.last_error or 'none recorded'}"
        silent = self._clock() - self.last_beat
        if silent > stall_timeout_s:
            return f"the I/O thread has not polled its sockets for {silent:.0f}s"
        return ""

    def publisher_health(self) -> str:
        """'' while predictions can be published (or none are configured); the publisher lives in this thread."""
        if self.publisher is None:
            return ""
        why = self.health(float("inf"))
        return f"the publisher is down: {why}" if why else ""

    def status(self) -> dict:
        return {
            "alive": self.is_alive(),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "gave_up": self.gave_up,
            "subscribers": self.subscribers,
            "publish_queue_bytes": self.publish_budget.used,
            "control_inbox_bytes": self.inbox.used,
        }

    def _receive_control(self) -> None:
        """Decode each waiting control request here, off the loop; refusals go to the loop too (it counts), except
        a request the inbox has no room for: answered `overloaded` here, undecoded, and counted through
        `on_control_overloaded` (the loop may be busy for a while: that is when requests pile up)."""
        for frames in _waiting(self.control):
            envelope, body = _split_envelope(frames)
            nbytes = sum(len(frame) for frame in frames)
            if not self.inbox.reserve(nbytes):
                self._refuse_overloaded(envelope, nbytes)
                continue
            try:
                message = ControlMessage(envelope, protocol.decode_control(body))
            except protocol.ProtocolError as exc:
                message = ControlMessage(envelope, None, (exc.reason, str(exc)))
            except Exception:  # last resort: a bug here must cost one request, not the I/O thread
                log.exception("internal error decoding a control request; answered internal_error")
                message = ControlMessage(envelope, None, ("internal_error", INTERNAL_ERROR_DECODING))
            # With CURVE, libzmq tags each frame with the ZAP User-Id: the role of the client's key.
            if self.secured and body:
                with contextlib.suppress(zmq.ZMQError):
                    message.role = body[0].get("User-Id")
            message.nbytes = nbytes
            self.inbox.put(message)

    def _refuse_overloaded(self, envelope: list, nbytes: int) -> None:
        self.on_control_overloaded()
        why = (
            f"the daemon is overloaded: control requests waiting for the serving loop hold {self.inbox.used} bytes "
            f"and this one {nbytes} (serve.max_control_inbox_bytes = {self.inbox.limit}); resend later"
        )
        self.control.send_multipart([*envelope, protocol.encode(protocol.ControlReply(ok=False, error=why))])

    def _receive_subscriptions(self) -> None:
        for frames in _waiting(self.publisher):
            msg = frames[0].bytes
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)

    def _receive_monitor(self) -> None:
        for frames in _waiting(self.monitor):
            event = parse_monitor_message([f.bytes for f in frames])
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.on_disconnect()
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.on_handshake_failed(event)

    def _drain_outbox(self) -> None:
        for frames in _waiting(self.outbox):
            kind = frames[0].bytes
            if kind == CONTROL:
                self.control.send_multipart(frames[1:], copy=False)
            elif kind == PUBLISH:
                self._publish(frames[1:])

    def _publish(self, frames: list) -> None:
        """frames: [header (protocol.PublishedBatch), predictions] as the loop encoded them: one PUB message per
        batch (topic protocol.PREDICTIONS_TOPIC), forwarded as they are; their bytes go back to the budget."""
        try:
            if self.publisher is not None:
                self.publisher.send_multipart([protocol.PREDICTIONS_TOPIC, *frames], copy=False, flags=zmq.NOBLOCK)
        finally:
            self.publish_budget.release(sum(len(f) for f in frames))
