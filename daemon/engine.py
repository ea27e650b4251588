"""The inference step: one kernel launch advancing a wave of streams, then the output head.

Holds the serving model on the device. Swapping `engine.model` for a new `ServingModel` between two batches is
how new weights are published: the loop reads the reference once per wave, so a swap never tears a wave.
On a CUDA device the step goes through daemon/device_step.py (pinned staging, one copy each way per wave, a CUDA
graph per bucketed batch size under serve.cuda_graphs), except for forecast models, whose per-stream adaptation
runs around the kernel below: as two Triton kernels with the Triton step (kernels/triton_adaptation.py), else as
torch ops (normalization.py). On the CPU it runs inside the fused C step (kernels/cpu_step.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from lstmd.daemon import normalization as adaptation
from lstmd.daemon.model import ServingModel
from lstmd.daemon.normalization import AdaptationLayout, Ring, adapt_begin, adapt_finish
from lstmd.daemon.state_store import StateStore
from lstmd.daemon.tasks import task_for
from lstmd.kernels import lstm_step_
from lstmd.kernels.backends import Backends, select_backends
from lstmd.kernels.cpu_step import CpuStep, FusedAdaptation
from lstmd.kernels.tuning import set_torch_threads


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("serve.device = cuda, but PyTorch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


class Engine:
    def __init__(
        self,
        model: ServingModel,
        store: StateStore,
        device: torch.device,
        backend: str,
        cpu_threads: int = 0,
        step_threads: int = 1,
        cuda_graphs: bool = True,
        season: int = 0,  # train.season: the guard's seasonal-naive lag (forecast models)
        level: float = 0.0,  # train.level_rate: the guard's level regressor (forecast models)
        guard: bool = True,  # train.guard: False serves "stream" models without the per-stream adaptation
    ) -> None:
        self.device = device
        self.guard = guard
        if device.type == "cpu":
            set_torch_threads(cpu_threads)  # process-wide; see serve.cpu_threads in daemon/config.py
        self.model = model.to(device)
        self.store = store
        # kernels/backends.py: the one decision
        self.backends: Backends = select_backends(backend, device, model.spec.hidden_size)
        # step_threads 0: one per core this process may run on, at most 4 (serve.step_threads).
        threads = step_threads or min(4, len(os.sched_getaffinity(0)))
        self._cpu_step = CpuStep(threads) if self.backends.step == "cpu" else None
        # Forecast models see each stream's change since its previous event (daemon/normalization.py): the task
        # keeps every slot's last event next to the state tables (daemon/tasks.py LastEvents); others keep none.
        self.task = task_for(model.spec)
        self.stream_state = self.task.stream_state(store.capacity, device)
        self.layout = None
        if self.stream_state is not None:  # per-stream scale and guard (normalization.py), every forecast model
            self.layout = AdaptationLayout(model.spec.input_size, model.spec.output_size, season, level)
            store.enable_adaptation(self.layout.initial_row(), season, model.spec.output_size, self.stream_state)
        # The per-stream adaptation inside the fused CPU step's pass over the rows (kernels/cpu_step.py
        # FusedAdaptation), where that step was built, the level regressor included; a season's ring stays in torch
        # (normalization.py).
        self._fused_adaptation = self.layout is not None and not season and self._cpu_step is not None and (
            self._cpu_step.fused
        )
        self._adaptation: FusedAdaptation | None = None  # _fused_adaptation_of
        # With the Triton step (CUDA; the CPU through the interpreter) the adaptation is two Triton kernels of its own
        # (kernels/triton_adaptation.py) instead of ~25-50 torch ops per wave; with a season, torch ops.
        self._adaptation_kernels = self.layout is not None and not season and self.backends.step == "triton"
        self._kernels = None  # _adaptation_kernels_of
        self._device_step = None
        if device.type == "cuda" and self.stream_state is None:
            from lstmd.daemon.device_step import DeviceStep

            # It takes over the state tables (one scratch row more); the store keeps views of them. Forecast
            # models (per-stream adaptation, not in DeviceStep yet) step through the path below on CUDA too.
            self._device_step = DeviceStep(self.model, store, self.backends.kernel, device, cuda_graphs)
        elif device.type == "cuda" and self.backends.step == "triton":
            from lstmd.kernels import triton_lstm

            # Compile every step variant now, not in the first waves (kernels/triton_lstm.py, "Compiling").
            triton_lstm.warm_up(self.model.params, step=True)
            if self._adaptation_kernels:
                self._adaptation_kernels_of(self.model).warm_up()

    @property
    def backend_name(self) -> str:
        return self.backends.step if self._cpu_step is None else self._cpu_step.name

    def snapshot_tensors(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The task's per-stream state of `slots` (CPU copies), for the snapshot; {} when it keeps none."""
        return {} if self.stream_state is None else self.stream_state.snapshot_tensors(slots)

    def restore_tensors(self, tensors: dict[str, torch.Tensor], slots: torch.Tensor) -> None:
        """Put back what snapshot_tensors(slots) returned (same slots, after the state store's restore)."""
        if self.stream_state is not None:
            self.stream_state.restore_tensors(tensors, slots)

    def close(self) -> None:
        """Stop the CPU step's threads (the daemon's shutdown)."""
        if self._cpu_step is not None:
            self._cpu_step.close()

    def swap_model(self, model: ServingModel) -> None:
        self.model = model.to(self.device)

    def _fused_adaptation_of(self, model: ServingModel) -> FusedAdaptation:
        """The CPU step's FusedAdaptation for `model` (its forecast columns), one object for as long as it serves."""
        a = self._adaptation
        if a is None or a.columns is not model.columns or a.table is not self.store.adaptation:
            self._adaptation = FusedAdaptation(
                self.store.adaptation, self.store.adaptation_init, model.columns, adaptation.count_steps(self.device),
                adaptation.CLIP, adaptation.SCALE_CLIP, adaptation.SCALE_FLOOR, self.layout.level,
            )  # fmt: skip
        return self._adaptation

    def _adaptation_kernels_of(self, model: ServingModel):
        """The Triton adaptation for `model` (its forecast columns), one object for as long as it serves."""
        from lstmd.kernels.triton_adaptation import TritonAdaptation

        k = self._kernels
        if k is None or k.model_columns is not model.columns or k.table is not self.store.adaptation:
            k = self._kernels = TritonAdaptation(self.layout, self.store.adaptation, self.store.adaptation_init,
                                                 model.columns)  # fmt: skip
        return k

    @torch.inference_mode()
    def step(self, features: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """Advance the streams at `slots` (distinct) by one event each; return predictions [n, O] float32."""
        model = self.model
        if self._device_step is not None:
            return self._device_step.step(model, features, slots, fresh)
        x = torch.from_numpy(features).to(self.device, non_blocking=True)
        slot_t = torch.from_numpy(slots).to(self.device, non_blocking=True)
        reset = torch.from_numpy(fresh).to(self.device, non_blocking=True) if fresh.any() else None
        inputs, rows, ring, adapt, kernels = x, None, None, None, None
        norm = model.normalization
        stream = norm is not None and norm.inputs == "stream" and self.guard
        if self.stream_state is not None:  # forecast: the change since each stream's previous event (0 at its first)
            dx = x - self.stream_state.previous(x, slot_t, reset)
            if stream and self._fused_adaptation:
                adapt = self._fused_adaptation_of(model)
            elif stream and self._adaptation_kernels:  # in place on the table, two launches
                kernels = self._adaptation_kernels_of(model)
            elif self.guard:  # as torch ops; "change" and "level" models keep the streams' scales too (trainer's units)
                # The streams' adaptation rows; those starting over (new, reset, reused slot) from the initial row.
                rows = self.store.adaptation.index_select(0, slot_t)
                if reset is not None:
                    rows[reset] = self.store.adaptation_init
                ring = None if self.store.seasonal is None else Ring(self.store.seasonal, slot_t)
                rows = adapt_begin(self.layout, rows, x, dx, model.columns, ring)
            if kernels is not None:
                inputs = kernels.begin(slot_t, reset, x, dx)
            elif stream:
                inputs = dx if adapt is not None else adaptation.stream_inputs(dx, rows[:, self.layout.field("scale")])
            elif norm is not None:  # "change" or "level"; "stream" with the guard off: one scale for every stream
                inputs = dx / norm.delta_scale if norm.inputs == "stream" else norm.lstm_inputs(x, dx)
        if self._cpu_step is not None:  # the step and the head (and `adapt`), on the rows each thread just computed
            out = self._cpu_step(model, inputs, slot_t, self.store.h, self.store.c, reset, adapt, x.contiguous())
        else:
            # The state store hands out distinct, in-range slots: skip the kernel's per-step check (a GPU sync).
            y = lstm_step_(
                inputs, slot_t, self.store.h, self.store.c, model.params, reset=reset, backend=self.backends.kernel,
                validate_slots=False,
            )
            weight, bias = model.head
            out = torch.addmm(bias, y, weight.t())
        if kernels is not None:
            out = kernels.finish(slot_t, x, out)
        elif stream and rows is not None:  # the guard: last value + the shrunk predicted change
            out = adapt_finish(self.layout, rows, x, out, model.columns, ring)
        elif norm is not None and adapt is None:
            out = norm.predictions(x, out, model.columns)  # the forecast columns' last values + changes
        if rows is not None:
            self.store.adaptation.index_copy_(0, slot_t, rows)
        return self.task.replies(out).cpu().numpy()
