"""Who is alive in a cluster, against a real nats-server on loopback: the listing the members rebalance on, and the
check made before anything is taken over from a member the listing did not show (daemon/cluster/membership.py).

A member that is alive but missing from another's listing used to lose all its key groups at once (the other
claimed them over it and fenced it): nats-py's `kv.keys()` returns a short list now and then when its event loop
is busy. These tests hold the listing to the live members with the loop kept busy, and the take-over check to the
server's view of one lease."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.cluster_helpers import needs_server

pytestmark = needs_server

TTL = 1.0


@pytest.fixture
def link(request):
    from lstmd.daemon.cluster.log import NatsLink

    link = NatsLink(request.getfixturevalue("nats_url"), "test")
    yield link
    link.close()


def test_listing_shows_every_live_member_while_the_loop_is_busy(link):
    """Three members renewing every TTL/4 on another connection's pace; 150 listings from a loop that a task keeps
    busy (3 ms blocking slices, like a replica's NATS thread cutting records): every listing has all three."""
    from lstmd.daemon.cluster.membership import live_members, members_bucket

    async def run() -> list[set[str]]:
        kv = await members_bucket(link.js, TTL)
        names = ("r1", "r2", "r3")

        async def renew(name: str) -> None:
            while True:
                await kv.put(name, b'{"control": "tcp://x"}')
                await asyncio.sleep(TTL / 4)

        async def busy() -> None:
            while True:
                time.sleep(0.003)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(renew(n)) for n in names] + [asyncio.create_task(busy())]
        await asyncio.sleep(0.2)
        try:
            return [set(await live_members(link.js, kv)) for _ in range(150)]
        finally:
            for task in tasks:
                task.cancel()

    listings = link.run(run(), 120)
    short = [seen for seen in listings if seen != {"r1", "r2", "r3"}]
    assert not short, f"{len(short)} of {len(listings)} listings missed a live member: {short[:3]}"


def test_listing_drops_members_that_left_or_expired(link):
    from lstmd.daemon.cluster.membership import live_members, members_bucket

    async def run():
        kv = await members_bucket(link.js, TTL)
        for name in ("r1", "r2", "r3"):
            await kv.put(name, b'{"control": "tcp://x"}')
        await kv.delete("r2")  # a graceful leave
        first = await live_members(link.js, kv)
        t0 = time.monotonic()
        while time.monotonic() - t0 < TTL * 1.5:  # r1 renews, r3 does not
            await kv.put("r1", b'{"control": "tcp://x"}')
            await asyncio.sleep(TTL / 4)
        return first, await live_members(link.js, kv)

    first, later = link.run(run(), 30)
    assert set(first) == {"r1", "r3"} and first["r1"] == {"control": "tcp://x"}
    assert set(later) == {"r1"}


def test_nothing_is_taken_over_from_a_live_member_a_listing_missed(link):
    """owner_alive asks the server for the one lease: alive while it is renewed (a listing that missed it changes
    nothing), gone once it expires, so a dead member's key groups still fail over."""
    from lstmd.daemon.cluster.membership import Membership, members_bucket

    async def run():
        kv = await members_bucket(link.js, TTL)
        await kv.put("r1", b"{}")
        me = Membership(link.js, "r2", TTL, {}, on_beat=lambda members: None)
        me.kv = kv
        alive = await me.owner_alive("r1")
        never = await me.owner_alive("r9")
        await asyncio.sleep(TTL * 1.5)  # r1 stops renewing: its lease expires (and the confirmation with it)
        return alive, never, await me.owner_alive("r1")

    alive, never, after_expiry = link.run(run(), 30)
    assert alive is True
    assert never is False
    assert after_expiry is False


def test_listing_leaves_no_consumer_behind(link):
    """Members list the bucket every TTL/4 for the cluster's life: a listing that left a consumer on the server
    (as nats-py's kv.keys() does, for 5 minutes each) would reach the server's consumer limit within minutes."""
    from lstmd.daemon.cluster.membership import MEMBERS_BUCKET, live_members, members_bucket

    async def run():
        kv = await members_bucket(link.js, TTL)
        await kv.put("r1", b"{}")
        for _ in range(50):
            assert set(await live_members(link.js, kv)) == {"r1"}
        return (await link.js.stream_info(f"KV_{MEMBERS_BUCKET}")).state.consumer_count

    assert link.run(run(), 30) == 0
