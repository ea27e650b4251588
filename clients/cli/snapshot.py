"""`lstmd snapshot`: make the running daemon write a snapshot now."""

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
from lstmd.clients.cli._format import snapshot_view


def snapshot(
    config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0, json: JsonOpt = False
) -> None:
    """Write a snapshot of the model and every stream's state now, then truncate the write-ahead log."""
    data = call_or_exit(admin_or_exit(config, control, timeout).snapshot)
    if json:
        print_json(data)
    else:
        console.print(snapshot_view(data))
