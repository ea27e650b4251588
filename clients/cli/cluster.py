"""`lstmd cluster status`: the cluster's live members and the key groups each owns (read from NATS, no daemon)."""

from __future__ import annotations

import typer
from lstmd.clients.cli._common import ConfigOpt, JsonOpt, console, fail, load_config_or_exit, print_json
from rich.table import Table

app = typer.Typer(help="Inspect a cluster (members, key groups).", no_args_is_help=True)


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


@app.command()
def status(config: ConfigOpt = None, json: JsonOpt = False) -> None:
    """Members (live heartbeats) and their key groups, by rendezvous hashing as the members compute it."""
    cfg = load_config_or_exit(config)
    if not cfg.cluster.nats:
        raise fail("no cluster configured: [cluster] nats is empty")
    from lstmd.daemon.cluster.log import ClusterError, NatsLink, open_log
    from lstmd.daemon.cluster.membership import assignment, live_members, members_bucket

    try:
        link = NatsLink(cfg.cluster.nats, "lstmd-cluster-status")
    except ClusterError as exc:
        raise fail(str(exc)) from None
    try:
        open_log(link, cfg.cluster.key_groups, cfg.cluster.log_partitions)

        async def read() -> dict:
            return await live_members(await members_bucket(link.js, cfg.cluster.lease_ttl))

        cards = link.run(read())
    except ClusterError as exc:
        raise fail(str(exc)) from None
    finally:
        link.close()
    owned = assignment(cards, cfg.cluster.key_groups)
    members = [{"member": m, "key_groups": owned[m], **cards[m]} for m in owned]
    if json:
        print_json({"nats": cfg.cluster.nats, "key_groups": cfg.cluster.key_groups, "members": members})
        return
    table = Table(title=f"cluster at {cfg.cluster.nats}: {len(members)} member(s), {cfg.cluster.key_groups} key groups")
    for column in ("member", "host", "pid", "key groups", "owned"):
        table.add_column(column)
    for m in members:
        table.add_row(m["member"], str(m.get("host", "")), str(m.get("pid", "")), str(len(m["key_groups"])),
                      _ranges(m["key_groups"]))
    console.print(table)
