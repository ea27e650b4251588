"""The recorder: bounded per-stream history of recent events, targets and window-start states for the trainer.

The serving loop calls `record()` after every wave (it owns the state store, so it hands over the states the
trainer needs); the trainer thread calls `sample()` to copy windows out. Both take one short lock: the loop
never waits for a training round, only for another thread's copy of a few hundred kilobytes at most.

Layout (R = record_streams rows, T = record_steps, k2 = window length, W = T / k2 windows per row):

    x      [R, T, I] float32   the events, a ring buffer per row
    dx     [R, T, I] float32   forecast only: each event's change since the stream's previous event (0 at a start)
    scale  [R, T, I] float32   forecast only: the stream's scale after that event (the state store's adaptation
                               table, daemon/normalization.py): "stream" inputs and the units errors are taken in
    y      [R, T, D] float32   their targets (regression values, class labels, or for forecasts the next event's
                               forecast columns)
    y_ok   [R, T]    bool      the target is known (targets may arrive later, or never)
    seq    [R, T]    int64     each event's per-stream sequence number (to join delayed targets)
    h0, c0 [R, W, L, H]        the stream's LSTM state *before* the first event of each window
    state_ok [R, W]  bool      that state was captured (a row that starts mid-stream lacks its first one)

Whole-sequence outputs (model.output = "end", many-to-one): a stream's row holds its current sequence (an end
resets the stream's state, so its next event starts the row over), and at each end the finished sequence is
copied into a `SequencePool`: the last steps from the newest window boundary that leaves at most max_sequence of
them (the whole sequence when it is not longer), the stream's state at that boundary (zero at the sequence's
start), and its label (the end event's target, or a delayed one joined by (stream, seq of the end event)). The
trainer then gets padded whole sequences as `Windows` whose mask marks only each end step, so its one code path
puts the loss on the end step alone (forward is causal: the padding after an end changes nothing).

Every array is allocated once, so memory is fixed by the configuration (`nbytes`), however many streams
there are: streams beyond R are not recorded until a recorded stream has been idle for `idle_s`. Rows are
found by state-store slot (a vectorised lookup, no per-event dict work). A stream whose state starts from
zero (new, reset, evicted and back) starts its row over, so a window never spans a state reset.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("lstmd.recorder")

# Absolute position p of a row (events recorded since its last start) lives at ring index p % T; the window
# with absolute start s (a multiple of k2) has state index (s % T) // k2.


@dataclass
class Windows:
    """Training or evaluation windows copied out of the recorder (numpy, the trainer moves them to torch)."""

    x: np.ndarray  # [B, k2, I] float32
    dx: np.ndarray | None  # [B, k2, I] forecast: change since the previous event
    scale: np.ndarray | None  # [B, k2, I] forecast: the stream's scale at each event
    y: np.ndarray  # [B, k2, D] float32
    mask: np.ndarray  # [B, k2] bool: target known
    h0: np.ndarray  # [L, B, H] float32
    c0: np.ndarray  # [L, B, H] float32
    # Forecast holdout windows with train.season s: the event s - 1 before each position's next one, the
    # seasonal-naive forecast of its target, [B, k2, I]; NaN where the stream's recorded history does not reach it.
    seasonal: np.ndarray | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: np.ndarray) -> Windows:
        return Windows(
            self.x[index],
            None if self.dx is None else self.dx[index],
            None if self.scale is None else self.scale[index],
            self.y[index],
            self.mask[index],
            np.ascontiguousarray(self.h0[:, index]),
            np.ascontiguousarray(self.c0[:, index]),
            None if self.seasonal is None else self.seasonal[index],
        )


class SequencePool:
    """The newest finished sequences (model.output = "end"), a ring of P entries of at most M steps each.

    Entry i of the ring: x [M, I] (the first `length` steps used), the state before its first step h0, c0 [L, H],
    its label y [D] (`labelled`), and (slot, seq) of its end event for delayed labels. Every HOLDOUT_EVERY-th
    sequence (by `number`, counted in serving order, so a replay numbers them alike) is held out for the
    trainer's check and never trained on."""

    HOLDOUT_EVERY = 4
    _ARRAYS = ("x", "h0", "c0", "y", "labelled", "length", "slot", "seq", "number")

    def __init__(self, size: int, steps: int, input_size: int, target_size: int, num_layers: int, hidden: int):
        self.x = np.zeros((size, steps, input_size), np.float32)
        self.h0 = np.zeros((size, num_layers, hidden), np.float32)
        self.c0 = np.zeros_like(self.h0)
        self.y = np.zeros((size, target_size), np.float32)
        self.labelled = np.zeros(size, bool)
        self.length = np.zeros(size, np.int64)  # 0: empty entry
        self.slot = np.full(size, -1, np.int64)
        self.seq = np.full(size, -1, np.int64)
        self.number = np.full(size, -1, np.int64)
        self.total = 0  # sequences kept so far (the next one's number)
        self.dropped = 0  # ends whose sequence could not be kept (recorded mid-sequence without a start state)
        self._index: dict[tuple[int, int], int] = {}  # (slot, seq of the end event) -> entry

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, name).nbytes for name in self._ARRAYS))

    def add(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, target, slot: int, seq: int) -> None:
        """Keep one finished sequence (x [m, I], m <= M), overwriting the oldest entry."""
        i = self.total % self.x.shape[0]
        self._index.pop((int(self.slot[i]), int(self.seq[i])), None)
        m = x.shape[0]
        self.x[i, :m], self.x[i, m:] = x, 0.0
        self.h0[i], self.c0[i] = h0, c0
        known = target is not None and bool(np.isfinite(target).all())
        self.y[i] = target if known else 0.0
        self.labelled[i] = known
        self.length[i], self.slot[i], self.seq[i], self.number[i] = m, slot, seq, self.total
        self._index[(slot, seq)] = i
        self.total += 1

    def join(self, slots: np.ndarray, seqs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Delayed labels by (slot, seq of the end event); [n] bool: joined (finite and found)."""
        joined = np.zeros(slots.size, bool)
        for j, key in enumerate(zip(slots.tolist(), seqs.tolist(), strict=True)):
            i = self._index.get(key)
            if i is not None and np.isfinite(targets[j]).all():
                self.y[i], self.labelled[i], joined[j] = targets[j], True, True
        return joined

    def forget_slots(self, slots: np.ndarray) -> None:
        """These slots now hold other streams: their old sequences keep training but no longer take labels."""
        for i in np.flatnonzero(np.isin(self.slot, slots)).tolist():
            self._index.pop((int(self.slot[i]), int(self.seq[i])), None)
            self.slot[i] = -1

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(training entries, held-out entries) among the labelled ones."""
        usable = (self.length > 0) & self.labelled
        held = usable & (self.number % self.HOLDOUT_EVERY == self.HOLDOUT_EVERY - 1)
        return np.flatnonzero(usable & ~held), np.flatnonzero(held)

    def windows(self, entries: np.ndarray) -> Windows:
        """The entries as Windows padded to the longest: mask and label at each end step only."""
        lengths = self.length[entries]
        steps = int(lengths.max())
        b = np.arange(entries.size)
        mask = np.zeros((entries.size, steps), bool)
        mask[b, lengths - 1] = True
        y = np.zeros((entries.size, steps, self.y.shape[1]), np.float32)
        y[b, lengths - 1] = self.y[entries]
        return Windows(
            x=self.x[entries, :steps],
            dx=None,
            scale=None,
            y=y,
            mask=mask,
            h0=np.ascontiguousarray(self.h0[entries].transpose(1, 0, 2)),
            c0=np.ascontiguousarray(self.c0[entries].transpose(1, 0, 2)),
        )

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"pool.{name}": torch.from_numpy(getattr(self, name).copy()) for name in self._ARRAYS}
        out["pool.counts"] = torch.tensor([self.total, self.dropped], dtype=torch.int64)
        return out

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what snapshot_tensors() returned; a snapshot without a pool (or of another size) keeps none."""
        values = {name: tensors.get(f"pool.{name}") for name in self._ARRAYS}
        if any(v is None for v in values.values()):
            return  # taken with model.output = "every": no sequences to bring back
        if any(tuple(v.shape) != getattr(self, name).shape for name, v in values.items()):
            log.warning("the snapshot's finished sequences do not fit this configuration (train.max_sequence, "
                        "record_streams, record_steps or the model changed): training starts without them")
            return
        for name, value in values.items():
            getattr(self, name)[...] = value.numpy()
        self.total, self.dropped = (int(v) for v in tensors["pool.counts"].tolist())
        used = np.flatnonzero(self.length > 0)
        self._index = {(int(self.slot[i]), int(self.seq[i])): int(i) for i in used}


class Recorder:
    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        input_size: int,
        target_size: int,
        task: str,
        capacity: int,
        record_streams: int,
        record_steps: int,
        k2: int,
        idle_s: float = 60.0,
        holdout_windows: int = 1,
        clock=time.monotonic,
        columns: list[int] | None = None,  # forecast: the next event's columns that are the target; None: all
        scale_table: torch.Tensor | None = None,  # forecast: the state store's per-slot scale [capacity, I]
        max_sequence: int = 0,  # model.output = "end": steps kept per finished sequence; 0: output = "every"
        sample_half_life: float = 0.0,  # windows: recency weighting of training windows (sample()); 0: uniform
        season: int = 0,  # forecast, train.season: holdout windows carry the seasonal-naive forecast; 0: none
    ) -> None:
        if record_steps % k2 or record_steps < (holdout_windows + 1) * k2:
            raise ValueError(
                f"record_steps ({record_steps}) must be a multiple of k2 ({k2}) and >= (holdout_windows + 1) * k2"
            )
        R, T, W = record_streams, record_steps, record_steps // k2
        self.task, self.k2, self.idle_s, self.clock = task, k2, idle_s, clock
        self.holdout_windows = holdout_windows
        self.sample_half_life = sample_half_life
        self.season = season
        self.forecast = task == "forecast"
        self.columns = None if columns is None else [int(c) for c in columns]  # a list: nbytes counts the arrays
        if self.forecast and target_size != (input_size if columns is None else len(columns)):
            raise ValueError(f"forecast target_size {target_size} does not match the forecast columns {columns}")
        self.x = np.zeros((R, T, input_size), np.float32)
        self.dx = np.zeros((R, T, input_size) if self.forecast else (0, 0, input_size), np.float32)
        self.scale = np.ones_like(self.dx)
        self.scale_table = scale_table
        self.y = np.zeros((R, T, target_size), np.float32)
        self.y_ok = np.zeros((R, T), bool)
        self.seq = np.full((R, T), -1, np.int64)
        self.h0 = np.zeros((R, W, num_layers, hidden_size), np.float32)
        self.c0 = np.zeros_like(self.h0)
        self.state_ok = np.zeros((R, W), bool)
        self.count = np.zeros(R, np.int64)  # events recorded into the row since it (re)started
        self.generation = np.zeros(R, np.int64)  # bumped when a row starts over (sample() checks it)
        self.last_write = np.full(R, -np.inf)  # monotonic seconds
        self.slot_of_row = np.full(R, -1, np.int64)
        self.row_of_slot = np.full(capacity, -1, np.int64)
        self.recorded = 0  # events recorded in total (the trainer's event trigger reads it)
        self.targets_joined = 0
        self.targets_unmatched = 0
        self._free = list(range(R - 1, -1, -1))
        self.lock = threading.Lock()
        # Whole sequences: as many steps in all as the rows hold (R * T), in entries of max_sequence steps (at least
        # k2 per entry in the count, so a short max_sequence does not multiply the entries' states).
        steps = min(max_sequence, T)
        self.sequences = (
            SequencePool(max(2, R * T // max(steps, k2)), steps, input_size, target_size, num_layers, hidden_size)
            if max_sequence else None
        )

    @property
    def nbytes(self) -> int:
        """Memory the recorder holds; fixed at construction (the bound the config sets)."""
        pool = 0 if self.sequences is None else self.sequences.nbytes
        return int(sum(getattr(self, name).nbytes for name in self._ARRAYS)) + pool

    @property
    def streams(self) -> int:
        return int((self.slot_of_row >= 0).sum())

    # ---- the serving loop's side ------------------------------------------------------------------------

    def record(
        self,
        slots: np.ndarray,  # [n] distinct state-store slots of one wave
        x: np.ndarray,  # [n, I] the events just applied
        seqs: np.ndarray,  # [n] their sequence numbers
        targets: np.ndarray | None,  # [n, D] float32 with NaN rows where an event carries none; None: none at all
        fresh: np.ndarray,  # [n] bool: the stream's state started from zero at this event
        h: torch.Tensor,  # [L, S, H] the state tables *after* the step
        c: torch.Tensor,
        ends: np.ndarray | None = None,  # [n] bool: the event ended its sequence (model.output = "end")
    ) -> None:
        with self.lock:
            rows = self.row_of_slot[slots]
            start = fresh.copy()
            missing = np.flatnonzero(rows < 0)
            if missing.size:
                rows[missing] = self._allocate(slots[missing])
                start[missing] = True
            ok = rows >= 0
            if not ok.all():
                slots, x, seqs, fresh, rows, start = slots[ok], x[ok], seqs[ok], fresh[ok], rows[ok], start[ok]
                targets = None if targets is None else targets[ok]
                ends = None if ends is None else ends[ok]
            if rows.size == 0:
                return
            if start.any():
                self._start_rows(rows[start], fresh[start])
            T = self.x.shape[1]
            count = self.count[rows]
            # One flat index per event into [R * T] views: single-array fancy indexing beats (rows, pos) pairs
            # (~45 vs ~65 us per [1024, 8] float32 assignment, 2-core CPU); record() costs ~0.8 us per event.
            at = rows * T + count % T
            x_flat, y_flat = self.x.reshape(-1, self.x.shape[2]), self.y.reshape(-1, self.y.shape[2])
            y_ok_flat = self.y_ok.reshape(-1)
            if self.forecast:  # this event is the target of the stream's previous one
                self._record_forecast(slots, x, count, at)
            x_flat[at] = x
            self.seq.reshape(-1)[at] = seqs
            if targets is None:
                y_ok_flat[at] = False
            else:
                y_flat[at] = np.nan_to_num(targets)
                y_ok_flat[at] = ~np.isnan(targets).any(axis=1)
            count = count + 1
            self.count[rows] = count
            self.last_write[rows] = self.clock()
            self.recorded += int(rows.size)
            self._start_windows(rows, slots, count, h, c)
            if self.sequences is not None and ends is not None and ends.any():
                for j in np.flatnonzero(ends).tolist():
                    self._close_sequence(int(rows[j]), int(slots[j]), int(seqs[j]),
                                         None if targets is None else targets[j])

    def new_streams(self, slots: np.ndarray) -> None:
        """Slots that just took a new stream (with whole sequences: delayed labels name the new stream's events)."""
        if self.sequences is not None and slots.size:
            with self.lock:
                self.sequences.forget_slots(slots)

    def _close_sequence(self, row: int, slot: int, seq: int, target) -> None:
        """A sequence ended at the row's newest event: keep its last steps from the newest window boundary that
        leaves at most the pool's M (all of it when not longer), with the state there. Called under the lock."""
        T, k2, M = self.x.shape[1], self.k2, self.sequences.x.shape[1]
        count = int(self.count[row])
        first = -(-(count - M) // k2) * k2 if count > M else 0  # the first boundary s with count - s <= M
        for start in range(first, count, k2):
            w = (start % T) // k2
            if self.state_ok[row, w]:
                positions = (start + np.arange(count - start)) % T
                self.sequences.add(self.x[row, positions], self.h0[row, w], self.c0[row, w], target, slot, seq)
                return
        self.sequences.dropped += 1  # recorded from mid-sequence: no state is known at any boundary

    def _record_forecast(self, slots: np.ndarray, x: np.ndarray, count: np.ndarray, at: np.ndarray) -> None:
        """Forecast: each event is the target of its stream's previous one; record its change since then and,
        with per-stream adaptation, the stream's scale after it. `at`: the events' flat positions, `count`: how
        many events each row held before them. Called under the lock, before x is written."""
        T = self.x.shape[1]
        x_flat, y_flat = self.x.reshape(-1, self.x.shape[2]), self.y.reshape(-1, self.y.shape[2])
        has_prev = count > 0
        before = at[has_prev] - 1 + np.where(count[has_prev] % T == 0, T, 0)
        new = x[has_prev]
        y_flat[before] = new if self.columns is None else new[:, self.columns]
        self.y_ok.reshape(-1)[before] = True
        change = np.zeros_like(x)
        change[has_prev] = new - x_flat[before]
        self.dx.reshape(-1, self.dx.shape[2])[at] = change
        if self.scale_table is not None:
            scale = self.scale_table.index_select(0, torch.from_numpy(slots).to(self.scale_table.device))
            self.scale.reshape(-1, self.scale.shape[2])[at] = scale.cpu().numpy()

    def _start_windows(self, rows, slots, count, h, c) -> None:
        """Rows whose count reached a window boundary: the state after this event starts their next window."""
        boundary = np.flatnonzero(count % self.k2 == 0)
        if boundary.size:
            w = (count[boundary] % self.x.shape[1]) // self.k2
            take = torch.from_numpy(slots[boundary]).to(h.device)
            # [L, b, H] -> [b, L, H]
            self.h0[rows[boundary], w] = h[:, take].transpose(0, 1).cpu().numpy()
            self.c0[rows[boundary], w] = c[:, take].transpose(0, 1).cpu().numpy()
            self.state_ok[rows[boundary], w] = True

    def _allocate(self, slots: np.ndarray) -> np.ndarray:
        """Rows for slots that have none: free rows first, then rows idle longer than idle_s; else -1."""
        out = np.full(slots.size, -1, np.int64)
        stale: list[int] = []
        if len(self._free) < slots.size:
            idle = np.flatnonzero((self.slot_of_row >= 0) & (self.last_write < self.clock() - self.idle_s))
            stale = idle[np.argsort(self.last_write[idle])].tolist()[::-1]  # oldest last: pop() takes it
        for i, slot in enumerate(slots.tolist()):
            if self._free:
                row = self._free.pop()
            elif stale:
                row = stale.pop()
                self.row_of_slot[self.slot_of_row[row]] = -1
            else:
                break
            self.slot_of_row[row] = slot
            self.row_of_slot[slot] = row
            out[i] = row
        return out

    def _start_rows(self, rows: np.ndarray, zero_state: np.ndarray) -> None:
        """Start rows over: their stream's state was reset (known zero) or is unknown (recorded mid-stream)."""
        self.generation[rows] += 1
        self.count[rows] = 0
        self.y_ok[rows] = False
        self.seq[rows] = -1
        self.state_ok[rows] = False
        self.h0[rows, 0] = 0.0
        self.c0[rows, 0] = 0.0
        self.state_ok[rows, 0] = zero_state

    def join_targets(self, slots: np.ndarray, seqs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Delayed targets: put each at the recorded event (slot, seq); with whole sequences, each is the label of
        the sequence that event ended. Returns [n] bool: joined."""
        with self.lock:
            if self.sequences is not None:
                joined = self.sequences.join(slots, seqs, targets)
                self.targets_joined += int(joined.sum())
                self.targets_unmatched += int(slots.size - joined.sum())
                return joined
            rows = self.row_of_slot[slots]
            joined = np.zeros(slots.size, bool)
            have = np.flatnonzero((rows >= 0) & (slots >= 0))
            if have.size:
                hit = self.seq[rows[have]] == seqs[have, None]  # [m, T]
                found = hit.any(axis=1)
                idx = have[found]
                pos = hit[found].argmax(axis=1)
                values = targets[idx]
                finite = np.isfinite(values).all(axis=1)
                idx, pos, values = idx[finite], pos[finite], values[finite]
                self.y[rows[idx], pos] = values
                self.y_ok[rows[idx], pos] = True
                joined[idx] = True
            n_joined = int(joined.sum())
            self.targets_joined += n_joined
            self.targets_unmatched += int(slots.size) - n_joined
            return joined

    # ---- the trainer's side -----------------------------------------------------------------------------

    def available(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rows, window indices, is_holdout, absolute starts) of every complete window with a known start state.

        A row's newest `holdout_windows` complete windows are held out (the most recent slice); older ones train.
        Call with the lock held.
        """
        T, k2 = self.x.shape[1], self.k2
        count = self.count
        rows_all, ws_all, hold_all, starts_all = [], [], [], []
        newest = (count // k2) * k2 - k2  # absolute start of each row's newest complete window
        for back in range(T // k2):
            s = newest - back * k2
            # Complete, not overwritten yet (all k2 positions still in the ring).
            ok = (self.slot_of_row >= 0) & (s >= 0) & (s >= count - T)
            rows = np.flatnonzero(ok)
            w = (s[rows] % T) // k2
            good = self.state_ok[rows, w]
            rows, w = rows[good], w[good]
            rows_all.append(rows)
            ws_all.append(w)
            hold_all.append(np.full(rows.size, back < self.holdout_windows))
            starts_all.append(s[rows])
        cat = np.concatenate
        return cat(rows_all), cat(ws_all), cat(hold_all), cat(starts_all)

    def sample(self, n_train: int, max_holdout: int, rng: np.random.Generator) -> tuple[Windows, Windows] | None:
        """Copy out n_train training windows (sampled with replacement, newer ones more often with a
        `sample_half_life`: _recency) and up to max_holdout holdout windows.

        Returns None when no training window or no holdout window exists yet. The lock is held only to choose
        the windows and to check them afterwards, not during the copy (~10 ms for 1,280 windows of 32 events on
        a 2-core CPU, which the serving loop would otherwise wait for in record()). The loop only ever writes
        ahead of the complete windows, so a window can change under the copy only when its row wraps around
        onto it or starts over; those windows are found afterwards and replaced.
        With whole sequences (model.output = "end"), the same from the sequence pool, copied under the lock.
        """
        if self.sequences is not None:
            return self._sample_sequences(n_train, max_holdout, rng)
        with self.lock:
            rows, ws, hold, starts = self.available()
            train = np.flatnonzero(~hold)
            held = np.flatnonzero(hold)
            # A window whose targets are all still unknown teaches nothing.
            useful = self._mask(rows, ws).any(axis=1)
            train, held = train[useful[train]], held[useful[held]]
            if train.size == 0 or held.size == 0:
                return None
            pick = rng.choice(train, size=n_train, replace=True, p=self._recency(rows[train], starts[train]))
            if held.size > max_holdout:
                held = rng.choice(held, size=max_holdout, replace=False)
            generation = self.generation.copy()
        train_w, held_w = self._copy(rows[pick], ws[pick]), self._copy(rows[held], ws[held])
        lags = None  # with a season: each held-out position's seasonal lag, absolute (x[p + 1 - season] forecasts y[p])
        if self.forecast and self.season:
            lags = starts[held, None] + np.arange(self.k2) + 1 - self.season
            held_w.seasonal = self.x[rows[held, None], lags % self.x.shape[1]]
        with self.lock:
            T = self.x.shape[1]

            def intact(i: np.ndarray) -> np.ndarray:
                r = rows[i]
                return (self.generation[r] == generation[r]) & (starts[i] >= self.count[r] - T)

            ok_train, ok_held = intact(pick), intact(held)
            if lags is not None:  # before the row's start, or overwritten by the time the copy ended: unknown
                held_w.seasonal[(lags < 0) | (lags < self.count[rows[held], None] - T)] = np.nan
        if not ok_held.all():
            held_w = held_w.subset(np.flatnonzero(ok_held))
        if not ok_train.all():
            good = np.flatnonzero(ok_train)
            if good.size == 0 or len(held_w) == 0:
                return None
            train_w = train_w.subset(np.where(ok_train, np.arange(ok_train.size), rng.choice(good, ok_train.size)))
        return (train_w, held_w) if len(held_w) else None

    def _sample_sequences(self, n_train: int, max_holdout: int, rng: np.random.Generator):
        with self.lock:
            train, held = self.sequences.split()
            if train.size == 0 or held.size == 0:
                return None
            if held.size > max_holdout:
                held = rng.choice(held, size=max_holdout, replace=False)
            return self.sequences.windows(rng.choice(train, size=n_train, replace=True)), self.sequences.windows(held)

    def _recency(self, rows: np.ndarray, starts: np.ndarray) -> np.ndarray | None:
        """Sampling probabilities of training windows (rows, absolute starts): a window `a` windows older than its
        stream's newest training window weighs 0.5 ** (a / sample_half_life), so the trainer sees mostly what the
        streams do now while older windows still regularise; None (uniform) when the half-life is 0. Call with the
        lock held."""
        if self.sample_half_life <= 0:
            return None
        newest = (self.count[rows] // self.k2 - 1 - self.holdout_windows) * self.k2
        weight = np.exp2(-(newest - starts) / (self.k2 * self.sample_half_life))
        return weight / weight.sum()

    def count_windows(self) -> tuple[int, int]:
        """(training windows, holdout windows) available now; with whole sequences, labelled sequences."""
        if self.sequences is not None:
            with self.lock:
                train, held = self.sequences.split()
            return int(train.size), int(held.size)
        with self.lock:
            _, _, hold, _ = self.available()
        return int((~hold).sum()), int(hold.sum())

    def _positions(self, ws: np.ndarray) -> np.ndarray:
        return ws[:, None] * self.k2 + np.arange(self.k2)  # [B, k2] ring indices

    def _mask(self, rows: np.ndarray, ws: np.ndarray) -> np.ndarray:
        return self.y_ok[rows[:, None], self._positions(ws)]

    def _copy(self, rows: np.ndarray, ws: np.ndarray) -> Windows:
        pos = self._positions(ws)
        r = rows[:, None]
        return Windows(
            x=self.x[r, pos],
            dx=self.dx[r, pos] if self.forecast else None,
            scale=self.scale[r, pos] if self.forecast else None,
            y=self.y[r, pos],
            mask=self.y_ok[r, pos],
            h0=np.ascontiguousarray(self.h0[rows, ws].transpose(1, 0, 2)),
            c0=np.ascontiguousarray(self.c0[rows, ws].transpose(1, 0, 2)),
        )

    # ---- snapshots (the durability code calls these) ------------------------------------------------------

    _ARRAYS = ("x", "dx", "scale", "y", "y_ok", "seq", "h0", "c0", "state_ok", "count", "generation", "last_write",
               "slot_of_row", "row_of_slot")  # fmt: skip

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the recorder holds, as flat CPU tensors (copies) under its own names; scalars as 0-d tensors."""
        with self.lock:
            out = {name: torch.from_numpy(getattr(self, name).copy()) for name in self._ARRAYS}
            # Monotonic clocks do not survive a restart: store idle ages instead of timestamps.
            out["last_write"] = torch.from_numpy(self.clock() - self.last_write)
            for name in ("recorded", "targets_joined", "targets_unmatched"):
                out[name] = torch.tensor(getattr(self, name), dtype=torch.int64)
            if self.sequences is not None:
                out.update(self.sequences.snapshot_tensors())
        return out

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what snapshot_tensors() returned (same configuration); missing names are an error."""
        # Check every array before changing any, so a snapshot that does not fit leaves the recorder untouched.
        # "scale" came with per-stream adaptation: an older snapshot lacks it (its windows then count in units of 1).
        values = {name: tensors[name].numpy() for name in self._ARRAYS if name != "scale" or "scale" in tensors}
        counter_names = ("recorded", "targets_joined", "targets_unmatched")
        counters = {name: int(tensors[name]) for name in counter_names}
        for name, value in values.items():
            expected = getattr(self, name).shape
            if value.shape != expected:
                raise ValueError(
                    f"recorder.{name} in the snapshot has shape {value.shape}, this configuration {expected}"
                )
        with self.lock:
            self.scale[...] = 1.0
            for name, value in values.items():
                getattr(self, name)[...] = value
            self.last_write[...] = self.clock() - self.last_write
            for name, value in counters.items():
                setattr(self, name, value)
            if self.sequences is not None:
                self.sequences.restore_tensors(tensors)
            self._free = np.flatnonzero(self.slot_of_row < 0)[::-1].tolist()
