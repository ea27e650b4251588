"""Cluster mode's price and its failover time: one NATS server, one gateway, two replicas, against a single
`lstmd serve`, in the same run, on this machine.

Closed loop: `--producers` threads each own `--streams / producers` streams and send one event per stream per
message (`--events` per message), numbered, for `--seconds` each: events/s and the p50/p99 of a message's
round trip. Then one replica is killed -9 and a producer keeps sending messages that include the killed
member's streams: failover time = kill → first answered message (lease_ttl = `--ttl`).

    python benchmarks/cluster.py [--streams 10000] [--events 1000] [--producers 2] [--seconds 10] [--ttl 2]
                                 [--key-groups 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from lstmd.clients import Producer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(path: Path, events: str, state: Path, cluster: str) -> Path:
    path.write_text(
        f'[serve]\nevents = "{events}"\ncontrol = "tcp://127.0.0.1:*"\npublish = ""\nmetrics = ""\ndevice = "cpu"\n'
        f'[state]\ndir = "{state}"\ncapacity = 200000\n{cluster}'
    )
    return path


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lstmd.clients.cli", *args, "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115


_SEQS: dict[tuple[str, int], int] = {}  # (endpoint, producer) -> its streams' last sequence number


def _load(endpoint: str, streams: list[list[int]], events: int, seconds: float) -> tuple[float, np.ndarray]:
    """(events/s, message latencies in s) of closed-loop producers, one thread per stream set."""
    latencies: list[list[float]] = [[] for _ in streams]
    counts = [0] * len(streams)
    stop = time.perf_counter() + seconds

    def run(i: int) -> None:
        rng = np.random.default_rng(i)
        own = streams[i]
        with Producer(endpoint, timeout=120) as producer:
            seq = _SEQS.get((endpoint, i), 0)
            while time.perf_counter() < stop:
                seq += 1
                _SEQS[endpoint, i] = seq
                for start in range(0, len(own), events):
                    ids = own[start : start + events]
                    x = rng.standard_normal((len(ids), 8), dtype=np.float32)
                    t = time.perf_counter()
                    producer.send(ids, x, seqs=[seq] * len(ids))
                    latencies[i].append(time.perf_counter() - t)
                    counts[i] += len(ids)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - began), np.concatenate([np.array(x) for x in latencies])


def _wait_ready(state: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (state / "endpoints.json").exists():
        if time.monotonic() > deadline:
            log = state.with_suffix(".log")
            raise SystemExit(f"{state.name} did not come up: {log.read_text() if log.exists() else ''}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--key-groups", type=int, default=256)
    args = parser.parse_args()
    server = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    work = Path(tempfile.mkdtemp(prefix="lstmd-cluster-bench-"))
    nats_port = _port()
    url = f"nats://127.0.0.1:{nats_port}"
    procs = [subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(work / "nats")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(1)
    cluster = f'[cluster]\nnats = "{url}"\nlease_ttl = {args.ttl}\nkey_groups = {args.key_groups}\n'
    single_events, gw_events = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    try:
        single = _config(work / "single.toml", single_events, work / "single", "")
        procs.append(_start(["serve", "--config", str(single)], work / "single.log"))
        replicas = {}
        for name in ("r1", "r2"):
            config = _config(work / f"{name}.toml", "tcp://127.0.0.1:*", work / name, cluster + f'member = "{name}"\n')
            replicas[name] = _start(["serve", "--config", str(config)], work / f"{name}.log")
            procs.append(replicas[name])
        for state in ("single", "r1", "r2"):
            _wait_ready(work / state)
        gw = _config(work / "gw.toml", gw_events, work / "gw", cluster)
        procs.append(_start(["gateway", "--config", str(gw)], work / "gw.log"))
        time.sleep(3)  # the gateway connects; both replicas have claimed their key groups
        ids = list(range(args.streams))
        sets = [ids[i :: args.producers] for i in range(args.producers)]
        results = {}
        for label, endpoint in (("single", single_events), ("cluster", gw_events), ("single again", single_events)):
            _load(endpoint, sets, args.events, 2.0)  # warm: streams created, replicas caught up
            rate, lat = _load(endpoint, sets, args.events, args.seconds)
            results[label] = {"events_per_s": round(rate), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
                              "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1)}
            print(label, results[label], flush=True)
        # failover: r1 killed; one message over every stream must be answered by r2 after the lease expires
        from lstmd.daemon.cluster.log import key_group
        from lstmd.daemon.cluster.membership import assignment

        r1_groups = set(assignment({"r1", "r2"}, args.key_groups)["r1"])
        moved = [s for s in ids if key_group(s, args.key_groups) in r1_groups][: args.events]
        with Producer(gw_events, timeout=120) as producer:
            x = np.zeros((len(moved), 8), dtype=np.float32)
            replicas["r1"].send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            producer.send(moved, x)
            results["failover_s"] = round(time.perf_counter() - killed, 2)
        print("failover (kill -9 -> first answered message of moved streams):", results["failover_s"], "s")
        print(json.dumps(results))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
