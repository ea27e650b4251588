"""`lstmd config init|check|show|reference`: write, validate and print configurations, offline.

Everything here comes from the schema in daemon/config.py (torch-free, so these commands start fast and need no
daemon). Only `show --control` asks a running daemon, for the configuration it actually runs with.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Annotated

import typer
from lstmd.clients.cli._common import (
    ConfigOpt,
    ControlOpt,
    JsonOpt,
    SetOpt,
    admin_or_exit,
    call_or_exit,
    console,
    err_console,
    fail,
    print_json,
)
from rich.markup import escape

app = typer.Typer(help="Write, check and show configuration files.", no_args_is_help=True)


def _resolve_or_exit(config: Path | None, set_: list[str] | None):
    """The effective configuration with sources and warnings; a ConfigError is exit code 2, one problem a line."""
    from lstmd.daemon.config import ConfigError, resolve_config

    try:
        resolved = resolve_config(config, set_)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    for warning in resolved.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    return resolved


@app.command()
def init(
    path: Annotated[
        Path | None, typer.Argument(help="Where to write the sample; default: print it.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented sample configuration: every key with its default and a one-line description."""
    from lstmd.daemon.config import sample

    text = sample(importlib.metadata.version("lstmd"))
    if path is None:
        typer.echo(text, nl=False)
        return
    if path.exists() and not force:
        raise fail(f"{path} exists; pass --force to overwrite it")
    try:
        path.write_text(text)
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror}") from None
    console.print(f"wrote {path}: every key at its default, commented out; start with `lstmd serve --config {path}`")


@app.command()
def check(
    path: Annotated[Path, typer.Argument(help="The TOML file to validate.")],
    set_: SetOpt = None,
) -> None:
    """Validate a configuration file offline, as `lstmd serve --config FILE` would read it (with LSTMD_ variables)."""
    resolved = _resolve_or_exit(path, set_)
    console.print(f"{path}: ok ({len(resolved.sources)} key(s) set, the rest at their defaults)", highlight=False)


@app.command()
def show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    control: ControlOpt = None,
    json: JsonOpt = False,
) -> None:
    """Print the effective configuration (defaults, file, LSTMD_ variables, --set) as TOML; no daemon needed.

    With --control, the configuration the daemon at that endpoint runs with."""
    from lstmd.daemon.config import to_toml

    if control is not None:
        data, sources = call_or_exit(admin_or_exit(None, control).config), None
    else:
        resolved = _resolve_or_exit(config, set_)
        data, sources = resolved.config.to_dict(), resolved.sources
    if json:
        print_json(data)
    else:
        typer.echo(to_toml(data, sources), nl=False)


@app.command()
def reference() -> None:
    """Print the configuration reference (Markdown, as docs/config.md)."""
    from lstmd.daemon.config import reference as markdown

    typer.echo(markdown(), nl=False)
