"""The state store: stream id → slot, and the per-stream LSTM state tables h, c [L, capacity, H] on the device.

Owned by the serving loop alone (control commands run inside the loop between batches), so it has no locks.
Bookkeeping per slot lives in numpy arrays (last use, last sequence number, reset flag), so a batch is
looked up, admitted and touched with vectorised operations; the only per-event Python work is the dict
lookup of the stream id. Eviction is never silent: it is counted, logged, and the stream's next event is
answered with the `state_reset` status.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
import numpy as np
import torch
from lstmd.clients.protocol import StreamId

log = logging.getLogger("lstmd.state")

NO_SEQ = -1  # last_seq of a slot that has applied no numbered event yet


@dataclass
class Admission:
    """Result of looking up a batch of stream ids."""

    slots: np.ndarray  # [N] int64 slot per event; -1 where rejected
    was_dropped: np.ndarray  # [N] bool: the stream had been evicted/reset: answer `state_reset`
    rejected: dict[int, tuple[str, str]]  # event index -> (reason label, message)


class StateStore:
    """Slots of per-stream state. `h`, `c` are [L, capacity, H] float32 tensors on `device`."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        capacity: int,
        device: torch.device,
        idle_ttl_s: float = 0.0,
        on_full: str = "evict",
        remember_evicted: int = 1_000_000,
        on_evict=None,  # callback(cause: str, count: int) for metrics
        clock=time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.device = device
        self.h = torch.zeros(num_layers, capacity, hidden_size, dtype=torch.float32, device=device)
        self.c = torch.zeros_like(self.h)
        self.slot_of: dict[StreamId, int] = {}
        self.id_of: list[StreamId | None] = [None] * capacity
        self.last_used = np.full(capacity, np.inf)  # monotonic seconds; inf marks a free slot
        self.last_seq = np.full(capacity, NO_SEQ, dtype=np.int64)
        self.events_applied = np.zeros(capacity, dtype=np.int64)
        # A slot whose state must start from zero at its next step (new, reset, or reused after eviction);
        # the kernel zeroes it inside the step via its reset mask, so no separate zeroing pass runs.
        self.needs_reset = np.zeros(capacity, dtype=bool)
        self.reset_by_command = np.zeros(capacity, dtype=bool)  # answer `state_reset` on the next event
        self._free = list(range(capacity - 1, -1, -1))  # stack; pop() gives the lowest slot first
        self.idle_ttl_s = idle_ttl_s
        self.on_full = on_full
        self.dropped: OrderedDict[StreamId, str] = OrderedDict()  # id -> cause, for the state_reset flag
        self.remember_evicted = remember_evicted
        self.on_evict = on_evict or (lambda cause, count: None)
        self.clock = clock
        # With the write-ahead log on, changes made outside the event path (evictions, resets) are appended
        # here as ("evict", ids, cause) / ("reset", ids) and logged by the durability code; None: not kept.
        self.journal: list | None = None

    def __len__(self) -> int:
        return len(self.slot_of)

    # ---- the serving path -------------------------------------------------------------------------------

    def admit(self, streams: list[StreamId], max_new: int, check_new=None) -> Admission:
        """Map each event's stream id to a slot, creating (and if needed evicting for) new streams.

        `check_new(id)` returns (label, why) for a new id that must not become a stream, else None."""
        n = len(streams)
        # map() with a C-level callable: no Python frame per event (a generator here was ~70 ns per event).
        slots = np.fromiter(map(self.slot_of.get, streams, itertools.repeat(-1)), dtype=np.int64, count=n)
        rejected: dict[int, tuple[str, str]] = {}
        was_dropped = np.zeros(n, dtype=bool)
        new_idx = np.flatnonzero(slots < 0)
        if new_idx.size:
            now = self.clock()
            # Protect the streams of this batch from eviction while making room for the new ones.
            known = slots[slots >= 0]
            self.last_used[known] = now
            new_ids: dict[StreamId, list[int]] = {}
            for i in new_idx.tolist():
                new_ids.setdefault(streams[i], []).append(i)
            order = list(new_ids)
            if check_new is not None:
                refused = {sid: why for sid in order if (why := check_new(sid)) is not None}
                for sid, why in refused.items():
                    for i in new_ids[sid]:
                        rejected[i] = why
                if refused:
                    order = [sid for sid in order if sid not in refused]
            if len(order) > max_new:
                for sid in order[max_new:]:
                    for i in new_ids[sid]:
                        rejected[i] = (
                            "too_many_new_streams",
                            f"too many new streams in one message (limit {max_new})",
                        )
                order = order[:max_new]
            shortfall = len(order) - len(self._free)
            if shortfall > 0 and self.on_full == "evict":
                self._evict_lru(shortfall, now)
            for sid in order:
                if not self._free:
                    for i in new_ids[sid]:
                        rejected[i] = (
                            "capacity_exhausted",
                            f"state capacity of {self.capacity} streams is exhausted",
                        )
                    continue
                slot = self._free.pop()
                self.slot_of[sid] = slot
                self.id_of[slot] = sid
                self.last_used[slot] = now
                self.last_seq[slot] = NO_SEQ
                self.events_applied[slot] = 0
                self.needs_reset[slot] = True
                if self.dropped.pop(sid, None) is not None:
                    was_dropped[new_ids[sid]] = True
                slots[new_ids[sid]] = slot
        ok = slots >= 0
        was_dropped[ok] |= self.reset_by_command[slots[ok]]
        return Admission(slots, was_dropped, rejected)

    def touch(self, slots: np.ndarray) -> None:
        """Mark slots as used now and their pending resets as done (call after the step applied them)."""
        self.last_used[slots] = self.clock()
        self.needs_reset[slots] = False
        self.reset_by_command[slots] = False
        self.events_applied[slots] += 1

    # ---- eviction ---------------------------------------------------------------------------------------

    def _evict_lru(self, count: int, now: float) -> None:
        used = len(self.slot_of)
        count = min(count, used)
        if count <= 0:
            return
        candidates = np.argpartition(self.last_used, count - 1)[:count]
        # Never evict a stream touched in this very batch (last_used == now): it is being served.
        candidates = candidates[self.last_used[candidates] < now]
        self._release(candidates, "capacity")

    def evict_idle(self) -> int:
        """Evict streams idle longer than the TTL; returns how many."""
        if self.idle_ttl_s <= 0 or not self.slot_of:
            return 0
        cutoff = self.clock() - self.idle_ttl_s
        idle = np.flatnonzero(self.last_used < cutoff)
        self._release(idle, "ttl")
        return int(idle.size)

    def _release(self, slots: np.ndarray, cause: str) -> None:
        if slots.size == 0:
            return
        released = []
        for slot in slots.tolist():
            sid = self.id_of[slot]
            released.append(sid)
            del self.slot_of[sid]
            self.id_of[slot] = None
            self.dropped[sid] = cause
            self._free.append(slot)
        self.last_used[slots] = np.inf
        self.reset_by_command[slots] = False
        if self.journal is not None:
            self.journal.append(("evict", released, cause))
        while len(self.dropped) > self.remember_evicted:
            self.dropped.popitem(last=False)
        self.on_evict(cause, int(slots.size))
        log.warning(
            "evicted %d stream(s) (cause: %s); their next event is answered state_reset", slots.size, cause
        )

    # ---- commands ---------------------------------------------------------------------------------------

    def resolve(self, stream: StreamId) -> StreamId | None:
        """The stored id for a stream named on the command line (`"42"` finds the integer id 42 too)."""
        if stream in self.slot_of:
            return stream
        # ASCII digits only, at most 20 (any 64-bit id): str.isdigit() also takes "²", which int() refuses.
        if isinstance(stream, str) and re.fullmatch(r"-?[0-9]{1,20}", stream) and int(stream) in self.slot_of:
            return int(stream)
        return None

    def reset(self, stream: StreamId) -> bool:
        sid = self.resolve(stream)
        if sid is None:
            return False
        slot = self.slot_of[sid]
        self.needs_reset[slot] = self.reset_by_command[slot] = True
        if self.journal is not None:
            self.journal.append(("reset", [sid]))
        return True

    def drop(self, stream: StreamId) -> bool:
        sid = self.resolve(stream)
        if sid is None:
            return False
        self._release(np.array([self.slot_of[sid]]), "drop")
        return True

    def describe(self, stream: StreamId) -> dict | None:
        sid = self.resolve(stream)
        if sid is None:
            return None
        slot = self.slot_of[sid]
        zero = bool(self.needs_reset[slot])
        h = torch.zeros_like(self.h[:, slot]) if zero else self.h[:, slot]
        c = torch.zeros_like(self.c[:, slot]) if zero else self.c[:, slot]
        return {
            "stream": sid,
            "slot": slot,
            "events": int(self.events_applied[slot]),
            "last_seq": int(self.last_seq[slot]),
            "idle_s": round(self.clock() - float(self.last_used[slot]), 3),
            "h_norm": [float(x) for x in h.norm(dim=-1).cpu()],
            "c_norm": [float(x) for x in c.norm(dim=-1).cpu()],
            "h": h.cpu().tolist(),
            "c": c.cpu().tolist(),
        }

    def listing(self, limit: int) -> list[dict]:
        now = self.clock()
        out = []
        for sid, slot in self.slot_of.items():
            out.append(
                {
                    "stream": sid,
                    "slot": slot,
                    "events": int(self.events_applied[slot]),
                    "last_seq": int(self.last_seq[slot]),
                    "idle_s": round(now - float(self.last_used[slot]), 3),
                }
            )
            if len(out) >= limit:
                break
        return out

    # ---- snapshots (daemon/snapshot.py) -------------------------------------------------------------------

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """The resident streams as flat CPU tensors (copies): their rows of h/c, ids and bookkeeping.

        Only occupied slots are stored, with their slot numbers (other components, such as the recorder, index
        by slot). Ids are a msgpack array (str and int ids keep their type) in a uint8 tensor; monotonic
        timestamps become idle ages, which survive a restart.
        """
        ids = list(self.slot_of)
        slots = np.fromiter(self.slot_of.values(), dtype=np.int64, count=len(ids))
        take = torch.from_numpy(slots).to(self.device)
        dropped = [[sid, cause] for sid, cause in self.dropped.items()]
        return {
            "h": self.h.index_select(1, take).cpu(),
            "c": self.c.index_select(1, take).cpu(),
            "slots": torch.from_numpy(slots),
            "ids": _blob(ids),
            "last_seq": torch.from_numpy(self.last_seq[slots]),
            "events_applied": torch.from_numpy(self.events_applied[slots]),
            "idle_s": torch.from_numpy(self.clock() - self.last_used[slots]),
            "needs_reset": torch.from_numpy(self.needs_reset[slots].astype(np.uint8)),
            "reset_by_command": torch.from_numpy(self.reset_by_command[slots].astype(np.uint8)),
            "dropped": _blob(dropped),
        }

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace every stream with what snapshot_tensors() returned; raises ValueError if it does not fit."""
        ids = msgspec.msgpack.decode(tensors["ids"].numpy().tobytes())
        slots = tensors["slots"].numpy().astype(np.int64)
        h, c = tensors["h"], tensors["c"]
        n = len(ids)
        if slots.shape != (n,) or h.shape != (self.h.shape[0], n, self.h.shape[2]) or c.shape != h.shape:
            raise ValueError(
                f"snapshot state has {n} ids, slots {tuple(slots.shape)} and h {tuple(h.shape)}; "
                f"this store holds [{self.h.shape[0]}, *, {self.h.shape[2]}]"
            )
        if n and int(slots.max()) >= self.capacity:
            raise ValueError(
                f"snapshot uses state slot {int(slots.max())}, beyond state.capacity = {self.capacity}"
            )
        self.clear()
        take = torch.from_numpy(slots).to(self.device)
        self.h.index_copy_(1, take, h.to(self.device))
        self.c.index_copy_(1, take, c.to(self.device))
        for sid, slot in zip(ids, slots.tolist(), strict=True):
            self.slot_of[sid] = slot
            self.id_of[slot] = sid
        self.last_seq[slots] = tensors["last_seq"].numpy()
        self.events_applied[slots] = tensors["events_applied"].numpy()
        self.last_used[slots] = self.clock() - tensors["idle_s"].numpy()
        self.needs_reset[slots] = tensors["needs_reset"].numpy().astype(bool)
        self.reset_by_command[slots] = tensors["reset_by_command"].numpy().astype(bool)
        occupied = np.zeros(self.capacity, dtype=bool)
        occupied[slots] = True
        self._free = np.flatnonzero(~occupied)[::-1].tolist()
        for sid, cause in msgspec.msgpack.decode(tensors["dropped"].numpy().tobytes()):
            self.dropped[sid] = cause

    def clear(self) -> None:
        """Forget every stream (their rows start from zero at their next event)."""
        self.slot_of.clear()
        self.id_of = [None] * self.capacity
        self.last_used[:] = np.inf
        self.last_seq[:] = NO_SEQ
        self.events_applied[:] = 0
        self.needs_reset[:] = False
        self.reset_by_command[:] = False
        self._free = list(range(self.capacity - 1, -1, -1))
        self.dropped.clear()
        self.h.zero_()
        self.c.zero_()


def _blob(value) -> torch.Tensor:
    """A msgpack encoding as a uint8 tensor (safetensors holds tensors only, and never pickles)."""
    return torch.frombuffer(bytearray(msgspec.msgpack.encode(value)), dtype=torch.uint8)
