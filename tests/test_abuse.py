"""Clients that misbehave on purpose: the daemon's memory stays within its documented bound
(docs/operations.md, "Memory bound"), other producers keep getting answers, control stays responsive, and a
failing I/O thread is carried on or reported by /healthz.

The byte budgets are tested on a bare `EventsSocket` with real sockets (exact counts); the whole picture against
a real `lstmd serve` subprocess (its RSS alone, not this process's), under a never-reading producer, a 200 MB
frame and a never-reading subscriber at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
import zmq
from lstmd.clients import Admin, Producer, protocol
from lstmd.daemon.io import _MIN_RCVHWM, _MIN_SNDHWM, FRAME_CAP_FACTOR, EventsBudgets, EventsSocket, PublishBudget
from prometheus_client.parser import text_string_to_metric_families

MiB = 2**20


def _dealer(ctx: zmq.Context, endpoint: str, **options) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


def _events(req: int, n: int = 10, first_stream: int = 0) -> list:
    features = np.ones((n, 8), np.float32)
    return protocol.encode_events(req, list(range(first_stream, first_stream + n)), features)


# ---- the budgets, on a bare events socket ---------------------------------------------------------------------

@pytest.fixture
def bare():
    ctx = zmq.Context()
    rejected: list[str] = []
    dropped: list[tuple[str, str]] = []
    one = 10 * 8 * 4 + 10 * 96  # bytes one _events() message counts: features and the header's per-event estimate

    def make(total: int, peer: int) -> EventsSocket:
        return EventsSocket(
            ctx, "tcp://127.0.0.1:*", 8, 100, MiB, rejected.append,
            budgets=EventsBudgets(total * one, peer * one, 1000),
            on_dropped=lambda what, reason: dropped.append((what, reason)),
        )

    yield ctx, make, rejected, dropped
    ctx.destroy(linger=0)


def _fill_until(sock: EventsSocket, rejected: list, expected: int, deadline_s: float = 10.0) -> None:
    """Move what arrived into the pending queue until `expected` messages were read (pending or rejected)."""
    deadline = time.monotonic() + deadline_s
    while sock.pending() + len(rejected) < expected:
        assert time.monotonic() < deadline, f"{sock.pending()} pending, {len(rejected)} rejected of {expected}"
        sock.wait(50)
        sock._fill()


def test_requests_beyond_the_per_peer_and_total_budgets_are_answered_overloaded(bare) -> None:
    ctx, make, rejected, _ = bare
    sock = make(total=3, peer=2)
    a, b = _dealer(ctx, sock.endpoint), _dealer(ctx, sock.endpoint)
    for req in range(3):  # a first, all read, then b: the order decides which budget each refusal hits
        a.send_multipart(_events(req))
    _fill_until(sock, rejected, 3)
    for req in range(2):
        b.send_multipart(_events(10 + req))
    _fill_until(sock, rejected, 5)
    assert sock.pending() == 3 and rejected == ["overloaded", "overloaded"]
    for peer in (a, b):  # one of each peer's requests was refused: a's over its own budget, b's over the total
        assert peer.poll(5000)
        reply, _ = protocol.decode_reply(peer.recv_multipart())
        assert reply.error_reason == "overloaded" and "in-flight bytes" in reply.error
    taken = [sock.take() for _ in range(3)]
    assert all(m is not None for m in taken) and sock.take() is None
    assert sock.pending_bytes == 0 and sock._peer_bytes == {}
    sock.close()


def test_peers_take_turns_so_a_backlog_does_not_delay_another_peer(bare) -> None:
    ctx, make, rejected, _ = bare
    sock = make(total=100, peer=100)
    busy, other = _dealer(ctx, sock.endpoint), _dealer(ctx, sock.endpoint)
    for req in range(5):
        busy.send_multipart(_events(req))
    _fill_until(sock, rejected, 5)
    other.send_multipart(_events(100))
    first = sock.take()  # the busy peer's oldest; its other four wait
    deadline = time.monotonic() + 10
    while sock.pending() < 5:  # the loop's wait() between batches moves the new request in
        assert time.monotonic() < deadline
        sock.wait(50)
    order = [first.header.req] + [sock.take().header.req for _ in range(5)]
    assert order == [0, 1, 100, 2, 3, 4]  # its turn after the busy peer's next, not after the whole backlog
    sock.close()


def test_a_request_put_back_is_first_again_and_counted_again(bare) -> None:
    """The loop's batch was full: the request it took last goes back to the head of the line, bytes and all."""
    ctx, make, rejected, _ = bare
    sock = make(total=100, peer=100)
    busy, other = _dealer(ctx, sock.endpoint), _dealer(ctx, sock.endpoint)
    for req in range(3):
        busy.send_multipart(_events(req))
    _fill_until(sock, rejected, 3)
    other.send_multipart(_events(100))
    _fill_until(sock, rejected, 4)
    pending, nbytes, peers = sock.pending(), sock.pending_bytes, dict(sock._peer_bytes)
    sock.put_back(sock.take())
    assert (sock.pending(), sock.pending_bytes, sock._peer_bytes) == (pending, nbytes, peers)
    assert [sock.take().header.req for _ in range(4)] == [0, 100, 1, 2] and sock.take() is None
    assert sock.pending_bytes == 0 and sock._peer_bytes == {}
    sock.close()


def test_a_batch_never_passes_max_batch_the_message_that_would_starts_the_next(make_daemon) -> None:
    """serve.max_batch is a cap (the memory bound's L term; on CUDA, one bucket per wave): six 10-event requests
    waiting together are served as batches of 20, 20 and 20, not 30 and 30; a message larger than max_batch is a
    batch of its own."""
    daemon = make_daemon(**{"serve.max_batch": 25, "serve.max_wait_ms": 500})
    sizes: list[int] = []
    serve = daemon._serve
    daemon._serve = lambda batch: (sizes.append(sum(len(m.header.streams) for m in batch)), serve(batch))
    ctx = zmq.Context()
    try:
        dealer = _dealer(ctx, daemon.endpoints["events"])
        for req in range(6):
            dealer.send_multipart(_events(req, 10, first_stream=10 * req))
        dealer.send_multipart(_events(6, 40, first_stream=100))
        replies = []
        while len(replies) < 7:
            assert dealer.poll(10_000)
            replies.append(protocol.decode_reply(dealer.recv_multipart())[0])
        assert sorted(r.req for r in replies) == list(range(7)) and not any(r.error for r in replies)
    finally:
        ctx.destroy(linger=0)
    assert sum(sizes) == 100 and sizes.count(40) == 1
    assert all(size <= 25 for size in sizes if size != 40) and len(sizes) >= 4


def test_a_gone_peer_loses_its_replies_and_its_queued_requests_are_skipped(bare) -> None:
    ctx, make, rejected, dropped = bare
    sock = make(total=100, peer=100)
    peer = _dealer(ctx, sock.endpoint)
    for req in range(3):
        peer.send_multipart(_events(req))
    _fill_until(sock, rejected, 3)
    first = sock.take()
    peer.close()
    deadline = time.monotonic() + 10
    reply = protocol.encode_reply(protocol.EventsReply(v=1, req=0), None)
    while sock.send([*first.envelope, *reply]):  # queued until libzmq has seen the disconnect
        assert time.monotonic() < deadline, "the disconnect was never noticed"
        time.sleep(0.01)
    assert dropped == [("reply", "peer_gone")]
    assert sock.take() is None  # both queued requests skipped, not handed to the loop
    assert dropped.count(("request", "peer_gone")) == 2
    sock.close()


def test_replies_to_a_peer_that_does_not_read_are_dropped_not_queued(bare) -> None:
    ctx, make, rejected, dropped = bare
    sock = make(total=100, peer=100)
    peer = _dealer(ctx, sock.endpoint, RCVHWM=1, RCVBUF=4096)
    peer.send_multipart(_events(0))
    _fill_until(sock, rejected, 1)
    message = sock.take()
    payload = b"x" * 1000
    sent = 0
    while sock.send([*message.envelope, payload]):  # never read: the reply queue fills, then drops
        sent += 1
        assert sent < 100 * _MIN_SNDHWM, "replies to a peer that never reads were queued without bound"
    assert dropped == [("reply", "peer_not_reading")]
    assert sent >= _MIN_SNDHWM  # what libzmq queued (its reply queue) before dropping
    sock.close()


def test_the_publish_budget_refuses_a_batch_that_does_not_fit_until_bytes_are_released() -> None:
    budget = PublishBudget(100)
    assert budget.reserve(150)  # an empty queue takes one batch, whatever its size: never publish nothing
    assert not budget.reserve(1)
    budget.release(150)
    assert budget.reserve(60) and budget.reserve(40) and not budget.reserve(1)
    budget.release(60)
    assert budget.used == 40 and budget.reserve(60)


# ---- a real daemon under abuse ---------------------------------------------------------------------------------

BUDGETS = {
    "serve.max_message_bytes": 4 * MiB,
    "serve.max_message_events": 4096,
    "serve.max_inflight_bytes": 16 * MiB,
    "serve.max_peer_inflight_bytes": 4 * MiB,
    "serve.publish_queue_bytes": 4 * MiB,
    "serve.max_control_inbox_bytes": 4 * MiB,
    "serve.max_batch": 4096,
    "serve.max_stream_id_length": 32,
}


def memory_bound(base: int, peers: int, subscribers: int, output_size: int = 1, input_size: int = 8) -> int:
    """docs/operations.md, "Memory bound", for BUDGETS: base + budgets + per connection + per subscriber."""
    s = BUDGETS
    batch_bytes = s["serve.max_batch"] * (4 * input_size + 4 * output_size + 200)
    max_reply = s["serve.max_message_events"] * (1 + 4 * output_size + 128) + 1024
    frame_cap = FRAME_CAP_FACTOR * s["serve.max_message_bytes"]  # what libzmq reads; the daemon answers beyond
    rcvhwm = max(_MIN_RCVHWM, s["serve.max_peer_inflight_bytes"] // frame_cap)
    sndhwm = max(_MIN_SNDHWM, s["serve.max_peer_inflight_bytes"] // max_reply)
    per_peer = (rcvhwm + 1) * 3 * frame_cap + sndhwm * max_reply
    max_publish = s["serve.max_batch"] * (4 * output_size + 9 + s["serve.max_stream_id_length"] + 3) + 1024
    per_subscriber = max(16 * max_publish, s["serve.publish_queue_bytes"])
    return (
        base + s["serve.max_inflight_bytes"] + batch_bytes + s["serve.publish_queue_bytes"]
        + s["serve.max_control_inbox_bytes"] + peers * per_peer + subscribers * per_subscriber
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """`lstmd serve` in a subprocess with small budgets; yields (process, endpoints); stopped with SIGTERM."""
    state = tmp_path_factory.mktemp("abuse") / "state"
    settings = {
        "serve.events": "tcp://127.0.0.1:*",
        "serve.control": "tcp://127.0.0.1:*",
        "serve.publish": "tcp://127.0.0.1:*",
        "serve.metrics": "127.0.0.1:0",
        "serve.device": "cpu",
        "state.dir": str(state),
        "state.capacity": 8192,
        "model.hidden_size": 32,
        **BUDGETS,
    }
    sets = [f"--set={k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstmd.clients.cli", "serve", *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (state / "endpoints.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.1)
    endpoints = json.loads((state / "endpoints.json").read_text())
    yield proc, endpoints
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "ContextTerminated" not in output, output


def _metric(endpoints: dict, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{endpoints['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class _Peak:
    """The daemon process's peak RSS, sampled every 50 ms on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._done = psutil.Process(pid), 0, threading.Event()

    def __enter__(self) -> _Peak:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def _well_behaved(endpoint: str, stop: threading.Event, latencies: list, errors: list) -> None:
    rng = np.random.default_rng(1)
    with Producer(endpoint, timeout=30) as producer:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                producer.send([f"good-{i}" for i in range(50)], rng.standard_normal((50, 8), dtype=np.float32))
            except Exception as exc:  # noqa: BLE001 - reported by the test, which must see every failure
                errors.append(repr(exc))
                return
            latencies.append(time.perf_counter() - started)


def test_abusive_clients_leave_memory_bounded_and_others_answered(daemon) -> None:
    proc, endpoints = daemon
    ctx = zmq.Context()
    admin = Admin(endpoints["control"], timeout=30, context=ctx)
    with Producer(endpoints["events"], context=ctx) as warm:  # the base: started and served once
        warm.send(list(range(100)), np.zeros((100, 8), np.float32))
    base = psutil.Process(proc.pid).memory_info().rss

    # A subscriber that never reads, with queues as small as ZeroMQ allows.
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.setsockopt(zmq.SUBSCRIBE, protocol.PREDICTIONS_TOPIC)
    sub.connect(endpoints["publish"])
    stop, latencies, errors = threading.Event(), [], []
    good = threading.Thread(target=_well_behaved, args=(endpoints["events"], stop, latencies, errors), daemon=True)
    status_seconds = []
    with _Peak(proc.pid) as rss:
        good.start()
        # A producer that never reads its replies and sends far more than the budgets hold.
        flooder = _dealer(ctx, endpoints["events"], RCVHWM=1, RCVBUF=4096, SNDHWM=100_000)
        sent = 0
        flood_until = time.monotonic() + 8
        while time.monotonic() < flood_until:
            try:
                flooder.send_multipart(_events(sent, n=1000, first_stream=(sent % 4) * 1000), zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.001)
            if sent % 500 == 0:
                started = time.perf_counter()
                admin.status()
                status_seconds.append(time.perf_counter() - started)
        # `lstmd status` itself, a process of its own, while the flood and the subscriber are still attached.
        started = time.perf_counter()
        cli = subprocess.run(
            [sys.executable, "-m", "lstmd.clients.cli", "status", "--json", "--control", endpoints["control"]],
            capture_output=True, text=True, timeout=60,
        )
        cli_seconds = time.perf_counter() - started
        assert cli.returncode == 0 and json.loads(cli.stdout)["io"]["subscribers"] >= 1, cli.stderr
        # A 200 MB frame (past ZeroMQ's cap, twice max_message_bytes): ZeroMQ closes that connection without
        # reading it; the daemon counts the disconnect.
        disconnects = _metric(endpoints, "lstmd_events_disconnects_total")
        big = _dealer(ctx, endpoints["events"])
        frames = _events(0)
        big.send_multipart([frames[0], b"\0" * (200 * MiB)])
        deadline = time.monotonic() + 30
        while _metric(endpoints, "lstmd_events_disconnects_total") <= disconnects:
            assert time.monotonic() < deadline, "the 200 MB frame's connection was not counted"
            time.sleep(0.1)
        big.send_multipart(_events(1))  # the same socket reconnects and is answered
        assert big.poll(30_000), "the peer that sent 200 MB was not served after reconnecting"
        reply, preds = protocol.decode_reply(big.recv_multipart())
        assert reply.error is None and preds.shape == (10, 1)
        big.close()
        stop.set()
        good.join(60)
    flooder.close()
    sub.close()

    assert not errors, errors
    assert len(latencies) >= 10
    p99 = float(np.quantile(latencies, 0.99))
    assert p99 < 2.0, f"the well-behaved producer's p99 was {p99:.3f}s"
    assert max(status_seconds) < 5.0, status_seconds
    assert cli_seconds < 15.0, f"`lstmd status` took {cli_seconds:.1f}s (its own start included)"
    bound = memory_bound(base, peers=4, subscribers=1)
    overloaded = _metric(endpoints, "lstmd_rejections_total", reason="overloaded")
    not_reading = _metric(endpoints, "lstmd_dropped_messages_total", what="reply", reason="peer_not_reading")
    print(f"abuse: {sent} flood messages ({overloaded:.0f} overloaded, {not_reading:.0f} replies dropped), "
          f"peak RSS {rss.peak / MiB:.0f} MiB (base {base / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB), "
          f"good producer p99 {p99 * 1000:.1f} ms over {len(latencies)} sends, "
          f"status max {max(status_seconds):.3f}s, `lstmd status` process {cli_seconds:.2f}s")
    assert rss.peak <= bound
    # Far below the bound in practice: the flood's replies were dropped, not queued.
    assert rss.peak - base < 200 * MiB, f"RSS grew {(rss.peak - base) / MiB:.0f} MiB"
    assert not_reading > 0
    assert proc.poll() is None


# ---- the I/O thread's supervision -----------------------------------------------------------------------------

def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_io_thread_carries_on_after_a_failure_and_reports_it(make_daemon) -> None:
    daemon = make_daemon()
    io = daemon._io
    real = io._receive_control
    faults = iter([RuntimeError("injected fault")])

    def failing_once() -> None:
        fault = next(faults, None)
        if fault is not None:
            raise fault
        real()

    io._receive_control = failing_once
    status = Admin(daemon.endpoints["control"], timeout=30).status()  # answered once the thread carried on
    assert status["io"]["restarts"] == 1 and "injected fault" in status["io"]["last_error"]
    assert status["io"]["alive"] and status["io"]["gave_up"] is None
    assert _get(f"http://{daemon.endpoints['metrics']}/healthz")[0] == 200
    metrics = daemon.metrics.registry
    assert metrics.get_sample_value("lstmd_io_thread_failures_total") == 1


def test_an_io_thread_that_keeps_failing_turns_healthz_and_readyz_503_with_the_reason(make_daemon) -> None:
    daemon = make_daemon()

    def always_failing() -> None:
        raise RecursionError("maximum recursion depth exceeded (injected)")

    daemon._io._receive_control = always_failing
    with pytest.raises(TimeoutError):  # the request is never read: control is down
        Admin(daemon.endpoints["control"], timeout=3).status()
    daemon._io.join(10)
    assert not daemon._io.is_alive()
    for path in ("healthz", "readyz"):
        code, body = _get(f"http://{daemon.endpoints['metrics']}/{path}")
        assert code == 503, body
        assert "io: the I/O thread stopped after 5 failures" in body and "RecursionError" in body
        assert "publisher: the publisher is down" in body


# ---- the budgets' configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("setting", "message"),
    [  # the message names the key and says what it must be
        ("serve.max_inflight_bytes=0", "serve.max_inflight_bytes must be"),
        ("serve.max_peer_inflight_bytes=-1", "serve.max_peer_inflight_bytes must be"),
        ("serve.publish_queue_bytes=0", "serve.publish_queue_bytes must be"),
        ("serve.max_message_bytes=-1", "serve.max_message_bytes must be"),
        ("serve.max_peer_inflight_bytes=1000000000000", "must not exceed serve.max_inflight_bytes"),
    ],
)
def test_budget_settings_out_of_range_are_refused(setting: str, message: str) -> None:
    from lstmd.daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[setting], environ={})
