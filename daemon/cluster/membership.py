"""Who is in the cluster and which key groups each member owns.

- Members heartbeat into the JetStream KV bucket MEMBERS_BUCKET (key: the member's name, value: a JSON card
  with its control endpoint), whose TTL is `cluster.lease_ttl` (set by the member that creates the bucket): a
  member that stops heartbeating (killed, paused, cut off) disappears from it within the TTL.
- Ownership is rendezvous hashing over the live members: key group g belongs to the member with the highest
  BLAKE2b(member, g). Every member computes the same answer from the same member list, and a join or leave
  moves only the key groups the joining or leaving member wins or held (about G / members of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable

log = logging.getLogger("lstmd.cluster")

MEMBERS_BUCKET = "lstmd_members"


def _score(member: str, group: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\x00{group}".encode(), digest_size=8).digest(), "little")


def owner_of(group: int, members) -> str:
    return max(members, key=lambda m: (_score(m, group), m))


def assignment(members, groups: int) -> dict[str, list[int]]:
    """member -> the key groups it owns, for every live member (one with none gets an empty list)."""
    owned: dict[str, list[int]] = {m: [] for m in sorted(members)}
    if owned:
        for group in range(groups):
            owned[owner_of(group, owned)].append(group)
    return owned


async def members_bucket(js, ttl: float):
    """The members bucket, created with this TTL when missing."""
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(MEMBERS_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=MEMBERS_BUCKET, ttl=ttl, history=1)


async def live_members(kv) -> dict[str, dict]:
    """name -> card of every member whose heartbeat has not expired."""
    from nats.js.errors import KeyNotFoundError, NoKeysError

    try:
        names = await kv.keys()
    except NoKeysError:
        return {}
    cards = {}
    for name in names:
        with contextlib.suppress(KeyNotFoundError):  # expired between the two reads
            entry = await kv.get(name)
            if entry.value:
                cards[name] = json.loads(entry.value)
    return cards


class Membership:
    """This member's heartbeat and its view of the live members (on the NATS link's loop)."""

    def __init__(self, js, member: str, ttl: float, card: dict, on_beat: Callable[[set[str]], None]) -> None:
        self.js = js
        self.member = member
        self.ttl = ttl
        self.card = json.dumps(card).encode()
        self.on_beat = on_beat
        self.members: set[str] = set()
        self._task: asyncio.Task | None = None

    async def join(self) -> set[str]:
        self.kv = await members_bucket(self.js, self.ttl)
        await self.kv.put(self.member, self.card)
        self.members = set(await live_members(self.kv)) | {self.member}
        self._task = asyncio.get_running_loop().create_task(self._beat())
        return self.members

    async def _beat(self) -> None:
        # A few beats per TTL, so one late beat (a loaded machine) does not cost the lease.
        while True:
            await asyncio.sleep(self.ttl / 4)
            try:
                await self.kv.put(self.member, self.card)
                members = set(await live_members(self.kv)) | {self.member}
            except Exception as exc:  # NATS away for a moment: the next beat tries again
                log.warning("cluster heartbeat of %s failed: %s", self.member, exc)
                continue
            if members != self.members:
                log.info("cluster members now %s", ", ".join(sorted(members)))
                self.members = members
            self.on_beat(members)  # every beat: claims to retry, snapshots due

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await self.kv.delete(self.member)
