"""One daemon per state directory: an exclusive OS file lock on `<state.dir>/lstmd.lock`.

Two daemons sharing a state directory overwrite each other's snapshots, WAL segments and endpoints.json, and a
restart can then restore the wrong daemon's state (acknowledged events lost). The daemon takes this lock before it
reads or writes anything else in the directory and holds the file open for its whole life. `flock` belongs to the
open file, so the kernel releases it when the process dies in any way (kill -9 included): there is no stale lock
to clean up, and the file itself is never deleted (unlinking it would let a third process lock a fresh inode
while the second still holds the old one).

The file's content is informational only (the lock is the flock, not the content): the holder's PID and, once its
sockets are bound, its endpoints, so a refused second daemon can say who holds the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

LOCK_NAME = "lstmd.lock"


class StateDirLocked(RuntimeError):
    """The state directory is locked by another daemon, or the lock file cannot be created; the message says which."""


class StateLock:
    """The held lock on one state directory; `release()` (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path) -> StateLock:
        """Create the directory if needed and lock it without waiting; StateDirLocked names the holder if taken."""
        path = Path(directory) / LOCK_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_CLOEXEC (Python's default): a child process (a subprocess the daemon starts) never inherits the lock.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateDirLocked(
                f"state.dir {directory} is not writable: cannot create {path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise StateDirLocked(
                f"state.dir {directory} is in use by another lstmd daemon ({holder}): {path} is locked. "
                "Stop that daemon first, or give this one its own state.dir."
            ) from None
        lock = cls(path, fd)
        lock.record({})
        return lock

    def record(self, endpoints: dict[str, str]) -> None:
        """Write this process's PID and endpoints into the lock file, for a refused second daemon to report."""
        if self._fd is None:
            return
        data = json.dumps({"pid": os.getpid(), "started": time.time(), "endpoints": endpoints}).encode()
        # Write first, then cut: a reader never sees an empty file in between, only (briefly) a longer tail.
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        """Close the file, which drops the lock; the file stays (see the module docstring)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _describe_holder(fd: int) -> str:
    """'PID 123, events tcp://..., control tcp://...' from the holder's lock file, as far as it says."""
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        pid, endpoints = info.get("pid"), info.get("endpoints") or {}
    except (OSError, ValueError, AttributeError):
        return "PID unknown"
    parts = [f"PID {pid}" if pid else "PID unknown"]
    parts += [f"{name} {endpoint}" for name, endpoint in endpoints.items()]
    if not endpoints:
        parts.append("still starting: no endpoints bound yet")
    return ", ".join(parts)
