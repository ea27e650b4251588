"""CurveZMQ security (daemon/auth.py, clients/curve.py, `lstmd keys`): real daemons on loopback with keys.

What is checked: a known producer key is served; an unknown key, a plain client and an anonymous subscriber get
nothing (and are counted); a producer key may run status but not admin commands (refused with a clear error,
counted); an admin key may; `lstmd keys reload` and SIGHUP's reload let a new key in without a restart; the
daemon refuses a non-loopback bind without security; `lstmd keys generate` writes certificate files pyzmq
reads back, the secret one private.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from lstmd.clients import Admin, DaemonError, Producer, Subscriber
from lstmd.clients.cli import app
from lstmd.clients.curve import CurveKeyError, apply_client_curve
from typer.testing import CliRunner

runner = CliRunner()
FEATURES = np.zeros((2, 8), dtype=np.float32)


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    """A server key pair, one producer and one admin (public halves in their directories), one stranger."""
    root = tmp_path / "keys"
    for sub in ("server", "producers", "admins", "clients"):
        (root / sub).mkdir(parents=True)
    zmq.auth.create_certificates(root / "server", "server")
    for name, public_dir in (("producer", "producers"), ("admin", "admins"), ("stranger", None)):
        zmq.auth.create_certificates(root / "clients", name)
        if public_dir:
            os.replace(root / "clients" / f"{name}.key", root / public_dir / f"{name}.key")
    return {
        "server_secret": root / "server" / "server.key_secret",
        "server_public": root / "server" / "server.key",
        "producers": root / "producers",
        "admins": root / "admins",
        "producer": root / "clients" / "producer.key_secret",
        "admin": root / "clients" / "admin.key_secret",
        "stranger": root / "clients" / "stranger.key_secret",
    }


@pytest.fixture
def secure_daemon(make_daemon, keys):
    return make_daemon(
        security__server_secret_key=str(keys["server_secret"]),
        security__producer_keys_dir=str(keys["producers"]),
        security__admin_keys_dir=str(keys["admins"]),
    )


def failures(daemon, reason: str) -> float:
    return daemon.metrics.registry.get_sample_value("lstmd_auth_failures_total", {"reason": reason})


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def as_client(keys, daemon, name: str, **kwargs) -> dict:
    return {"server_key": str(keys["server_public"]), "client_key": str(keys[name]), **kwargs}


# ---- the daemon with keys ------------------------------------------------------------------------------------


def test_a_known_producer_key_is_served_and_an_unknown_key_is_refused_and_counted(secure_daemon, keys) -> None:
    events = secure_daemon.endpoints["events"]
    with Producer(events, **as_client(keys, secure_daemon, "producer")) as producer:
        assert producer.send(["a", "b"], FEATURES).shape == (2, 1)
    with Producer(events, **as_client(keys, secure_daemon, "admin")) as producer:  # admins may send too
        assert producer.send(["a", "b"], FEATURES).shape == (2, 1)
    stranger = Producer(events, timeout=1.0, **as_client(keys, secure_daemon, "stranger"))
    # Refused at the handshake, libzmq drops the connection and may not try again: a send then has no peer,
    # and must time out (not wait in send for ever).
    assert wait_for(lambda: failures(secure_daemon, "unknown_key") >= 1)
    with stranger, pytest.raises(TimeoutError, match="refused this client") as err:
        stranger.send(["c"], FEATURES[:1])
    assert "lstmd_auth_failures_total" in str(err.value)
    assert secure_daemon.store.describe("c") is None  # nothing of the stranger's reached the loop
    with pytest.raises(TimeoutError, match="refused this client"):
        Admin(secure_daemon.endpoints["control"], timeout=1.0, **as_client(keys, secure_daemon, "stranger")).status()


def test_a_plain_client_gets_nothing_and_is_counted(secure_daemon) -> None:
    with Producer(secure_daemon.endpoints["events"], timeout=1.0) as plain, pytest.raises(TimeoutError):
        plain.send(["p"], FEATURES[:1])
    with pytest.raises(TimeoutError):
        Admin(secure_daemon.endpoints["control"], timeout=1.0).status()
    assert secure_daemon.store.describe("p") is None
    # Counted when libzmq sees the plain greeting; a plain client that reads the daemon's greeting first hangs
    # up, which is only a disconnect (docs/operations.md, Refusals). So knock until one is seen.
    ctx = zmq.Context.instance()

    def knock() -> bool:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(secure_daemon.endpoints["events"])
        sock.send(b"hello")
        seen = wait_for(lambda: failures(secure_daemon, "no_curve") >= 1, timeout=0.3)
        sock.close(linger=0)
        return seen

    assert wait_for(knock, timeout=20)


def test_a_wrong_server_key_fails_the_handshake_and_is_counted(secure_daemon, keys) -> None:
    # The client encrypts its hello to a key that is not the daemon's: the daemon cannot read it.
    wrong = {"server_key": str(keys["admins"] / "admin.key"), "client_key": str(keys["producer"])}
    with Producer(secure_daemon.endpoints["events"], timeout=1.0, **wrong) as producer, pytest.raises(TimeoutError):
        producer.send(["w"], FEATURES[:1])
    assert wait_for(lambda: failures(secure_daemon, "bad_handshake") >= 1)


def test_a_producer_key_runs_status_but_no_admin_command(secure_daemon, keys) -> None:
    control = secure_daemon.endpoints["control"]
    producer = Admin(control, timeout=10, **as_client(keys, secure_daemon, "producer"))
    assert producer.status()["security"] == {"curve": True, "producer_keys": 1, "admin_keys": 1}
    assert producer.model_info()["input_size"] == 8
    for call, cmd in (
        (producer.shutdown, "shutdown"),
        (producer.config, "config"),
        (lambda: producer.drop("a"), "drop"),
        (lambda: producer.export_model("/nonexistent/never-written"), "export_model"),
        (producer.streams, "streams"),
        (producer.reload_keys, "keys_reload"),
    ):
        with pytest.raises(DaemonError, match=f"command '{cmd}' needs an admin key"):
            call()
    assert failures(secure_daemon, "wrong_role") == 6
    refused = secure_daemon.metrics.registry.get_sample_value(
        "lstmd_control_commands_total", {"command": "shutdown", "outcome": "refused"}
    )
    assert refused == 1
    admin = Admin(control, timeout=10, **as_client(keys, secure_daemon, "admin"))
    assert admin.config()["security"]["admin_keys_dir"] == str(keys["admins"])
    assert admin.streams() == []
    assert secure_daemon._thread.is_alive()  # the producer's shutdown did nothing


def test_an_anonymous_subscriber_gets_nothing_while_a_keyed_one_gets_predictions(secure_daemon, keys) -> None:
    publish = secure_daemon.endpoints["publish"]
    anonymous = zmq.Context.instance().socket(zmq.SUB)
    anonymous.setsockopt(zmq.LINGER, 0)
    anonymous.setsockopt(zmq.SUBSCRIBE, b"")
    anonymous.connect(publish)
    keyed = Subscriber(publish, streams=["s1"], timeout=0.2, **as_client(keys, secure_daemon, "producer"))
    try:
        with Producer(secure_daemon.endpoints["events"], **as_client(keys, secure_daemon, "producer")) as producer:
            # A subscription takes a moment to reach the daemon: send until the keyed subscriber hears something.
            deadline = time.monotonic() + 10
            heard = None
            while heard is None:
                assert time.monotonic() < deadline, "the keyed subscriber got no prediction"
                producer.send(["s1", "s2"], FEATURES)
                with contextlib.suppress(TimeoutError):
                    heard = next(iter(keyed))
        assert heard.stream == "s1" and heard.values.shape == (1,)
        assert not anonymous.poll(500)
    finally:
        anonymous.close()
        keyed.close()


def test_reload_lets_a_new_key_in_without_a_restart(secure_daemon, keys, tmp_path) -> None:
    events, control = secure_daemon.endpoints["events"], secure_daemon.endpoints["control"]
    zmq.auth.create_certificates(tmp_path, "newcomer")
    newcomer = {"server_key": str(keys["server_public"]), "client_key": str(tmp_path / "newcomer.key_secret")}
    with Producer(events, timeout=1.0, **newcomer) as producer, pytest.raises(TimeoutError):
        producer.send(["n"], FEATURES[:1])
    (keys["producers"] / "newcomer.key").write_bytes((tmp_path / "newcomer.key").read_bytes())
    admin = Admin(control, timeout=10, **as_client(keys, secure_daemon, "admin"))
    assert admin.reload_keys() == {"producer_keys": 2, "admin_keys": 1}
    with Producer(events, **newcomer) as producer:
        assert producer.send(["n"], FEATURES[:1]).shape == (1, 1)
    # And the other way: a removed key is refused from its next connection on (SIGHUP's path: request_reload).
    (keys["producers"] / "newcomer.key").unlink()
    secure_daemon.security.request_reload()
    assert wait_for(lambda: secure_daemon.security.counts()["producer_keys"] == 1)
    with Producer(events, timeout=1.0, **newcomer) as producer, pytest.raises(TimeoutError):
        producer.send(["n"], FEATURES[:1])


def test_keys_reload_on_a_daemon_without_security_says_so(make_daemon) -> None:
    daemon = make_daemon()
    with pytest.raises(DaemonError, match="security is off"):
        Admin(daemon.endpoints["control"], timeout=10).reload_keys()


# ---- starting -------------------------------------------------------------------------------------------------


def test_the_daemon_refuses_a_non_loopback_bind_without_security(make_daemon) -> None:
    from lstmd.daemon.server import StartupError

    with pytest.raises(StartupError, match=r"refusing to bind events tcp://0\.0\.0\.0:\* without security"):
        make_daemon(serve__events="tcp://0.0.0.0:*")
    # Said explicitly, it binds.
    daemon = make_daemon(serve__events="tcp://0.0.0.0:*", security__allow_insecure=True)
    port = daemon.endpoints["events"].rsplit(":", 1)[1]
    with Producer(f"tcp://127.0.0.1:{port}") as producer:
        assert producer.send(["x"], FEATURES[:1]).shape == (1, 1)


def test_bad_security_config_is_refused_with_the_key_named(make_daemon, keys, tmp_path) -> None:
    from lstmd.daemon.config import ConfigError, load_config
    from lstmd.daemon.server import StartupError

    with pytest.raises(ConfigError, match="neither security.producer_keys_dir nor security.admin_keys_dir"):
        load_config(overrides=[f"security.server_secret_key={keys['server_secret']}"], environ={})
    with pytest.raises(StartupError, match="holds only a public key"):
        make_daemon(security__server_secret_key=str(keys["server_public"]), security__admin_keys_dir=str(tmp_path))
    with pytest.raises(StartupError, match="producer_keys_dir .* is not a directory"):
        make_daemon(
            security__server_secret_key=str(keys["server_secret"]),
            security__producer_keys_dir=str(tmp_path / "missing"),
        )


def test_a_secure_daemon_that_cannot_bind_fails_cleanly(make_daemon, keys, secure_daemon) -> None:
    """The ZAP and monitor threads and their sockets are closed again: the context terminates, no hang."""
    from lstmd.daemon.server import StartupError

    taken = secure_daemon.endpoints["control"]
    with pytest.raises(StartupError, match="cannot bind the control socket"):
        make_daemon(
            serve__control=taken,
            security__server_secret_key=str(keys["server_secret"]),
            security__admin_keys_dir=str(keys["admins"]),
        )
    running = [t for t in threading.enumerate() if t.name == "lstmd-auth"]
    assert running == [secure_daemon.security._monitor_thread]  # only the serving daemon's


def test_refusals_are_all_counted_but_logged_at_most_once_a_second_per_reason(keys, caplog) -> None:
    from types import SimpleNamespace

    from lstmd.daemon.auth import Security

    now = [100.0]  # the clock stands still unless moved here

    counted: list[str] = []
    config = SimpleNamespace(
        server_secret_key=str(keys["server_secret"]), producer_keys_dir=str(keys["producers"]), admin_keys_dir=""
    )
    security = Security(config, counted.append, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="lstmd.auth"):
        for _ in range(50):
            assert not security.callback("lstmd", b"x" * 40)
        why = security.refusal("producer", "drop")
    assert why == "command 'drop' needs an admin key (this client's key is a producer key)"
    assert counted == ["unknown_key"] * 50 + ["wrong_role"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "unknown CURVE key" in lines[0] and "command 'drop' from a producer key" in lines[1]
    now[0] += 1.5
    with caplog.at_level("WARNING", logger="lstmd.auth"):
        security.callback("lstmd", b"x" * 40)
    assert "(and 49 more unknown_key since the last such line)" in caplog.records[-1].getMessage()


def test_client_key_errors_are_clear(tmp_path) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    try:
        with pytest.raises(CurveKeyError, match="does not hold a valid CURVE key"):
            apply_client_curve(sock, garbage, garbage)
        with pytest.raises(CurveKeyError, match="go together|client_key is set but server_key is not"):
            apply_client_curve(sock, None, "x.key_secret")
        with pytest.raises(CurveKeyError, match="server key /nonexistent.key does not exist"):
            apply_client_curve(sock, "/nonexistent.key", "/nonexistent.key_secret")
    finally:
        sock.close()


# ---- the command line ---------------------------------------------------------------------------------------


def test_keys_generate_writes_certificates_pyzmq_reads_with_a_private_secret(tmp_path) -> None:
    result = runner.invoke(app, ["keys", "generate", str(tmp_path / "k"), "--name", "alice"])
    assert result.exit_code == 0, result.output
    public, secret = zmq.auth.load_certificate(tmp_path / "k" / "alice.key_secret")
    assert zmq.auth.load_certificate(tmp_path / "k" / "alice.key") == (public, None)
    assert len(public) == len(secret) == 40  # Z85
    assert stat.S_IMODE((tmp_path / "k" / "alice.key_secret").stat().st_mode) == 0o600
    again = runner.invoke(app, ["keys", "generate", str(tmp_path / "k"), "--name", "alice"])
    assert again.exit_code != 0 and "already exist" in again.output
    bad = runner.invoke(app, ["keys", "generate", str(tmp_path / "k"), "--name", "../x"])
    assert bad.exit_code != 0 and "plain file name" in bad.output


def test_keys_generate_in_a_real_process(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lstmd.clients.cli", "keys", "generate", str(tmp_path), "--name", "server"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert zmq.auth.load_certificate(tmp_path / "server.key_secret")[1] is not None
    assert stat.S_IMODE((tmp_path / "server.key_secret").stat().st_mode) == 0o600


def test_cli_commands_take_the_keys_from_options_or_the_config(secure_daemon, keys, tmp_path) -> None:
    control = secure_daemon.endpoints["control"]
    admin_keys = ["--server-key", str(keys["server_public"]), "--client-key", str(keys["admin"])]
    result = runner.invoke(app, ["status", "--json", "--control", control, *admin_keys])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["keys", "reload", "--control", control, *admin_keys])
    assert result.exit_code == 0 and "1 producer, 1 admin" in result.output, result.output
    config = tmp_path / "client.toml"
    config.write_text(
        f'[security]\nserver_public_key = "{keys["server_public"]}"\nclient_secret_key = "{keys["producer"]}"\n'
    )
    result = runner.invoke(app, ["streams", "list", "--control", control, "--config", str(config)])
    assert result.exit_code == 1 and "command 'streams' needs an admin key" in result.output, result.output
    result = runner.invoke(app, ["model", "info", "--control", control, "--config", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["status", "--control", control, "--server-key", str(keys["server_public"])])
    assert result.exit_code != 0 and "go together" in result.output


def test_bench_curve_runs_lstmd_with_and_without_security(tmp_path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--curve", "--streams", "40", "--hidden", "8", "--events-per-message", "10"]
    result = runner.invoke(app, [*args, "--duration", "0.5", "--warmup", "0.3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    runs = {r["server"]: r for r in summary["runs"]}
    assert set(runs) == {"lstmd", "lstmd+curve"}
    for run in runs.values():
        assert run["events"] > 0 and run["errors"] == 0
    assert runs["lstmd+curve"]["batch_mean"] > 0  # its status was read with the run's admin key
    assert summary["curve_vs_plain"] > 0 and "with CURVE / without" in result.output


def test_sighup_reloads_the_keys_of_a_real_daemon(keys, tmp_path) -> None:
    """`lstmd serve` in its own process: SIGHUP lets a key added after the start in, without a restart."""
    from lstmd.clients.bench import Workload, start_daemon

    security = [
        f"security.server_secret_key={keys['server_secret']}",
        f"security.producer_keys_dir={keys['producers']}",
    ]
    log = tmp_path / "daemon.log"
    server, endpoints = start_daemon(Workload(streams=4, hidden_size=8), tmp_path / "state", security, log=log)
    try:
        zmq.auth.create_certificates(tmp_path, "late")
        late = {"server_key": str(keys["server_public"]), "client_key": str(tmp_path / "late.key_secret")}
        with Producer(endpoints["events"], timeout=1.0, **late) as producer, pytest.raises(TimeoutError):
            producer.send(["l"], FEATURES[:1])
        (keys["producers"] / "late.key").write_bytes((tmp_path / "late.key").read_bytes())
        os.kill(server.proc.pid, signal.SIGHUP)

        def served() -> bool:
            with Producer(endpoints["events"], timeout=1.0, **late) as producer:
                try:
                    return producer.send(["l"], FEATURES[:1]).shape == (1, 1)
                except TimeoutError:
                    return False

        assert wait_for(served, timeout=30)
        assert server.proc.poll() is None  # reloaded, not restarted
    finally:
        server.stop()
    assert "refused a connection with an unknown CURVE key" in log.read_text()  # before the reload


def test_bench_drives_a_running_daemon_with_keys(secure_daemon, keys, tmp_path) -> None:
    out = tmp_path / "bench.json"
    endpoints = secure_daemon.endpoints
    args = ["bench", "--events", endpoints["events"], "--control", endpoints["control"], "--streams", "20"]
    args += ["--server-key", str(keys["server_public"]), "--client-key", str(keys["admin"])]
    result = runner.invoke(app, [*args, "--events-per-message", "10", "--duration", "0.5", "--warmup", "0.3",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(out.read_text())["runs"]
    assert run["events"] > 0 and run["errors"] == 0 and run["batch_mean"] > 0
