"""`lstmd model info|export|import|versions|rollback`: the serving weights and their history."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from lstmd.clients.cli._common import (
    ConfigOpt,
    ControlOpt,
    JsonOpt,
    TimeoutOpt,
    admin_or_exit,
    call_or_exit,
    console,
    fail,
    print_json,
    rows_table,
)
from lstmd.clients.cli._format import model_view

app = typer.Typer(help="Inspect, export and import the serving model.", no_args_is_help=True)


@app.command()
def info(
    config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0, json: JsonOpt = False
) -> None:
    """Show the serving model's sizes, task and version."""
    data = call_or_exit(admin_or_exit(config, control, timeout).model_info)
    if json:
        print_json(data)
    else:
        console.print(model_view(data))


@app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="Where to write the safetensors file.")],
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
) -> None:
    """Write the serving weights to a safetensors file (torch.nn.LSTM + nn.Linear names)."""
    if not path.parent.is_dir():
        raise fail(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        result = call_or_exit(admin_or_exit(config, control, timeout).export_model, path)
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror or exc}") from None
    console.print(f"exported model version {result['version']} to {path}")


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A safetensors model file.")],
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
) -> None:
    """Serve the weights in a safetensors file from the next batch on."""
    if not path.is_file():
        raise fail(f"{path} is not a file")
    result = call_or_exit(admin_or_exit(config, control, timeout).import_model, path)
    console.print(f"serving {path} as model version {result['version']}")


@app.command()
def versions(
    config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0, json: JsonOpt = False
) -> None:
    """List the kept model versions, newest first."""
    data = call_or_exit(admin_or_exit(config, control, timeout).model_versions)
    if json:
        print_json(data)
        return
    rows = [
        {
            "version": d["version"],
            "serving": "*" if d["serving"] else "",
            "source": d["source"],
            "published": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["published"])),
            "holdout loss": "-" if d.get("holdout_loss") is None else f"{d['holdout_loss']:.4g}",
        }
        for d in data
    ]
    console.print(rows_table("model versions", rows))


@app.command()
def rollback(
    version: Annotated[
        int | None, typer.Argument(help="Version whose weights to serve again; default: the one before.")
    ] = None,
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
) -> None:
    """Serve an earlier version's weights again, exactly, as a new version number."""
    result = call_or_exit(admin_or_exit(config, control, timeout).rollback, version)
    console.print(f"serving the weights of version {result['weights_of']} as version {result['version']}")
