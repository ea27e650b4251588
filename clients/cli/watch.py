"""`lstmd watch [STREAM ...]`: the predictions a running daemon publishes, live.

Subscribes to the daemon's serve.publish socket through `lstmd.clients.Subscriber` (no control socket, no torch):
a rich table of the latest prediction per stream for people, or one JSON object per prediction with --json.
"""

from __future__ import annotations

import json as jsonlib
import time
from typing import Annotated

import typer
from lstmd.clients.cli._common import ConfigOpt, JsonOpt, client_keys, console, fail, resolve_endpoint
from rich.live import Live
from rich.table import Table

PublishOpt = Annotated[
    str | None,
    typer.Option("--publish", help="The daemon's publish endpoint, e.g. tcp://127.0.0.1:5557.", show_default=False),
]
StreamsArg = Annotated[list[str] | None, typer.Argument(help="Streams to show (default: all).", show_default=False)]
CountOpt = Annotated[int, typer.Option("--count", "-n", min=0, help="Stop after this many predictions (0: never).")]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Give up when nothing is published for this many seconds.")
]
_MAX_ROWS = 30  # streams shown in the live table, most recently updated first


def _wanted(streams: list[str]) -> set:
    """Stream arguments as the ids they may be on the wire: integer ids travel as integers."""
    return set(streams) | {int(s) for s in streams if s.lstrip("-").isdigit()}


def watch(
    streams: StreamsArg = None,
    config: ConfigOpt = None,
    publish: PublishOpt = None,
    json: JsonOpt = False,
    count: CountOpt = 0,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Print predictions as the daemon publishes them (a live table, or JSON lines with --json)."""
    from lstmd.clients.subscriber import Subscriber

    endpoint = publish or resolve_endpoint(config, None, key="publish")
    if not endpoint:
        raise fail("the daemon publishes nothing: serve.publish is empty in its config")
    seen = 0
    wanted = _wanted(streams) if streams else None
    with Subscriber(endpoint, wanted, timeout=timeout, **client_keys(config)) as sub:
        try:
            if json:
                for prediction in sub:
                    typer.echo(jsonlib.dumps(prediction.to_dict()))
                    seen += 1
                    if seen == count:
                        return
            else:
                latest: dict = {}
                with Live(_table(endpoint, latest, sub.missed_batches), console=console, auto_refresh=False) as live:
                    shown = 0.0
                    for prediction in sub:
                        latest[prediction.stream] = (prediction, time.time())
                        seen += 1
                        now = time.monotonic()
                        if seen == count or now - shown > 0.2:
                            live.update(_table(endpoint, latest, sub.missed_batches), refresh=True)
                            shown = now
                        if seen == count:
                            return
        except TimeoutError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            return


def _table(endpoint: str, latest: dict, missed: int) -> Table:
    title = f"lstmd watch {endpoint}: {len(latest)} streams" + (f", {missed} batches missed" if missed else "")
    table = Table(title=title, title_justify="left")
    for column in ("stream", "seq", "version", "prediction", "age"):
        table.add_column(column, justify="left" if column in ("stream", "prediction") else "right")
    now = time.time()
    recent = sorted(latest.values(), key=lambda item: item[1], reverse=True)[:_MAX_ROWS]
    for prediction, at in recent:
        values = " ".join(f"{v:.4g}" for v in prediction.values[:6].tolist())
        if prediction.values.size > 6:
            values += " …"
        table.add_row(str(prediction.stream), str(prediction.seq), str(prediction.version), values, f"{now - at:.1f}s")
    return table
