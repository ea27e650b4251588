"""`lstmd streams list|show|reset|drop`: inspect and manage per-stream state."""

from __future__ import annotations

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
    print_json,
    rows_table,
)
from lstmd.clients.cli._format import stream_row, stream_view

app = typer.Typer(help="Inspect and manage per-stream state.", no_args_is_help=True)
StreamArg = Annotated[str, typer.Argument(help="Stream id (an integer id can be given as digits).")]


@app.command("list")
def list_(
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
    json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="Show at most this many streams.")] = 100,
) -> None:
    """List streams holding state."""
    rows = call_or_exit(admin_or_exit(config, control, timeout).streams, limit)
    if json:
        print_json(rows)
    else:
        shown = f"the first {limit}" if len(rows) >= limit else "all"
        console.print(rows_table(f"streams ({shown}; --limit shows more)", [stream_row(r) for r in rows]))


@app.command()
def show(
    stream: StreamArg,
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
    json: JsonOpt = False,
) -> None:
    """Show one stream's counters and hidden state."""
    info = call_or_exit(admin_or_exit(config, control, timeout).stream, stream)
    if json:
        print_json(info)
    else:  # the state vectors are for scripts; people get their norms
        console.print(stream_view(info))


@app.command()
def reset(stream: StreamArg, config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0) -> None:
    """Zero one stream's state; its next event starts fresh and is flagged state_reset."""
    call_or_exit(admin_or_exit(config, control, timeout).reset, stream)
    console.print(f"stream {stream!r} reset")


@app.command()
def drop(stream: StreamArg, config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0) -> None:
    """Forget one stream and free its slot."""
    call_or_exit(admin_or_exit(config, control, timeout).drop, stream)
    console.print(f"stream {stream!r} dropped")
