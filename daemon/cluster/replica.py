"""A replica's events source: the key groups it owns, read from the cluster's log, fed to the serving loop.

`ClusterSource` stands where `daemon/io.py`'s EventsSocket stands in single-process mode, with the same methods
the serving loop calls (`wait`, `take`, `send`, `pending`, `pending_bytes`, `close`), so the loop, the batching,
the kernels, the sequence numbers and the resend window are the daemon's own: the hook is the line in
`Daemon._start_locked` that builds this instead of the socket.

- Reading: one ordered push consumer over the log (AckNone: the position is tracked here, per key group, not
  acknowledged per message; see DESIGN.md's measurements), from the lowest `position + 1` over the owned key
  groups; a record of a key group not owned, or at or below what was already queued of it, is skipped. So a
  record is handed to the loop at most once per ownership, in log order, which is per-stream arrival order.
- Positions: a key group's position is the log sequence of its last record the loop answered (`send`): the loop
  applies a batch and then answers it with nothing in between, so whenever the loop calls `wait` (between
  batches or while gathering one) the state store holds exactly the records up to the positions.
- Ownership (daemon/cluster/membership.py, ownership.py): at every heartbeat the member compares the key groups
  rendezvous hashing gives it among the live members with those it holds. A group to hand over: stop reading
  it, snapshot its streams at its position to the object store, and release its entry by compare-and-set. A
  group to take: when its entry is released or its owner's heartbeat expired (death), claim it by
  compare-and-set (epoch + 1), restore its snapshot when that is ahead of this member's own state of it, and
  read the log from the snapshot's position + 1. Owned groups are snapshotted every
  cluster.snapshot_interval_s, which bounds the replay after a death. A compare-and-set that fails means
  another member claimed the group: this one is fenced, drops the group and its answers.
- Snapshots and restores touch the state store, so they run on the serving loop's thread: queued as jobs that
  `wait` runs.
- Retention: after a snapshot is referenced, the key group's older snapshot and its records up to the new
  snapshot's position are deleted; nothing else is (JetStream keeps the rest).
- Decoding: each record's frames go through `daemon/io.py`'s `decode_events_request` with the daemon's limits;
  an undecodable record is answered with the error, as the socket would.
- Sequence numbers the producer left out are assigned by the loop (last + 1) in log order: replaying the log
  from the same state assigns the same numbers, which is why the gateway (stateless, several at once) leaves
  them to the replica.
- Answers: the loop's reply frames go back as a `ReplyRecord` on the record's reply subject (fire and forget:
  a gateway that is gone lost its producer's request anyway, and the producer resends).
- Memory: records read and not yet taken by the loop are bounded by serve.max_inflight_bytes; past it the
  consumer's callback waits, so the backlog stays in JetStream (flow control), not in this process.
- Model versions (daemon/cluster/weights.py): each record is tagged, when read, with the version its log position
  names; `take` ends a batch where the tag changes and the model is swapped before the next one (`install`, on
  the loop's thread, nothing taken and unanswered). Version markers in the log are resolved in log order before
  the records after them; the newest one is also queued, so a replica with nothing to apply serves it too.
  Training candidates go to the averager (`offer_trained`); an operator's model is published cluster-wide
  (`publish_model`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time

from lstmd.clients import protocol
from lstmd.daemon.cluster import log as clog
from lstmd.daemon.cluster import ownership as own
from lstmd.daemon.cluster import weights as wsync
from lstmd.daemon.cluster.membership import Membership, assignment
from lstmd.daemon.cluster.natsauth import connect_options
from lstmd.daemon.control import CommandError
from lstmd.daemon.io import EventsLimits, EventsMessage, TargetsMessage, decode_events_request

log = logging.getLogger("lstmd.cluster")

_HEADER_BYTES_PER_EVENT = 96  # as daemon/io.py counts a decoded header's Python objects
_MARKER = -1  # the "key group" of a model version marker queued for the loop (real key groups are >= 0)


async def _all(coroutines) -> None:
    """Run the coroutines concurrently; the first failure is raised once all have finished."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def member_name(configured: str) -> str:
    return configured or f"{socket.gethostname()}-{os.getpid()}"


class ClusterSource:
    """The serving loop's events, from the key groups this replica owns."""

    def __init__(self, cluster, limits: EventsLimits, max_inflight_bytes: int, store, model_version, metrics,
                 serving_model, install) -> None:
        self.groups = cluster.key_groups
        self.member = member_name(cluster.member)
        self.limits = limits
        self.max_inflight_bytes = max_inflight_bytes
        self.store = store
        self.model_version = model_version  # callable: the serving model's version
        # Model versions (daemon/cluster/weights.py): serving_model() is the model served now (the initial one at
        # start); install(model, newest) serves a cluster version between batches (weights.installer).
        self.install = install
        self._record_versions: dict[bytes, int] = {}  # token -> the model version its record is applied with
        self._taken: set[bytes] = set()  # tokens handed to the loop and not answered yet: a batch in progress
        self.metrics = metrics
        self.snapshot_interval_s = cluster.snapshot_interval_s
        self.lease_ttl = cluster.lease_ttl
        metrics.cluster_key_groups_total.set(self.groups)
        self._last_rebalance = time.monotonic()
        self.endpoint = f"{cluster.nats} (cluster member {self.member})"
        self.monitor = None  # no ZeroMQ peers to watch: the I/O thread's monitor is off
        self.positions = [0] * self.groups  # per key group: log sequence of the last record the loop answered
        self.queued = [0] * self.groups  # per key group: log sequence of the last record queued for the loop
        self.owned: frozenset[int] = frozenset()
        self.revision: dict[int, int] = {}  # owned key group -> revision of our last write of its entry
        self.entries: dict[int, own.GroupEntry] = {}  # owned key group -> that entry
        self.snapshotted: dict[int, float] = {}  # owned key group -> monotonic time of its last snapshot
        self.pending_bytes = 0
        self._ready: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # callables for the loop's thread
        self._loop_stopped = False
        self._replies: dict[bytes, tuple[str, int, int, int]] = {}  # token -> (subject, gateway token, group, pos)
        self._next = 0
        self._closing = False
        self._sub = None
        self._owning = asyncio.Lock()
        self.link = clog.NatsLink(cluster.nats, f"replica-{self.member}", connect_options(cluster))
        try:
            clog.open_log(self.link, self.groups)
            self.kv, self.objects = self.link.run(own.open_buckets(self.link.js))
            self.weights = wsync.WeightSync(self.link, self.member, serving_model(), cluster.sync_interval,
                                            cluster.model_versions)
            self.link.run(self.weights.open())
            self.card = {"host": socket.gethostname(), "pid": os.getpid(), "model_version": model_version()}
            self.membership = Membership(self.link.js, self.member, cluster.lease_ttl, self.card, self._on_beat)
            # The first claims run without the loop (it has not started): restores run here, on this thread.
            self._loop_stopped = True
            self.link.run(self._rebalance(self.link.run(self.membership.join())), 120)
            self._loop_stopped = False
        except BaseException:
            self.link.close()
            raise

    # ---- ownership (the NATS link's thread) ----------------------------------------------------------------

    def _on_beat(self, members: set[str]) -> None:
        self.metrics.cluster_members.set(len(members))
        if not self._closing:
            self.link.loop.create_task(self._rebalance(members))
            self.link.loop.create_task(self.weights.beat(members))

    async def _on_loop(self, fn):
        """Run fn on the serving loop's thread (between its batches) and return its result."""
        if self._loop_stopped:
            return fn()
        done = self.link.loop.create_future()

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting coroutine
                self.link.loop.call_soon_threadsafe(done.set_exception, exc)
            else:
                self.link.loop.call_soon_threadsafe(done.set_result, result)

        self._jobs.put(job)
        with self._cond:
            self._cond.notify()
        return await done

    async def _rebalance(self, members: set[str]) -> None:
        async with self._owning:
            try:
                now = time.monotonic()
                if now - self._last_rebalance > self.lease_ttl:
                    await self._verify_owned()  # this member was silent past its lease: its groups may be gone
                self._last_rebalance = now
                intended = set(assignment(members, self.groups, self.membership.drained)[self.member])
                before = self.owned
                # Each step over its key groups at once: one NATS round trip of latency, not one per group.
                await _all(self._release(group) for group in sorted(self.owned - intended))
                await _all(self._claim(group, members) for group in sorted(intended - self.owned))
                now = time.monotonic()
                due = [g for g in sorted(self.owned) if now - self.snapshotted.get(g, now) >= self.snapshot_interval_s]
                await _all(self._checkpoint(group, owner=self.member) for group in due)
                if self.owned != before:
                    self.metrics.cluster_rebalances.inc()
                if self.owned != before or self._sub is None:
                    log.info("cluster member %s owns %d of %d key groups among %d member(s)", self.member,
                             len(self.owned), self.groups, len(members))
                    await self._resubscribe()
            except Exception:  # NATS away, a snapshot that failed: the next heartbeat tries again
                log.exception("cluster member %s: rebalancing failed; retried at the next heartbeat", self.member)

    async def _verify_owned(self) -> None:
        """Drop (fenced) every owned key group whose entry another member has written since our last write."""
        for group in sorted(self.owned):
            entry, revision = await own.read_entry(self.kv, group)
            if revision != self.revision.get(group):
                self.metrics.cluster_moves.labels("fenced").inc()
                log.warning("key group %d was claimed by %s while %s was silent: fenced from it", group,
                            entry.owner if entry else "nobody", self.member)
                self._set_owned(self.owned - {group})
                self.revision.pop(group, None)
                self.entries.pop(group, None)
                self.snapshotted.pop(group, None)

    def _set_owned(self, owned: frozenset[int], gained: int | None = None) -> None:
        with self._cond:
            if gained is not None:  # its records still queued from an earlier ownership are read again
                dropped = [item for item in self._ready if item[0] == gained]
                if dropped:
                    self._ready = collections.deque(item for item in self._ready if item[0] != gained)
                    self.pending_bytes -= sum(item[2].nbytes for item in dropped)
                    for item in dropped:
                        self._record_versions.pop(item[2].envelope[0], None)
                self.queued[gained] = self.positions[gained]
            self.owned = owned
        self.metrics.cluster_key_groups.set(len(owned))

    async def _claim(self, group: int, members: set[str]) -> None:
        entry, revision = await own.read_entry(self.kv, group)
        if entry is not None and entry.owner not in ("", self.member) and entry.owner in members:
            return  # its owner is alive and hands it over at its next heartbeat
        data = None
        if entry is not None and entry.snapshot and entry.seq > self.positions[group]:
            data = (await self.objects.get(entry.snapshot)).data
        claimed = own.GroupEntry(
            owner=self.member,
            epoch=(entry.epoch if entry else 0) + 1,
            snapshot=entry.snapshot if entry else "",
            seq=entry.seq if entry else 0,
            model_version=entry.model_version if entry else 0,
        )
        new_revision = await own.write_entry(self.kv, group, claimed, revision)
        if new_revision is None:
            return  # another member claimed it first
        if entry is not None and entry.owner not in ("", self.member):  # its owner's lease expired
            self.metrics.cluster_failovers.inc()
        if data is not None:
            count = await self._on_loop(lambda: own.restore_group(self.store, data))
            self.positions[group] = claimed.seq
            log.info("key group %d: restored %d streams at log position %d (epoch %d)", group, count, claimed.seq,
                     claimed.epoch)
        self.revision[group], self.entries[group] = new_revision, claimed
        self.snapshotted[group] = time.monotonic()
        self._set_owned(self.owned | {group}, gained=group)
        self.metrics.cluster_moves.labels("claimed").inc()

    async def _release(self, group: int) -> None:
        """Hand a key group over: stop reading it, snapshot it, release its entry."""
        self._set_owned(self.owned - {group})
        await self._checkpoint(group, owner="")
        if group in self.entries:  # not fenced meanwhile
            self.metrics.cluster_moves.labels("released").inc()
        self.revision.pop(group, None)
        self.entries.pop(group, None)
        self.snapshotted.pop(group, None)

    async def _checkpoint(self, group: int, owner: str) -> None:
        """Snapshot a key group at its position, then point its entry there (compare-and-set); fenced if that
        fails. `owner` empty releases the group."""
        entry = self.entries.get(group)
        if entry is None:
            return
        self.snapshotted[group] = time.monotonic()
        if self.positions[group] == entry.seq:  # nothing applied since the last snapshot: it stands
            if owner == entry.owner:
                return
            updated = own.GroupEntry(owner, entry.epoch, entry.snapshot, entry.seq, entry.model_version)
        else:
            # The version its next record is applied with (weights.py, "The rule"): what a restore resumes under.
            position, data = await self._on_loop(
                lambda: (self.positions[group], own.snapshot_group(
                    self.store, group, self.groups, self.positions[group],
                    self.weights.version_at(self.positions[group] + 1)))
            )
            version = self.weights.version_at(position + 1)
            name = f"g{group}-{position}"
            await self.objects.put(name, data)
            updated = own.GroupEntry(owner, entry.epoch, name, position, version)
        revision = await own.write_entry(self.kv, group, updated, self.revision[group])
        if revision is None:
            self.metrics.cluster_moves.labels("fenced").inc()
            log.warning("key group %d was claimed by another member: %s is fenced from it", group, self.member)
            self._set_owned(self.owned - {group})
            self.revision.pop(group, None)
            self.entries.pop(group, None)
            return
        self.revision[group], self.entries[group] = revision, updated
        if updated.snapshot != entry.snapshot:
            await self._trim(group, entry.snapshot, updated.seq)

    async def _trim(self, group: int, old_snapshot: str, seq: int) -> None:
        """Retention: once the entry points at a newer snapshot, the older one and the key group's records up to
        its position are no longer needed by anyone (a claim restores that snapshot or reads on from a later
        position of its own), so the log keeps what the newest referenced snapshot needs, and no more."""
        try:
            if old_snapshot:
                await self.objects.delete(old_snapshot)
            await self.link.js.purge_stream(clog.LOG_STREAM, subject=clog.subject(group), seq=seq + 1)
        except Exception as exc:  # kept a while longer: the next snapshot trims again
            log.warning("key group %d: trimming below log position %d failed: %s", group, seq, exc)

    async def _resubscribe(self) -> None:
        from nats.js import api

        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if not self.owned:
            return
        await self.weights.refresh()  # every marker before the start is in the table (weights.py, "The rule")
        start = min(self.queued[g] for g in self.owned) + 1
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
        if msg.subject == wsync.MARKER_SUBJECT:
            await self._on_marker(msg, sub)
            return
        group = clog.group_of(msg.subject)
        version = self.weights.version_at(msg.metadata.sequence.stream)
        if version not in self.weights.models:
            await self.weights.model(version)  # before the checks below: nothing may await between them and queueing
        while self.pending_bytes > self.max_inflight_bytes and not self._closing:
            await asyncio.sleep(0.002)  # the loop is behind: leave the rest in JetStream
        position = msg.metadata.sequence.stream
        self.metrics.cluster_log_pending.set(msg.metadata.num_pending)
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
        self._replies[token] = (record.reply, record.token, group, position)
        self._record_versions[token] = version
        # bytearray: the loop hands features to torch, which wants writable memory (a received ZeroMQ frame is)
        body = [record.header, bytearray(record.features)]
        if record.targets is not None:
            body.append(record.targets)
        try:
            header, features, targets = decode_events_request(body, self.limits)
        except protocol.ProtocolError as exc:
            reply = protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=0, error=str(exc), error_reason=exc.reason)
            self._replies.pop(token)
            self._record_versions.pop(token, None)
            self._answer(record.reply, clog.ReplyRecord(record.token, group, protocol.encode(reply)))
            return
        if header.kind == "targets":  # delayed targets (gateway.py): joined by the loop like the socket's
            message = TargetsMessage([token], header, targets)
        else:
            message = EventsMessage([token], header, features, targets, time.perf_counter())
        message.nbytes = len(msg.data) + len(header.streams) * _HEADER_BYTES_PER_EVENT
        with self._cond:
            self._ready.append((group, position, message))
            self.pending_bytes += message.nbytes
            self._cond.notify()

    async def _on_marker(self, msg, sub) -> None:
        """A model version marker (weights.py): resolved before any record after it is read; the newest version
        is also queued in its place, so a replica with no records to apply switches to it too."""
        position = msg.metadata.sequence.stream
        while True:  # the records after it wait: their versions depend on it
            try:
                version = await self.weights.on_marker(position, msg.data)
                break
            except Exception as exc:  # the table or the object store away for a moment
                log.warning("model marker at log position %d not resolved yet: %s", position, exc)
                if self._closing or sub is not self._sub:
                    return
                await asyncio.sleep(0.2)
        if version is None or sub is not self._sub:
            return
        with self._cond:
            self._ready.append((_MARKER, position, version))
            self._cond.notify()

    def publish_model(self, model, source: str) -> int:
        """An operator's model (`model import`, `model rollback`): published as the cluster's next version, which
        every replica serves from its marker in the log on; called from the serving loop."""
        try:
            return self.link.run(self.weights.publish(model, source))
        except Exception as exc:  # the operator is told; nothing was published (or it dangles: weights.py)
            raise CommandError(f"cannot publish the model to the cluster at {self.link.url}: {exc}") from None

    def offer_trained(self, candidate) -> None:
        """The trainer's candidate (daemon/trainer.py): averaged with the other replicas', never served alone."""
        self.weights.offer(candidate.model, candidate.base_version, candidate.report.windows)

    # ---- the serving loop's side (its thread only) ------------------------------------------------------

    def _switch_model(self) -> bool:
        """Serve the model version the head of the queue needs (call with _cond held). False: it needs another
        version than the one serving and a batch is in progress, so that batch ends here."""
        group, _position, item = self._ready[0]
        if group == _MARKER:
            needed = item if item == self.weights.latest() else None
        elif group in self.owned:
            needed = self._record_versions.get(item.envelope[0])
        else:  # take() drops it: its new owner applies it
            needed = None
        if needed is None or needed == self.model_version():
            return True
        if self._taken:
            return False
        model = self.weights.models.get(needed)
        if model is None:  # retention dropped it while its records waited (weights.py): the documented limit
            log.error("model version %d is no longer kept (cluster.model_versions); its records are applied with "
                      "version %d", needed, self.model_version())
            return True
        newest = needed == self.weights.latest()
        self.install(model, newest)
        if newest:
            self.card["model_version"] = needed
            self.membership.card = json.dumps(self.card).encode()
        return True

    def _run_jobs(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            job()

    def wait(self, timeout_ms: float) -> bool:
        self._run_jobs()
        with self._cond:
            if not self._ready and self._jobs.empty():
                self._cond.wait(timeout_ms / 1000)
        self._run_jobs()
        with self._cond:
            return bool(self._ready) and self._switch_model()

    def take(self) -> EventsMessage | TargetsMessage | None:
        while True:
            with self._cond:
                if not self._ready or not self._switch_model():
                    return None
                group, _position, message = self._ready.popleft()
                if group == _MARKER:
                    continue
                self.pending_bytes -= message.nbytes
                self._record_versions.pop(message.envelope[0], None)
                if group not in self.owned:  # moved to another member since it was read: that member answers it
                    self._replies.pop(message.envelope[0], None)
                    continue
                self._taken.add(message.envelope[0])
            return message

    def pending(self) -> int:
        return len(self._ready)

    def send(self, frames: list) -> bool:
        self._taken.discard(bytes(frames[0]))
        target = self._replies.pop(bytes(frames[0]), None)
        if target is None:  # a second reply to the same record (the loop's last-resort guard): the first stands
            return False
        subject_, token, group, position = target
        # Answered = applied: the store now holds this record (module docstring, "Positions").
        self.positions[group] = max(self.positions[group], position)
        # Fenced meanwhile: its new owner replays and answers it. Being handed over (its entry still ours): the
        # snapshot that goes with the group may be taken after this batch, so hold this record; answered here.
        if group not in self.owned and group not in self.entries:
            self.metrics.cluster_dropped_answers.inc()
            return False
        reply = clog.ReplyRecord(token, group, bytes(frames[1]), bytes(frames[2]) if len(frames) > 2 else b"")
        self._answer(subject_, reply)
        return True

    def _answer(self, subject_: str, reply: clog.ReplyRecord) -> None:
        self.link.submit(self._publish(subject_, clog.reply_record_codec[0].encode(reply)))

    async def _publish(self, subject_: str, payload: bytes) -> None:
        try:
            await self.link.nc.publish(subject_, payload)
        except Exception as exc:  # the gateway's producer resends; nothing here to undo
            log.warning("answer to %s not sent: %s", subject_, exc)

    def close(self) -> None:
        """Hand every owned key group over (snapshot + release) and leave the cluster; the loop has stopped, so
        the snapshots run here."""
        self._closing = True
        self._loop_stopped = True
        self._run_jobs()  # one a rebalance already waits for (a start that failed after this was built)

        async def leave() -> None:
            await self.membership.leave()
            await self.weights.leave()
            async with self._owning:
                await _all(self._release(group) for group in sorted(self.owned))

        try:
            if not self.link.nc.is_connected:
                raise ConnectionError("not connected to NATS")
            self.link.run(leave(), 30)
        except Exception:  # the others restore the last snapshots and replay, as after a death
            log.exception("cluster member %s could not hand its key groups over", self.member)
        self.link.close()
