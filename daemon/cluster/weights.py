"""One model across the cluster: the version table, version markers in the log, weight deltas and the averager.

- **Versions**: the cluster's model versions are numbered once for the whole cluster. Version v's weights are a
  model file (safetensors, daemon/model.py) in the object store MODELS_BUCKET; the KV entry `versions` of
  MODEL_BUCKET is the `VersionTable`: for each kept version, its object and the **log position** of its
  marker. Every version is published the same way (`publish`): averaged weights, `lstmd model import`,
  `lstmd model rollback` against any replica.
- **Markers in the log**: publishing v+1 puts the model object, then a `Marker` on MARKER_SUBJECT into the events
  log itself (it matches the log's `lstmd.ev.*` subjects, so it takes a place among the records), then adds
  (v+1, the marker's position) to the table by compare-and-set against the revision the publisher read
  (`complete`). A marker whose compare-and-set lost (another version was published first) is dangling: it is in
  the log but not in the table, and changes nothing. A publisher that died between marker and table leaves the
  table behind the log: the first replica that reads the marker completes it (the marker carries everything),
  so every member ends with the same table.
- **The rule** that makes replays exact: a record at log position p is applied with `VersionTable.at(p)`, the
  version of the newest marker in the table before p (the initial model of `[model]` before the first one).
  It depends on the log alone, so the owner that first applied a record and a new owner replaying it after a
  failover (from a key group snapshot, daemon/cluster/ownership.py) use the same weights for it. The replica
  (daemon/cluster/replica.py) tags each record with its version when it reads it, ends a batch where the
  version changes, and swaps the model in between two batches (`installer`: the daemon's install path). The
  replica's consumer reads markers in log order and resolves each before the records after it, so a record's
  tag is never decided on an incomplete table.
- **Training**: each replica trains on its own streams (daemon/trainer.py, unchanged). A candidate that passes
  its holdout check is not served locally: `offer` keeps it, and every `cluster.sync_interval` the replica
  publishes its delta (trained weights minus the cluster version they descend from, safetensors) with the
  training windows it took since that version to the JetStream stream DELTAS_STREAM, subject `lstmd.delta.<v>`.
- **The averager**: one member, elected with the lease mechanism of key groups (rendezvous hashing over the live
  members picks the intended holder; the `averager` KV entry moves only by compare-and-set; a holder whose
  heartbeat expired loses it). It collects the deltas for the newest version v and, once every live member has
  sent one or `cluster.sync_interval` has passed since the first, publishes v + sum(w_i delta_i) / sum(w_i)
  (w_i: windows trained) as v+1. Every replica then serves v+1 from its marker on and restarts its trainer from it.
- **Retention**: the table keeps the newest `cluster.model_versions` versions and their objects; the floor (the
  newest version dropped from the table) keeps its object too, so records between its marker and the oldest
  kept one still find their weights. Key groups are snapshotted every `cluster.snapshot_interval_s`, so a
  replay reaches back that far: keep versions for longer than that (docs/operations.md, "Model versions").
- Everything here runs on the NATS link's asyncio loop, except `offer` and the installer (the serving loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import torch
from lstmd.daemon.cluster import log as clog
from lstmd.daemon.cluster.membership import owner_of
from lstmd.daemon.model import ServingModel, expected_shapes
from lstmd.daemon.model_header import model_file_metadata
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

log = logging.getLogger("lstmd.cluster")

MODELS_BUCKET = "lstmd_models"
MODEL_BUCKET = "lstmd_model"
TABLE_KEY = "versions"
LEASE_KEY = "averager"
MARKER_SUBJECT = f"{clog.SUBJECT_PREFIX}model"
DELTAS_STREAM = "LSTMD_DELTAS"
DELTA_PREFIX = "lstmd.delta."
DELTAS_MAX_AGE_S = 3600.0  # deltas of versions long superseded are of no use
AVERAGER = -1  # the averager's "key group" in rendezvous hashing (real key groups are >= 0)
_PUBLISH_TRIES = 5


class VersionEntry(msgspec.Struct, array_like=True):
    version: int
    position: int  # log sequence of its marker
    object: str  # name in MODELS_BUCKET
    source: str = ""


class VersionTable(msgspec.Struct):
    versions: list[VersionEntry] = []  # oldest first, positions increasing
    floor: VersionEntry | None = None  # the newest version dropped from `versions` (its object is kept)

    def latest(self, initial: int) -> int:
        return self.versions[-1].version if self.versions else initial

    def at(self, position: int, initial: int) -> int:
        """The version a record at log `position` is applied with: the newest marker before it."""
        for entry in reversed(self.versions):
            if entry.position < position:
                return entry.version
        if self.floor is not None:
            if self.floor.position >= position:
                log.error("log position %d is older than the model versions kept (cluster.model_versions): "
                          "served with version %d, the oldest kept", position, self.floor.version)
            return self.floor.version
        return initial

    def entry(self, version: int) -> VersionEntry | None:
        for entry in (*self.versions, self.floor):
            if entry is not None and entry.version == version:
                return entry
        return None


class Marker(msgspec.Struct):
    version: int
    object: str
    base_revision: int  # the table's revision its publisher read (0: no table yet)
    source: str = ""


class Lease(msgspec.Struct):
    owner: str = ""  # empty: released
    epoch: int = 0


_table_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(VersionTable))
_marker_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(Marker))
_lease_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(Lease))


def _newest_position(table: VersionTable) -> int:
    return table.versions[-1].position if table.versions else 0


def average(base: ServingModel, deltas: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """base + the deltas' mean weighted by their windows (each delta: (windows, name -> tensor))."""
    total = sum(max(1, windows) for windows, _ in deltas)
    out = {}
    for name, tensor in base.tensors.items():
        step = sum(delta[name].to(tensor.device) * (max(1, windows) / total) for windows, delta in deltas)
        out[name] = tensor + step
    return out


def encode_delta(model: ServingModel, base: ServingModel, member: str, windows: int) -> bytes:
    """A replica's delta as a safetensors file: trained weights minus its base version, and who and how much."""
    delta = {name: (t.cpu() - base.tensors[name].cpu()).contiguous() for name, t in model.tensors.items()}
    meta = {"member": member, "base": str(base.version), "windows": str(windows)}
    if model.normalization is not None:
        meta["normalization"] = model.normalization.to_json()
    return save_tensors(delta, metadata=meta)


def decode_delta(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a delta from encode_delta."""
    return model_file_metadata(data, "a weight delta"), load_tensors(data)


class WeightSync:
    """This member's side of the one cluster model: its table, its delta, and the averager when it holds the lease."""

    def __init__(self, link: clog.NatsLink, member: str, initial: ServingModel, sync_interval: float,
                 keep: int) -> None:
        self.link = link
        self.member = member
        self.spec = initial.spec
        self.initial = initial.version
        self.sync_interval = sync_interval
        self.keep = keep
        self.table = VersionTable()
        self.models: dict[int, ServingModel] = {initial.version: initial.to(torch.device("cpu"))}
        self.kv = self.objects = None
        # The replica's own training (offer: serving loop; sent: NATS loop).
        self._offered: tuple[ServingModel, int, int] | None = None  # (trained model, base version, windows)
        self._sent: tuple[int, int] | None = None  # (base version, windows) of the last delta sent
        self._last_sent = 0.0
        self._deltas_sent = 0
        # The averager (only while this member holds the lease).
        self.holding = False
        self._lease_revision: int | None = None
        self._lease_epoch = 0
        self._deltas: dict[int, dict[str, tuple[int, dict, str | None]]] = {}  # base -> member -> delta
        self._first_delta: dict[int, float] = {}  # base -> monotonic time its first delta came
        self._deltas_sub = None
        self._lock = asyncio.Lock()  # one beat's work at a time

    async def open(self) -> None:
        from nats.js import api
        from nats.js.errors import BucketNotFoundError, NotFoundError

        size = len(self.models[self.initial].to_bytes())
        if size > self.link.nc.max_payload:
            raise clog.ClusterError(
                f"the model file is {size} bytes, over the NATS server's max_payload of {self.link.nc.max_payload}: "
                "weight deltas travel as one message each; raise max_payload in the server's config"
            )
        try:
            self.kv = await self.link.js.key_value(MODEL_BUCKET)
        except BucketNotFoundError:
            self.kv = await self.link.js.create_key_value(bucket=MODEL_BUCKET, history=1)
        try:
            self.objects = await self.link.js.object_store(MODELS_BUCKET)
        except BucketNotFoundError:
            self.objects = await self.link.js.create_object_store(MODELS_BUCKET)
        try:
            await self.link.js.stream_info(DELTAS_STREAM)
        except NotFoundError:
            with contextlib.suppress(Exception):  # a racing member created it first
                await self.link.js.add_stream(api.StreamConfig(
                    name=DELTAS_STREAM, subjects=[f"{DELTA_PREFIX}*"], storage=api.StorageType.FILE,
                    max_age=DELTAS_MAX_AGE_S, duplicate_window=clog.DUPLICATE_WINDOW_S,
                ))
        await self.refresh()

    # ---- the table ------------------------------------------------------------------------------------------

    async def _read(self) -> tuple[VersionTable, int]:
        from nats.js.errors import KeyNotFoundError

        try:
            found = await self.kv.get(TABLE_KEY)
        except KeyNotFoundError:
            return VersionTable(), 0
        return _table_codec[1].decode(found.value), found.revision

    def _adopt(self, table: VersionTable) -> None:
        """Take a table read from the KV unless it is older than ours (a read served by a lagging server of a NATS
        cluster): the table only grows at its end, so the one whose newest marker is later is the newer."""
        if _newest_position(table) >= _newest_position(self.table):
            self.table = table

    async def refresh(self) -> None:
        self._adopt((await self._read())[0])

    def latest(self) -> int:
        return self.table.latest(self.initial)

    def version_at(self, position: int) -> int:
        return self.table.at(position, self.initial)

    async def model(self, version: int) -> ServingModel:
        """Version `version`'s weights (on the CPU), from the object store the first time."""
        found = self.models.get(version)
        if found is not None:
            return found
        entry = self.table.entry(version)
        if entry is None:
            raise clog.ClusterError(f"model version {version} is not in the cluster's version table")
        model = ServingModel.from_bytes((await self.objects.get(entry.object)).data)
        if model.spec != self.spec:
            raise clog.ClusterError(f"model version {version} does not fit [model]: {model.spec.mismatch(self.spec)}")
        model.version = version
        kept = {e.version for e in (*self.table.versions, self.table.floor) if e is not None} | {self.initial}
        for old in [v for v in self.models if v not in kept]:
            del self.models[old]
        self.models[version] = model
        return model

    async def complete(self, position: int, marker: Marker) -> bool:
        """Add the marker at `position` to the table unless another version got there first; True if it is in.

        Only a definite answer is returned (every member must reach the same one): a failure to reach the table
        raises, and the caller tries again."""
        from nats.js.errors import KeyWrongLastSequenceError

        while True:
            table, revision = await self._read()
            self._adopt(table)
            if any(e.position == position for e in table.versions):
                return True
            if revision > marker.base_revision:  # the table moved on without it: dangling
                return False
            if revision < marker.base_revision:  # a lagging server's read (its publisher saw a newer one): again
                await asyncio.sleep(0.05)
                continue
            versions = [*table.versions, VersionEntry(marker.version, position, marker.object, marker.source)]
            dropped, versions = versions[: -self.keep], versions[-self.keep :]
            updated = VersionTable(versions, dropped[-1] if dropped else table.floor)
            try:
                if revision == 0:
                    await self.kv.create(TABLE_KEY, _table_codec[0].encode(updated))
                else:
                    await self.kv.update(TABLE_KEY, _table_codec[0].encode(updated), last=revision)
            except KeyWrongLastSequenceError:  # another writer got there first: the next read says who
                continue
            except Exception as exc:  # kv.create of an existing key answers with another error class in some versions
                if "wrong last sequence" in str(exc).lower() or "exists" in str(exc).lower():
                    continue
                raise
            self._adopt(updated)
            # Retention: the old floor's object is no longer reachable from the table.
            if dropped and table.floor is not None:
                with contextlib.suppress(Exception):
                    await self.objects.delete(table.floor.object)
            return True

    async def on_marker(self, position: int, data: bytes) -> int | None:
        """A marker read from the log (in order, before the records after it): resolve it; its version when it is
        in the table and the newest (what an idle replica should switch to), else None."""
        try:
            marker = _marker_codec[1].decode(data)
        except msgspec.DecodeError:
            log.error("log record %d on %s is not a model marker; ignored", position, MARKER_SUBJECT)
            return None
        known = any(e.position == position for e in self.table.versions)
        if not known and (not self.table.versions or self.table.versions[-1].position < position):
            known = await self.complete(position, marker)  # also completes a publisher that died half way
        if not known or marker.version != self.latest():
            return None
        await self.model(marker.version)
        return marker.version

    async def publish(self, model: ServingModel, source: str, base: int | None = None) -> int | None:
        """Publish `model` as the cluster's next version (object, marker, table); returns its number. `base`: only
        on top of that version (an average of its deltas), else None: superseded meanwhile, nothing published."""
        for _ in range(_PUBLISH_TRIES):
            table, revision = await self._read()
            self._adopt(table)
            if base is not None and table.latest(self.initial) != base:
                return None
            version = table.latest(self.initial) + 1
            name = f"model-{version}-{self.member}-{time.time_ns()}"
            data = ServingModel(model.spec, model.tensors, version, model.normalization).to_bytes()
            await self.objects.put(name, data)
            marker = Marker(version, name, revision, source)
            ack = await self.link.js.publish(MARKER_SUBJECT, _marker_codec[0].encode(marker), stream=clog.LOG_STREAM,
                                             headers={"Nats-Msg-Id": name})
            if await self.complete(ack.seq, marker):
                self.models[version] = ServingModel(model.spec, dict(model.tensors), version,
                                                    model.normalization).to(torch.device("cpu"))
                log.info("cluster model version %d published (%s) at log position %d", version, source, ack.seq)
                return version
            with contextlib.suppress(Exception):  # its marker dangles: nothing refers to it
                await self.objects.delete(name)
        raise clog.ClusterError(f"could not publish a model version: {_PUBLISH_TRIES} tries lost to other publishers")

    # ---- this replica's training ----------------------------------------------------------------------------

    def offer(self, model: ServingModel, base: int, windows: int) -> None:
        """The serving loop: the trainer's latest candidate, trained from version `base` on `windows` more windows
        than the previous one; sent at the next sync with the windows trained since `base` as its weight."""
        previous = self._offered
        total = windows + (previous[2] if previous is not None and previous[1] == base else 0)
        self._offered = (model, base, total)

    async def _send_delta(self) -> None:
        offered = self._offered
        if offered is None or time.monotonic() - self._last_sent < self.sync_interval:
            return
        model, base, windows = offered
        if base != self.latest() or self._sent == (base, windows):
            return
        self._last_sent = time.monotonic()
        data = encode_delta(model, await self.model(base), self.member, windows)
        self._deltas_sent += 1
        await self.link.js.publish(f"{DELTA_PREFIX}{base}", data, stream=DELTAS_STREAM,
                                   headers={"Nats-Msg-Id": f"{self.member}:{base}:{self._deltas_sent}"})
        self._sent = (base, windows)
        log.info("weight delta from version %d sent (%d windows)", base, windows)

    # ---- the averager ---------------------------------------------------------------------------------------

    async def beat(self, members: set[str], owner_alive) -> None:
        """At every heartbeat: send this replica's delta when due; hold or hand over the averager lease; average.
        `owner_alive(name)` asks the server whether a member missing from `members` still holds its lease."""
        if self._lock.locked():
            return  # the previous beat's work is still running
        async with self._lock:
            try:
                await self._send_delta()
                await self._lease(members, owner_alive)
                if self.holding:
                    await self._average(members)
            except Exception:  # NATS away for a moment: the next beat tries again
                log.exception("cluster weight sync of %s failed; retried at the next heartbeat", self.member)

    async def _lease(self, members: set[str], owner_alive) -> None:
        from nats.js.errors import KeyNotFoundError

        try:
            found = await self.kv.get(LEASE_KEY)
            lease, revision = _lease_codec[1].decode(found.value), found.revision
        except KeyNotFoundError:
            lease, revision = None, 0
        held = lease is not None and lease.owner == self.member and revision == self._lease_revision
        if self.holding and not held:
            log.warning("the averager lease was taken from %s (it was silent past its lease)", self.member)
            await self._stop_averaging()
        intended = owner_of(AVERAGER, members) == self.member
        if held and not intended:  # a member that should hold it is live: hand it over
            await self._write_lease(Lease("", lease.epoch), revision)
            await self._stop_averaging()
        elif intended and not held and (not lease or lease.owner in ("", self.member) or (
                lease.owner not in members and not await owner_alive(lease.owner))):
            epoch = (lease.epoch if lease else 0) + 1
            if await self._write_lease(Lease(self.member, epoch), revision):
                self._lease_epoch = epoch
                log.info("cluster member %s is the averager (epoch %d)", self.member, epoch)
                await self._start_averaging()
        elif held and not self.holding:  # claimed, but its deltas subscription failed: again
            await self._start_averaging()

    async def _write_lease(self, lease: Lease, revision: int) -> bool:
        try:
            if revision == 0:
                self._lease_revision = await self.kv.create(LEASE_KEY, _lease_codec[0].encode(lease))
            else:
                self._lease_revision = await self.kv.update(LEASE_KEY, _lease_codec[0].encode(lease), last=revision)
        except Exception as exc:  # another member wrote it first
            log.debug("averager lease compare-and-set lost: %s", exc)
            self._lease_revision = None
            return False
        return True

    async def _start_averaging(self) -> None:
        from nats.js import api

        async def on_delta(msg) -> None:
            try:
                meta, tensors = decode_delta(msg.data)
                base, member, windows = int(meta["base"]), meta["member"], int(meta["windows"])
            except Exception:
                log.error("message %s on %s is not a lstmd weight delta; ignored", msg.metadata.sequence.stream,
                          msg.subject)
                return
            if base < self.latest():
                return  # for a version already superseded
            shapes = {name: tuple(t.shape) for name, t in tensors.items()}
            if shapes != expected_shapes(self.spec):  # a member with another [model]: it would poison the average
                log.error("weight delta from %s does not fit [model] (tensors %s); ignored", member, shapes)
                return
            self._deltas.setdefault(base, {})[member] = (windows, tensors, meta.get("normalization"))
            self._first_delta.setdefault(base, time.monotonic())

        self.holding = True
        self._deltas_sub = await self.link.js.subscribe(
            f"{DELTA_PREFIX}*", stream=DELTAS_STREAM, cb=on_delta, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )

    async def _stop_averaging(self) -> None:
        self.holding = False
        if self._deltas_sub is not None:
            with contextlib.suppress(Exception):
                await self._deltas_sub.unsubscribe()
            self._deltas_sub = None
        self._deltas.clear()
        self._first_delta.clear()

    async def _average(self, members: set[str]) -> None:
        await self.refresh()
        base = self.latest()
        for old in [b for b in self._deltas if b < base]:
            del self._deltas[old]
            self._first_delta.pop(old, None)
        got = self._deltas.get(base)
        if not got:
            return
        waited = time.monotonic() - self._first_delta[base]
        if not (members <= set(got) or waited >= self.sync_interval):
            return
        from lstmd.daemon.normalization import ForecastNormalization

        base_model = await self.model(base)
        deltas = [(windows, tensors) for windows, tensors, _ in got.values()]
        heaviest = max(got.values(), key=lambda d: d[0])[2]  # forecast statistics: those of the most data
        norm = ForecastNormalization.from_json(heaviest) if heaviest else base_model.normalization
        try:
            model = ServingModel(self.spec, average(base_model, deltas), 0, norm)
        except ValueError as exc:  # NaN/Inf: serving weights never see them
            log.error("averaged weights from version %d refused: %s", base, exc)
            del self._deltas[base]
            return
        windows = sum(windows for windows, _ in deltas)
        version = await self.publish(model, f"average of {len(got)} member(s), {windows} windows", base)
        if version is None:  # an operator's version came first: these deltas are of an older model
            log.info("averager %s: deltas on version %d superseded before they were published", self.member, base)
            self._deltas.pop(base, None)
            return
        log.info("averager %s: version %d from %d delta(s) on version %d (%s)", self.member, version, len(got), base,
                 ", ".join(sorted(got)))
        self._deltas.pop(base, None)
        with contextlib.suppress(Exception):
            await self.link.js.purge_stream(DELTAS_STREAM, subject=f"{DELTA_PREFIX}{base}")

    async def leave(self) -> None:
        """Hand the averager lease back (a graceful stop): the next intended member claims it at once."""
        if self.holding and self._lease_revision is not None:
            with contextlib.suppress(Exception):
                await self.kv.update(LEASE_KEY, _lease_codec[0].encode(Lease("", self._lease_epoch)),
                                     last=self._lease_revision)
        await self._stop_averaging()


async def newest_version(js) -> int:
    """The cluster's newest model version (0, the initial model, before any was published); for `cluster status`."""
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError

    try:
        found = await (await js.key_value(MODEL_BUCKET)).get(TABLE_KEY)
    except (BucketNotFoundError, KeyNotFoundError):
        return 0
    return _table_codec[1].decode(found.value).latest(0)


def installer(install_model, engine, trainer):
    """The serving loop's side: serve a cluster version through the daemon's install path (`install_model`, under
    that exact number) and, for the newest version, restart the trainer (None: training off) from it."""

    def install(model: ServingModel, newest: bool) -> None:
        install_model(model, "cluster", version=model.version)
        if newest and trainer is not None:
            trainer.reset_to(engine.model, f"cluster version {model.version}")

    return install
