"""What CurveZMQ costs per message, in CPU time: lstmd's request/reply traffic with and without CURVE.

`lstmd bench --curve` measures events/s with security on and off, but on a shared machine the wall-clock rate
moves with the neighbours' load far more than with encryption. CPU time per message does not: this drives a
ROUTER (the daemon's side) and a DEALER (a producer) in one process with messages of the sizes lstmd sends
(an events request of N events of I float32 features, its reply of N predictions and statuses), a fixed number
in flight, and reports the process's CPU microseconds per message, both ends together, plain and CURVE, runs
interleaved. The difference is the price of encryption (libsodium, in libzmq's C threads) per message.

    python benchmarks/curve_cost.py [--events 1000] [--features 8] [--messages 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import zmq
import zmq.auth
from lstmd.clients import protocol
from zmq.auth.thread import ThreadAuthenticator


def one_run(ctx: zmq.Context, curve: bool, events: int, features: int, messages: int, inflight: int) -> float:
    """CPU microseconds per request/reply pair, both ends, for `messages` pairs."""
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        server.curve_server, server.curve_secretkey, server.zap_domain = True, server_secret, b"bench"
        client.curve_serverkey, client.curve_publickey, client.curve_secretkey = (
            server_public,
            client_public,
            client_secret,
        )
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    request = protocol.encode_events(1, list(range(events)), np.zeros((events, features), dtype=np.float32))
    reply_header = protocol.encode(
        protocol.EventsReply(v=protocol.PROTOCOL_VERSION, req=1, out_dim=1, status=bytes(events))
    )
    reply = [reply_header, np.zeros(events, dtype=np.float32).tobytes()]

    def serve() -> None:
        for _ in range(messages):
            frames = server.recv_multipart(copy=False)
            server.send_multipart([frames[0], *reply], copy=False)

    thread = threading.Thread(target=serve)
    client.send_multipart(request)  # the handshake and first round trip, outside the measurement
    server.send_multipart([server.recv_multipart()[0], *reply])
    client.recv_multipart()
    thread.start()
    cpu0, sent, received = time.process_time(), 0, 0
    while received < messages:
        while sent < messages and sent - received < inflight:
            client.send_multipart(request, copy=False)
            sent += 1
        client.recv_multipart(copy=False)
        received += 1
    cpu = time.process_time() - cpu0
    thread.join()
    server.close(linger=0)
    client.close(linger=0)
    return cpu / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="events per message (lstmd bench's default)")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="bench", location=zmq.auth.CURVE_ALLOW_ANY)
    results: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(args.repeat):
            for curve in (False, True):
                results[curve].append(one_run(ctx, curve, args.events, args.features, args.messages, args.inflight))
    finally:
        auth.stop()
        ctx.term()
    plain, curve = statistics.median(results[False]), statistics.median(results[True])
    request_bytes = args.events * (args.features * 4 + 9)  # float32 features + a msgpack int id, roughly
    print(f"{args.events} events x {args.features} features per message (~{request_bytes / 1024:.0f} KiB), "
          f"{args.messages} messages x {args.repeat} runs each, {args.inflight} in flight")
    print(f"plain: {', '.join(f'{v:.1f}' for v in results[False])} CPU us/message (median {plain:.1f})")
    print(f"CURVE: {', '.join(f'{v:.1f}' for v in results[True])} CPU us/message (median {curve:.1f})")
    print(f"CURVE costs {curve - plain:.1f} CPU us per request/reply, {(curve - plain) / args.events * 1e3:.1f} "
          f"CPU ns per event, both ends together")


if __name__ == "__main__":
    main()
