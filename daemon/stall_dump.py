"""The serving loop's stall dump: the Python stacks of every thread, written to stderr (the daemon's log) when the
loop has not come round for `serve.stall_dump_s`.

The dump is written by faulthandler's own C thread, so it comes even while some thread holds the GIL (a long
compile, a C extension, a synchronisation): the stall is diagnosed from the log afterwards instead of being
reproduced. It was added for the first GPU run's training stalls (serving answered nothing for 4-6 s while the
trainer ran; docs/benchmarks.md, "GPU"), which no other signal explained.

Re-arming faulthandler's timer costs ~50 µs (it restarts a thread), so the loop re-arms it at most every
REARM_S: a dump comes after between stall_dump_s - REARM_S and stall_dump_s without a beat, once per stall.
faulthandler has one timer per process: with several daemons in one process (tests) the last to re-arm wins.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("lstmd.stall")

REARM_S = 0.5


def _stderr_fd() -> int | None:
    """stderr's file descriptor, or None where it has none (a test's captured stream falls back to the real one)."""
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            return stream.fileno()
    return None


class StallDump:
    def __init__(self, after_s: float, clock: Callable[[], float] = time.monotonic, fd: int | None = None) -> None:
        self.after_s = after_s
        self._clock = clock
        self._armed_at: float | None = None
        self._fd = (fd if fd is not None else _stderr_fd()) if after_s > 0 else None  # fd: tests' pipe
        if after_s > 0 and self._fd is None:
            log.warning("serve.stall_dump_s = %s, but stderr has no file descriptor: no stall dumps", after_s)

    @property
    def armed(self) -> bool:
        return self._armed_at is not None

    def beat(self) -> None:
        """The loop came round: push the dump back by after_s (at most every REARM_S)."""
        if self._fd is None:
            return
        now = self._clock()
        if self._armed_at is None or now - self._armed_at >= REARM_S:
            faulthandler.dump_traceback_later(self.after_s, repeat=False, file=self._fd)
            self._armed_at = now

    def cancel(self) -> None:
        """The loop stops (shutdown): no dump for the silence that follows."""
        if self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None
