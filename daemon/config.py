"""lstmd's configuration: one TOML file, overridden by `LSTMD_<SECTION>__<KEY>` variables, then by `--set`.

The schema is a set of msgspec Structs, so a typo in a key or a value of the wrong type is reported with the
exact path (`serve.max_batch`) instead of being ignored. Defaults bind to loopback only.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

import msgspec


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says which key and what was expected."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(_Section):
    input_size: int = 8
    hidden_size: int = 64
    num_layers: int = 1
    output_size: int = 1
    task: Literal["regression", "classification", "forecast"] = "regression"
    seed: int = 0
    path: str = ""  # a model file (safetensors) to serve at start; empty: fresh weights from `seed`
    # forecast: the feature columns (indices into an event's features, distinct) the model predicts for the
    # next event; output_size = len(forecast_columns). Empty: all features (output_size = input_size). They
    # travel in the model file's metadata; a model file whose columns differ is refused at start and on import.
    forecast_columns: list[int] = []


class ServeConfig(_Section):
    events: str = "tcp://127.0.0.1:5555"
    control: str = "tcp://127.0.0.1:5556"
    publish: str = "tcp://127.0.0.1:5557"  # empty: no PUB socket
    metrics: str = "127.0.0.1:9108"  # empty: no HTTP endpoint
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: Triton on CUDA, the daemon's CPU step on CPU (daemon/cpu_step.py); torch: the PyTorch reference
    backend: Literal["auto", "triton", "torch"] = "auto"
    max_batch: int = 16384  # events per serving batch
    max_wait_ms: float = 1.0  # how long the loop gathers events before stepping
    max_message_events: int = 65536  # larger messages are rejected whole
    max_message_bytes: int = 64 * 1024 * 1024  # enforced by ZeroMQ (ZMQ_MAXMSGSIZE) per frame
    max_new_streams_per_message: int = 65536  # admission control against id floods
    max_stream_id_length: int = 256  # characters of a string stream id
    # torch intra-op threads on the CPU, process-wide (0: torch's default, one per core). 1 is best on small
    # machines: OpenMP workers spin against the I/O thread and the producers (2 cores: 80k vs 460k events/s).
    cpu_threads: int = 1
    # Threads the CPU step splits each wave over (daemon/cpu_step.py: disjoint rows, one torch thread each, not
    # torch's OpenMP pool); 0: one per usable core, at most 4. Measured on 2 cores only (docs/benchmarks.md).
    step_threads: int = 0


class StateConfig(_Section):
    dir: str = "lstmd-state"
    capacity: int = 1_000_000  # state-table rows (streams resident at once)
    idle_ttl_s: float = 0.0  # evict streams idle this long; 0: never
    on_full: Literal["evict", "reject"] = "evict"  # LRU-evict idle streams, or reject new streams
    remember_evicted: int = 1_000_000  # evicted ids remembered to flag `state_reset` on their next event


class TrainConfig(_Section):
    """Online truncated-BPTT fine-tuning while serving (daemon/trainer.py, daemon/recorder.py)."""

    enabled: bool = False
    interval: float = 10.0  # seconds between training rounds (0: only the event trigger or `lstmd train now`)
    interval_events: int = 0  # also start a round after this many recorded events; 0: off
    k2: int = 32  # truncation length: steps per training window
    batch: int = 64  # windows per optimizer step, sampled across streams
    steps: int = 20  # optimizer steps per round
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-3
    clip_norm: float = 1.0  # gradient-norm clipping (exploding gradients are why truncated BPTT exists)
    tolerance: float = 0.0  # publish when holdout loss <= serving loss * (1 + tolerance)
    holdout_windows: int = 1  # newest windows of each recorded stream held out for the check (few streams: more)
    forecast_inputs: Literal["change", "level"] = "change"  # forecast: LSTM sees changes or levels (normalization.py)
    min_windows: int = 4  # fewer complete training windows recorded than this: the round is skipped
    record_streams: int = 1024  # streams the recorder keeps history for (its memory bound, with record_steps)
    record_steps: int = 128  # recent events kept per recorded stream; a multiple of k2
    record_idle_s: float = 60.0  # a recorded stream idle this long may give its buffer to a new stream
    history: int = 8  # published model versions kept for `lstmd model rollback`
    # after this many rejected or diverged rounds in a row, the trainer drops its own weights and optimizer state
    # and starts again from the serving weights (it has drifted somewhere worse); counted in
    # lstmd_train_resets_total. 0: never (a diverged round still restarts from the serving weights)
    reset_after_rejections: int = 3
    threads: int = 0  # torch intra-op threads (process-wide, on the CPU); 0: leave them to serve.cpu_threads
    nice: int = 10  # niceness of the trainer thread (Linux), so the serving loop wins the cores; 0: unchanged


class DurabilityConfig(_Section):
    wal: bool = False  # write-ahead log of applied events; off: nothing between snapshots survives a crash
    fsync: Literal["always", "interval", "never"] = "interval"  # like Redis appendfsync
    fsync_interval_ms: float = 1000.0  # fsync = interval: a background flusher syncs the log this often
    snapshot_interval_s: float = 300.0  # periodic snapshot (then the log is truncated); 0: none
    snapshot_wal_mb: float = 256.0  # also snapshot when the log's segment grows past this (bounds replay); 0: off
    snapshot_on_shutdown: bool = True
    keep_snapshots: int = 2  # newest N kept; the log is kept from the oldest of them, so any one can restore
    restore: bool = True  # load the newest valid snapshot and replay the log at start


class SecurityConfig(_Section):
    """CurveZMQ authentication and encryption (daemon/auth.py; keys from `lstmd keys generate`). With
    server_secret_key set, every socket (events, control, publish) requires CURVE and a known client key."""

    server_secret_key: str = ""  # the daemon's secret certificate (NAME.key_secret); empty: no CURVE
    producer_keys_dir: str = ""  # public keys (*.key) allowed to send events, subscribe and run status
    admin_keys_dir: str = ""  # public keys allowed to run every control command (and what producers may)
    # Bind a non-loopback address without CURVE anyway (anyone who reaches the port can run any command)
    allow_insecure: bool = False
    # Client side (lstmd status/streams/..., and what Producer/Admin take as server_key/client_key):
    server_public_key: str = ""  # the daemon's public certificate (NAME.key)
    client_secret_key: str = ""  # this client's secret certificate (NAME.key_secret)


class Config(_Section):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    serve: ServeConfig = msgspec.field(default_factory=ServeConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    durability: DurabilityConfig = msgspec.field(default_factory=DurabilityConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)


ENV_PREFIX = "LSTMD_"


def _parse_value(text: str):
    """A TOML value (`64`, `true`, `"x"`, `[1, 2]`); bare words that are not TOML stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_override(data: dict, dotted: str, raw: str, origin: str) -> None:
    section, sep, key = dotted.partition(".")
    if not sep or not section or not key or "." in key:
        raise ConfigError(f"{origin}: expected section.key=value, got {dotted!r}")
    known = {f.name: f.type for f in msgspec.structs.fields(Config)}
    if section not in known:
        raise ConfigError(f"{origin}: unknown section {section!r} (known: {', '.join(known)})")
    data.setdefault(section, {})[key] = _parse_value(raw)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Read the TOML file (if any), apply LSTMD_<SECTION>__<KEY> variables, then `section.key=value` overrides."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    env = os.environ if environ is None else environ
    for name, raw in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, key = name[len(ENV_PREFIX) :].split("__", 1)
            _apply_override(data, f"{section.lower()}.{key.lower()}", raw, f"environment variable {name}")
    for item in overrides or []:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _apply_override(data, dotted.strip(), raw.strip(), f"--set {item!r}")
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks across keys and ranges that types alone cannot express."""
    m, s, st = config.model, config.serve, config.state
    positive = {
        "model.input_size": m.input_size,
        "model.hidden_size": m.hidden_size,
        "model.num_layers": m.num_layers,
        "model.output_size": m.output_size,
        "serve.max_batch": s.max_batch,
        "serve.max_message_events": s.max_message_events,
        "state.capacity": st.capacity,
        "serve.max_stream_id_length": s.max_stream_id_length,
    }
    d = config.durability
    positive["durability.fsync_interval_ms"] = d.fsync_interval_ms
    _require(positive, strictly=True)
    _require(
        {"serve.max_wait_ms": s.max_wait_ms, "state.idle_ttl_s": st.idle_ttl_s, "serve.step_threads": s.step_threads},
        strictly=False,
    )
    if d.snapshot_interval_s < 0:
        raise ConfigError(
            f"durability.snapshot_interval_s must be >= 0 (0: no periodic snapshot), got {d.snapshot_interval_s}"
        )
    if d.keep_snapshots < 1:
        raise ConfigError(f"durability.keep_snapshots must be >= 1, got {d.keep_snapshots}")
    if m.task == "classification" and m.output_size < 2:
        raise ConfigError(
            f"model.task = classification needs model.output_size >= 2 classes, got {m.output_size}"
        )
    _validate_forecast_columns(m)
    _validate_train(config)
    _validate_security(config.security)
    for key in ("events", "control"):
        if not getattr(s, key).startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(
                f"serve.{key} must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {getattr(s, key)!r}"
            )


def _require(values: dict[str, float], strictly: bool) -> None:
    """ConfigError for the first key whose value is not > 0 (strictly) or not >= 0."""
    for key, value in values.items():
        if value <= 0 if strictly else value < 0:
            raise ConfigError(f"{key} must be {'positive' if strictly else '>= 0'}, got {value}")


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


def _validate_train(config: Config) -> None:
    t = config.train
    positive = {
        "train.k2": t.k2,
        "train.batch": t.batch,
        "train.steps": t.steps,
        "train.lr": t.lr,
        "train.clip_norm": t.clip_norm,
        "train.record_streams": t.record_streams,
        "train.record_steps": t.record_steps,
        "train.history": t.history,
        "train.holdout_windows": t.holdout_windows,
    }
    _require(positive, strictly=True)
    non_negative = (
        "interval",
        "interval_events",
        "tolerance",
        "min_windows",
        "record_idle_s",
        "threads",
        "nice",
        "reset_after_rejections",
    )
    _require({f"train.{key}": getattr(t, key) for key in non_negative}, strictly=False)
    if t.record_steps % t.k2 or t.record_steps < (t.holdout_windows + 1) * t.k2:
        raise ConfigError(
            f"train.record_steps ({t.record_steps}) must be a multiple of train.k2 ({t.k2}) and at least "
            f"(train.holdout_windows + 1) * k2: a stream's recent history holds whole windows, the newest "
            f"{t.holdout_windows} held out for evaluation, at least one to train on"
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
