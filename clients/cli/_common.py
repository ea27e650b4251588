"""Shared pieces of the `lstmd` command line: option aliases, finding the daemon, printing results."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="The TOML file the daemon was started with.", show_default=False),
]
ControlOpt = Annotated[
    str | None,
    typer.Option("--control", help="The daemon's control endpoint, e.g. tcp://127.0.0.1:5556.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        min=0.1,
        help="How long to wait for the daemon to answer the connection; a command it accepted has at least 30 s.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable).", show_default=False),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one clear line to stderr and return the Exit to raise."""
    # escape(): a message naming "[model]" must not be read as rich markup (it printed "the  config").
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_config_or_exit(config: Path | None, overrides: list[str] | None = None):
    from lstmd.daemon.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


def resolve_endpoint(config: Path | None, control: str | None, key: str = "control") -> str:
    """The daemon endpoint from --control, else the state directory's endpoints.json, else the config."""
    return locate(config, control, key)[0]


def locate(config: Path | None, control: str | None, key: str = "control") -> tuple[str, str]:
    """(endpoint, where it came from): --control; else endpoints.json in the config's state.dir (the daemon
    writes what it actually bound there, ephemeral ports and --set overrides included); else serve.<key> of
    --config (or the defaults and LSTMD_* variables). An ephemeral port (`:*`, `:0`) needs the endpoints file.
    """
    if control and key == "control":
        return control, "--control"
    cfg = load_config_or_exit(config)
    path = Path(cfg.state.dir) / "endpoints.json"
    try:
        return json.loads(path.read_text())[key], str(path)
    except (OSError, KeyError, ValueError, TypeError):
        pass
    endpoint = getattr(cfg.serve, key)
    if endpoint.endswith(":*") or endpoint.endswith(":0"):
        raise fail(f"serve.{key} uses an ephemeral port and {path} does not name it: is the daemon running?")
    return endpoint, f"serve.{key} in {config}" if config else f"the default serve.{key}, as no --config was given"


_NOT_FOUND_HINT = (
    "Start one with `lstmd serve --config FILE`, or name the running one with --config FILE (the file it was "
    "started with) or --control ENDPOINT; --timeout SECONDS waits longer."
)


def admin_or_exit(config: Path | None, control: str | None, timeout: float = 3.0):
    """An Admin for the daemon; it remembers where its endpoint came from, for the failure message."""
    from lstmd.clients.admin import Admin

    endpoint, source = locate(config, control)
    admin = Admin(endpoint, timeout=max(timeout, 30.0), connect_timeout=timeout, **client_keys(config))
    admin.endpoint_source = source
    return admin


def call_or_exit(fn, *args, **kwargs) -> Any:
    """Run an Admin call; turn a daemon error or a timeout into one line and exit code 1."""
    from lstmd.clients.admin import DaemonError, NoDaemonError

    try:
        return fn(*args, **kwargs)
    except NoDaemonError as exc:
        source = getattr(getattr(fn, "__self__", None), "endpoint_source", None)
        raise fail(f"{exc} The endpoint came from {source}. {_NOT_FOUND_HINT}" if source else str(exc)) from None
    except (DaemonError, TimeoutError, ValueError) as exc:  # ValueError: an endpoint that is not one
        raise fail(str(exc)) from None


def require_listener(endpoint: str, timeout: float, what: str) -> None:
    """Exit with a clear line unless something accepts a TCP (or IPC) connection at `endpoint` within `timeout`.

    The probe watches the connection itself (a socket monitor), not the ZeroMQ handshake, so a daemon that
    requires CURVE keys the probe does not carry still counts as there.
    """
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        sock.connect(endpoint)
        connected = monitor.poll(int(timeout * 1000))
    except zmq.ZMQError as exc:
        raise fail(f"{endpoint} is not a ZeroMQ endpoint ({exc}); e.g. tcp://127.0.0.1:5555") from None
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    if not connected:
        raise fail(
            f"no daemon answered at {endpoint} ({what}) within {timeout:g} s: is `lstmd serve` running? "
            + _NOT_FOUND_HINT
        )


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def key_value_table(title: str, data: dict) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold cyan")
    table.add_column("value")
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(str(key), str(value))
    return table


def rows_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in rows[0] if rows else []:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


# ---- CurveZMQ keys (lstmd.clients.curve) ---------------------------------------------------------------------
# Every command that talks to a daemon takes --server-key/--client-key. Rather than repeat two parameters in
# each command, `add_key_options(app)` (called once in cli/__init__.py) wraps the commands that name a daemon
# endpoint (a `control`, `events` or `publish` parameter) so they accept both, and `client_keys` returns them.

ServerKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--server-key",
        help="The daemon's public key file (NAME.key) when it runs with CURVE security "
        "(default: \\[security] server_public_key, or LSTMD_SECURITY__SERVER_PUBLIC_KEY).",
        show_default=False,
    ),
]
ClientKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--client-key",
        help="This client's secret key file (NAME.key_secret) "
        "(default: \\[security] client_secret_key, or LSTMD_SECURITY__CLIENT_SECRET_KEY).",
        show_default=False,
    ),
]
_ENDPOINT_PARAMETERS = {"control", "events", "publish"}
_given_keys: dict[str, Path | None] = {}  # the running command's --server-key/--client-key (one per process)


def with_key_options(fn):
    """`fn` with two more options, --server-key and --client-key, that `client_keys` reads."""
    signature = inspect.signature(fn, eval_str=True)
    extra = [
        inspect.Parameter("server_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ServerKeyOpt),
        inspect.Parameter("client_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ClientKeyOpt),
    ]

    @functools.wraps(fn)
    def command(*args, server_key: Path | None = None, client_key: Path | None = None, **kwargs):
        _given_keys.update(server_key=server_key, client_key=client_key)
        return fn(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    command.__annotations__ = {**fn.__annotations__, "server_key": ServerKeyOpt, "client_key": ClientKeyOpt}
    return command


def add_key_options(app: typer.Typer) -> None:
    """Give every command of `app` (and of its sub-apps) that names a daemon endpoint the key options."""
    for info in app.registered_commands:
        if _ENDPOINT_PARAMETERS & set(inspect.signature(info.callback).parameters):
            info.callback = with_key_options(info.callback)
    for group in app.registered_groups:
        add_key_options(group.typer_instance)


def client_keys(config: Path | None) -> dict[str, str | None]:
    """server_key/client_key for Producer/Admin: the options, else [security] of the config (file, LSTMD_*)."""
    from lstmd.clients.curve import CurveKeyError, load_key

    server_key, client_key = _given_keys.get("server_key"), _given_keys.get("client_key")
    if server_key is None and client_key is None:
        security = load_config_or_exit(config).security
        server_key, client_key = security.server_public_key or None, security.client_secret_key or None
    if bool(server_key) != bool(client_key):
        raise fail("--server-key and --client-key go together (the daemon's public key and this client's secret key)")
    try:
        if server_key:
            load_key(server_key, secret=False, what="--server-key")
            load_key(client_key, secret=True, what="--client-key")
    except CurveKeyError as exc:
        raise fail(str(exc)) from None
    return {"server_key": server_key and str(server_key), "client_key": client_key and str(client_key)}
