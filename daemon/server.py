"""The daemon: binds the sockets, owns the serving loop, and runs control commands between batches.

The shape of vLLM's engine core: this loop alone owns the state store, the model and the counters, so none of them
needs a lock. It reads and answers the events socket itself (daemon/io.py's EventsSocket); the I/O thread brings
control requests through the inbox and sends control replies and published predictions. A signal handler only
calls `request_stop()`, which puts a sentinel on the inbox.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zmq
from lstmd.clients import protocol
from lstmd.daemon import control
from lstmd.daemon import forecast as forecasts
from lstmd.daemon.auth import AuthError, Security, insecure_endpoints
from lstmd.daemon.config import Config
from lstmd.daemon.engine import Engine, pick_device
from lstmd.daemon.io import (
    CONTROL,
    PUBLISH,
    ControlMessage,
    EventsBudgets,
    EventsMessage,
    EventsSocket,
    ForecastMessage,
    IOThread,
    PublishBudget,
    TargetsMessage,
)
from lstmd.daemon.keras_import import convert_keras, is_keras_bytes
from lstmd.daemon.metrics import Metrics
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import guard_summary
from lstmd.daemon.pipeline import AppliedBatch, Pipeline
from lstmd.daemon.recovery import Durability, RecoveryError, SnapshotComponent
from lstmd.daemon.state_lock import StateDirLocked, StateLock
from lstmd.daemon.state_store import StateStore
from lstmd.daemon.versions import ModelHistory
from lstmd.daemon.wal import WalError
from lstmd.kernels.tuning import SERVE_SWITCH_INTERVAL_S, adopt_torch_threads, limit_switch_interval

log = logging.getLogger("lstmd.daemon")

VERSION = "0.1.0"
_STOP = object()
# Events in a gathered batch from which the loop steps once no request is waiting instead of waiting out
# max_wait_ms. Nothing waiting means the loop is not saturated, so waiting buys no throughput; 256 halved the
# in-daemon p50 at half rate with no loss of throughput (docs/benchmarks.md, "Numbers once kept in comments").
_STEP_WITHOUT_WAITING = 256
# How long an idle loop blocks on the events socket before it looks at the inbox (control, stop) again.
_IDLE_POLL_MS = 5
# Messages libzmq queues per subscriber at least, whatever serve.publish_queue_bytes: small batches at a high rate
# would otherwise be dropped for a subscriber only a few milliseconds behind.
_MIN_PUBLISH_HWM = 16


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


@dataclass
class ServeStats:
    """Plain counters the loop fills; `lstmd status` reads them (Prometheus gets the same numbers)."""

    started: float = field(default_factory=time.time)
    batches: int = 0
    events: np.ndarray = field(default_factory=lambda: np.zeros(len(protocol.STATUS_NAMES), dtype=np.int64))
    rejections: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)  # "<what>_<reason>": dropped instead of queued


class Daemon:
    def __init__(self, config: Config, registry=None) -> None:
        self.config = config
        self.metrics = Metrics(registry)
        self.stats = ServeStats()
        try:
            self.device = pick_device(config.serve.device)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        model = self._initial_model()
        spec = model.spec
        self.store = StateStore(
            spec.num_layers,
            spec.hidden_size,
            config.state.capacity,
            self.device,
            idle_ttl_s=config.state.idle_ttl_s,
            on_full=config.state.on_full,
            remember_evicted=config.state.remember_evicted,
            evicted_false_positive_rate=config.state.evicted_false_positive_rate,
            on_evict=self._count_eviction,
            resend_window=config.serve.resend_window,
            output_size=spec.output_size,
        )
        self.engine = Engine(
            model,
            self.store,
            self.device,
            config.serve.backend,
            cpu_threads=config.serve.cpu_threads,
            step_threads=config.serve.step_threads,
            cuda_graphs=config.serve.cuda_graphs,
        )
        self.versions = ModelHistory(config.train.history)  # published versions, for rollback
        self.versions.add(self.engine.model, "initial")
        self.recorder, self.trainer = self._make_training(spec)
        self.pipeline = Pipeline(self.store, self.engine, self.metrics, config.serve, self.engine.task.batch_targets)
        self.pipeline.recorder = self.recorder
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.endpoints: dict[str, str] = {}
        self._stopping = False
        self._ctx: zmq.Context | None = None
        self.security: Security | None = None  # CurveZMQ keys and the ZAP thread, with [security] set
        self._io: IOThread | None = None
        self._events: EventsSocket | None = None
        self._backlog = 0  # requests the last gather found already waiting (lstmd_input_queue_depth_messages)
        self._published_batches = 0  # PublishedBatch.batch of the last batch handed to the publisher
        self._outbox: zmq.Socket | None = None
        self._http = None
        self._thread: threading.Thread | None = None
        self._state_lock: StateLock | None = None  # held from start() to the end of _shutdown()
        self._last_housekeeping = time.monotonic()
        self._last_guard_metrics = 0.0
        self.durability = self._make_durability(spec)  # WAL, snapshots, restore (daemon/recovery.py)

    def _make_durability(self, spec: ModelSpec) -> Durability:
        return Durability(
            self.config.durability,
            Path(self.config.state.dir),
            self.store,
            self.engine,
            self.pipeline,
            self.metrics,
            self._initial_model,
            self._snapshot_components(spec),
            self.recorder,
            self.trainer,
        )

    def _snapshot_components(self, spec: ModelSpec) -> dict[str, SnapshotComponent]:
        """The parts besides streams and model that every snapshot carries: training state and model history."""
        parts = {}
        if self.recorder is not None:
            parts["recorder"] = SnapshotComponent(self.recorder.snapshot_tensors, self.recorder.restore_tensors)
            parts["trainer"] = SnapshotComponent(self.trainer.snapshot_tensors, self.trainer.restore_tensors)
        parts["versions"] = SnapshotComponent(
            self.versions.snapshot_tensors, lambda tensors: self.versions.restore_tensors(tensors, spec)
        )
        return parts

    @property
    def spec(self) -> ModelSpec:
        return self.engine.model.spec

    def _initial_model(self) -> ServingModel:
        m = self.config.model
        spec = ModelSpec(m.input_size, m.hidden_size, m.num_layers, m.output_size, m.task, tuple(m.forecast_columns))
        if not m.path:
            return ServingModel.initial(spec, m.seed)
        try:
            data = Path(m.path).read_bytes()
            # a Keras .keras / .h5 file is converted exactly or refused (KerasImportError is a ValueError)
            model = convert_keras(data) if is_keras_bytes(data) else ServingModel.from_bytes(data)
        except OSError as exc:
            raise StartupError(f"model.path {m.path}: {exc.strerror}") from None
        except ValueError as exc:
            raise StartupError(f"model.path {m.path}: {exc}") from None
        if model.spec != spec:
            raise StartupError(f"model.path {m.path} does not fit the [model] config: {model.spec.mismatch(spec)}")
        return model

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Lock the state directory (one daemon per directory), then _start_locked(); a failed start unlocks it."""
        try:
            self._state_lock = StateLock.acquire(Path(self.config.state.dir))
        except StateDirLocked as exc:
            raise StartupError(str(exc)) from None
        try:
            self._start_locked()
        except BaseException:
            self._state_lock.release()
            raise

    def _start_locked(self) -> None:
        """Create the state directory, bind every socket and the metrics endpoint, start the I/O thread."""
        self._start_security()
        state_dir = self._writable_state_dir()
        serve = self.config.serve
        # Metrics first, with /readyz answering 503, so a long restore is observable; events sockets after the
        # restore, so nothing is served from a half-restored state.
        if serve.metrics:
            self._serve_metrics(serve.metrics)
        try:
            if not self.config.cluster.nats:  # a replica's state comes from the cluster's log (daemon/cluster/)
                self.durability.restore()
        except (RecoveryError, OSError) as exc:
            self._close_http()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(f"cannot restore the state in {state_dir}: {why}") from None
        self._bind_sockets()
        self._watch_io()
        limit_switch_interval(SERVE_SWITCH_INTERVAL_S)  # kernels/tuning.py says why
        self.metrics.capacity.set(self.config.state.capacity)
        self.metrics.model_version.set(self.engine.model.version)
        self.metrics.last_publish.set(time.time())  # the weights started serving now
        self.metrics.set_build_info(VERSION, self.engine.backend_name, str(self.device))
        self.metrics.watch_device_memory(self.device)
        (state_dir / "endpoints.json").write_text(json.dumps(self.endpoints))
        self._state_lock.record(self.endpoints)
        if self.trainer is not None:
            self.trainer.start()
            self.metrics.train_enabled.set(0 if self.trainer.paused else 1)
        self.metrics.set_ready(True)
        log.info(
            "lstmd %s serving (device %s, backend %s): %s",
            VERSION,
            self.device,
            self.engine.backend_name,
            ", ".join(f"{k} {self.endpoints.get(k) or 'off'}" for k in ("events", "control", "publish", "metrics")),
        )

    def _writable_state_dir(self) -> Path:
        state_dir = Path(self.config.state.dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            probe = state_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError(f"state.dir {state_dir} is not writable: {exc.strerror}") from None
        return state_dir

    def _serve_metrics(self, address: str) -> None:
        try:
            self._http = self.metrics.serve_http(address)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise StartupError(f"cannot serve metrics on {address}: {why}") from None
        self.endpoints["metrics"] = f"{address.rpartition(':')[0]}:{self._http.server_port}"

    def _bind_sockets(self) -> None:
        """The events socket, the I/O thread's control and publish sockets (ZAP first), and the outbox to it."""
        serve = self.config.serve
        self._ctx = zmq.Context()
        secure = None
        try:
            if self.security is not None:  # ZAP first: a CURVE socket must never accept before it can ask
                self.security.start(self._ctx)
                secure = self.security.secure
            self._events = self._cluster_source() if self.config.cluster.nats else EventsSocket(
                self._ctx,
                serve.events,
                self.spec.input_size,
                serve.max_message_events,
                serve.max_message_bytes,
                self._count_message_rejection,
                target_dim=self.engine.task.wire_target_dim,
                max_stream_id_length=serve.max_stream_id_length,
                budgets=EventsBudgets(serve.max_inflight_bytes, serve.max_peer_inflight_bytes, self._max_reply_bytes()),
                on_dropped=self._count_drop,
                secure=secure,
                task=self.engine.task.name,
            )
            self._io = IOThread(
                self._ctx,
                self.inbox,
                serve.control,
                serve.publish,
                publish_budget=PublishBudget(serve.publish_queue_bytes),
                publish_hwm=max(_MIN_PUBLISH_HWM, serve.publish_queue_bytes // self._max_publish_bytes()),
                monitor=self._events.monitor,
                on_failure=self.metrics.io_failures.inc,
                on_disconnect=self.metrics.events_disconnects.inc,
                on_handshake_failed=self.security.handshake_failed if self.security else lambda event: None,
                secure=secure,
            )
        except Exception as exc:
            if self._events is not None:
                self._events.close()
                self._events = None
            if self.security is not None:
                self.security.stop()
            self._ctx.term()
            self._close_http()
            raise StartupError(str(exc)) from None
        self.endpoints |= {"events": self._events.endpoint, **self._io.endpoints}
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)  # never drop a reply
        self._outbox.connect(self._io.outbox_endpoint)
        self._io.start()

    def _watch_io(self) -> None:
        stall = self.metrics.stall_timeout_s
        self.metrics.add_health_check("io", lambda: self._io.health(stall))
        self.metrics.add_health_check("publisher", lambda: self._io.publisher_health())
        self.metrics.inflight_bytes.set_function(lambda: self._events.pending_bytes)
        self.metrics.publish_queue_bytes.set_function(lambda: self._io.publish_budget.used)

    def _start_security(self) -> None:
        """Load the CURVE keys of `[security]`, or, without them, refuse to listen beyond this host unless
        `security.allow_insecure` says so: whoever reaches the control port could run any command."""
        sec, serve = self.config.security, self.config.serve
        if not sec.server_secret_key:
            exposed = insecure_endpoints({"events": serve.events, "control": serve.control, "publish": serve.publish})
            if exposed and not sec.allow_insecure:
                raise StartupError(
                    f"refusing to bind {', '.join(exposed)} without security: anyone who reaches it could send "
                    "events, read predictions, or (control) import a model and shut the daemon down. Set "
                    "[security] keys (docs/operations.md, Security), bind 127.0.0.1, or set "
                    "security.allow_insecure = true"
                )
            return
        try:
            self.security = Security(sec, lambda reason: self.metrics.auth_failures.labels(reason=reason).inc())
        except AuthError as exc:
            raise StartupError(str(exc)) from None

    def _cluster_source(self):
        """Cluster mode: the events come from the key groups this replica owns, not from a socket (a ClusterError
        saying what is wrong with the cluster becomes the StartupError of the caller)."""
        from lstmd.daemon.cluster.replica import ClusterSource
        from lstmd.daemon.cluster.weights import installer
        from lstmd.daemon.io import EventsLimits

        serve = self.config.serve
        limits = EventsLimits(self.spec.input_size, serve.max_message_events, None, self.engine.task.wire_target_dim)
        return ClusterSource(self.config.cluster, limits, self.config.serve.max_inflight_bytes, self.store,
                             lambda: self.engine.model.version, self.metrics, lambda: self.engine.model,
                             installer(self.install_model, self.engine, self.trainer))

    def request_stop(self) -> None:
        """Safe from any thread and from signal handlers: the loop finishes its batch, then stops."""
        self.inbox.put(_STOP)

    def serve_forever(self) -> None:
        adopt_torch_threads()  # serve.cpu_threads was set on the thread that built the engine; this may be another
        try:
            while not self._stopping:
                batch, other = self._gather()
                if batch:
                    self._serve_guarded(batch)
                if other is _STOP:
                    self._stopping = True
                elif isinstance(other, TargetsMessage | ForecastMessage):
                    self._serve_guarded([other])
                elif other is not None:
                    self._run_control(other)
                self._housekeeping()
                self.metrics.beat()  # /healthz turns 503 if this loop ever stalls
                if self.trainer is not None:
                    self._publish_trained()
            # Answer what was already received before shutting the sockets.
            # Bounded: producers may keep sending; what is not answered was not acknowledged and is resent.
            drain_until = time.monotonic() + 1.0
            while time.monotonic() < drain_until and (message := self._events.take()) is not None:
                self._serve_guarded([message])
            while True:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, EventsMessage | TargetsMessage):
                    self._serve_guarded([item])
                elif isinstance(item, ControlMessage):
                    self._run_control(item)
            self.durability.on_clean_stop()
        finally:
            self._shutdown()

    def start_in_thread(self) -> threading.Thread:
        """start() then serve_forever() on a background thread (tests, `lstmd demo`)."""
        self.start()
        self._thread = threading.Thread(target=self.serve_forever, name="lstmd-loop", daemon=True)
        self._thread.start()
        return self._thread

    def stop_and_join(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def _shutdown(self) -> None:
        self.metrics.set_ready(False)
        if self.trainer is not None:
            self.trainer.stop()
        self.durability.close()
        self.engine.close()
        if self._events is not None:
            self._events.close()
        if self._io is not None:
            self._io.stop()
            self._io.join(5)
        if self._outbox is not None:
            self._outbox.close(linger=0)
        self._close_http()
        if self.security is not None:
            self.security.stop()
        if self._ctx is not None:
            self._ctx.term()
        if self._state_lock is not None:  # last: everything this daemon writes into the directory is written
            self._state_lock.release()
        log.info("lstmd stopped")

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # ---- the serving loop -------------------------------------------------------------------------------

    def _gather(self) -> tuple[list[EventsMessage], object]:
        """Read event messages for at most max_wait or max_batch events; stop early at a targets message.

        The inbox (control, stop) is looked at first and between batches: a control command waits at most one
        batch, or the idle poll when no events come."""
        try:
            return [], self.inbox.get_nowait()
        except queue.Empty:
            pass
        events = self._events
        if not events.wait(_IDLE_POLL_MS):
            self._backlog = 0
            return [], None
        serve = self.config.serve
        batch: list[EventsMessage] = []
        n = backlog = 0
        deadline = time.perf_counter() + serve.max_wait_ms / 1000
        waited = False
        while n < serve.max_batch:
            message = events.take()
            if message is None:
                remaining = deadline - time.perf_counter()
                # A batch already big enough to use the step well runs as soon as nothing is waiting: waiting
                # out max_wait_ms then only adds latency (docs/benchmarks.md, "Numbers once kept in comments").
                if not batch or n >= _STEP_WITHOUT_WAITING or remaining <= 0:
                    break
                waited = True
                if not events.wait(remaining * 1000):
                    break
                continue
            if not waited:
                backlog += 1
            if isinstance(message, TargetsMessage | ForecastMessage):
                self._backlog = backlog
                return batch, message
            batch.append(message)
            n += len(message.header.streams)
        self._backlog = backlog
        return batch, None

    def _serve_guarded(self, batch: list) -> None:
        """Serve a batch (or join a targets message); the last resort if that raises: answer every message of
        it `internal_error` (counted; the traceback goes to the log, never to the client), keep serving. A
        message answered before the failure gets this second reply too; a Producer ignores it (it matches
        replies by request id and has moved on)."""
        try:
            if isinstance(batch[0], TargetsMessage):
                self._join_targets(batch[0])
            elif isinstance(batch[0], ForecastMessage):
                self._answer_forecast(batch[0])
            else:
                self._serve(batch)
        except Exception:
            log.exception("internal error serving a batch of %d message(s); answered internal_error", len(batch))
            reply = protocol.EventsReply(
                v=protocol.PROTOCOL_VERSION,
                req=0,
                error="internal error in the daemon (details are in its log); the events may or may not "
                "have been applied: resend them with the same sequence numbers",
                error_reason="internal_error",
            )
            for message in batch:
                reply.req = message.header.req
                self._count_message_rejection("internal_error")
                self._events.send([*message.envelope, protocol.encode(reply)])

    def _serve(self, batch: list[EventsMessage]) -> None:
        counts = [len(m.header.streams) for m in batch]
        wal = self.durability.wal
        if wal is not None and wal.error is not None and not self.durability.writable():
            self._reject_unloggable(batch, counts)  # the log still fails: apply nothing, acknowledge nothing
            return
        features = batch[0].features if len(batch) == 1 else np.concatenate([m.features for m in batch])
        applied = self.pipeline.serve(
            [m.header.streams for m in batch],
            [m.header.seqs for m in batch],
            features,
            [m.targets for m in batch],
        )
        if self.durability.wal is not None and applied.applied:
            try:  # group commit: one append (and under fsync = always one fsync) per batch, before the replies
                self.durability.log_batch([m.header.streams for m in batch], features, applied,
                                          [m.targets for m in batch])
            except WalError as exc:
                self.durability.reject_unlogged(exc, applied)
        self._reply(batch, counts, applied.status, applied.predictions, applied.reply_reasons())
        self._publish(batch, applied)
        self._account(features.shape[0], applied.status, applied.reasons)

    def _reply(self, batch, counts, status, preds, reasons) -> None:
        version = self.engine.model.version
        out_dim = preds.shape[1]
        now = time.perf_counter()
        offset = 0
        send = self._events.send
        for message, count in zip(batch, counts, strict=True):
            end = offset + count
            local_reasons = (
                {i - offset: why[1] for i, why in reasons.items() if offset <= i < end} if reasons else {}
            )
            reply = protocol.EventsReply(
                v=protocol.PROTOCOL_VERSION,
                req=message.header.req,
                version=version,
                out_dim=out_dim,
                status=status[offset:end].tobytes(),
                reasons=local_reasons,
            )
            send([*message.envelope, protocol.encode(reply), preds[offset:end].tobytes()])
            self.metrics.event_latency.observe(now - message.received)
            offset = end

    def _publish(self, batch, applied: AppliedBatch) -> None:
        """The batch's applied predictions to the I/O thread as one PUB message (protocol.PublishedBatch), within
        serve.publish_queue_bytes: a batch that does not fit is dropped and counted, so a publisher that falls
        behind never holds memory or the loop."""
        if self._io is None or self._io.subscribers <= 0 or not applied.applied:
            return
        streams = list(itertools.chain.from_iterable(m.header.streams for m in batch))
        idx, seq, preds = applied.idx, applied.seqs, applied.predictions
        self._published_batches += 1
        header = protocol.encode(
            protocol.PublishedBatch(
                batch=self._published_batches,
                version=self.engine.model.version,
                out_dim=preds.shape[1],
                streams=[streams[i] for i in idx.tolist()],
                seqs=seq.tolist(),
            )
        )
        rows = np.ascontiguousarray(preds[idx])
        if not self._io.publish_budget.reserve(len(header) + rows.nbytes):
            self._count_drop("publish", "queue_full")
            return
        self._outbox.send_multipart([PUBLISH, header, rows], copy=False)

    def _account(self, n, status, reasons) -> None:
        counts = np.bincount(status, minlength=len(protocol.STATUS_NAMES))
        self.stats.events += counts
        self.stats.batches += 1
        for code, count in enumerate(counts.tolist()):
            if count:
                self.metrics.events.labels(status=protocol.STATUS_NAMES[code]).inc(count)
        for label, _ in reasons.values():
            self.stats.rejections[label] = self.stats.rejections.get(label, 0) + 1
            self.metrics.rejections.labels(reason=label).inc()
        self.metrics.batch_size.observe(n)
        self.metrics.queue_depth.set(self._backlog + self._events.pending() + self.inbox.qsize())
        self.metrics.active_streams.set(len(self.store))

    def _reject_unloggable(self, batch, counts) -> None:
        """The write-ahead log cannot be written: answer every event `rejected` (counted), apply none."""
        n = sum(counts)
        status = np.full(n, protocol.REJECTED, dtype=np.uint8)
        preds = np.full((n, self.spec.output_size), np.nan, dtype=np.float32)
        why = ("wal_unavailable", f"{self.durability.wal.error}; the event was not applied, resend it")
        reasons = dict.fromkeys(range(n), why)
        self._reply(batch, counts, status, preds, reasons)
        self._account(n, status, reasons)

    def _count_message_rejection(self, reason: str) -> None:
        """Called by the I/O thread for messages rejected whole (cannot be decoded)."""
        self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + 1
        self.metrics.rejections.labels(reason=reason).inc()

    def _count_drop(self, what: str, reason: str) -> None:
        """A reply, request or prediction batch dropped instead of queued without bound (daemon/io.py)."""
        key = f"{what}_{reason}"
        self.stats.drops[key] = self.stats.drops.get(key, 0) + 1
        self.metrics.dropped.labels(what, reason).inc()

    def _max_reply_bytes(self) -> int:
        """The largest events reply: per event a status byte, the prediction and a rejection reason's text."""
        return self.config.serve.max_message_events * (1 + 4 * self.spec.output_size + 128) + 1024

    def _max_publish_bytes(self) -> int:
        """The largest PUB message: per event of a full batch its prediction, seq and a stream id (a long one)."""
        serve = self.config.serve
        return serve.max_batch * (4 * self.spec.output_size + 9 + serve.max_stream_id_length + 3) + 1024

    def _count_eviction(self, cause: str, count: int) -> None:
        self.stats.evictions[cause] = self.stats.evictions.get(cause, 0) + count
        self.metrics.evictions.labels(cause=cause).inc(count)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < 1.0:
            return
        self._last_housekeeping = now
        self.store.evict_idle()
        self.durability.maybe_snapshot()
        self.metrics.active_streams.set(len(self.store))
        self.metrics.queue_depth.set(self._backlog + self._events.pending() + self.inbox.qsize())
        # Forecast: the guard's gauges, O(capacity), so every 10 s rather than every second.
        if self.store.adaptation is not None and now - self._last_guard_metrics >= 10.0:
            self._last_guard_metrics = now
            self.metrics.set_guard(self.guard_summary())

    # ---- online training (daemon/recorder.py, daemon/trainer.py) -----------------------------------------

    def guard_summary(self) -> dict:
        """The forecast guard over the resident streams (daemon/normalization.py); {} for other tasks."""
        occupied = torch.from_numpy(np.isfinite(self.store.last_used)).to(self.device)
        return guard_summary(self.engine.layout, self.store.adaptation, occupied)

    def _make_training(self, spec: ModelSpec):
        t = self.config.train
        if not t.enabled:
            return None, None
        from lstmd.daemon.recorder import Recorder
        from lstmd.daemon.trainer import Trainer

        task = self.engine.task
        forecast = not task.takes_targets  # its targets are the next events' chosen columns
        recorder = Recorder(
            spec.num_layers,
            spec.hidden_size,
            spec.input_size,
            task.recorded_target_size,
            spec.task,
            self.config.state.capacity,
            t.record_streams,
            t.record_steps,
            t.k2,
            t.record_idle_s,
            t.holdout_windows,
            columns=(list(spec.forecast_columns) or None) if forecast else None,
            scale_table=self.store.adaptation[:, self.engine.layout.field("scale")] if forecast else None,
        )
        serving = lambda: self.engine.model  # noqa: E731 (read from the trainer thread: one reference)
        backends, seed = self.engine.backends, self.config.model.seed
        trainer = Trainer(t, spec, recorder, serving, self.metrics, self.device, backends, seed)
        return recorder, trainer

    def _join_targets(self, message: TargetsMessage) -> None:
        """Delayed targets: join each to its recorded event (stream, seq); reply per item ok or rejected."""
        header = message.header
        # Write-ahead: logged before the join and the reply, so an acknowledged target survives a crash.
        log_targets = self.durability.log_targets if self.durability.wal is not None else None
        status, reasons, unlogged = self.pipeline.join_targets(header.streams, header.seqs, message.targets,
                                                               log_targets)
        if unlogged is not None:  # the log could not be written: every target rejected, counted by reason
            self.stats.rejections[unlogged] = self.stats.rejections.get(unlogged, 0) + len(status)
            self.metrics.rejections.labels(reason=unlogged).inc(len(status))
        reply = protocol.EventsReply(
            v=protocol.PROTOCOL_VERSION,
            req=header.req,
            version=self.engine.model.version,
            status=status.tobytes(),
            reasons=reasons,
        )
        self._events.send([*message.envelope, protocol.encode(reply)])

    def _answer_forecast(self, message: ForecastMessage) -> None:
        """A multi-step forecast (daemon/forecast.py) on copies of the streams' state: per stream ok or rejected
        (unknown, reset), rows [horizon, O] each; a request wrong whole (task, horizon, exog) is refused whole."""
        header = message.header
        try:
            result, errors = forecasts.forecast(self, header.streams, header.horizon, message.exog)
        except forecasts.ForecastError as exc:
            self._count_message_rejection("bad_forecast")
            reply = protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=header.req, error=str(exc),
                                         error_reason="bad_forecast")
            self._events.send([*message.envelope, protocol.encode(reply)])
            return
        status = np.zeros(len(header.streams), dtype=np.uint8)
        status[list(errors)] = protocol.REJECTED
        reply = protocol.EventsReply(
            v=protocol.PROTOCOL_VERSION,
            req=header.req,
            version=self.engine.model.version,
            out_dim=header.horizon * result.shape[2],
            status=status.tobytes(),
            reasons=errors,
        )
        self._events.send([*message.envelope, *protocol.encode_reply(reply, result.reshape(len(status), -1))])

    def _publish_trained(self) -> None:
        """Between two batches: serve the trainer's candidate, if one passed its holdout check."""
        candidate = self.trainer.take_candidate()
        if candidate is None:
            return
        if candidate.base_version != self.engine.model.version:
            self.trainer.settle(candidate, False, "the serving model changed during the round")
        elif self.trainer.paused and not candidate.forced:
            self.trainer.settle(candidate, False, "training was paused during the round")
        elif self.config.cluster.nats:  # one model across the cluster: the averager publishes (cluster/weights.py)
            self._events.offer_trained(candidate)
            self.trainer.settle(candidate, True, "sent to the cluster's averager")
        else:
            self.install_model(candidate.model, "train", **candidate.info)
            self.trainer.settle(candidate, True)

    def install_model(self, model: ServingModel, source: str, version: int | None = None, **info) -> int:
        """Serve `model` from the next batch on as version + 1, and keep it in the version history. Cluster mode:
        an operator's model is published as the cluster's next version instead (daemon/cluster/weights.py), and
        the cluster's versions are installed here under their own `version`."""
        if version is None and self.config.cluster.nats:
            return self._events.publish_model(model, source)
        model.version = self.engine.model.version + 1 if version is None else version
        self.engine.swap_model(model)
        if self.versions.get(model.version) is None:  # a replay may return to a version served before
            self.versions.add(self.engine.model, source, **info)
        self.metrics.model_version.set(model.version)
        self.metrics.last_publish.set(time.time())
        return model.version

    # ---- control ----------------------------------------------------------------------------------------

    def _run_control(self, message: ControlMessage) -> None:
        """Answer a control request (daemon/control.py runs it) through the I/O thread."""
        payload, stop = control.answer(self, message)
        self._outbox.send_multipart([CONTROL, *message.envelope, payload], copy=False)
        if stop:
            self._stopping = True

    def status(self) -> dict:
        spec = self.spec
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.stats.started, 3),
            "device": str(self.device),
            "backend": self.engine.backend_name,
            "endpoints": self.endpoints,
            "model": {**spec.__dict__, "version": self.engine.model.version},
            "streams": len(self.store),
            "capacity": self.store.capacity,
            "batches": self.stats.batches,
            "events": dict(zip(protocol.STATUS_NAMES, self.stats.events.tolist(), strict=True)),
            "rejections": dict(self.stats.rejections),
            "sequence_gaps": self.pipeline.sequence_gaps,
            "evictions": dict(self.stats.evictions),
            "evicted_filter": self.store.evicted.status(),
            "queue_depth": self._backlog + self._events.pending() + self.inbox.qsize(),
            "inflight_bytes": self._events.pending_bytes if self._events is not None else 0,
            "drops": dict(self.stats.drops),
            "io": self._io.status() if self._io is not None else {},
            "durability": self.durability.status(),
            "train": self.trainer.status() if self.trainer is not None else {"enabled": False},
            "security": {"curve": True, **self.security.counts()} if self.security else {"curve": False},
        }
