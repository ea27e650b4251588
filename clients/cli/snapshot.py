"""`lstmd snapshot`: make the running daemon write a snapshot now."""

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


def snapshot(config: ConfigOpt = None, control: ControlOpt = None, json: JsonOpt = False) -> None:
    """Write a snapshot of the model and every stream's state now, then truncate the write-ahead log."""
    admin = admin_or_exit(config, control)
    data = call_or_exit(admin.snapshot)
    if json:
        print_json(data)
    else:
        data = {**data, "removed": ", ".join(data.get("removed", [])) or "-"}
        console.print(key_value_table("lstmd snapshot", data))
