"""The events socket's requests besides events: delayed targets and multi-step forecasts, each answered whole.

The serving loop hands each one here between two batches and sends the frames returned on the events socket.
Delayed targets are logged first (write-ahead), then joined to the recorded events by (stream, seq) and answered
per item ok or rejected. Forecasts roll copies of the streams' state forward (daemon/forecast.py) and change no
stream. Refusals are counted through the daemon's `count_rejection`, like every other rejected message.
"""

from __future__ import annotations

import numpy as np
from lstmd.clients import protocol
from lstmd.daemon import forecast as forecasts
from lstmd.daemon.io import ForecastMessage, TargetsMessage


def join_targets(daemon, message: TargetsMessage) -> list:
    """Delayed targets: join each to its recorded event (stream, seq); reply per item ok or rejected."""
    header = message.header
    # Write-ahead: logged before the join and the reply, so an acknowledged target survives a crash.
    log_targets = daemon.durability.log_targets if daemon.durability.wal is not None else None
    status, reasons, unlogged = daemon.pipeline.join_targets(header.streams, header.seqs, message.targets,
                                                             log_targets)
    if unlogged is not None:  # the log could not be written: every target rejected, counted by reason
        daemon.count_rejection(unlogged, len(status))
    reply = protocol.EventsReply(
        v=protocol.PROTOCOL_VERSION,
        req=header.req,
        version=daemon.engine.model.version,
        status=status.tobytes(),
        reasons=reasons,
    )
    return [*message.envelope, protocol.encode(reply)]


def answer_forecast(daemon, message: ForecastMessage) -> list:
    """A multi-step forecast (daemon/forecast.py) on copies of the streams' state: per stream ok or rejected
    (unknown, reset), rows [horizon, O] each; a request wrong whole (task, horizon, exog) is refused whole."""
    header = message.header
    try:
        result, errors = forecasts.forecast(daemon, header.streams, header.horizon, message.exog)
    except forecasts.ForecastError as exc:
        daemon.count_rejection("bad_forecast")
        reply = protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=header.req, error=str(exc),
                                     error_reason="bad_forecast")
        return [*message.envelope, protocol.encode(reply)]
    status = np.zeros(len(header.streams), dtype=np.uint8)
    status[list(errors)] = protocol.REJECTED
    reply = protocol.EventsReply(
        v=protocol.PROTOCOL_VERSION,
        req=header.req,
        version=daemon.engine.model.version,
        out_dim=header.horizon * result.shape[2],
        status=status.tobytes(),
        reasons=errors,
    )
    return [*message.envelope, *protocol.encode_reply(reply, result.reshape(len(status), -1))]
