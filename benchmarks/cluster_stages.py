"""Where a cluster event's CPU time goes in Python, stage by stage, in one process without NATS: the gateway
turning producer messages into log records, a replica cutting its events out of a record, the serving loop's
step of them (the daemon's own pipeline), the replica's answer batch, and the gateway joining the answers.
Complements benchmarks/cluster.py's CPU seconds per process (which include nats-py, ZeroMQ and the kernel).

    python benchmarks/cluster_stages.py [--events 1000] [--messages 2] [--key-groups 256] [--log-partitions 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from lstmd.clients import protocol
from lstmd.daemon.cluster import log as clog
from lstmd.daemon.cluster import replica as rep
from lstmd.daemon.cluster.gateway import Gateway
from lstmd.daemon.config import load_config
from lstmd.daemon.io import EventsLimits, EventsMessage
from lstmd.daemon.server import Daemon
from prometheus_client import CollectorRegistry


class _Link:
    def submit(self, coro) -> None:
        coro.close()


def _timed(fn, repeat: int) -> float:
    """CPU seconds per call (this process's, all threads: a loaded machine stretches wall time, not this)."""
    fn()  # warm (caches, allocations)
    began = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - began) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=2, help="producer messages per gateway wake-up")
    parser.add_argument("--key-groups", type=int, default=256)
    parser.add_argument("--log-partitions", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    n = args.events * args.messages
    config = load_config(overrides=[f"cluster.key_groups={args.key_groups}",
                                    f"cluster.log_partitions={args.log_partitions}", "serve.device=\"cpu\""],
                         environ={})
    gw = Gateway(config)
    gw.partitions = min(args.log_partitions, args.key_groups)
    rng = np.random.default_rng(0)
    messages = []
    for k in range(args.messages):
        ids = list(range(k * args.events, (k + 1) * args.events))
        x = rng.standard_normal((args.events, 8), dtype=np.float32)
        frames = protocol.encode_events(k, ids, x, seqs=[1] * args.events)
        header, features, _ = protocol.decode_events(frames)
        messages.append((k, EventsMessage([b"peer"], header, features, None, 0.0)))
    stages = {}
    stages["gateway: producer messages -> log records"] = _timed(lambda: gw._records_of(messages), args.repeat)
    records = [clog.log_record_codec[1].decode(payload) for _, payload, _, _ in gw._records_of(messages)]

    # a replica owning every other key group
    source = rep.ClusterSource.__new__(rep.ClusterSource)
    source.limits = EventsLimits(8, protocol.MAX_EVENTS)
    source.reading = np.arange(args.key_groups) % 2 == 0
    source.owned_mask = source.reading.copy()
    source.releasing = np.zeros(args.key_groups, dtype=bool)
    source.queued = np.zeros(args.key_groups, dtype=np.int64)
    source.positions = np.zeros(args.key_groups, dtype=np.int64)
    source._replies, source._outgoing, source._next, source.link = {}, {}, 0, _Link()
    source._taken = set()

    def cut() -> list:
        items = []
        for r in records:
            groups = np.frombuffer(r.groups, dtype=clog.GROUP_DTYPE)
            mine = np.flatnonzero(source.reading[groups])
            items.append(source._queue_item(r, mine, 1, 0, 0))
        return items

    stages["replica: records -> its messages for the loop"] = _timed(cut, args.repeat)
    daemon = Daemon(load_config(overrides=['serve.device="cpu"'], environ={}), registry=CollectorRegistry())
    items = cut()
    batch = [item.message for item in items]

    def step() -> None:
        daemon.pipeline.serve([m.header.streams for m in batch], [None for _ in batch],
                              np.concatenate([m.features for m in batch]), [None for _ in batch])

    stages["replica: the serving step (pipeline, its events; daemon-assigned seqs)"] = _timed(step, args.repeat)
    replies = []
    for m in batch:
        k = len(m.header.streams)
        reply = protocol.EventsReply(v=1, req=0, version=1, out_dim=1, status=bytes(k))
        replies.append([m.envelope[0], protocol.encode(reply), np.zeros(k, np.float32).tobytes()])

    def answer() -> bytes:
        source._replies = {bytes(i.message.envelope[0]): i for i in items}
        source._outgoing = {}
        for frames in replies:
            source.send(frames)
        return rep._reply_batch(next(iter(source._outgoing.values())))

    stages["replica: loop replies -> one answer batch"] = _timed(answer, args.repeat)
    payload = answer()

    def join() -> None:
        gw._pending = {k: rep_pending(k) for k, _ in messages}
        gw._on_answer_sync(payload)

    from lstmd.daemon.cluster.gateway import _Pending

    def rep_pending(k: int) -> _Pending:
        return _Pending([b"peer"], k, args.events, 0.0, 0)

    stages["gateway: join an answer batch (half the events)"] = _timed(join, args.repeat)
    print(f"{n} events per wake-up ({args.messages} messages x {args.events}), G={args.key_groups}, "
          f"P={gw.partitions}, {len(records)} records; the replica owns half the key groups")
    for name, seconds in stages.items():
        share = n if name.startswith("gateway: producer") else n / 2
        print(f"  {name}: {seconds * 1e3:.2f} ms = {seconds / share * 1e6:.2f} us per event handled")


if __name__ == "__main__":
    main()
