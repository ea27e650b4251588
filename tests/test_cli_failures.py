"""No traceback for a user mistake anywhere in the `lstmd` command line: every command with bad input (missing
files, bad endpoints, bad values, nothing listening) exits non-zero with a line saying what was wrong, through
CliRunner and as a real subprocess per command group. Control commands against nothing fail within --timeout.

(`lstmd config`, `keys` and `watch` are covered by their own branches' tests.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lstmd.clients.cli import app
from safetensors.numpy import save_file
from typer.testing import CliRunner

runner = CliRunner()

CONTROL_COMMANDS = [
    ["status"],
    ["streams", "list"],
    ["streams", "show", "a"],
    ["streams", "reset", "a"],
    ["streams", "drop", "a"],
    ["model", "info"],
    ["model", "export", "{tmp}/m.safetensors"],
    ["model", "import", "{tmp}/model.safetensors"],
    ["model", "versions"],
    ["model", "rollback"],
    ["model", "rollback", "3"],
    ["train", "status"],
    ["train", "now"],
    ["train", "pause"],
    ["train", "resume"],
    ["snapshot"],
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens here once the socket closes


def run(*args: str):
    """CliRunner, with exceptions caught so that an uncaught one fails the test instead of escaping it."""
    result = runner.invoke(app, list(args), env={k: None for k in os.environ if k.startswith("LSTMD_")})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"`lstmd {' '.join(args)}` raised {result.exception!r}"
    )
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def files(tmp_path) -> Path:
    # A real safetensors file (the CLI checks the header before it connects), of no lstmd model: the daemon
    # would refuse it, but these commands fail before they reach one.
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "e.csv").write_text("stream,a,b\n1,1,1\n2,,2\n")
    return tmp_path


def _args(command: list[str], tmp: Path) -> list[str]:
    return [part.format(tmp=tmp) for part in command]


@pytest.mark.parametrize("command", CONTROL_COMMANDS, ids=" ".join)
def test_control_commands_against_nothing_fail_fast_and_say_what_to_do(command, files):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    result = run(*_args(command, files), "--control", endpoint, "--timeout", "0.2")
    assert result.exit_code == 1
    assert f"no daemon answered at {endpoint} within 0.2 s: is `lstmd serve` running?" in result.stderr
    assert "The endpoint came from --control" in result.stderr and "--timeout SECONDS" in result.stderr


def test_the_default_timeout_is_seconds_not_half_a_minute():
    started = time.monotonic()
    result = run("status", "--control", f"tcp://127.0.0.1:{free_port()}")
    assert result.exit_code == 1 and "within 3 s" in result.stderr
    assert time.monotonic() - started < 20  # was 31 s; 3 s plus start-up, with room for a loaded machine


@pytest.mark.parametrize("command", CONTROL_COMMANDS, ids=" ".join)
def test_control_commands_with_a_malformed_endpoint(command, files):
    result = run(*_args(command, files), "--control", "localhost:5556")
    assert result.exit_code == 1
    assert "cannot connect to 'localhost:5556'" in result.stderr and "tcp://127.0.0.1:5556" in result.stderr


@pytest.mark.parametrize("command", CONTROL_COMMANDS, ids=" ".join)
def test_control_commands_with_a_missing_config_file(command, files):
    result = run(*_args(command, files), "--config", str(files / "nope.toml"))
    assert result.exit_code == 2 and "nope.toml" in result.stderr


def test_the_endpoint_comes_from_the_state_dirs_endpoints_file(tmp_path):
    """A daemon started with --set ports the config file does not have is still found, through endpoints.json."""
    port = free_port()
    config = tmp_path / "lstmd.toml"
    config.write_text(f"[state]\ndir = '{tmp_path / 'state'}'\n")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "endpoints.json").write_text(f'{{"control": "tcp://127.0.0.1:{port}"}}')
    result = run("status", "--config", str(config), "--timeout", "0.2")
    assert result.exit_code == 1 and f"tcp://127.0.0.1:{port}" in result.stderr
    assert f"The endpoint came from {tmp_path / 'state' / 'endpoints.json'}" in result.stderr


BAD_INPUT = [
    (["status", "--timeout", "abc"], 2, "--timeout"),
    (["status", "--timeout", "-1"], 2, "--timeout"),
    (["streams", "list", "--limit", "many"], 2, "--limit"),
    (["model", "rollback", "latest"], 2, "'version'"),
    (["model", "import", "{tmp}/missing.safetensors"], 1, "is not a file"),
    (["model", "export", "{tmp}/no/such/dir/m.safetensors"], 1, "does not exist"),
    (["train", "now", "--wait", "soon"], 2, "--wait"),
    (["serve", "--log-level", "verbose"], 2, "'verbose' is not one of"),
    (["serve", "--config", "{tmp}/missing.toml"], 2, "missing.toml"),
    (["serve", "--set", "nosuch.key=1"], 2, "nosuch"),
    (["demo", "--streams", "0"], 2, "--streams"),
    (["demo", "--set", "model.hidden_size=abc"], 2, "hidden_size"),
    (["replay", "{tmp}/missing.csv"], 1, "cannot read"),
    (["replay", "{tmp}/e.csv", "--batch", "0"], 2, "--batch"),
    (["replay", "{tmp}/e.csv", "--fill", "zero"], 2, "--fill"),
    (["replay", "{tmp}/e.csv", "--stream-col", "id"], 1, "no stream column 'id'"),
    (["replay", "{tmp}/e.csv", "--features", "a,c"], 1, "lacks column(s) c"),
    (["replay", "{tmp}/e.csv"], 1, "line 3, column 'a': empty or NaN"),
    (["replay", "{tmp}/e.csv", "--fill", "0", "--events", "nowhere"], 1, "is not a ZeroMQ endpoint"),
    (["replay", "{tmp}/e.csv", "--fill", "0", "--events", "tcp://127.0.0.1:{port}", "--timeout", "0.2"], 1,
     "no daemon answered"),
    (["replay", "{tmp}/e.csv", "--plot", "{tmp}/p.png"], 1, "--target"),
    (["top", "--interval", "0"], 2, "--interval"),
    (["top", "--metrics", "127.0.0.1:{port}", "--once", "--interval", "0.05"], 1, "cannot read"),
    (["top", "--metrics", "no-port-here", "--once", "--interval", "0.05"], 1, "cannot read"),
    (["top", "--json"], 2, "--once"),
    (["bench", "--compare", "triton"], 2, "naive"),
    (["bench", "--ids", "uuid"], 2, "int or str"),
    (["bench", "--rate", "fast"], 2, "half"),
    (["bench", "--streams", "0"], 2, "positive"),
    (["bench", "--out", "{tmp}/no/such/dir/b.json"], 1, "does not exist"),
    (["bench", "--control", "tcp://127.0.0.1:{port}"], 2, "--events"),
    (["bench", "--events", "tcp://127.0.0.1:{port}", "--control", "tcp://127.0.0.1:{port}"], 1,
     "no daemon answered"),
]  # fmt: skip


def _id(value) -> str:
    return " ".join(value) if isinstance(value, list) else ""


@pytest.mark.parametrize(("command", "code", "says"), BAD_INPUT, ids=_id)
def test_bad_input_is_one_clear_error(command, code, says, files):
    port = free_port()
    result = run(*[part.format(tmp=files, port=port) for part in command])
    assert result.exit_code == code, result.output
    assert says in result.output, result.output


def test_mistakes_against_a_running_daemon(make_daemon, tmp_path):
    daemon = make_daemon()
    control = ["--control", daemon.endpoints["control"]]
    wrong = run("status", "--control", daemon.endpoints["events"])
    assert wrong.exit_code == 1 and "not as an lstmd control socket" in wrong.stderr
    publish = run("status", "--control", daemon.endpoints["publish"], "--timeout", "0.5")
    assert publish.exit_code == 1 and "accepted the connection, but no lstmd control handshake" in publish.stderr
    missing = run("streams", "show", "nobody", *control)
    assert missing.exit_code == 1 and "no stream 'nobody'" in missing.stderr
    not_a_model = tmp_path / "data.csv"
    not_a_model.write_text("a,b\n1,2\n")
    refused = run("model", "import", str(not_a_model), *control)
    assert refused.exit_code == 1 and refused.stderr.startswith("error:")
    (tmp_path / "dir.safetensors").mkdir()
    unwritable = run("model", "export", str(tmp_path / "dir.safetensors"), *control)
    assert unwritable.exit_code == 1 and "cannot write" in unwritable.stderr
    assert run("model", "rollback", "99", *control).exit_code == 1


def _lstmd() -> list[str]:
    exe = Path(sys.executable).with_name("lstmd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lstmd.clients.cli"]


# One real process per command group: the installed entry point, its exit code, its stderr.
SUBPROCESS = [
    ["status", "--control", "tcp://127.0.0.1:{port}", "--timeout", "0.2"],
    ["streams", "list", "--control", "bad-endpoint"],
    ["model", "import", "{tmp}/missing.safetensors"],
    ["train", "status", "--config", "{tmp}/missing.toml"],
    ["snapshot", "--control", "tcp://127.0.0.1:{port}", "--timeout", "0.2"],
    ["replay", "{tmp}/e.csv"],
    ["top", "--metrics", "127.0.0.1:{port}", "--once", "--interval", "0.05"],
    ["bench", "--rate", "fast"],
    ["serve", "--log-level", "verbose"],
    ["demo", "--streams", "0"],
]


@pytest.mark.parametrize("command", SUBPROCESS, ids=lambda c: " ".join(c[:2]))
def test_bad_input_in_a_real_process(command, files):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    args = [part.format(tmp=files, port=free_port()) for part in command]
    done = subprocess.run([*_lstmd(), *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "rror" in done.stderr, done.stderr  # "error:" lines, or click's "Error:" box


def test_no_help_shows_a_value_for_a_flag():
    """typer's rich help labelled every flag, --help included, `<bool>`; the plain help does not."""
    for command in (["--help"], ["status", "--help"], ["streams", "list", "--help"], ["replay", "--help"],
                    ["bench", "--help"], ["top", "--help"], ["train", "now", "--help"]):  # fmt: skip
        result = run(*command)
        assert result.exit_code == 0 and "--help" in result.stdout
        assert "<bool>" not in result.stdout, (command, result.stdout)


def test_producer_timeouts_say_what_happened_and_what_to_do():
    import numpy as np
    from lstmd.clients import Producer

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Producer(endpoint, timeout=0.2, retries=1) as producer:
        with pytest.raises(TimeoutError) as plain:
            producer.send(["a"], np.ones((1, 8), np.float32))
        with pytest.raises(TimeoutError) as numbered:
            producer.send(["a"], np.ones((1, 8), np.float32), seqs=[1])
    message = str(plain.value)
    assert f"no reply from lstmd at {endpoint} within 0.2 s: is `lstmd serve` running" in message
    assert "may have been applied" in message and "not sent again" in message and "seqs=" in message
    message = str(numbered.value)
    assert "2 tries" in message and "same sequence numbers, so no event was applied twice" in message
