"""daemon/stall_dump.py: the threads' stacks in the log when the serving loop stalls, and only then."""

from __future__ import annotations

import os
import threading
import time

from lstmd.daemon.stall_dump import StallDump


def _read_all(fd_read: int, fd_write: int) -> str:
    os.close(fd_write)
    chunks = []
    while chunk := os.read(fd_read, 1 << 16):
        chunks.append(chunk)
    os.close(fd_read)
    return b"".join(chunks).decode(errors="replace")


def test_a_stalled_loop_gets_every_threads_stack_written():
    r, w = os.pipe()
    dump = StallDump(0.3, fd=w)
    busy = threading.Event()

    def other_thread_holding_on():
        busy.wait(5)

    t = threading.Thread(target=other_thread_holding_on, name="other")
    t.start()
    dump.beat()
    time.sleep(1.0)  # the loop "stalls": no beat
    dump.cancel()
    busy.set()
    t.join()
    text = _read_all(r, w)
    assert "Timeout" in text, text
    # both threads' stacks: this test (the loop) and the other thread, by function name
    assert "test_a_stalled_loop_gets_every_threads_stack_written" in text and "other_thread_holding_on" in text


def test_a_beating_loop_writes_nothing_and_cancel_disarms():
    r, w = os.pipe()
    dump = StallDump(1.5, fd=w)
    until = time.monotonic() + 3.0
    while time.monotonic() < until:  # twice the stall time, beating every 50 ms
        dump.beat()
        time.sleep(0.05)
    assert dump.armed
    dump.cancel()
    assert not dump.armed
    time.sleep(2.0)  # past the last arm's deadline: cancelled, so still nothing
    assert _read_all(r, w) == ""


def test_off_by_default_costs_nothing():
    dump = StallDump(0.0)
    dump.beat()
    assert not dump.armed
