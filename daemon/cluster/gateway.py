"""`lstmd gateway`: the stateless ZeroMQ front of a cluster, with the events wire protocol of `lstmd serve`.

Producer messages become log records (daemon/cluster/log.py): whatever the events socket holds when this loop
wakes up is taken at once, and its events go to one record per log partition (several producer messages
coalesced into one record: JetStream's cost is per message, not per event), published with async
acknowledgements, all in flight together. Each record's Nats-Msg-Id is built from its (stream, seq) pairs, so a
retried publish is stored once. The owning replicas answer on this gateway's reply subject, per event (the
token of its producer message and its index there), in batches; when every event of a producer message is
answered, the producer gets one EventsReply in its own event order, exactly as from a single daemon (events of
a record rejected whole are rejected with that reason). An event answered twice (a record replayed after a
failover) keeps its first answer. Nothing else is kept: several gateways may run at once, and a gateway that
dies loses only the requests in flight, which their producers resend.

- Decoding and the socket are `daemon/io.py`'s EventsSocket: the same limits, budgets and error replies.
- Coalescing adds no wait: a record holds what arrived while the previous records were being published, so an
  idle gateway publishes a message at once and a busy one publishes fewer, larger records.
- A record holds producer messages of one kind only (events, delayed targets or forecasts; numbered or not, the
  same targets frame, the same horizon and exog width), in arrival order, at most serve.max_message_events
  events. With model.output = "end" each event's sequence-end flag travels in the record's header with the event
  (False for messages that marked none), so its owner, and any replay of the record after a failover, ends the
  same sequences as a single daemon and its WAL; the answers carry the FLAG_* bits (no_output, sequence start)
  back to the producer. With model.output = "every" the events socket refuses end flags (ends_not_served), as
  `lstmd serve` does.
- Sequence numbers the producer left out stay out: the owning replica assigns them in log order (see
  daemon/cluster/replica.py), which a stateless gateway could not do for a stream shared with another gateway.
- A resend JetStream reports as already stored (its Nats-Msg-Id within the duplicate window) is published again
  under a unique id: the owner then answers it `duplicate` with the first copy's prediction (its resend
  window), instead of the producer waiting for an answer that would never come.
- Delayed targets (`Producer.send_targets`) travel like events, coalesced into records of their own kind
  (header kind "targets", the targets as the second frame: the wire's own request), keyed by their (stream, seq)
  pairs (Nats-Msg-Id prefixed `t:` so a target never collides with its own event's id), answered per producer
  message by the owning replicas' joins like events (no predictions frame, as the daemon answers them).
- Forecasts (`Producer.forecast`) go through the log too, as records of kind "forecast" (the streams, the
  horizon, the exog as the second frame), not as a request to the owner over a NATS subject. Why: a forecast
  must see every event its producer was already answered for, and the log gives that for free. An answered
  event's record is in the log before the forecast's record is published, and an owner applies a key group's
  records in log order, answering a forecast record between two batches (daemon/server.py) after every record
  before it; after a move or a death the next owner restores the group's snapshot and replays from there, so it
  reaches the forecast only after the same events. A direct request would race a new owner still replaying,
  and would need its own routing, retries and fencing, which the log records already have. The price: one log
  message per forecast (JetStream stores and trims it like any record) and a replay recomputes the forecasts it
  passes (their answers then come second and are dropped here). A request wrong whole (task, horizon, exog,
  size) is refused here with the daemon's own check (daemon/forecast.py `check_request`, reason
  `bad_forecast`; a non-forecast model's `not_forecast` at decoding), from this gateway's [model] config, so a
  replica never refuses one whole; per stream, each owner answers ok or rejected (unknown stream, reset) exactly
  as a single daemon. A forecast whose owners do not all answer within cluster.forecast_timeout_s (a replica
  died and its lease has not expired yet, a slow replay, no replica at all) is answered `unavailable`, naming
  the unanswered key groups, their owners and whether those are alive; asking again is always safe.
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
from lstmd.daemon import forecast as forecasts
from lstmd.daemon.auth import AuthError, Security, insecure_endpoints
from lstmd.daemon.cluster import log as clog
from lstmd.daemon.cluster import ownership as own
from lstmd.daemon.cluster.membership import MEMBERS_BUCKET, lease_held
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
    """A producer message waiting for its events' answers."""

    envelope: list
    req: int
    n: int
    started: float
    nbytes: int
    left: int = field(init=False)  # events not answered yet
    answered: np.ndarray = field(init=False)
    status: np.ndarray = field(init=False)
    preds: np.ndarray | None = None  # [n, O], allocated at the first answer
    reasons: dict[int, str] = field(default_factory=dict)
    version: int = 0
    targets: bool = False  # a delayed-targets message: its reply has no predictions frame
    out_dim: int = 0  # prediction width of its reply: O, horizon * O for a forecast
    streams: list | None = None  # a forecast's streams: named when its owners do not answer in time
    flags: np.ndarray | None = None  # [n] FLAG_* bits (model.output = "end"), allocated at the first flags

    def __post_init__(self) -> None:
        self.left = self.n
        self.answered = np.zeros(self.n, dtype=bool)
        self.status = np.full(self.n, protocol.REJECTED, dtype=np.uint8)

    def answer(self, idx: np.ndarray, status: np.ndarray, preds: np.ndarray, reasons: dict[int, str],
               version: int, flags: np.ndarray | None = None) -> None:
        """Events `idx` answered; `reasons` by position in `idx`. Events answered before keep their answer."""
        new = ~self.answered[idx]
        if not new.all():
            keep = np.flatnonzero(new)
            reasons = {j: reasons[i] for j, i in enumerate(keep.tolist()) if i in reasons}
            idx, status, preds = idx[keep], status[keep], preds[keep]
            flags = None if flags is None else flags[keep]
        if not len(idx):
            return
        if flags is not None:
            if self.flags is None:
                self.flags = np.zeros(self.n, dtype=np.uint8)
            self.flags[idx] = flags
        self.answered[idx] = True
        self.left -= len(idx)
        self.status[idx] = status
        if preds.shape[1]:  # none when every answered event was rejected whole
            if self.preds is None:
                self.preds = np.full((self.n, preds.shape[1]), np.nan, dtype=np.float32)
            self.preds[idx] = preds
        for i, why in reasons.items():
            self.reasons[int(idx[i])] = why
        self.version = max(self.version, version)


class Gateway:
    def __init__(self, config, registry=None) -> None:
        """registry: the Prometheus registry of its metrics (a fresh one when None)."""
        self.config = config
        self.id = f"gw-{uuid.uuid4().hex[:12]}"
        self.reply_subject = f"{clog.REPLY_PREFIX}{self.id}"
        self.groups = config.cluster.key_groups
        self.partitions = config.cluster.log_partitions
        self.key_groups = clog.KeyGroups(self.groups)
        self.max_record_events = min(config.serve.max_message_events, protocol.MAX_EVENTS)
        self._records = itertools.count()  # makes the Nats-Msg-Id of an unnumbered record unique
        self._publishing = asyncio.Lock()  # per-stream order: the log takes records in the order they were made
        self.endpoint: str | None = None
        self._pending: dict[int, _Pending] = {}
        self._tables = None  # (key group entries, members) KV buckets, opened at the first overdue forecast
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
            self.partitions = clog.open_log(self.link, self.groups, self.partitions)
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
                task=self.config.model.task,  # forecasts of another task refused at decoding, as by the daemon
                ends=self.config.model.output == "end",
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
                    self._forward_waiting()
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

    def _forward_waiting(self) -> None:
        """Every producer message waiting now (within serve.max_inflight_bytes) into the log, coalesced."""
        kinds: dict[tuple, list] = {}  # messages that can share a record: see the module docstring
        while self.inflight_bytes < self.max_inflight_bytes and (message := self.events.take()):
            forecast = isinstance(message, ForecastMessage)
            if forecast and (refusal := self._forecast_refusal(message)):
                self._reject(message, "bad_forecast", refusal)
                continue
            header = message.header
            if not header.streams:  # nothing to publish: answered here, as a daemon answers it
                reply = protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=header.req,
                                             out_dim=self.config.model.output_size)
                tail = [] if isinstance(message, TargetsMessage) else [b""]
                self.events.send([*message.envelope, protocol.encode(reply), *tail])
                continue
            targets = isinstance(message, TargetsMessage)
            self.metrics.events.labels("targets" if targets else "forecasts" if forecast else "events").inc(
                len(header.streams))
            token = next(self._tokens)
            out_dim = 0 if targets else self.config.model.output_size * (header.horizon if forecast else 1)
            pending = _Pending(message.envelope, header.req, len(header.streams), time.monotonic(), message.nbytes,
                               targets=targets, out_dim=out_dim, streams=header.streams if forecast else None)
            self._pending[token] = pending
            self._forwarded_bytes += pending.nbytes
            if forecast:
                self.link.loop.call_soon_threadsafe(self._forecast_deadline, token)
            kind = (header.kind, header.seqs is None, header.targets, header.target_dim, header.horizon, header.dim)
            kinds.setdefault(kind, []).append((token, message))
        records = []
        for messages in kinds.values():
            records += self._records_of(messages)
        if records:  # one hand-over to the NATS thread, the records published concurrently there
            self.link.submit(self._publish_all(records))

    def _forecast_refusal(self, message: ForecastMessage) -> str | None:
        """Why a forecast request is wrong whole (the daemon's own check, against this gateway's [model]), or None."""
        m, serve = self.config.model, self.config.serve
        try:
            forecasts.check_request(m.task, message.header.horizon, len(message.header.streams), m.input_size,
                                    message.exog, serve.max_message_events, m.output_size, serve.max_message_bytes)
        except forecasts.ForecastError as exc:
            return str(exc)
        return None

    def _records_of(self, messages: list) -> list[tuple[int, bytes, str, np.ndarray]]:
        """(partition, payload, Nats-Msg-Id, tokens) of the records holding these messages' events (or delayed
        targets, or forecasts' streams): per log partition, in arrival order, at most max_record_events each."""
        first = messages[0][1]  # all of one kind (_forward_waiting): events or targets, numbered or not, ...
        kind = first.header.kind
        streams = list(itertools.chain.from_iterable(m.header.streams for _, m in messages))
        numbered = first.header.seqs is not None
        seqs = list(itertools.chain.from_iterable(m.header.seqs for _, m in messages)) if numbered else None
        counts = [len(m.header.streams) for _, m in messages]
        # Sequence ends (model.output = "end"): each event's flag kept with it, False where a message marked none
        ends = None
        if any(m.header.ends for _, m in messages):
            ends = list(itertools.chain.from_iterable(m.header.ends or [False] * n
                                                      for (_, m), n in zip(messages, counts, strict=True)))
        targets = None
        if getattr(first, "targets", None) is not None:
            targets = np.concatenate([m.targets.reshape(len(m.targets), -1) for _, m in messages])
        # The second frame: features of events; of a delayed-targets record, the targets themselves; of a
        # forecast record, the exog rows [horizon * I] (none: an empty frame). The wire's own frames, so the
        # replica decodes it as its events socket would.
        if kind == "targets":
            body, targets = targets, None
        elif kind == "forecast":
            exog = [m.exog for _, m in messages]
            body = (np.empty((len(streams), 0), np.float32) if exog[0] is None
                    else np.concatenate([e.reshape(len(e), -1) for e in exog]))
        else:
            body = np.concatenate([m.features for _, m in messages])
        tokens = np.repeat(np.array([t for t, _ in messages], dtype=clog.TOKEN_DTYPE), counts)
        index = np.concatenate([np.arange(n, dtype=clog.INDEX_DTYPE) for n in counts])
        groups = self.key_groups.of(streams)
        partition = groups % self.partitions
        order = np.argsort(partition, kind="stable")  # stable: arrival order within a partition
        bounds = np.flatnonzero(np.diff(partition[order])) + 1
        # A target never shares a Nats-Msg-Id with its own event's record (the same (stream, seq) pairs)
        prefix = "t:" if kind == "targets" else ""
        records = []
        for run in np.split(order, bounds):
            for start in range(0, len(run), self.max_record_events):
                idx = run[start : start + self.max_record_events]
                pick = idx.tolist()
                ids = [streams[i] for i in pick]
                ev_seqs = None if seqs is None else [seqs[i] for i in pick]
                # The header made directly: the producers' messages were checked when decoded
                header = protocol.encode(protocol.EventsHeader(
                    v=protocol.PROTOCOL_VERSION, req=0, streams=ids, dim=first.header.dim, seqs=ev_seqs,
                    targets=first.header.targets, target_dim=first.header.target_dim, kind=kind,
                    horizon=first.header.horizon, ends=None if ends is None else [ends[i] for i in pick]))
                record = clog.LogRecord(self.reply_subject, header, body[idx].tobytes(),
                                        None if targets is None else targets[idx].tobytes(), groups[idx].tobytes(),
                                        tokens[idx].tobytes(), index[idx].tobytes())
                msg_id = prefix + clog.message_id(ids, ev_seqs, header, f"{self.id}:{next(self._records)}")
                records.append((int(partition[idx[0]]), clog.log_record_codec[0].encode(record), msg_id,
                                tokens[idx]))
        return records

    # ---- the NATS link's thread -------------------------------------------------------------------------

    async def _publish_all(self, records: list) -> None:
        """Publish every record with its acknowledgement outstanding, then gather the acknowledgements."""
        js = self.link.js
        sent = []
        async with self._publishing:  # a publish may wait for the socket: the next batch must not overtake it
            for partition, payload, msg_id, tokens in records:
                try:
                    ack = await js.publish_async(clog.subject(partition), payload, headers={"Nats-Msg-Id": msg_id})
                except Exception as exc:
                    self._fail(tokens, exc)
                    continue
                sent.append((ack, partition, payload, tokens))
        if not sent:
            return
        await asyncio.wait([ack for ack, *_ in sent], timeout=clog.REQUEST_TIMEOUT_S)
        for ack, partition, payload, tokens in sent:
            try:
                if not ack.done():
                    ack.cancel()
                    raise TimeoutError(f"no acknowledgement within {clog.REQUEST_TIMEOUT_S:g} s")
                if ack.result().duplicate:  # a resend already in the log: have its owner answer it (docstring)
                    self.metrics.duplicates.inc()
                    unique = f"{self.id}:{next(self._records)}"
                    await js.publish(clog.subject(partition), payload, headers={"Nats-Msg-Id": unique})
            except Exception as exc:
                self._fail(tokens, exc)

    def _fail(self, tokens: np.ndarray, exc: BaseException) -> None:
        """A record the log did not take: its producer messages are answered `unavailable`."""
        for token in np.unique(tokens).tolist():
            pending = self._pending.pop(token, None)
            if pending is None:
                continue
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
        batch = clog.reply_batch_codec[1].decode(data)
        tokens = np.frombuffer(batch.tokens, dtype=clog.TOKEN_DTYPE)
        index = np.frombuffer(batch.index, dtype=clog.INDEX_DTYPE)
        status = np.frombuffer(batch.status, dtype=np.uint8)
        preds = np.frombuffer(batch.predictions, dtype=np.float32).reshape(len(tokens), batch.out_dim)
        flags = np.frombuffer(batch.flags, dtype=np.uint8) if len(batch.flags) == len(tokens) else None
        # Runs of one producer message (a replica answers a record's events in their order)
        bounds = [0, *(np.flatnonzero(np.diff(tokens)) + 1).tolist(), len(tokens)]
        reasons: dict[int, dict[int, str]] = {}
        if batch.reasons:
            runs = np.searchsorted(bounds, list(batch.reasons), side="right") - 1
            for (pos, why), run in zip(batch.reasons.items(), runs.tolist(), strict=True):
                reasons.setdefault(run, {})[pos - bounds[run]] = why
        for run, (a, b) in enumerate(itertools.pairwise(bounds)):
            token = int(tokens[a])
            pending = self._pending.get(token)
            if pending is None:
                continue  # answered already (a replayed record after a failover) or forgotten
            pending.answer(index[a:b], status[a:b], preds[a:b], reasons.get(run, {}), batch.version,
                           None if flags is None else flags[a:b])
            if not pending.left:
                del self._pending[token]
                self._finished(pending, "answered")
                self._reply(pending)

    def _reply(self, pending: _Pending) -> None:
        preds = pending.preds
        if preds is None:
            preds = np.full((pending.n, pending.out_dim), np.nan, dtype=np.float32)
        reply = protocol.EventsReply(
            v=protocol.PROTOCOL_VERSION,
            req=pending.req,
            version=pending.version,
            out_dim=0 if pending.targets else preds.shape[1],
            status=pending.status.tobytes(),
            reasons=pending.reasons,
            flags=b"" if pending.flags is None else pending.flags.tobytes(),
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

    def _forecast_deadline(self, token: int) -> None:
        """A forecast just forwarded: answered `unavailable` if its owners have not answered in time (module
        docstring). On the NATS link's thread, where answers are taken."""
        self.link.loop.call_later(self.config.cluster.forecast_timeout_s, self._forecast_overdue, token)

    def _forecast_overdue(self, token: int) -> None:
        pending = self._pending.pop(token, None)  # popped now: an answer arriving meanwhile finds nothing to do
        if pending is not None:
            self.link.loop.create_task(self._answer_overdue(pending))

    async def _answer_overdue(self, pending: _Pending) -> None:
        """Answer a forecast its owners left unanswered, naming them (read from the ownership table)."""
        waited = self.config.cluster.forecast_timeout_s
        missing = np.flatnonzero(~pending.answered).tolist()
        groups = sorted({clog.key_group(pending.streams[i], self.groups) for i in missing})
        try:
            owners = await self._owners(groups)
        except Exception as exc:  # the table unreadable: the answer says so instead of naming the owners
            owners = f"their owners could not be read ({type(exc).__name__}: {exc})"
        self._finished(pending, "timed_out")
        shown = ", ".join(repr(pending.streams[i]) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        reply = protocol.EventsReply(
            v=protocol.PROTOCOL_VERSION,
            req=pending.req,
            error=f"no answer within cluster.forecast_timeout_s = {waited:g} s for {len(missing)} of {pending.n} "
            f"streams ({shown}): {owners}. A replica that died hands its key groups over once its lease "
            f"(cluster.lease_ttl = {self.config.cluster.lease_ttl:g} s) expires and its successor has replayed "
            "them; a forecast changes nothing, so ask again",
            error_reason="unavailable",
        )
        self._done_push.send_multipart([*pending.envelope, protocol.encode(reply)])

    async def _owners(self, groups: list[int]) -> str:
        """Who owns key groups `groups` and whether they are alive, in words (at most five groups named)."""
        from nats.js.errors import BucketNotFoundError

        if self._tables is None:  # bound, never created here: no bucket means no replica ever joined
            try:
                self._tables = (await self.link.js.key_value(own.GROUPS_BUCKET),
                                await self.link.js.key_value(MEMBERS_BUCKET))
            except BucketNotFoundError:
                return "no replica has joined this cluster yet"
        kv, members_kv = self._tables
        entries = await asyncio.gather(*(own.read_entry(kv, g) for g in groups[:5]))
        owners = sorted({entry.owner for entry, _ in entries if entry is not None and entry.owner})
        # Each owner's own heartbeat entry, asked of the server (not a listing of the members, which may miss one)
        alive = {m for m, held in zip(owners, await asyncio.gather(*(lease_held(members_kv, m) for m in owners)),
                                      strict=True) if held}
        words = []
        for group, (entry, _) in zip(groups, entries, strict=False):
            if entry is None:
                state = "never owned yet"
            elif not entry.owner:
                state = "no owner (released, not yet claimed)"
            else:
                state = f"owner {entry.owner}" + ("" if entry.owner in alive else ", not alive: its lease expired")
            words.append(f"key group {group}: {state}")
        more = f" and {len(groups) - 5} more key groups" if len(groups) > 5 else ""
        return "; ".join(words) + more

    def _forget_stale(self) -> None:
        cutoff = time.monotonic() - _FORGET_AFTER_S
        for token in [t for t, p in list(self._pending.items()) if p.started < cutoff]:
            self._finished(self._pending.pop(token), "forgotten")
