"""A replica's events source: the key groups it owns, read from the cluster's log, fed to the serving loop.

`ClusterSource` stands where `daemon/io.py`'s EventsSocket stands in single-process mode, with the same methods
the serving loop calls (`wait`, `take`, `send`, `pending`, `pending_bytes`, `close`), so the loop, the batching,
the kernels, the sequence numbers and the resend window are the daemon's own: the hook is the line in
`Daemon._start_locked` that builds this instead of the socket.

- Reading: one ordered push consumer over the log (AckNone: the position is tracked here, per key group, not
  acknowledged per message; see DESIGN.md's measurements), from the lowest `queued + 1` over the owned key
  groups, filtered to the partitions holding them (and the model markers) when they are not all of them. A
  record holds events of several key groups (log partitions, daemon/cluster/log.py): of each record this member
  takes the events of the key groups it reads whose `queued` is below the record's sequence, as
  one message for the loop (decoded and cut on the NATS thread, so the loop only steps). So an event is
  handed to the loop at most once per ownership, in log order, which is per-stream arrival order. A key group
  is read only from a subscription made while it was owned (`reading`): one gained later waits for the next
  subscription, which starts at or before its position.
- Positions: a key group's position is the log sequence of its last record the loop answered (`send`): the loop
  applies a batch and then answers it with nothing in between, so whenever the loop calls `wait` (between
  batches or while gathering one) the state store holds exactly the records up to the positions. A key group
  with nothing queued has every record the subscription delivered applied, so at a snapshot its position moves
  up to the last record delivered (`read_upto`), and idle key groups do not hold back the log's trimming.
- Ownership (daemon/cluster/membership.py, ownership.py): at every heartbeat the member compares the key groups
  rendezvous hashing gives it among the live members with those it holds. A group to hand over: stop reading
  it, snapshot its streams at its position to the object store, and release its entry by compare-and-set. A
  group to take: when its entry is released or its owner's heartbeat expired (death), claim it by
  compare-and-set (epoch + 1), restore its snapshot when that is ahead of this member's own state of it, and
  read the log from the snapshot's position + 1. Owned groups are snapshotted every
  cluster.snapshot_interval_s, which bounds the replay after a death. A compare-and-set that fails means
  another member claimed the group: this one is fenced, drops the group and its answers, and stops trusting
  its own state of it (a later claim restores the entry's snapshot).
- Snapshots and restores touch the state store, so they run on the serving loop's thread: queued as jobs that
  `wait` runs.
- Retention: after a snapshot is referenced, the key group's older snapshot is deleted, and its log partition's
  records up to the lowest snapshot position among the partition's key groups (read from their entries).
- Decoding: each record's frames go through `daemon/io.py`'s `decode_events_request` with the daemon's limits;
  an undecodable record is answered with the error, as the socket would. A record of delayed targets (header
  kind "targets", gateway.py) becomes a TargetsMessage the loop joins as the socket's; its answers go back per
  event like events' (without predictions), and the gateway keeps the first answer of each. A forecast record
  (kind "forecast") becomes a ForecastMessage of this member's streams, answered by the loop between two
  batches, after every record before it (so after every event its producer was answered for); its rows
  (horizon x O) go back in ReplyBatches of their own width. Cutting a record keeps each event's sequence-end
  flag with it (`_pick`), and the answers carry the loop's FLAG_* bits (model.output = "end").
- Sequence numbers the producer left out are assigned by the loop (last + 1) in log order: replaying the log
  from the same state assigns the same numbers, which is why the gateway (stateless, several at once) leaves
  them to the replica.
- Answers: the loop's replies are gathered per gateway and go out as one `ReplyBatch` per gateway when the loop
  next waits, i.e. once per serving batch (fire and forget: a gateway that is gone lost its producer's request
  anyway, and the producer resends). Events of key groups this member was fenced from are not answered; those
  of a key group it is handing over are (its snapshot, taken after them, tells the next owner not to).
- Memory: records read and not yet taken by the loop are bounded by serve.max_inflight_bytes; past it the
  consumer's callback waits, so the backlog stays in JetStream (flow control), not in this process.
- Model versions (daemon/cluster/weights.py): each record is tagged, when read, with the version its log position
  names (`_Queued.version`); `take` ends a batch where the tag changes and the model is swapped before the next
  one (`install`, on the loop's thread, nothing taken and unanswered). Version markers in the log are resolved
  in log order before the records after them; the newest one is also queued, so a replica with no records to
  apply serves it too. Partitions do not change the rule: they are subjects of one JetStream stream, so a
  record's position and a marker's are numbers of one sequence over all partitions and markers, and the one
  ordered consumer (`lstmd.ev.*`) delivers markers among records in that order; the version of a record (of
  every key group in it) is `version_at(position)`, a function of the log alone, the same on every replica
  that reads the record and on every replay. A subscription starting past a marker has it from the table
  (`refresh` before subscribing); a key group snapshot records `version_at(position + 1)`, the version its
  next record is applied with; trims purge partition subjects only, never the marker subject.
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
from dataclasses import dataclass

import msgspec
import numpy as np
from lstmd.clients import protocol
from lstmd.daemon.cluster import log as clog
from lstmd.daemon.cluster import ownership as own
from lstmd.daemon.cluster import weights as wsync
from lstmd.daemon.cluster.membership import Membership, assignment
from lstmd.daemon.cluster.natsauth import connect_options
from lstmd.daemon.control import CommandError
from lstmd.daemon.io import EventsLimits, EventsMessage, ForecastMessage, TargetsMessage, decode_events_request

log = logging.getLogger("lstmd.cluster")

_HEADER_BYTES_PER_EVENT = 96  # as daemon/io.py counts a decoded header's Python objects
_GROUP_BYTES, _TOKEN_BYTES, _INDEX_BYTES = (np.dtype(t).itemsize for t in (clog.GROUP_DTYPE, clog.TOKEN_DTYPE,
                                                                           clog.INDEX_DTYPE))


@dataclass
class _Queued:
    """A message for the loop (this member's events of one log record) and what its answer needs."""

    reply: str  # the gateway's reply subject
    position: int  # the record's log sequence
    groups: np.ndarray  # per event: key group, the gateway's token and index (daemon/cluster/log.py)
    tokens: np.ndarray
    index: np.ndarray
    message: EventsMessage | TargetsMessage | ForecastMessage
    version: int  # the model version its events are applied with (weights.py, "The rule")

    def subset(self, keep: np.ndarray) -> _Queued:
        """The same record with only events `keep` (positions) left."""
        m = self.message
        header = _pick(m.header, keep.tolist())
        nbytes = m.nbytes * len(keep) // max(1, len(self.groups))
        if isinstance(m, TargetsMessage):
            message = TargetsMessage(m.envelope, header, m.targets[keep], nbytes)
        elif isinstance(m, ForecastMessage):
            message = ForecastMessage(m.envelope, header, None if m.exog is None else m.exog[keep], nbytes)
        else:
            message = EventsMessage(m.envelope, header, m.features[keep],
                                    None if m.targets is None else m.targets[keep], m.received, nbytes)
        return _Queued(self.reply, self.position, self.groups[keep], self.tokens[keep], self.index[keep], message,
                       self.version)


@dataclass
class _Marker:
    """A model version marker queued for the loop in its log place: the newest version, served by a replica
    with no records to apply too."""

    position: int
    version: int


def _pick(header: protocol.EventsHeader, keep: list[int]) -> protocol.EventsHeader:
    """The header of events `keep` only: each keeps its stream, sequence number and sequence-end flag."""
    seqs = None if header.seqs is None else [header.seqs[i] for i in keep]
    ends = None if header.ends is None else [header.ends[i] for i in keep]
    return msgspec.structs.replace(header, streams=[header.streams[i] for i in keep], seqs=seqs, ends=ends)


def _reply_batch(answers: list[tuple]) -> bytes:
    """One ReplyBatch of answers (tokens, index, status, predictions [n, width or 0], reasons, version, flags or
    None) of one prediction width (`_by_width`)."""
    out_dim = max(a[3].shape[1] for a in answers)
    with_flags = any(a[6] is not None for a in answers)
    reasons, offset = {}, 0
    for a in answers:
        reasons.update({offset + i: why for i, why in a[4].items()})
        offset += len(a[0])
    preds = [a[3] if a[3].shape[1] == out_dim else np.full((len(a[0]), out_dim), np.nan, np.float32)
             for a in answers]
    batch = clog.ReplyBatch(
        tokens=np.concatenate([a[0] for a in answers]).tobytes(),
        index=np.concatenate([a[1] for a in answers]).tobytes(),
        status=np.concatenate([a[2] for a in answers]).tobytes(),
        out_dim=out_dim,
        predictions=np.concatenate(preds).tobytes(),
        reasons=reasons,
        version=max(a[5] for a in answers),
        flags=np.concatenate([np.zeros(len(a[0]), np.uint8) if a[6] is None else a[6] for a in answers]).tobytes()
        if with_flags else b"",
    )
    return clog.reply_batch_codec[0].encode(batch)


def _by_width(answers: list[tuple]) -> list[list[tuple]]:
    """Answers split by prediction width: a forecast's rows (horizon x O) never share a ReplyBatch with events'
    (O); answers without predictions (rejected whole, delayed targets) go with any."""
    widths: dict[int, list[tuple]] = {}
    for a in answers:
        widths.setdefault(a[3].shape[1], []).append(a)
    bare = widths.pop(0, [])
    groups = list(widths.values()) or [[]]
    groups[0] += bare
    return groups


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
        self.partitions = cluster.log_partitions
        self.key_groups = clog.KeyGroups(self.groups)  # of resident streams, at snapshots
        self.member = member_name(cluster.member)
        self.limits = limits
        self.max_inflight_bytes = max_inflight_bytes
        self.store = store
        self.model_version = model_version  # callable: the serving model's version
        # Model versions (daemon/cluster/weights.py): serving_model() is the model served now (the initial one at
        # start); install(model, newest) serves a cluster version between batches (weights.installer).
        self.install = install
        self._taken: set[bytes] = set()  # tokens handed to the loop and not answered yet: a batch in progress
        self.metrics = metrics
        self.snapshot_interval_s = cluster.snapshot_interval_s
        self.lease_ttl = cluster.lease_ttl
        metrics.cluster_key_groups_total.set(self.groups)
        self._last_rebalance = time.monotonic()
        self.endpoint = f"{cluster.nats} (cluster member {self.member})"
        self.monitor = None  # no ZeroMQ peers to watch: the I/O thread's monitor is off
        self.positions = np.zeros(self.groups, dtype=np.int64)  # per key group: see "Positions" above
        self.queued = np.zeros(self.groups, dtype=np.int64)  # per key group: last record with its events queued
        self.owned: frozenset[int] = frozenset()
        self.owned_mask = np.zeros(self.groups, dtype=bool)
        self.reading = np.zeros(self.groups, dtype=bool)  # owned since the subscription began (module docstring)
        self.releasing = np.zeros(self.groups, dtype=bool)  # being handed over: still answered (_release)
        self.read_upto = 0  # the last log sequence the subscription delivered (each record examined)
        self.revision: dict[int, int] = {}  # owned key group -> revision of our last write of its entry
        self.entries: dict[int, own.GroupEntry] = {}  # owned key group -> that entry
        self.snapshotted: dict[int, float] = {}  # owned key group -> monotonic time of its last snapshot
        self.pending_bytes = 0
        self._ready: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # callables for the loop's thread
        self._loop_stopped = False
        self._replies: dict[bytes, _Queued] = {}  # the loop's message token -> what its answer needs
        self._outgoing: dict[str, list[tuple]] = {}  # gateway reply subject -> answers of the loop's last batch
        self._trim_due: set[int] = set()  # log partitions whose key groups moved on to newer snapshots
        self._trimmed: dict[int, float] = {}  # log partition -> monotonic time it was last trimmed
        self._next = 0
        self._closing = False
        self._sub = None
        self._owning = asyncio.Lock()
        self.link = clog.NatsLink(cluster.nats, f"replica-{self.member}", connect_options(cluster))
        try:
            self.partitions = clog.open_log(self.link, self.groups, self.partitions)
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
            self.link.loop.create_task(self.weights.beat(members, self.membership.owner_alive))

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
                await self._release(sorted(self.owned - intended))
                await _all(self._claim(group, members) for group in sorted(intended - self.owned))
                now = time.monotonic()
                due = [g for g in sorted(self.owned) if now - self.snapshotted.get(g, now) >= self.snapshot_interval_s]
                taken = await self._snapshots(due)
                await _all(self._checkpoint(group, self.member, taken.get(group)) for group in due)
                await self._trim_one(now)
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
                self._fence(group)

    def _fence(self, group: int) -> None:
        """Another member owns `group` now. What this member applied of it since its last snapshot was not
        answered, so its own state of the group no longer counts: a later claim restores the entry's snapshot
        (positions -1) and the group's events are replayed and answered from there."""
        self._set_owned(self.owned - {group})
        with self._cond:
            self.positions[group] = self.queued[group] = -1
        self.revision.pop(group, None)
        self.entries.pop(group, None)
        self.snapshotted.pop(group, None)

    def _set_owned(self, owned: frozenset[int], gained: int | None = None) -> None:
        mask = np.zeros(self.groups, dtype=bool)
        mask[list(owned)] = True
        with self._cond:
            if gained is not None:  # its events still queued from an earlier ownership are read again
                self._drop_queued(gained)
                self.queued[gained] = self.positions[gained]
            self.owned = owned
            self.owned_mask = mask
            self.reading &= mask  # a gained group is read from the next subscription on (_resubscribe)
        self.metrics.cluster_key_groups.set(len(owned))

    async def _claim(self, group: int, members: set[str]) -> None:
        entry, revision = await own.read_entry(self.kv, group)
        if entry is not None and entry.owner not in ("", self.member) and (
            entry.owner in members or await self.membership.owner_alive(entry.owner)
        ):
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
        elif self.positions[group] < 0:  # fenced from it once, and no snapshot since: the log from its start
            self.positions[group] = 0
        self.revision[group], self.entries[group] = new_revision, claimed
        # Due at a point of the interval of its own, so each heartbeat snapshots a few key groups, not all of
        # those claimed together at once (a burst of snapshots and puts stalls the answers for ~100 ms).
        self.snapshotted[group] = time.monotonic() - self.snapshot_interval_s * group / self.groups
        self._set_owned(self.owned | {group}, gained=group)
        self.metrics.cluster_moves.labels("claimed").inc()

    async def _release(self, groups: list[int]) -> None:
        """Hand key groups over: stop reading them, snapshot them, release their entries. Events of them the loop
        holds now are still answered here: the snapshots, taken after them, include them, so their next owners
        will not."""
        if not groups:
            return
        self.releasing[groups] = True
        self._set_owned(self.owned - set(groups))
        try:
            taken = await self._snapshots(groups)
            await _all(self._checkpoint(group, "", taken.get(group)) for group in groups)
        finally:
            self.releasing[groups] = False
        for group in groups:
            if group in self.entries:  # not fenced meanwhile
                self.metrics.cluster_moves.labels("released").inc()
            self.revision.pop(group, None)
            self.entries.pop(group, None)
            self.snapshotted.pop(group, None)

    async def _checkpoint(self, group: int, owner: str, taken: tuple | None) -> None:
        """Point a key group's entry at its snapshot `taken` (`_snapshots`) by compare-and-set; fenced if that
        fails. `owner` empty releases the group."""
        entry = self.entries.get(group)
        if entry is None or taken is None:
            return
        self.snapshotted[group] = time.monotonic()
        position, data, version = taken
        if data is None:  # nothing applied since the last snapshot: it stands
            if owner == entry.owner:
                return
            updated = own.GroupEntry(owner, entry.epoch, entry.snapshot, entry.seq, entry.model_version)
        else:
            name = f"g{group}-{position}"
            await self.objects.put(name, data)
            updated = own.GroupEntry(owner, entry.epoch, name, position, version)
        revision = await own.write_entry(self.kv, group, updated, self.revision[group])
        if revision is None:
            self.metrics.cluster_moves.labels("fenced").inc()
            log.warning("key group %d was claimed by another member: %s is fenced from it", group, self.member)
            self._fence(group)
            return
        self.revision[group], self.entries[group] = revision, updated
        if updated.snapshot != entry.snapshot:
            self._trim_due.add(group % self.partitions)
            if entry.snapshot:  # no longer referenced: a claim restores the newer one
                try:
                    await self.objects.delete(entry.snapshot)
                except Exception as exc:  # left behind; harmless but for the space
                    log.warning("key group %d: deleting snapshot %s failed: %s", group, entry.snapshot, exc)

    async def _snapshots(self, groups: list[int]) -> dict[int, tuple[int, bytes | None, int]]:
        """group -> (position, snapshot or None when unchanged since its entry's, model version), taken on the
        loop's thread in one pass over the store."""
        seqs = {g: self.entries[g].seq for g in groups if g in self.entries}
        return await self._on_loop(lambda: self._snapshot_many(seqs))

    def _snapshot_many(self, seqs: dict[int, int]) -> dict[int, tuple[int, bytes | None, int]]:
        """Snapshots of the key groups in `seqs` (group -> its entry's position), on the loop's thread; none for a
        group still at that position. A group with nothing queued or in the loop has every record the
        subscription delivered applied, so its position moves up to `read_upto`: its snapshot then lets the log
        be trimmed though the group itself is idle (other key groups share its partition). Each carries the
        version its next record is applied with (weights.py, "The rule"): what a restore resumes under."""
        ids = list(self.store.slot_of)
        of = self.key_groups.of(ids)
        out = {}
        for group, seq in seqs.items():
            with self._cond:
                if self.reading[group] and self.queued[group] == self.positions[group] < self.read_upto:
                    self.positions[group] = self.queued[group] = self.read_upto
            position = int(self.positions[group])
            version = self.weights.version_at(position + 1)
            if position == seq:
                out[group] = (position, None, version)
                continue
            members = [ids[i] for i in np.flatnonzero(of == group).tolist()]
            out[group] = (position, own.snapshot_group(self.store, group, self.groups, position, version, members),
                          version)
        return out

    async def _trim_one(self, now: float) -> None:
        """Trim at most one log partition per heartbeat: the due one trimmed longest ago, each at most every fifth
        of the snapshot interval. A purge stalls the log stream while nats-server removes the records, for a time
        about proportional to their number (docs/benchmarks.md, "Cluster latency: the log's trimming"): all
        partitions at once every snapshot interval stalled answers 40-90 ms at 158k events/s; small purges spread
        over the heartbeats keep each stall to a few ms. The floor moves on as the partition's groups snapshot,
        which they do spread over the interval, so the log kept stays about one snapshot interval long."""
        due = [p for p in self._trim_due if now - self._trimmed.get(p, -1e9) >= self.snapshot_interval_s / 5]
        if not due:
            return
        partition = min(due, key=lambda p: self._trimmed.get(p, -1e9))
        self._trim_due.discard(partition)
        self._trimmed[partition] = now
        await self._trim(partition)

    async def _trim(self, partition: int) -> None:
        """Retention: a partition's records up to the lowest snapshot position among its key groups are no
        longer needed by anyone (a claim restores the group's snapshot, or reads on from a later position of its
        own), so the log keeps what the referenced snapshots need, and no more."""
        groups = clog.partition_groups(partition, self.groups, self.partitions)
        try:
            others = [g for g in groups if g not in self.entries]
            read = await asyncio.gather(*(own.read_entry(self.kv, g) for g in others))
            seqs = [self.entries[g].seq for g in groups if g in self.entries]
            seqs += [entry.seq if entry is not None else 0 for entry, _ in read]
            floor = min(seqs)
            if floor > 0:
                await self.link.js.purge_stream(clog.LOG_STREAM, subject=clog.subject(partition), seq=floor + 1)
        except Exception as exc:  # kept a while longer: the next snapshot trims again
            log.warning("log partition %d: trimming failed: %s", partition, exc)

    async def _resubscribe(self) -> None:
        from nats.js import api

        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if not self.owned:
            return
        await self.weights.refresh()  # every marker before the start is in the table (weights.py, "The rule")
        with self._cond:
            start = int(self.queued[self.owned_mask].min()) + 1
            self.reading = self.owned_mask.copy()
            self.read_upto = start - 1
        subjects = self._read_subjects()
        log.info("cluster member %s reads the log from position %d, %s", self.member, start,
                 "every partition" if subjects is None else f"{len(subjects) - 1} of {self.partitions} partitions")
        sub = None

        async def on_record(msg) -> None:
            await self._on_record(msg, sub)

        sub = await self.link.js.subscribe(
            f"{clog.SUBJECT_PREFIX}*",
            stream=clog.LOG_STREAM,
            cb=on_record,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=start, filter_subjects=subjects),
        )
        self._sub = sub

    def _read_subjects(self) -> list[str] | None:
        """The log subjects this member reads: those of the partitions holding its key groups, and the model
        markers; None (all) when its groups span every partition. With P well above the members (at scale,
        docs/operations.md) a member then reads ~P / members partitions, not the whole log. Records of other
        partitions hold none of its groups, so a position read up to (`read_upto`) still covers its groups."""
        partitions = sorted({group % self.partitions for group in self.owned})
        if len(partitions) == self.partitions:
            return None
        return [clog.subject(partition) for partition in partitions] + [wsync.MARKER_SUBJECT]

    async def _on_record(self, msg, sub) -> None:
        if msg.subject == wsync.MARKER_SUBJECT:
            await self._on_marker(msg, sub)
            return
        # The record's model version, its weights fetched before the checks below: nothing may await between
        # them and queueing
        version = self.weights.version_at(msg.metadata.sequence.stream)
        if version not in self.weights.models:
            await self.weights.model(version)
        while self.pending_bytes > self.max_inflight_bytes and not self._closing:
            await asyncio.sleep(0.002)  # the loop is behind: leave the rest in JetStream
        # Checked after the wait, with no await before the record is queued: ownership may have moved meanwhile
        if sub is not self._sub:
            return
        position = msg.metadata.sequence.stream
        self.metrics.cluster_log_pending.set(msg.metadata.num_pending)
        item = taken = None
        try:
            record = clog.log_record_codec[1].decode(msg.data)
            groups = np.frombuffer(record.groups, dtype=clog.GROUP_DTYPE)
            if len(record.tokens) != _TOKEN_BYTES * len(groups) or len(record.index) != _INDEX_BYTES * len(groups):
                raise ValueError("its per-event arrays differ in length")
        except Exception as exc:
            log.error("record %d of the log is not a lstmd log record (%s); skipped", position, exc)
        else:
            mine = np.flatnonzero(self.reading[groups] & (self.queued[groups] < position))
            if len(mine):
                taken = groups[mine]
                item = self._queue_item(record, mine, position, len(msg.data) * len(mine) // len(groups), version)
        with self._cond:
            if taken is not None:  # queued, or answered rejected: either way not taken again
                self.queued[taken] = position
            if item is not None:
                self._ready.append(item)
                self.pending_bytes += item.message.nbytes
                self._cond.notify()
            self.read_upto = position

    def _queue_item(self, record: clog.LogRecord, mine: np.ndarray, position: int, nbytes: int,
                    version: int) -> _Queued | None:
        """This member's events (positions `mine`) of a record as one message for the loop: events, or delayed
        targets joined by the loop as the socket's are; None when the record cannot be decoded (its events here
        are answered rejected, as the events socket would answer)."""
        tokens = np.frombuffer(record.tokens, dtype=clog.TOKEN_DTYPE)[mine]
        index = np.frombuffer(record.index, dtype=clog.INDEX_DTYPE)[mine]
        groups = np.frombuffer(record.groups, dtype=clog.GROUP_DTYPE)[mine]
        body = [record.header, record.features] if record.targets is None else [record.header, record.features,
                                                                                record.targets]
        try:
            header, features, targets = decode_events_request(body, self.limits)
            if len(header.streams) * _GROUP_BYTES != len(record.groups):
                raise protocol.ProtocolError("malformed", "the record's events and key groups differ in number")
        except protocol.ProtocolError as exc:
            n = len(mine)
            reasons = dict.fromkeys(range(n), str(exc))
            answer = (tokens, index, np.full(n, protocol.REJECTED, dtype=np.uint8), np.empty((n, 0), np.float32),
                      reasons, 0, None)
            self.link.submit(self._publish(record.reply, _reply_batch([answer])))
            return None
        token = self._next.to_bytes(8, "little")
        self._next += 1
        if len(mine) < len(header.streams):
            header = _pick(header, mine.tolist())
        nbytes += len(mine) * _HEADER_BYTES_PER_EVENT
        if header.kind == "targets":
            message = TargetsMessage([token], header, targets[mine], nbytes)
        elif header.kind == "forecast":  # answered between two batches, after every record before it
            message = ForecastMessage([token], header, None if features is None else features[mine], nbytes)
        else:  # a copy either way: the loop hands features to torch, which wants writable memory
            message = EventsMessage([token], header, features[mine], None if targets is None else targets[mine],
                                    time.perf_counter(), nbytes)
        item = _Queued(record.reply, position, groups, tokens, index, message, version)
        self._replies[token] = item
        return item

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
            self._ready.append(_Marker(position, version))
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
        item = self._ready[0]
        if isinstance(item, _Marker):
            needed = item.version if item.version == self.weights.latest() else None
        elif self.owned_mask[item.groups].any():
            needed = item.version
        else:  # take() drops it: its new owners apply it
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
        self._flush()  # the loop waits between batches and while gathering one: the last batch is answered
        self._run_jobs()
        with self._cond:
            if not self._ready and self._jobs.empty():
                self._cond.wait(timeout_ms / 1000)
        self._run_jobs()
        with self._cond:
            return bool(self._ready) and self._switch_model()

    def take(self) -> EventsMessage | TargetsMessage | ForecastMessage | None:
        while True:
            with self._cond:
                if not self._ready or not self._switch_model():
                    return None
                item = self._ready.popleft()
                if isinstance(item, _Marker):
                    continue
                self.pending_bytes -= item.message.nbytes
                keep = self.owned_mask[item.groups]
            if not keep.all():  # key groups moved to another member since it was read: that member answers them
                if not keep.any():
                    self._replies.pop(item.message.envelope[0], None)
                    continue
                item = self._replies[item.message.envelope[0]] = item.subset(np.flatnonzero(keep))
            self._taken.add(item.message.envelope[0])
            return item.message

    def put_back(self, message: EventsMessage) -> None:
        """Hand back the message take() returned last, unserved (the loop's batch is full, daemon/server.py
        _gather): first in line again, its bytes counted again, no longer part of the batch in progress."""
        token = message.envelope[0]
        with self._cond:
            self._taken.discard(token)
            self._ready.appendleft(self._replies[token])
            self.pending_bytes += message.nbytes

    def _drop_queued(self, group: int) -> None:
        """Events of `group` out of the queued messages (with self._cond held)."""
        ready = collections.deque()
        for item in self._ready:
            keep = True if isinstance(item, _Marker) else item.groups != group
            if not np.all(keep):
                self.pending_bytes -= item.message.nbytes
                if not keep.any():
                    self._replies.pop(item.message.envelope[0], None)
                    continue
                item = self._replies[item.message.envelope[0]] = item.subset(np.flatnonzero(keep))
                self.pending_bytes += item.message.nbytes
            ready.append(item)
        self._ready = ready

    def pending(self) -> int:
        return len(self._ready)

    def send(self, frames: list) -> bool:
        """The loop's reply to one message, kept for the batch's ReplyBatch to its gateway (`_flush`)."""
        self._taken.discard(bytes(frames[0]))
        item = self._replies.pop(bytes(frames[0]), None)
        if item is None:  # a second reply to the same record (the loop's last-resort guard): the first stands
            return False
        # Answered = applied: the store now holds this record (module docstring, "Positions"). Not for a key
        # group fenced meanwhile (_fence) or handed over since (its snapshot was taken before this batch was
        # applied): its new owner replays and answers those events. Being handed over (`releasing`), the
        # snapshot that goes with the group may be taken after this batch and hold it: answered here.
        keep = self.owned_mask[item.groups] | self.releasing[item.groups]
        self.positions[item.groups[keep]] = np.maximum(self.positions[item.groups[keep]], item.position)
        if not keep.all():
            self.metrics.cluster_dropped_answers.inc(int(len(keep) - keep.sum()))
        if not keep.any():
            return False
        reply = protocol.events_reply_decoder.decode(frames[1])
        n = len(item.groups)
        if reply.error is not None:
            status, preds = np.full(n, protocol.REJECTED, dtype=np.uint8), np.empty((n, 0), np.float32)
            reasons = dict.fromkeys(range(n), reply.error)
            flags = None
        else:
            status = np.frombuffer(reply.status, dtype=np.uint8)
            # delayed targets are answered without predictions (as by the daemon)
            preds = (np.frombuffer(frames[2], dtype=np.float32).reshape(n, reply.out_dim) if len(frames) > 2
                     else np.empty((n, 0), np.float32))
            reasons = reply.reasons
            flags = np.frombuffer(reply.flags, dtype=np.uint8) if len(reply.flags) == n else None  # output "end"
        tokens, index = item.tokens, item.index
        if not keep.all():
            kept = np.flatnonzero(keep)
            reasons = {j: reasons[i] for j, i in enumerate(kept.tolist()) if i in reasons}
            tokens, index, status, preds = tokens[kept], index[kept], status[kept], preds[kept]
            flags = None if flags is None else flags[kept]
        self._outgoing.setdefault(item.reply, []).append((tokens, index, status, preds, reasons, reply.version,
                                                          flags))
        return True

    def _flush(self) -> None:
        """The answers of the loop's last batch: one ReplyBatch per gateway."""
        if not self._outgoing:
            return
        outgoing, self._outgoing = self._outgoing, {}
        for subject_, answers in outgoing.items():
            for same_width in _by_width(answers):
                self.link.submit(self._publish(subject_, _reply_batch(same_width)))

    async def _publish(self, subject_: str, payload: bytes) -> None:
        try:
            await self.link.nc.publish(subject_, payload)
        except Exception as exc:  # the gateway's producer resends; nothing here to undo
            log.warning("answer to %s not sent: %s", subject_, exc)

    def close(self) -> None:
        """Hand every owned key group over (snapshot + release) and leave the cluster; the loop has stopped, so
        the snapshots run here."""
        self._closing = True
        self._flush()
        self._loop_stopped = True
        self._run_jobs()  # one a rebalance already waits for (a start that failed after this was built)

        async def leave() -> None:
            await self.membership.leave()
            await self.weights.leave()
            async with self._owning:
                await self._release(sorted(self.owned))

        try:
            if not self.link.nc.is_connected:
                raise ConnectionError("not connected to NATS")
            self.link.run(leave(), 30)
        except Exception:  # the others restore the last snapshots and replay, as after a death
            log.exception("cluster member %s could not hand its key groups over", self.member)
        self.link.close()
