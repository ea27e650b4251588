"""`lstmd status`: what the running daemon is doing."""

from __future__ import annotations

from lstmd.clients.cli._common import (
    ConfigOpt,
    ControlOpt,
    JsonOpt,
    admin_or_exit,
    call_or_exit,
    console,
    key_value_table,
    print_json,
)


def status(config: ConfigOpt = None, control: ControlOpt = None, json: JsonOpt = False) -> None:
    """Show the daemon's model, streams, event counts and endpoints."""
    admin = admin_or_exit(config, control)
    data = call_or_exit(admin.status)
    if json:
        print_json(data)
    else:
        console.print(key_value_table("lstmd status", data))
