"""Key group ownership records and key group snapshots: what moves when a member joins, leaves or dies.

- GROUPS_BUCKET (JetStream KV, one entry per key group, key `g<N>`): a `GroupEntry` with the owner, its epoch
  (+1 at every claim), the snapshot object that holds the group's streams and the log position it was taken at,
  and the model version it was taken under. Entries are written only by compare-and-set against the revision
  the writer last saw (`kv.create` for a group never owned): a member that lost a group without noticing
  (paused past its lease) fails its next write and is fenced.
- SNAPSHOTS_BUCKET (JetStream object store): one object per key group snapshot, `g<N>-<position>`, a
  safetensors file of the group's streams: their ids, rows of h and c, last sequence numbers, events applied,
  pending resets and resend windows, and of a forecast model their adaptation rows, seasonal rings and last
  events (without them a moved stream's next change, and so its predictions and forecasts, would differ).
  `snapshot_group` and `restore_group` touch the state store and run on the serving loop's thread only
  (daemon/cluster/replica.py hands them over).
"""

from __future__ import annotations

import msgspec
import numpy as np
import torch
from lstmd.daemon.cluster.log import key_group
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

GROUPS_BUCKET = "lstmd_groups"
SNAPSHOTS_BUCKET = "lstmd_snapshots"


class GroupEntry(msgspec.Struct):
    owner: str = ""  # empty: released (its last owner handed it over)
    epoch: int = 0
    snapshot: str = ""  # object name in SNAPSHOTS_BUCKET; empty: none yet (replay from the log's start)
    seq: int = 0  # log position the snapshot was taken at: its owner reads from seq + 1
    model_version: int = 0


entry_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(GroupEntry))


def group_key(group: int) -> str:
    return f"g{group}"


def snapshot_group(store, group: int, groups: int, position: int, model_version: int, ids: list | None = None) -> bytes:
    """The streams of `group` in `store` at log `position` (a safetensors file, metadata included); `ids`: those
    streams when the caller found them already (a digest per resident stream per group is slow)."""
    if ids is None:
        ids = [sid for sid in store.slot_of if key_group(sid, groups) == group]
    slots = np.fromiter((store.slot_of[sid] for sid in ids), dtype=np.int64, count=len(ids))
    take = torch.from_numpy(slots).to(store.device)
    tensors = {
        "ids": np.frombuffer(msgspec.msgpack.encode(ids), dtype=np.uint8),
        "h": store.h.index_select(1, take).cpu().numpy(),
        "c": store.c.index_select(1, take).cpu().numpy(),
        "last_seq": store.last_seq[slots],
        "events_applied": store.events_applied[slots],
        "needs_reset": store.needs_reset[slots].astype(np.uint8),
        "resend_key": store.resend_key[slots],
        "resend_out": store.resend_out[slots],
        **_forecast_rows(store, take),
    }
    metadata = {"group": str(group), "seq": str(position), "model_version": str(model_version)}
    return save_tensors(tensors, metadata=metadata)


def restore_group(store, data: bytes) -> int:
    """Put a group snapshot's streams into `store` (replacing what it held for them); returns their count."""
    tensors = load_tensors(data)
    ids = msgspec.msgpack.decode(tensors["ids"].tobytes())
    if not ids:
        return 0
    admission = store.admit(ids, max_new=len(ids))
    if admission.rejected:
        first = next(iter(admission.rejected.values()))
        raise ValueError(f"cannot restore {len(ids)} streams of a key group: {first[1]}")
    slots = admission.slots
    take = torch.from_numpy(slots).to(store.device)
    store.h.index_copy_(1, take, torch.from_numpy(tensors["h"]).to(store.device))
    store.c.index_copy_(1, take, torch.from_numpy(tensors["c"]).to(store.device))
    store.last_seq[slots] = tensors["last_seq"]
    store.events_applied[slots] = tensors["events_applied"]
    store.needs_reset[slots] = tensors["needs_reset"].astype(bool)
    store.reset_by_command[slots] = False
    if tensors["resend_key"].shape[1:] == store.resend_key.shape[1:]:
        store.resend_key[slots] = tensors["resend_key"]
        store.resend_out[slots] = tensors["resend_out"]
    for name, table in _forecast_tables(store).items():
        if name in tensors and tensors[name].shape[1:] == tuple(table.shape[1:]):
            table.index_copy_(0, take, torch.from_numpy(tensors[name]).to(table.device))
    return len(ids)


def _forecast_tables(store) -> dict[str, torch.Tensor]:
    """A forecast model's per-slot rows beside the state tables (daemon/state_store.py), by snapshot name."""
    tables = {"adaptation": store.adaptation, "seasonal": store.seasonal,
              "last_x": None if store.last_events is None else store.last_events.rows}
    return {name: table for name, table in tables.items() if table is not None}


def _forecast_rows(store, take: torch.Tensor) -> dict[str, np.ndarray]:
    return {name: table.index_select(0, take).cpu().numpy() for name, table in _forecast_tables(store).items()}


async def open_buckets(js):
    """(the groups KV, the snapshots object store), created when missing."""
    from nats.js.errors import BucketNotFoundError

    try:
        kv = await js.key_value(GROUPS_BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(bucket=GROUPS_BUCKET, history=1)
    try:
        objects = await js.object_store(SNAPSHOTS_BUCKET)
    except BucketNotFoundError:
        objects = await js.create_object_store(SNAPSHOTS_BUCKET)
    return kv, objects


async def read_entry(kv, group: int) -> tuple[GroupEntry | None, int | None]:
    """(entry, revision) of a key group; (None, None) for one never owned."""
    from nats.js.errors import KeyNotFoundError

    try:
        found = await kv.get(group_key(group))
    except KeyNotFoundError:
        return None, None
    return entry_codec[1].decode(found.value), found.revision


async def write_entry(kv, group: int, entry: GroupEntry, revision: int | None) -> int | None:
    """Compare-and-set: the new revision, or None when another writer got there first (we are fenced)."""
    from nats.js.errors import KeyWrongLastSequenceError

    try:
        if revision is None:
            return await kv.create(group_key(group), entry_codec[0].encode(entry))
        return await kv.update(group_key(group), entry_codec[0].encode(entry), last=revision)
    except KeyWrongLastSequenceError:
        return None
    except Exception as exc:  # create of an existing key answers with another error class in some versions
        if "wrong last sequence" in str(exc).lower() or "exists" in str(exc).lower():
            return None
        raise
