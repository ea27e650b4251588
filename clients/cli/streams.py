"""`lstmd streams list|show|reset|drop`: inspect and manage per-stream state."""

from __future__ import annotations

from pathlib import Path
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
    fail,
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
    state_out: Annotated[
        Path | None,
        typer.Option(help="Also write the stream's state to this safetensors file: h, c [L, H] (forecast: + x_prev).",
                     show_default=False),
    ] = None,
) -> None:
    """Show one stream's counters and hidden state."""
    admin = admin_or_exit(config, control, timeout)
    info = call_or_exit(admin.stream, stream)
    if state_out is not None:
        _write_state(info, state_out, admin)
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


def _write_state(info: dict, path: Path, admin) -> None:
    """One stream's (h, c) as safetensors, to feed the h0/c0 inputs of `lstmd model export --format onnx`'s graph
    (h0 = h[:, None]); forecast streams add x_prev [I], their last event (NaN: not known), for its x_prev input.
    Metadata says which stream and how far it had got."""
    import numpy as np
    from safetensors.numpy import save_file

    state = {k: np.asarray(info[k], dtype=np.float32) for k in ("h", "c")}
    if "last_x" in info:
        last_x = info["last_x"]
        if last_x is None:  # not known (fresh or reset stream): NaN of the model's input size
            last_x = [np.nan] * call_or_exit(admin.model_info)["input_size"]
        state["x_prev"] = np.asarray(last_x, dtype=np.float32)
    meta = {"stream": str(info["stream"]), "last_seq": str(info["last_seq"]), "events": str(info["events"])}
    try:
        save_file(state, str(path), metadata=meta)
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror}") from None
