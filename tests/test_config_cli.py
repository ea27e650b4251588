"""`lstmd config init|check|show|reference`, `lstmd --version`, docs/config.md and the README's own commands.

Through typer's CliRunner, and as real subprocesses of the installed entry point: the README's `Using it`
commands run as written in a fresh directory (only the environment points them at free ports).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from lstmd.clients.bench import free_tcp_port
from lstmd.clients.cli import app
from lstmd.daemon.config import Config, reference, resolve_config, schema
from lstmd.daemon.state_lock import LOCK_NAME
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), catch_exceptions=False, env=env)


def _lstmd() -> list[str]:
    exe = Path(sys.executable).with_name("lstmd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lstmd.clients.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}, **extra}


@pytest.fixture(autouse=True)
def _no_lstmd_variables(monkeypatch):
    for name in [n for n in os.environ if n.startswith("LSTMD_")]:
        monkeypatch.delenv(name)


# ---- init ----------------------------------------------------------------------------------------------------


def test_init_writes_every_key_commented_at_its_default(tmp_path):
    path = tmp_path / "lstmd.toml"
    result = invoke("config", "init", str(path))
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert tomllib.loads(text) == {section: {} for section in Config.__struct_fields__}
    assert resolve_config(path, environ={}).config == Config()
    for key in schema():
        assert f"[{key.section}]" in text
        assert f"# {key.description} ({key.expectation()})\n# {key.name} = " in text, key.dotted
    # Uncommenting every key gives a file that sets each one to its default: the sample's values are right.
    uncommented = tmp_path / "all.toml"
    keys = {k.name for k in schema()}
    uncommented.write_text(
        "\n".join(line[2:] if line[2:].partition(" = ")[0] in keys else line for line in text.splitlines())
    )
    resolved = resolve_config(uncommented, environ={})
    assert resolved.config == Config() and len(resolved.sources) == len(schema())


def test_init_refuses_to_overwrite_without_force_and_prints_without_a_file(tmp_path):
    path = tmp_path / "lstmd.toml"
    path.write_text("[model]\n")
    refused = invoke("config", "init", str(path))
    assert refused.exit_code == 1 and "exists; pass --force" in refused.stderr and path.read_text() == "[model]\n"
    assert invoke("config", "init", str(path), "--force").exit_code == 0
    printed = invoke("config", "init")
    assert printed.exit_code == 0 and printed.stdout == path.read_text()


# ---- check ---------------------------------------------------------------------------------------------------


def test_check_accepts_a_good_file_and_lists_every_problem_of_a_bad_one(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[model]\nhidden_size = 32\n")
    ok = invoke("config", "check", str(good))
    assert ok.exit_code == 0 and f"{good}: ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhiden_size = 32\n[serve]\nmax_message_bytes = -1\nmax_wait_ms = nan\n")
    result = invoke("config", "check", str(bad))
    assert result.exit_code == 2
    assert f"config file {bad}: unknown key model.hiden_size; did you mean model.hidden_size?" in result.stderr
    assert f"serve.max_message_bytes must be >= 1, got -1 (config file {bad})" in result.stderr
    assert f"serve.max_wait_ms must be a finite number, got nan (config file {bad})" in result.stderr


def test_check_names_an_environment_variable_and_warns_about_a_stray_one(tmp_path):
    path = tmp_path / "lstmd.toml"
    path.write_text("[model]\n")
    stray = invoke("config", "check", str(path), env={"LSTMD_MODEL_HIDDEN_SIZE": "32"})
    assert stray.exit_code == 0
    assert "warning: ignoring environment variable LSTMD_MODEL_HIDDEN_SIZE" in stray.stderr
    assert "did you mean LSTMD_MODEL__HIDDEN_SIZE?" in stray.stderr
    wrong = invoke("config", "check", str(path), env={"LSTMD_MODEL__HIDDEN_SIZE": "big"})
    assert wrong.exit_code == 2
    assert 'model.hidden_size must be an integer >= 1, got "big" (environment variable LSTMD_MODEL__HIDDEN_SIZE)' in (
        wrong.stderr
    )


def test_check_of_a_model_path_with_other_sizes_names_the_fields_in_one_clean_line(tmp_path):
    from lstmd.daemon.model import ModelSpec, ServingModel

    model = tmp_path / "m.safetensors"
    model.write_bytes(ServingModel.initial(ModelSpec(3, 16, 1, 1, "regression"), seed=0).to_bytes())
    path = tmp_path / "lstmd.toml"
    path.write_text(f"[model]\npath = '{model}'\nhidden_size = 64\n")
    result = invoke("config", "check", str(path))
    assert result.exit_code == 2
    assert f"hidden_size 16 where model.hidden_size = 64 (config file {path})" in result.stderr
    assert "  " not in result.stderr and "ModelSpec" not in result.stderr and len(result.stderr.splitlines()) == 1
    path.write_text(f"[model]\npath = '{model}'\n")  # the file alone: its sizes
    shown = tomllib.loads(invoke("config", "show", "--config", str(path)).stdout)
    assert (shown["model"]["input_size"], shown["model"]["hidden_size"]) == (3, 16)


# ---- show ----------------------------------------------------------------------------------------------------


def test_show_prints_valid_toml_offline_with_sources(tmp_path):
    defaults = invoke("config", "show")
    assert defaults.exit_code == 0 and tomllib.loads(defaults.stdout) == Config().to_dict()
    path = tmp_path / "lstmd.toml"
    path.write_text("[train]\nenabled = true\nlr = 0.01\n[state]\ndir = 'a \"quoted\" dir'\n")
    args = ["config", "show", "--config", str(path), "--set", "serve.max_wait_ms=2.5"]
    shown = invoke(*args, env={"LSTMD_DURABILITY__WAL": "true"})
    assert shown.exit_code == 0, shown.output
    data = tomllib.loads(shown.stdout)
    assert data == resolve_config(path, ["serve.max_wait_ms=2.5"], {"LSTMD_DURABILITY__WAL": "true"}).config.to_dict()
    assert data["train"]["enabled"] is True and data["state"]["dir"] == 'a "quoted" dir'
    assert f"enabled = true  # config file {path}" in shown.stdout
    assert "max_wait_ms = 2.5  # --set serve.max_wait_ms=2.5" in shown.stdout
    assert "wal = true  # environment variable LSTMD_DURABILITY__WAL" in shown.stdout
    assert json.loads(invoke(*args, "--json", env={"LSTMD_DURABILITY__WAL": "true"}).stdout) == data


def test_show_of_a_running_daemon_is_valid_toml(make_daemon):
    daemon = make_daemon(**{"train.enabled": True})
    shown = invoke("config", "show", "--control", daemon.endpoints["control"])
    assert shown.exit_code == 0
    assert tomllib.loads(shown.stdout) == daemon.config.to_dict()


# ---- the reference and the version ---------------------------------------------------------------------------


def test_docs_config_md_is_generated_from_the_schema():
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == reference(), "docs/config.md is stale: run `lstmd config reference > docs/config.md`"
    assert invoke("config", "reference").stdout == current
    for key in schema():
        assert f"| `{key.name}` |" in current and f"`{key.env}`" in current


def test_version(tmp_path):
    from importlib.metadata import version

    assert invoke("--version").stdout == f"lstmd {version('lstmd')}\n"


# ---- real subprocesses: the config group, and the README as written -------------------------------------------


def test_config_commands_as_real_subprocesses(tmp_path):
    env = _clean_env(LSTMD_FOO__BAR="1")
    run = lambda *args: subprocess.run(  # noqa: E731
        [*_lstmd(), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("lstmd ")
    assert run("config", "init", "lstmd.toml").returncode == 0
    checked = run("config", "check", "lstmd.toml")
    assert checked.returncode == 0 and "lstmd.toml: ok" in checked.stdout
    assert "ignoring environment variable LSTMD_FOO__BAR" in checked.stderr
    shown = run("config", "show", "--config", "lstmd.toml")
    assert shown.returncode == 0 and tomllib.loads(shown.stdout) == Config().to_dict()
    (tmp_path / "bad.toml").write_text("[serve]\nmax_new_streams_per_message = -5\n")
    bad = run("config", "check", "bad.toml")
    assert bad.returncode == 2 and "serve.max_new_streams_per_message must be >= 1, got -5" in bad.stderr
    assert "Traceback" not in bad.stderr


def _readme_commands() -> list[str]:
    """The `lstmd ...` lines of the README's `Using it` block; of `a | b | c` alternatives the first."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it\s+```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.splitlines():
        command = re.split(r"\s{2,}#", line)[0].strip()
        if command.startswith("lstmd "):
            commands.append(command.split(" | ")[0])
    return commands


# Commands that need data the README does not give (a CSV), or run until stopped (top) or for minutes (bench).
_NEEDS_MORE = ("lstmd replay", "lstmd top", "lstmd bench")


def test_the_readme_using_it_commands_run_as_written(tmp_path):
    commands = _readme_commands()
    assert commands[0] == "lstmd config init lstmd.toml"
    assert commands[1] == "lstmd serve --config lstmd.toml --set model.hidden_size=128"
    # A fresh directory; the environment moves the default ports to free ones (other tests run beside this
    # one) and turns training on for `lstmd train status`. LSTMD_FOO__BAR: a stray variable only warns.
    ports = {name: free_tcp_port() for name in ("events", "control", "publish", "metrics")}
    env = _clean_env(
        LSTMD_SERVE__EVENTS=f"tcp://127.0.0.1:{ports['events']}",
        LSTMD_SERVE__CONTROL=f"tcp://127.0.0.1:{ports['control']}",
        LSTMD_SERVE__PUBLISH=f"tcp://127.0.0.1:{ports['publish']}",
        LSTMD_SERVE__METRICS=f"127.0.0.1:{ports['metrics']}",
        LSTMD_SERVE__DEVICE="cpu",
        LSTMD_TRAIN__ENABLED="true",
        LSTMD_FOO__BAR="1",
    )

    def run(command: str) -> subprocess.CompletedProcess:
        args = command.split()
        return subprocess.run(
            [*_lstmd(), *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    init = run(commands[0])
    assert init.returncode == 0, init.stderr
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [*_lstmd(), *commands[1].split()[1:]], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        lock = tmp_path / "lstmd-state" / LOCK_NAME
        deadline = time.monotonic() + 120
        while not (lock.exists() and json.loads(lock.read_text() or "{}").get("endpoints")):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the README's serve command did not start"
            time.sleep(0.1)
        ran = []
        for command in commands[2:]:
            if command.startswith(_NEEDS_MORE):
                continue
            result = run(command)
            assert result.returncode == 0, f"{command}: {result.stderr}"
            assert "Traceback" not in result.stderr, command
            ran.append(command)
        assert "lstmd status" in ran and "lstmd config show --config lstmd.toml" in ran
        status = json.loads(run("lstmd status --json").stdout)
        assert status["model"]["hidden_size"] == 128
        # The README's Python example, with the default endpoints it names replaced by this daemon's.
        example = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
        example = example.replace("tcp://127.0.0.1:5555", env["LSTMD_SERVE__EVENTS"])
        example = example.replace("tcp://127.0.0.1:5556", env["LSTMD_SERVE__CONTROL"])
        python = subprocess.run(
            [sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert python.returncode == 0, python.stderr
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert server.returncode == 0, output
    assert "ignoring environment variable LSTMD_FOO__BAR" in output and "Traceback" not in output
