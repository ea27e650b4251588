"""`lstmd train status|now|pause|resume`: the online trainer of a running daemon."""

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
from lstmd.clients.cli._format import training_view

app = typer.Typer(help="Watch and steer online training.", no_args_is_help=True)


@app.command()
def status(
    config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0, json: JsonOpt = False
) -> None:
    """Show whether training runs, its rounds and outcomes, the last round's losses and the recorder."""
    data = call_or_exit(admin_or_exit(config, control, timeout).train_status)
    if json:
        print_json(data)
    elif not data.get("enabled"):
        console.print("training is disabled (start the daemon with --set train.enabled=true)")
    else:
        console.print(training_view(data))


@app.command()
def now(
    wait: Annotated[float, typer.Option(help="Seconds to wait for the round's outcome; 0: do not wait.")] = 60.0,
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
    json: JsonOpt = False,
) -> None:
    """Run a training round now (even while paused) and show its outcome."""
    data = call_or_exit(admin_or_exit(config, control, timeout).train_now, wait)
    if json:
        print_json(data)
    elif wait <= 0:
        console.print(f"training round {data['round']} requested")
    else:
        last = data.get("last_round") or {}
        console.print(
            f"round {last.get('round')}: {last.get('outcome')}"
            + (f" ({last['reason']})" if last.get("reason") else "")
            + f"; serving model version {data.get('model_version')}"
        )


@app.command()
def pause(config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0) -> None:
    """Stop starting training rounds; the serving weights stay as they are until resume (or train now)."""
    call_or_exit(admin_or_exit(config, control, timeout).train_pause)
    console.print("training paused")


@app.command()
def resume(config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0) -> None:
    """Start training rounds again."""
    call_or_exit(admin_or_exit(config, control, timeout).train_resume)
    console.print("training resumed")
