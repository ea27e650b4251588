"""The daemon's endpoints: set-up and teardown of everything it listens on, in the order that start-up needs.

`Endpoints` owns the ZeroMQ context, the events source (the events socket, or in cluster mode the replica's
ClusterSource), the I/O thread with its control and publish sockets, the loop's outbox to that thread, the
metrics HTTP server and the CurveZMQ security (keys, ZAP thread). `Daemon.start()` calls `prepare()` (keys, the
state directory, /metrics with /readyz at 503) before the restore and `open()` (the sockets, their health checks)
after it; `close()` tears down in the reverse order. Its `addresses` are what `daemon.endpoints` shows. It
serves nothing itself: the serving loop reads the events source and writes the outbox.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import zmq
from lstmd.daemon.auth import AuthError, Security, insecure_endpoints
from lstmd.daemon.config import Config
from lstmd.daemon.io import EventsBudgets, EventsLimits, EventsSocket, Inbox, IOThread, PublishBudget

# Messages libzmq queues per subscriber at least, whatever serve.publish_queue_bytes: small batches at a high rate
# would otherwise be dropped for a subscriber only a few milliseconds behind.
_MIN_PUBLISH_HWM = 16


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


class Endpoints:
    """Sockets, the I/O thread, the metrics server and security of one daemon; `open()` binds, `close()` ends."""

    def __init__(
        self,
        config: Config,
        metrics,
        inbox: Inbox,
        engine,
        store,
        online,
        on_rejected: Callable[[str], None],
        on_dropped: Callable[[str, str], None],
    ) -> None:
        self.config, self.metrics, self.inbox = config, metrics, inbox
        self.engine, self.store = engine, store
        self.online = online  # daemon/online.py: the trainer and the install path a replica's cluster versions take
        self.on_rejected, self.on_dropped = on_rejected, on_dropped  # the loop's counters (Daemon's accounting)
        self.addresses: dict[str, str] = {}
        self.ctx: zmq.Context | None = None
        self.security: Security | None = None  # CurveZMQ keys and the ZAP thread, with [security] set
        self.io: IOThread | None = None
        self.events: EventsSocket | None = None
        self.outbox: zmq.Socket | None = None
        self.http = None

    def prepare(self) -> Path:
        """Before the restore: the CURVE keys, a writable state directory, and /metrics (with /readyz at 503, so
        a long restore is observable); returns the state directory."""
        self._start_security()
        state_dir = self._writable_state_dir()
        if self.config.serve.metrics:
            self._serve_metrics(self.config.serve.metrics)
        return state_dir

    def open(self) -> None:
        """After the restore: bind the events and I/O thread's sockets and watch them (nothing is served from a
        half-restored state)."""
        self._bind_sockets()
        self._watch_io()

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
            self.http = self.metrics.serve_http(address)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise StartupError(f"cannot serve metrics on {address}: {why}") from None
        self.addresses["metrics"] = f"{address.rpartition(':')[0]}:{self.http.server_port}"

    def _bind_sockets(self) -> None:
        """The events socket, the I/O thread's control and publish sockets (ZAP first), and the outbox to it."""
        serve = self.config.serve
        self.ctx = zmq.Context()
        secure = None
        try:
            if self.security is not None:  # ZAP first: a CURVE socket must never accept before it can ask
                self.security.start(self.ctx)
                secure = self.security.secure
            self.events = self._cluster_source() if self.config.cluster.nats else EventsSocket(
                self.ctx,
                serve.events,
                self.engine.model.spec.input_size,
                serve.max_message_events,
                serve.max_message_bytes,
                self.on_rejected,
                target_dim=self.engine.task.wire_target_dim,
                max_stream_id_length=serve.max_stream_id_length,
                budgets=EventsBudgets(serve.max_inflight_bytes, serve.max_peer_inflight_bytes, self._max_reply_bytes()),
                on_dropped=self.on_dropped,
                secure=secure,
                task=self.engine.task.name,
                ends=self.config.model.output == "end",
            )
            self.io = IOThread(
                self.ctx,
                self.inbox,
                serve.control,
                serve.publish,
                publish_budget=PublishBudget(serve.publish_queue_bytes),
                publish_hwm=max(_MIN_PUBLISH_HWM, serve.publish_queue_bytes // self._max_publish_bytes()),
                monitor=self.events.monitor,
                on_failure=self.metrics.io_failures.inc,
                on_disconnect=self.metrics.events_disconnects.inc,
                on_handshake_failed=self.security.handshake_failed if self.security else lambda event: None,
                on_control_overloaded=self.metrics.control_rejections.labels(reason="overloaded").inc,
                secure=secure,
            )
        except Exception as exc:
            if self.events is not None:
                self.events.close()
                self.events = None
            if self.security is not None:
                self.security.stop()
            self.ctx.term()
            self.close_http()
            raise StartupError(str(exc)) from None
        self.addresses |= {"events": self.events.endpoint, **self.io.endpoints}
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.SNDHWM, 0)  # never drop a reply
        self.outbox.connect(self.io.outbox_endpoint)
        self.io.start()

    def _watch_io(self) -> None:
        stall = self.metrics.stall_timeout_s
        self.metrics.add_health_check("io", lambda: self.io.health(stall))
        self.metrics.add_health_check("publisher", lambda: self.io.publisher_health())
        self.metrics.inflight_bytes.set_function(lambda: self.events.pending_bytes)
        self.metrics.publish_queue_bytes.set_function(lambda: self.io.publish_budget.used)

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
        from lstmd.daemon.cluster.replica import ClusterSource  # imports nats-py: only in cluster mode
        from lstmd.daemon.cluster.weights import installer

        serve = self.config.serve
        limits = EventsLimits(self.engine.model.spec.input_size, serve.max_message_events, None,
                              self.engine.task.wire_target_dim, self.engine.task.name,
                              ends=self.config.model.output == "end")
        return ClusterSource(self.config.cluster, limits, self.config.serve.max_inflight_bytes, self.store,
                             lambda: self.engine.model.version, self.metrics, lambda: self.engine.model,
                             installer(self.online.install_model, self.engine, self.online.trainer))

    def _max_reply_bytes(self) -> int:
        """The largest events reply: per event a status byte, the prediction and a rejection reason's text."""
        return self.config.serve.max_message_events * (1 + 4 * self.engine.model.spec.output_size + 128) + 1024

    def _max_publish_bytes(self) -> int:
        """The largest PUB message: per event of a full batch its prediction, seq and a stream id (a long one)."""
        serve = self.config.serve
        return serve.max_batch * (4 * self.engine.model.spec.output_size + 9 + serve.max_stream_id_length + 3) + 1024

    def close(self) -> None:
        """The teardown half of the daemon's shutdown: events source, I/O thread, outbox, HTTP, ZAP, context."""
        if self.events is not None:
            self.events.close()
        if self.io is not None:
            self.io.stop()
            self.io.join(5)
        if self.outbox is not None:
            self.outbox.close(linger=0)
        self.close_http()
        if self.security is not None:
            self.security.stop()
        if self.ctx is not None:
            self.ctx.term()

    def close_http(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
