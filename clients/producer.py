"""Producer: send batches of events to a running daemon and get one prediction per event back.

Imports only pyzmq, numpy and msgspec. Uses a DEALER socket and matches replies by request id. After a
timeout it reconnects and resends the same request, with the same sequence numbers, so a restarted daemon
applies each event once; without sequence numbers a resend could apply events twice, so it raises instead.

An event the daemon had already applied (its first send was applied but the reply was lost) comes back
`duplicate` with its original prediction, kept by the daemon for each stream's last `serve.resend_window`
sequence numbers. Beyond that window the prediction is gone: `send()` raises `PredictionUnavailableError`
(never NaN in place of a prediction), and `send_detailed()` reports those events in `SendResult.unavailable`.

Whole-sequence outputs (a daemon serving `model.output = "end"`): `send(..., ends=[bool per event])` marks the
events that end their stream's sequence; only their rows hold a prediction (the sequence's output), every other
row is NaN and flagged in `SendResult.no_output` (clients/protocol.py, FLAG_NO_OUTPUT), and the events that
started a new sequence are listed in `SendResult.sequence_starts`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zmq
from lstmd.clients import protocol
from lstmd.clients.curve import TIMEOUT_HINT, apply_client_curve
from lstmd.clients.protocol import StreamId


class RejectedError(ValueError):
    """The daemon refused the message or some of its events; `result` holds what came back."""

    def __init__(self, message: str, result: SendResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class PredictionUnavailableError(RuntimeError):
    """Events were already applied (duplicates) and the daemon no longer keeps their predictions (older than its
    `serve.resend_window`). They are not applied again; `result` holds every other event's prediction."""

    def __init__(self, message: str, result: SendResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class SendResult:
    predictions: np.ndarray  # [N, O] float32; NaN where rejected or `unavailable`
    status: np.ndarray  # [N] uint8 protocol status codes
    version: int  # model version that answered
    reasons: dict[int, str]  # event index -> why rejected, or why a duplicate's prediction is unavailable
    # [N] uint8 protocol.FLAG_* bits per event (model.output = "end"); zeros from a daemon serving every event
    flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.flags is None:
            self.flags = np.zeros(self.status.shape, dtype=np.uint8)

    @property
    def status_names(self) -> list[str]:
        return [protocol.STATUS_NAMES[s] for s in self.status.tolist()]

    @property
    def no_output(self) -> np.ndarray:
        """Indices of events answered without a prediction by design: not the end of a sequence (NaN rows)."""
        return np.flatnonzero(self.flags & protocol.FLAG_NO_OUTPUT)

    @property
    def sequence_starts(self) -> np.ndarray:
        """Indices of events that started a new sequence from zero state (model.output = "end")."""
        return np.flatnonzero(self.flags & protocol.FLAG_SEQUENCE_START)

    @property
    def unavailable(self) -> np.ndarray:
        """Indices of duplicate events answered without a prediction (no longer kept by the daemon)."""
        missing = (self.status == protocol.DUPLICATE) & np.isnan(self.predictions).any(axis=1)
        return np.flatnonzero(missing & ((self.flags & protocol.FLAG_NO_OUTPUT) == 0))


class Producer:
    def __init__(
        self,
        endpoint: str,
        timeout: float = 10.0,
        retries: int = 3,
        context: zmq.Context | None = None,
        server_key: str | None = None,  # the daemon's public certificate file (CURVE; lstmd.clients.curve)
        client_key: str | None = None,  # this producer's secret certificate file
    ) -> None:
        self.endpoint = endpoint
        self.server_key, self.client_key = server_key, client_key
        self._curve_hint = TIMEOUT_HINT if server_key or client_key else ""
        self.timeout_ms = int(timeout * 1000)
        self.retries = retries
        self._ctx = context or zmq.Context.instance()
        self._req_ids = itertools.count(1)
        self._sock: zmq.Socket | None = None
        self._connect()

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)  # see _send
        apply_client_curve(self._sock, self.server_key, self.client_key)
        self._sock.connect(self.endpoint)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(
        self,
        streams: Sequence[StreamId],
        features,
        targets=None,
        seqs: Sequence[int] | None = None,
        ends: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """Send N events; return predictions [N, O] in event order. Raises RejectedError on any rejection, and
        PredictionUnavailableError for already applied events whose prediction the daemon no longer keeps.

        `ends` (a daemon serving model.output = "end"): True for each event that ends its stream's sequence; only
        those rows hold a prediction (the sequence's output), the others are NaN (see SendResult.no_output)."""
        result = self.send_detailed(streams, features, targets, seqs, ends)
        rejected = {i: why for i, why in result.reasons.items() if result.status[i] == protocol.REJECTED}
        if rejected:
            detail = _listing(rejected, streams)
            raise RejectedError(f"{len(rejected)} of {len(streams)} events rejected: {detail}", result)
        unavailable = result.unavailable.tolist()
        if unavailable:
            why = {i: result.reasons.get(i, "already applied; prediction not kept") for i in unavailable}
            raise PredictionUnavailableError(
                f"{len(unavailable)} of {len(streams)} events were already applied and their predictions are no "
                f"longer kept by the daemon: {_listing(why, streams)}",
                result,
            )
        return result.predictions

    def send_detailed(self, streams, features, targets=None, seqs=None, ends=None) -> SendResult:
        """Like send(), but returns per-event status, flags and reasons instead of raising on rejected events."""
        streams = list(streams)
        req = next(self._req_ids)
        frames = protocol.encode_events(
            req, streams, np.asarray(features, dtype=np.float32), targets, seqs, None if ends is None else list(ends)
        )
        attempts = self.retries + 1 if seqs is not None else 1
        for _attempt in range(attempts):
            reply_frames = self._await(req) if self._send(frames) else None
            if reply_frames is not None:
                break
            self._connect()  # lazy-pirate: a fresh socket drops whatever the old one still queued
        else:
            raise TimeoutError(self._no_reply(attempts, resendable=seqs is not None))
        reply, preds = protocol.decode_reply(reply_frames)
        if reply.error is not None:
            raise RejectedError(f"message rejected ({reply.error_reason}): {reply.error}")
        status = np.frombuffer(reply.status, dtype=np.uint8)
        flags = np.frombuffer(reply.flags, dtype=np.uint8) if len(reply.flags) == status.size else None
        return SendResult(preds, status, reply.version, dict(reply.reasons), flags)

    def send_targets(self, streams: Sequence[StreamId], seqs: Sequence[int], targets) -> np.ndarray:
        """Delayed targets for events already sent (with these sequence numbers); returns [N] bool: joined.

        A target that finds no recorded event (training off, stream not recorded, event no longer kept) is not
        joined; that is not an error. Targets are [N] or [N, D]: regression values, or int class labels.
        """
        streams = list(streams)
        req = next(self._req_ids)
        frames = protocol.encode_targets(req, streams, list(seqs), targets)
        reply, _ = self._ask_once(req, frames, "The targets may or may not have been joined to their events.")
        if reply.error is not None:
            raise RejectedError(f"targets rejected ({reply.error_reason}): {reply.error}")
        return np.frombuffer(reply.status, dtype=np.uint8) == protocol.OK

    def forecast(self, streams: Sequence[StreamId], horizon: int, exog=None) -> np.ndarray:
        """Multi-step forecasts [N, horizon, O] of `streams` (task = forecast models): step j is what the daemon
        would answer if the predicted events 1..j-1 arrived as the stream's next events; `exog` [N, horizon, I]
        gives known future features (the forecast columns are ignored; else the last event's values are held).
        Computed on copies: no stream's state, sequence numbers or recorder change, so a lost reply is just asked
        again. Raises RejectedError naming each stream that cannot be forecast (unknown, reset) or why the
        request was refused whole (task, horizon, exog)."""
        streams = list(streams)
        exog = None if exog is None else np.asarray(exog, dtype=np.float32)
        dim = 0 if exog is None else exog.shape[-1]
        req = next(self._req_ids)
        frames = protocol.encode_forecast(req, streams, int(horizon), dim, exog)
        reply, preds = self._ask_once(req, frames, "A forecast changes nothing: ask again.")
        if reply.error is not None:
            raise RejectedError(f"forecast refused ({reply.error_reason}): {reply.error}")
        if reply.reasons:
            detail = _listing(dict(reply.reasons), streams).replace("event ", "stream #")
            raise RejectedError(f"{len(reply.reasons)} of {len(streams)} streams cannot be forecast: {detail}")
        return preds.reshape(len(streams), int(horizon), -1)

    def _ask_once(self, req: int, frames: list, outcome: str) -> tuple:
        """Send a request that is never resent and decode its reply; TimeoutError without one (`outcome`: what
        that means for the caller)."""
        reply_frames = self._await(req) if self._send(frames) else None
        if reply_frames is None:
            self._connect()
            raise TimeoutError(
                f"no reply from lstmd at {self.endpoint} within {self.timeout_ms / 1000:g} s: is `lstmd serve` "
                f"running, and is this its events endpoint (serve.events)? {outcome}{self._curve_hint}"
            )
        return protocol.decode_reply(reply_frames)

    def _no_reply(self, attempts: int, resendable: bool) -> str:
        """What a send that got no reply means for the caller, and what to do about it."""
        waited = f"within {self.timeout_ms / 1000:g} s" + (f", {attempts} tries" if attempts > 1 else "")
        where = (
            f"no reply from lstmd at {self.endpoint} {waited}: is `lstmd serve` running, and is this its events "
            "endpoint (serve.events)?"
        )
        if resendable:
            return (
                f"{where} Every try carried the same sequence numbers, so no event was applied twice; send them "
                "again with the same numbers once the daemon answers." + self._curve_hint
            )
        return (
            f"{where} If the daemon is slow rather than gone, the events may have been applied. They were not "
            "sent again: without sequence numbers (seqs=) the daemon could not tell a resend from new events. "
            "Pass seqs= to make resends safe, or raise the timeout (Producer(endpoint, timeout=...))."
            + self._curve_hint
        )

    def _send(self, frames: list) -> bool:
        """Queue a request; False when no connection took it within the timeout. A DEALER without a peer waits
        in send: with CURVE, a daemon that refused this client's key drops the connection for good."""
        try:
            self._sock.send_multipart(frames, copy=False)
        except zmq.Again:
            return False
        return True

    def _await(self, req: int) -> list | None:
        while self._sock.poll(self.timeout_ms, zmq.POLLIN):
            frames = self._sock.recv_multipart()
            reply = protocol.events_reply_decoder.decode(frames[0])
            if reply.req == req:
                return frames
            # A late reply to an earlier, already retried request: ignore it.
        return None


def _listing(reasons: dict[int, str], streams: list) -> str:
    """The first five events of `reasons` with their stream ids, and how many more."""
    first = sorted(reasons.items())[:5]
    detail = "; ".join(f"event {i} (stream {streams[i]!r}): {why}" for i, why in first)
    return detail + (f" (+{len(reasons) - 5} more)" if len(reasons) > 5 else "")
