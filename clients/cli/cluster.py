"""`lstmd cluster status` and `lstmd cluster drain`: a cluster's members, the key groups each owns and the model
version each serves, and the cluster's newest model version; read from and changed through NATS (no daemon is asked)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Annotated

import typer
from lstmd.clients.cli._common import ConfigOpt, JsonOpt, console, fail, load_config_or_exit, print_json
from rich.table import Table

app = typer.Typer(help="Inspect and operate a cluster (members, key groups, drain).", no_args_is_help=True)

_DRAIN_POLL_S = 0.5


def _ranges(groups: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, g in enumerate(groups):
        if start is None:
            start = g
        if i + 1 == len(groups) or groups[i + 1] != g + 1:
            out.append(f"{start}" if start == g else f"{start}-{g}")
            start = None
    return ", ".join(out)


@contextmanager
def _cluster(config):
    """(config, the NATS link) for a cluster command; every ClusterError becomes a clear exit."""
    cfg = load_config_or_exit(config)
    if not cfg.cluster.nats:
        raise fail("no cluster configured: [cluster] nats is empty")
    from lstmd.daemon.cluster.log import ClusterError, NatsLink, open_log
    from lstmd.daemon.cluster.natsauth import connect_options

    try:
        link = NatsLink(cfg.cluster.nats, "lstmd-cluster-cli", connect_options(cfg.cluster))
    except ClusterError as exc:
        raise fail(str(exc)) from None
    try:
        open_log(link, cfg.cluster.key_groups, cfg.cluster.log_partitions)
        yield cfg, link
    except ClusterError as exc:
        raise fail(str(exc)) from None
    finally:
        link.close()


async def _members(js, ttl: float) -> tuple[dict, set[str]]:
    """(name -> card of the live members, names being drained)."""
    from lstmd.daemon.cluster.membership import drain_bucket, draining, live_members, members_bucket

    cards = await live_members(js, await members_bucket(js, ttl))
    return cards, (await draining(await drain_bucket(js)))[0]


@app.command()
def status(config: ConfigOpt = None, json: JsonOpt = False) -> None:
    """Members (live heartbeats) and their key groups, by rendezvous hashing as the members compute it."""
    from lstmd.daemon.cluster.membership import assignment
    from lstmd.daemon.cluster.weights import newest_version

    with _cluster(config) as (cfg, link):
        cards, drained = link.run(_members(link.js, cfg.cluster.lease_ttl))
        version = link.run(newest_version(link.js))
    owned = assignment(cards, cfg.cluster.key_groups, drained)
    members = [{"member": m, "key_groups": owned[m], "draining": m in drained, **cards[m]} for m in owned]
    if json:
        print_json({"nats": cfg.cluster.nats, "key_groups": cfg.cluster.key_groups, "model_version": version,
                    "members": members})
        return
    title = f"cluster at {cfg.cluster.nats}: {len(members)} member(s), {cfg.cluster.key_groups} key groups"
    table = Table(title=f"{title}, model version {version}")
    for column in ("member", "host", "pid", "model version", "key groups", "owned"):
        table.add_column(column)
    for m in members:
        name = m["member"] + (" (draining)" if m["draining"] else "")
        table.add_row(name, str(m.get("host", "")), str(m.get("pid", "")), str(m.get("model_version", "")),
                      str(len(m["key_groups"])), _ranges(m["key_groups"]))
    console.print(table)


async def _owners(js, groups: int) -> dict[int, str]:
    """key group -> its owner in the groups bucket ('' released, absent never owned)."""
    from lstmd.daemon.cluster.ownership import open_buckets, read_entry

    kv, _ = await open_buckets(js)
    owners = {}
    for group in range(groups):
        entry, _ = await read_entry(kv, group)
        if entry is not None:
            owners[group] = entry.owner
    return owners


@app.command()
def drain(
    member: Annotated[str, typer.Argument(help="The member to empty (its name in `lstmd cluster status`).")],
    config: ConfigOpt = None,
    json: JsonOpt = False,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", min=1, help="How long to wait for the handover.")
    ] = 120.0,
    cancel: Annotated[bool, typer.Option("--cancel", help="Stop draining MEMBER: it claims its share again.")] = False,
) -> None:
    """Move MEMBER's key groups to the other live members (snapshot, release, claim: as a graceful leave), wait
    until every one has a new owner, and say it may stop. It stays empty while it runs; started again, it is a
    new member and takes its share."""
    from lstmd.daemon.cluster.membership import drain_bucket, mark_draining

    with _cluster(config) as (cfg, link):
        cards, drained = link.run(_members(link.js, cfg.cluster.lease_ttl))

        async def mark(on: bool) -> None:
            await mark_draining(await drain_bucket(link.js), member, on)

        if cancel:
            link.run(mark(False))
            _report(json, {"member": member, "draining": False}, f"{member} is no longer draining")
            return
        if member not in cards:
            raise fail(f"no live member named {member!r} (live: {', '.join(sorted(cards)) or 'none'})")
        serving = set(cards) - drained - {member}
        if not serving:
            raise fail(f"{member} is the only member left serving: its key groups would have no owner; start "
                       "another member first")
        held = sorted(g for g, owner in link.run(_owners(link.js, cfg.cluster.key_groups)).items() if owner == member)
        link.run(mark(True))
        deadline = time.monotonic() + timeout
        while True:
            owners = link.run(_owners(link.js, cfg.cluster.key_groups))
            left = [g for g, owner in owners.items() if owner == member]
            unowned = [g for g in held if owners.get(g, "") in ("", member)]
            if not left and not unowned:
                break
            if time.monotonic() > deadline:
                raise fail(f"{member} still holds {len(left)} key group(s) and {len(unowned)} have no new owner "
                           f"after {timeout:g} s: are the members running and reaching NATS? (lstmd cluster status)")
            time.sleep(_DRAIN_POLL_S)
    moved = {g: owners[g] for g in held}
    _report(json, {"member": member, "draining": True, "may_stop": True, "moved": moved},
            f"{member} holds no key groups ({len(held)} moved to {', '.join(sorted(set(moved.values()))) or 'none'})"
            ": it may stop")


def _report(json: bool, data: dict, line: str) -> None:
    if json:
        print_json(data)
    else:
        console.print(line)
