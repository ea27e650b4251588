"""The daemon: its lifecycle and the serving loop (gather, reply, publish, accounting, control between batches).

The shape of vLLM's engine core: this loop alone owns the state store, the model and the counters, so none of them
needs a lock. It reads and answers the events socket itself (daemon/io.py's EventsSocket); the I/O thread brings
control requests through the inbox and sends control replies and published predictions. A signal handler only
calls `request_stop()`, which puts a sentinel on the inbox.

`Daemon` wires the parts and keeps the loop; the rest lives with its owner: the sockets, the I/O thread, the
metrics server and security in daemon/endpoints.py, the serving stages in daemon/pipeline.py, training, the
version history and publishing in daemon/online.py, the model at start in daemon/model_loader.py, durability in
daemon/recovery.py, delayed targets and forecasts in daemon/side_requests.py, `lstmd status` in daemon/report.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
from lstmd.clients import protocol
from lstmd.daemon import control, report, side_requests
from lstmd.daemon.config import Config, served_level_rate
from lstmd.daemon.endpoints import Endpoints, StartupError
from lstmd.daemon.engine import Engine, pick_device
from lstmd.daemon.io import CONTROL, PUBLISH, ControlMessage, EventsMessage, ForecastMessage, Inbox, TargetsMessage
from lstmd.daemon.metrics import Metrics
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.model_loader import ModelFileError, load_initial_model
from lstmd.daemon.online import OnlineModel
from lstmd.daemon.pipeline import AppliedBatch, Pipeline
from lstmd.daemon.recovery import Durability, RecoveryError
from lstmd.daemon.state_lock import StateDirLocked, StateLock
from lstmd.daemon.state_store import StateStore
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


class Daemon:
    """One daemon: `start()` (or `start_in_thread()`), then `serve_forever()` until `request_stop()`."""

    def __init__(self, config: Config, registry=None) -> None:
        self.config = config
        self.metrics = Metrics(registry, stall_dump_s=config.serve.stall_dump_s)
        self.stats = report.ServeStats()
        try:
            self.device = pick_device(config.serve.device)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        model = self._initial_model()
        spec = model.spec
        state, serve = config.state, config.serve
        self.store = StateStore(
            spec.num_layers, spec.hidden_size, state.capacity, self.device, idle_ttl_s=state.idle_ttl_s,
            on_full=state.on_full, remember_evicted=state.remember_evicted,
            evicted_false_positive_rate=state.evicted_false_positive_rate, on_evict=self._count_eviction,
            resend_window=serve.resend_window, output_size=spec.output_size,
        )
        self.engine = Engine(model, self.store, self.device, serve.backend, cpu_threads=serve.cpu_threads,
                             step_threads=serve.step_threads, cuda_graphs=serve.cuda_graphs,
                             season=config.train.season, level=served_level_rate(config),
                             guard=config.train.guard)
        # Versions, recorder and trainer (daemon/online.py); the loop uses them directly, they never change.
        self.online = OnlineModel(config, self.engine, self.store, self.metrics, self.device)
        self.versions, self.recorder, self.trainer = self.online.versions, self.online.recorder, self.online.trainer
        self.pipeline = Pipeline(self.store, self.engine, self.metrics, serve, self.engine.task.batch_targets,
                                 config.model.output)
        self.pipeline.recorder = self.recorder
        self.inbox = Inbox(serve.max_control_inbox_bytes)  # control requests and the stop sentinel
        # Sockets, I/O thread, metrics server, security (daemon/endpoints.py). The loop keeps its own references
        # to the events source, the I/O thread and the outbox once they are open: one attribute lookup per use.
        self.net = Endpoints(config, self.metrics, self.inbox, self.engine, self.store, self.online,
                             self.count_rejection, self._count_drop)
        self._stopping = False
        self._io = None
        self._events = None
        self._outbox = None
        self._backlog = 0  # requests the last gather found already waiting (lstmd_input_queue_depth_messages)
        self._published_batches = 0  # PublishedBatch.batch of the last batch handed to the publisher
        self._thread: threading.Thread | None = None
        self._state_lock: StateLock | None = None  # held from start() to the end of _shutdown()
        self._last_housekeeping = time.monotonic()
        self._last_guard_metrics = 0.0
        self.durability = Durability(  # WAL, snapshots, restore (daemon/recovery.py)
            config.durability, Path(state.dir), self.store, self.engine, self.pipeline, self.metrics,
            self._initial_model, self.online.snapshot_components(spec), self.recorder, self.trainer,
        )

    @property
    def spec(self) -> ModelSpec:
        return self.engine.model.spec

    @property
    def endpoints(self) -> dict[str, str]:
        """Where the daemon listens, by name (events, control, publish, metrics), once started."""
        return self.net.addresses

    @property
    def security(self):
        """CurveZMQ security (daemon/auth.py), with [security] keys once started; None without."""
        return self.net.security

    def _initial_model(self) -> ServingModel:
        try:
            return load_initial_model(self.config.model)
        except ModelFileError as exc:
            raise StartupError(str(exc)) from None

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
        # Metrics first, with /readyz answering 503, so a long restore is observable; events sockets after the
        # restore, so nothing is served from a half-restored state.
        state_dir = self.net.prepare()
        try:
            if not self.config.cluster.nats:  # a replica's state comes from the cluster's log (daemon/cluster/)
                self.durability.restore()
        except (RecoveryError, OSError) as exc:
            self.net.close_http()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(f"cannot restore the state in {state_dir}: {why}") from None
        self.online.start()  # before the sockets: its one-off costs (kernel compiles, imports) delay no event
        try:
            self.net.open()
        except BaseException:
            self.online.stop()
            raise
        self._events, self._io, self._outbox = self.net.events, self.net.io, self.net.outbox
        if self.config.cluster.nats:  # one model across the cluster: trained and imported models go through it
            self.online.cluster = self._events
        limit_switch_interval(SERVE_SWITCH_INTERVAL_S)  # kernels/tuning.py says why
        self.metrics.capacity.set(self.config.state.capacity)
        self.metrics.set_build_info(VERSION, self.engine.backend_name, str(self.device))
        self.metrics.watch_device_memory(self.device)
        (state_dir / "endpoints.json").write_text(json.dumps(self.endpoints))
        self._state_lock.record(self.endpoints)
        self.metrics.set_ready(True)
        where = ", ".join(f"{k} {self.endpoints.get(k) or 'off'}" for k in ("events", "control", "publish", "metrics"))
        log.info("lstmd %s serving (device %s, backend %s): %s", VERSION, self.device, self.engine.backend_name, where)

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
                    self.online.publish_trained()
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
        self.metrics.stall_dump.cancel()
        self.online.stop()
        self.durability.close()
        self.engine.close()
        self.net.close()
        if self._state_lock is not None:  # last: everything this daemon writes into the directory is written
            self._state_lock.release()
        log.info("lstmd stopped")

    # ---- the serving loop -------------------------------------------------------------------------------

    def _gather(self) -> tuple[list[EventsMessage], object]:
        """Read event messages for at most max_wait or max_batch events (a cap: only a message larger than max_batch
        makes a batch alone); stop early at a targets or forecast message. The inbox (control, stop) is looked at
        first and between batches: a control command waits at most one batch, or the idle poll when no events come."""
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
        waited, other = False, None
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
            backlog += 0 if waited else 1
            if isinstance(message, TargetsMessage | ForecastMessage):
                other = message
                break
            if batch and n + len(message.header.streams) > serve.max_batch:  # the next batch's: it keeps its turn
                events.put_back(message)
                break
            batch.append(message)
            n += len(message.header.streams)
        self._backlog = backlog
        return batch, other

    def _serve_guarded(self, batch: list) -> None:
        """Serve a batch (or join a targets message); the last resort if that raises: answer every message of
        it `internal_error` (counted; the traceback goes to the log, never to the client), keep serving. A
        message answered before the failure gets this second reply too; a Producer ignores it (it matches
        replies by request id and has moved on)."""
        try:
            if isinstance(batch[0], TargetsMessage):  # daemon/side_requests.py
                self._events.send(side_requests.join_targets(self, batch[0]))
            elif isinstance(batch[0], ForecastMessage):
                self._events.send(side_requests.answer_forecast(self, batch[0]))
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
                self.count_rejection("internal_error")
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
            [m.header.ends for m in batch],
        )
        if self.durability.wal is not None and applied.applied:
            try:  # group commit: one append (and under fsync = always one fsync) per batch, before the replies
                self.durability.log_batch([m.header.streams for m in batch], features, applied,
                                          [m.targets for m in batch])
            except WalError as exc:
                self.durability.reject_unlogged(exc, applied)
        self._reply(batch, counts, applied.status, applied.predictions, applied.reply_reasons(), applied.flags)
        self._publish(batch, applied)
        self._account(features.shape[0], applied.status, applied.reasons)

    def _reply(self, batch, counts, status, preds, reasons, flags=None) -> None:
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
                flags=b"" if flags is None else flags[offset:end].tobytes(),
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
        self.metrics.queue_depth.set(self.queue_depth())
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

    def count_rejection(self, reason: str, count: int = 1) -> None:
        """Messages (or delayed targets) rejected whole: not decodable, overloaded, refused forecasts, unlogged."""
        self.stats.rejections[reason] = self.stats.rejections.get(reason, 0) + count
        self.metrics.rejections.labels(reason=reason).inc(count)

    def _count_drop(self, what: str, reason: str) -> None:
        """A reply, request or prediction batch dropped instead of queued without bound (daemon/io.py)."""
        key = f"{what}_{reason}"
        self.stats.drops[key] = self.stats.drops.get(key, 0) + 1
        self.metrics.dropped.labels(what, reason).inc()

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
        self.metrics.queue_depth.set(self.queue_depth())
        # Forecast: the guard's gauges, O(capacity), so every 10 s rather than every second.
        if self.store.adaptation is not None and now - self._last_guard_metrics >= 10.0:
            self._last_guard_metrics = now
            self.metrics.set_guard(self.guard_summary())

    # ---- online training (daemon/online.py) --------------------------------------------------------------

    def guard_summary(self) -> dict:
        """The forecast guard over the resident streams (daemon/normalization.py); {} for other tasks."""
        return self.online.guard_summary()

    def install_model(self, model: ServingModel, source: str, **info) -> int:
        """Serve `model` from the next batch on as version + 1 (daemon/online.py; in a cluster: its next version)."""
        return self.online.install_model(model, source, **info)

    # ---- control ----------------------------------------------------------------------------------------

    def _run_control(self, message: ControlMessage) -> None:
        """Answer a control request (daemon/control.py runs it) through the I/O thread."""
        payload, stop = control.answer(self, message)
        self._outbox.send_multipart([CONTROL, *message.envelope, payload], copy=False)
        if stop:
            self._stopping = True

    def status(self) -> dict:
        return report.status(self, VERSION)

    def queue_depth(self) -> int:
        """Requests waiting: found by the last gather, still in the events socket's queues, and in the inbox."""
        return self._backlog + self._events.pending() + self.inbox.qsize()
