"""The state store: stream id → slot, and the per-stream LSTM state tables h, c [L, capacity, H] on the device.

Owned by the serving loop alone (control commands run inside the loop between batches), so it has no locks.
Bookkeeping per slot lives in numpy arrays (last use, last sequence number, reset flag), so a batch is
looked up, admitted and touched with vectorised operations; the only per-event Python work is the dict
lookup of the stream id. Eviction is never silent: it is counted, logged, and the stream's next event is
answered with the `state_reset` status.

Two fixed-size memories, allocated at start, make the guarantees hold however long the daemon runs:
- the resend window (`serve.resend_window` = W): each slot's last outputs in a ring indexed by seq % W, so a
  duplicate (stream, seq) among the stream's last W sequence numbers is answered with its original prediction;
- the evicted-id filter (`EvictedFilter`, a Bloom filter): every evicted id is added, and a new id found in it
  is answered `state_reset`. No false negatives, ever; false positives (a never-seen id flagged on its first
  event, harmless: its state does start from zero) at the configured rate up to `state.remember_evicted` ids.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import torch
from lstmd.clients.protocol import StreamId
from lstmd.daemon.wal_records import EvictRecord, ResetRecord

log = logging.getLogger("lstmd.state")

NO_SEQ = -1  # last_seq of a slot that has applied no numbered event yet


class EvictedFilter:
    """A Bloom filter of evicted stream ids: `contains` is True for every id ever added (no false negatives),
    and for an id never added with probability (1 - e^(-k n / m))^k after n distinct ids: the configured rate at
    n = `expected`. Sized m = -expected ln(rate) / ln(2)^2 bits with k = (m / expected) ln 2 hashes (double
    hashing over a 128-bit BLAKE2b digest of the id and its type, so it is the same after a restart).
    Ids are never removed: a false positive cannot be told from a member, and removing it would make a real
    member vanish."""

    def __init__(self, expected: int, rate: float) -> None:
        bits = max(64, math.ceil(-expected * math.log(rate) / math.log(2) ** 2))
        self.geometry(bits + (-bits % 8), max(1, round(bits / expected * math.log(2))))
        self.expected, self.rate = expected, rate
        self._warned = False

    def geometry(self, size: int, hashes: int) -> None:
        """Start empty with `size` bits (a multiple of 8) and `hashes` hash functions."""
        self.size, self.hashes = size, hashes
        self.bits = np.zeros(size // 8, dtype=np.uint8)  # untouched pages cost no memory until ids arrive
        self.added = 0  # ids added, repeats included

    def _positions(self, ids: list[StreamId]) -> np.ndarray:
        """[n, k] bit positions of each id."""
        digests = b"".join(hashlib.blake2b(_key(sid), digest_size=16).digest() for sid in ids)
        h = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
        step = h[:, 1:] | np.uint64(1)  # odd, so the k positions differ
        with np.errstate(over="ignore"):  # modulo 2^64 on purpose
            mixed = h[:, :1] + np.arange(self.hashes, dtype=np.uint64) * step
        return (mixed % np.uint64(self.size)).astype(np.int64)

    def add(self, ids: list[StreamId]) -> None:
        if not ids:
            return
        pos = self._positions(ids).ravel()
        np.bitwise_or.at(self.bits, pos >> 3, np.left_shift(1, pos & 7).astype(np.uint8))
        self.added += len(ids)
        if self.added > self.expected and not self._warned:
            self._warned = True
            log.warning(
                "more than state.remember_evicted = %d ids evicted: a new stream's first event is now answered "
                "state_reset more often than %g (evicted streams still always are); raise it for a fresh state dir",
                self.expected,
                self.rate,
            )

    def contains(self, ids: list[StreamId]) -> np.ndarray:
        """[n] bool: possibly evicted (True for every evicted id)."""
        if not self.added or not ids:
            return np.zeros(len(ids), dtype=bool)
        pos = self._positions(ids)
        return ((self.bits[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).astype(bool).all(axis=1)

    def status(self) -> dict:
        # From the count, not the bits: counting 18 MB of bits would stall the serving loop for milliseconds. The
        # count includes repeats (an id evicted twice), so this bounds the rate from above.
        rate = (1 - math.exp(-self.hashes * self.added / self.size)) ** self.hashes
        return {
            "ids_added": self.added,
            "sized_for": self.expected,
            "bytes": self.bits.nbytes,
            "hashes": self.hashes,
            "false_positive_rate": rate,
        }

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        out = {"evicted_filter": torch.tensor([self.size, self.hashes, self.added], dtype=torch.int64)}
        if self.added:  # an empty filter is all zeros: not worth its megabytes in every snapshot
            out["evicted_bits"] = torch.from_numpy(self.bits.copy())
        return out

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        size, hashes, added = tensors["evicted_filter"].tolist()
        if (size, hashes) != (self.size, self.hashes):
            # The ids themselves are not kept, so they cannot be hashed into a new geometry: keep the old one.
            log.warning(
                "the snapshot's evicted-id filter has %d bits and %d hashes, the configuration asks for %d and %d; "
                "keeping the snapshot's (the configured size applies to a fresh state dir)",
                size,
                hashes,
                self.size,
                self.hashes,
            )
        self.geometry(size, hashes)
        if "evicted_bits" in tensors:
            self.bits[:] = tensors["evicted_bits"].numpy()
        self.added = added


def _key(sid: StreamId) -> bytes:
    """Bytes to hash for an id: its type and value (the str "42" and the int 42 are different streams)."""
    if isinstance(sid, str):
        return b"s" + sid.encode("utf-8", "surrogatepass")
    return b"i" + str(sid).encode()


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
        remember_evicted: int = 10_000_000,
        evicted_false_positive_rate: float = 0.001,
        on_evict=None,  # callback(cause: str, count: int) for metrics
        clock=time.monotonic,
        resend_window: int = 0,
        output_size: int = 1,
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
        self.evicted = EvictedFilter(remember_evicted, evicted_false_positive_rate)  # for the state_reset flag
        # The resend window: per slot, the outputs of its last applied events at column seq % W, and seq + 1 as the
        # key there (0: nothing kept, so the zeroed, lazily allocated table is empty without a pass over it).
        self.resend_window = resend_window
        self.resend_key = np.zeros((capacity, resend_window), dtype=np.int64)
        self.resend_out = np.zeros((capacity, resend_window, output_size), dtype=np.float32)
        self.on_evict = on_evict or (lambda cause, count: None)
        self.clock = clock
        # With the write-ahead log on, changes made outside the event path (evictions, resets) are appended
        # here as WAL records (daemon/wal_records.py) and logged by the durability code; None: not kept.
        self.journal: list[EvictRecord | ResetRecord] | None = None
        # Forecast models: one packed row per slot of per-stream adaptation (daemon/normalization.py, "per-stream
        # adaptation"), allocated by enable_adaptation(); the engine puts a stream's row back to `adaptation_init`
        # at its first event (new, reset, reused slot), so no pass clears them. None: not a forecast model.
        self.adaptation: torch.Tensor | None = None
        self.adaptation_init: torch.Tensor | None = None
        # With train.season: each slot's last `season` values of the forecast columns, a ring (normalization.Ring)
        # [capacity, season, O] float32 beside the adaptation rows; written before read, so never cleared.
        self.seasonal: torch.Tensor | None = None
        # Forecast models: the engine's per-slot last events (daemon/tasks.py LastEvents), known here so that a
        # snapshot of some streams (a cluster key group, daemon/cluster/ownership.py) carries them too.
        self.last_events = None

    def enable_adaptation(self, initial_row: torch.Tensor, season: int = 0, outputs: int = 0,
                          last_events=None) -> None:
        """Allocate the [capacity, width] float32 adaptation table on the device, every row `initial_row`, and with a
        `season` the seasonal ring of `outputs` columns; `last_events`: the engine's LastEvents beside them."""
        self.last_events = last_events
        self.adaptation_init = initial_row.to(self.device, torch.float32)
        self.adaptation = self.adaptation_init.expand(self.capacity, -1).clone()
        if season:
            self.seasonal = torch.zeros(self.capacity, season, outputs, device=self.device)

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
            order = self._refuse_new(new_ids, max_new, check_new, rejected)
            shortfall = len(order) - len(self._free)
            if shortfall > 0 and self.on_full == "evict":
                self._evict_lru(shortfall, now)
            assigned = []
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
                assigned.append(sid)
                slots[new_ids[sid]] = slot
            if assigned:
                self.resend_key[slots[[new_ids[sid][0] for sid in assigned]]] = 0  # a new stream resends nothing
                for sid, evicted in zip(assigned, self.evicted.contains(assigned).tolist(), strict=True):
                    if evicted:
                        was_dropped[new_ids[sid]] = True
        ok = slots >= 0
        was_dropped[ok] |= self.reset_by_command[slots[ok]]
        return Admission(slots, was_dropped, rejected)

    @staticmethod
    def _refuse_new(new_ids: dict, max_new: int, check_new, rejected: dict) -> list[StreamId]:
        """The new ids that may become streams, in arrival order: those `check_new` refuses and those beyond
        `max_new` get their events' rejections in `rejected`."""
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
        return order

    def touch(self, slots: np.ndarray) -> None:
        """Mark slots as used now and their pending resets as done (call after the step applied them)."""
        self.last_used[slots] = self.clock()
        self.needs_reset[slots] = False
        self.reset_by_command[slots] = False
        self.events_applied[slots] += 1

    def end_sequences(self, slots: np.ndarray) -> None:
        """model.output = "end": these slots' sequences just ended, so their state starts from zero at their next
        step (the kernel's reset mask, as for a new stream), without the `state_reset` status of a dropped one.
        Call after touch(); the flag is in every snapshot and the log replay sets it again."""
        self.needs_reset[slots] = True

    def keep_outputs(self, slots: np.ndarray, seq: np.ndarray, outputs: np.ndarray) -> None:
        """Keep the outputs of events just applied (distinct slots) for resends of the same (stream, seq)."""
        if self.resend_window:
            # Flat indices into row-major views: one index computation for both tables (half the time of
            # two 2-d fancy assignments, ~30 ns per event at 10k events on this 2-core machine).
            flat = slots * self.resend_window + seq % self.resend_window
            self.resend_key.reshape(-1)[flat] = seq + 1
            self.resend_out.reshape(-1, self.resend_out.shape[2])[flat] = outputs

    def kept_outputs(self, slots: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(outputs [n, O], found [n] bool) of already applied events (slot, seq); found False: not kept."""
        if not self.resend_window:
            return np.empty((len(slots), self.resend_out.shape[2]), np.float32), np.zeros(len(slots), bool)
        flat = slots * self.resend_window + seq % self.resend_window
        found = self.resend_key.reshape(-1)[flat] == seq + 1
        return self.resend_out.reshape(-1, self.resend_out.shape[2])[flat], found

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

    def release_ids(self, streams: list, cause: str) -> None:
        """Evict the named streams (those resident), as a logged eviction is replayed."""
        slots = [self.slot_of[sid] for sid in streams if sid in self.slot_of]
        self._release(np.asarray(slots, dtype=np.int64), cause)

    def _release(self, slots: np.ndarray, cause: str) -> None:
        if slots.size == 0:
            return
        released = []
        for slot in slots.tolist():
            sid = self.id_of[slot]
            released.append(sid)
            del self.slot_of[sid]
            self.id_of[slot] = None
            self._free.append(slot)
        self.last_used[slots] = np.inf
        self.reset_by_command[slots] = False
        self.evicted.add(released)
        if self.journal is not None:
            self.journal.append(EvictRecord(released, cause))
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
            self.journal.append(ResetRecord([sid]))
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
            "resend_key": torch.from_numpy(self.resend_key[slots]),
            "resend_out": torch.from_numpy(self.resend_out[slots]),
            **self.evicted.snapshot_tensors(),
            **({} if self.adaptation is None else {"adaptation": self.adaptation.index_select(0, take).cpu()}),
            **({} if self.seasonal is None else {"seasonal": self.seasonal.index_select(0, take).cpu()}),
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
        if "evicted_filter" in tensors:
            self.evicted.restore_tensors(tensors)
        else:  # a snapshot from before the filter: its bounded list of evicted ids
            self.evicted.add([sid for sid, _ in msgspec.msgpack.decode(tensors["dropped"].numpy().tobytes())])
        key, out = tensors.get("resend_key"), tensors.get("resend_out")
        if key is not None and (key.shape[1:], out.shape[1:]) == (self.resend_key.shape[1:], self.resend_out.shape[1:]):
            self.resend_key[slots] = key.numpy()
            self.resend_out[slots] = out.numpy()
        elif self.resend_window:
            log.warning("the snapshot's resend window does not fit serve.resend_window: earlier outputs not kept")
        if self.adaptation is not None:
            saved = tensors.get("adaptation")
            ring = tensors.get("seasonal")
            ring_fits = self.seasonal is None or (ring is not None and ring.shape == (n, *self.seasonal.shape[1:]))
            if saved is not None and saved.shape == (n, self.adaptation.shape[1]) and ring_fits:
                self.adaptation.index_copy_(0, take, saved.to(self.device))
                if self.seasonal is not None:
                    self.seasonal.index_copy_(0, take, ring.to(self.device))
            elif n:  # clear() left those streams' rows initial: they start their adaptation over
                log.warning(
                    "the snapshot's per-stream forecast adaptation (%s) does not fit this daemon's (%d fields%s; "
                    "train.level_rate, train.season or the model's shape changed): %d streams start their scales and "
                    "guard over", "none" if saved is None else f"{saved.shape[1]} fields", self.adaptation.shape[1],
                    "" if self.seasonal is None else f", a season of {self.seasonal.shape[1]}", n,
                )  # fmt: skip

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
        self.evicted.geometry(self.evicted.size, self.evicted.hashes)
        self.resend_key = np.zeros_like(self.resend_key)  # fresh zero pages, not a pass over the whole table
        self.h.zero_()
        self.c.zero_()
        if self.adaptation is not None:
            self.adaptation.copy_(self.adaptation_init.expand_as(self.adaptation))


def _blob(value) -> torch.Tensor:
    """A msgpack encoding as a uint8 tensor (safetensors holds tensors only, and never pickles)."""
    return torch.frombuffer(bytearray(msgspec.msgpack.encode(value)), dtype=torch.uint8)
