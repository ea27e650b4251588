"""Two bounds of daemon/io.py: the control inbox in bytes (serve.max_control_inbox_bytes: a flood of large control
requests is answered `overloaded` by the I/O thread instead of queueing while the loop is busy), and events frames
over serve.max_message_bytes (answered `frame_too_large` and counted under that reason; only frames past libzmq's
own cap, FRAME_CAP_FACTOR times larger, cost the connection). Real sockets on loopback, ephemeral ports."""

from __future__ import annotations

import base64
import queue
import threading
import time

import numpy as np
import pytest
import zmq
from lstmd.clients import protocol
from lstmd.daemon.io import FRAME_CAP_FACTOR, ControlMessage, Inbox, IOThread


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _control(cmd: str, **args) -> bytes:
    return protocol.encode(protocol.ControlRequest(v=protocol.PROTOCOL_VERSION, cmd=cmd, args=args))


def _reply(sock: zmq.Socket, what: str) -> protocol.ControlReply:
    assert sock.poll(30_000), f"no reply to {what}"
    return protocol.control_reply_decoder.decode(sock.recv())


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# ---- the control inbox -----------------------------------------------------------------------------------------

@pytest.fixture
def io_thread():
    """An I/O thread on loopback with a small inbox nobody takes from until the test does."""
    ctx = zmq.Context()
    threads = []
    overloaded = []

    def make(limit: int) -> tuple[IOThread, Inbox]:
        inbox = Inbox(limit)
        io = IOThread(ctx, inbox, "tcp://127.0.0.1:*", "", on_control_overloaded=lambda: overloaded.append(1))
        io.start()
        threads.append(io)
        return io, inbox

    yield make, overloaded
    for io in threads:
        io.stop()
        io.join(5)
    ctx.destroy(linger=0)


def test_control_requests_beyond_the_inbox_bytes_are_answered_overloaded_until_the_loop_takes_one(io_thread):
    make, overloaded = io_thread
    request = _control("status", pad="x" * 3000)  # the I/O thread counts received bytes, not what they mean
    io, inbox = make(limit=int(1.5 * len(request)))
    ctx = zmq.Context.instance()
    first, second, third = (_dealer(ctx, io.endpoints["control"]) for _ in range(3))
    first.send(request)  # one request always fits an empty inbox
    _wait_for(lambda: inbox.qsize() == 1, "the first request never reached the inbox")
    held = inbox.used
    assert len(request) < held < len(request) + 64  # its frames: the request and the routing id
    for sock in (second, third):
        sock.send(request)
        reply = _reply(sock, "a request beyond the inbox's bytes")
        assert not reply.ok and "overloaded" in reply.error and "serve.max_control_inbox_bytes" in reply.error
    assert len(overloaded) == 2 and inbox.qsize() == 1 and inbox.used == held

    message = inbox.get_nowait()  # the loop takes it: its bytes go back
    assert isinstance(message, ControlMessage) and message.nbytes == held and inbox.used == 0
    second.send(request)
    _wait_for(lambda: inbox.qsize() == 1, "a request after the inbox emptied was not queued")
    assert len(overloaded) == 2 and not second.poll(100)  # queued for the loop, not refused
    inbox.put("stop")  # the stop sentinel is never refused and holds no bytes
    assert inbox.get_nowait().nbytes == held and inbox.get_nowait() == "stop" and inbox.used == 0
    with pytest.raises(queue.Empty):
        inbox.get_nowait()
    for sock in (first, second, third):
        sock.close()


def test_a_daemon_whose_loop_is_busy_answers_a_flood_of_imports_overloaded_and_counts_it(make_daemon):
    model = make_daemon().engine.model.to_bytes()  # the same model as the daemon under test: sizes its inbox
    request = _control("import_model", safetensors_b64=base64.b64encode(model).decode())
    daemon = make_daemon(**{"serve.max_control_inbox_bytes": len(request) * 3 // 2})
    version = daemon.engine.model.version
    entered, release = threading.Event(), threading.Event()

    def busy() -> None:  # the loop stalls between two batches, as under a long batch or a slow snapshot
        entered.set()
        release.wait(60)

    daemon._housekeeping = busy
    assert entered.wait(30), "the loop never reached housekeeping"
    ctx = zmq.Context.instance()
    socks = [_dealer(ctx, daemon.endpoints["control"]) for _ in range(4)]
    socks[0].send(request)
    _wait_for(lambda: daemon.inbox.qsize() == 1, "the first import never reached the inbox")
    for sock in socks[1:]:
        sock.send(request)
        reply = _reply(sock, "an import while the loop is busy")  # answered by the I/O thread meanwhile
        assert not reply.ok and "overloaded" in reply.error
    metrics = daemon.metrics.registry
    assert metrics.get_sample_value("lstmd_control_rejections_total", {"reason": "overloaded"}) == 3
    del daemon._housekeeping
    release.set()
    reply = _reply(socks[0], "the queued import")
    assert reply.ok and reply.result["version"] == version + 1
    assert daemon.status()["io"]["control_inbox_bytes"] == 0
    for sock in socks:
        sock.close()


# ---- frames over serve.max_message_bytes ----------------------------------------------------------------------

def _metric(daemon, name: str, **labels) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


def test_an_events_frame_over_the_cap_is_answered_and_counted_and_one_past_zeromqs_cap_costs_the_connection(
    make_daemon,
):
    cap = 4096
    daemon = make_daemon(**{"serve.max_message_bytes": cap})
    sock = _dealer(zmq.Context.instance(), daemon.endpoints["events"])
    n = cap // (8 * 4) + 1  # one event more than the features frame may hold
    sock.send_multipart(protocol.encode_events(7, list(range(n)), np.ones((n, 8), np.float32)))
    assert sock.poll(30_000), "an over-cap frame was not answered"
    reply, _ = protocol.decode_reply(sock.recv_multipart())
    assert reply.req == 7 and reply.error_reason == "frame_too_large"
    assert f"{n * 8 * 4} bytes" in reply.error and f"serve.max_message_bytes = {cap}" in reply.error
    assert _metric(daemon, "lstmd_rejections_total", reason="frame_too_large") == 1
    assert daemon.status()["rejections"]["frame_too_large"] == 1

    # Past libzmq's own cap the frame is never read: the connection closes and only the disconnect is counted.
    disconnects = _metric(daemon, "lstmd_events_disconnects_total")
    big = FRAME_CAP_FACTOR * cap // (8 * 4) + 1
    sock.send_multipart(protocol.encode_events(8, list(range(big)), np.ones((big, 8), np.float32)))
    _wait_for(lambda: _metric(daemon, "lstmd_events_disconnects_total") > disconnects, "no disconnect counted")
    assert _metric(daemon, "lstmd_rejections_total", reason="frame_too_large") == 1
    sock.close()  # (a message sent before this socket notices the disconnect would be lost with the connection)
    again = _dealer(zmq.Context.instance(), daemon.endpoints["events"])
    again.send_multipart(protocol.encode_events(9, [0, 1], np.ones((2, 8), np.float32)))
    assert again.poll(30_000), "the daemon stopped serving after the disconnect"
    reply, preds = protocol.decode_reply(again.recv_multipart())
    assert reply.req == 9 and reply.error is None and preds.shape == (2, 1)
    again.close()
