"""The trainer: online truncated-BPTT fine-tuning on the trainer's own thread, while the loop keeps serving.

One round: copy windows of k2 steps out of the recorder (each starting from the state its stream really had; with
model.output = "end", whole sequences padded to the longest, from the zero state or the state carried into a
truncated one, the mask marking each end step, so the same loss code counts only the end steps), run forward and
backward through `lstm_sequence` (forecast models with `train.horizon` > 1: the multi-step loss of
daemon/horizon.py, on which the holdout check judges too), clip the gradient norm, take optimizer steps (Adam by
default; the learning rate optionally decaying over rounds since the optimizer's last reset, `learning_rate`) on
the trainer's own copy of the weights, then evaluate the result and the serving weights on the held-out newest
window of every recorded stream. A candidate that is no worse (within `train.tolerance`) is handed to the serving
loop, which swaps it in between two batches as version + 1 (`take_candidate`); a worse one is discarded and counted
as `rejected`; a round whose loss, gradients or weights turn NaN/Inf is discarded as `diverged` and the trainer
starts again from the serving weights. Nothing the trainer computes reaches serving except through that check, so
NaN/Inf never does.

A rejected round's weights stay the trainer's (the next round may improve on them), but a trainer that keeps
losing has drifted somewhere worse than serving: after `train.reset_after_rejections` rejected or diverged
rounds in a row it restarts from the serving weights with a fresh optimizer state (logged, counted in
`resets` and `lstmd_train_resets_total`). An offered candidate ends the streak.

The operator has the last word. A scheduled round (interval or event trigger) starts only when events were
recorded or targets joined since the previous round started: an idle daemon publishes nothing. `train now` runs
regardless. When the operator installs a model (`model import`, `model rollback`), `reset_to` makes the trainer
continue from exactly those weights with a fresh optimizer, discards a round in flight, and waits for new data
and a full interval before its next scheduled round. `paused` is part of the trainer's snapshot and is written
to the log when it changes (daemon/recovery.py), so it survives a restart, `kill -9` included.

Inference never waits for training: the serving weights are immutable `ServingModel`s (the trainer reads a
reference and copies), the loop only polls for a finished candidate, and on CUDA the trainer runs on its own
stream. On the CPU the trainer and the loop share the cores: `train.threads` sets torch's intra-op threads.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from lstmd.daemon.config import TrainConfig
from lstmd.daemon.horizon import multistep_baseline, multistep_loss
from lstmd.daemon.model import ModelSpec, ServingModel, tensor_names
from lstmd.daemon.normalization import ForecastNormalization
from lstmd.daemon.recorder import Recorder, Windows
from lstmd.daemon.tasks import task_for
from lstmd.kernels import lstm_sequence
from lstmd.kernels.backends import Backends, select_backends
from lstmd.kernels.tuning import (
    TRAIN_SWITCH_INTERVAL_S,
    adopt_torch_threads,
    limit_switch_interval,
    set_torch_threads,
)
from torch.func import functional_call

log = logging.getLogger("lstmd.trainer")

MAX_HOLDOUT_WINDOWS = 1024  # newest windows evaluated per round; more adds time, not much certainty


@dataclass
class Candidate:
    """Weights that passed the holdout check, waiting for the serving loop to publish them."""

    model: ServingModel  # version not yet assigned
    base_version: int  # the serving version it was compared against
    forced: bool  # asked for with `train now` (published even while paused)
    info: dict  # losses, for the version history
    report: RoundReport  # the round's report, settled by the loop


@dataclass
class RoundReport:
    round: int
    outcome: str  # published (offered to the loop) | rejected | diverged | skipped
    reason: str = ""
    train_loss: float = math.nan
    holdout_serving: float = math.nan
    holdout_candidate: float = math.nan
    holdout_baseline: float = math.nan  # forecast: the last-value forecast on the same held-out windows
    # Forecast with train.season (and a one-step loss): the seasonal-naive forecast on them; a candidate worse than
    # the better of the two baselines is rejected.
    holdout_seasonal: float = math.nan
    windows: int = 0
    duration_s: float = 0.0
    finished: float = 0.0  # unix seconds
    pending: bool = False  # offered to the serving loop, not settled yet

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


class Diverged(ArithmeticError):
    pass


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        spec: ModelSpec,
        recorder: Recorder,
        serving: Callable[[], ServingModel],  # the current serving model (read from the trainer thread)
        metrics,
        device: torch.device,
        backends: Backends | None = None,  # the engine's (kernels/backends.py); None: serve.backend = auto
        seed: int = 0,
    ) -> None:
        self.config, self.spec, self.recorder = config, spec, recorder
        self.serving, self.metrics, self.device = serving, metrics, device
        self.backends = backends or select_backends("auto", device)
        self.rng = np.random.default_rng(seed)
        self.paused = False
        self.rounds = 0  # rounds finished
        self.requested = 0  # rounds asked for with `train now`, not started yet
        self.last: RoundReport | None = None
        self.outcomes = {"published": 0, "rejected": 0, "diverged": 0, "skipped": 0}
        self.consecutive_rejections = 0  # rejected or diverged rounds since the last candidate or reset
        self.resets = 0  # restarts from the serving weights after reset_after_rejections such rounds
        self.rounds_since_reset = 0  # rounds trained with the current optimizer: the LR schedule's clock
        self.task = task_for(spec)  # the loss and the normalisation hooks (daemon/tasks.py)
        # Forecast: the columns of the next event that are the target (index tensor), None: every feature.
        self._columns = self.task.columns(device)
        self._candidate: Candidate | None = None
        # Guards _candidate, requested, _running, _pending_reset and the checkpoint. Reentrant: an operator's reset
        # applied while holding it saves the checkpoint, which takes it too.
        self._lock = threading.RLock()
        # Notified whenever a round finishes or a candidate is settled (wait_for_round).
        self._settled = threading.Condition(self._lock)
        self._running = 0  # 1 while the thread runs a round
        self._pending_reset: tuple[ServingModel, str] | None = None  # an operator's model, for the thread to take
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_round_at = time.monotonic()
        self._last_round_recorded = 0
        # _data_seen() when the last round started (or the operator installed a model): a scheduled round needs more.
        self._data_mark = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # The "torch-native" sequence backend: an nn.LSTM of the model's shape whose weights functional_call
        # replaces with the trainer's at every step (_sequence); it holds no weights of its own that matter.
        # The model file's LSTM tensor names are nn.LSTM's own parameter names.
        self._native = None
        self._native_names = tensor_names(spec)[: 4 * spec.num_layers]
        if self.backends.sequence == "torch-native":
            self._native = torch.nn.LSTM(spec.input_size, spec.hidden_size, spec.num_layers, batch_first=True)
        # train.horizon > 1 runs the sequence one layer at a time (daemon/horizon.py): one-layer modules by input size.
        self._native_layers: dict[int, torch.nn.LSTM] = {}
        # The trainer's own weights (leaf tensors) and optimizer, and the serving version they descend from.
        self._params: list[torch.Tensor] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._lineage: set[int] = set()
        self._checkpoint: dict[str, torch.Tensor] = {}
        self._save_checkpoint()

    # ---- lifecycle and control (called from the serving loop) -------------------------------------------

    def start(self) -> None:
        if self.device.type == "cpu":
            # Process-wide: the serving loop's kernels use the same pool (serve.cpu_threads sets it; 0 here
            # leaves it). One thread on 2 cores: two OpenMP threads multiplied idle p50 latency (docs/benchmarks.md,
            # "Online learning" and "Numbers once kept in comments").
            set_torch_threads(self.config.threads)
        # The trainer's Python competes with the loop and the I/O thread for the GIL (kernels/tuning.py).
        limit_switch_interval(TRAIN_SWITCH_INTERVAL_S)
        # The first optimizer built imports much of torch.optim's dependencies (~2 s of bytecode under the GIL
        # on 2 cores, py-spy): pay it here, before serving, not in the first round while events wait.
        self._make_optimizer([torch.zeros(1, requires_grad=True)])
        if self.device.type == "cuda" and self.backends.sequence == "triton":
            # Likewise the sequence kernels' compiles, which would otherwise hold the GIL in the first round while
            # serving waits (kernels/triton_lstm.py, "Compiling").
            self.warm_up_kernels()
        if self.paused:
            log.warning("training is paused (as it was before the restart); `lstmd train resume` resumes it")
        self._thread = threading.Thread(target=self._run, name="lstmd-trainer", daemon=True)
        self._thread.start()

    def warm_up_kernels(self) -> int:
        """Compile the Triton sequence kernels for the serving model's shapes (kernels/triton_lstm.py,
        "Compiling"); the number of variants compiled."""
        from lstmd.kernels import triton_lstm

        layers = [tuple(w.to(self.device) for w in layer) for layer in self.serving().params]
        return triton_lstm.warm_up(layers, step=False, sequence=True)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        self.paused = True
        self.metrics.train_enabled.set(0)

    def resume(self) -> None:
        self.paused = False
        self.metrics.train_enabled.set(1)
        self._wake.set()

    def reset_to(self, model: ServingModel, reason: str) -> None:
        """The operator installed `model` (import, rollback): train from its exact weights with a fresh optimizer.

        A round in flight is discarded (its candidate no longer matches the serving version, and its weights are
        replaced when it ends); the next scheduled round waits for data recorded after this call and a full
        interval. Called from the serving loop; applied here at once when no round runs, else by the thread."""
        with self._lock:
            self._pending_reset = (model, reason)
            self._data_mark = self._data_seen()
            self._last_round_at = time.monotonic()
            self._last_round_recorded = self.recorder.recorded
            if not self._running:
                self._apply_pending_reset()

    def _apply_pending_reset(self) -> None:
        with self._lock:
            pending, self._pending_reset = self._pending_reset, None
            if pending is None:
                return
            model, reason = pending
            self._reset_from(model)
            self.consecutive_rejections = 0
            self._save_checkpoint()
        log.info("training continues from the %s weights (version %d), fresh optimizer", reason, model.version)

    def wait_for_round(self, number: int, timeout: float | None = None) -> bool:
        """Block until round `number` has finished and its candidate, if any, was settled by the loop.

        Woken by the trainer itself (no polling); False if `timeout` seconds passed first."""

        def done() -> bool:
            return self.rounds >= number and not (self.last is not None and self.last.pending)

        with self._settled:
            return self._settled.wait_for(done, timeout)

    def _data_seen(self) -> int:
        """New training data so far: events recorded plus delayed targets joined (both only ever grow)."""
        return self.recorder.recorded + self.recorder.targets_joined

    def request_round(self) -> int:
        """Ask for one round now (runs even while paused); returns the number of the round that will answer."""
        with self._lock:
            self.requested += 1
            target = self.rounds + self.requested + self._running  # a round already running is not this one
        self._wake.set()
        return target

    def take_candidate(self) -> Candidate | None:
        with self._lock:
            candidate, self._candidate = self._candidate, None
        return candidate

    def settle(self, candidate: Candidate, published: bool, reason: str = "") -> None:
        """The loop's verdict on a candidate: published, or dropped (paused meanwhile, or the model changed)."""
        outcome = "published" if published else "skipped"
        self.outcomes[outcome] += 1
        self.metrics.train_rounds.labels(outcome).inc()
        report = candidate.report
        if published:
            self._lineage.add(self.serving().version)
        with self._settled:
            report.outcome, report.reason, report.pending = outcome, reason, False
            self._settled.notify_all()

    def status(self) -> dict:
        c = self.config
        trainable, holdout = self.recorder.count_windows()
        return {
            "enabled": True,
            "paused": self.paused,
            "next_round": self._next_round(),
            "new_data_since_last_round": self._data_seen() - self._data_mark,
            "rounds": self.rounds,
            "requested": self.requested,
            "outcomes": dict(self.outcomes),
            "consecutive_rejections": self.consecutive_rejections,
            "resets": self.resets,
            "last_round": None if self.last is None else self.last.as_dict(),
            "recorder": {
                "streams": self.recorder.streams,
                "max_streams": self.recorder.x.shape[0],
                "steps_per_stream": self.recorder.x.shape[1],
                "events_recorded": self.recorder.recorded,
                "training_windows": trainable,
                "holdout_windows": holdout,
                "targets_joined": self.recorder.targets_joined,
                "targets_unmatched": self.recorder.targets_unmatched,
                "memory_bytes": self.recorder.nbytes,
                **self._sequence_status(),
            },
            "settings": {
                "interval": c.interval,
                "interval_events": c.interval_events,
                "k2": c.k2,
                "horizon": c.horizon,
                "batch": c.batch,
                "steps": c.steps,
                "optimizer": c.optimizer,
                "lr": c.lr,
                "lr_now": self.learning_rate(),
                "lr_half_life": c.lr_half_life,
                "sample_half_life": c.sample_half_life,
                "clip_norm": c.clip_norm,
                "tolerance": c.tolerance,
                "reset_after_rejections": c.reset_after_rejections,
                "torch_threads": torch.get_num_threads(),
            },
        }

    def _sequence_status(self) -> dict:
        """model.output = "end": the recorder's whole sequences (the trainer's windows are sequences then)."""
        pool = self.recorder.sequences
        if pool is None:
            return {}
        return {"sequences_kept": min(pool.total, pool.x.shape[0]), "sequences_total": pool.total,
                "sequences_dropped": pool.dropped, "max_sequence": pool.x.shape[1]}

    # ---- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        adopt_torch_threads()  # the thread count set in start() (or serve.cpu_threads) applies to this thread too
        if self.config.nice and hasattr(os, "setpriority"):
            # Linux applies a thread id's niceness to that thread only: the scheduler favours the serving
            # loop and the I/O thread when the cores are busy.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.nice)
        while not self._stop.is_set():
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            if self._stop.is_set():
                break
            with self._lock:
                forced = self.requested > 0
                if forced:
                    self.requested -= 1
                self._running = int(forced or self._due())
            if self._running:
                try:
                    self.run_round(forced)
                except Exception:  # a bug in a round must not kill training for good, nor the daemon
                    log.exception("training round failed")
                    self._finish(RoundReport(self.rounds + 1, "skipped", "internal error (see the log)"))
                finally:
                    with self._lock:
                        self._apply_pending_reset()  # an operator's model arrived during the round
                        self._running = 0
                if self.requested:
                    self._wake.set()

    def _due(self) -> bool:
        if self.paused or self._data_seen() <= self._data_mark:  # nothing new to learn from: no round
            return False
        c = self.config
        if c.interval > 0 and time.monotonic() - self._last_round_at >= c.interval:
            return True
        return c.interval_events > 0 and self.recorder.recorded - self._last_round_recorded >= c.interval_events

    def _next_round(self) -> str:
        """What the next scheduled round waits for, in words (`lstmd train status`)."""
        c = self.config
        if self.paused:
            return "paused: only `lstmd train now` runs a round until `lstmd train resume`"
        if c.interval <= 0 and c.interval_events <= 0:
            return "no schedule (train.interval and train.interval_events are 0): `lstmd train now`"
        if self._data_seen() <= self._data_mark:
            return "waiting for new events or targets (none since the last round or model install)"
        triggers = []
        if c.interval > 0:
            triggers.append(f"in {max(0.0, c.interval - (time.monotonic() - self._last_round_at)):.1f}s")
        if c.interval_events > 0:
            left = c.interval_events - (self.recorder.recorded - self._last_round_recorded)
            triggers.append(f"after {max(0, left)} more events")
        return " or ".join(triggers)

    # ---- one round ----------------------------------------------------------------------------------------

    def run_round(self, forced: bool = False) -> RoundReport:
        """Train, evaluate and (maybe) offer a candidate; synchronous (the thread calls it; so can tests)."""
        started = time.perf_counter()
        self._apply_pending_reset()
        self._last_round_at = time.monotonic()
        self._last_round_recorded = self.recorder.recorded
        self._data_mark = self._data_seen()
        c = self.config
        report = RoundReport(self.rounds + 1, "skipped")
        serving = self.serving()
        sample = self.recorder.sample(c.steps * c.batch, MAX_HOLDOUT_WINDOWS, self.rng)
        trainable, _ = self.recorder.count_windows()
        if sample is None or trainable < c.min_windows:
            report.reason = f"not enough recorded data yet ({trainable} complete training windows)"
            return self._finish(report, started)
        train, holdout = sample
        report.windows = len(train)
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            if serving.version not in self._lineage or not self._params:
                self._reset_from(serving)
            norm = self._normalization(train) if self.task.normalizes else None
            train_t, holdout_t = self._to_device(train), self._to_device(holdout)
            try:
                for group in self._optimizer.param_groups:
                    group["lr"] = self.learning_rate()
                self.rounds_since_reset += 1
                report.train_loss = self._train(train_t, norm)
                candidate_tensors = {n: p.detach().clone() for n, p in zip(self._names, self._params, strict=True)}
                with torch.no_grad():
                    report.holdout_candidate = self._loss(self._params, norm, holdout_t).item()
                if not all(torch.isfinite(t).all() for t in candidate_tensors.values()) or not math.isfinite(
                    report.holdout_candidate
                ):
                    raise Diverged("candidate weights or holdout loss are not finite")
            except Diverged as exc:
                report.outcome, report.reason = "diverged", str(exc)
                self._params = []  # next round starts again from the serving weights
                return self._finish(report, started, serving=serving)
            self._evaluate_others(report, serving, holdout_t, baseline=norm is not None)
            if self._stream is not None:
                self._stream.synchronize()
        if self._stream is not None:
            # Serving reads these on its own (default) stream: copies allocated there, so the caching
            # allocator never hands their memory back to the trainer's stream while serving still uses them.
            candidate_tensors = {n: t.clone() for n, t in candidate_tensors.items()}
        self._report_losses(report)
        reason = self._rejection(report)
        if reason is not None:
            report.outcome, report.reason = "rejected", reason
            return self._finish(report, started, serving=serving)
        return self._offer(report, started, serving, ServingModel(
            self.spec, candidate_tensors, -1, None if norm is None else norm.to(torch.device("cpu"))
        ), forced)

    def _rejection(self, report: RoundReport) -> str | None:
        """Why the candidate must not be published, or None: worse than serving on the held-out windows (beyond the
        tolerance), or with a season, worse than the better of the two baselines."""
        c = self.config
        allowed = report.holdout_serving * (1 + c.tolerance) if math.isfinite(report.holdout_serving) else math.inf
        if report.holdout_candidate > allowed:
            return f"holdout loss {report.holdout_candidate:.6g} worse than serving {report.holdout_serving:.6g}"
        best = min(report.holdout_baseline, report.holdout_seasonal)
        if math.isfinite(report.holdout_seasonal) and report.holdout_candidate > best:
            # With a season the better baseline is a strong forecast that the guard serves anyway: a candidate must
            # beat it to be worth publishing (without one, the guard's gain handles a model no better than the last
            # value, stream by stream, as before).
            which = "seasonal-naive" if report.holdout_seasonal <= report.holdout_baseline else "last-value"
            return (f"holdout loss {report.holdout_candidate:.6g} worse than the {which} forecast's {best:.6g} "
                    f"(train.season = {c.season}: the better of the two baselines)")  # fmt: skip
        return None

    @torch.no_grad()
    def _evaluate_others(self, report: RoundReport, serving: ServingModel, holdout_t, baseline: bool) -> None:
        """The serving model's loss on the held-out windows and, for forecasts, the last value's (with train.season
        and a one-step loss, the seasonal naive's too)."""
        serving_params = [serving.tensors[n].to(self.device) for n in self._names]
        serving_norm = serving.normalization
        serving_norm = None if serving_norm is None else serving_norm.to(self.device)
        report.holdout_serving = self._loss(serving_params, serving_norm, holdout_t).item()
        if baseline:
            report.holdout_baseline = self.baseline_loss(holdout_t).item()
        if baseline and "seasonal" in holdout_t and self.config.horizon == 1:
            report.holdout_seasonal = self.task.seasonal_loss(holdout_t, self._columns).item()

    def _report_losses(self, report: RoundReport) -> None:
        self.metrics.train_loss.set(report.train_loss)
        self.metrics.holdout_loss.labels("serving").set(report.holdout_serving)
        self.metrics.holdout_loss.labels("candidate").set(report.holdout_candidate)
        if math.isfinite(report.holdout_baseline):
            self.metrics.holdout_loss.labels("baseline").set(report.holdout_baseline)

    def _offer(self, report: RoundReport, started: float, serving: ServingModel, model: ServingModel, forced: bool):
        """The candidate passed its holdout check: hand it to the serving loop, which publishes (or skips) it."""
        info = {
            "round": report.round,
            "train_loss": report.train_loss,
            "holdout_loss": report.holdout_candidate,
            "holdout_loss_before": report.holdout_serving,
        }
        report.outcome = "published"  # offered; the loop settles it (published, or skipped if stale)
        report.pending = True
        self._lineage = {serving.version}
        self.consecutive_rejections = 0
        self._finish(report, started, count=False)  # before offering: the loop may settle it at once
        with self._lock:
            stale, self._candidate = self._candidate, Candidate(model, serving.version, forced, info, report)
        if stale is not None:  # the loop never took the previous one (it polls between batches)
            self.settle(stale, False, "superseded by a newer candidate")
        return report

    def _finish(
        self, report: RoundReport, started: float | None = None, count: bool = True, serving: ServingModel | None = None
    ) -> RoundReport:
        """Count and record a round; `serving`: the model a rejected or diverged round was compared against."""
        report.duration_s = round(time.perf_counter() - started, 4) if started is not None else 0.0
        report.finished = round(time.time(), 3)
        if count:
            self.outcomes[report.outcome] += 1
            self.metrics.train_rounds.labels(report.outcome).inc()
        self.metrics.train_round_duration.observe(report.duration_s)
        self.last = report
        self.rounds += 1
        if report.outcome in ("rejected", "diverged"):
            log.info("training round %d %s: %s", report.round, report.outcome, report.reason)
            self.consecutive_rejections += 1
            limit = self.config.reset_after_rejections
            if serving is not None and limit and self.consecutive_rejections >= limit:
                self._restart_from(serving)
        self._save_checkpoint()
        with self._settled:
            self._settled.notify_all()
        return report

    def _restart_from(self, serving: ServingModel) -> None:
        """The drift policy: drop the trainer's weights and optimizer state, start again from `serving`."""
        log.warning(
            "training: %d rejected or diverged rounds in a row; restarting from the serving weights (version %d)",
            self.consecutive_rejections,
            serving.version,
        )
        self._reset_from(serving)
        self.consecutive_rejections = 0
        self.resets += 1
        self.metrics.train_resets.inc()

    @property
    def _names(self) -> list[str]:
        return tensor_names(self.spec)

    def _reset_from(self, serving: ServingModel) -> None:
        self._params = [serving.tensors[n].detach().to(self.device).clone().requires_grad_(True) for n in self._names]
        self._optimizer = self._make_optimizer(self._params)
        self._lineage = {serving.version}
        self.rounds_since_reset = 0  # a warm restart of the LR schedule: a fresh start, after drift, learns fast

    def learning_rate(self) -> float:
        """The LR schedule: `lr` halving every `lr_half_life` rounds since the optimizer was last reset, never below
        `lr_min` * lr. Early rounds after a (re)start move far; later ones fine-tune what was published without
        undoing it on the noise of a few recent windows."""
        c = self.config
        if c.lr_half_life <= 0:
            return c.lr
        return c.lr * max(c.lr_min, 0.5 ** (self.rounds_since_reset / c.lr_half_life))

    def _make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.config.lr, momentum=0.9)
        return torch.optim.Adam(params, lr=self.config.lr)

    def _normalization(self, train: Windows) -> ForecastNormalization:
        size = train.x.shape[-1]
        x, dx = torch.from_numpy(train.x).reshape(-1, size), torch.from_numpy(train.dx).reshape(-1, size)
        return ForecastNormalization.from_data(x, dx, self.config.forecast_inputs).to(self.device)

    def _to_device(self, w: Windows) -> dict[str, torch.Tensor]:
        dev = self.device
        return {
            "x": torch.from_numpy(w.x).to(dev),
            "dx": torch.from_numpy(w.x if w.dx is None else w.dx).to(dev),
            "scale": torch.from_numpy(w.x if w.scale is None else w.scale).to(dev),
            "y": torch.from_numpy(w.y).to(dev),
            "mask": torch.from_numpy(w.mask).to(dev),
            "h0": torch.from_numpy(w.h0).to(dev),
            "c0": torch.from_numpy(w.c0).to(dev),
        } | ({} if w.seasonal is None else {"seasonal": torch.from_numpy(w.seasonal).to(dev)})

    def _train(self, data: dict[str, torch.Tensor], norm) -> float:
        c = self.config
        losses = []
        for step in range(c.steps):
            part = slice(step * c.batch, (step + 1) * c.batch)
            batch = {k: (v[:, part] if k in ("h0", "c0") else v[part]) for k, v in data.items()}
            loss = self._loss(self._params, norm, batch)
            if not torch.isfinite(loss):
                raise Diverged(f"training loss became {loss.item()} at step {step + 1}")
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm_before = torch.nn.utils.clip_grad_norm_(self._params, c.clip_norm)
            if not torch.isfinite(norm_before):
                raise Diverged(f"gradient norm became {norm_before.item()} at step {step + 1}")
            self._optimizer.step()
            losses.append(loss.detach())
        return float(torch.stack(losses).mean())

    def _sequence(self, x, h0, c0, layers):
        """`lstm_sequence`'s contract. The "torch-native" backend (the CPU, serve.backend = auto) runs torch's own
        LSTM op (oneDNN) with the trainer's weights: faster forward + backward than the reference backend's
        Python time loop (docs/benchmarks.md, "Numbers once kept in comments"), and one op per layer leaves the
        GIL to the serving loop."""
        if self._native is None:
            return lstm_sequence(x, h0, c0, layers, backend=self.backends.sequence)
        native = self._native
        if len(layers) != self.spec.num_layers:  # one layer (daemon/horizon.py): an nn.LSTM of its input size
            size = x.shape[-1]
            if size not in self._native_layers:
                self._native_layers[size] = torch.nn.LSTM(size, self.spec.hidden_size, 1, batch_first=True)
            native = self._native_layers[size]
        names = self._native_names[: 4 * len(layers)]  # layer 0's names first
        weights = {name: w.float() for name, w in zip(names, itertools.chain(*layers), strict=True)}
        return functional_call(native, weights, (x, (h0, c0)))

    def baseline_loss(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forecast: the last-value forecast's loss on the same windows, in the same units as _loss."""
        if self.config.horizon > 1:
            return multistep_baseline(self.task, data, self._columns, self.config.horizon)
        return self.task.baseline_loss(data, self._columns)

    def _loss(self, params, norm, data) -> torch.Tensor:
        """Mean loss over known targets, the task's loss (daemon/tasks.py) of the head's output."""
        L = self.spec.num_layers
        layers = [tuple(params[4 * k : 4 * k + 4]) for k in range(L)]
        head_w, head_b = params[4 * L], params[4 * L + 1]
        if self.config.horizon > 1:  # forecast: the k-step loss, on which candidates are judged too
            return multistep_loss(self.task, self._sequence, layers, (head_w, head_b), norm, data, self._columns,
                                  self.config.horizon)
        x = data["x"]
        inputs = x if norm is None else norm.lstm_inputs(x, data["dx"], data["scale"])
        seq, _ = self._sequence(inputs, data["h0"], data["c0"], layers)
        out = seq @ head_w.t() + head_b  # [B, k2, O]
        return self.task.loss(out, data, norm, self._columns)

    # ---- snapshots (the durability code calls these) ------------------------------------------------------

    def _save_checkpoint(self) -> None:
        """Copy weights and optimizer state after each round, so snapshot_tensors() never waits for a round."""
        out: dict[str, torch.Tensor] = {
            "rounds": torch.tensor(self.rounds),
            "data_mark": torch.tensor(self._data_mark),
            "consecutive_rejections": torch.tensor(self.consecutive_rejections),
            "resets": torch.tensor(self.resets),
            "rounds_since_reset": torch.tensor(self.rounds_since_reset),
        }
        for name, count in self.outcomes.items():
            out[f"outcomes.{name}"] = torch.tensor(count)
        if self._params:
            out["lineage"] = torch.tensor(sorted(self._lineage), dtype=torch.int64)
            for name, p in zip(self._names, self._params, strict=True):
                out[f"weights.{name}"] = p.detach().cpu().clone()
            for index, state in self._optimizer.state_dict()["state"].items():
                for key, value in state.items():
                    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                    out[f"optimizer.{index}.{key}"] = tensor.detach().cpu().clone()
        with self._lock:
            self._checkpoint = out

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """Trainer weights, optimizer state and counters as of the last finished round (flat CPU tensors), and
        `paused` as it is now (it changes between rounds)."""
        with self._lock:
            return {**self._checkpoint, "paused": torch.tensor(int(self.paused))}

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what snapshot_tensors() returned; call before start()."""
        self.rounds = int(tensors.get("rounds", torch.tensor(0)))
        self.paused = bool(int(tensors.get("paused", torch.tensor(0))))
        self.consecutive_rejections = int(tensors.get("consecutive_rejections", torch.tensor(0)))
        self.resets = int(tensors.get("resets", torch.tensor(0)))
        # Older snapshots lack the mark: the restored data then counts as new, as it did before.
        self._data_mark = int(tensors.get("data_mark", torch.tensor(0)))
        for name in self.outcomes:
            key = f"outcomes.{name}"
            if key in tensors:
                self.outcomes[name] = int(tensors[key])
        if f"weights.{self._names[0]}" in tensors:
            self._params = [
                tensors[f"weights.{n}"].to(self.device).clone().requires_grad_(True) for n in self._names
            ]
            self._optimizer = self._make_optimizer(self._params)
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    index, name = key[len("optimizer.") :].split(".", 1)
                    state.setdefault(int(index), {})[name] = value.clone()
            if state:
                saved = self._optimizer.state_dict()
                self._optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
            self._lineage = set(tensors["lineage"].tolist())
            self.rounds_since_reset = int(tensors.get("rounds_since_reset", torch.tensor(0)))
        self._save_checkpoint()
