"""What gateways and replicas agree on: key groups, log partitions, the JetStream log's records, the NATS link.

- A stream belongs to key group `key_group(stream_id, G)`: the first 8 bytes of its BLAKE2b digest mod G, with
  str and int ids kept apart ("7" and 7 are different streams, as in the daemon). Stable across processes,
  versions and machines (Python's hash() is salted per process). Key groups are the unit of ownership.
- Key group g is carried in log partition `g mod P` (cluster.log_partitions, P <= G): the log is one JetStream
  stream, LOG_STREAM, file storage, subjects `lstmd.ev.<partition>`; its metadata records G and P, so a member
  configured with others is refused at start. Partitions exist for batching only: JetStream's cost is per
  message (DESIGN.md: ~8,000 messages/s here), so a record must carry many events, and with G subjects a
  producer message of 1,000 events split into ~4 events per key group (docs/benchmarks.md, "Cluster mode").
  Owners are unaware of partitions: a record may hold events of key groups owned by several members, and each
  takes its own.
- One log record (`LogRecord`) = the events (or the delayed targets: header kind "targets", the targets as its
  second frame; or the streams of forecasts: kind "forecast", the exog as its second frame) of one partition
  from one or more producer messages that reached one gateway together (coalesced), as the wire format's own
  frames (clients/protocol.py: the header keeps each event's sequence-end flag, `ends`, next to its stream and
  sequence number, so a replay ends the same sequences), with per event its key group, the gateway's id of its
  producer message (token) and its index there, and where the answers go: the gateway's reply subject.
  Replicas answer in `ReplyBatch`es: one per gateway, per serving-loop batch and per prediction width (a
  forecast's rows are horizon x O wide).
- nats-py is asyncio; the daemon's loop and the gateway's ZeroMQ loop are not. `NatsLink` runs one asyncio loop
  on its own thread and owns the connection: the other threads submit coroutines to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Coroutine
from typing import Any

import msgspec
import numpy as np
from lstmd.clients import protocol

log = logging.getLogger("lstmd.cluster")

LOG_STREAM = "LSTMD_EVENTS"
SUBJECT_PREFIX = "lstmd.ev."
REPLY_PREFIX = "lstmd.reply."
# JetStream drops a publish whose Nats-Msg-Id it stored within this window (a gateway's retried publish).
DUPLICATE_WINDOW_S = 120.0
CONNECT_TIMEOUT_S = 5.0
_AUTH_REFUSED = "authorization violation"  # how nats-server words a refused login (-ERR)
REQUEST_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot be used as configured (no server, no JetStream, another G): the message says why."""


def key_group(stream: protocol.StreamId, groups: int) -> int:
    raw = stream.encode() if type(stream) is str else b"\x00" + str(stream).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") % groups


def subject(partition: int) -> str:
    return f"{SUBJECT_PREFIX}{partition}"


def partition_groups(partition: int, groups: int, partitions: int) -> range:
    """The key groups log partition `partition` carries."""
    return range(partition, groups, partitions)


GROUP_DTYPE = np.uint16  # key groups <= 65536 (config)
TOKEN_DTYPE = np.uint64
INDEX_DTYPE = np.uint32


class KeyGroups:
    """Key groups of many stream ids at once, with a bounded cache (a digest per event costs ~1 us in Python;
    a stream's group never changes, and a producer sends the same streams again and again)."""

    def __init__(self, groups: int, max_cached: int = 1 << 20) -> None:
        self.groups = groups
        self.max_cached = max_cached
        self._cache: dict = {}

    def of(self, streams: list) -> np.ndarray:
        cache = self._cache
        found = [cache.get(s) for s in streams]
        if None in found:
            if len(cache) > self.max_cached:  # cheaper than an LRU; refilled at the next messages
                cache.clear()
            for i, g in enumerate(found):
                if g is None:
                    found[i] = cache[streams[i]] = key_group(streams[i], self.groups)
        return np.array(found, dtype=GROUP_DTYPE)


class LogRecord(msgspec.Struct, array_like=True):
    """Events of one log partition from one or more producer messages of one gateway, as stored in the log."""

    reply: str  # the gateway's reply subject
    header: bytes  # protocol.EventsHeader of these events (msgpack)
    features: bytes  # float32 [n, I]; of a delayed-targets record, its targets frame
    targets: bytes | None  # the targets frame, when the messages carried one
    groups: bytes  # GROUP_DTYPE [n]: each event's key group
    tokens: bytes  # TOKEN_DTYPE [n]: the gateway's id of each event's producer message
    index: bytes  # INDEX_DTYPE [n]: each event's index in its producer message


class ReplyBatch(msgspec.Struct, array_like=True):
    """A replica's answers to the events of any log records for one gateway (one per serving-loop batch)."""

    tokens: bytes  # TOKEN_DTYPE [n], as in the records
    index: bytes  # INDEX_DTYPE [n]
    status: bytes  # uint8 [n], protocol status codes
    out_dim: int
    predictions: bytes  # float32 [n, out_dim]; NaN rows for rejected events
    reasons: dict[int, str]  # position in this batch -> why that event was rejected
    version: int  # the serving model's version
    flags: bytes = b""  # uint8 [n] protocol FLAG_* bits (model.output = "end"); empty: none


log_record_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(LogRecord))
reply_batch_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ReplyBatch))


def message_id(streams: list, seqs: list[int] | None, header: bytes, fallback: str) -> str:
    """Nats-Msg-Id of a record: `<stream>:<seq>` of its one event, or of its first event plus a digest of its
    header (which holds all its (stream, seq) pairs), so only an identical resend is dropped by JetStream;
    `fallback` (unique per gateway record) when the producer numbered nothing (such a resend is new events, as
    in single-process mode)."""
    if seqs is None:
        return fallback
    first = f"{streams[0]}:{seqs[0]}"
    if len(streams) == 1:
        return first
    return f"{first}+{len(streams)}:{hashlib.blake2b(header, digest_size=12).hexdigest()}"


class NatsLink:
    """A NATS connection and its JetStream context, on an asyncio loop of its own thread."""

    def __init__(self, url: str, name: str, options: dict | None = None) -> None:
        """options: nats.connect's auth and TLS arguments (daemon/cluster/natsauth.py's connect_options)."""
        try:
            import nats  # noqa: F401  (the cluster extra; single-process mode never imports this module)
        except ImportError:
            raise ClusterError("cluster mode needs nats-py: pip install 'lstmd[cluster]'") from None
        self.url = url
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"lstmd-nats-{name}", daemon=True)
        self._thread.start()
        self.nc = None
        self.js = None
        self.closing = False
        try:
            self.run(self._connect(name, options or {}), CONNECT_TIMEOUT_S + 1)
        except BaseException:
            self.close()
            raise

    async def _connect(self, name: str, options: dict) -> None:
        import nats

        refused = asyncio.get_running_loop().create_future()  # the server's refusal of our credentials
        errors: list[str] = []  # why the attempts failed, for the message when none succeeds

        async def on_error(exc: Exception) -> None:  # nats-py prints a traceback per failed attempt by default
            log.debug("NATS %s: %s", self.url, exc)
            errors[:] = [f"{type(exc).__name__}: {exc}"]
            if _AUTH_REFUSED in str(exc).lower() and not refused.done():
                refused.set_result(str(exc))

        async def on_disconnected() -> None:
            if self.closing:
                return
            log.warning("NATS connection to %s lost; reconnecting", self.url)

        async def on_reconnected() -> None:
            log.warning("NATS connection to %s back", self.url)

        # Reconnects never give up once connected (a NATS restart must not end the member); the first connection
        # is bounded by CONNECT_TIMEOUT_S, so a wrong URL is a clear error at start instead of a hang.
        connecting = asyncio.ensure_future(
            nats.connect(
                self.url,
                name=name,
                connect_timeout=CONNECT_TIMEOUT_S,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                **options,
            )
        )
        try:
            # A refused login is retried forever by nats-py (as a lost connection is): fail at the first refusal.
            await asyncio.wait([connecting, refused], timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                if refused.done():
                    raise ClusterError(
                        f"the NATS server at cluster.nats = {self.url} refused this client ({refused.result()}): "
                        "check cluster.user/password, token, creds or nkey_seed against the server's authorization"
                    )
                raise TimeoutError
            self.nc = connecting.result()
        except ClusterError:
            raise
        except TimeoutError:
            raise ClusterError(
                f"cannot reach the NATS server at cluster.nats = {self.url} within {CONNECT_TIMEOUT_S:g} s"
                + (f" (last error: {errors[0]})" if errors else "")
            ) from None
        except Exception as exc:
            raise ClusterError(f"cannot connect to the NATS server at cluster.nats = {self.url}: {exc}") from None
        self.js = self.nc.jetstream(timeout=REQUEST_TIMEOUT_S)

    def run(self, coro: Coroutine, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        """Run `coro` on the link's loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine) -> None:
        """Run `coro` on the link's loop without waiting (its failure is the coroutine's to handle)."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.closing = True
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):  # closing: a connection already gone has nothing left to flush
                self.run(self.nc.drain(), 5)
        with contextlib.suppress(Exception):  # nats-py's own tasks must end before their loop closes
            self.run(_cancel_tasks(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def ensure_log(js, groups: int, partitions: int) -> None:
    """The log stream exists with G = `groups` and P = `partitions`: created when missing; a log made for another
    G or P is refused."""
    from nats.js import api
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(LOG_STREAM)
    except NotFoundError:
        config = api.StreamConfig(
            name=LOG_STREAM,
            subjects=[f"{SUBJECT_PREFIX}*"],
            storage=api.StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            metadata={"lstmd_key_groups": str(groups), "lstmd_log_partitions": str(partitions)},
        )
        try:
            await js.add_stream(config)
            return
        except Exception as exc:  # a racing member created it first: then check it like any other
            info = await js.stream_info(LOG_STREAM)
            if info is None:
                raise ClusterError(f"cannot create the JetStream stream {LOG_STREAM}: {exc}") from None
    metadata = info.config.metadata or {}
    found = metadata.get("lstmd_key_groups")
    if found != str(groups):
        raise ClusterError(
            f"cluster.key_groups = {groups}, but the cluster's log {LOG_STREAM} was created with {found} key "
            f"groups; G is fixed for a cluster's life: set cluster.key_groups = {found}"
        )
    found = metadata.get("lstmd_log_partitions")
    if found != str(partitions):
        raise ClusterError(
            f"cluster.log_partitions = {partitions}, but the cluster's log {LOG_STREAM} was created with {found} "
            f"partitions; they are fixed for a cluster's life: set cluster.log_partitions = {found}"
        )


def open_log(link: NatsLink, groups: int, partitions: int) -> int:
    """ensure_log from another thread, every failure a ClusterError that says what was wrong; returns the log's
    partitions: cluster.log_partitions, or G when that is smaller (a partition per key group)."""
    partitions = min(partitions, groups)
    try:
        link.run(ensure_log(link.js, groups, partitions))
        return partitions
    except ClusterError:
        raise
    except Exception as exc:
        raise ClusterError(
            f"the NATS server at {link.url} does not serve JetStream as needed (is it started with -js?): "
            f"{type(exc).__name__}: {exc}"
        ) from None
