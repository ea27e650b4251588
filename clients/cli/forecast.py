"""`lstmd forecast STREAM --horizon K`: a stream's next K predictions, each fed back as the next event, computed on
a copy of its state (daemon/forecast.py); a table (and a sparkline per column) for people, JSON for scripts."""

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
)
from rich.table import Table

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    low, high = min(values), max(values)
    span = high - low
    return "".join(_BARS[0 if span == 0 else round((v - low) / span * (len(_BARS) - 1))] for v in values)


def forecast(
    stream: Annotated[str, typer.Argument(help="Stream id (an integer id can be given as digits).")],
    horizon: Annotated[int, typer.Option("--horizon", "-k", help="Steps ahead to forecast (1..1024).")] = 24,
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
    json: JsonOpt = False,
) -> None:
    """Forecast a stream's next HORIZON values (task = forecast models); the stream's state is not changed."""
    rows = call_or_exit(admin_or_exit(config, control, timeout).forecast, stream, horizon)
    if json:
        print_json({"stream": stream, "horizon": horizon, "forecast": rows})
        return
    width = len(rows[0])
    table = Table(title=f"forecast of stream {stream}: next {horizon} steps")
    table.add_column("step", justify="right")
    for o in range(width):
        table.add_column(f"output {o}", justify="right")
    for step, row in enumerate(rows, start=1):
        table.add_row(str(step), *(f"{v:.6g}" for v in row))
    console.print(table)
    for o in range(width):
        console.print(f"output {o}: {sparkline([row[o] for row in rows])}")
