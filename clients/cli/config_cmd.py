"""`lstmd config show`: the configuration the running daemon uses."""

from __future__ import annotations

import typer
from lstmd.clients.cli._common import (
    ConfigOpt,
    ControlOpt,
    JsonOpt,
    admin_or_exit,
    call_or_exit,
    console,
    print_json,
)

app = typer.Typer(help="Show the running daemon's configuration.", no_args_is_help=True)


@app.command()
def show(config: ConfigOpt = None, control: ControlOpt = None, json: JsonOpt = False) -> None:
    """Print the daemon's effective configuration (file + environment + --set)."""
    data = call_or_exit(admin_or_exit(config, control).config)
    if json:
        print_json(data)
        return
    for section, values in data.items():
        console.print(f"[bold]\\[{section}][/]")
        for key, value in values.items():
            console.print(f"{key} = {value!r}", highlight=False)
