"""End-to-end load generator: drive a daemon (or the naive per-event server) and measure what comes back.

Owns the workload definition, the producer processes, the server processes it starts, and the numbers:
events/s counted from replies (every event is really sent and its reply decoded and checked), latency from
send to reply (p50/p99/p99.9), the server's CPU and RSS (psutil), and the daemon's mean batch size (from its
status counters). Imports no torch: producers are plain clients, and servers run in their own processes.

Timing: producers run `warmup_s`, then a measured window of `duration_s`; an event counts when its reply
arrives inside the window. Closed loop (`rate` = 0): each producer keeps `inflight` messages outstanding.
Open loop (`rate` > 0): messages leave on a fixed schedule and latency is measured from the *scheduled* send
time, so a server that falls behind is charged for the queueing it causes (no coordinated omission).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zmq
from lstmd.clients import protocol


@dataclass
class Workload:
    """What the producers send. `rate` is events/s offered in total; 0 means as fast as replies come back."""

    streams: int = 10_000
    input_size: int = 8
    hidden_size: int = 64
    num_layers: int = 1
    events_per_message: int = 1000
    duration_s: float = 10.0
    warmup_s: float = 2.0
    rate: float = 0.0
    # Messages outstanding per producer (closed loop). Enough to cover more than one serving batch: with 4 x
    # 1,000 events the daemon's ~2,000-event batches left it waiting on the producer's round trip (Little's
    # law), and the run measured that window as much as the server (docs/benchmarks.md, "End to end").
    inflight: int = 8
    producers: int = 1  # producer processes
    id_kind: str = "int"  # "int" or "str" stream ids
    seed: int = 0

    def stream_ids(self, producer: int) -> list:
        """This producer's streams: every `producers`-th id, so each stream has one sender (order kept)."""
        ids = range(producer, self.streams, self.producers)
        return [f"s{i}" for i in ids] if self.id_kind == "str" else list(ids)


@dataclass
class RunResult:
    """The numbers of one measured run against one server."""

    server: str  # "lstmd" or "naive"
    events: int  # events answered inside the measured window
    seconds: float  # length of the measured window
    events_per_s: float
    messages: int
    errors: int  # events answered with rejected/duplicate status, or wrong-shaped replies
    latency_ms: dict[str, float]  # p50, p99, p99.9, mean, max (send → reply)
    server_cpu_cores: float | None = None  # server process CPU seconds per wall second in the window
    server_rss_mib: float | None = None  # peak resident set size seen during the run
    server_rss_start_mib: float | None = None  # before the producers started (state tables still untouched)
    client_cpu_cores: float | None = None  # all producer processes: CPU seconds per wall second (whole run)
    # Inside the daemon, receipt by its I/O thread → reply handed back, from its Prometheus histogram in the
    # window (bucket upper bounds, so "≤ this"); only when the bench started the daemon itself.
    daemon_latency_ms: dict[str, float] | None = None
    # Share of the machine's CPU time the hypervisor gave to other guests during the window (steal time, from
    # /proc/stat via psutil): on a shared VM, runs with a high share measured the neighbours as much as lstmd.
    host_steal: float | None = None
    batch_mean: float | None = None  # events per serving batch in the window (daemon status counters)
    batches: int | None = None
    workload: dict = field(default_factory=dict)


def _percentiles(latencies_s: np.ndarray) -> dict[str, float]:
    if latencies_s.size == 0:
        return {"p50": float("nan"), "p99": float("nan"), "p99.9": float("nan"), "mean": float("nan"), "max": 0}
    q = np.percentile(latencies_s, [50, 99, 99.9]) * 1e3
    return {
        "p50": round(float(q[0]), 3),
        "p99": round(float(q[1]), 3),
        "p99.9": round(float(q[2]), 3),
        "mean": round(float(latencies_s.mean() * 1e3), 3),
        "max": round(float(latencies_s.max() * 1e3), 3),
    }


# ---- producer processes -------------------------------------------------------------------------------------


def _start_signal(out, index: int, go, window) -> tuple[float, float]:
    """Tell the parent this producer is set up, wait for the start; return (t_measure, t_stop)."""
    out.put(("ready", index))
    if not go.wait(120):
        raise RuntimeError("the bench never started the producers")
    return window[0], window[1]


def _connect(endpoint: str, kind: int, client_keys: dict | None = None) -> tuple[zmq.Context, zmq.Socket]:
    """A producer process's own context and socket, connected to the server under test (CURVE with keys)."""
    from lstmd.clients.curve import apply_client_curve

    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    apply_client_curve(sock, **(client_keys or {"server_key": None, "client_key": None}))
    sock.connect(endpoint)
    return ctx, sock


def _report(out, ctx, sock, started: float, events: int, errors: int, messages: int, latencies: list) -> None:
    """Close a producer's socket and put its numbers (and its own CPU time) on `out` for the bench."""
    sock.close(linger=0)
    ctx.term()
    out.put(
        {
            "events": events,
            "errors": errors,
            "messages": messages,
            "latencies": np.asarray(latencies),
            "cpu_s": time.process_time(),
            "wall_s": time.perf_counter() - started,
        }
    )


def _lstmd_producer(endpoint: str, workload: Workload, index: int, go, window, out, client_keys=None) -> None:
    """One producer process: DEALER, `inflight` messages outstanding or a fixed schedule; results on `out`."""
    started = time.perf_counter()
    ctx, sock = _connect(endpoint, zmq.DEALER, client_keys)
    ids = workload.stream_ids(index)
    per_message = max(1, min(workload.events_per_message, len(ids)))
    chunks = [ids[k : k + per_message] for k in range(0, len(ids), per_message)]
    rng = np.random.default_rng(workload.seed + index)
    pool = [rng.standard_normal((per_message, workload.input_size), dtype=np.float32) * 0.5 for _ in range(8)]
    open_loop = workload.rate > 0
    interval = per_message * workload.producers / workload.rate if open_loop else 0.0
    max_outstanding = workload.inflight if not open_loop else 10_000  # open loop: bounded to protect memory
    outstanding: dict[int, tuple[float, int]] = {}  # req -> (send or scheduled time, events)
    latencies: list[float] = []
    events = messages = errors = 0
    req = chunk = 0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    t_measure, t_stop = _start_signal(out, index, go, window)
    next_send = time.perf_counter()
    while True:
        now = time.perf_counter()
        sending = now < t_stop
        if not sending and (not outstanding or now > t_stop + 10):
            break
        while sending and len(outstanding) < max_outstanding and (not open_loop or next_send <= now):
            streams = chunks[chunk]
            chunk = (chunk + 1) % len(chunks)
            req += 1
            features = pool[req % len(pool)][: len(streams)]
            sock.send_multipart(protocol.encode_events(req, streams, features), copy=False)
            outstanding[req] = (next_send if open_loop else time.perf_counter(), len(streams))
            next_send += interval
            now = time.perf_counter()
        wait_ms = 100
        if open_loop and sending:
            # Round up: a 0 ms poll before the next send would spin on a core the server needs.
            wait_ms = max(0, math.ceil((next_send - time.perf_counter()) * 1000))
        if not poller.poll(wait_ms):
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            arrived = time.perf_counter()
            reply, preds = protocol.decode_reply([f.buffer for f in frames])
            sent_at, n = outstanding.pop(reply.req)
            status = np.frombuffer(reply.status, dtype=np.uint8)
            bad = (
                n
                if reply.error is not None or preds is None or preds.shape[0] != n
                else int(np.count_nonzero((status == protocol.REJECTED) | (status == protocol.DUPLICATE)))
            )
            if t_measure <= arrived <= t_stop:
                events += n - bad
                errors += bad
                messages += 1
                latencies.append(arrived - sent_at)
    _report(out, ctx, sock, started, events, errors, messages, latencies)


def _naive_producer(endpoint: str, workload: Workload, index: int, go, window, out) -> None:
    """One client of the naive server: REQ, one JSON message per event, waiting for each reply."""
    started = time.perf_counter()
    ctx, sock = _connect(endpoint, zmq.REQ)
    ids = workload.stream_ids(index)
    rng = np.random.default_rng(workload.seed + index)
    rows = (rng.standard_normal((1024, workload.input_size), dtype=np.float32) * 0.5).tolist()
    latencies: list[float] = []
    events = errors = 0
    k = 0
    t_measure, t_stop = _start_signal(out, index, go, window)
    while True:
        now = time.perf_counter()
        if now >= t_stop:
            break
        sock.send(json.dumps({"stream": ids[k % len(ids)], "x": rows[k % len(rows)]}).encode())
        k += 1
        if not sock.poll(10_000):
            errors += 1
            break
        reply = json.loads(sock.recv())
        arrived = time.perf_counter()
        if t_measure <= arrived <= t_stop:
            if len(reply.get("y", ())) == 1:
                events += 1
            else:
                errors += 1
            latencies.append(arrived - now)
    _report(out, ctx, sock, started, events, errors, events, latencies)  # one event per message


# This interpreter's `lstmd`, whether or not the entry-point script is on PATH.
LSTMD_COMMAND = [sys.executable, "-m", "lstmd.clients.cli"]


def free_tcp_port() -> int:
    """A loopback TCP port that is free now: for a daemon that must keep its endpoints across restarts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- servers ------------------------------------------------------------------------------------------------


class _Server:
    """A server process the bench started (or only its pid, for one it targets), with RSS sampling."""

    def __init__(self, pid: int | None, proc: subprocess.Popen | None = None) -> None:
        self.proc = proc
        self.ps = None
        if pid is not None:
            with contextlib.suppress(Exception):
                import psutil

                self.ps = psutil.Process(pid)
        self.rss_peak = 0
        self._sampling = False
        self._sampler: threading.Thread | None = None

    def cpu_seconds(self) -> float | None:
        if self.ps is None:
            return None
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self) -> int | None:
        if self.ps is None:
            return None
        return self.ps.memory_info().rss

    def start_sampling(self) -> None:
        if self.ps is None:
            return
        self._sampling = True

        def sample() -> None:
            while self._sampling:
                with contextlib.suppress(Exception):
                    self.rss_peak = max(self.rss_peak, self.ps.memory_info().rss)
                time.sleep(0.1)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop_sampling(self) -> None:
        self._sampling = False
        if self._sampler is not None:
            self._sampler.join()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_daemon(
    workload: Workload, state_dir: Path, overrides: list[str] | None = None, env=None, log: Path | None = None
):
    """Start `lstmd serve` as a subprocess on ephemeral loopback ports; return (server, endpoints). Its stderr (the
    log, and any stall dump: daemon/stall_dump.py) goes to `log`, appended, or to a file in `state_dir`: a file,
    not a pipe nobody reads, which would block a daemon that logs more than the pipe holds."""
    sets = [
        "serve.events=tcp://127.0.0.1:*",
        "serve.control=tcp://127.0.0.1:*",
        "serve.publish=",
        "serve.metrics=127.0.0.1:0",
        "serve.device=cpu",
        f"state.dir={state_dir}",
        f"state.capacity={max(workload.streams, 1)}",
        f"model.input_size={workload.input_size}",
        f"model.hidden_size={workload.hidden_size}",
        f"model.num_layers={workload.num_layers}",
        "model.output_size=1",
        "model.task=regression",
        *(overrides or []),
    ]
    cmd = [*LSTMD_COMMAND, "serve", "--log-level", "warning"]
    for s in sets:
        cmd += ["--set", s]
    state_dir.mkdir(parents=True, exist_ok=True)
    log = log or state_dir / "daemon.log"
    with open(log, "a") as stderr:
        stderr.write(f"--- {' '.join(cmd)}\n")
        stderr.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    endpoints_file = state_dir / "endpoints.json"
    deadline = time.monotonic() + 120
    while not endpoints_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"lstmd serve exited with {proc.returncode}: {log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("lstmd serve did not write endpoints.json within 120 s")
        time.sleep(0.05)
    time.sleep(0.05)  # the file is written just before the loop starts
    return _Server(proc.pid, proc), json.loads(endpoints_file.read_text())


def start_naive(workload: Workload) -> tuple[_Server, str]:
    cmd = [
        sys.executable,
        "-m",
        "lstmd.clients.naive_server",
        "--input-size",
        str(workload.input_size),
        "--hidden-size",
        str(workload.hidden_size),
        "--num-layers",
        str(workload.num_layers),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    endpoint = proc.stdout.readline().strip()
    if not endpoint:
        proc.wait()
        raise RuntimeError(f"the naive server exited with {proc.returncode} before binding")
    return _Server(proc.pid, proc), endpoint


# ---- one measured run ----------------------------------------------------------------------------------------


def _daemon_counters(control: str | None, client_keys: dict | None = None) -> tuple[int, int] | None:
    """(batches, events answered) from the daemon's status, or None without a control endpoint."""
    if not control:
        return None
    status = daemon_status(control, client_keys)
    return int(status["batches"]), int(sum(status["events"].values()))


def _collect(out, procs, count: int | None = None) -> list:
    """`count` items from the producers (default: one each); a producer that dies first is an error, not a hang."""
    import queue

    results: list = []
    deadline = time.monotonic() + 120
    while len(results) < (len(procs) if count is None else count):
        try:
            results.append(out.get(timeout=0.5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"{len(procs) - len(results)} producer process(es) gave no result "
                    f"(exit codes {[p.exitcode for p in procs]})"
                ) from None
    return results


def _scrape_latency(metrics: str | None) -> list[tuple[float, float]] | None:
    """Cumulative (upper bound s, count) buckets of lstmd_event_latency_seconds from the daemon's /metrics."""
    if not metrics:
        return None
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    buckets = []
    for line in text.splitlines():
        if line.startswith("lstmd_event_latency_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def _bucket_quantiles(before, after) -> dict[str, float] | None:
    if not before or not after:
        return None
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return None
    out = {}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        le = next(le for le, c in counts if c >= q * total)
        out[name] = le * 1e3
    return out


def measure(
    server_name: str,
    endpoint: str,
    workload: Workload,
    server: _Server,
    control: str | None = None,
    metrics: str | None = None,
    client_keys: dict | None = None,
):
    """Run the producers against `endpoint` for warmup + duration and collect a RunResult.

    client_keys: server_key/client_key (lstmd.clients.curve) for a daemon with CURVE security; the name
    `server_name` is reported as given (e.g. "lstmd+curve")."""
    target = _naive_producer
    if server_name.startswith("lstmd"):
        target = functools.partial(_lstmd_producer, client_keys=client_keys)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    window = ctx.Array("d", 2, lock=False)  # (t_measure, t_stop), perf_counter: CLOCK_MONOTONIC, system-wide
    procs = [
        ctx.Process(target=target, args=(endpoint, workload, i, go, window, out), daemon=True)
        for i in range(workload.producers)
    ]
    rss_start = server.rss()
    for p in procs:
        p.start()
    # Start the clock only when every producer is set up (spawning one can take seconds on a loaded host).
    _collect(out, procs)
    t_measure = time.perf_counter() + workload.warmup_s
    t_stop = t_measure + workload.duration_s
    window[0], window[1] = t_measure, t_stop
    go.set()
    server.start_sampling()
    while time.perf_counter() < t_measure:
        time.sleep(0.01)
    counters0, cpu0, hist0 = _daemon_counters(control, client_keys), server.cpu_seconds(), _scrape_latency(metrics)
    steal0 = _steal_seconds()
    wall0 = time.perf_counter()
    while time.perf_counter() < t_stop:
        time.sleep(0.01)
    counters1, cpu1, hist1 = _daemon_counters(control, client_keys), server.cpu_seconds(), _scrape_latency(metrics)
    steal1 = _steal_seconds()
    wall1 = time.perf_counter()
    results = _collect(out, procs)
    for p in procs:
        p.join(30)
    server.stop_sampling()
    # Every event of a message shares that message's latency; messages have equal sizes, so percentiles
    # over messages are percentiles over events.
    latencies = np.concatenate([r["latencies"] for r in results]) if results else np.zeros(0)
    events = sum(r["events"] for r in results)
    batch_mean = batches = None
    if counters0 is not None and counters1 is not None:
        batches = counters1[0] - counters0[0]
        batch_mean = round((counters1[1] - counters0[1]) / batches, 1) if batches else None
    return RunResult(
        server=server_name,
        events=events,
        seconds=round(workload.duration_s, 3),
        events_per_s=round(events / workload.duration_s, 1),
        messages=sum(r["messages"] for r in results),
        errors=sum(r["errors"] for r in results),
        latency_ms=_percentiles(latencies),
        server_cpu_cores=None if cpu0 is None else round((cpu1 - cpu0) / (wall1 - wall0), 2),
        server_rss_mib=round(server.rss_peak / 2**20, 1) if server.rss_peak else None,
        server_rss_start_mib=None if rss_start is None else round(rss_start / 2**20, 1),
        client_cpu_cores=round(sum(r["cpu_s"] / r["wall_s"] for r in results), 2),
        host_steal=None
        if steal0 is None or steal1 is None
        else round((steal1 - steal0) / ((wall1 - wall0) * (os.cpu_count() or 1)), 3),
        batch_mean=batch_mean,
        daemon_latency_ms=_bucket_quantiles(hist0, hist1),
        batches=batches,
        workload=asdict(workload),
    )


def _steal_seconds() -> float | None:
    """CPU seconds stolen from this (virtual) machine since boot, all CPUs; None where the OS does not say."""
    import psutil

    return getattr(psutil.cpu_times(), "steal", None)


def run_lstmd(
    workload: Workload,
    events: str | None = None,
    control: str | None = None,
    overrides: list[str] | None = None,
    env: dict | None = None,
    curve: bool = False,
    client_keys: dict | None = None,
    daemon_log: Path | None = None,
) -> RunResult:
    """Measure lstmd: the daemon at `events`/`control` if given (`client_keys`: server_key/client_key when it
    runs with CURVE), else a fresh `lstmd serve` subprocess (with `curve`: with CurveZMQ security on every
    socket, keys made for the run; reported as "lstmd+curve"; `daemon_log`: its stderr, appended there)."""
    if events:
        pid = None
        if control:
            with contextlib.suppress(Exception):
                pid = int(daemon_status(control, client_keys)["pid"])
        return measure("lstmd", events, workload, _Server(pid), control, client_keys=client_keys)
    with tempfile.TemporaryDirectory(prefix="lstmd-bench-") as state_dir:
        client_keys, security = _curve_keys(Path(state_dir) / "keys") if curve else (None, [])
        server, endpoints = start_daemon(workload, Path(state_dir), [*security, *(overrides or [])], env, daemon_log)
        try:
            return measure(
                "lstmd+curve" if curve else "lstmd",
                endpoints["events"],
                workload,
                server,
                endpoints["control"],
                endpoints.get("metrics"),
                client_keys,
            )
        finally:
            server.stop()


def _curve_keys(root: Path) -> tuple[dict, list[str]]:
    """A server key and one admin client key under `root`: (the client's keys, the daemon's --set overrides).
    The producers use the admin key too: a role costs nothing per event (it is checked at connect)."""
    import zmq.auth

    (root / "admins").mkdir(parents=True)
    zmq.auth.create_certificates(root, "server")
    zmq.auth.create_certificates(root, "client")
    (root / "client.key").rename(root / "admins" / "client.key")
    overrides = [
        f"security.server_secret_key={root / 'server.key_secret'}",
        f"security.admin_keys_dir={root / 'admins'}",
    ]
    return {"server_key": str(root / "server.key"), "client_key": str(root / "client.key_secret")}, overrides


def daemon_status(control: str, client_keys: dict | None = None) -> dict:
    """The daemon's `status` (its model sizes, pid and counters)."""
    from lstmd.clients.admin import Admin

    return Admin(control, timeout=30, **(client_keys or {})).status()


def run_naive(workload: Workload) -> RunResult:
    """Measure the naive per-event server on the same workload (one event per message, REQ/REP).

    It gets at least two client processes, so it is never idle while a client builds its next request.
    """
    workload = Workload(**{**asdict(workload), "producers": max(2, workload.producers)})
    server, endpoint = start_naive(workload)
    try:
        return measure("naive", endpoint, workload, server)
    finally:
        server.stop()


def summarize(results: list[RunResult]) -> dict:
    """Plain data for --json and the table: machine, runs, and the lstmd/naive ratio when both ran."""
    import platform

    by_server = {r.server: r for r in results}
    ratio = curve_ratio = None
    if "lstmd" in by_server and "naive" in by_server and by_server["naive"].events_per_s > 0:
        ratio = round(by_server["lstmd"].events_per_s / by_server["naive"].events_per_s, 1)
    if "lstmd" in by_server and "lstmd+curve" in by_server and by_server["lstmd"].events_per_s > 0:
        curve_ratio = round(by_server["lstmd+curve"].events_per_s / by_server["lstmd"].events_per_s, 3)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "runs": [asdict(r) for r in results],
        "speedup_vs_naive": ratio,
        "curve_vs_plain": curve_ratio,  # events/s with CURVE on / off, same workload and invocation
    }
