"""The `lstmd` command line (typer): one module per command group, joined here.

Client commands find the daemon through --config FILE (the file it was started with) or --control ENDPOINT.
Modules import torch only inside the commands that need it (serve, demo), so admin commands start fast.
"""

from __future__ import annotations

import importlib.metadata
from typing import Annotated

import typer
from lstmd.clients.cli import (
    bench,
    config_cmd,
    forecast,
    keys,
    model,
    replay,
    serve,
    snapshot,
    status,
    streams,
    top,
    train,
    watch,
)
from lstmd.clients.cli import cluster as cluster_cmd
from lstmd.clients.cli import gateway as gateway_cmd
from lstmd.clients.cli._common import add_key_options

app = typer.Typer(
    name="lstmd",
    help="Serve and continuously train stateful LSTM models on live event streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: typer's rich panels label every flag (even --help) with a `<bool>` value it never takes.
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lstmd {importlib.metadata.version('lstmd')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


app.command()(serve.serve)
app.command()(serve.demo)
app.command()(status.status)
app.command()(replay.replay)
app.command()(bench.bench)
app.command()(top.top)
app.command()(watch.watch)
app.command()(gateway_cmd.gateway)
app.command()(forecast.forecast)
app.command()(snapshot.snapshot)
app.add_typer(streams.app, name="streams")
app.add_typer(model.app, name="model")
app.add_typer(config_cmd.app, name="config")
app.add_typer(train.app, name="train")
app.add_typer(keys.app, name="keys")
app.add_typer(cluster_cmd.app, name="cluster")
add_key_options(app)  # --server-key/--client-key on every command that talks to a daemon (last: sees them all)


def main() -> None:
    app()
