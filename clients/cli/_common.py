"""Shared pieces of the `lstmd` command line: option aliases, finding the daemon, printing results."""

from __future__ import annotations

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
    """The daemon endpoint from --control, else from the config file (or defaults and LSTMD_* variables).

    A config that binds an ephemeral port (`tcp://127.0.0.1:*`) is resolved through the endpoints.json the
    daemon writes into its state directory.
    """
    if control and key == "control":
        return control
    cfg = load_config_or_exit(config)
    endpoint = getattr(cfg.serve, key)
    if endpoint.endswith(":*") or endpoint.endswith(":0"):
        path = Path(cfg.state.dir) / "endpoints.json"
        try:
            endpoint = json.loads(path.read_text())[key]
        except (OSError, KeyError, ValueError):
            raise fail(
                f"serve.{key} uses an ephemeral port and {path} does not name it: is the daemon running?"
            ) from None
    return endpoint


def admin_or_exit(config: Path | None, control: str | None):
    from lstmd.clients.admin import Admin

    return Admin(resolve_endpoint(config, control))


def call_or_exit(fn, *args, **kwargs) -> Any:
    """Run an Admin call; turn a daemon error or a timeout into one line and exit code 1."""
    from lstmd.clients.admin import DaemonError

    try:
        return fn(*args, **kwargs)
    except (DaemonError, TimeoutError) as exc:
        raise fail(str(exc)) from None


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def emit(data: dict, as_json: bool, title: str) -> None:
    """A read command's result: JSON for scripts (--json), else a key/value table for people."""
    if as_json:
        print_json(data)
    else:
        console.print(key_value_table(title, data))


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
