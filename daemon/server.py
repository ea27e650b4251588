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
from lstmd.daemon import batching, control
from lstmd.daemon.config import Config
from lstmd.daemon.engine import Engine, pick_device
from lstmd.daemon.io import (
    CONTROL,
    PUBLISH,
    ControlMessage,
    EventsBudgets,
    EventsMessage,
    EventsSocket,
    IOThread,
    PublishBudget,
    TargetsMessage,
)
from lstmd.daemon.keras_import import convert_keras, is_keras_bytes
from lstmd.daemon.metrics import Metrics
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import guard_summary
from lstmd.daemon.recovery import Durability, RecoveryError
from lstmd.daemon.state_lock import StateDirLocked, StateLock
from lstmd.daemon.state_store import NO_SEQ, StateStore
from lstmd.daemon.versions import ModelHistory
from lstmd.daemon.wal import WalError
from lstmd.kernels.tuning import SERVE_SWITCH_INTERVAL_S, adopt_torch_threads, limit_switch_interval

log = logging.getLogger("lstmd.daemon")

VERSION = "0.1.0"
_STOP = object()
_ASSIGN = -1  # internal marker in the batch's sequence array: the daemon assigns the number
# Events in a gathered batch from which the loop steps once no request is waiting instead of waiting out
# max_wait_ms. Nothing waiting means the loop is not saturated, so waiting buys no throughput: at half the max
# rate (10k streams, 1,000 events per message) 256 instead of 1,024 halved the in-daemon p50 (≤ 5 → ≤ 2.5 ms),
# and closed-loop throughput did not drop (518k/430k → 546k/524k, noisy shared 2-core CPU).
_STEP_WITHOUT_WAITING = 256
# How long an idle loop blocks on the events socket before it looks at the inbox (control, stop) again.
_IDLE_POLL_MS = 5
# Messages libzmq queues per subscriber at least, whatever serve.publish_queue_bytes: small batches at a high rate
# would otherwise be dropped for a subscriber only a few milliseconds behind.
_MIN_PUBLISH_HWM = 16


def _internal_error(cmd: str) -> str:
    """What a client is told when a control command failed by a bug: no exception text (that goes to the log)."""
    return f"internal error in {cmd!r} (details are in the daemon's log)"


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


@dataclass
class ServeStats:
    """Plain counters the loop fills; `lstmd status` reads them (Prometheus gets the same numbers)."""

    started: float = field(default_factory=time.time)
    batches: int = 0
    events: np.ndarray = field(default_factory=lambda: np.zeros(len(protocol.STATUS_NAMES), dtype=np.int64))
    rejections: dict[str, int] = field(default_factory=dict)
    sequence_gaps: int = 0
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
        )
        self.versions = ModelHistory(config.train.history)  # published versions, for rollback
        self.versions.add(self.engine.model, "initial")
        self.recorder, self.trainer = self._make_training(spec)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.endpoints: dict[str, str] = {}
        self._stopping = False
        self._ctx: zmq.Context | None = None
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
        self.durability = Durability(self)  # WAL, snapshots, restore (daemon/recovery.py)

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
        state_dir = Path(self.config.state.dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            probe = state_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError(f"state.dir {state_dir} is not writable: {exc.strerror}") from None
        serve = self.config.serve
        # Metrics first, with /readyz answering 503, so a long restore is observable; events sockets after the
        # restore, so nothing is served from a half-restored state.
        if serve.metrics:
            try:
                self._http = self.metrics.serve_http(serve.metrics)
            except (OSError, ValueError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise StartupError(f"cannot serve metrics on {serve.metrics}: {why}") from None
            self.endpoints["metrics"] = f"{serve.metrics.rpartition(':')[0]}:{self._http.server_port}"
        try:
            self.durability.restore()
        except (RecoveryError, OSError) as exc:
            self._close_http()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(f"cannot restore the state in {state_dir}: {why}") from None
        self._ctx = zmq.Context()
        try:
            self._events = EventsSocket(
                self._ctx,
                serve.events,
                self.spec.input_size,
                serve.max_message_events,
                serve.max_message_bytes,
                self._count_message_rejection,
                target_dim=self._target_dim(),
                max_stream_id_length=serve.max_stream_id_length,
                budgets=EventsBudgets(serve.max_inflight_bytes, serve.max_peer_inflight_bytes, self._max_reply_bytes()),
                on_dropped=self._count_drop,
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
            )
        except Exception as exc:
            if self._events is not None:
                self._events.close()
                self._events = None
            self._ctx.term()
            self._close_http()
            raise StartupError(str(exc)) from None
        self.endpoints |= {"events": self._events.endpoint, **self._io.endpoints}
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)  # never drop a reply
        self._outbox.connect(self._io.outbox_endpoint)
        self._io.start()
        stall = self.metrics.stall_timeout_s
        self.metrics.add_health_check("io", lambda: self._io.health(stall))
        self.metrics.add_health_check("publisher", lambda: self._io.publisher_health())
        self.metrics.inflight_bytes.set_function(lambda: self._events.pending_bytes)
        self.metrics.publish_queue_bytes.set_function(lambda: self._io.publish_budget.used)
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
                elif isinstance(other, TargetsMessage):
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
                # out max_wait_ms then only adds latency (closed loop, 10k streams: the loop idled ~15%).
                if not batch or n >= _STEP_WITHOUT_WAITING or remaining <= 0:
                    break
                waited = True
                if not events.wait(remaining * 1000):
                    break
                continue
            if not waited:
                backlog += 1
            if isinstance(message, TargetsMessage):
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
        n = sum(counts)
        out_dim = self.spec.output_size
        features = batch[0].features if len(batch) == 1 else np.concatenate([m.features for m in batch])
        status = np.zeros(n, dtype=np.uint8)
        preds = np.full((n, out_dim), np.nan, dtype=np.float32)
        reasons: dict[int, tuple[str, str]] = {}
        slots = np.empty(n, dtype=np.int64)
        seqs = np.full(n, _ASSIGN, dtype=np.int64)
        was_dropped = np.zeros(n, dtype=bool)
        unavailable: dict[int, tuple[str, str]] = {}  # duplicates whose prediction is no longer kept
        offset = 0
        for message, count in zip(batch, counts, strict=True):
            self._admit_message(
                message, offset, features[offset : offset + count], slots, seqs, was_dropped, reasons
            )
            offset += count
        for i in reasons:
            status[i] = protocol.REJECTED

        accepted = np.flatnonzero(slots >= 0)
        applied_parts = []
        targets = self._batch_targets(batch, counts, n) if self.recorder is not None else None
        for wave in batching.waves(slots[accepted]):
            idx = accepted[wave]
            wave_slots = slots[idx]
            last = self.store.last_seq[wave_slots]
            seq = seqs[idx]
            assign = seq == _ASSIGN
            # last < SEQ_LIMIT (every applied number is), so last + 1 cannot overflow; a stream whose numbers
            # are used up is refused rather than wrapped around.
            seq = np.where(assign, last + 1, seq)
            exhausted = seq >= protocol.SEQ_LIMIT
            if exhausted.any():
                why = ("seq_exhausted", "the stream's sequence numbers are used up (2^63 - 2 applied): drop it")
                for i in idx[exhausted].tolist():
                    reasons[i] = why
                    status[i] = protocol.REJECTED
                idx, wave_slots, seq, last = idx[~exhausted], wave_slots[~exhausted], seq[~exhausted], last[~exhausted]
                if idx.size == 0:
                    continue
            duplicate = seq <= last
            gaps = (last != NO_SEQ) & (seq > last + 1)
            if gaps.any():  # summed in Python integers: gaps near 2^63 would overflow an int64 sum
                missing = sum((seq[gaps] - last[gaps] - 1).tolist())
                # Saturates at 2^63 - 1: adversarial numbers could push the sum past what msgpack and JSON readers
                # of `lstmd status` take (the Prometheus counter is a float and just keeps counting).
                self.stats.sequence_gaps = min(self.stats.sequence_gaps + missing, protocol.SEQ_LIMIT)
                self.metrics.sequence_gaps.inc(missing)
            if duplicate.any():
                dup = idx[duplicate]
                self._answer_duplicates(dup, wave_slots[duplicate], seq[duplicate], status, preds, unavailable)
                idx, wave_slots, seq = idx[~duplicate], wave_slots[~duplicate], seq[~duplicate]
                if idx.size == 0:
                    continue
            fresh = self.store.needs_reset[wave_slots]
            x = features if idx.size == n else features[idx]
            wave_targets = None if targets is None else targets[idx]
            preds[idx] = self.apply_wave(x, wave_slots, seq, fresh, wave_targets, self.recorder)
            reset_now = fresh & was_dropped[idx]
            if reset_now.any():
                status[idx[reset_now]] = protocol.STATE_RESET
            applied_parts.append((idx, seq, fresh))

        if self.durability.wal is not None and applied_parts:
            try:  # group commit: one append (and under fsync = always one fsync) per batch, before the replies
                self.durability.log_batch(batch, features, applied_parts)
            except WalError as exc:
                self.durability.reject_unlogged(exc, status, reasons, applied_parts)
        self._reply(batch, counts, status, preds, reasons | unavailable if unavailable else reasons)
        self._publish(batch, applied_parts, preds)
        self._account(n, status, reasons)

    def _answer_duplicates(self, idx, slots, seq, status, preds, unavailable) -> None:
        """Already applied events: answered `duplicate` with their original predictions from the resend window,
        or, beyond it, with a reason saying the prediction is no longer kept (the Producer raises on that)."""
        status[idx] = protocol.DUPLICATE
        kept, found = self.store.kept_outputs(slots, seq)
        preds[idx[found]] = kept[found]
        if found.all():
            return
        window = self.config.serve.resend_window
        self.metrics.duplicates_unavailable.inc(int((~found).sum()))
        for i, number in zip(idx[~found].tolist(), seq[~found].tolist(), strict=True):
            unavailable[i] = (
                "prediction_unavailable",
                f"sequence number {number} was already applied; its prediction is no longer kept (the daemon "
                f"keeps each stream's last serve.resend_window = {window})",
            )

    def apply_wave(self, x, slots, seq, fresh, targets, recorder) -> np.ndarray:
        """One launch: advance `slots` (distinct) by one event each, keep their outputs for resends, record the
        events for training (when `recorder` is given), mark the slots used. Serving and the log replay both apply
        events through here (so the replay rebuilds the resend window too)."""
        started = time.perf_counter()
        preds = self.engine.step(x, slots, fresh)
        self.metrics.step_duration.observe(time.perf_counter() - started)
        self.store.keep_outputs(slots, seq, preds)
        if recorder is not None:
            recorder.record(slots, x, seq, targets, fresh, self.store.h, self.store.c)
        self.store.last_seq[slots] = seq
        self.store.touch(slots)
        return preds

    def _admit_message(self, message, offset, features, slots, seqs, was_dropped, reasons) -> None:
        """Per-event validation and slot lookup for one message's events (indices offset.. in the batch)."""
        header = message.header
        streams = header.streams
        count = len(streams)
        bad: dict[int, tuple[str, str]] = {}
        # One reduction instead of a per-row check: any NaN or Inf makes the sum non-finite. A sum that only
        # overflowed lands in the exact check too, which then finds every row finite.
        if not np.isfinite(features.sum()):
            for i in np.flatnonzero(~np.isfinite(features).all(axis=1)).tolist():
                bad[i] = ("non_finite", "features hold NaN or Inf")
        if header.seqs is not None:
            seq_arr = protocol.seq_array(header.seqs)
            # One comparison for both ends of [0, SEQ_LIMIT): a negative int64 viewed as uint64 is >= 2^63.
            for i in np.flatnonzero(seq_arr.view(np.uint64) >= protocol.SEQ_LIMIT).tolist():
                bad[i] = ("bad_seq", f"sequence number {header.seqs[i]} is outside [0, 2^63 - 1)")
            seqs[offset : offset + count] = seq_arr
        if bad:
            keep = [i for i in range(count) if i not in bad]
            admission = self.store.admit(
                [streams[i] for i in keep], self.config.serve.max_new_streams_per_message, self._check_new_id
            )
            local = np.full(count, -1, dtype=np.int64)
            local[keep] = admission.slots
            dropped = np.zeros(count, dtype=bool)
            dropped[keep] = admission.was_dropped
            bad |= {keep[j]: why for j, why in admission.rejected.items()}
        else:
            admission = self.store.admit(streams, self.config.serve.max_new_streams_per_message, self._check_new_id)
            local, dropped = admission.slots, admission.was_dropped
            bad = admission.rejected
        slots[offset : offset + count] = local
        was_dropped[offset : offset + count] = dropped
        for i, why in bad.items():
            slots[offset + i] = -1
            reasons[offset + i] = why

    def _check_new_id(self, stream) -> tuple[str, str] | None:
        """Why a stream id not yet in the store may not become one (its length), or None. Only new ids are
        checked: a resident id passed this when it was created, so the hot path runs no check per event (the
        per-event type scan it replaces was ~5% of the loop at 10k int ids per batch)."""
        if type(stream) is not str:
            return None
        length, limit = len(stream), self.config.serve.max_stream_id_length
        if length == 0:
            return ("bad_stream_id", "stream id is empty")
        if length > limit:
            return ("stream_id_too_long", f"stream id of {length} characters exceeds the limit of {limit}")
        return None

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

    def _publish(self, batch, applied_parts, preds) -> None:
        """The batch's applied predictions to the I/O thread as one PUB message (protocol.PublishedBatch), within
        serve.publish_queue_bytes: a batch that does not fit is dropped and counted, so a publisher that falls
        behind never holds memory or the loop."""
        if self._io is None or self._io.subscribers <= 0 or not applied_parts:
            return
        streams = list(itertools.chain.from_iterable(m.header.streams for m in batch))
        idx = np.concatenate([p[0] for p in applied_parts])
        seq = np.concatenate([p[1] for p in applied_parts])
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

    def _target_dim(self) -> int:
        """Values per event in a targets frame: output_size for regression, 1 class label; 0: not checked."""
        task = self.spec.task
        return {"regression": self.spec.output_size, "classification": 1}.get(task, 0)

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

        forecast = spec.task == "forecast"
        target_size = spec.output_size if forecast else self._target_dim()  # forecast: the chosen columns
        recorder = Recorder(
            spec.num_layers,
            spec.hidden_size,
            spec.input_size,
            target_size,
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

    def _batch_targets(self, batch, counts, n) -> np.ndarray | None:
        """[n, D] float32 targets of the batch's events, NaN rows where an event has none; None when none has."""
        if self.recorder.forecast or all(m.targets is None for m in batch):
            return None
        out = np.full((n, self.recorder.y.shape[2]), np.nan, dtype=np.float32)
        offset = 0
        for message, count in zip(batch, counts, strict=True):
            if message.targets is not None:
                out[offset : offset + count] = message.targets
            offset += count
        if self.spec.task == "classification":  # a label outside 0..O-1 teaches nothing: drop it
            labels = out[:, 0]
            out[~((labels >= 0) & (labels < self.spec.output_size))] = np.nan
        return out

    def _join_targets(self, message: TargetsMessage) -> None:
        """Delayed targets: join each to its recorded event (stream, seq); reply per item ok or rejected."""
        header = message.header
        n = len(header.streams)
        status = np.full(n, protocol.REJECTED, dtype=np.uint8)
        if self.recorder is None or self.recorder.forecast:
            why = "training is disabled" if self.recorder is None else "forecast targets are the next events"
            reasons = dict.fromkeys(range(n), f"target not recorded: {why}")
        else:
            get = self.store.slot_of.get
            slots = np.fromiter((get(sid, -1) for sid in header.streams), dtype=np.int64, count=n)
            seqs = np.asarray(header.seqs, dtype=np.int64)
            targets = message.targets.astype(np.float32)
            # Write-ahead: logged before the join and the reply, so an acknowledged target survives a crash.
            wal = self.durability.wal
            unlogged = None if wal is None else self.durability.log_targets(header.streams, seqs, targets)
            if unlogged is not None:  # the log cannot be written: join nothing, answer every target rejected
                label, why = unlogged
                reasons = dict.fromkeys(range(n), why)
                self.stats.rejections[label] = self.stats.rejections.get(label, 0) + n
                self.metrics.rejections.labels(reason=label).inc(n)
            else:
                joined = self.recorder.join_targets(slots, seqs, targets)
                status[joined] = protocol.OK
                reasons = {
                    i: "no recorded event with this stream and sequence number (never seen, or no longer kept)"
                    for i in np.flatnonzero(~joined).tolist()
                }
        reply = protocol.EventsReply(
            v=protocol.PROTOCOL_VERSION,
            req=header.req,
            version=self.engine.model.version,
            status=status.tobytes(),
            reasons=reasons,
        )
        self._events.send([*message.envelope, protocol.encode(reply)])

    def _publish_trained(self) -> None:
        """Between two batches: serve the trainer's candidate, if one passed its holdout check."""
        candidate = self.trainer.take_candidate()
        if candidate is None:
            return
        if candidate.base_version != self.engine.model.version:
            self.trainer.settle(candidate, False, "the serving model changed during the round")
        elif self.trainer.paused and not candidate.forced:
            self.trainer.settle(candidate, False, "training was paused during the round")
        else:
            self.install_model(candidate.model, "train", **candidate.info)
            self.trainer.settle(candidate, True)

    def install_model(self, model: ServingModel, source: str, **info) -> int:
        """Serve `model` from the next batch on as version + 1, and keep it in the version history."""
        model.version = self.engine.model.version + 1
        self.engine.swap_model(model)
        self.versions.add(self.engine.model, source, **info)
        self.metrics.model_version.set(model.version)
        self.metrics.last_publish.set(time.time())
        return model.version

    # ---- control ----------------------------------------------------------------------------------------

    def _run_control(self, message: ControlMessage) -> None:
        if message.refused is not None:  # the I/O thread could not decode it: answer why, count by reason
            reason, why = message.refused
            self.metrics.control_rejections.labels(reason=reason).inc()
            reply = protocol.ControlReply(ok=False, error=why)
            self._outbox.send_multipart([CONTROL, *message.envelope, protocol.encode(reply)], copy=False)
            return
        request = message.request
        try:
            result = control.dispatch(self, request.cmd, request.args)
            self.durability.after_command()  # log what the command changed before answering it
            reply = protocol.ControlReply(ok=True, result=result)
            outcome = "ok"
        except control.CommandError as exc:
            reply = protocol.ControlReply(ok=False, error=str(exc))
            outcome = "error"
        except Exception:  # a bug in a command must not take the daemon down; its text stays in the log
            log.exception("control command %r failed", request.cmd)
            reply = protocol.ControlReply(ok=False, error=_internal_error(request.cmd))
            outcome = "internal_error"
        try:
            payload = protocol.encode(reply)
        except Exception:  # a result msgpack cannot hold is a bug in the command too
            log.exception("control command %r returned a result that cannot be encoded", request.cmd)
            payload = protocol.encode(protocol.ControlReply(ok=False, error=_internal_error(request.cmd)))
            outcome = "internal_error"
        known = request.cmd if request.cmd in control.COMMANDS else "unknown"
        self.metrics.control_commands.labels(command=known, outcome=outcome).inc()
        self._outbox.send_multipart([CONTROL, *message.envelope, payload], copy=False)
        if request.cmd == "shutdown" and reply.ok:
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
            "sequence_gaps": self.stats.sequence_gaps,
            "evictions": dict(self.stats.evictions),
            "evicted_filter": self.store.evicted.status(),
            "queue_depth": self._backlog + self._events.pending() + self.inbox.qsize(),
            "inflight_bytes": self._events.pending_bytes if self._events is not None else 0,
            "drops": dict(self.stats.drops),
            "io": self._io.status() if self._io is not None else {},
            "durability": self.durability.status(),
            "train": self.trainer.status() if self.trainer is not None else {"enabled": False},
        }
