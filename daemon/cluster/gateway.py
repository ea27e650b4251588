"""`lstmd gateway`: the stateless ZeroMQ front of a cluster, with the events wire protocol of `lstmd serve`.

One producer message becomes one log record per key group it touches (daemon/cluster/log.py), published to
JetStream with a Nats-Msg-Id built from its (stream, seq) pairs, so a retried publish is stored once. The owning
replicas answer each record on this gateway's reply subject; when every key group of a message has answered,
the producer gets one EventsReply in its own event order, exactly as from a single daemon (a record rejected
whole marks its events rejected with that reason). Nothing else is kept: several gateways may run at once,
and a gateway that dies loses only the requests in flight, which their producers resend.

- Decoding and the socket are `daemon/io.py`'s EventsSocket: the same limits, budgets and error replies.
- Sequence numbers the producer left out stay out: the owning replica assigns them in log order (see
  daemon/cluster/replica.py), which a stateless gateway could not do for a stream shared with another gateway.
- A resend JetStream reports as already stored (its Nats-Msg-Id within the duplicate window) is published again
  under a unique id: the owner then answers it `duplicate` with the first copy's prediction (its resend
  window), instead of the producer waiting for an answer that would never come.
- Delayed targets (`Producer.send_targets`) travel like events: one log record per key group, keyed by their
  (stream, seq) pairs (Nats-Msg-Id prefixed `t:` so a target never collides with its own event's id), answered
  by the owning replica's join; a forecast, which changes nothing and needs no log, is refused (`unsupported`).
- Security: with `[security] server_secret_key` the events socket is a CURVE server with the ZAP handler of
  `lstmd serve` (daemon/auth.py: the same key directories, roles, reload on SIGHUP and refusals counted in
  `lstmd_auth_failures_total`); any known key (producer or admin) may send events. Without keys, a non-loopback
  `serve.events` is refused unless `security.allow_insecure`, as in `lstmd serve`.
- Metrics (`daemon/metrics.py` GatewayMetrics) on `serve.metrics`: requests in flight (messages and bytes),
  requests by outcome, their duration, events by kind, JetStream duplicates, auth refusals; /healthz turns
  503 while the NATS connection is down.
- Threads: this loop owns the events socket; the NATS link's loop publishes and receives the answers, and hands
  each finished reply back over an inproc PUSH/PULL pair (ZeroMQ sockets are used by one thread each).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq
from lstmd.clients import protocol
from lstmd.daemon.auth import AuthError, Security, insecure_endpoints
from lstmd.daemon.cluster import log as clog
from lstmd.daemon.cluster.natsauth import connect_options
from lstmd.daemon.io import EventsBudgets, EventsSocket, ForecastMessage, TargetsMessage
from lstmd.daemon.metrics import GatewayMetrics
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("lstmd.gateway")

_POLL_MS = 100
# A request whose answers have not all come by then is forgotten: its producer timed out and resent long ago.
_FORGET_AFTER_S = 120.0


@dataclass
class _Pending:
    """A producer message waiting for its key groups' answers."""

    envelope: list
    req: int
    n: int
    parts: dict[int, np.ndarray]  # key group -> the message's event indices in it, until it answers
    started: float
    status: np.ndarray = field(init=False)
    preds: np.ndarray | None = None  # [n, O], allocated at the first answer with predictions
    reasons: dict[int, str] = field(default_factory=dict)
    version: int = 0
    nbytes: int = 0
    targets: bool = False  # a delayed-targets message: its reply has no predictions frame

    def __post_init__(self) -> None:
        self.status = np.full(self.n, protocol.REJECTED, dtype=np.uint8)


class Gateway:
    def __init__(self, config, registry=None) -> None:
        """registry: the Prometheus registry of its metrics (a fresh one when None)."""
        self.config = config
        self.id = f"gw-{uuid.uuid4().hex[:12]}"
        self.reply_subject = f"{clog.REPLY_PREFIX}{self.id}"
        self.groups = config.cluster.key_groups
        self.endpoint: str | None = None
        self._pending: dict[int, _Pending] = {}
        # Bytes of requests forwarded and finished: each counter written by one thread only (this loop, the NATS
        # link's), so no update is lost; their difference is what is in flight, against serve.max_inflight_bytes.
        self._forwarded_bytes = 0
        self._finished_bytes = 0
        self.max_inflight_bytes = config.serve.max_inflight_bytes
        self._tokens = itertools.count()
        self._stopping = threading.Event()
        self._ctx: zmq.Context | None = None
        self.link: clog.NatsLink | None = None
        self.security: Security | None = None
        self.metrics = GatewayMetrics(registry)
        self._http = None
        self.metrics_endpoint: str | None = None

    def start(self) -> None:
        """Connect to the cluster (its log must exist or is created with this G), bind the events socket (CURVE
        with `[security]`) and the metrics endpoint. Raises ClusterError, AuthError or BindError saying why not."""
        cluster, serve = self.config.cluster, self.config.serve
        self._check_security()
        self.link = clog.NatsLink(cluster.nats, self.id, connect_options(cluster))
        try:
            clog.open_log(self.link, self.groups)
            self._ctx = zmq.Context()
            secure = None
            if self.security is not None:  # ZAP first: a CURVE socket must never accept before it can ask
                self.security.start(self._ctx)
                secure = self.security.secure
            self.events = EventsSocket(
                self._ctx,
                serve.events,
                self.config.model.input_size,
                serve.max_message_events,
                serve.max_message_bytes,
                on_message_rejected=lambda reason: self.metrics.rejections.labels(reason).inc(),
                max_stream_id_length=serve.max_stream_id_length,
                budgets=EventsBudgets(serve.max_inflight_bytes, serve.max_peer_inflight_bytes),
                secure=secure,
            )
            if self.security is None:  # no handshakes to count: nobody reads its connection events
                self.events.sock.disable_monitor()
                self.events.monitor.close(linger=0)
                self.events.monitor = None
            self.endpoint = self.events.endpoint
            self._done = self._ctx.socket(zmq.PULL)
            done_endpoint = f"inproc://{self.id}"
            self._done.bind(done_endpoint)
            self._done_push = self._ctx.socket(zmq.PUSH)  # used on the NATS link's thread only
            self._done_push.setsockopt(zmq.SNDHWM, 0)
            self._done_push.connect(done_endpoint)
            self.link.run(self.link.nc.subscribe(self.reply_subject, cb=self._on_answer))
            self._serve_metrics()
        except BaseException:
            self.close()
            raise
        log.info("lstmd gateway %s: events %s, cluster %s (%d key groups)", self.id, self.endpoint, cluster.nats,
                 self.groups)

    def _check_security(self) -> None:
        """Load `[security]`'s keys, or refuse a non-loopback events endpoint without them (as `lstmd serve`)."""
        sec = self.config.security
        if sec.server_secret_key:
            self.security = Security(sec, lambda reason: self.metrics.auth_failures.labels(reason=reason).inc())
            return
        exposed = insecure_endpoints({"events": self.config.serve.events})
        if exposed and not sec.allow_insecure:
            raise AuthError(
                f"refusing to bind {exposed[0]} without security: anyone who reaches it could send events to the "
                "cluster. Set [security] keys (docs/operations.md, Security), bind 127.0.0.1, or set "
                "security.allow_insecure = true"
            )

    def _serve_metrics(self) -> None:
        m = self.metrics
        m.inflight_bytes.set_function(lambda: self.inflight_bytes)
        m.inflight_requests.set_function(lambda: len(self._pending))
        m.inflight_limit.set(self.max_inflight_bytes)
        m.set_build_info(importlib.metadata.version("lstmd"), "gateway", "none")
        m.add_health_check("nats", lambda: "" if self.link and self.link.nc.is_connected else "NATS connection down")
        address = self.config.serve.metrics
        if address:
            try:
                self._http = m.serve_http(address)
            except (OSError, ValueError) as exc:
                why = getattr(exc, "strerror", None) or exc
                raise clog.ClusterError(f"cannot serve metrics on {address}: {why}") from None
            self.metrics_endpoint = f"{address.rpartition(':')[0]}:{self._http.server_port}"
        m.set_ready(True)

    def reload_keys(self) -> None:
        """SIGHUP: re-read the client key directories (daemon/auth.py), from any thread."""
        if self.security is not None:
            self.security.request_reload()

    @property
    def inflight_bytes(self) -> int:
        return self._forwarded_bytes - self._finished_bytes

    def request_stop(self) -> None:
        self._stopping.set()

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.events.sock, zmq.POLLIN)
        poller.register(self._done, zmq.POLLIN)
        if self.events.monitor is not None:
            poller.register(self.events.monitor, zmq.POLLIN)
        last_sweep = time.monotonic()
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(_POLL_MS))
                if self.events.monitor is not None and self.events.monitor in ready:
                    self._handshakes()
                if self._done in ready:
                    while True:
                        try:
                            frames = self._done.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.events.send(frames)
                # Requests forwarded and not yet answered stay within serve.max_inflight_bytes; beyond it they
                # wait in the events socket, whose own budgets answer the excess `overloaded`.
                if self.events.sock in ready or self.events.pending():
                    while self.inflight_bytes < self.max_inflight_bytes and (message := self.events.take()):
                        self._forward(message)
                if time.monotonic() - last_sweep > 10:
                    last_sweep = time.monotonic()
                    self.link.loop.call_soon_threadsafe(self._forget_stale)
        finally:
            self.close()

    def _handshakes(self) -> None:
        """Count handshakes that failed before ZAP (a plain client, a wrong server key), as the daemon's I/O
        thread does for its events socket."""
        while self.events.monitor.poll(0):
            event = recv_monitor_message(self.events.monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.security.handshake_failed(event)

    def start_in_thread(self) -> threading.Thread:
        self.start()
        thread = threading.Thread(target=self.serve_forever, name="lstmd-gateway", daemon=True)
        thread.start()
        self._thread = thread
        return thread

    def stop_and_join(self, timeout: float = 10.0) -> None:
        self.request_stop()
        self._thread.join(timeout)

    def close(self) -> None:
        self.metrics.set_ready(False)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self.link is not None:
            self.link.close()
            self.link = None
        if self._ctx is not None:
            if hasattr(self, "events"):
                if self.events.monitor is not None:
                    self.events.monitor.close(linger=0)
                self.events.close()  # lingers a second: the last replies go out
            for name in ("_done", "_done_push"):
                if hasattr(self, name):
                    getattr(self, name).close(linger=0)
            if self.security is not None:
                self.security.stop()
            self._ctx.term()
            self._ctx = None

    # ---- producer messages into the log (this loop's thread) ---------------------------------------------

    def _reject(self, message, reason: str, why: str) -> None:
        self.metrics.requests.labels("rejected").inc()
        reply = protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=message.header.req, error=why,
                                     error_reason=reason)
        self.events.send([*message.envelope, protocol.encode(reply)])

    def _forward(self, message) -> None:
        if isinstance(message, ForecastMessage):
            self._reject(message, "unsupported", "forecasts are not served through a cluster gateway: ask the "
                         "replica that owns the stream (lstmd cluster status) with Admin.forecast")
            return
        if isinstance(message, TargetsMessage):
            self._forward_targets(message)
            return
        self.metrics.events.labels("events").inc(len(message.header.streams))
        header = message.header
        streams = header.streams
        groups = np.fromiter((clog.key_group(s, self.groups) for s in streams), dtype=np.int64, count=len(streams))
        token = next(self._tokens)
        parts = {int(g): np.flatnonzero(groups == g) for g in np.unique(groups)}
        pending = _Pending(message.envelope, header.req, len(streams), dict(parts), time.monotonic(),
                           nbytes=message.nbytes)
        self._pending[token] = pending
        self._forwarded_bytes += pending.nbytes
        records = []
        for group, idx in parts.items():
            seqs = None if header.seqs is None else [header.seqs[i] for i in idx.tolist()]
            frames = protocol.encode_events(
                token,
                [streams[i] for i in idx.tolist()],
                message.features[idx],
                None if message.targets is None else message.targets[idx],
                seqs,
            )
            record = clog.LogRecord(self.reply_subject, token, bytes(frames[0]), bytes(frames[1]),
                                    bytes(frames[2]) if len(frames) > 2 else None)
            msg_id = clog.message_id([streams[i] for i in idx.tolist()], seqs, f"{self.id}:{token}:{group}")
            records.append((group, clog.log_record_codec[0].encode(record), msg_id))
        # One hand-over to the NATS thread per producer message, its records published concurrently there.
        self.link.submit(self._publish_all(token, records))

    def _forward_targets(self, message: TargetsMessage) -> None:
        """Delayed targets into the log, one record per key group (module docstring); the record's frames are the
        wire's own [header, targets], so the replica decodes them as its events socket would."""
        header = message.header
        streams, seqs = header.streams, header.seqs
        self.metrics.events.labels("targets").inc(len(streams))
        groups = np.fromiter((clog.key_group(s, self.groups) for s in streams), dtype=np.int64, count=len(streams))
        token = next(self._tokens)
        parts = {int(g): np.flatnonzero(groups == g) for g in np.unique(groups)}
        pending = _Pending(message.envelope, header.req, len(streams), dict(parts), time.monotonic(),
                           nbytes=message.nbytes, targets=True)
        self._pending[token] = pending
        self._forwarded_bytes += pending.nbytes
        records = []
        for group, idx in parts.items():
            part_streams = [streams[i] for i in idx.tolist()]
            part_seqs = [seqs[i] for i in idx.tolist()]
            frames = protocol.encode_targets(token, part_streams, part_seqs, message.targets[idx])
            record = clog.LogRecord(self.reply_subject, token, bytes(frames[0]), bytes(frames[1]))
            msg_id = "t:" + clog.message_id(part_streams, part_seqs, "")
            records.append((group, clog.log_record_codec[0].encode(record), msg_id))
        self.link.submit(self._publish_all(token, records))

    # ---- the NATS link's thread -------------------------------------------------------------------------

    async def _publish_all(self, token: int, records: list) -> None:
        await asyncio.gather(*(self._publish(token, *record) for record in records))

    async def _publish(self, token: int, group: int, payload: bytes, msg_id: str) -> None:
        js = self.link.js
        try:
            ack = await js.publish(clog.subject(group), payload, headers={"Nats-Msg-Id": msg_id})
            if ack.duplicate:  # a resend already in the log: have its owner answer it (module docstring)
                self.metrics.duplicates.inc()
                await js.publish(clog.subject(group), payload, headers={"Nats-Msg-Id": f"{self.id}:{token}:{group}"})
        except Exception as exc:
            pending = self._pending.pop(token, None)
            if pending is not None:
                self._finished(pending, "unavailable")
                reply = protocol.EventsReply(
                    v=protocol.PROTOCOL_VERSION,
                    req=pending.req,
                    error=f"the cluster's log did not take the events ({type(exc).__name__}: {exc}); some may have "
                    "been applied: resend them with the same sequence numbers",
                    error_reason="unavailable",
                )
                self._done_push.send_multipart([*pending.envelope, protocol.encode(reply)])

    def _on_answer_sync(self, data: bytes) -> None:
        answer = clog.reply_record_codec[1].decode(data)
        pending = self._pending.get(answer.token)
        if pending is None:
            return  # answered already (a replayed record after a failover) or forgotten
        idx = pending.parts.pop(answer.group, None)
        if idx is None:
            return
        reply = protocol.events_reply_decoder.decode(answer.reply)
        if reply.error is not None:
            for i in idx.tolist():
                pending.reasons[i] = reply.error
        else:
            pending.status[idx] = np.frombuffer(reply.status, dtype=np.uint8)
            if pending.preds is None:
                pending.preds = np.full((pending.n, reply.out_dim), np.nan, dtype=np.float32)
            pending.preds[idx] = np.frombuffer(answer.predictions, dtype=np.float32).reshape(len(idx), reply.out_dim)
            for i, why in reply.reasons.items():
                pending.reasons[int(idx[i])] = why
            pending.version = max(pending.version, reply.version)
        if pending.parts:
            return
        del self._pending[answer.token]
        self._finished(pending, "answered")
        preds = pending.preds
        if preds is None:
            preds = np.full((pending.n, self.config.model.output_size), np.nan, dtype=np.float32)
        reply = protocol.EventsReply(
            v=protocol.PROTOCOL_VERSION,
            req=pending.req,
            version=pending.version,
            out_dim=preds.shape[1],
            status=pending.status.tobytes(),
            reasons=pending.reasons,
        )
        tail = [] if pending.targets else [preds.tobytes()]  # as the daemon answers targets: no predictions
        self._done_push.send_multipart([*pending.envelope, protocol.encode(reply), *tail])

    def _finished(self, pending: _Pending, outcome: str) -> None:
        """A request leaves the in-flight budget (NATS link's thread), counted by outcome with its duration."""
        self._finished_bytes += pending.nbytes
        self.metrics.requests.labels(outcome).inc()
        self.metrics.request_duration.observe(time.monotonic() - pending.started)

    async def _on_answer(self, msg) -> None:
        try:
            self._on_answer_sync(msg.data)
        except Exception:  # one bad answer must not stop the subscription
            log.exception("an answer on %s could not be used", self.reply_subject)

    def _forget_stale(self) -> None:
        cutoff = time.monotonic() - _FORGET_AFTER_S
        for token in [t for t, p in list(self._pending.items()) if p.started < cutoff]:
            self._finished(self._pending.pop(token), "forgotten")
