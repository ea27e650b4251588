"""A really full disk: the state directory on a tiny tmpfs (skipped where mounting one is not allowed).

The write-ahead log's append fails with ENOSPC: the batch is answered `rejected` with the reason, nothing of
it is applied, a snapshot request fails with a clear error, and once space is freed the same sequence
numbers are applied (not `duplicate`: they never were).
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from lstmd.clients import Admin, DaemonError, Producer, RejectedError


@pytest.fixture
def tiny_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory) -> int:
    """Write a filler file until the file system is full; returns its size."""
    chunk = b"\0" * 4096
    written = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk)
        except OSError as exc:
            assert exc.errno == 28, exc
    return written


def test_full_disk_rejects_events_and_recovers_when_space_returns(tiny_fs, make_daemon):
    state = tiny_fs / "state"
    daemon = make_daemon(
        state_dir=state, **{"durability.wal": True, "durability.fsync": "always", "durability.snapshot_interval_s": 0}
    )
    admin = Admin(daemon.endpoints["control"])
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(500)]
    x = rng.standard_normal((500, 8)).astype(np.float32)  # 16 kB of features: more than a page of slack
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(ids, x, seqs=[0] * 500)
        assert _fill(tiny_fs) > 0
        with pytest.raises(RejectedError, match="No space left on device") as info:
            producer.send(ids, x, seqs=[1] * 500)
        assert set(info.value.result.status_names) == {"rejected"}
        assert admin.stream("s0")["events"] == 1  # nothing of the rejected batch was applied
        with pytest.raises(DaemonError, match="snapshot failed: No space left on device"):
            admin.snapshot()
        (tiny_fs / "filler").unlink()
        result = producer.send_detailed(ids, x, seqs=[1] * 500)
        assert set(result.status_names) == {"ok"}
    assert admin.stream("s0")["events"] == 2 and admin.stream("s0")["last_seq"] == 1
    assert admin.status()["durability"]["wal_error"] is None
    assert admin.snapshot()["streams"] == 500
