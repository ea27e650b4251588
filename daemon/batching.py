"""Cross-stream micro-batching: turn a gathered batch of events into launches ("waves").

One launch advances a stream at most one step, so when a stream has k events in the batch its events go to
waves 0..k-1 in arrival order. Computed with numpy (a stable sort by slot), no per-event Python.
"""

from __future__ import annotations

import numpy as np


def occurrence_rank(slots: np.ndarray) -> np.ndarray:
    """For each event, how many earlier events of the batch have the same slot (0 for the first)."""
    n = slots.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    position = np.arange(n)
    starts_group = np.empty(n, dtype=bool)
    starts_group[0] = True
    np.not_equal(sorted_slots[1:], sorted_slots[:-1], out=starts_group[1:])
    group_start = np.maximum.accumulate(np.where(starts_group, position, 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = position - group_start
    return rank


def waves(slots: np.ndarray) -> list[np.ndarray]:
    """Event indices per launch: wave k holds every stream's k-th event, each wave in arrival order."""
    rank = occurrence_rank(slots)
    if rank.size == 0:
        return []
    top = int(rank.max())
    if top == 0:
        return [np.arange(slots.shape[0])]
    return [np.flatnonzero(rank == k) for k in range(top + 1)]
