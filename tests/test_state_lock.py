"""One daemon per state directory (daemon/state_lock.py): a second daemon refuses to start and touches nothing;
the kernel releases the lock when the holder dies, so a restart after kill -9 restores every acknowledged event.

The sequence of issue 12 runs with real `lstmd serve` subprocesses: daemon 1 (WAL on) serving, daemon 2 on the
same state.dir with other ports refused, kill -9 of daemon 1, restart, compare every stream's state and last seq.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lstmd.clients import Admin, Producer
from lstmd.clients.bench import free_tcp_port
from lstmd.daemon.server import StartupError
from lstmd.daemon.state_lock import LOCK_NAME, StateDirLocked, StateLock


def _lstmd() -> list[str]:
    exe = Path(sys.executable).with_name("lstmd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lstmd.clients.cli"]


def _tree(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a hash of its bytes: what 'deletes/changes nothing' compares."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_second_lock_on_the_same_directory_is_refused_with_the_holder(tmp_path):
    held = StateLock.acquire(tmp_path / "state")
    held.record({"control": "tcp://127.0.0.1:7001"})
    with pytest.raises(StateDirLocked) as refused:
        StateLock.acquire(tmp_path / "state")
    message = str(refused.value)
    assert str(tmp_path / "state" / LOCK_NAME) in message
    assert f"PID {os.getpid()}" in message and "control tcp://127.0.0.1:7001" in message
    held.release()
    StateLock.acquire(tmp_path / "state").release()  # released: free again, the file stays
    assert (tmp_path / "state" / LOCK_NAME).exists()


def test_an_unwritable_state_dir_is_reported_as_such(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StateDirLocked, match="is not writable"):
        StateLock.acquire(tmp_path / "file" / "state")


def test_a_second_daemon_in_process_refuses_and_changes_nothing(make_daemon, tmp_path):
    state = tmp_path / "shared"
    first = make_daemon(state_dir=state, **{"durability.wal": True})
    with Producer(first.endpoints["events"]) as producer:
        producer.send(["a", "b"], np.ones((2, 8), np.float32), seqs=[1, 1])
    before = _tree(state)
    with pytest.raises(StartupError) as refused:
        make_daemon(state_dir=state, **{"durability.wal": True})
    message = str(refused.value)
    assert str(state / LOCK_NAME) in message and f"PID {os.getpid()}" in message
    assert f"control {first.endpoints['control']}" in message
    assert _tree(state) == before
    first.stop_and_join()
    # The first daemon released the lock on its way out: a third one starts on the directory.
    third = make_daemon(state_dir=state, **{"durability.wal": True})
    assert Admin(third.endpoints["control"]).stream("a")["last_seq"] == 1


def _write_config(path: Path, state: Path) -> Path:
    path.write_text(
        "[model]\ninput_size = 3\nhidden_size = 16\n"
        "[serve]\nevents = 'tcp://127.0.0.1:*'\ncontrol = 'tcp://127.0.0.1:*'\npublish = ''\nmetrics = ''\n"
        "device = 'cpu'\n"
        f"[state]\ndir = '{state}'\ncapacity = 1000\n"
        "[durability]\nwal = true\n"
    )
    return path


def _serve(config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    with log.open("w") as out:
        return subprocess.Popen([*_lstmd(), "serve", "--config", str(config)], env=env, stdout=out, stderr=out)


def _wait_serving(proc: subprocess.Popen, state: Path, log: Path) -> dict[str, str]:
    """The daemon's endpoints, once its lock file says this process holds the directory with sockets bound."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            info = json.loads((state / LOCK_NAME).read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid and info.get("endpoints"):
            return info["endpoints"]
        time.sleep(0.1)
    raise AssertionError(f"daemon did not start within 120 s:\n{log.read_text()}")


def _feed(endpoint: str, first_seq: int, count: int) -> None:
    rng = np.random.default_rng(first_seq)
    with Producer(endpoint) as producer:
        for seq in range(first_seq, first_seq + count):
            ids = ["s0", "s1", 7]
            producer.send(ids, rng.standard_normal((3, 3)).astype(np.float32), seqs=[seq] * 3)


def _states(control: str) -> dict:
    admin = Admin(control, timeout=30)
    return {sid: {k: admin.stream(sid)[k] for k in ("last_seq", "events", "h", "c")} for sid in ("s0", "s1", 7)}


def test_issue_sequence_second_daemon_refused_then_kill_9_and_restart_lose_nothing(tmp_path):
    state = tmp_path / "state"
    config = _write_config(tmp_path / "lstmd.toml", state)
    first = _serve(config, tmp_path / "first.log")
    try:
        endpoints = _wait_serving(first, state, tmp_path / "first.log")
        _feed(endpoints["events"], 1, 40)
        assert Admin(endpoints["control"]).snapshot()
        _feed(endpoints["events"], 41, 40)  # after the snapshot: only the WAL holds these
        before_second = _tree(state)

        # Same config, so the same state.dir, on other ports.
        other_ports = [f"serve.{name}=tcp://127.0.0.1:{free_tcp_port()}" for name in ("events", "control")]
        second = subprocess.run(
            [*_lstmd(), "serve", "--config", str(config), "--set", other_ports[0], "--set", other_ports[1]],
            env={k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0
        assert str(state / LOCK_NAME) in second.stderr
        assert f"PID {first.pid}" in second.stderr and endpoints["control"] in second.stderr
        assert "Traceback" not in second.stderr
        assert _tree(state) == before_second  # no snapshot, WAL segment or endpoints.json deleted or rewritten

        _feed(endpoints["events"], 81, 40)  # the first daemon still serves, unaware of the attempt
        acknowledged = _states(endpoints["control"])
        assert acknowledged["s0"]["last_seq"] == 120
        first.send_signal(signal.SIGKILL)
        first.wait(30)

        restarted = _serve(config, tmp_path / "restarted.log")
        try:
            again = _wait_serving(restarted, state, tmp_path / "restarted.log")
            assert _states(again["control"]) == acknowledged
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
