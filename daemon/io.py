"""The daemon's sockets: the events ROUTER the serving loop reads and answers itself, and the I/O thread for the rest.

Events: `EventsSocket` is used by the serving loop's thread only. libzmq's own I/O threads (C, no GIL) receive
and buffer; the loop reads, decodes and answers between steps, so an event crosses no Python thread. (It was an
I/O thread handing decoded messages over a queue and taking replies back over an inproc socket: both
hand-offs ran under the loop's GIL, and the I/O thread's share of it delayed replies by up to the interpreter's
switch interval; see docs/benchmarks.md, "End to end".) Decoding and validation happen here: the loop receives
typed headers and numpy views over the received frames, and a message that cannot be decoded is answered here
with an error reply.

The I/O thread owns the control ROUTER, the prediction XPUB and the inproc PULL on which the loop hands back
control replies and predictions to publish (ZeroMQ sockets are not thread-safe: every socket is used by one
thread only, except the loop's own PUSH end). It owns no state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq
from lstmd.clients import protocol

log = logging.getLogger("lstmd.io")

CONTROL, PUBLISH = b"C", b"P"  # first frame of a message on the outbox: where it goes


@dataclass
class EventsMessage:
    """One decoded events request, waiting for the serving loop."""

    envelope: list  # ROUTER routing frames to send the reply back
    header: protocol.EventsHeader
    features: np.ndarray  # [n, I] float32, a view over the received frame
    targets: np.ndarray | None  # [n, D]
    received: float  # perf_counter when the loop read it, for the latency histogram


@dataclass
class TargetsMessage:
    """Delayed targets for events already applied, named by (stream, seq), waiting for the serving loop."""

    envelope: list
    header: protocol.EventsHeader
    targets: np.ndarray  # [n, D]


@dataclass
class ControlMessage:
    envelope: list
    request: protocol.ControlRequest
    role: str | None = None  # the client key's role from the ZAP User-Id (daemon/auth.py); None: no CURVE


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


def _router(ctx: zmq.Context) -> zmq.Socket:
    """A ROUTER for requests (events, control): replies to vanished peers are dropped, deep queues both ways,
    one second at close to flush the last replies."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
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
        secure=None,  # callback(socket, name) making a socket a CURVE server before it binds; None: plain
    ) -> None:
        self.input_size = input_size
        self.target_dim = target_dim
        self.max_message_events = max_message_events
        self.on_message_rejected = on_message_rejected
        self.sock = _router(ctx)
        # Hard cap per frame; the friendlier per-message limit (max_message_events) is checked on decode.
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        try:
            self.endpoint = _bind(self.sock, endpoint, "events", secure)
        except BindError:
            self.sock.close(linger=0)
            raise

    def close(self) -> None:
        self.sock.close()

    def wait(self, timeout_ms: float) -> bool:
        """Block up to timeout_ms for a request (the GIL is released while waiting); True if one is readable."""
        return bool(self.sock.poll(max(0, math.ceil(timeout_ms)), zmq.POLLIN))  # ZeroMQ counts whole ms

    def receive(self) -> EventsMessage | TargetsMessage | None:
        """The next decodable request, or None when none is waiting; undecodable ones are answered and skipped."""
        for frames in _waiting(self.sock):
            received = time.perf_counter()
            envelope, body = _split_envelope(frames)
            try:
                return self._decode(envelope, body, received)
            except protocol.ProtocolError as exc:
                self._reject(envelope, body, exc)
        return None

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames, copy=False)

    def _decode(self, envelope, body, received) -> EventsMessage | TargetsMessage:
        header, features, targets = protocol.decode_events(body)
        if targets is not None and self.target_dim and header.target_dim != self.target_dim:
            raise protocol.ProtocolError(
                "bad_target_shape",
                f"events carry {header.target_dim} target values each, the model's task takes {self.target_dim}",
            )
        if header.kind == "targets":
            return TargetsMessage(envelope, header, targets)
        if header.dim != self.input_size:
            raise protocol.ProtocolError(
                "bad_shape", f"events have {header.dim} features, the model's input_size is {self.input_size}"
            )
        if len(header.streams) > self.max_message_events:
            raise protocol.ProtocolError(
                "oversized", f"message holds {len(header.streams)} events, limit is {self.max_message_events}"
            )
        return EventsMessage(envelope, header, features, targets, received)

    def _reject(self, envelope: list, body: list, exc: protocol.ProtocolError) -> None:
        req = 0
        with contextlib.suppress(Exception):  # echo the request id when the header is at least readable
            req = int(msgspec.msgpack.decode(body[0].bytes).get("req", 0))
        self.on_message_rejected(exc.reason)
        reply = protocol.EventsReply(
            v=protocol.PROTOCOL_VERSION, req=req, error=str(exc), error_reason=exc.reason
        )
        self.sock.send_multipart([*envelope, protocol.encode(reply)])


class IOThread(threading.Thread):
    def __init__(
        self,
        ctx: zmq.Context,
        inbox: queue.SimpleQueue,
        control_endpoint: str,
        publish_endpoint: str,
        secure=None,  # as EventsSocket's
    ) -> None:
        super().__init__(name="lstmd-io", daemon=True)
        self.secured = secure is not None
        self.inbox = inbox
        self.outbox_endpoint = f"inproc://lstmd-outbox-{id(self)}"
        self._stop_requested = threading.Event()
        self.control = _router(ctx)
        self.outbox = ctx.socket(zmq.PULL)
        self.outbox.bind(self.outbox_endpoint)
        self.publisher = None
        self.subscribers = 0  # subscriptions seen on the XPUB; predictions are published only when > 0
        try:
            self.endpoints = {"control": _bind(self.control, control_endpoint, "control", secure)}
            if publish_endpoint:
                self.publisher = ctx.socket(zmq.XPUB)
                self.publisher.setsockopt(zmq.LINGER, 0)
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
        for sock in (self.control, self.outbox, self.publisher):
            if sock is not None:
                sock.close()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        if self.publisher is not None:
            poller.register(self.publisher, zmq.POLLIN)
        try:
            while not self._stop_requested.is_set():
                ready = dict(poller.poll(50))
                if self.outbox in ready:
                    self._drain_outbox()
                if self.control in ready:
                    self._receive_control()
                if self.publisher is not None and self.publisher in ready:
                    self._receive_subscriptions()
            self._drain_outbox()  # answer what the loop handed back before it stopped
        finally:
            self.close()

    def _receive_control(self) -> None:
        for frames in _waiting(self.control):
            envelope, body = _split_envelope(frames)
            try:
                if len(body) != 1:
                    raise ValueError(f"expected one frame, got {len(body)}")
                request = protocol.control_request_decoder.decode(body[0].bytes)
                if request.v != protocol.PROTOCOL_VERSION:
                    raise ValueError(f"unknown protocol version {request.v}")
            except (ValueError, msgspec.DecodeError) as exc:
                reply = protocol.ControlReply(ok=False, error=f"malformed control request: {exc}")
                self.control.send_multipart([*envelope, protocol.encode(reply)])
                continue
            # With CURVE, libzmq tags each frame with the ZAP User-Id: the role of the client's key.
            role = body[0].get("User-Id") if self.secured else None
            self.inbox.put(ControlMessage(envelope, request, role))

    def _receive_subscriptions(self) -> None:
        for frames in _waiting(self.publisher):
            msg = frames[0].bytes
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)

    def _drain_outbox(self) -> None:
        for frames in _waiting(self.outbox):
            kind = frames[0].bytes
            if kind == CONTROL:
                self.control.send_multipart(frames[1:], copy=False)
            elif kind == PUBLISH and self.publisher is not None:
                self._publish(frames[1:])

    def _publish(self, frames: list) -> None:
        """frames: [msgpack (streams, seqs, version), predictions [n, O] float32] → one PUB message per event."""
        streams, seqs, version = msgspec.msgpack.decode(frames[0].bytes)
        preds = np.frombuffer(frames[1].buffer, dtype=protocol.FEATURE_DTYPE).reshape(len(streams), -1)
        encode = protocol.encode
        for stream, seq, pred in zip(streams, seqs, preds, strict=True):
            header = encode(protocol.Published(stream=stream, seq=seq, version=version))
            self.publisher.send_multipart([str(stream).encode(), header, pred.tobytes()])
