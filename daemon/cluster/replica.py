"""A replica's events source: the key groups it owns, read from the cluster's log, fed to the serving loop.

- Ownership: the member heartbeats (daemon/cluster/membership.py) and owns the key groups rendezvous hashing
  gives it among the live members; when the members change it takes the groups it gained and drops the ones it
  lost (records of a lost group still queued are not applied: the new owner answers them).
- Moving state: a gained key group is read from the record after this member's own position in it, which is
  the log's start for a group it never held: the replay rebuilds that group's streams exactly (the same
  records in the same order through the same kernels), so no state travels between members. Snapshots to the
  object store, which bound that replay, are the next step (the positions kept here are what they record).

`ClusterSource` stands where `daemon/io.py`'s EventsSocket stands in single-process mode, with the same methods
the serving loop calls (`wait`, `take`, `send`, `pending`, `pending_bytes`, `close`), so the loop, the batching,
the kernels, the sequence numbers and the resend window are the daemon's own: the hook is the one line in
`Daemon._start_locked` that builds this instead of the socket.

- Reading: one ordered push consumer over the log (AckNone: the position is tracked here, per key group, not
  acknowledged per message; see DESIGN.md's measurements), from the lowest `position + 1` over the owned key
  groups; a record of a key group not owned, or at or below that group's position, is skipped. So a record is
  handed to the loop at most once per process, in log order, which is per-stream arrival order.
- Decoding: each record's frames go through `daemon/io.py`'s `decode_events_request` with the daemon's limits;
  an undecodable record is answered with the error, as the socket would.
- Sequence numbers the producer left out are assigned by the loop (last + 1) in log order: replaying the log
  from the same state assigns the same numbers, which is why the gateway (stateless, several at once) leaves
  them to the replica.
- Answers: the loop's reply frames go back as a `ReplyRecord` on the record's reply subject (fire and forget:
  a gateway that is gone lost its producer's request anyway, and the producer resends).
- Memory: records read and not yet taken by the loop are bounded by serve.max_inflight_bytes; past it the
  consumer's callback waits, so the backlog stays in JetStream (flow control), not in this process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
import time

from lstmd.clients import protocol
from lstmd.daemon.cluster import log as clog
from lstmd.daemon.cluster.membership import Membership, assignment
from lstmd.daemon.io import EventsLimits, EventsMessage, TargetsMessage, decode_events_request

log = logging.getLogger("lstmd.cluster")

_HEADER_BYTES_PER_EVENT = 96  # as daemon/io.py counts a decoded header's Python objects


def member_name(configured: str) -> str:
    return configured or f"{socket.gethostname()}-{os.getpid()}"


class ClusterSource:
    """The serving loop's events, from the key groups this replica owns (all of them until ownership lands)."""

    def __init__(self, cluster, limits: EventsLimits, max_inflight_bytes: int) -> None:
        self.groups = cluster.key_groups
        self.member = member_name(cluster.member)
        self.limits = limits
        self.max_inflight_bytes = max_inflight_bytes
        self.endpoint = f"{cluster.nats} (cluster member {self.member})"
        self.monitor = None  # no ZeroMQ peers to watch: the I/O thread's monitor is off
        self.positions = [0] * self.groups  # per key group: log sequence of the last record the loop took
        self.queued = [0] * self.groups  # per key group: log sequence of the last record queued for the loop
        self.owned: frozenset[int] = frozenset()
        self.pending_bytes = 0
        self._ready: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._replies: dict[bytes, tuple[str, int, int]] = {}  # envelope token -> (reply subject, token, group)
        self._next = 0
        self._closing = False
        self._sub = None
        self._owning = asyncio.Lock()
        self.link = clog.NatsLink(cluster.nats, f"replica-{self.member}")
        try:
            clog.open_log(self.link, self.groups)
            card = {"host": socket.gethostname(), "pid": os.getpid()}
            self.membership = Membership(self.link.js, self.member, cluster.lease_ttl, card, self._on_members)
            self.link.run(self._own(self.link.run(self.membership.join())))
        except BaseException:
            self.link.close()
            raise

    def _on_members(self, members: set[str]) -> None:
        self.link.loop.create_task(self._own(members))

    async def _own(self, members: set[str]) -> None:
        """Take the key groups rendezvous hashing gives this member among `members`; read them from the log."""
        from nats.js import api

        async with self._owning:
            owned = frozenset(assignment(members, self.groups)[self.member])
            if owned == self.owned and self._sub is not None:
                return
            gained = owned - self.owned
            with self._cond:
                # Records of a group regained while some were still queued are read again from its position.
                if gained and self._ready:
                    kept = [item for item in self._ready if item[0] not in gained]
                    self.pending_bytes -= sum(item[2].nbytes for item in self._ready if item[0] in gained)
                    self._ready = collections.deque(kept)
                for group in gained:
                    self.queued[group] = self.positions[group]
                self.owned = owned
            log.info("cluster member %s owns %d of %d key groups (%d new) among %d member(s)", self.member,
                     len(owned), self.groups, len(gained), len(members))
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
                self._sub = None
            if not owned:
                return
            start = min(self.queued[g] for g in owned) + 1
            sub = None

            async def on_record(msg) -> None:
                await self._on_record(msg, sub)

            sub = await self.link.js.subscribe(
                f"{clog.SUBJECT_PREFIX}*",
                stream=clog.LOG_STREAM,
                cb=on_record,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                config=api.ConsumerConfig(opt_start_seq=start),
            )
            self._sub = sub

    async def _on_record(self, msg, sub) -> None:
        group = clog.group_of(msg.subject)
        while self.pending_bytes > self.max_inflight_bytes and not self._closing:
            await asyncio.sleep(0.002)  # the loop is behind: leave the rest in JetStream
        position = msg.metadata.sequence.stream
        # Checked after the wait, with no await before the record is queued: ownership may have moved meanwhile
        if sub is not self._sub or group not in self.owned or position <= self.queued[group]:
            return
        self.queued[group] = position
        try:
            record = clog.log_record_codec[1].decode(msg.data)
        except Exception:
            log.error("record %d of key group %d is not a lstmd log record; skipped", position, group)
            return
        token = self._next.to_bytes(8, "little")
        self._next += 1
        self._replies[token] = (record.reply, record.token, group)
        # bytearray: the loop hands features to torch, which wants writable memory (a received ZeroMQ frame is)
        body = [record.header, bytearray(record.features)]
        if record.targets is not None:
            body.append(record.targets)
        try:
            header, features, targets = decode_events_request(body, self.limits)
            if header.kind == "targets":
                raise protocol.ProtocolError("bad_kind", "delayed targets are not served in cluster mode yet")
        except protocol.ProtocolError as exc:
            reply = protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=0, error=str(exc), error_reason=exc.reason)
            self.send([token, protocol.encode(reply)])
            return
        message = EventsMessage([token], header, features, targets, time.perf_counter())
        message.nbytes = len(msg.data) + len(header.streams) * _HEADER_BYTES_PER_EVENT
        with self._cond:
            self._ready.append((group, position, message))
            self.pending_bytes += message.nbytes
            self._cond.notify()

    # ---- the serving loop's side (its thread only) ------------------------------------------------------

    def wait(self, timeout_ms: float) -> bool:
        with self._cond:
            if not self._ready:
                self._cond.wait(timeout_ms / 1000)
            return bool(self._ready)

    def take(self) -> EventsMessage | TargetsMessage | None:
        while True:
            with self._cond:
                if not self._ready:
                    return None
                group, position, message = self._ready.popleft()
                self.pending_bytes -= message.nbytes
                if group not in self.owned:  # moved to another member since it was read: that member answers it
                    self._replies.pop(message.envelope[0], None)
                    continue
                # Taken = applied in this batch (the loop applies or answers every message it takes before it
                # looks at anything else), so the position moves now.
                self.positions[group] = position
            return message

    def pending(self) -> int:
        return len(self._ready)

    def send(self, frames: list) -> bool:
        target = self._replies.pop(bytes(frames[0]), None)
        if target is None:  # a second reply to the same record (the loop's last-resort guard): the first stands
            return False
        subject_, token, group = target
        payload = clog.reply_record_codec[0].encode(
            clog.ReplyRecord(token, group, bytes(frames[1]), bytes(frames[2]) if len(frames) > 2 else b"")
        )
        self.link.submit(self._publish(subject_, payload))
        return True

    async def _publish(self, subject_: str, payload: bytes) -> None:
        try:
            await self.link.nc.publish(subject_, payload)
        except Exception as exc:  # the gateway's producer resends; nothing here to undo
            log.warning("answer to %s not sent: %s", subject_, exc)

    def close(self) -> None:
        """Leave the cluster (the others take this member's key groups at their next heartbeat), disconnect."""
        self._closing = True
        with contextlib.suppress(Exception):
            self.link.run(self.membership.leave(), 5)
        self.link.close()
