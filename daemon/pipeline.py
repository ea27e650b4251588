"""The serving pipeline as plain stages: admit → waves + sequence numbers → apply_wave, returning an AppliedBatch.

Serving (`Pipeline.serve`, for a gathered batch of events messages) and the WAL replay (`Pipeline.replay`, for one
logged EventsRecord) apply events through the same `apply_wave`, so a replay rebuilds exactly what serving built:
the state rows, each stream's last sequence number, its LRU position, its resend window and the recorder.

- admit: per event, features finite and sequence number in range, then StateStore.admit (slot lookup, new ids
  checked by `check_new_id`, capacity and eviction). Rejections carry a (reason label, message) pair.
- waves: batching.waves splits the admitted events so each wave steps every stream at most once, in arrival
  order. Per wave, daemon-assigned numbers become last + 1, exhausted numbers are refused, gaps are counted and
  duplicates are answered from the resend window instead of being applied.
- apply_wave: one engine step for the wave, the outputs kept for resends, the events recorded for training,
  last seq and LRU touch.
- whole-sequence outputs (model.output = "end", many-to-one): only an end event's output is kept and answered
  (others become NaN rows flagged FLAG_NO_OUTPUT, also in the resend window, so a resend gets the original
  answer), and an end resets its stream's state for the next event (StateStore.end_sequences), whose reply is
  flagged FLAG_SEQUENCE_START. The ends travel in the WAL record, so the replay resets the same streams.

The pipeline never replies, publishes or logs: `Daemon` does that with the AppliedBatch it gets back.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from lstmd.clients import protocol
from lstmd.daemon import batching
from lstmd.daemon.state_store import NO_SEQ, StateStore
from lstmd.daemon.wal_records import EventsRecord

Reason = tuple[str, str]  # (label counted in metrics, message told to the client)
_NO_INT = np.empty(0, dtype=np.int64)


class ReplayError(RuntimeError):
    """A logged batch cannot be applied again (the message says why and what to do)."""


@dataclass
class AppliedBatch:
    """What serving one batch did, event i being the i-th event of the batch (messages concatenated).

    `idx`, `seqs`, `fresh` list the applied events in the order they were stepped (wave order): their batch
    index, the sequence number used (daemon-assigned ones included) and whether their state started from zero.
    """

    status: np.ndarray  # [n] uint8, protocol status codes
    predictions: np.ndarray  # [n, O] float32, NaN where not applied (duplicates: their kept prediction)
    reasons: dict[int, Reason] = field(default_factory=dict)  # rejected events: counted as rejections
    unavailable: dict[int, Reason] = field(default_factory=dict)  # duplicates whose prediction is gone
    idx: np.ndarray = field(default_factory=lambda: _NO_INT)
    seqs: np.ndarray = field(default_factory=lambda: _NO_INT)
    fresh: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    ends: np.ndarray | None = None  # [len(idx)] bool, wave order: the applied event ended its sequence
    flags: np.ndarray | None = None  # [n] uint8 protocol.FLAG_* per event (model.output = "end"), else None

    @property
    def applied(self) -> bool:
        return self.idx.size > 0

    def reply_reasons(self) -> dict[int, Reason]:
        """Every reason a reply carries: rejections and duplicates without a prediction."""
        return self.reasons | self.unavailable if self.unavailable else self.reasons

    def unapply(self, why: Reason) -> None:
        """The applied events were undone (the log could not take them): answer them rejected with `why`."""
        self.status[self.idx] = protocol.REJECTED
        for i in self.idx.tolist():
            self.reasons[i] = why
        self.idx, self.seqs, self.fresh, self.ends = _NO_INT, _NO_INT, np.empty(0, dtype=bool), None
        if self.flags is not None:
            self.flags[:] = 0


class Pipeline:
    """Admission, waves and the step for the serving loop and the replay; owns the sequence-gap count."""

    def __init__(
        self,
        store: StateStore,
        engine,
        metrics,
        serve_config,
        batch_targets: Callable[[list, list[int], int], np.ndarray | None],
        output: str = "every",  # model.output
    ) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.config = serve_config
        self.recorder = None  # set when training is on: applied events are recorded for it
        # [n, D] targets of a batch from each message's targets (or None), NaN rows where none; the task's policy.
        self.batch_targets = batch_targets
        self.sequence_gaps = 0  # missing numbers seen, saturating at SEQ_LIMIT (see _count_gaps)
        self.sequence_outputs = output == "end"  # answer and keep only end events' outputs, reset after them

    # ---- serving --------------------------------------------------------------------------------------------

    def serve(
        self, streams: list[list], seqs: list, features: np.ndarray, targets: list, ends: list | None = None
    ) -> AppliedBatch:
        """Apply one gathered batch: per message its stream ids, its seqs (None: the daemon numbers them), its
        targets (None or [n_m, D]) and its end flags (None or [n_m] bools); `features` is the whole batch [n, I]."""
        counts = [len(s) for s in streams]
        n = features.shape[0]
        out = AppliedBatch(
            np.zeros(n, dtype=np.uint8), np.full((n, self.engine.model.spec.output_size), np.nan, dtype=np.float32)
        )
        batch_ends = self._batch_ends(ends, counts, n) if self.sequence_outputs else None
        if batch_ends is not None:
            out.flags = np.zeros(n, dtype=np.uint8)
        slots = np.empty(n, dtype=np.int64)
        numbers = np.full(n, -1, dtype=np.int64)  # -1: the daemon assigns the number
        was_dropped = np.zeros(n, dtype=bool)
        offset = 0
        for ids, message_seqs, count in zip(streams, seqs, counts, strict=True):
            part = slice(offset, offset + count)
            self._admit_message(ids, message_seqs, features[part], offset, slots[part], numbers[part],
                                was_dropped[part], out.reasons)
            offset += count
        for i in out.reasons:
            out.status[i] = protocol.REJECTED
        batch_targets = self.batch_targets(targets, counts, n) if self.recorder is not None else None
        accepted = np.flatnonzero(slots >= 0)
        parts = []
        for wave in batching.waves(slots[accepted]):
            part = self._serve_wave(accepted[wave], slots, numbers, was_dropped, features, batch_targets, out,
                                    batch_ends)
            if part is not None:
                parts.append(part)
        if len(parts) == 1:
            out.idx, out.seqs, out.fresh = parts[0]
        elif parts:
            out.idx, out.seqs, out.fresh = (np.concatenate([p[k] for p in parts]) for k in range(3))
        if batch_ends is not None and out.applied:
            out.ends = batch_ends[out.idx]
        return out

    @staticmethod
    def _batch_ends(ends: list | None, counts: list[int], n: int) -> np.ndarray:
        """[n] bool end flags of a batch from its messages' (None: no end)."""
        out = np.zeros(n, dtype=bool)
        if ends is None:
            return out
        offset = 0
        for message_ends, count in zip(ends, counts, strict=True):
            if message_ends is not None:
                out[offset : offset + count] = message_ends
            offset += count
        return out

    def _serve_wave(self, idx, slots, numbers, was_dropped, features, targets, out: AppliedBatch, ends=None):
        """One wave: number, refuse exhausted, count gaps, answer duplicates, apply the rest; (idx, seq, fresh)."""
        wave_slots = slots[idx]
        last = self.store.last_seq[wave_slots]
        seq = numbers[idx]
        # last < SEQ_LIMIT (every applied number is), so last + 1 cannot overflow; a stream whose numbers are
        # used up is refused rather than wrapped around.
        seq = np.where(seq == -1, last + 1, seq)
        exhausted = seq >= protocol.SEQ_LIMIT
        if exhausted.any():
            why = ("seq_exhausted", "the stream's sequence numbers are used up (2^63 - 2 applied): drop it")
            for i in idx[exhausted].tolist():
                out.reasons[i] = why
                out.status[i] = protocol.REJECTED
            idx, wave_slots, seq, last = idx[~exhausted], wave_slots[~exhausted], seq[~exhausted], last[~exhausted]
        self._count_gaps(seq, last)
        duplicate = seq <= last
        if duplicate.any():
            self._answer_duplicates(idx[duplicate], wave_slots[duplicate], seq[duplicate], out)
            idx, wave_slots, seq = idx[~duplicate], wave_slots[~duplicate], seq[~duplicate]
        if idx.size == 0:
            return None
        fresh = self.store.needs_reset[wave_slots]
        x = features if idx.size == features.shape[0] else features[idx]
        wave_targets = None if targets is None else targets[idx]
        wave_ends = None if ends is None else ends[idx]
        out.predictions[idx] = self.apply_wave(x, wave_slots, seq, fresh, wave_targets, self.recorder, wave_ends)
        reset_now = fresh & was_dropped[idx]
        if reset_now.any():
            out.status[idx[reset_now]] = protocol.STATE_RESET
        if out.flags is not None:
            out.flags[idx] = np.where(wave_ends, 0, protocol.FLAG_NO_OUTPUT) | np.where(
                fresh, protocol.FLAG_SEQUENCE_START, 0
            )
        return idx, seq, fresh

    def _count_gaps(self, seq: np.ndarray, last: np.ndarray) -> None:
        gaps = (last != NO_SEQ) & (seq > last + 1)
        if gaps.any():  # summed in Python integers: gaps near 2^63 would overflow an int64 sum
            missing = sum((seq[gaps] - last[gaps] - 1).tolist())
            # Saturates at 2^63 - 1: adversarial numbers could push the sum past what msgpack and JSON readers
            # of `lstmd status` take (the Prometheus counter is a float and just keeps counting).
            self.sequence_gaps = min(self.sequence_gaps + missing, protocol.SEQ_LIMIT)
            self.metrics.sequence_gaps.inc(missing)

    def _answer_duplicates(self, idx, slots, seq, out: AppliedBatch) -> None:
        """Already applied events: answered `duplicate` with their original predictions from the resend window,
        or, beyond it, with a reason saying the prediction is no longer kept (the Producer raises on that)."""
        out.status[idx] = protocol.DUPLICATE
        kept, found = self.store.kept_outputs(slots, seq)
        out.predictions[idx[found]] = kept[found]
        if out.flags is not None:  # kept NaN: a non-end event's answer under model.output = "end"
            out.flags[idx[found & np.isnan(kept).any(axis=1)]] = protocol.FLAG_NO_OUTPUT
        if found.all():
            return
        window = self.config.resend_window
        self.metrics.duplicates_unavailable.inc(int((~found).sum()))
        for i, number in zip(idx[~found].tolist(), seq[~found].tolist(), strict=True):
            out.unavailable[i] = (
                "prediction_unavailable",
                f"sequence number {number} was already applied; its prediction is no longer kept (the daemon "
                f"keeps each stream's last serve.resend_window = {window})",
            )

    def apply_wave(self, x, slots, seq, fresh, targets, recorder, ends=None) -> np.ndarray:
        """One launch: advance `slots` (distinct) by one event each, keep their outputs for resends, record the
        events for training (when `recorder` is given), mark the slots used. With model.output = "end", `ends`
        ([n] bool, None: no end) picks the outputs answered (others NaN) and the streams reset after this step."""
        started = time.perf_counter()
        preds = self.engine.step(x, slots, fresh)
        self.metrics.step_duration.observe(time.perf_counter() - started)
        if self.sequence_outputs:
            preds = np.where(False if ends is None else ends[:, None], preds, np.float32(np.nan))
        self.store.keep_outputs(slots, seq, preds)
        if recorder is not None:
            if self.sequence_outputs:  # a slot's first event since it took a stream: that stream is new there
                recorder.new_streams(slots[self.store.events_applied[slots] == 0])
            recorder.record(slots, x, seq, targets, fresh, self.store.h, self.store.c, ends)
        self.store.last_seq[slots] = seq
        self.store.touch(slots)
        if ends is not None and ends.any():  # (replay too: the log says where sequences ended)
            self.store.end_sequences(slots[ends])
        return preds

    # ---- admission ------------------------------------------------------------------------------------------

    def _admit_message(self, streams, message_seqs, features, offset, slots, seqs, was_dropped, reasons) -> None:
        """Per-event validation and slot lookup for one message's events (batch indices offset..); writes the
        message's part of `slots` (-1: rejected), `seqs` and `was_dropped`."""
        count = len(streams)
        bad: dict[int, Reason] = {}
        # One reduction instead of a per-row check: any NaN or Inf makes the sum non-finite. A sum that only
        # overflowed lands in the exact check too, which then finds every row finite.
        if not np.isfinite(features.sum()):
            for i in np.flatnonzero(~np.isfinite(features).all(axis=1)).tolist():
                bad[i] = ("non_finite", "features hold NaN or Inf")
        if message_seqs is not None:
            seq_arr = protocol.seq_array(message_seqs)
            # One comparison for both ends of [0, SEQ_LIMIT): a negative int64 viewed as uint64 is >= 2^63.
            for i in np.flatnonzero(seq_arr.view(np.uint64) >= protocol.SEQ_LIMIT).tolist():
                bad[i] = ("bad_seq", f"sequence number {message_seqs[i]} is outside [0, 2^63 - 1)")
            seqs[:] = seq_arr
        limit = self.config.max_new_streams_per_message
        if bad:
            keep = [i for i in range(count) if i not in bad]
            admission = self.store.admit([streams[i] for i in keep], limit, self.check_new_id)
            slots[:] = -1
            slots[keep] = admission.slots
            was_dropped[keep] = admission.was_dropped
            bad |= {keep[j]: why for j, why in admission.rejected.items()}
        else:
            admission = self.store.admit(streams, limit, self.check_new_id)
            slots[:], was_dropped[:] = admission.slots, admission.was_dropped
            bad = admission.rejected
        for i, why in bad.items():
            slots[i] = -1
            reasons[offset + i] = why

    def check_new_id(self, stream) -> Reason | None:
        """Why a stream id not yet in the store may not become one (its length), or None. Only new ids are
        checked: a resident id passed this when it was created, so the hot path runs no check per event (the
        per-event type scan it replaces was ~5% of the loop at 10k int ids per batch)."""
        if type(stream) is not str:
            return None
        length, limit = len(stream), self.config.max_stream_id_length
        if length == 0:
            return ("bad_stream_id", "stream id is empty")
        if length > limit:
            return ("stream_id_too_long", f"stream id of {length} characters exceeds the limit of {limit}")
        return None

    def join_targets(self, streams: list, seqs: list, targets: np.ndarray, log_targets=None):
        """Delayed targets: join each to its recorded event (stream, seq). `log_targets(streams, seqs, targets)`
        (the WAL append, or None) runs first and returns None or (label, why) when the log cannot be written; then
        nothing is joined. Returns (status [n] uint8, reasons {i: text}, the unlogged label or None)."""
        n = len(streams)
        status = np.full(n, protocol.REJECTED, dtype=np.uint8)
        if self.recorder is None or self.recorder.forecast:
            why = "training is disabled" if self.recorder is None else "forecast targets are the next events"
            return status, dict.fromkeys(range(n), f"target not recorded: {why}"), None
        get = self.store.slot_of.get
        slots = np.fromiter((get(sid, -1) for sid in streams), dtype=np.int64, count=n)
        seq_arr = np.asarray(seqs, dtype=np.int64)
        # The task's cleaning, as for targets sent with events: a class label outside 0..O-1 becomes NaN (it would
        # fail every training round while it stays recorded), and NaN is never joined.
        targets = self.batch_targets([targets], [n], n)
        unlogged = None if log_targets is None else log_targets(streams, seq_arr, targets)
        if unlogged is not None:
            label, why = unlogged
            return status, dict.fromkeys(range(n), why), label
        joined = self.recorder.join_targets(slots, seq_arr, targets)
        status[joined] = protocol.OK
        why = (
            "no kept sequence ended at this stream and sequence number (not an end event, or no longer kept)"
            if self.sequence_outputs
            else "no recorded event with this stream and sequence number (never seen, or no longer kept)"
        )
        reasons = dict.fromkeys(np.flatnonzero(~joined).tolist(), why)
        for i in np.flatnonzero(~np.isfinite(targets).all(axis=1)).tolist():
            reasons[i] = "the target teaches nothing: NaN or Inf, or a class label outside 0..output_size-1"
        return status, reasons, None

    # ---- replay ---------------------------------------------------------------------------------------------

    def replay(self, record: EventsRecord, recorder) -> int:
        """Re-apply one logged batch: the events in arrival order, one step per stream per wave, with the numbers
        and reset flags that were logged; `recorder` (or None) gets them recorded again. Returns the event count."""
        order = np.argsort(record.idx, kind="stable")  # logged in wave order; admit and re-wave in arrival order
        idx, seq, fresh, x = record.idx[order], record.seqs[order], record.fresh[order], record.features[order]
        ends = None if record.ends is None else record.ends[order]
        streams = list(itertools.chain.from_iterable(record.message_streams))
        ids = [streams[i] for i in idx.tolist()]
        admission = self.store.admit(ids, max(len(ids), 1))
        if admission.rejected:
            raise ReplayError(
                f"replaying the log: {len(admission.rejected)} events found no state slot "
                f"({next(iter(admission.rejected.values()))[1]}); was state.capacity lowered? Raise it back."
            )
        slots = admission.slots
        targets = None
        if recorder is not None and record.message_targets:
            counts = [len(m) for m in record.message_streams]
            full = self.batch_targets(record.batch_targets(), counts, sum(counts))
            targets = None if full is None else full[idx]
        for wave in batching.waves(slots):
            wave_targets = None if targets is None else targets[wave]
            wave_ends = None if ends is None else ends[wave]
            self.apply_wave(x[wave], slots[wave], seq[wave], fresh[wave], wave_targets, recorder, wave_ends)
        return int(idx.size)
