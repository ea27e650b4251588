"""A replica reads only the log partitions that hold its key groups (daemon/cluster/replica.py `_read_subjects`):
with a partition per key group (log_partitions = key_groups) each of three replicas reads about a third of the
log, through a kill -9 and a join, and still answers exactly like one daemon."""

from __future__ import annotations

import json
import re

import numpy as np

from tests.cluster_helpers import gateway, needs_server, start_replica, stop_replicas, wait
from tests.test_cluster import MODEL, STEPS, _replayed, _run, _trace

pytestmark = needs_server

GROUPS = 32
PARTITIONED = {"cluster.key_groups": GROUPS, "cluster.log_partitions": GROUPS}


def test_replicas_read_only_their_partitions_through_a_kill_and_a_join(nats_url, make_daemon, tmp_path):
    from lstmd.clients import Admin, Producer
    from lstmd.daemon.cluster.log import NatsLink, key_group
    from lstmd.daemon.cluster.membership import assignment, live_members, members_bucket

    single = make_daemon(**MODEL)
    expected = _run(single.endpoints["events"])
    procs = {m: start_replica(nats_url, tmp_path, m, MODEL, **PARTITIONED) for m in ("r1", "r2", "r3")}
    link = NatsLink(nats_url, "test")

    def members() -> set[str]:
        return set(link.run(live_members(link.js, link.run(members_bucket(link.js, 2.0)))))

    def control(member: str) -> str:
        path = procs[member][1] / "endpoints.json"
        return json.loads(path.read_text())["control"] if path.exists() else ""

    gw = None
    try:
        wait("three members", lambda: members() == {"r1", "r2", "r3"} and all(map(control, procs)))
        gw = gateway(nats_url, tmp_path, MODEL, **PARTITIONED)
        got = []
        with Producer(gw.endpoint, timeout=60) as producer:
            for step, (streams, x, seqs) in enumerate(_trace()):
                if step == STEPS * 2 // 5:
                    procs["r1"][0].kill()
                if step == STEPS * 7 // 10:
                    procs["r4"] = start_replica(nats_url, tmp_path, "r4", MODEL, **PARTITIONED)
                got.append(producer.send(streams, x, seqs=seqs))
        np.testing.assert_allclose(np.stack(got), expected, atol=1e-5, rtol=0)
        wait("r4 joined, r1 gone", lambda: members() == {"r2", "r3", "r4"} and control("r4"))
        owners = assignment({"r2", "r3", "r4"}, GROUPS)
        owner_of = {g: m for m, groups in owners.items() for g in groups}
        admins = {m: Admin(control(m)) for m in owners}
        reference = Admin(single.endpoints["control"])
        for stream in next(_trace())[0]:
            b = wait(f"stream {stream} replayed", lambda a=admins[owner_of[key_group(stream, GROUPS)]], s=stream:
                      _replayed(a, s))
            a = reference.stream(stream)
            assert b["events"] == a["events"] == STEPS
            np.testing.assert_allclose(b["h"], a["h"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(b["c"], a["c"], atol=1e-5, rtol=0)
        # each member read only the partitions of its own key groups: fewer than all 32
        for member in ("r2", "r3", "r4"):
            read = [int(n) for n in re.findall(r"reads the log from position \d+, (\d+) of 32 partitions",
                                                (tmp_path / f"{member}.log").read_text())]
            assert read and read[-1] == len(owners[member]) < GROUPS, (member, read)
    finally:
        if gw is not None:
            gw.stop_and_join()
        link.close()
        stop_replicas(procs)
