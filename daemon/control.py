"""Control commands: what `lstmd status|streams|model|config|...` and `Admin` ask the running daemon.

Each command is a function (daemon, args) -> plain data, registered by name in COMMANDS. They run inside the
serving loop between two batches, so they read and change the state store without locks. Raise
CommandError for a request the user must fix; its message is shown to them as is.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from lstmd.clients import protocol
from lstmd.daemon import forecast as forecasts
from lstmd.daemon.auth import AuthError
from lstmd.daemon.keras_import import convert_keras
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.recovery import ChangeNotLogged

log = logging.getLogger("lstmd.daemon")


class Daemon(Protocol):
    """What the commands use of the serving loop (daemon/server.py's Daemon); named here, not imported, so
    control.py does not import the module that dispatches to it."""

    config: Any
    store: Any  # StateStore
    engine: Any  # Engine
    metrics: Any
    trainer: Any  # Trainer or None
    versions: Any  # ModelHistory
    durability: Any  # Durability
    security: Any  # Security or None

    @property
    def spec(self) -> ModelSpec: ...

    def status(self) -> dict: ...

    def install_model(self, model: ServingModel, source: str, **info) -> int: ...


class CommandError(ValueError):
    pass


COMMANDS: dict[str, Callable[[Daemon, dict], Any]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def answer(daemon: Daemon, message) -> tuple[bytes, bool]:
    """Run one decoded control request (daemon/io.py ControlMessage) between two batches: refusals by the I/O
    thread or by role, the command, the logging of its change (the durability code) and the counters. Returns
    the encoded ControlReply and whether the daemon should stop (a successful `shutdown`)."""
    if message.refused is not None:  # the I/O thread could not decode it: answer why, count by reason
        reason, why = message.refused
        daemon.metrics.control_rejections.labels(reason=reason).inc()
        return protocol.encode(protocol.ControlReply(ok=False, error=why)), False
    request = message.request
    known = request.cmd if request.cmd in COMMANDS else "unknown"
    refusal = None if daemon.security is None else daemon.security.refusal(message.role, request.cmd)
    if refusal is not None:
        daemon.metrics.control_commands.labels(command=known, outcome="refused").inc()
        return protocol.encode(protocol.ControlReply(ok=False, error=refusal)), False
    try:
        result = dispatch(daemon, request.cmd, request.args)
        daemon.durability.after_command()  # log what the command changed before answering it
        reply, outcome = protocol.ControlReply(ok=True, result=result), "ok"
    except (CommandError, ChangeNotLogged) as exc:
        reply, outcome = protocol.ControlReply(ok=False, error=str(exc)), "error"
    except Exception:  # a bug in a command must not take the daemon down; its text stays in the log
        log.exception("control command %r failed", request.cmd)
        reply, outcome = protocol.ControlReply(ok=False, error=_internal_error(request.cmd)), "internal_error"
    try:
        payload = protocol.encode(reply)
    except Exception:  # a result msgpack cannot hold is a bug in the command too
        log.exception("control command %r returned a result that cannot be encoded", request.cmd)
        payload = protocol.encode(protocol.ControlReply(ok=False, error=_internal_error(request.cmd)))
        outcome = "internal_error"
    daemon.metrics.control_commands.labels(command=known, outcome=outcome).inc()
    return payload, request.cmd == "shutdown" and reply.ok


def _internal_error(cmd: str) -> str:
    """What a client is told when a control command failed by a bug: no exception text (that goes to the log)."""
    return f"internal error in {cmd!r} (details are in the daemon's log)"


def dispatch(daemon: Daemon, cmd: str, args: dict) -> Any:
    handler = COMMANDS.get(cmd)
    if handler is None:
        raise CommandError(f"unknown command {cmd!r}; known: {', '.join(sorted(COMMANDS))}")
    return handler(daemon, args)


def _stream_arg(args: dict):
    if "stream" not in args:
        raise CommandError("missing argument 'stream'")
    return args["stream"]


@command("status")
def _status(daemon: Daemon, args: dict) -> dict:
    return daemon.status()


@command("streams")
def _streams(daemon: Daemon, args: dict) -> list[dict]:
    limit = int(args.get("limit", 100))
    if limit <= 0:
        raise CommandError(f"limit must be positive, got {limit}")
    return daemon.store.listing(limit)


@command("stream")
def _stream(daemon: Daemon, args: dict) -> dict:
    info = daemon.store.describe(_stream_arg(args))
    if info is None:
        raise CommandError(f"no stream {args['stream']!r} holds state")
    last_events = daemon.engine.stream_state
    if last_events is not None:  # forecast: the event the stream's next change is taken from; None: not known
        info["last_x"] = last_events.known(info["slot"], bool(daemon.store.needs_reset[info["slot"]]))
    return info


@command("forecast")
def _forecast(daemon: Daemon, args: dict) -> dict:
    """A k-step forecast of `streams` on copies of their state (daemon/forecast.py): per stream its [k, O] rows,
    or None and its error in `errors` (unknown stream, reset, last event not known)."""
    streams, horizon, exog = args["streams"], args["horizon"], args.get("exog")
    spec = daemon.engine.model.spec
    if exog is not None:
        expected = len(streams) * horizon * spec.input_size
        if len(exog) != expected:
            raise CommandError(
                f"exog must hold streams x horizon x input_size = {len(streams)} x {horizon} x {spec.input_size} "
                f"= {expected} values, got {len(exog)}"
            )
        exog = np.asarray(exog, dtype=np.float32).reshape(len(streams), horizon, spec.input_size)
    try:
        result, errors = forecasts.forecast(daemon, streams, horizon, exog)
    except forecasts.ForecastError as exc:
        raise CommandError(str(exc)) from None
    return {
        "horizon": horizon,
        "version": daemon.engine.model.version,
        "forecasts": [None if i in errors else rows.tolist() for i, rows in enumerate(result)],
        "errors": {str(i): why for i, why in errors.items()},
    }


@command("reset")
def _reset(daemon: Daemon, args: dict) -> dict:
    if not daemon.store.reset(_stream_arg(args)):
        raise CommandError(f"no stream {args['stream']!r} holds state")
    return {"stream": args["stream"], "reset": True}


@command("drop")
def _drop(daemon: Daemon, args: dict) -> dict:
    if not daemon.store.drop(_stream_arg(args)):
        raise CommandError(f"no stream {args['stream']!r} holds state")
    daemon.metrics.active_streams.set(len(daemon.store))
    return {"stream": args["stream"], "dropped": True}


@command("model_info")
def _model_info(daemon: Daemon, args: dict) -> dict:
    model = daemon.engine.model
    return {
        **model.spec.__dict__,
        "version": model.version,
        "parameters": int(sum(t.numel() for t in model.tensors.values())),
    }


@command("export_model")
def _export_model(daemon: Daemon, args: dict) -> dict:
    """The serving weights as a safetensors file, base64 in the reply (the client writes it)."""
    data = daemon.engine.model.to_bytes()
    return {"version": daemon.engine.model.version, "safetensors_b64": base64.b64encode(data).decode()}


@command("import_model")
def _import_model(daemon: Daemon, args: dict) -> dict:
    """A safetensors model file (`safetensors_b64`), or a Keras `.keras` / `.h5` file (`keras_b64`) converted here
    by daemon/keras_import.py (milliseconds for LSTM-sized models), served from the next batch on."""
    keras = args.get("keras_b64") is not None  # protocol.ImportModelArgs: exactly one of the two
    try:
        data = base64.b64decode(args["keras_b64" if keras else "safetensors_b64"], validate=True)
        model = convert_keras(data) if keras else ServingModel.from_bytes(data)
    except ValueError as exc:  # KerasImportError is one: its message names the layer and the reason
        raise CommandError(f"cannot import {'Keras ' if keras else ''}model: {exc}") from None
    if model.spec != daemon.spec:
        raise CommandError(f"cannot import model: {model.spec.mismatch(daemon.spec)}")
    return {"version": _install_from_operator(daemon, model, "import keras" if keras else "import")}


def _install_from_operator(daemon: Daemon, model: ServingModel, source: str) -> int:
    """Serve an operator's model and make the trainer continue from it (fresh optimizer, no round in flight
    survives): otherwise the next round would replace it with weights trained from the previous ones."""
    version = daemon.install_model(model, source)
    if daemon.trainer is not None:
        daemon.trainer.reset_to(daemon.engine.model, source)
    return version


def _trainer(daemon: Daemon):
    if daemon.trainer is None:
        raise CommandError("training is disabled: start the daemon with --set train.enabled=true")
    return daemon.trainer


@command("train_status")
def _train_status(daemon: Daemon, args: dict) -> dict:
    if daemon.trainer is None:
        return {"enabled": False}
    guard = {"guard": daemon.guard_summary()} if daemon.store.adaptation is not None else {}
    return {**daemon.trainer.status(), "model_version": daemon.engine.model.version, **guard}


@command("train_now")
def _train_now(daemon: Daemon, args: dict) -> dict:
    """Start a round now (even while paused); `train_status` shows its outcome once `rounds` reaches `round`."""
    trainer = _trainer(daemon)
    return {"round": trainer.request_round(), "rounds": trainer.rounds, "paused": trainer.paused}


@command("train_pause")
def _train_pause(daemon: Daemon, args: dict) -> dict:
    """No new rounds, and no weights from a round still running are published (train_now still works).
    Kept across restarts: in the trainer's snapshot, and logged (the serving loop logs it after the command)."""
    _trainer(daemon).pause()
    return {"paused": True}


@command("train_resume")
def _train_resume(daemon: Daemon, args: dict) -> dict:
    _trainer(daemon).resume()
    return {"paused": False}


@command("model_versions")
def _model_versions(daemon: Daemon, args: dict) -> list[dict]:
    return daemon.versions.listing(daemon.engine.model.version)


@command("model_rollback")
def _model_rollback(daemon: Daemon, args: dict) -> dict:
    """Serve the weights of an earlier version again (default: the one before the current), as a new version."""
    current = daemon.engine.model.version
    version = args.get("version")
    if version is None:
        version = daemon.versions.previous(current)
        if version is None:
            raise CommandError(f"no version before {current} is kept: nothing to roll back to")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise CommandError(f"version must be an integer, got {version!r}") from None
    model = daemon.versions.get(version)
    if model is None:
        kept = ", ".join(str(e["version"]) for e in daemon.versions.listing(current)) or "none"
        raise CommandError(f"version {version} is not kept (kept: {kept})")
    restored = ServingModel(model.spec, {k: v.clone() for k, v in model.tensors.items()}, 0, model.normalization)
    new_version = _install_from_operator(daemon, restored, f"rollback to {version}")
    return {"version": new_version, "weights_of": version, "previous": current}


@command("config")
def _config(daemon: Daemon, args: dict) -> dict:
    config = daemon.config.to_dict()
    for key in ("password", "token"):  # NATS secrets stay in the process: an admin sees that one is set
        if config["cluster"][key]:
            config["cluster"][key] = "(set)"
    return config


@command("shutdown")
def _shutdown(daemon: Daemon, args: dict) -> dict:
    return {"stopping": True}


@command("snapshot")
def _snapshot(daemon: Daemon, args: dict) -> dict:
    """Write a snapshot now (model, optimizer, recorder, every stream's state); the log is truncated after it."""
    try:
        return daemon.durability.snapshot("command")
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise CommandError(f"snapshot failed: {why} (the previous snapshot and the log are kept)") from None


@command("keys_reload")
def _keys_reload(daemon: Daemon, args: dict) -> dict:
    """Re-read the producer and admin key directories of [security] (also on SIGHUP); see daemon/auth.py."""
    if daemon.security is None:
        raise CommandError("security is off: the daemon runs without [security] keys, there is nothing to reload")
    try:
        return daemon.security.reload()
    except AuthError as exc:
        raise CommandError(f"keys not reloaded, the keys in use stay: {exc}") from None
