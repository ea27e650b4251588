"""The serving model's life after start: online training wired to the loop, publishing, and the version history.

`OnlineModel` builds the recorder and the trainer (daemon/recorder.py, daemon/trainer.py; none with training off),
installs new serving weights between two batches (`install_model`: version + 1, kept in the bounded `versions`
history, the model gauges set), offers the trainer's candidate to the loop (`publish_trained`), reports the
forecast guard, and names the training state and history every snapshot carries (`snapshot_components`). The
serving loop calls it on its own thread; the trainer only reads the serving model through one reference.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from lstmd.daemon.config import Config
from lstmd.daemon.model import ModelSpec, ServingModel
from lstmd.daemon.normalization import guard_summary
from lstmd.daemon.recovery import SnapshotComponent
from lstmd.daemon.versions import ModelHistory


class OnlineModel:
    """Versions, recorder and trainer of one daemon, and the one way new weights start serving."""

    def __init__(self, config: Config, engine, store, metrics, device: torch.device) -> None:
        self.config, self.engine, self.store, self.metrics, self.device = config, engine, store, metrics, device
        self.versions = ModelHistory(config.train.history)  # published versions, for rollback
        self.versions.add(self.engine.model, "initial")
        self.recorder, self.trainer = self._make_training(engine.model.spec)
        # Cluster mode: the replica's events source (daemon/cluster/replica.py), which publishes trained and imported
        # models as the cluster's next version; set by the daemon once it is open. None: single-process.
        self.cluster = None

    def _make_training(self, spec: ModelSpec):
        t = self.config.train
        if not t.enabled:
            return None, None
        from lstmd.daemon.recorder import Recorder
        from lstmd.daemon.trainer import Trainer

        task = self.engine.task
        forecast = not task.takes_targets  # its targets are the next events' chosen columns
        recorder = Recorder(
            spec.num_layers,
            spec.hidden_size,
            spec.input_size,
            task.recorded_target_size,
            spec.task,
            self.config.state.capacity,
            t.record_streams,
            t.record_steps,
            t.k2,
            t.record_idle_s,
            t.holdout_windows,
            columns=(list(spec.forecast_columns) or None) if forecast else None,
            scale_table=self.store.adaptation[:, self.engine.layout.field("scale")] if forecast else None,
            max_sequence=t.max_sequence if self.config.model.output == "end" else 0,
            sample_half_life=t.sample_half_life,
            season=t.season,
        )
        serving = lambda: self.engine.model  # noqa: E731 (read from the trainer thread: one reference)
        backends, seed = self.engine.backends, self.config.model.seed
        trainer = Trainer(t, spec, recorder, serving, self.metrics, self.device, backends, seed)
        return recorder, trainer

    def start(self) -> None:
        """At the end of start-up: the weights start serving now; the trainer starts (paused if the state says so)."""
        self.metrics.model_version.set(self.engine.model.version)
        self.metrics.last_publish.set(time.time())
        if self.trainer is not None:
            self.trainer.start()
            self.metrics.train_enabled.set(0 if self.trainer.paused else 1)

    def stop(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()

    def snapshot_components(self, spec: ModelSpec) -> dict[str, SnapshotComponent]:
        """The parts besides streams and model that every snapshot carries: training state and model history."""
        parts = {}
        if self.recorder is not None:
            parts["recorder"] = SnapshotComponent(self.recorder.snapshot_tensors, self.recorder.restore_tensors)
            parts["trainer"] = SnapshotComponent(self.trainer.snapshot_tensors, self.trainer.restore_tensors)
        parts["versions"] = SnapshotComponent(
            self.versions.snapshot_tensors, lambda tensors: self.versions.restore_tensors(tensors, spec)
        )
        return parts

    def publish_trained(self) -> None:
        """Between two batches: serve the trainer's candidate, if one passed its holdout check."""
        candidate = self.trainer.take_candidate()
        if candidate is None:
            return
        if candidate.base_version != self.engine.model.version:
            self.trainer.settle(candidate, False, "the serving model changed during the round")
        elif self.trainer.paused and not candidate.forced:
            self.trainer.settle(candidate, False, "training was paused during the round")
        elif self.cluster is not None:  # one model across the cluster: the averager publishes (cluster/weights.py)
            self.cluster.offer_trained(candidate)
            self.trainer.settle(candidate, True, "sent to the cluster's averager")
        else:
            self.install_model(candidate.model, "train", **candidate.info)
            self.trainer.settle(candidate, True)

    def install_model(self, model: ServingModel, source: str, version: int | None = None, **info) -> int:
        """Serve `model` from the next batch on as version + 1, and keep it in the version history. Cluster mode:
        an operator's model is published as the cluster's next version instead (daemon/cluster/weights.py), and
        the cluster's versions are installed here under their own `version`."""
        if version is None and self.cluster is not None:
            return self.cluster.publish_model(model, source)
        model.version = self.engine.model.version + 1 if version is None else version
        self.engine.swap_model(model)
        if self.versions.get(model.version) is None:  # a replay may return to a version served before
            self.versions.add(self.engine.model, source, **info)
        self.metrics.model_version.set(model.version)
        self.metrics.last_publish.set(time.time())
        return model.version

    def guard_summary(self) -> dict:
        """The forecast guard over the resident streams (daemon/normalization.py); {} for other tasks."""
        occupied = torch.from_numpy(np.isfinite(self.store.last_used)).to(self.device)
        return guard_summary(self.engine.layout, self.store.adaptation, occupied)
