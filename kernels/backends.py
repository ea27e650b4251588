"""Which implementation runs the serving step and the trainer's sequence: one decision, from `serve.backend`.

    serve.backend   device   step (Engine)                        sequence (Trainer)
    auto            cpu      "cpu": kernels/cpu_step.py            "torch-native": torch's own LSTM op (oneDNN)
                             (fused C kernel, or torch ops)        with the trainer's weights (functional_call)
    auto            cuda     "triton" ("torch" past H = 512)       "triton" ("torch" past H = 512)
    torch           any      "torch": kernels/reference.py         "torch": kernels/reference.py
    triton          cuda     "triton"                              "triton"
    triton          cpu      "triton" through TRITON_INTERPRET=1   "triton" through the interpreter

On the CPU, "auto" picks the daemon's own step (prepared weights, chunks, the fused C kernel, waves split over
threads; several times the reference kernel and head, docs/benchmarks.md) and torch's native LSTM op for
training (~3x the reference's Python time loop forward + backward); "torch" still selects the reference itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lstmd.kernels import _checks

SETTINGS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Backends:
    step: str  # "cpu", "torch" or "triton"
    sequence: str  # "torch-native", "torch" or "triton"

    @property
    def kernel(self) -> str | None:
        """What lstm_step_ / lstm_sequence get as backend= where the step or sequence uses them."""
        return self.step if self.step in _checks.BACKENDS else None


def select_backends(setting: str, device: torch.device, hidden_size: int | None = None) -> Backends:
    """The step and sequence implementations for `serve.backend = setting` on `device` (ValueError if unusable).
    "auto" on CUDA serves a model whose hidden size is past the Triton kernels' limit through "torch"."""
    if setting not in SETTINGS:
        raise ValueError(f"serve.backend: expected one of {', '.join(SETTINGS)}, got {setting!r}")
    too_wide = hidden_size is not None and hidden_size > _checks.TRITON_MAX_HIDDEN
    if setting == "auto":
        if device.type == "cpu":
            return Backends(step="cpu", sequence="torch-native")
        setting = "torch" if too_wide else _checks.resolve_backend(None, device)
    elif setting == "triton" and too_wide:
        raise ValueError(
            f"serve.backend = triton: model.hidden_size = {hidden_size} is past the Triton kernels' limit of "
            f"{_checks.TRITON_MAX_HIDDEN}; serve.backend = auto serves it with the torch backend"
        )
    else:
        _checks.resolve_backend(setting, device)  # "triton" on the CPU needs the interpreter: say so now
    return Backends(step=setting, sequence=setting)
