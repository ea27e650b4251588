"""Who is in the cluster and which key groups each member owns.

- Members heartbeat into the JetStream KV bucket MEMBERS_BUCKET (key: the member's name, value: a JSON card
  with its control endpoint), whose TTL is `cluster.lease_ttl` (set by the member that creates the bucket): a
  member that stops heartbeating (killed, paused, cut off) disappears from it within the TTL.
- Ownership is rendezvous hashing over the live members: key group g belongs to the member with the highest
  BLAKE2b(member, g). Every member computes the same answer from the same member list, and a join or leave
  moves only the key groups the joining or leaving member wins or held (about G / members of them).
- Draining (`lstmd cluster drain MEMBER`): DRAIN_BUCKET holds the names of the members being drained (one JSON
  list, changed by compare-and-set). Rendezvous hashing runs over the live members that are not draining, so
  a draining member's intended share is empty: it hands its key groups over at its next heartbeat exactly as
  on a graceful leave (snapshot, release), while the others, seeing it alive, wait for that release instead of
  claiming over it. A member clears its own mark when it (re)joins: a drained member that is started again is
  a new member.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable

log = logging.getLogger("lstmd.cluster")

MEMBERS_BUCKET = "lstmd_members"
DRAIN_BUCKET = "lstmd_drain"
_DRAIN_KEY = "draining"


def _score(member: str, group: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\x00{group}".encode(), digest_size=8).digest(), "little")


def owner_of(group: int, members) -> str:
    return max(members, key=lambda m: (_score(m, group), m))


def assignment(members, groups: int, drained=frozenset()) -> dict[str, list[int]]:
    """member -> the key groups it owns, for every live member (one with none gets an empty list); members in
    `drained` own none (they hand theirs over)."""
    owned = _assignment(frozenset(members), groups, frozenset(drained))
    return {member: list(mine) for member, mine in owned.items()}


@functools.lru_cache(maxsize=8)
def _assignment(members: frozenset[str], groups: int, drained: frozenset[str]) -> dict[str, tuple[int, ...]]:
    """Cached: every heartbeat asks with the same members, and the G x N hashes cost ~1 s of Python at
    G = 16,384 and N = 100 (docs/operations.md, "On paper")."""
    owned: dict[str, list[int]] = {m: [] for m in sorted(members)}
    serving = [m for m in owned if m not in drained]
    if serving:
        for group in range(groups):
            owned[owner_of(group, serving)].append(group)
    return {member: tuple(mine) for member, mine in owned.items()}


async def members_bucket(js, ttl: float):
    """The members bucket, created with this TTL when missing."""
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(MEMBERS_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=MEMBERS_BUCKET, ttl=ttl, history=1)


async def live_members(js, kv) -> dict[str, dict]:
    """name -> card of every member whose heartbeat has not expired.

    The names come from the bucket's stream info (the subjects holding a message), one request answered by the
    server from its own index. Not `kv.keys()`: nats-py lists keys with an ordered consumer and decides it has
    seen them all from a consumer info taken while the messages are in flight, so on a busy event loop it now and
    then returns a short list (measured: 1 in ~300 listings with the loop busy), and a member missing from one
    listing looked dead: the others claimed all its key groups at once and fenced it."""
    info = await js.stream_info(f"KV_{MEMBERS_BUCKET}", subjects_filter=f"$KV.{MEMBERS_BUCKET}.>")
    prefix = len(f"$KV.{MEMBERS_BUCKET}.")
    names = [subject[prefix:] for subject in info.state.subjects or {}]
    cards = await asyncio.gather(*(_heartbeat(kv, name) for name in names))
    return {name: json.loads(card) for name, card in zip(names, cards, strict=True) if card is not None}


async def lease_held(kv, member: str) -> bool:
    """Whether `member`'s heartbeat entry is live now: asked of the server for that one key, the check before
    taking anything over from a member a listing did not show (a claim over a live owner fences it)."""
    return await _heartbeat(kv, member) is not None


async def _heartbeat(kv, member: str) -> bytes | None:
    """`member`'s card in the members bucket `kv`; None when it left (a delete marker), its lease expired, or it
    was never there."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(member)
    except KeyNotFoundError:
        return None
    return entry.value or None


async def drain_bucket(js):
    """The drain bucket, created when missing (no TTL: a mark stays until its member rejoins or it is cancelled)."""
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(DRAIN_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=DRAIN_BUCKET, history=1)


async def draining(kv) -> tuple[set[str], int | None]:
    """(names of the members being drained, the entry's revision; None when never written)."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(_DRAIN_KEY)
    except KeyNotFoundError:
        return set(), None
    return set(json.loads(entry.value or b"[]")), entry.revision


async def mark_draining(kv, member: str, on: bool) -> set[str]:
    """Add (on) or remove `member` by compare-and-set, retried when another writer changed the list meanwhile;
    returns the names now draining."""
    from nats.js.errors import KeyWrongLastSequenceError

    while True:
        names, revision = await draining(kv)
        wanted = names | {member} if on else names - {member}
        if wanted == names:
            return names
        value = json.dumps(sorted(wanted)).encode()
        try:
            if revision is None:
                await kv.create(_DRAIN_KEY, value)
            else:
                await kv.update(_DRAIN_KEY, value, last=revision)
            return wanted
        except KeyWrongLastSequenceError:
            continue
        except Exception as exc:  # a racing create answers with another error class in some versions
            if "wrong last sequence" not in str(exc).lower() and "exists" not in str(exc).lower():
                raise


class Membership:
    """This member's heartbeat and its view of the live members (on the NATS link's loop)."""

    def __init__(self, js, member: str, ttl: float, card: dict, on_beat: Callable[[set[str]], None]) -> None:
        self.js = js
        self.member = member
        self.ttl = ttl
        self.card = json.dumps(card).encode()
        self.on_beat = on_beat
        self.members: set[str] = set()
        self.drained: set[str] = set()  # members being drained: alive, but owning nothing (module docstring)
        self._tasks: list[asyncio.Task] = []
        self._confirmed: dict[str, float] = {}  # member -> when owner_alive last found its lease held

    async def join(self) -> set[str]:
        self.kv = await members_bucket(self.js, self.ttl)
        self.drain_kv = await drain_bucket(self.js)
        self.drained = await mark_draining(self.drain_kv, self.member, on=False)
        await self.kv.put(self.member, self.card)
        self.members = set(await live_members(self.js, self.kv)) | {self.member}
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._renew()), loop.create_task(self._beat())]
        return self.members

    async def _renew(self) -> None:
        """Keep this member's entry alive: a put every TTL/4 on its own task, so a slow listing of the members
        (a loaded NATS connection) never delays the lease; a renewal later than TTL/2 is logged."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.ttl / 4)
            try:
                await self.kv.put(self.member, self.card)
            except Exception as exc:  # NATS away for a moment: the next renewal tries again
                log.warning("cluster heartbeat of %s failed: %s", self.member, exc)
                continue
            now = time.monotonic()
            if now - last > self.ttl / 2:
                log.warning("cluster heartbeat of %s came %.2f s after the previous one (lease_ttl %.1f s): a "
                            "loaded host; past the TTL the others take this member's key groups", self.member,
                            now - last, self.ttl)
            last = now

    async def _beat(self) -> None:
        """Every TTL/4: the live members and those draining, handed to on_beat (claims, releases, snapshots)."""
        while True:
            await asyncio.sleep(self.ttl / 4)
            try:
                members = set(await live_members(self.js, self.kv)) | {self.member}
                drained = (await draining(self.drain_kv))[0]
            except Exception as exc:  # NATS away for a moment: the next beat tries again
                log.warning("cluster heartbeat of %s failed: %s", self.member, exc)
                continue
            if members != self.members:
                log.info("cluster members now %s", ", ".join(sorted(members)))
                self.members = members
            if drained != self.drained:
                log.info("cluster members draining: %s", ", ".join(sorted(drained)) or "none")
                self.drained = drained
            self.on_beat(members)  # every beat: claims to retry, snapshots due

    async def owner_alive(self, member: str) -> bool:
        """Whether `member`, absent from this member's listing, still holds its lease: asked once more of the
        server before anything of it is taken over (a listing is a view; taking from a live member fences it).
        A confirmation stands for TTL/4, so one rebalance over its key groups asks once."""
        now = time.monotonic()
        if now - self._confirmed.get(member, -1e9) < self.ttl / 4:
            return True
        if not await lease_held(self.kv, member):
            return False
        if member not in self._confirmed:
            log.warning("cluster member %s missing from the listing of %s is alive: nothing taken over from it",
                        member, self.member)
        self._confirmed[member] = now
        return True

    async def leave(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.kv.delete(self.member)
