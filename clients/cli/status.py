"""`lstmd status`: what the running daemon is doing."""

from __future__ import annotations

from lstmd.clients.cli._common import (
    ConfigOpt,
    ControlOpt,
    JsonOpt,
    TimeoutOpt,
    admin_or_exit,
    call_or_exit,
    console,
    print_json,
)
from lstmd.clients.cli._format import status_view


def status(
    config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0, json: JsonOpt = False
) -> None:
    """Show the daemon's model, streams, event counts, durability, training and endpoints."""
    data = call_or_exit(admin_or_exit(config, control, timeout).status)
    if json:
        print_json(data)
    else:
        console.print(status_view(data))
