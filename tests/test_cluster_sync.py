"""One model across a cluster (daemon/cluster/weights.py) against a real nats-server on loopback: replicas that
train publish weight deltas, the elected averager publishes the next version, every replica serves it; records are
applied with the version their log position names, before and after a failover; an operator's import reaches
every replica; the averager's lease moves when it dies.

Skipped, with the reason, only where nats-py or the nats-server binary is absent (as tests/test_cluster.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from tests.cluster_helpers import gateway, needs_server, start_replica, stop_replicas, wait, wait_for_snapshots

pytestmark = needs_server


@pytest.fixture
def nats(nats_url) -> str:
    """tests/conftest.py's nats-server on loopback, started for the test: its URL."""
    return nats_url


STREAMS, STEPS, G = 24, 120, 16
MODEL = {"model.input_size": 4, "model.hidden_size": 8, "model.output_size": 2, "model.seed": 3}
TRAIN = {
    "train.enabled": True,
    "train.interval": 0.2,
    "train.k2": 4,
    "train.record_steps": 16,
    "train.batch": 8,
    "train.steps": 2,
    "train.min_windows": 1,
    "train.tolerance": 100.0,  # every finished round is a candidate: the test is about sync, not the gate
    "train.nice": 0,
}
CLUSTER = {"cluster.key_groups": G, "cluster.sync_interval": 0.5, "cluster.snapshot_interval_s": 60.0}


def _trace(steps: int = STEPS, seed: int = 0):
    """Numbered messages of one event per stream, with learnable targets (a fixed linear map of the features)."""
    rng = np.random.default_rng(seed)
    streams = [f"s{i}" for i in range(STREAMS)]
    w = rng.standard_normal((4, 2)).astype(np.float32)
    for step in range(steps):
        x = rng.standard_normal((STREAMS, 4)).astype(np.float32)
        yield streams, x, x @ w, [step + 1] * STREAMS


def _link(url: str):
    from lstmd.daemon.cluster.log import NatsLink

    return NatsLink(url, "test")


def _table(link):
    from lstmd.daemon.cluster import weights

    async def read():
        kv = await link.js.key_value(weights.MODEL_BUCKET)
        return weights._table_codec[1].decode((await kv.get(weights.TABLE_KEY)).value)

    return link.run(read())


def _latest(link) -> int:
    try:
        table = _table(link)
    except Exception:  # no version published yet
        return 0
    return table.versions[-1].version if table.versions else 0


def _lease(link):
    from lstmd.daemon.cluster import weights

    async def read():
        kv = await link.js.key_value(weights.MODEL_BUCKET)
        return weights._lease_codec[1].decode((await kv.get(weights.LEASE_KEY)).value)

    return link.run(read())


def _exported(admin) -> tuple[int, bytes]:
    """(version, the model file's bytes) that `admin`'s replica serves."""
    result = admin.call("export_model")
    return result["version"], base64.b64decode(result["safetensors_b64"])


def _tensor_bytes(data: bytes) -> dict[str, bytes]:
    from safetensors.numpy import load

    return {name: array.tobytes() for name, array in load(data).items()}


def test_version_table_and_the_weighted_average():
    """The rule (a record takes the version of the newest marker before its position; the initial model before
    any; the floor for positions between it and the oldest kept) and the average of deltas weighted by windows,
    through their safetensors encoding."""
    import torch
    from lstmd.daemon.cluster.weights import VersionEntry, VersionTable, average, decode_delta, encode_delta
    from lstmd.daemon.model import ModelSpec, ServingModel

    table = VersionTable([VersionEntry(3, 100, "c"), VersionEntry(4, 180, "d")], floor=VersionEntry(2, 50, "b"))
    assert [table.at(p, 0) for p in (60, 100, 101, 180, 181, 10**9)] == [2, 2, 3, 3, 4, 4]
    assert VersionTable().at(7, 0) == 0 and table.latest(0) == 4 and VersionTable().latest(0) == 0
    assert table.entry(2).object == "b" and table.entry(1) is None

    spec = ModelSpec(4, 8, 1, 2, "regression")
    base = ServingModel.initial(spec, 1)
    base.version = 4
    trained = [ServingModel(spec, {k: v + step for k, v in base.tensors.items()}) for step in (1.0, 4.0)]
    deltas = []
    for member, (model, windows) in enumerate(zip(trained, (3, 1), strict=True)):
        meta, delta = decode_delta(encode_delta(model, base, f"r{member}", windows))
        assert meta["base"] == "4" and meta["member"] == f"r{member}"
        deltas.append((int(meta["windows"]), delta))
    averaged = average(base, deltas)
    for name, tensor in base.tensors.items():  # (3 * 1 + 1 * 4) / 4
        torch.testing.assert_close(averaged[name], tensor + 1.75)


def test_three_training_replicas_serve_one_version(nats, make_daemon, tmp_path):
    """3 replicas train on their own streams; after a sync every replica serves the same version, an average
    published by the averager, with the same weights bytes (not the initial model's)."""
    from lstmd.clients import Admin, Producer

    replicas = [make_daemon(**MODEL, **TRAIN, **CLUSTER, **{"cluster.nats": nats, "cluster.member": f"r{i}"})
                for i in range(3)]
    gw = gateway(nats, tmp_path, MODEL, **{"cluster.key_groups": G})
    link = _link(nats)
    try:
        with Producer(gw.endpoint, timeout=60) as producer:
            for streams, x, y, seqs in _trace():
                assert set(producer.send_detailed(streams, x, targets=y, seqs=seqs).status_names) == {"ok"}
        admins = [Admin(r.endpoints["control"]) for r in replicas]

        def same_everywhere():
            latest = _latest(link)
            got = [_exported(a) for a in admins]
            return got if latest >= 1 and all(v == latest for v, _ in got) else None

        got = wait("every replica serving the newest version", same_everywhere, timeout=60)
        weights = [_tensor_bytes(data) for _, data in got]
        assert weights[0] == weights[1] == weights[2]  # the same weights bytes on every replica
        from lstmd.daemon.model import ModelSpec, ServingModel

        initial = _tensor_bytes(ServingModel.initial(ModelSpec(4, 8, 1, 2, "regression"), 3).to_bytes())
        assert weights[0] != initial
        table = _table(link)
        assert [e.version for e in table.versions] == list(range(1, len(table.versions) + 1))
        assert any(e.source.startswith("average of") for e in table.versions)
        for replica in replicas:  # its own candidates went to the averager, never served alone
            assert replica.versions.listing(replica.engine.model.version)[0]["source"] == "cluster"
    finally:
        gw.stop_and_join()
        link.close()


def test_import_against_one_replica_reaches_all(nats, make_daemon, tmp_path):
    """`model import` against one replica (no training) publishes the next cluster version; every replica serves
    it, the gateway's replies name it, and `lstmd cluster status` shows it per member; rollback does the same."""
    from lstmd.clients import Admin, Producer
    from lstmd.clients.cli import app
    from lstmd.daemon.model import ModelSpec, ServingModel
    from typer.testing import CliRunner

    replicas = [make_daemon(**MODEL, **CLUSTER, **{"cluster.nats": nats, "cluster.member": f"r{i}"})
                for i in range(2)]
    gw = gateway(nats, tmp_path, MODEL, **{"cluster.key_groups": G})
    try:
        spec = ModelSpec(4, 8, 1, 2, "regression")
        path = tmp_path / "m.safetensors"
        path.write_bytes(ServingModel.initial(spec, seed=11).to_bytes())
        admins = [Admin(r.endpoints["control"]) for r in replicas]
        assert admins[1].import_model(str(path))["version"] == 1
        wait("every replica serving version 1", lambda: all(r.engine.model.version == 1 for r in replicas), 30)
        for replica in replicas:
            assert replica.engine.model.tensors["head.bias"].tolist() == \
                ServingModel.from_bytes(path.read_bytes()).tensors["head.bias"].tolist()
        with Producer(gw.endpoint, timeout=30) as producer:
            streams, x, _, seqs = next(_trace())
            assert producer.send_detailed(streams, x, seqs=seqs).version == 1
        config = tmp_path / "c.toml"
        config.write_text(f'[cluster]\nnats = "{nats}"\nkey_groups = {G}\n')
        # the member cards carry the version at the next heartbeat
        wait("cards at version 1", lambda: all(
            m["model_version"] == 1 for m in json.loads(CliRunner().invoke(
                app, ["cluster", "status", "--json", "--config", str(config)]).output)["members"]), 30)
        result = CliRunner().invoke(app, ["cluster", "status", "--json", "--config", str(config)])
        status = json.loads(result.output)
        assert status["model_version"] == 1
        result = CliRunner().invoke(app, ["cluster", "status", "--config", str(config)])
        assert result.exit_code == 0 and "model version 1" in result.output, result.output
        assert admins[0].rollback(0)["version"] == 2
        wait("every replica serving version 2", lambda: all(r.engine.model.version == 2 for r in replicas), 30)
        initial = ServingModel.initial(spec, seed=3)
        for replica in replicas:
            assert replica.engine.model.tensors["head.bias"].tolist() == initial.tensors["head.bias"].tolist()
    finally:
        gw.stop_and_join()


def test_half_published_versions_are_completed_dangling_ones_ignored_old_ones_trimmed(nats, make_daemon, tmp_path):
    """A publisher that died between its marker and the version table: the replicas reading the marker complete
    the table, and serve it. A marker whose table compare-and-set lost (read at an old revision): in the log,
    in no table, served by no one. Retention: with cluster.model_versions = 2 the table keeps 2 versions and the
    object store their objects plus the floor's."""
    from lstmd.clients import Admin
    from lstmd.daemon.cluster import weights
    from lstmd.daemon.cluster.log import LOG_STREAM
    from lstmd.daemon.model import ModelSpec, ServingModel

    replicas = [make_daemon(**MODEL, **CLUSTER, **{"cluster.nats": nats, "cluster.member": f"r{i}",
                                                   "cluster.model_versions": 2}) for i in range(2)]
    admin = Admin(replicas[0].endpoints["control"])
    spec = ModelSpec(4, 8, 1, 2, "regression")
    link = _link(nats)

    def file(seed: int) -> Path:
        path = tmp_path / f"m{seed}.safetensors"
        path.write_bytes(ServingModel.initial(spec, seed=seed).to_bytes())
        return path

    def bias(seed: int) -> list[float]:
        return ServingModel.initial(spec, seed=seed).tensors["head.bias"].tolist()

    async def marker_only(seed: int, version: int, base_revision: int) -> int:
        objects = await link.js.object_store(weights.MODELS_BUCKET)
        name = f"test-{seed}"
        await objects.put(name, ServingModel.initial(spec, seed=seed).to_bytes())
        marker = weights.Marker(version, name, base_revision, "test")
        ack = await link.js.publish(weights.MARKER_SUBJECT, weights._marker_codec[0].encode(marker), stream=LOG_STREAM)
        return ack.seq

    async def revision() -> int:
        return (await (await link.js.key_value(weights.MODEL_BUCKET)).get(weights.TABLE_KEY)).revision

    def serving(version: int, seed: int) -> bool:
        return all(r.engine.model.version == version and r.engine.model.tensors["head.bias"].tolist() == bias(seed)
                   for r in replicas)

    try:
        assert admin.import_model(str(file(11)))["version"] == 1
        wait("version 1 everywhere", lambda: serving(1, 11), 30)
        position = link.run(marker_only(12, 2, link.run(revision())))  # then the publisher "died"
        wait("version 2 completed and served", lambda: serving(2, 12), 30)
        assert [(e.version, e.position) for e in _table(link).versions][-1] == (2, position)
        stale = link.run(marker_only(13, 3, 1))  # read at revision 1: the table has moved on since
        assert admin.import_model(str(file(14)))["version"] == 3
        wait("version 3 everywhere", lambda: serving(3, 14), 30)
        table = _table(link)
        assert stale not in [e.position for e in table.versions]
        assert [e.version for e in table.versions] == [2, 3] and table.floor.version == 1

        async def objects() -> set[str]:
            store = await link.js.object_store(weights.MODELS_BUCKET)
            return {info.name for info in await store.list() if not info.deleted}

        assert admin.import_model(str(file(15)))["version"] == 4
        table = _table(link)
        assert [e.version for e in table.versions] == [3, 4] and table.floor.version == 2
        kept = link.run(objects())
        assert {e.object for e in (*table.versions, table.floor)} <= kept
        assert not any(name.startswith("model-1-") for name in kept)  # the old floor's object was deleted
    finally:
        link.close()


def test_a_record_applied_during_a_handover_is_answered(nats, make_daemon, tmp_path):
    """The loop is serving a batch when a joining member makes this one hand key groups over: the handover
    snapshot is taken after that batch and holds its records, so the new owner will not replay them; this member
    must answer them itself (it used to drop those answers, and the producer waited out its timeout)."""
    import threading

    from lstmd.clients import Producer

    member = {**MODEL, **CLUSTER, "cluster.nats": nats}
    old = make_daemon(**member, **{"cluster.member": "r0"})
    gw = gateway(nats, tmp_path, MODEL, **{"cluster.key_groups": G})
    source = old._events  # the replica's ClusterSource
    answer, hold = source.send, threading.Event()

    def send_after_the_handover_began(frames):  # one batch of the loop, held until the handover has begun
        if hold.is_set():
            wait("the handover under way", lambda: len(source.owned) < G, 60)
            hold.clear()
        return answer(frames)

    source.send = send_after_the_handover_began
    trace = list(_trace(steps=2))
    try:
        with Producer(gw.endpoint, timeout=30, retries=0) as producer:  # a resend would hide a lost answer
            streams, x, y, seqs = trace[0]
            producer.send(streams, x, targets=y, seqs=seqs)
            hold.set()
            threading.Thread(target=make_daemon, kwargs={**member, "cluster.member": "r1"}, daemon=True).start()
            streams, x, y, seqs = trace[1]
            result = producer.send_detailed(streams, x, targets=y, seqs=seqs)
        assert set(result.status_names) == {"ok"}
        assert not hold.is_set()  # the batch was held through a handover
    finally:
        gw.stop_and_join()


def _replica(nats_url: str, tmp_path: Path, member: str):
    """A training replica as a real `lstmd serve` process (so it can be killed -9): (process, state directory)."""
    return start_replica(nats_url, tmp_path, member, MODEL, **TRAIN, **{
        "cluster.key_groups": G, "cluster.sync_interval": 0.5, "cluster.snapshot_interval_s": 1.0})


def _recompute(log, table, models, spec_seed: int = 3):
    """Replay the log by hand: every (stream, seq) once, in log order, with the version `table.at(position)` names.
    Returns ({(stream, seq): prediction}, {(stream, seq): version}, {stream: (h, c)}, {stream: events})."""
    import msgspec
    import torch
    from lstmd.clients import protocol
    from lstmd.daemon.cluster import log as clog
    from lstmd.daemon.cluster.weights import MARKER_SUBJECT

    predictions, state, events, versions = {}, {}, {}, {}
    for position, subject, data in sorted(log):
        if subject == MARKER_SUBJECT:
            continue
        record = clog.log_record_codec[1].decode(data)
        header = msgspec.msgpack.decode(record.header, type=protocol.EventsHeader)
        features = np.frombuffer(bytearray(record.features), dtype=np.float32)
        x = torch.from_numpy(features.reshape(len(header.streams), -1))
        version = table.at(position, 0)
        t = models[version].tensors
        for i, (stream, seq) in enumerate(zip(header.streams, header.seqs, strict=True)):
            if (stream, seq) in predictions:
                continue  # a resend stored twice: applied once
            h, c = state.get(stream, (torch.zeros(8), torch.zeros(8)))
            gates = t["weight_ih_l0"] @ x[i] + t["bias_ih_l0"] + t["weight_hh_l0"] @ h + t["bias_hh_l0"]
            i_, f, g, o = gates.chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i_) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            state[stream] = (h, c)
            events[stream] = events.get(stream, 0) + 1
            predictions[(stream, seq)] = (t["head.weight"] @ h + t["head.bias"]).numpy()
            versions[(stream, seq)] = version
    return predictions, versions, state, events


def test_kill_9_with_training_applies_each_event_once_under_one_version(nats, tmp_path):
    """3 training replicas (real processes); the averager is killed -9 at 40% of the trace, after at least one
    averaged version; another member takes the averager's lease and publishes the next version. Every (stream,
    seq) is answered once; recomputing the whole log by hand, each record with the version of the newest marker
    before its log position, gives every prediction the producer got and every stream's final (h, c) on its owner
    now (which restored a key group snapshot and replayed the records after it). So no event was applied under
    two versions, before or after the failover. Tolerance 1e-5 (float32, BLAS blocking)."""
    from lstmd.clients import Admin, Producer
    from lstmd.daemon.cluster import weights
    from lstmd.daemon.cluster.log import LOG_STREAM, SUBJECT_PREFIX, key_group
    from lstmd.daemon.cluster.membership import assignment, live_members, members_bucket
    from lstmd.daemon.model import ModelSpec, ServingModel
    from nats.js import api

    procs = {m: _replica(nats, tmp_path, m) for m in ("r1", "r2", "r3")}
    link = _link(nats)
    log: list[tuple[int, str, bytes]] = []

    def members() -> set[str]:
        async def read():
            return await live_members(link.js, await members_bucket(link.js, 2.0))

        return set(link.run(read()))

    def control(member: str) -> str:
        path = procs[member][1] / "endpoints.json"
        return json.loads(path.read_text())["control"] if path.exists() else ""

    async def follow():  # the whole log as it is written (snapshots trim it behind the replicas)
        async def on(msg):
            log.append((msg.metadata.sequence.stream, msg.subject, msg.data))

        return await link.js.subscribe(f"{SUBJECT_PREFIX}*", stream=LOG_STREAM, cb=on, ordered_consumer=True,
                                       deliver_policy=api.DeliverPolicy.ALL)

    gw = None
    try:
        wait("three members", lambda: members() == {"r1", "r2", "r3"} and all(map(control, procs)))
        link.run(follow())
        gw = gateway(nats, tmp_path, MODEL, **{"cluster.key_groups": G})
        got, replied = {}, []
        with Producer(gw.endpoint, timeout=60) as producer:
            for step, (streams, x, y, seqs) in enumerate(_trace()):
                if step == STEPS * 2 // 5:
                    wait("an averaged version", lambda: _latest(link) >= 1, timeout=60)
                    victim, before = _lease(link).owner, _latest(link)
                    # a successor restores the victim's snapshots (asserted below): let it have taken them
                    held = {key_group(s, G) for s in streams} & set(assignment({"r1", "r2", "r3"}, G)[victim])
                    wait_for_snapshots(nats, held, victim)
                    procs[victim][0].kill()
                result = producer.send_detailed(streams, x, targets=y, seqs=seqs)
                assert set(result.status_names) == {"ok"}
                replied.append((streams, seqs, result.version))
                got.update(((s, q), p) for s, q, p in zip(streams, seqs, result.predictions, strict=True))
        assert procs[victim][0].wait(10) == -9
        survivors = {"r1", "r2", "r3"} - {victim}
        groups = {key_group(s, G) for s in next(_trace())[0]}
        assert groups & set(assignment({"r1", "r2", "r3"}, G)[victim])  # the victim held streams: they moved
        logs = "".join((tmp_path / f"{m}.log").read_text() for m in survivors)
        assert "restored" in logs  # a new owner restored a snapshot of the victim's and replayed the records after it
        # the averager was the victim: another member took its lease and averages on
        wait("a new averager", lambda: _lease(link).owner in survivors, timeout=30)
        wait("a version from the new averager", lambda: _latest(link) > before, timeout=60)

        owners = assignment(survivors, G)
        owner_of = {g: m for m, gs in owners.items() for g in gs}
        admins = {m: Admin(control(m)) for m in owners}

        def applied(stream):
            from lstmd.clients.admin import DaemonError

            try:
                state = admins[owner_of[key_group(stream, G)]].stream(stream)
            except DaemonError:
                return None
            return state if state["last_seq"] == STEPS else None

        finals = {s: wait(f"stream {s} applied", lambda s=s: applied(s)) for s in next(_trace())[0]}
        wait("the whole log read", lambda: len(log) >= link.run(link.js.stream_info(LOG_STREAM)).state.last_seq)
        table = _table(link)
        spec = ModelSpec(4, 8, 1, 2, "regression")
        models = {0: ServingModel.initial(spec, 3)}

        async def fetch(entry):
            objects = await link.js.object_store(weights.MODELS_BUCKET)
            return ServingModel.from_bytes((await objects.get(entry.object)).data)

        for entry in table.versions:
            models[entry.version] = link.run(fetch(entry))
        predictions, versions, state, events = _recompute(log, table, models)
        assert len(set(versions.values())) >= 2, "the trace ran under one version only"
        assert predictions.keys() == got.keys()
        for key, prediction in got.items():
            np.testing.assert_allclose(prediction, predictions[key], atol=1e-5, rtol=0, err_msg=str(key))
        for stream, final in finals.items():
            assert final["events"] == events[stream] == STEPS  # applied exactly once along the owners' lineage
            np.testing.assert_allclose(np.asarray(final["h"]).ravel(), state[stream][0].numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(final["c"]).ravel(), state[stream][1].numpy(), atol=1e-5, rtol=0)
        # each reply names the newest version its records were applied under
        for streams, seqs, version in replied:
            assert version == max(versions[key] for key in zip(streams, seqs, strict=True))
    finally:
        if gw is not None:
            gw.stop_and_join()
        link.close()
        stop_replicas(procs)
