"""The `lstmd` command line (typer): one module per command group, joined here.

Client commands find the daemon through --config FILE (the file it was started with) or --control ENDPOINT.
Modules import torch only inside the commands that need it (serve, demo), so admin commands start fast.
"""

from __future__ import annotations

import typer
from lstmd.clients.cli import bench, config_cmd, keys, model, replay, serve, snapshot, status, streams, top, train
from lstmd.clients.cli._common import add_key_options

app = typer.Typer(
    name="lstmd",
    help="Serve and continuously train stateful LSTM models on live event streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(serve.serve)
app.command()(serve.demo)
app.command()(status.status)
app.command()(replay.replay)
app.command()(bench.bench)
app.command()(top.top)
app.command()(snapshot.snapshot)
app.add_typer(streams.app, name="streams")
app.add_typer(model.app, name="model")
app.add_typer(config_cmd.app, name="config")
app.add_typer(train.app, name="train")
app.add_typer(keys.app, name="keys")
add_key_options(app)  # --server-key/--client-key on every command that talks to a daemon (last: sees them all)


def main() -> None:
    app()
