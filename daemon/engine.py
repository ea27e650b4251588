"""The inference step: one kernel launch advancing a wave of streams, then the output head.

Holds the serving model on the device. Swapping `engine.model` for a new `ServingModel` between two batches is
how new weights are published: the loop reads the reference once per wave, so a swap never tears a wave.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from lstmd.daemon.model import ServingModel
from lstmd.daemon.normalization import AdaptationLayout, adapt_begin, adapt_finish
from lstmd.daemon.state_store import StateStore
from lstmd.kernels import lstm_step_
from lstmd.kernels.backends import Backends, select_backends
from lstmd.kernels.cpu_step import CpuStep
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
    ) -> None:
        self.device = device
        if device.type == "cpu":
            set_torch_threads(cpu_threads)  # process-wide; see serve.cpu_threads in daemon/config.py
        self.model = model.to(device)
        self.store = store
        self.backends: Backends = select_backends(backend, device)  # kernels/backends.py: the one decision
        # step_threads 0: one per core this process may run on, at most 4 (serve.step_threads).
        threads = step_threads or min(4, len(os.sched_getaffinity(0)))
        self._cpu_step = CpuStep(threads) if self.backends.step == "cpu" else None
        # Forecast models see each stream's change since its previous event (daemon/normalization.py): the last
        # event of every slot, [capacity, I], kept next to the state tables and updated by every step. NaN marks
        # "not known" (start, or a restore that did not bring it back): that event's change counts as 0.
        spec = model.spec
        self.last_x = (
            torch.full((store.capacity, spec.input_size), float("nan"), device=device)
            if spec.task == "forecast"
            else None
        )
        self.layout = None
        if self.last_x is not None:  # per-stream scale and guard (normalization.py): kept for every forecast model
            self.layout = AdaptationLayout(spec.input_size, spec.output_size)
            store.enable_adaptation(self.layout.initial_row())

    @property
    def backend_name(self) -> str:
        return self.backends.step if self._cpu_step is None else self._cpu_step.name

    def snapshot_tensors(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forecast tasks: the last event of each of `slots` (CPU copy), for the snapshot; else nothing."""
        if self.last_x is None:
            return {}
        return {"last_x": self.last_x.index_select(0, slots.to(self.device)).cpu()}

    def restore_tensors(self, tensors: dict[str, torch.Tensor], slots: torch.Tensor) -> None:
        """Put back what snapshot_tensors(slots) returned (same slots, after the state store's restore)."""
        if self.last_x is not None and "last_x" in tensors:
            self.last_x.index_copy_(0, slots.to(self.device), tensors["last_x"].to(self.device))

    def close(self) -> None:
        """Stop the CPU step's threads (the daemon's shutdown)."""
        if self._cpu_step is not None:
            self._cpu_step.close()

    def swap_model(self, model: ServingModel) -> None:
        self.model = model.to(self.device)

    @torch.inference_mode()
    def step(self, features: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """Advance the streams at `slots` (distinct) by one event each; return predictions [n, O] float32."""
        model = self.model
        x = torch.from_numpy(features).to(self.device, non_blocking=True)
        slot_t = torch.from_numpy(slots).to(self.device, non_blocking=True)
        reset = torch.from_numpy(fresh).to(self.device, non_blocking=True) if fresh.any() else None
        inputs, rows = x, None
        if self.last_x is not None:  # forecast: the change since each stream's previous event (0 at its first)
            previous = self.last_x.index_select(0, slot_t)
            unknown = previous.isnan()
            if reset is not None:
                unknown |= reset.unsqueeze(1)
            previous = torch.where(unknown, x, previous)
            self.last_x.index_copy_(0, slot_t, x)
            dx = x - previous
            # The streams' adaptation rows; those starting over (new, reset, reused slot) from the initial row.
            rows = self.store.adaptation.index_select(0, slot_t)
            if reset is not None:
                rows[reset] = self.store.adaptation_init
            rows = adapt_begin(self.layout, rows, x, dx, model.columns)
        norm = model.normalization
        if norm is not None:
            inputs = norm.lstm_inputs(x, dx, rows[:, self.layout.field("scale")])
        if self._cpu_step is not None:  # the step and the head, on the rows each thread just computed
            out = self._cpu_step(model, inputs, slot_t, self.store.h, self.store.c, reset)
        else:
            # The state store hands out distinct, in-range slots: skip the kernel's per-step check (a GPU sync).
            y = lstm_step_(
                inputs, slot_t, self.store.h, self.store.c, model.params, reset=reset, backend=self.backends.kernel,
                validate_slots=False,
            )
            weight, bias = model.head
            out = torch.addmm(bias, y, weight.t())
        if norm is not None and norm.inputs == "stream":  # the guard: last value + the shrunk predicted change
            out = adapt_finish(self.layout, rows, x, out, model.columns)
        elif norm is not None:
            out = norm.predictions(x, out, model.columns)  # the forecast columns' last values + changes
        if rows is not None:
            self.store.adaptation.index_copy_(0, slot_t, rows)
        if model.spec.task == "classification":  # replies are class probabilities, as a Keras softmax head's
            out = out.softmax(-1)
        return out.cpu().numpy()
