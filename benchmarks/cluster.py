"""Cluster mode's price, its latency at half its rate, and a kill and a join: one NATS server, one gateway, two
replicas, against a single `lstmd serve`, in the same run, on this machine.

Closed loop: `--producers` threads each own `--streams / producers` streams and send one event per stream per
message (`--events` per message), numbered, for `--seconds` each: events/s and the p50/p99 of a message's round
trip, single-process before and after the cluster. Then both at half the cluster's rate (paced: each producer
sends on a schedule, latency counted from the scheduled time, so a stall is not hidden), and the CPU seconds
each process spent per event in the cluster's closed-loop phase (time accounting per stage: gateway, replicas,
nats-server, producers). Last a timeline (`--timeline` seconds, closed loop): replica r1 is killed -9 at a
quarter of it and r3 joins at a half; throughput and answer lag (the slowest round trip completed) per
`--bin` seconds go to OUT.json and a plot to OUT.png (`--out`). Failover time = kill -> the answer to a message
of 100 fresh streams in r1's key groups, sent by another producer at the kill (lease_ttl = `--ttl`; the new
owners restore r1's snapshots, taken every `--snapshot-interval` s, and replay the log from there).

    python benchmarks/cluster.py [--streams 10000] [--events 1000] [--producers 2] [--seconds 10] [--ttl 2]
                                 [--key-groups 256] [--log-partitions 4] [--snapshot-interval 10]
                                 [--timeline 30] [--out docs/cluster]
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
import psutil
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


def _load(endpoint: str, streams: list[list[int]], events: int, seconds: float, rate: float | None = None,
          events_at: list | None = None) -> tuple[float, np.ndarray]:
    """(events/s, message latencies in s) of `len(streams)` producers, closed loop, or paced at `rate` events/s
    in all (latency from each message's scheduled time). `events_at` gets (sent, answered, events) per message."""
    latencies: list[list[float]] = [[] for _ in streams]
    counts = [0] * len(streams)
    stop = time.perf_counter() + seconds

    def run(i: int) -> None:
        rng = np.random.default_rng(i)
        own = streams[i]
        interval = events * len(streams) / rate if rate else 0.0
        with Producer(endpoint, timeout=120) as producer:
            seq = _SEQS.get((endpoint, i), 0)
            due = time.perf_counter() + interval * i / len(streams)
            while time.perf_counter() < stop:
                seq += 1
                _SEQS[endpoint, i] = seq
                for start in range(0, len(own), events):
                    ids = own[start : start + events]
                    x = rng.standard_normal((len(ids), 8), dtype=np.float32)
                    if rate:
                        time.sleep(max(0.0, due - time.perf_counter()))
                    t = due if rate else time.perf_counter()
                    sent = time.perf_counter()
                    producer.send(ids, x, seqs=[seq] * len(ids))
                    done = time.perf_counter()
                    latencies[i].append(done - t)
                    counts[i] += len(ids)
                    due += interval
                    if events_at is not None:
                        events_at.append((sent, done, len(ids)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - began), np.concatenate([np.array(x) for x in latencies])


def _summary(rate: float, lat: np.ndarray) -> dict:
    return {"events_per_s": round(rate), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1)}


def _wait_ready(state: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (state / "endpoints.json").exists():
        if time.monotonic() > deadline:
            log = state.with_suffix(".log")
            raise SystemExit(f"{state.name} did not come up: {log.read_text() if log.exists() else ''}")
        time.sleep(0.2)


def _wait_settled(url: str, groups: int, members: set[str], timeout: float = 120) -> float:
    """Block until every key group's KV entry names the owner rendezvous hashing gives it among `members` (the
    replicas start together, so one may claim groups first and hand them over: measuring before the handovers end
    measures them, not the steady state). Returns the seconds waited."""
    import asyncio

    from lstmd.daemon.cluster.log import NatsLink
    from lstmd.daemon.cluster.membership import assignment
    from lstmd.daemon.cluster.ownership import open_buckets, read_entry

    want = {g: m for m, owned in assignment(members, groups).items() for g in owned}
    link = NatsLink(url, "bench-settle")

    async def settled() -> bool:
        kv, _ = await open_buckets(link.js)
        entries = await asyncio.gather(*(read_entry(kv, g) for g in range(groups)))
        return all(entry is not None and entry.owner == want[g] for g, (entry, _) in enumerate(entries))

    start = time.monotonic()
    try:
        while not link.run(settled()):
            if time.monotonic() - start > timeout:
                raise SystemExit(f"key groups not settled on {sorted(members)} after {timeout:g} s")
            time.sleep(0.5)
    finally:
        link.close()
    return time.monotonic() - start


def _cpu(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            t = p.cpu_times()
            out[name] = t.user + t.system
        except psutil.NoSuchProcess:
            out[name] = 0.0
    return out


def _timeline(gw: str, sets, args, replicas: dict, start_replica) -> dict:
    """Closed-loop load for args.timeline s: r1 killed -9 at 1/4, r3 started at 1/2."""
    events_at: list = []
    began = time.perf_counter()
    marks = {}

    from lstmd.daemon.cluster.log import key_group
    from lstmd.daemon.cluster.membership import assignment

    r1_groups = set(assignment({"r1", "r2"}, args.key_groups)["r1"])
    fresh = (s for s in range(args.streams, 100 * args.streams) if key_group(s, args.key_groups) in r1_groups)
    probe = [next(fresh) for _ in range(100)]

    def chaos() -> None:
        time.sleep(args.timeline / 4)
        with Producer(gw, timeout=120) as producer:
            replicas["r1"].send_signal(signal.SIGKILL)
            marks["kill"] = time.perf_counter()
            producer.send(probe, np.zeros((len(probe), 8), dtype=np.float32))
            marks["failover"] = time.perf_counter()
        time.sleep(max(0.0, marks["kill"] + args.timeline / 4 - time.perf_counter()))
        replicas["r3"] = start_replica("r3")
        marks["join"] = time.perf_counter()

    thread = threading.Thread(target=chaos)
    thread.start()
    _load(gw, sets, args.events, args.timeline, events_at=events_at)
    thread.join()
    edges = np.arange(0.0, args.timeline + 4 * args.bin, args.bin)
    done = np.array([d - began for _, d, _ in events_at])
    lat = np.array([d - s for s, d, _ in events_at])
    n = np.array([k for _, _, k in events_at])
    which = np.digitize(done, edges) - 1
    rate = np.bincount(which, weights=n, minlength=len(edges))[: len(edges) - 1] / args.bin
    lag = [float(lat[which == b].max()) if (which == b).any() else None for b in range(len(edges) - 1)]
    return {
        "t_s": [round(float(t), 3) for t in edges[:-1]],
        "events_per_s": [round(float(r)) for r in rate],
        "lag_s": [None if v is None else round(v, 4) for v in lag],
        "kill_s": round(marks["kill"] - began, 3),
        "join_s": round(marks["join"] - began, 3),
        "failover_s": round(marks["failover"] - marks["kill"], 3),
    }


def _plot(timeline: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    t = timeline["t_s"]
    ax.plot(t, np.array(timeline["events_per_s"]) / 1e3, color="tab:blue", label="answered events/s (k)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("thousand events/s answered", color="tab:blue")
    lag = ax.twinx()
    lag.plot(t, [np.nan if v is None else v for v in timeline["lag_s"]], color="tab:red", label="lag")
    lag.set_ylabel("lag: slowest round trip answered in the bin (s)", color="tab:red")
    for key, label in (("kill_s", "kill -9 r1"), ("join_s", "r3 starts")):
        ax.axvline(timeline[key], color="black", linestyle="--")
        ax.text(timeline[key], ax.get_ylim()[1] * 0.95, f" {label}", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--key-groups", type=int, default=256)
    parser.add_argument("--log-partitions", type=int, default=4)
    parser.add_argument("--snapshot-interval", type=float, default=10.0, help="cluster.snapshot_interval_s")
    parser.add_argument("--timeline", type=float, default=30.0, help="seconds; 0: no kill and join")
    parser.add_argument("--bin", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json (and OUT.png with a timeline)")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs and state (printed path)")
    parser.add_argument("--skip-closed", action="store_true", help="no closed-loop phases: pace at --rate")
    parser.add_argument("--rate", type=float, default=0.0, help="with --skip-closed: events/s offered")
    args = parser.parse_args()
    server = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    work = Path(tempfile.mkdtemp(prefix="lstmd-cluster-bench-"))
    nats_port = _port()
    url = f"nats://127.0.0.1:{nats_port}"
    procs = [subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(work / "nats")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(1)
    cluster = (f'[cluster]\nnats = "{url}"\nlease_ttl = {args.ttl}\nkey_groups = {args.key_groups}\n'
               f"log_partitions = {args.log_partitions}\nsnapshot_interval_s = {args.snapshot_interval}\n")
    single_events, gw_events = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    replicas: dict[str, subprocess.Popen] = {}

    def start_replica(name: str) -> subprocess.Popen:
        config = _config(work / f"{name}.toml", "tcp://127.0.0.1:*", work / name, cluster + f'member = "{name}"\n')
        proc = _start(["serve", "--config", str(config)], work / f"{name}.log")
        procs.append(proc)
        return proc

    try:
        single = _config(work / "single.toml", single_events, work / "single", "")
        procs.append(_start(["serve", "--config", str(single)], work / "single.log"))
        for name in ("r1", "r2"):
            replicas[name] = start_replica(name)
        for state in ("single", "r1", "r2"):
            _wait_ready(work / state)
        gw = _config(work / "gw.toml", gw_events, work / "gw", cluster)
        procs.append(_start(["gateway", "--config", str(gw)], work / "gw.log"))
        time.sleep(1)  # the gateway connects
        print(f"key groups settled on r1, r2 after {_wait_settled(url, args.key_groups, {'r1', 'r2'}):.1f} s",
              flush=True)
        ids = list(range(args.streams))
        sets = [ids[i :: args.producers] for i in range(args.producers)]
        watched = {"gateway": psutil.Process(procs[-1].pid), "r1": psutil.Process(replicas["r1"].pid),
                   "r2": psutil.Process(replicas["r2"].pid), "nats-server": psutil.Process(procs[0].pid),
                   "producers (this process)": psutil.Process()}
        results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "loadavg_before": psutil.getloadavg()}
        closed = () if args.skip_closed else (("single", single_events), ("cluster", gw_events),
                                              ("single again", single_events))
        for label, endpoint in closed:
            _load(endpoint, sets, args.events, 2.0)  # warm: streams created, replicas caught up
            before = _cpu(watched)
            rate, lat = _load(endpoint, sets, args.events, args.seconds)
            results[label] = _summary(rate, lat)
            if label == "cluster":
                spent = {k: v - before[k] for k, v in _cpu(watched).items()}
                events = rate * args.seconds
                results["cluster_cpu_us_per_event"] = {k: round(v / events * 1e6, 2) for k, v in spent.items()}
            print(label, results[label], flush=True)
        if args.skip_closed:  # warm: streams created, replicas caught up
            for endpoint in (gw_events, single_events):
                _load(endpoint, sets, args.events, 2.0)
        half = args.rate if args.skip_closed else results["cluster"]["events_per_s"] / 2
        if not args.skip_closed:
            print("cluster CPU per event (us):", results["cluster_cpu_us_per_event"], flush=True)
        for label, endpoint in (("cluster at half its rate", gw_events), ("single at that rate", single_events)):
            results[label] = _summary(*_load(endpoint, sets, args.events, args.seconds, rate=half))
            print(label, f"({half:.0f} events/s offered)", results[label], flush=True)
        if args.timeline:
            results["timeline"] = _timeline(gw_events, sets, args, replicas, start_replica)
            print("failover (kill -9 -> answer to a message of moved streams sent then):",
                  results["timeline"]["failover_s"], "s", flush=True)
        results["loadavg_after"] = psutil.getloadavg()
        if args.out is not None:
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
            if args.timeline:
                _plot(results["timeline"], args.out.with_suffix(".png"),
                      f"lstmd cluster (1 gateway, 2 replicas, G={args.key_groups}, P={args.log_partitions}, "
                      f"snapshots every {args.snapshot_interval:g} s)\n{args.producers} closed-loop producers x "
                      f"{args.events} events/message; failover {results['timeline']['failover_s']:.1f} s")
        print(json.dumps({k: v for k, v in results.items() if k != "timeline"}))
    finally:
        for group in (procs[1:], procs[:1]):  # nats-server last: the replicas hand their key groups over
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if args.keep:
            print("logs and state kept in", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
