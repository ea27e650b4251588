"""Subscriber: watch the predictions a daemon publishes (its serve.publish socket), decoded, as they happen.

Imports only pyzmq, numpy and msgspec (through the protocol module, which defines the message format). Each PUB
message carries the predictions of one serving batch; the subscriber filters them by stream here (the daemon
publishes every applied event while anyone subscribes) and yields one `Prediction` per event. Publishing is
lossy by design (a subscriber never slows the daemon): `missed_batches` counts the batches that did not arrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import zmq
from lstmd.clients import protocol
from lstmd.clients.curve import TIMEOUT_HINT, apply_client_curve
from lstmd.clients.protocol import StreamId


@dataclass
class Prediction:
    """One published prediction: the daemon's answer to event `seq` of `stream`, from model `version`."""

    stream: StreamId
    seq: int
    version: int
    values: np.ndarray  # [O] float32

    def to_dict(self) -> dict:
        return {"stream": self.stream, "seq": self.seq, "version": self.version, "values": self.values.tolist()}


class Subscriber:
    """Iterate the predictions published on `endpoint`, optionally only those of `streams`.

    `timeout` (seconds) bounds the wait for each prediction: iteration raises TimeoutError when nothing arrives
    for that long (None: wait forever). `server_key` / `client_key` name the CURVE key files when the daemon
    requires them."""

    def __init__(
        self,
        endpoint: str,
        streams: Iterable[StreamId] | None = None,
        timeout: float | None = 10.0,
        *,
        server_key: str | None = None,
        client_key: str | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.streams = None if streams is None else set(streams)
        self.timeout_ms = None if timeout is None else int(timeout * 1000)
        self.missed_batches = 0  # batches published but not received (dropped for a subscriber that lagged)
        self._last_batch: int | None = None
        self._sock = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._curve_hint = TIMEOUT_HINT if server_key or client_key else ""
        try:
            apply_client_curve(self._sock, server_key, client_key)  # CURVE when keys are given; else nothing
        except Exception:
            self._sock.close()
            raise
        self._sock.setsockopt(zmq.SUBSCRIBE, protocol.PREDICTIONS_TOPIC)
        self._sock.connect(endpoint)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def batches(self) -> Iterator[tuple[protocol.PublishedBatch, np.ndarray]]:
        """Every published batch as (header, predictions [N, O]), unfiltered; TimeoutError after `timeout`."""
        while True:
            if self.timeout_ms is not None and not self._sock.poll(self.timeout_ms, zmq.POLLIN):
                raise TimeoutError(
                    f"no prediction published by lstmd at {self.endpoint} within {self.timeout_ms / 1000:g}s "
                    "(is the daemon running, its serve.publish set, and are events arriving?)" + self._curve_hint
                )
            header, preds = protocol.decode_published(self._sock.recv_multipart())
            if self._last_batch is not None and header.batch > self._last_batch + 1:
                self.missed_batches += header.batch - self._last_batch - 1
            self._last_batch = header.batch
            yield header, preds

    def __iter__(self) -> Iterator[Prediction]:
        wanted = self.streams
        for header, preds in self.batches():
            for i, (stream, seq) in enumerate(zip(header.streams, header.seqs, strict=True)):
                if wanted is None or stream in wanted:
                    yield Prediction(stream, seq, header.version, preds[i].copy())
