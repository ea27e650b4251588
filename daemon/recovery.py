"""Durability: restore at start (snapshot + WAL replay), the per-batch log append, snapshots and log truncation.

The serving loop owns one `Durability` and calls it at fixed points, all on the loop's thread:

- `restore()` in `Daemon.start()`, before any socket is bound: load the newest snapshot that verifies (a torn
  or corrupt one is logged and the previous one used), replay the WAL segments from that snapshot's number on
  through the serving pipeline (daemon/pipeline.py `Pipeline.replay`: StateStore.admit → batching.waves →
  apply_wave; no replies), each payload decoded by daemon/wal_records.py,
  truncate a torn or corrupt record at the end of the log, open a fresh segment, and snapshot if anything was
  replayed, so crash loops do not pile up log.
- `log_batch()` after a batch's waves and before its replies: one WAL append (group commit) of the events
  actually applied, with the sequence numbers actually used (daemon-assigned ones included) and each event's
  reset flag, preceded by records of state changes made outside the event path since the last append
  (evictions, `streams reset`/`drop`, a new serving model). If the append fails, `reject_unlogged()` turns
  the batch's applied events into rejections and rolls the in-memory state back to what is on disk.
- `log_targets()` before a delayed-targets message is joined to the recorder and answered: one append of the
  message (streams, seqs, targets), so replay joins it again at the same point between the logged batches and
  the recorder comes back exactly as it was. It is logged *before* the join (the join is deterministic given
  the state the log rebuilds), so a failed append leaves nothing to undo: the targets are answered rejected.
- `after_command()` after a control command: logs its state changes before the command is answered, or undoes
  them and raises ChangeNotLogged (daemon/control.py answers with its message).
- `maybe_snapshot()` from housekeeping, `snapshot()` for `lstmd snapshot`, `on_clean_stop()` at shutdown.

Snapshot protocol: append pending side records, rotate the log to segment S, write `snapshot-S` atomically,
then delete snapshots beyond `keep_snapshots` and segments older than the oldest kept snapshot. Every kept
snapshot plus the segments from its number on reproduce the state, so falling back to the previous snapshot
loses nothing. With `durability.wal = false` nothing is logged: snapshots (periodic, on shutdown, on command)
are the only durability, and the hot path does no extra work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from lstmd.daemon import snapshot as snapshots
from lstmd.daemon import wal as wal_files
from lstmd.daemon import wal_records as records
from lstmd.daemon.config import DurabilityConfig
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.model_header import model_file_metadata
from lstmd.daemon.pipeline import AppliedBatch, ReplayError
from lstmd.daemon.wal import WalError, WriteAheadLog

log = logging.getLogger("lstmd.durability")


class RecoveryError(RuntimeError):
    """The state directory cannot be restored; the message says what was found and what to do."""


class ChangeNotLogged(RuntimeError):
    """A control command's change could not be logged and was undone; the message says so (for the reply)."""


@dataclass
class SnapshotComponent:
    """A part whose tensors every snapshot carries under `<name>.` (training state, model history).

    `snapshot_tensors()` returns CPU copies under the part's own names (no prefix: daemon/snapshot.py's `join` adds
    `<name>.`, `split` strips it); `restore_tensors(tensors)` puts them back and raises KeyError, ValueError or
    RuntimeError when they do not fit (the part then starts empty, the streams still restore).
    """

    snapshot_tensors: Callable[[], dict[str, torch.Tensor]]
    restore_tensors: Callable[[dict[str, torch.Tensor]], None]


class Durability:
    """The log, the snapshots and restore, built from the parts it writes and rebuilds (never the Daemon)."""

    def __init__(
        self,
        config: DurabilityConfig,
        directory: Path,
        store,
        engine,
        pipeline,
        metrics,
        initial_model: Callable[[], ServingModel],
        components: dict[str, SnapshotComponent],
        recorder=None,
        trainer=None,
    ) -> None:
        self.config = config
        self.directory = Path(directory)
        self.wal_dir = self.directory / "wal"
        self.store, self.engine, self.pipeline, self.metrics = store, engine, pipeline, metrics
        self.initial_model = initial_model  # the configured model: what a state without a snapshot starts from
        self.components = components
        self.recorder, self.trainer = recorder, trainer
        self.wal: WriteAheadLog | None = None
        self._logged_model: ServingModel | None = None  # the serving model the log already holds
        self._logged_paused: bool | None = None  # the trainer's paused flag as the log has it (None: not logged)
        self._next_segment = 0  # snapshot number to use while the log is off
        self._last_snapshot = time.monotonic()
        self.restored: dict = {}
        self._feed_recorder = True  # replay records events for training, except when undoing a failed batch
        self._writer: threading.Thread | None = None  # a background snapshot write in flight

    # ---- start ----------------------------------------------------------------------------------------------

    def restore(self) -> dict:
        """Load the newest valid snapshot, replay the log after it, open the log; returns what was restored."""
        started = time.perf_counter()
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        for stale in snapshots.remove_stale_temporaries(self.directory):
            log.warning("removed %s, left by a crash during a snapshot", stale.name)
        snapshot_numbers = snapshots.list_snapshots(self.directory)
        segments = wal_files.list_segments(self.wal_dir)
        loaded = None
        summary = {"snapshot": None, "streams": 0, "records": 0, "events": 0, "segments": 0}
        if not self.config.restore:
            self._set_aside(snapshot_numbers, segments)
            snapshot_numbers, segments = [], []
        else:
            loaded = self._restore_from(snapshot_numbers, segments, summary)
        segments = wal_files.list_segments(self.wal_dir)
        self._next_segment = max([*segments, *snapshot_numbers, -1]) + 1
        if self.config.wal:
            self.wal = WriteAheadLog(
                self.wal_dir,
                self._next_segment,
                self.config.fsync,
                self.config.fsync_interval_ms,
                on_bytes=self.metrics.wal_bytes.inc,
                on_fsync=self.metrics.wal_fsync_duration.observe,
            )
            self._next_segment += 1
            self.store.journal = []
        # Pin the restored state in a snapshot: a crash loop then never replays the same log twice, and the
        # log always has a snapshot (holding the model) to start from.
        if summary["records"] or (self.config.wal and loaded is None):
            self.snapshot("restore" if summary["records"] else "start")
        self._logged_model = self.engine.model
        self._logged_paused = self._paused()
        summary["seconds"] = round(time.perf_counter() - started, 3)
        self.restored = summary
        return summary

    def _set_aside(self, snapshot_numbers: list[int], segments: list[int]) -> None:
        """durability.restore = false: rename the old files, not deleted: a later restore must never mix this old
        state with new events."""
        old = [snapshots.snapshot_path(self.directory, n) for n in snapshot_numbers]
        old += [wal_files.segment_path(self.wal_dir, n) for n in segments]
        for path in old:
            path.rename(path.with_name(path.name + ".not-restored"))
        if old:
            log.warning(
                "durability.restore = false: %d snapshot(s) and log segment(s) in %s renamed *.not-restored",
                len(old),
                self.directory,
            )

    def _restore_from(self, snapshot_numbers: list[int], segments: list[int], summary: dict):
        """The newest usable snapshot, then the log from its segment on; the snapshot used (or None)."""
        loaded = self._load_newest_snapshot(snapshot_numbers, at_start=True)
        if loaded is not None:
            summary["snapshot"] = loaded.path.name
            summary["streams"] = len(self.store)
            log.info(
                "restored %d streams and model version %d from %s",
                len(self.store),
                self.engine.model.version,
                loaded.path.name,
            )
        elif snapshot_numbers and (not segments or segments[0] > 0):
            raise RecoveryError(
                f"no snapshot in {self.directory} is usable and the write-ahead log no longer starts at "
                f"segment 0, so the state cannot be rebuilt; see the errors above. Move {self.directory} "
                "away to start from an empty state."
            )
        start = loaded.segment if loaded is not None else 0
        self._replay([s for s in segments if s >= start], summary)
        return loaded

    def _load_newest_snapshot(self, numbers: list[int], at_start: bool) -> snapshots.Snapshot | None:
        """Apply the newest of `numbers` that reads and fits, falling back to older ones; None if none does.

        at_start (restore): the components are restored too, and a torn or corrupt snapshot is renamed *.corrupt,
        so pruning never keeps it in place of a good one. Reloading after a failed write (the disk may be
        failing) leaves the files and the training state as they are."""
        for number in reversed(numbers):
            path = snapshots.snapshot_path(self.directory, number)
            try:
                loaded = snapshots.read(path)
                self._apply_snapshot(loaded, components=at_start)
                return loaded
            except (snapshots.SnapshotError, ValueError, KeyError, OSError) as exc:
                log.error("snapshot %s is unusable (%s); trying the previous one", path.name, exc)
                if at_start and isinstance(exc, snapshots.SnapshotError):
                    path.rename(path.with_name(path.name + ".corrupt"))
        return None

    def _apply_snapshot(self, snap: snapshots.Snapshot, components: bool = True) -> None:
        meta = snap.metadata
        spec = ModelSpec.from_metadata(meta)
        serving = self.engine.model.spec
        if spec != serving:
            raise RecoveryError(
                f"{snap.path} holds a model {spec}, but the [model] config says {serving}: fix the config "
                f"or move {self.directory} away"
            )
        groups = snapshots.split(snap.tensors)
        # Rebuilt through the model file format, so whatever its metadata carries (version, normalisation)
        # comes back exactly as ServingModel.from_bytes reads an exported model.
        model_meta = json.loads(meta["model_metadata"])
        model = ServingModel.from_bytes(safetensors.torch.save(groups.get("model", {}), metadata=model_meta))
        self.store.restore_tensors(groups.get("state", {}))
        if "engine" in groups:
            self.engine.restore_tensors(groups["engine"], groups["state"]["slots"])
        self.engine.swap_model(model)
        self.metrics.model_version.set(model.version)
        for name, component in self.components.items() if components else ():
            if name in groups:
                self._restore_component(name, component, groups[name], snap)

    @staticmethod
    def _restore_component(name, component: SnapshotComponent, tensors: dict, snap) -> None:
        try:
            component.restore_tensors(tensors)
        except (KeyError, ValueError, RuntimeError) as exc:
            # Training state from another lstmd version or configuration: the streams and the model are
            # what a restart must keep; training goes on from here rather than refusing to start.
            log.error(
                "%s state in %s cannot be restored (%s: %s); %s starts without it",
                name,
                snap.path.name,
                type(exc).__name__,
                exc,
                name,
            )

    def _replay(self, segments: list[int], summary: dict) -> None:
        """Apply every good record of `segments` in order; cut the log at the first bad record."""
        store = self.store
        journal, on_evict = store.journal, store.on_evict
        store.journal, store.on_evict = None, lambda cause, count: None
        try:
            expected = segments[0] if segments else 0
            for i, segment in enumerate(segments):
                path = wal_files.segment_path(self.wal_dir, segment)
                problem = None if segment == expected else f"segment {expected} is missing"
                scan = None
                if problem is None:
                    scan = wal_files.read_segment(path, segment)
                    for payload in scan.records:
                        try:
                            record = records.decode(payload)
                        except records.UnknownRecord as exc:
                            raise RecoveryError(str(exc)) from None
                        self._apply_record(record, summary)
                    summary["segments"] += 1
                    problem = scan.problem
                expected = segment + 1
                if problem is None:
                    continue
                later = segments[i + 1 :] if scan is not None else segments[i:]
                if scan is not None and scan.good_bytes < scan.size:
                    wal_files.truncate(path, scan.good_bytes)
                for other in later:
                    bad = wal_files.segment_path(self.wal_dir, other)
                    bad.rename(bad.with_name(bad.name + ".unreplayed"))
                log.error(
                    "write-ahead log %s: %s; replay stopped there (%d bytes cut, %d later segment(s) set "
                    "aside as *.unreplayed)",
                    path.name,
                    problem,
                    0 if scan is None else scan.size - scan.good_bytes,
                    len(later),
                )
                break
        finally:
            store.journal, store.on_evict = journal, on_evict
        if summary["records"]:
            log.info(
                "replayed %d events in %d records from %d log segment(s); %d streams resident",
                summary["events"],
                summary["records"],
                summary["segments"],
                len(store),
            )
        self.metrics.active_streams.set(len(store))

    def _apply_record(self, record: records.Record, summary: dict) -> None:
        store = self.store
        summary["records"] += 1
        match record:
            case records.EventsRecord():
                recorder = self.recorder if self._feed_recorder else None
                try:
                    summary["events"] += self.pipeline.replay(record, recorder)
                except ReplayError as exc:
                    raise RecoveryError(str(exc)) from None
            case records.ModelRecord():
                model = ServingModel.from_bytes(record.model_bytes)
                self.engine.swap_model(model)
                self.metrics.model_version.set(model.version)
            case records.EvictRecord():
                store.release_ids(record.streams, record.cause)
            case records.ResetRecord():
                for sid in record.streams:
                    store.reset(sid)
            case records.TargetsRecord():
                self._replay_targets(record)
            case records.PauseRecord():
                if self.trainer is not None:  # training may be off now: then there is nothing to pause
                    self.trainer.paused = record.paused

    def _replay_targets(self, record: records.TargetsRecord) -> None:
        """Join a logged delayed-targets message again, exactly as the serving loop did (same counters too)."""
        recorder = self.recorder if self._feed_recorder else None
        if recorder is None or recorder.forecast:  # training off now, or reloading (the recorder has them)
            return
        get = self.store.slot_of.get
        slots = np.fromiter((get(sid, -1) for sid in record.streams), dtype=np.int64, count=len(record.streams))
        recorder.join_targets(slots, record.seqs, record.targets)

    # ---- serving --------------------------------------------------------------------------------------------

    def log_batch(self, streams: list[list], features: np.ndarray, applied: AppliedBatch, targets: list) -> None:
        """Append a batch's applied events (after pending side records) in one group commit; WalError if not.
        `streams` and `targets` per message, `features` the whole batch."""
        record = records.events_record(streams, features, applied.idx, applied.seqs, applied.fresh, targets,
                                        applied.ends)
        self._append([*self._side_records(), records.encode(record)])

    def log_targets(self, streams: list, seqs: np.ndarray, targets: np.ndarray) -> tuple[str, str] | None:
        """Append a delayed-targets message (after pending side records) before it is joined.

        None: logged (under fsync = always, on disk). Otherwise (reason, message): the log cannot be written, so
        the targets must not be joined and are answered rejected. Nothing was changed, so nothing is undone;
        pending side records stay pending for the next append, as they would without this message.
        """
        failing = self.wal.error is not None
        try:
            record = records.TargetsRecord(list(streams), seqs, targets)
            self._append([*self._side_records(), records.encode(record)])
        except WalError as exc:
            reason = "wal_unavailable" if failing else "wal_write_failed"
            log.error("%s: rejecting %d delayed target(s)", exc.strerror, len(streams))
            return reason, f"{exc.strerror}; the target was not joined, resend it"
        if failing:
            log.warning("the write-ahead log accepts writes again; serving resumes")
        return None

    def _side_records(self) -> list[bytes]:
        out = [records.encode(entry) for entry in self.store.journal or ()]
        model = self.engine.model
        if model is not self._logged_model:
            out.append(records.encode(records.ModelRecord(model.to_bytes())))
        paused = self._paused()
        if paused is not None and paused != self._logged_paused:
            out.append(records.encode(records.PauseRecord(paused)))
        return out

    def _paused(self) -> bool | None:
        return None if self.trainer is None else self.trainer.paused

    def _append(self, payloads: list[bytes]) -> None:
        self.wal.append(payloads)
        if self.store.journal:
            self.store.journal.clear()
        self._logged_model = self.engine.model
        self._logged_paused = self._paused()

    def after_command(self) -> None:
        """Log what a control command changed (reset, drop, new model) before it is answered.

        If the log cannot be written, the change is undone (state reloaded from disk) and ChangeNotLogged says so.
        """
        if self.wal is None:
            return
        side = self._side_records()
        if not side:
            return
        try:
            self._append(side)
        except WalError as exc:
            self.reload()
            raise ChangeNotLogged(
                f"{exc.strerror}: the command's change was undone; retry when the disk is fixed"
            ) from None

    def status(self) -> dict:
        """What `lstmd status` shows under "durability"."""
        return {
            "wal": self.wal is not None,
            "fsync": self.config.fsync if self.wal is not None else None,
            "wal_segment": None if self.wal is None else self.wal.segment,
            "wal_segment_bytes": None if self.wal is None else self.wal.size,
            "wal_error": None if self.wal is None else self.wal.error,
            "snapshots": len(snapshots.list_snapshots(self.directory)),
            "restored": self.restored,
        }

    def writable(self) -> bool:
        """While appends fail: try a tiny probe record; True once the log accepts writes again."""
        try:
            self.wal.append([records.encode(records.ProbeRecord())])
        except WalError:
            return False
        log.warning("the write-ahead log accepts writes again; serving resumes")
        return True

    def reject_unlogged(self, exc: WalError, applied: AppliedBatch) -> None:
        """The batch could not be logged: reject its applied events and roll the state back to the disk's."""
        applied.unapply(("wal_write_failed", f"{exc.strerror}; the event was not applied, resend it"))
        log.error("%s: rejecting the batch and reloading the state from %s", exc.strerror, self.directory)
        self.reload()

    def reload(self) -> None:
        """Rebuild the streams and the model from the newest snapshot and the log (undoing unlogged batches).

        Training state (trainer, recorder, history) is left as it is: the trainer runs on its own thread, and a
        rejected batch costs it at most a few recorded events.
        """
        self.wait_for_writer()  # its pruning must not race the reads below
        store = self.store
        store.clear()
        store.journal = [] if self.wal is not None else None
        self.engine.swap_model(self.initial_model())
        summary = {"snapshot": None, "streams": 0, "records": 0, "events": 0, "segments": 0}
        loaded = self._load_newest_snapshot(snapshots.list_snapshots(self.directory), at_start=False)
        start = loaded.segment if loaded is not None else 0
        self._feed_recorder = False  # the recorder already holds these events
        try:
            self._replay([s for s in wal_files.list_segments(self.wal_dir) if s >= start], summary)
        finally:
            self._feed_recorder = True
        self._logged_model = self.engine.model

    # ---- snapshots ------------------------------------------------------------------------------------------

    def snapshot(self, reason: str = "command", background: bool = False) -> dict:
        """Snapshot now: log rotated and state captured (copies) in the loop, then written and old files pruned.

        background=True (periodic and log-size snapshots): the file is written and fsynced on a thread, so the
        loop pauses only for the capture; at most one write is in flight, and a synchronous snapshot waits for it.
        """
        self.wait_for_writer()
        started = time.perf_counter()
        if self.wal is not None:
            side = self._side_records()
            if side:
                self._append(side)
            segment = self.wal.rotate()
        else:
            segment = self._next_segment
            self._next_segment += 1
        model = self.engine.model  # published models are immutable: no copy needed
        state = self.store.snapshot_tensors()
        parts = {
            "model": {k: v.cpu() for k, v in model.tensors.items()},
            "state": state,
            # Forecast models: each stream's last event, so the first change after a restart is the real one.
            "engine": self.engine.snapshot_tensors(state["slots"]),
        }
        parts |= {name: component.snapshot_tensors() for name, component in self.components.items()}
        tensors = snapshots.join(parts)
        metadata = model.spec.to_metadata() | {
            "model_version": str(model.version),
            "model_metadata": json.dumps(model_file_metadata(model.to_bytes())),
            "streams": str(len(self.store)),
            "created": f"{time.time():.3f}",
            "reason": reason,
        }
        self._last_snapshot = time.monotonic()
        if background:
            self._writer = threading.Thread(
                target=self._write_logged,
                args=(segment, tensors, metadata, reason, started),
                name="lstmd-snapshot",
                daemon=True,
            )
            self._writer.start()
            return {"wal_segment": segment, "background": True}
        return self._write(segment, tensors, metadata, reason, started)

    def _write(self, segment: int, tensors: dict, metadata: dict, reason: str, started: float) -> dict:
        path, size = snapshots.write(self.directory, segment, tensors, metadata)
        removed = self._prune()
        seconds = time.perf_counter() - started
        self.metrics.snapshot_duration.observe(seconds)
        self.metrics.last_snapshot.set(time.time())
        streams = int(metadata["streams"])
        log.info("snapshot %s (%s): %d streams, %d bytes in %.3fs", path.name, reason, streams, size, seconds)
        return {
            "path": str(path),
            "streams": streams,
            "bytes": size,
            "seconds": round(seconds, 4),
            "model_version": int(metadata["model_version"]),
            "wal_segment": segment,
            "removed": removed,
        }

    def _write_logged(self, *args) -> None:
        try:
            self._write(*args)
        except OSError as exc:  # the previous snapshot and the whole log since it are kept
            log.error("%s snapshot failed: %s (the log is kept; serving goes on)", args[3], exc.strerror or exc)

    def wait_for_writer(self) -> None:
        """Block until a background snapshot write, if any, has finished."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _prune(self) -> list[str]:
        numbers = snapshots.list_snapshots(self.directory)
        keep = numbers[-self.config.keep_snapshots :]
        removed = []
        for number in numbers[: -self.config.keep_snapshots]:
            path = snapshots.snapshot_path(self.directory, number)
            path.unlink(missing_ok=True)
            removed.append(path.name)
        for segment in wal_files.list_segments(self.wal_dir):
            if segment < keep[0]:
                path = wal_files.segment_path(self.wal_dir, segment)
                path.unlink(missing_ok=True)
                removed.append(f"wal/{path.name}")
        if removed:
            wal_files.fsync_dir(self.wal_dir)
        return removed

    def maybe_snapshot(self) -> None:
        """From housekeeping: snapshot when the interval has passed, or when the log outgrew its bound."""
        interval = self.config.snapshot_interval_s
        if self._writer is not None and self._writer.is_alive():
            return
        if interval > 0 and time.monotonic() - self._last_snapshot >= interval:
            self._snapshot_logged("periodic", background=True)
            return
        bound = self.config.snapshot_wal_mb * 1e6
        if self.wal is not None and 0 < bound <= self.wal.size and self.wal.error is None:
            self._snapshot_logged("log size", background=True)

    def on_clean_stop(self) -> None:
        if self.config.snapshot_on_shutdown:
            self._snapshot_logged("shutdown")

    def _snapshot_logged(self, reason: str, background: bool = False) -> None:
        try:
            self.snapshot(reason, background)
        except OSError as exc:
            self._last_snapshot = time.monotonic()  # retry at the next interval, not every second
            log.error("%s snapshot failed: %s (the log is kept; serving goes on)", reason, exc.strerror or exc)

    def close(self) -> None:
        self.wait_for_writer()
        if self.wal is not None:
            self.wal.close()
            self.wal = None
