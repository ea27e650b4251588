"""Synthetic multi-stream workloads: noisy periodic series with drift, one row of features per stream per tick.

Used by `lstmd demo`, `lstmd bench` and the learning benchmark. numpy only.
"""

from __future__ import annotations

import numpy as np


class PeriodicStreams:
    """`n` streams of `dim` channels: sinusoids with per-stream frequency/phase/offset, a slow drift, noise.

    `shift()` changes every stream's frequencies and offsets at once (a regime change).
    """

    def __init__(self, n: int, dim: int, seed: int = 0, noise: float = 0.05, drift: float = 1e-3) -> None:
        self.rng = np.random.default_rng(seed)
        self.n, self.dim, self.noise, self.drift = n, dim, noise, drift
        self.t = 0
        self.ids = list(range(n))
        self._draw_regime()

    def _draw_regime(self) -> None:
        shape = (self.n, self.dim)
        self.freq = self.rng.uniform(0.05, 0.3, shape)
        self.phase = self.rng.uniform(0, 2 * np.pi, shape)
        self.offset = self.rng.normal(0, 0.5, shape)
        self.amplitude = self.rng.uniform(0.5, 1.5, shape)

    def shift(self) -> None:
        """Regime change: new frequencies, amplitudes and offsets for every stream."""
        self._draw_regime()

    def next(self) -> np.ndarray:
        """The next event of every stream: [n, dim] float32."""
        t = self.t
        self.t += 1
        values = self.offset + self.drift * t + self.amplitude * np.sin(self.freq * t + self.phase)
        values += self.noise * self.rng.standard_normal(values.shape)
        return values.astype(np.float32)
