"""The one object that owns every Prometheus metric of the daemon (namespace `lstmd_`, units in names),
and the small HTTP server that exposes them with the daemon's health endpoints.

The serving loop, the trainer and the durability code only call methods/attributes of `Metrics`; the
registry is injected so tests use a fresh `CollectorRegistry` and read values with `get_sample_value`.

HTTP endpoints (`Metrics.serve_http`):
  /metrics  Prometheus text exposition of the injected registry (prometheus_client's WSGI app)
  /healthz  200 while the process answers (liveness); 503 once the serving loop, after calling `beat()` at
            least once, has not called it for `stall_timeout_s` (a hung loop is restarted, not left serving
            nothing), or while a check added with `add_health_check` fails (the daemon adds the I/O thread and
            the publisher); the body names each failing part and why. A daemon that never calls `beat()` and
            adds no check is judged by the process alone.
  /readyz   200 once `set_ready(True)` was called (sockets bound, state restored) and while /healthz is 200;
            503 before, after `set_ready(False)` (readiness: take the instance out of a load balancer while it
            drains), and while unhealthy

The dashboards and alert rules in deploy/ query these names; renaming one breaks them (the tests in
tests/test_prometheus_live.py run every expression against a real Prometheus).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from lstmd.daemon.stall_dump import StallDump
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

# Event latency from receipt to reply: resolve 100 µs .. 1 s.
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = tuple(float(2**k) for k in range(0, 17))  # 1 .. 65536 events
DURATION_BUCKETS = (1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Label values known up front. Their series are created at zero when `Metrics` is built, so a rate() over
# them is 0 rather than absent on a healthy daemon, and dashboards and alert rules always find them.
EVENT_STATUSES = ("ok", "duplicate", "state_reset", "rejected")
EVICTION_CAUSES = ("capacity", "ttl", "drop")
TRAIN_OUTCOMES = ("published", "rejected", "diverged", "skipped")
HOLDOUT_MODELS = ("serving", "candidate", "baseline")
DEVICE_MEMORY_KINDS = ("allocated", "reserved")
DROP_REASONS = (
    ("reply", "peer_not_reading"),
    ("reply", "peer_gone"),
    ("request", "peer_gone"),
    ("publish", "queue_full"),
)
AUTH_FAILURE_REASONS = ("unknown_key", "wrong_role", "no_curve", "bad_handshake")  # what daemon/auth.py counts


class Metrics:
    """Every metric lstmd exports. Create one per daemon with the registry it should register in.

    Attributes are plain prometheus_client objects: the daemon calls `.inc()`, `.set()`, `.observe()` and
    `.labels(...)` on them directly. Label values in use: `events{status}` ok|duplicate|state_reset|rejected;
    `rejections{reason}` (free-form reason names); `evictions{cause}` capacity|ttl|drop;
    `train_rounds{outcome}` published|rejected|diverged|skipped (and `train_resets`, the trainer's restarts from
    the serving weights after failed rounds in a row); `holdout_loss{model}` serving|candidate|baseline (the
    last value); `forecast_error_ratio{forecast}` served|model|seasonal|level (seasonal with train.season, level
    with train.level_rate);
    `device_memory{kind}` allocated|reserved;
    `control_commands{command, outcome}` outcome ok|error|internal_error|refused;
    `control_rejections{reason}` malformed|protocol_version|bad_args|internal_error|overloaded;
    `auth_failures{reason}` unknown_key|wrong_role|no_curve|bad_handshake.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        process_metrics: bool = True,
        stall_timeout_s: float = 120.0,
        stall_dump_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.stall_timeout_s = stall_timeout_s
        self.stall_dump = StallDump(stall_dump_s, clock)  # the threads' stacks in the log when the loop stalls
        self._clock = clock
        self._last_beat: float | None = None
        self._health_checks: dict[str, Callable[[], str]] = {}
        r = self.registry
        # Events and rejections.
        self.events = Counter("lstmd_events", "Events answered, by status", ["status"], registry=r)
        self.rejections = Counter(
            "lstmd_rejections",
            "Rejected events (or whole messages that could not be decoded), by reason",
            ["reason"],
            registry=r,
        )
        self.sequence_gaps = Counter("lstmd_sequence_gaps", "Missing per-stream sequence numbers seen", registry=r)
        self.duplicates_unavailable = Counter(
            "lstmd_duplicates_unavailable",
            "Duplicate events answered without their prediction (older than serve.resend_window)",
            registry=r,
        )
        # Serving loop.
        self.batch_size = Histogram(
            "lstmd_batch_size_events", "Events per serving batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.event_latency = Histogram(
            "lstmd_event_latency_seconds",
            # Receipt is the serving loop's read of the message from the events socket: time a message waited in
            # the socket's queue before that is not seen (libzmq does not timestamp); the queue depth gauge is.
            "Time from the serving loop's read of an event's message to its reply",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "lstmd_step_duration_seconds",
            "Duration of one kernel step plus output head",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "lstmd_input_queue_depth_messages", "Messages waiting for the serving loop", registry=r
        )
        self.control_commands = Counter(
            "lstmd_control_commands", "Control commands handled", ["command", "outcome"], registry=r
        )
        self.control_rejections = Counter(
            "lstmd_control_rejections",
            "Control requests refused before any command ran (not decodable, bad arguments), by reason",
            ["reason"],
            registry=r,
        )
        # Abuse and back-pressure (daemon/io.py): what was dropped instead of held, and the queues' bytes.
        self.dropped = Counter(
            "lstmd_dropped_messages",
            "Messages dropped instead of queued without bound: replies to peers gone or not reading, requests of "
            "peers gone, prediction batches beyond serve.publish_queue_bytes",
            ["what", "reason"],
            registry=r,
        )
        self.events_disconnects = Counter(
            "lstmd_events_disconnects",
            "Events connections that ended: closed by the peer, or by ZeroMQ for a frame over twice "
            "serve.max_message_bytes (read no further, never allocated)",
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "lstmd_inflight_bytes", "Bytes of events requests read and waiting for the serving loop", registry=r
        )
        self.publish_queue_bytes = Gauge(
            "lstmd_publish_queue_bytes", "Bytes of predictions waiting for the publisher", registry=r
        )
        self.io_failures = Counter(
            "lstmd_io_thread_failures", "Failures of the I/O thread (it carries on up to a limit)", registry=r
        )
        self.auth_failures = Counter(
            "lstmd_auth_failures",
            "Clients refused by CurveZMQ security (daemon/auth.py), by reason",
            ["reason"],
            registry=r,
        )
        # State store.
        self.active_streams = Gauge("lstmd_active_streams", "Streams holding a state slot", registry=r)
        self.capacity = Gauge("lstmd_state_capacity_streams", "State slots available in total", registry=r)
        self.evictions = Counter("lstmd_evictions", "Streams evicted, by cause", ["cause"], registry=r)
        # Training.
        self.train_rounds = Counter("lstmd_train_rounds", "Training rounds, by outcome", ["outcome"], registry=r)
        self.train_resets = Counter(
            "lstmd_train_resets",
            "Trainer restarts from the serving weights after train.reset_after_rejections failed rounds in a row",
            registry=r,
        )
        self.train_loss = Gauge("lstmd_train_loss", "Mean training loss of the last round", registry=r)
        self.holdout_loss = Gauge(
            "lstmd_holdout_loss", "Loss on the held-out recent slice, by model", ["model"], registry=r
        )
        # The forecast guard (daemon/normalization.py): refreshed by the loop's housekeeping every few seconds.
        self.forecast_fallback_streams = Gauge(
            "lstmd_forecast_fallback_streams",
            "Forecast streams served the last value (the guard's gain below 0.1 in every column)",
            registry=r,
        )
        self.forecast_gain = Gauge(
            "lstmd_forecast_gain_mean", "Mean guard gain over forecast streams (1: the model's change as predicted)",
            registry=r,
        )
        self.forecast_seasonal_streams = Gauge(
            "lstmd_forecast_seasonal_streams",
            "Forecast streams whose guard leans on the seasonal-naive forecast (weight >= 0.5 in a column; "
            "train.season)",
            registry=r,
        )
        self.forecast_error_ratio = Gauge(
            "lstmd_forecast_error_ratio",
            "Recent squared forecast error over the last value's, all streams in their own scales (served: after the "
            "guard; model: the model's unshrunk forecast; seasonal: the seasonal naive, with train.season; level: "
            "the stream's level, with train.level_rate)",
            ["forecast"],
            registry=r,
        )
        self.train_round_duration = Histogram(
            "lstmd_train_round_duration_seconds",
            "Duration of a training round",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge("lstmd_model_version", "Version of the serving weights", registry=r)
        self.last_publish = Gauge(
            "lstmd_last_publish_timestamp_seconds", "Unix time the serving weights last changed", registry=r
        )
        self.train_enabled = Gauge(
            "lstmd_train_enabled", "1 while online training is enabled and not paused, else 0", registry=r
        )
        # Durability.
        self.wal_bytes = Counter("lstmd_wal_bytes", "Bytes appended to the write-ahead log", registry=r)
        self.wal_fsync_duration = Histogram(
            "lstmd_wal_fsync_duration_seconds", "Duration of WAL fsyncs", buckets=LATENCY_BUCKETS, registry=r
        )
        self.snapshot_duration = Histogram(
            "lstmd_snapshot_duration_seconds", "Duration of snapshots", buckets=DURATION_BUCKETS, registry=r
        )
        self.last_snapshot = Gauge(
            "lstmd_last_snapshot_timestamp_seconds", "Unix time of the last completed snapshot", registry=r
        )
        # Cluster mode (daemon/cluster/): zero and absent moves in single-process mode.
        self.cluster_key_groups = Gauge("lstmd_cluster_key_groups", "Key groups this replica owns", registry=r)
        self.cluster_moves = Counter(
            "lstmd_cluster_key_group_moves",
            "Key groups claimed, released (handed over), or lost to another member's claim (fenced)",
            ["kind"],
            registry=r,
        )
        for kind in ("claimed", "released", "fenced"):
            self.cluster_moves.labels(kind)
        self.cluster_log_pending = Gauge(
            "lstmd_cluster_log_pending_records",
            "Records in the cluster's log after the last one this replica read (its consumer lag, all key groups)",
            registry=r,
        )
        self.cluster_rebalances = Counter(
            "lstmd_cluster_rebalances", "Changes of the key groups this replica owns (a join, leave, death or drain)",
            registry=r,
        )
        self.cluster_failovers = Counter(
            "lstmd_cluster_failovers",
            "Key groups claimed from a member whose heartbeat had expired (restored from its last snapshot + log)",
            registry=r,
        )
        self.cluster_dropped_answers = Counter(
            "lstmd_cluster_dropped_answers",
            "Answers not sent: their key group moved away meanwhile (fenced or handed over; the new owner answers "
            "the producer's resend)",
            registry=r,
        )
        self.cluster_members = Gauge("lstmd_cluster_members", "Live cluster members this replica sees", registry=r)
        self.cluster_key_groups_total = Gauge(
            "lstmd_cluster_key_groups_configured", "cluster.key_groups (G): the key groups of the whole cluster",
            registry=r,
        )
        # Process.
        self.device_memory = Gauge(
            "lstmd_device_memory_bytes", "Accelerator memory held by the daemon", ["kind"], registry=r
        )
        self.build_info = Info("lstmd_build", "Version, kernel backend and device", registry=r)
        self.ready = Gauge(
            "lstmd_ready", "1 once sockets are bound and state is restored (what /readyz answers)", registry=r
        )
        if process_metrics:
            # process_* (CPU, RSS, open fds, start time) and python_info, as the default registry has them.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

        self._ready = threading.Event()
        _touch(self.events, EVENT_STATUSES)
        _touch(self.evictions, EVICTION_CAUSES)
        _touch(self.train_rounds, TRAIN_OUTCOMES)
        for what, reason in DROP_REASONS:
            self.dropped.labels(what, reason)
        _touch(self.auth_failures, AUTH_FAILURE_REASONS)
        # Losses are unknown until the first round: NaN says "not measured", where 0 would read as perfect.
        self.train_loss.set(float("nan"))
        for model in HOLDOUT_MODELS:
            self.holdout_loss.labels(model).set(float("nan"))
        for kind in DEVICE_MEMORY_KINDS:
            self.device_memory.labels(kind).set(0)
        for forecast in ("served", "model"):
            self.forecast_error_ratio.labels(forecast).set(float("nan"))
        self.forecast_gain.set(float("nan"))

    # --- state the daemon reports --------------------------------------------------------------------------

    def set_guard(self, summary: dict) -> None:
        """The forecast guard's gauges from daemon/normalization.py's guard_summary (None: not measured yet)."""
        nan = float("nan")
        self.forecast_fallback_streams.set(summary.get("fallback_streams", 0))
        self.forecast_seasonal_streams.set(summary.get("seasonal_streams", 0))
        self.forecast_gain.set(summary.get("mean_gain") if summary.get("mean_gain") is not None else nan)
        for forecast, value in (summary.get("error_vs_last_value") or {}).items():
            self.forecast_error_ratio.labels(forecast).set(nan if value is None else value)

    def set_ready(self, ready: bool) -> None:
        """Mark the daemon ready (sockets bound, state restored) or not (starting, draining)."""
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
        self.ready.set(1 if ready else 0)

    def is_ready(self) -> bool:
        """What /readyz answers."""
        return self._ready.is_set()

    def beat(self) -> None:
        """Called by the serving loop every iteration (cheap: one clock read); arms the /healthz stall check and
        pushes back the stall dump (daemon/stall_dump.py)."""
        self._last_beat = self._clock()
        self.stall_dump.beat()

    def stalled_for(self) -> float:
        """Seconds since the loop's last `beat()` beyond `stall_timeout_s`; 0 when healthy or never armed."""
        if self._last_beat is None:
            return 0.0
        silent = self._clock() - self._last_beat
        return silent if silent > self.stall_timeout_s else 0.0

    def add_health_check(self, name: str, check: Callable[[], str]) -> None:
        """`check()` returns '' while `name` is healthy, else why not; /healthz and /readyz answer 503 then."""
        self._health_checks[name] = check

    def unhealthy(self) -> list[str]:
        """One line per failing part: the serving loop's stall, then each added check; empty when healthy."""
        problems = []
        stalled = self.stalled_for()
        if stalled:
            problems.append(f"serving loop stalled {stalled:.0f}s")
        for name, check in self._health_checks.items():
            why = check()
            if why:
                problems.append(f"{name}: {why}")
        return problems

    def set_build_info(self, version: str, backend: str, device: str) -> None:
        """Publish `lstmd_build_info{version, backend, device} 1`, e.g. backend triton, device cuda:0."""
        self.build_info.info({"version": str(version), "backend": str(backend), "device": str(device)})

    def watch_device_memory(self, device: object) -> None:
        """Report torch's CUDA caching-allocator memory for `device` at every scrape; 0 for a CPU device.

        Read lazily at scrape time (no polling thread). torch is imported only for a CUDA device, so the
        metrics module stays importable without it.
        """
        kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
        if kind != "cuda":
            for name in DEVICE_MEMORY_KINDS:
                self.device_memory.labels(name).set(0)
            return
        import torch

        self.device_memory.labels("allocated").set_function(lambda: torch.cuda.memory_allocated(device))
        self.device_memory.labels("reserved").set_function(lambda: torch.cuda.memory_reserved(device))

    # --- HTTP ----------------------------------------------------------------------------------------------

    def wsgi_app(self) -> Callable:
        """The WSGI application behind `serve_http`: /metrics, /healthz, /readyz (404 elsewhere)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "/")
            if path == "/metrics":
                return metrics_app(environ, start_response)
            if path == "/healthz":
                problems = self.unhealthy()
                if problems:
                    return _plain(start_response, "503 Service Unavailable", "".join(f"{p}\n" for p in problems))
                return _plain(start_response, "200 OK", "ok\n")
            if path == "/readyz":
                problems = self.unhealthy() if self.is_ready() else ["not ready"]
                if not problems:
                    return _plain(start_response, "200 OK", "ready\n")
                return _plain(start_response, "503 Service Unavailable", "".join(f"{p}\n" for p in problems))
            if path == "/":
                return _plain(start_response, "200 OK", "lstmd: see /metrics, /healthz, /readyz\n")
            return _plain(start_response, "404 Not Found", "not found\n")

        return app

    def serve_http(self, address: str) -> WSGIServer:
        """Serve /metrics, /healthz and /readyz at "host:port" from a daemon thread.

        Port 0 picks a free port (read it back from `server.server_address[1]`). Returns the server; the
        daemon stops it with `server.shutdown()` then `server.server_close()`.
        """
        host, port = parse_address(address)
        server_class = _ThreadingWSGIServerV6 if ":" in host else _ThreadingWSGIServer
        server = make_server(host, port, self.wsgi_app(), server_class, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="lstmd-metrics-http", daemon=True)
        thread.start()
        return server


GATEWAY_OUTCOMES = ("answered", "rejected", "unavailable", "forgotten")
GATEWAY_KINDS = ("events", "targets")


class GatewayMetrics:
    """The metrics of a cluster gateway (`lstmd gateway`, daemon/cluster/gateway.py): its own small set, not
    the daemon's (it serves no state), with the daemon's /metrics, /healthz and /readyz endpoints.

    Label values: `gateway_requests{outcome}` answered (every key group answered) | rejected (refused at the
    gateway) | unavailable (the log did not take it) | forgotten (no answer within the gateway's horizon) |
    timed_out (a forecast its owners did not answer within cluster.forecast_timeout_s);
    `gateway_events{kind}` events | targets | forecasts (streams asked for); `gateway_rejections{reason}` the
    events socket's reasons (malformed, overloaded, ...); `auth_failures{reason}` as the daemon's."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.stall_timeout_s = 0.0
        self._last_beat: float | None = None  # the gateway has no serving loop to watch: no stall check
        self._health_checks: dict[str, Callable[[], str]] = {}
        self._ready = threading.Event()
        r = self.registry
        self.inflight_requests = Gauge(
            "lstmd_gateway_inflight_requests", "Producer messages forwarded to the cluster and not yet answered",
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "lstmd_gateway_inflight_bytes", "Bytes of the producer messages in flight (against inflight_limit)",
            registry=r,
        )
        self.inflight_limit = Gauge(
            "lstmd_gateway_inflight_limit_bytes", "serve.max_inflight_bytes: beyond it requests wait", registry=r
        )
        self.requests = Counter("lstmd_gateway_requests", "Producer messages finished, by outcome", ["outcome"],
                                registry=r)
        self.events = Counter("lstmd_gateway_events", "Events and delayed targets forwarded to the log", ["kind"],
                              registry=r)
        self.rejections = Counter(
            "lstmd_gateway_rejections",
            "Producer messages the gateway's events socket answered with an error before forwarding (undecodable, "
            "overloaded), by reason",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "lstmd_gateway_log_duplicates",
            "Records JetStream had already stored (a producer's resend): republished for their owner to answer",
            registry=r,
        )
        self.request_duration = Histogram(
            "lstmd_gateway_request_duration_seconds",
            "Forwarding a producer message to its last key group's answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "lstmd_auth_failures", "Clients refused by CurveZMQ security (daemon/auth.py), by reason", ["reason"],
            registry=r,
        )
        self.build_info = Info("lstmd_build", "Version, kernel backend and device", registry=r)
        self.ready = Gauge("lstmd_ready", "1 once the gateway serves (what /readyz answers)", registry=r)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        _touch(self.requests, GATEWAY_OUTCOMES)
        _touch(self.events, GATEWAY_KINDS)
        _touch(self.rejections, ("overloaded",))
        _touch(self.auth_failures, AUTH_FAILURE_REASONS)

    # The daemon's health and HTTP code, shared as is: it reads only registry, _ready, _health_checks and the
    # (never armed) stall clock, which this class holds with the same meaning.
    set_ready = Metrics.set_ready
    is_ready = Metrics.is_ready
    stalled_for = Metrics.stalled_for
    add_health_check = Metrics.add_health_check
    unhealthy = Metrics.unhealthy
    set_build_info = Metrics.set_build_info
    wsgi_app = Metrics.wsgi_app
    serve_http = Metrics.serve_http


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (also "[::1]:port" and ":port", which binds loopback) into (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must look like host:port (e.g. 127.0.0.1:9108), got {address!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _touch(counter: Counter, values: Iterable[str]) -> None:
    for value in values:
        counter.labels(value)


def _plain(start_response, status: str, body: str):
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow scraper never blocks a probe."""

    daemon_threads = True


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Scrapes and probes every few seconds would flood the daemon's log."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass
