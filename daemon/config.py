"""lstmd's configuration: one TOML file, overridden by `LSTMD_<SECTION>__<KEY>` variables, then by `--set`.

This module owns the schema (msgspec Structs; each key's type, default, range and one-line description in its
annotation), where each value came from, the checks, and everything generated from the schema: the commented
sample of `lstmd config init`, the TOML of `lstmd config show` and the reference docs/config.md. A section or key
added to the schema appears in all of them by itself.

Errors name the key as `section.key`, say which source set it (the file, an `LSTMD_` variable, `--set`) and
suggest the nearest valid key. An `LSTMD_` variable that names no key is a warning, not a failure: environments
carry stray variables. Every number is range-checked and NaN/Inf are refused. With `model.path` set, the model
file's metadata defines the sizes and the task. Defaults bind to loopback only.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from lstmd.daemon.model_header import ConfigError, model_file_metadata

__all__ = ["ConfigError", "model_file_metadata"]  # defined in model_header.py (model.py reads headers too)

log = logging.getLogger("lstmd.config")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def doc(description: str, **bounds: float) -> msgspec.Meta:
    """A key's one-line description (`lstmd config init`, docs/config.md) and its range (gt, ge, lt, le)."""
    return msgspec.Meta(description=description, **bounds)


class ModelConfig(_Section):
    """The LSTM and its output head. With `path` set, the sizes and the task come from that file."""

    input_size: Annotated[int, doc("features per event", ge=1)] = 8
    hidden_size: Annotated[int, doc("LSTM hidden units per layer", ge=1)] = 64
    num_layers: Annotated[int, doc("stacked LSTM layers", ge=1)] = 1
    output_size: Annotated[int, doc("predicted values per event (classes for classification)", ge=1)] = 1
    task: Annotated[
        Literal["regression", "classification", "forecast"],
        doc("regression (MSE), classification (over output_size classes) or forecast (the next event)"),
    ] = "regression"
    seed: Annotated[int, doc("seed of the fresh weights when no path is given", ge=0)] = 0
    path: Annotated[
        str, doc("a safetensors model file to serve from the first event; its metadata sets the sizes and task")
    ] = ""
    # forecast: the feature columns (indices into an event's features, distinct) the model predicts for the
    # next event; output_size = len(forecast_columns). Empty: all features (output_size = input_size). They
    # travel in the model file's metadata; a model file whose columns differ is refused at start and on import.
    forecast_columns: Annotated[
        list[int], doc("forecast: the feature columns predicted for the next event; empty: all of them")
    ] = []
    # "end" (many-to-one): an event may end its stream's sequence (Producer.send(..., ends=...)); only its reply
    # carries a prediction, the sequence's output, and the stream's state starts from zero after it. Training then
    # puts the loss on the end step of whole sequences (train.max_sequence). Not for forecast models.
    output: Annotated[
        Literal["every", "end"],
        doc('every: a prediction per event; end: one per sequence, on its end event (state reset after it)'),
    ] = "every"


class ServeConfig(_Section):
    """Sockets, devices and the serving loop's batching and admission limits."""

    events: Annotated[str, doc("ZeroMQ endpoint producers send events to")] = "tcp://127.0.0.1:5555"
    control: Annotated[str, doc("ZeroMQ endpoint of control commands (lstmd status, Admin)")] = "tcp://127.0.0.1:5556"
    publish: Annotated[str, doc("ZeroMQ PUB endpoint of predictions; empty: none")] = "tcp://127.0.0.1:5557"
    metrics: Annotated[str, doc("host:port of /metrics, /healthz, /readyz; empty: none")] = "127.0.0.1:9108"
    device: Annotated[Literal["auto", "cpu", "cuda"], doc("where states and weights live; auto: cuda if present")] = (
        "auto"
    )
    # auto: Triton on CUDA, the daemon's CPU step on CPU (kernels/cpu_step.py); torch: the PyTorch reference
    backend: Annotated[
        Literal["auto", "triton", "torch"], doc("step kernels; auto: Triton on CUDA, the CPU step on CPU")
    ] = "auto"
    max_batch: Annotated[int, doc("events per serving batch", ge=1)] = 16384
    max_wait_ms: Annotated[float, doc("how long the loop gathers events before stepping", ge=0)] = 1.0
    max_message_events: Annotated[int, doc("events per message; larger messages are rejected whole", ge=1)] = 65536
    max_message_bytes: Annotated[
        int, doc("bytes per events frame; larger: frame_too_large (ZeroMQ disconnects past twice this)", ge=1)
    ] = 64 * 1024 * 1024
    max_new_streams_per_message: Annotated[
        int, doc("new stream ids one message may create (admission control against id floods)", ge=1)
    ] = 65536
    max_stream_id_length: Annotated[int, doc("characters of a string stream id", ge=1)] = 256
    # A duplicate (stream, seq) among the stream's last N sequence numbers is answered with its original
    # prediction. Preallocated: state.capacity x N x (8 + 4 x output_size) bytes.
    resend_window: Annotated[
        int, doc("outputs kept per stream for resends; 0: a duplicate's prediction is reported unavailable", ge=0)
    ] = 8
    # Memory under abuse (docs/operations.md, "Memory bound"): events requests read and not yet taken by the
    # serving loop, all peers / one peer (beyond: whole-message rejection `overloaded`); the per-peer value also
    # sizes libzmq's receive and reply queues of each connection.
    max_inflight_bytes: Annotated[
        int, doc("bytes of events requests waiting for the serving loop, all producers; beyond: overloaded", ge=1)
    ] = 256 * 2**20
    max_peer_inflight_bytes: Annotated[
        int, doc("the same for one producer (at most max_inflight_bytes); sizes its socket queues too", ge=1)
    ] = 64 * 2**20
    # Control requests received and waiting for the serving loop (a model import is one, up to 64 MiB): beyond it
    # the I/O thread answers `overloaded` (lstmd_control_rejections_total{reason="overloaded"}).
    max_control_inbox_bytes: Annotated[
        int, doc("bytes of control requests waiting for the serving loop; beyond: overloaded (one always fits)", ge=1)
    ] = 64 * 2**20
    # Predictions waiting for the publisher (beyond: the batch is not published, counted), and the bytes libzmq
    # queues per subscriber (beyond: dropped for that subscriber).
    publish_queue_bytes: Annotated[
        int, doc("bytes of predictions waiting to be published; beyond: the batch is dropped, counted", ge=1)
    ] = 64 * 2**20
    # torch intra-op threads on the CPU, process-wide (0: torch's default, one per core). 1 is best on small
    # machines: OpenMP workers spin against the I/O thread and the producers (2 cores: 80k vs 460k events/s).
    cpu_threads: Annotated[int, doc("torch intra-op threads on the CPU; 0: one per core", ge=0)] = 1
    # Threads the CPU step splits each wave over (kernels/cpu_step.py: disjoint rows, one torch thread each, not
    # torch's OpenMP pool); 0: one per usable core, at most 4. Measured on 2 cores only (docs/benchmarks.md).
    step_threads: Annotated[int, doc("threads the CPU step splits a batch over; 0: one per core, at most 4", ge=0)] = 0
    # daemon/device_step.py: one graph per batch size bucket (powers of two, 16..16384), all captured as the daemon
    # starts; weights are copied into the captured tensors when a model is published. Forecast models step
    # through the engine's general path instead (their per-stream adaptation is not in the graph).
    cuda_graphs: Annotated[bool, doc("cuda: replay the serving step from CUDA graphs, one per batch-size bucket")] = (
        True
    )
    # daemon/stall_dump.py: written by faulthandler's C thread, so even a stall that holds the GIL is explained.
    stall_dump_s: Annotated[
        float, doc("write every thread's Python stack to the log when the loop stalls this long; 0: off", ge=0)
    ] = 30.0


class StateConfig(_Section):
    """The per-stream state table and the directory of snapshots and the write-ahead log."""

    dir: Annotated[str, doc("state directory: snapshots, WAL, endpoints.json, the lock of the daemon using it")] = (
        "lstmd-state"
    )
    capacity: Annotated[int, doc("state-table rows (streams resident at once)", ge=1)] = 1_000_000
    idle_ttl_s: Annotated[float, doc("evict streams idle this long; 0: never", ge=0)] = 0.0
    on_full: Annotated[Literal["evict", "reject"], doc("when full: LRU-evict idle streams, or reject new ones")] = (
        "evict"
    )
    # Evicted ids are remembered in a Bloom filter (daemon/state_store.py EvictedFilter) so that each one's next
    # event is answered `state_reset`, however many were evicted (no false negatives). Sized for this many distinct
    # evicted ids at this false-positive rate (a never-seen id answered `state_reset` for its first event):
    # -ln(rate) / ln(2)^2 bits per id, 18 MB for the defaults; past that many ids the rate grows.
    remember_evicted: Annotated[
        int, doc("distinct evicted ids the Bloom filter is sized for (each flagged state_reset on return)", ge=1)
    ] = 10_000_000
    evicted_false_positive_rate: Annotated[
        float, doc("the filter's false-positive rate at that size (a new id flagged state_reset)", gt=0, lt=1)
    ] = 0.001


class TrainConfig(_Section):
    """Online truncated-BPTT fine-tuning while serving (daemon/trainer.py, daemon/recorder.py)."""

    enabled: Annotated[bool, doc("train online while serving")] = False
    interval: Annotated[
        float, doc("seconds between rounds; 0: only the event trigger or `lstmd train now`", ge=0)
    ] = 10.0
    interval_events: Annotated[int, doc("also start a round after this many recorded events; 0: off", ge=0)] = 0
    k2: Annotated[int, doc("truncation length: steps per training window", ge=1)] = 32
    batch: Annotated[int, doc("windows per optimizer step, sampled across streams", ge=1)] = 64
    # steps, lr, holdout_windows, record_steps: chosen on the real series of benchmarks/learning.py --part suite
    # (docs/benchmarks.md "Online learning"): few large steps per round overfit the recent windows least.
    steps: Annotated[int, doc("optimizer steps per round", ge=1)] = 5
    optimizer: Annotated[Literal["adam", "sgd"], doc("the optimizer")] = "adam"
    lr: Annotated[float, doc("learning rate", gt=0)] = 1e-2
    # lr_half_life, lr_min, sample_half_life: chosen on the real series of benchmarks/learning.py --part suite, three
    # seeds each (docs/benchmarks.md "Issue 15, second session"): a mild recency weighting helped on every seed, a
    # decaying rate did not beat a constant one.
    lr_half_life: Annotated[
        float, doc("rounds over which the learning rate halves, restarting at `lr` with every optimizer reset "
                   "(drift reset, import, rollback); 0: constant", ge=0)
    ] = 0.0
    lr_min: Annotated[float, doc("the decayed learning rate's floor, as a fraction of `lr`", gt=0, le=1)] = 0.1
    sample_half_life: Annotated[
        float, doc("recency weighting of training windows: one this many windows older than its stream's newest "
                   "is drawn half as often; 0: uniform", ge=0)
    ] = 8.0
    clip_norm: Annotated[float, doc("gradient-norm clipping", gt=0)] = 1.0
    tolerance: Annotated[
        float, doc("publish when holdout loss <= serving loss * (1 + tolerance)", ge=0)
    ] = 0.0
    holdout_windows: Annotated[
        int, doc("newest windows of each recorded stream held out for the check (few streams: more)", ge=1)
    ] = 2
    forecast_inputs: Annotated[
        Literal["stream", "change", "level"],
        doc("forecast: the LSTM sees changes in each stream's own scale (with the guard), changes or levels "
            "(normalization.py)"),
    ] = "stream"
    # forecast: each window position is also rolled out horizon - 1 steps on the model's own predictions and scored
    # on every step (daemon/horizon.py), so forecasts beyond one step improve too; at most k2 (targets lie inside
    # the window). Costly on the CPU: the loss's forward + backward took ~11x the one-step loss's at horizon 6 and
    # 37-57x at 24 (B=64, T=32, H=64; docs/benchmarks.md "Multi-step accuracy").
    horizon: Annotated[
        int, doc("forecast: steps of the training loss (multi-step rollouts in each window); 1: one step", ge=1)
    ] = 1
    season: Annotated[
        int, doc("forecast: the seasonal-naive lag (events) the guard also falls back to, per stream, and that the "
                 "holdout also judges candidates against (horizon 1); 0: none, else >= 2; costs 4 * season * "
                 "output_size bytes per state slot", ge=0, le=100_000)
    ] = 0
    # The guard's level regressor (normalization.py): measured on the real-series suite, 0.1 took Nile from the last
    # value to ~0.8 of its error (the local-level optimum) and cost no other series more than 0.2%; fused into the C
    # adaptation it adds 0-5% to the CPU serving step in process (docs/benchmarks.md "Issue 15, seventh session"). The
    # daemon serves with served_level_rate(config): 0 where it does not apply; only a level_rate someone set is an
    # error there (_validate_train).
    level_rate: Annotated[
        float, doc("forecast: the rate of each stream's average level (simple exponential smoothing) that the guard "
                   "also mixes in, per stream; 0: none; the default 0.1 applies to forecast models with stream "
                   "inputs, the guard on and no train.season (elsewhere it is 0); set it with a season: an error",
                   ge=0, le=1)
    ] = 0.1
    # The switch exists to measure what the per-stream adaptation costs end to end (docs/benchmarks.md, "Issue 15,
    # third session"); off, every stream is served in the model's one scale per feature, which the trainer cannot
    # learn from (its errors are taken in each stream's own scale), hence frozen models only.
    guard: Annotated[
        bool, doc('forecast, "stream" inputs: per-stream scale and guard (daemon/normalization.py); false: the '
                  "model's one scale per feature for every stream and no guard, as forecast_inputs = change; for "
                  "measuring their cost on a frozen model (needs train.enabled = false and season = 0)")
    ] = True
    min_windows: Annotated[int, doc("fewer complete windows recorded than this: the round is skipped", ge=0)] = 4
    record_streams: Annotated[int, doc("streams the recorder keeps history for", ge=1)] = 1024
    record_steps: Annotated[int, doc("recent events kept per recorded stream; a multiple of k2", ge=1)] = 256
    # model.output = "end": a sequence longer than this trains on its last steps only, from the newest window
    # boundary (k2) that leaves at most max_sequence of them, starting from the state the stream had there.
    max_sequence: Annotated[
        int, doc('model.output = "end": longest sequence trained whole (BPTT); k2..record_steps', ge=1)
    ] = 256
    record_idle_s: Annotated[
        float, doc("a recorded stream idle this long may give its buffer to a new stream", ge=0)
    ] = 60.0
    history: Annotated[int, doc("published model versions kept for `lstmd model rollback`", ge=1)] = 8
    # after this many rejected or diverged rounds in a row, the trainer drops its own weights and optimizer state
    # and starts again from the serving weights (it has drifted somewhere worse); counted in
    # lstmd_train_resets_total. 0: never (a diverged round still restarts from the serving weights)
    reset_after_rejections: Annotated[
        int, doc("rejected rounds in a row after which training restarts from the serving weights; 0: never", ge=0)
    ] = 3
    threads: Annotated[int, doc("torch intra-op threads on the CPU; 0: leave them to serve.cpu_threads", ge=0)] = 0
    nice: Annotated[
        int, doc("niceness of the trainer thread (Linux), so serving wins the cores; 0: unchanged", ge=0, le=19)
    ] = 10


class DurabilityConfig(_Section):
    """The write-ahead log and snapshots: what survives a crash or a restart."""

    wal: Annotated[bool, doc("write-ahead log of applied events; off: nothing between snapshots survives a crash")] = (
        False
    )
    fsync: Annotated[
        Literal["always", "interval", "never"], doc("when the log is synced to disk (like Redis appendfsync)")
    ] = "interval"
    fsync_interval_ms: Annotated[
        float, doc("how often the background flusher syncs the log (fsync interval)", gt=0)
    ] = 1000.0
    snapshot_interval_s: Annotated[float, doc("periodic snapshot (the log is truncated); 0: none", ge=0)] = 300.0
    snapshot_wal_mb: Annotated[
        float, doc("also snapshot when the log's segment grows past this (bounds replay); 0: off", ge=0)
    ] = 256.0
    snapshot_on_shutdown: Annotated[bool, doc("write a snapshot on a clean stop")] = True
    keep_snapshots: Annotated[
        int, doc("newest snapshots kept; the log is kept from the oldest of them", ge=1)
    ] = 2
    restore: Annotated[bool, doc("load the newest valid snapshot and replay the log at start")] = True


class SecurityConfig(_Section):
    """CurveZMQ authentication and encryption (daemon/auth.py; keys from `lstmd keys generate`). With
    server_secret_key set, every socket (events, control, publish) requires CURVE and a known client key."""

    server_secret_key: Annotated[
        str, doc("the daemon's secret certificate file (NAME.key_secret); empty: no CURVE")
    ] = ""
    producer_keys_dir: Annotated[
        str, doc("directory of public keys (*.key) allowed to send events, subscribe and run status")
    ] = ""
    admin_keys_dir: Annotated[
        str, doc("directory of public keys allowed to run every control command (and what producers may)")
    ] = ""
    allow_insecure: Annotated[
        bool, doc("bind a non-loopback address without CURVE anyway (anyone reaching a port may run any command)")
    ] = False
    # Client side: lstmd status/streams/..., and what Producer/Admin/Subscriber take as server_key/client_key.
    server_public_key: Annotated[str, doc("client side: the daemon's public certificate file (NAME.key)")] = ""
    client_secret_key: Annotated[
        str, doc("client side: this client's secret certificate file (NAME.key_secret)")
    ] = ""


class ClusterConfig(_Section):
    """Cluster mode on NATS JetStream (daemon/cluster/): off unless `nats` names a server."""

    nats: Annotated[str, doc("NATS server URL of the cluster, e.g. nats://127.0.0.1:4222; empty: single process")] = ""
    # The NATS server's own auth options, passed to nats-py's connect (daemon/cluster/natsauth.py); at most one of
    # user/password, token, creds, nkey_seed.
    user: Annotated[str, doc("NATS user name (with password), as the server's --user / authorization users")] = ""
    password: Annotated[str, doc("NATS password of `user`; better LSTMD_CLUSTER__PASSWORD than in a file")] = ""
    token: Annotated[str, doc("NATS authorization token (the server's --auth); better LSTMD_CLUSTER__TOKEN")] = ""
    creds: Annotated[str, doc("NATS credentials file (JWT + nkey seed, from nsc); needs the nkeys package")] = ""
    nkey_seed: Annotated[str, doc("file holding this client's NATS nkey seed (SU...); needs the nkeys package")] = ""
    tls_ca: Annotated[str, doc("CA certificate file (PEM) to verify the NATS server's TLS certificate")] = ""
    tls_cert: Annotated[str, doc("client certificate file (PEM) for a NATS server that verifies clients")] = ""
    tls_key: Annotated[str, doc("private key file (PEM) of tls_cert")] = ""
    key_groups: Annotated[
        int, doc("key groups the streams are hashed into; fixed for the cluster's life", ge=1, le=65536)
    ] = 256
    log_partitions: Annotated[
        int, doc("subjects of the cluster's log, each carrying events of many key groups in one record (more than "
                 "key_groups: one per key group); fixed for the cluster's life", ge=1, le=65536)
    ] = 4
    member: Annotated[str, doc("this process's name in the cluster; empty: host-pid")] = ""
    lease_ttl: Annotated[float, doc("seconds before a silent member's key groups move", gt=0)] = 2.0
    snapshot_interval_s: Annotated[
        float, doc("how often a member snapshots its key groups to the object store (bounds replay)", gt=0)
    ] = 10.0
    sync_interval: Annotated[
        float, doc("with training on: seconds between a replica's weight deltas to the cluster's averager", gt=0)
    ] = 30.0
    model_versions: Annotated[
        int, doc("cluster model versions kept for replays after a failover; cover snapshot_interval_s", ge=2)
    ] = 16
    forecast_timeout_s: Annotated[
        float, doc("gateway: seconds a forecast waits for the replicas owning its streams before it is answered "
                   "unavailable, naming them (keep it below the producers' timeout)", gt=0)
    ] = 5.0


class Config(_Section):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    serve: ServeConfig = msgspec.field(default_factory=ServeConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    durability: DurabilityConfig = msgspec.field(default_factory=DurabilityConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)


ENV_PREFIX = "LSTMD_"


def sections() -> dict[str, type[_Section]]:
    """Section name -> its Struct, in file order; a section added to Config appears everywhere by itself."""
    return {f.name: f.default_factory for f in msgspec.structs.fields(Config)}


@dataclass(frozen=True)
class Key:
    """One config key as the schema declares it."""

    section: str
    name: str
    type: Any  # the annotation, Annotated[...] included: what a value is converted with
    default: Any
    description: str
    bounds: dict[str, float]

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}__{self.name.upper()}"

    @property
    def base(self) -> Any:
        return typing.get_args(self.type)[0] if typing.get_origin(self.type) is Annotated else self.type

    def kind(self) -> str:
        """The type in words: 'integer', 'number', 'one of a, b', ..."""
        base = self.base
        if typing.get_origin(base) is Literal:
            return "one of " + ", ".join(str(v) for v in typing.get_args(base))
        if typing.get_origin(base) is list:
            return f"list of {_KINDS.get(typing.get_args(base)[0], 'value')}s"
        if isinstance(base, types.UnionType):  # `str | None`: optional, and TOML has no null (unset = absent)
            return " or ".join(_KINDS.get(t, str(t)) for t in typing.get_args(base) if t is not type(None))
        return _KINDS.get(base, str(base))

    def range(self) -> str:
        """The allowed range in words ('>= 1', 'positive', '>= 0 and <= 19'); empty when unbounded."""
        words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        if self.bounds == {"gt": 0}:
            return "positive"
        return " and ".join(f"{words[op]} {_format(v)}" for op, v in self.bounds.items())

    def expectation(self) -> str:
        """What a value must be: 'integer >= 1', 'positive number', 'one of a, b', 'true or false'."""
        kind, bounds = self.kind(), self.range()
        return f"positive {kind}" if bounds == "positive" else f"{kind} {bounds}".strip()


_KINDS = {int: "integer", float: "number", bool: "true or false", str: "string"}


def schema() -> list[Key]:
    """Every key of every section, in file order: the one source of the sample, the reference and the checks."""
    keys = []
    for section, section_type in sections().items():
        for f in msgspec.structs.fields(section_type):
            meta = next((m for m in typing.get_args(f.type)[1:] if isinstance(m, msgspec.Meta)), msgspec.Meta())
            bounds = {op: getattr(meta, op) for op in ("gt", "ge", "lt", "le") if getattr(meta, op) is not None}
            default = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
            keys.append(Key(section, f.name, f.type, default, meta.description or "", bounds))
    return keys


@dataclass
class Resolved:
    """The effective configuration, where each key not at its default came from, and warnings to show."""

    config: Config
    sources: dict[str, str]  # "section.key" -> "config file lstmd.toml", "environment variable LSTMD_...", ...
    warnings: list[str] = field(default_factory=list)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Read the TOML file (if any), apply LSTMD_<SECTION>__<KEY> variables, then `section.key=value` overrides.

    Warnings (an LSTMD_ variable that names no key) are logged; resolve_config() returns them instead."""
    resolved = resolve_config(path, overrides, environ)
    for warning in resolved.warnings:
        log.warning("%s", warning)
    return resolved.config


def resolve_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Resolved:
    """load_config() with the sources and warnings; ConfigError lists every key-level problem at once."""
    keys = {k.dotted: k for k in schema()}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    warnings: list[str] = []

    def put(dotted: str, value: Any, source: str) -> None:
        values[dotted], sources[dotted] = value, source

    if path is not None:
        origin = f"config file {path}"
        for dotted, value in _read_file(path).items():
            if dotted in keys:
                put(dotted, value, origin)
            else:
                problems.append(f"{origin}: unknown key {dotted}{_suggest(dotted, keys)}")
    env = os.environ if environ is None else environ
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = _env_key(name, keys)
        if dotted is None:
            warnings.append(_unknown_variable(name, keys))
        else:
            put(dotted, _parse_value(raw, keys[dotted]), f"environment variable {name}")
    for item in overrides or []:
        dotted, sep, raw = item.partition("=")
        dotted = dotted.strip()
        if not sep:
            problems.append(f"--set {item}: expected section.key=value")
        elif dotted not in keys:
            problems.append(f"--set {item}: unknown key {dotted}{_suggest(dotted, keys)}")
        else:
            put(dotted, _parse_value(raw.strip(), keys[dotted]), f"--set {item}")

    data: dict[str, dict[str, Any]] = {section: {} for section in sections()}
    for dotted, value in values.items():
        key = keys[dotted]
        try:
            data[key.section][key.name] = _convert(key, value)
        except ConfigError as exc:
            problems.append(f"{exc} ({sources[dotted]})")
    if problems:
        raise ConfigError("\n".join(problems))
    config = msgspec.convert(data, Config)
    _adopt_model_file(config, sources)
    validate(config, sources)
    return Resolved(config, sources, warnings + _unused_level_rate(config, sources))


def _read_file(path: str | Path) -> dict[str, Any]:
    """The file's keys as {"section.key": value}; a non-table section is reported as such."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist (`lstmd config init {path}` writes one with every key)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    flat = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"config file {path}: {section} = ... is outside any [section]{_suggest(f'.{section}', _all_keys())}"
            )
        flat |= {f"{section}.{key}": value for key, value in table.items()}
    return flat


def _all_keys() -> dict[str, Key]:
    return {k.dotted: k for k in schema()}


def _nearest(dotted: str, keys: dict[str, Key]) -> str | None:
    """The valid key nearest to a misspelled one: the same key name in another section, else difflib's pick."""
    name = dotted.partition(".")[2]
    same_name = [k for k in keys if k.endswith(f".{name}")]
    close = same_name or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(dotted: str, keys: dict[str, Key]) -> str:
    """'; did you mean model.hidden_size?', or the section's keys, or the sections."""
    nearest = _nearest(dotted, keys)
    if nearest:
        return f"; did you mean {nearest}?"
    section = dotted.partition(".")[0]
    in_section = [k.partition(".")[2] for k in keys if k.startswith(f"{section}.")]
    if in_section:
        return f" ([{section}] has {', '.join(in_section)})"
    return f"; there is no [{section}] section (sections: {', '.join(sections())})"


def _env_key(name: str, keys: dict[str, Key]) -> str | None:
    """The key LSTMD_<SECTION>__<KEY> names, or None when it names none."""
    section, sep, key = name[len(ENV_PREFIX) :].partition("__")
    dotted = f"{section.lower()}.{key.lower()}"
    return dotted if sep and dotted in keys else None


def _unknown_variable(name: str, keys: dict[str, Key]) -> str:
    """The warning for an LSTMD_ variable that names no key, with the variable meant if one is near."""
    rest = name[len(ENV_PREFIX) :].lower()
    if "__" in rest:
        section, _, key = rest.partition("__")
        meant = _nearest(f"{section}.{key}", keys)
    else:
        # LSTMD_MODEL_HIDDEN_SIZE: one underscore between section and key.
        underscored = {k.replace(".", "_"): k for k in keys}
        close = difflib.get_close_matches(rest, underscored, n=1, cutoff=0.8)
        meant = underscored[close[0]] if close else None
    if meant:
        hint = f"did you mean {keys[meant].env}?"
    else:
        hint = f"config variables are {ENV_PREFIX}<SECTION>__<KEY>, sections {', '.join(sections()).upper()}"
    return f"ignoring environment variable {name}: it names no config key; {hint}"


def _parse_value(text: str, key: Key):
    """A TOML value from an environment variable or --set (`64`, `true`, `[1, 2]`, `"x"`).

    A string key takes the text as it is unless it is quoted, so `--set model.path=m.safetensors` and
    `LSTMD_SERVE__EVENTS=tcp://0.0.0.0:5555` need no quotes; elsewhere a bare word that is not TOML stays text,
    and the conversion names the key and the type it wanted."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, str) or not _is_text(key):
        return value
    return text


def _is_text(key: Key) -> bool:
    base = key.base
    if typing.get_origin(base) is Literal:
        return all(isinstance(v, str) for v in typing.get_args(base))
    return base is str


def _convert(key: Key, value: Any) -> Any:
    """The value as the key's type, within its range and finite; ConfigError('model.x must be ..., got ...')."""
    got = f"got {_format(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key.dotted} must be a finite number, {got}")
    try:
        plain = msgspec.convert(value, key.base)
    except msgspec.ValidationError:
        wanted = key.expectation()
        if not wanted.startswith(("one of", "true")):
            wanted = f"{'an' if wanted[0] in 'aeiou' else 'a'} {wanted}"
        raise ConfigError(f"{key.dotted} must be {wanted}, {got}") from None
    if isinstance(plain, list) and any(isinstance(v, float) and not math.isfinite(v) for v in plain):
        raise ConfigError(f"{key.dotted} must hold finite numbers, {got}")
    try:
        return msgspec.convert(plain, key.type)
    except msgspec.ValidationError:
        raise ConfigError(f"{key.dotted} must be {key.range()}, {got}") from None


def _format(value: Any) -> str:
    """A value as TOML writes it (true, 1.5, "text", [1, 2], nan): how messages, samples and show print it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes; TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


# ---- model.path: the file defines the model -------------------------------------------------------------------

_SIZES = ("input_size", "hidden_size", "num_layers", "output_size")


def _keras_file_metadata(path: str) -> dict[str, str] | None:
    """A Keras .keras / .h5 file's model metadata, by converting it (daemon/keras_import.py); None for other
    files. The daemon serves such a file converted the same way, so the sizes agree with what it serves."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None  # model_file_metadata says what is wrong with the path
    from lstmd.daemon.keras_import import KerasImportError, convert_keras, is_keras_bytes

    if not is_keras_bytes(data):
        return None
    try:
        return convert_keras(data).spec.to_metadata()
    except KerasImportError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _adopt_model_file(config: Config, sources: dict[str, str]) -> None:
    """With model.path set, the file's metadata sets the sizes and task; explicitly set ones must agree."""
    m = config.model
    if not m.path:
        return
    try:
        meta = _keras_file_metadata(m.path) or model_file_metadata(m.path)
    except ConfigError as exc:
        raise ConfigError(f"model.path: {exc} ({sources['model.path']})") from None
    missing = [k for k in (*_SIZES, "task") if k not in meta]
    if missing:
        raise ConfigError(f"model.path {m.path}: its metadata lacks {', '.join(missing)} (not an lstmd model file?)")
    try:
        from_file: dict[str, Any] = {k: int(meta[k]) for k in _SIZES} | {"task": meta["task"]}
        # Forecast files name their columns (all of them when the config chose none: stored here as []).
        columns = json.loads(meta.get("forecast_columns", "[]")) if meta["task"] == "forecast" else []
        from_file["forecast_columns"] = [] if columns == list(range(from_file["input_size"])) else columns
    except ValueError as exc:
        raise ConfigError(f"model.path {m.path}: unreadable metadata: {exc}") from None
    keys = _all_keys()
    differ = []
    for name, value in from_file.items():
        dotted = f"model.{name}"
        try:
            value = _convert(keys[dotted], value)
        except ConfigError as exc:
            raise ConfigError(f"model.path {m.path}: its metadata does not fit: {exc}") from None
        if dotted not in sources:
            setattr(m, name, value)
            sources[dotted] = f"model.path {m.path}"
        elif getattr(m, name) != value and not (name == "forecast_columns" and _all_columns(m, value)):
            shown = (value or list(range(from_file["input_size"]))) if name == "forecast_columns" else value
            differ.append(f"{name} {_format(shown)} where {dotted} = {_format(getattr(m, name))} ({sources[dotted]})")
    if differ:
        raise ConfigError(
            f"model.path {m.path} holds a model with {'; '.join(differ)}. The file alone defines the model: "
            "remove those keys or make them match"
        )


def _all_columns(m: ModelConfig, file_columns: list[int]) -> bool:
    """Both name every feature column: [] (the file's canonical form) and the config's explicit full list."""
    return not file_columns and m.forecast_columns == list(range(m.input_size))


# ---- checks across keys ---------------------------------------------------------------------------------------


def _level_rate_applies(config: Config) -> bool:
    t = config.train
    return config.model.task == "forecast" and t.forecast_inputs == "stream" and t.guard and not t.season


def _unused_level_rate(config: Config, sources: dict[str, str]) -> list[str]:
    """A warning where train.level_rate was set but does not apply (validate() refused any value but the default's:
    this is the default written out, a sample file's say)."""
    if "train.level_rate" not in sources or not config.train.level_rate or _level_rate_applies(config):
        return []
    return [
        f"train.level_rate = {config.train.level_rate} ({sources['train.level_rate']}) does not apply to this model "
        f"(it is for forecast models with train.forecast_inputs = stream, train.guard = true and no train.season): "
        f"it is served without the level regressor"
    ]


def served_level_rate(config: Config) -> float:
    """The guard's level regressor's rate the daemon serves with: train.level_rate where it applies (forecast
    models with stream inputs, the guard on and no season), else 0."""
    return config.train.level_rate if _level_rate_applies(config) else 0.0


def validate(config: Config, sources: dict[str, str] | None = None) -> None:
    """Checks across keys that one key's type and range cannot express (`sources`: resolve_config's, which keys
    someone set)."""
    m, s = config.model, config.serve
    if s.max_peer_inflight_bytes > s.max_inflight_bytes:
        raise ConfigError(
            f"serve.max_peer_inflight_bytes ({s.max_peer_inflight_bytes}) must not exceed serve.max_inflight_bytes "
            f"({s.max_inflight_bytes}): one peer's budget is part of the total"
        )
    if m.task == "classification" and m.output_size < 2:
        raise ConfigError(
            f"model.task = classification needs model.output_size >= 2 classes, got {m.output_size}"
        )
    _validate_forecast_columns(m)
    if m.output == "end" and m.task == "forecast":
        raise ConfigError(
            'model.output = "end" (one output per whole sequence) is for regression and classification: a '
            'forecast model predicts the next event after every event (use model.output = "every")'
        )
    # train.level_rate's default applies only where it can (served_level_rate); so does the default written out (the
    # sample file's); another value set where it cannot apply is an error.
    level_rate_set = "train.level_rate" in (sources or {}) and config.train.level_rate != TrainConfig().level_rate
    _validate_train(config, level_rate_set)
    _validate_security(config.security)
    for key in ("events", "control"):
        if not getattr(s, key).startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(
                f"serve.{key} must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {getattr(s, key)!r}"
            )


def _validate_forecast_columns(m: ModelConfig) -> None:
    columns = m.forecast_columns
    if columns and m.task != "forecast":
        raise ConfigError(f"model.forecast_columns is for model.task = forecast only (task is {m.task!r})")
    if m.task != "forecast":
        return
    if not columns:
        if m.output_size != m.input_size:
            raise ConfigError(
                f"model.task = forecast predicts the next event, so model.output_size ({m.output_size}) "
                f"must equal model.input_size ({m.input_size}), or model.forecast_columns must choose "
                f"{m.output_size} feature columns"
            )
        return
    bad = [c for c in columns if not 0 <= c < m.input_size]
    if bad:
        raise ConfigError(
            f"model.forecast_columns {columns}: {bad} out of range for model.input_size {m.input_size} "
            f"(indices 0..{m.input_size - 1})"
        )
    if len(set(columns)) != len(columns):
        raise ConfigError(f"model.forecast_columns {columns} names a column twice")
    if m.output_size != len(columns):
        raise ConfigError(
            f"model.output_size ({m.output_size}) must equal the number of model.forecast_columns "
            f"({len(columns)}: {columns}): the model predicts those columns of the next event"
        )


def _validate_train(config: Config, level_rate_set: bool) -> None:
    t = config.train
    level_rate = t.level_rate if level_rate_set else 0.0  # the default applies only where it can (served_level_rate)
    if t.season == 1:
        raise ConfigError("train.season = 1 is the last value, which the guard always has: use 0 (none) or >= 2")
    if t.season and (config.model.task != "forecast" or t.forecast_inputs != "stream"):
        raise ConfigError(
            f"train.season ({t.season}) is the guard's seasonal-naive baseline, for model.task = forecast with "
            f"train.forecast_inputs = stream only (task {config.model.task!r}, inputs {t.forecast_inputs!r})"
        )
    if level_rate and (config.model.task != "forecast" or t.forecast_inputs != "stream" or t.season):
        raise ConfigError(
            f"train.level_rate ({level_rate}) is the guard's level regressor, for model.task = forecast with "
            f"train.forecast_inputs = stream and no train.season (task {config.model.task!r}, inputs "
            f"{t.forecast_inputs!r}, season {t.season})"
        )
    if not t.guard and (t.enabled or t.season or level_rate):
        raise ConfigError(
            f"train.guard = false serves every stream in the model's one scale, without the per-stream state that "
            f"training (train.enabled = {str(t.enabled).lower()}), the seasonal baseline (train.season = "
            f"{t.season}) and the level regressor (train.level_rate = {level_rate}) need: set train.enabled = "
            f"false, train.season = 0 and train.level_rate = 0, or train.guard = true"
        )
    if t.record_steps % t.k2 or t.record_steps < (t.holdout_windows + 1) * t.k2:
        raise ConfigError(
            f"train.record_steps ({t.record_steps}) must be a multiple of train.k2 ({t.k2}) and at least "
            f"(train.holdout_windows + 1) * k2: a stream's recent history holds whole windows, the newest "
            f"{t.holdout_windows} held out for evaluation, at least one to train on"
        )
    if config.model.output == "end" and not t.k2 <= t.max_sequence <= t.record_steps:
        raise ConfigError(
            f"train.max_sequence ({t.max_sequence}) must be between train.k2 ({t.k2}) and train.record_steps "
            f"({t.record_steps}): a stream's recorded history must hold the longest sequence trained whole, and a "
            f"longer one is cut at a window boundary (every k2 steps)"
        )
    if t.horizon > 1 and config.model.task != "forecast":
        raise ConfigError(
            f"train.horizon = {t.horizon} is for model.task = forecast only (task is {config.model.task!r}): "
            "only a forecast model's predictions can be fed back as its next events; use train.horizon = 1"
        )
    if t.horizon > t.k2:
        raise ConfigError(
            f"train.horizon ({t.horizon}) must not exceed train.k2 ({t.k2}): a rollout's targets are the window's "
            "own later events"
        )


def _validate_security(sec: SecurityConfig) -> None:
    """The server's keys come together: a secret key with no client key directory would let nobody in, and key
    directories without a secret key would not be used. Files are read when the daemon starts."""
    dirs = sec.producer_keys_dir or sec.admin_keys_dir
    if sec.server_secret_key and not dirs:
        raise ConfigError(
            "security.server_secret_key is set but neither security.producer_keys_dir nor "
            "security.admin_keys_dir: no client could connect"
        )
    if dirs and not sec.server_secret_key:
        raise ConfigError(
            "security.producer_keys_dir / admin_keys_dir need security.server_secret_key (the daemon's "
            "secret key, from `lstmd keys generate DIR --name server`)"
        )
    if bool(sec.server_public_key) != bool(sec.client_secret_key):
        raise ConfigError(
            "security.server_public_key and security.client_secret_key go together: a CURVE client needs the "
            "daemon's public key and its own secret key"
        )


# ---- generated from the schema: the sample file, `config show`, the reference --------------------------------


def _section_doc(section: str) -> str:
    return " ".join((sections()[section].__doc__ or "").split())


def sample(version: str) -> str:
    """`lstmd config init`: every key with its description, range and default, commented out (so a file that
    sets nothing serves the defaults, and model.path's file still defines the sizes)."""
    lines = [
        f"# lstmd {version} configuration: every key, commented out at its default. Uncomment a line to change it.",
        "# Each key can also be set by the environment variable LSTMD_<SECTION>__<KEY> or by",
        "# `lstmd serve --set section.key=value` (the variable overrides this file, --set overrides both).",
        "# `lstmd config check FILE` validates a file; docs/config.md is the reference.",
    ]
    by_section: dict[str, list[Key]] = {}
    for key in schema():
        by_section.setdefault(key.section, []).append(key)
    for section, keys in by_section.items():
        lines += ["", f"[{section}]", f"# {_section_doc(section)}"]
        for key in keys:
            value = "(unset by default)" if key.default is None else _format(key.default)
            lines += ["", f"# {key.description} ({key.expectation()})", f"# {key.name} = {value}"]
    return "\n".join(lines) + "\n"


def to_toml(data: dict[str, dict[str, Any]], sources: dict[str, str] | None = None) -> str:
    """A config as TOML that tomllib reads back to `data`; keys not at their default say where they came from."""
    lines: list[str] = []
    for section, values in data.items():
        lines += ["" if lines else None, f"[{section}]"]
        for name, value in values.items():
            origin = (sources or {}).get(f"{section}.{name}")
            if value is None:  # TOML has no null: an unset optional key is absent
                lines.append(f"# {name} is not set")
                continue
            lines.append(f"{name} = {_format(value)}" + (f"  # {origin}" if origin else ""))
    return "\n".join(line for line in lines if line is not None) + "\n"


def reference() -> str:
    """docs/config.md: one table per section, from the schema (tests/test_config_docs.py keeps the file equal)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema in `daemon/config.py` by `lstmd config reference > docs/config.md`: do not edit",
        "it by hand (a test regenerates it and compares).",
        "",
        "lstmd reads one TOML file (`lstmd serve --config FILE`; without one, every key has its default). Each key",
        "can be overridden by the environment variable `LSTMD_<SECTION>__<KEY>` and then by",
        "`lstmd serve --set section.key=value`. `lstmd config init FILE` writes a commented sample with every key,",
        "`lstmd config check FILE` validates a file offline, and `lstmd config show --config FILE` prints the",
        "effective configuration as TOML, each changed key with its source.",
        "",
        "Every number is range-checked and NaN/Inf are refused. An `LSTMD_` variable that names no key is a",
        "warning, not an error. With `model.path` set, the model file's metadata defines `input_size`,",
        "`hidden_size`, `num_layers`, `output_size`, `task` (and `forecast_columns`); keys set as well must agree.",
    ]
    section = None
    for key in schema():
        if key.section != section:
            section = key.section
            lines += [
                "",
                f"## [{section}]",
                "",
                _section_doc(section),
                "",
                "| key | default | type, range | description | environment variable |",
                "|---|---|---|---|---|",
            ]
        default = "unset" if key.default is None else f"`{_format(key.default)}`"
        cells = [f"`{key.name}`", default, key.expectation(), key.description, f"`{key.env}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
