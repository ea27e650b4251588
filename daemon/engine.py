"""The inference step: one kernel launch advancing a wave of streams, then the output head.

Holds the serving model on the device. Swapping `engine.model` for a new `ServingModel` between two batches is
how new weights are published: the loop reads the reference once per wave, so a swap never tears a wave.
"""

from __future__ import annotations

import numpy as np
import torch
from lstmd.daemon.cpu_step import CpuStep
from lstmd.daemon.model import ServingModel
from lstmd.daemon.state_store import StateStore
from lstmd.kernels import lstm_step_


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("serve.device = cuda, but PyTorch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


class Engine:
    def __init__(
        self, model: ServingModel, store: StateStore, device: torch.device, backend: str, cpu_threads: int = 0
    ) -> None:
        self.device = device
        if device.type == "cpu" and cpu_threads > 0:
            torch.set_num_threads(cpu_threads)  # process-wide; see serve.cpu_threads in daemon/config.py
        self.model = model.to(device)
        self.store = store
        # "auto" lets the kernels pick: Triton for CUDA tensors, the PyTorch reference on the CPU.
        self.backend = None if backend == "auto" else backend
        # On the CPU, "auto" serves with the daemon's own step (prepared weights, chunks, no per-call
        # allocation): 2-3x the reference kernel at the batch sizes it serves (daemon/cpu_step.py); "torch"
        # still selects the reference kernel itself.
        self._cpu_step = CpuStep() if device.type == "cpu" and self.backend is None else None

    @property
    def backend_name(self) -> str:
        if self.backend is not None:
            return self.backend
        return "triton" if self.device.type == "cuda" else "torch-cpu-step"

    def swap_model(self, model: ServingModel) -> None:
        self.model = model.to(self.device)

    @torch.inference_mode()
    def step(self, features: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """Advance the streams at `slots` (distinct) by one event each; return predictions [n, O] float32."""
        model = self.model
        x = torch.from_numpy(features).to(self.device, non_blocking=True)
        slot_t = torch.from_numpy(slots).to(self.device, non_blocking=True)
        reset = torch.from_numpy(fresh).to(self.device, non_blocking=True) if fresh.any() else None
        norm = model.normalization  # forecast models: standardised inputs, predicted change (normalization.py)
        inputs = x if norm is None else norm.inputs(x)
        if self._cpu_step is not None:
            y = self._cpu_step(model, inputs, slot_t, self.store.h, self.store.c, reset)
        else:
            y = lstm_step_(inputs, slot_t, self.store.h, self.store.c, model.params, reset=reset, backend=self.backend)
        weight, bias = model.head
        out = torch.addmm(bias, y, weight.t())
        if norm is not None:
            out = norm.predictions(x, out)
        return out.cpu().numpy()
