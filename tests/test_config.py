"""daemon/config.py: every key typed, range-checked and finite; errors name `section.key`, the source that set it
and the nearest valid key; stray LSTMD_ variables warn; model.path alone defines the model; files that are not
safetensors are refused as such (config load, Admin import, `lstmd model import`)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, DaemonError, Producer
from lstmd.clients.cli import app
from lstmd.daemon.config import Config, ConfigError, load_config, resolve_config, schema
from lstmd.daemon.model import ModelSpec, ServingModel
from typer.testing import CliRunner

NUMERIC = [k for k in schema() if k.base in (int, float)]


# ---- issue 11 item 6: ranges, NaN/Inf, stray variables ---------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("serve.max_message_bytes", "-1", "serve.max_message_bytes must be >= 1, got -1"),
        ("serve.max_new_streams_per_message", "-5", "serve.max_new_streams_per_message must be >= 1, got -5"),
        ("serve.max_wait_ms", "nan", "serve.max_wait_ms must be a finite number, got nan"),
        ("durability.fsync_interval_ms", "nan", "durability.fsync_interval_ms must be a finite number, got nan"),
    ],
)
def test_issue_11_values_are_refused_from_every_source_with_the_key_and_source(tmp_path, key, value, message):
    section, name = key.split(".")
    path = tmp_path / "lstmd.toml"
    path.write_text(f"[{section}]\n{name} = {value}\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(path, environ={})
    assert str(from_file.value) == f"{message} (config file {path})"
    variable = f"LSTMD_{section.upper()}__{name.upper()}"
    with pytest.raises(ConfigError) as from_env:
        load_config(environ={variable: value})
    assert str(from_env.value) == f"{message} (environment variable {variable})"
    with pytest.raises(ConfigError) as from_set:
        load_config(overrides=[f"{key}={value}"], environ={})
    assert str(from_set.value) == f"{message} (--set {key}={value})"


@pytest.mark.parametrize("key", [k.dotted for k in NUMERIC if k.base is float])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_nan_and_inf(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number, got {value}"):
        load_config(overrides=[f"{key}={value}"], environ={})


def test_every_key_is_described_and_every_number_bounded():
    for key in schema():
        assert key.description and "  " not in key.description, key.dotted
    for key in NUMERIC:
        assert key.bounds, f"{key.dotted} has no range: add ge/gt (and le/lt) to its doc(...)"
    for section in Config.__struct_fields__:
        assert type(getattr(Config(), section)).__doc__, f"[{section}] needs a docstring (the sample shows it)"


@pytest.mark.parametrize("key", [k.dotted for k in NUMERIC], ids=str)
def test_every_numeric_key_refuses_a_value_below_its_range(key):
    spec = next(k for k in NUMERIC if k.dotted == key)
    low = spec.bounds["gt"] if "gt" in spec.bounds else spec.bounds["ge"] - 1
    with pytest.raises(ConfigError, match=f"^{key} must be"):
        load_config(overrides=[f"{key}={low}"], environ={})
    if "le" in spec.bounds:
        with pytest.raises(ConfigError, match=f"^{key} must be"):
            load_config(overrides=[f"{key}={spec.bounds['le'] + 1}"], environ={})


def test_a_stray_variable_is_a_warning_not_a_failure(caplog):
    environ = {
        "LSTMD_FOO__BAR": "1",
        "LSTMD_MODEL_HIDDEN_SIZE": "32",
        "LSTMD_MODEL__HIDEN_SIZE": "32",
        "LSTMD_SERVE__EVENTS": "tcp://127.0.0.1:6000",
    }
    with caplog.at_level(logging.WARNING, logger="lstmd.config"):
        config = load_config(environ=environ)
    assert config.model.hidden_size == 64 and config.serve.events == "tcp://127.0.0.1:6000"
    warnings = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert "config variables are LSTMD_<SECTION>__<KEY>" in warnings["ignoring environment variable LSTMD_FOO__BAR"]
    assert "did you mean LSTMD_MODEL__HIDDEN_SIZE?" in warnings["ignoring environment variable LSTMD_MODEL_HIDDEN_SIZE"]
    assert "did you mean LSTMD_MODEL__HIDDEN_SIZE?" in warnings["ignoring environment variable LSTMD_MODEL__HIDEN_SIZE"]
    assert len(warnings) == 3


# ---- errors: section.key, the source, the nearest key ---------------------------------------------------------


def test_misspelled_keys_suggest_the_nearest_and_all_problems_are_listed(tmp_path):
    path = tmp_path / "lstmd.toml"
    path.write_text("[model]\nhiden_size = 32\n[serve]\nhidden_size = 3\nmax_wait_ms = -1\n[trian]\nlr = 1\n")
    with pytest.raises(ConfigError) as problems:
        load_config(path, overrides=["train.optimiser=sgd", "train.lr=0"], environ={})
    lines = str(problems.value).splitlines()
    origin = f"config file {path}"
    assert f"{origin}: unknown key model.hiden_size; did you mean model.hidden_size?" in lines
    assert f"{origin}: unknown key serve.hidden_size; did you mean model.hidden_size?" in lines
    assert f"{origin}: unknown key trian.lr; did you mean train.lr?" in lines
    assert "--set train.optimiser=sgd: unknown key train.optimiser; did you mean train.optimizer?" in lines
    assert f"serve.max_wait_ms must be >= 0, got -1 ({origin})" in lines
    assert "train.lr must be positive, got 0 (--set train.lr=0)" in lines
    assert not any("$." in line or "  " in line for line in lines)


def test_a_later_source_wins_and_strings_need_no_quotes(tmp_path):
    path = tmp_path / "lstmd.toml"
    path.write_text("[model]\nhidden_size = 16\n[serve]\nevents = 'tcp://127.0.0.1:7000'\n")
    resolved = resolve_config(
        path,
        overrides=["model.hidden_size=48", 'state.dir="quoted dir"'],
        environ={"LSTMD_MODEL__HIDDEN_SIZE": "32", "LSTMD_SERVE__CONTROL": "tcp://127.0.0.1:7001"},
    )
    c = resolved.config
    assert (c.model.hidden_size, c.serve.events, c.serve.control, c.state.dir) == (
        48,
        "tcp://127.0.0.1:7000",
        "tcp://127.0.0.1:7001",
        "quoted dir",
    )
    assert resolved.sources == {
        "model.hidden_size": "--set model.hidden_size=48",
        "serve.events": f"config file {path}",
        "serve.control": "environment variable LSTMD_SERVE__CONTROL",
        "state.dir": '--set state.dir="quoted dir"',
    }


def test_a_key_outside_a_section_is_reported(tmp_path):
    path = tmp_path / "lstmd.toml"
    path.write_text("hidden_size = 32\n")
    with pytest.raises(ConfigError, match=r"hidden_size = \.\.\. is outside any \[section\]; did you mean model"):
        load_config(path, environ={})


def test_a_missing_config_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist \\(`lstmd config init .*lstmd.toml` writes one"):
        load_config(tmp_path / "lstmd.toml", environ={})


# ---- model.path defines the model; non-safetensors files are refused as such ----------------------------------


def _model_file(tmp_path, **sizes):
    spec = ModelSpec(**{"input_size": 3, "hidden_size": 24, "num_layers": 2, "output_size": 2, "task": "regression"}
                     | sizes)
    path = tmp_path / "m.safetensors"
    path.write_bytes(ServingModel.initial(spec, seed=5).to_bytes())
    return path, spec


def test_model_path_alone_defines_the_model(tmp_path):
    path, spec = _model_file(tmp_path)
    resolved = resolve_config(overrides=[f"model.path={path}"], environ={})
    m = resolved.config.model
    assert (m.input_size, m.hidden_size, m.num_layers, m.output_size, m.task) == (3, 24, 2, 2, "regression")
    assert resolved.sources["model.hidden_size"] == f"model.path {path}"
    # Sizes set as well must agree; agreeing ones are fine.
    assert load_config(overrides=[f"model.path={path}", "model.hidden_size=24"], environ={}).model.num_layers == 2


def test_model_path_mismatch_names_the_differing_fields_and_their_sources(tmp_path):
    path, _ = _model_file(tmp_path)
    toml = tmp_path / "lstmd.toml"
    toml.write_text(f"[model]\npath = '{path}'\nhidden_size = 64\n")
    with pytest.raises(ConfigError) as refused:
        load_config(toml, overrides=["model.num_layers=1"], environ={})
    message = str(refused.value)
    assert f"hidden_size 24 where model.hidden_size = 64 (config file {toml})" in message
    assert "num_layers 2 where model.num_layers = 1 (--set model.num_layers=1)" in message
    assert "input_size" not in message and "ModelSpec" not in message and "  " not in message


def test_a_daemon_serves_model_path_with_sizes_from_the_file(make_daemon, tmp_path):
    path, spec = _model_file(tmp_path)  # hidden_size 24: the one make_daemon sets explicitly
    daemon = make_daemon(**{"model.path": str(path)})
    assert daemon.spec == spec
    with Producer(daemon.endpoints["events"]) as producer:
        assert producer.send(["a"], np.ones((1, 3), np.float32)).shape == (1, 2)


def _not_safetensors(tmp_path, kind: str):
    if kind == "csv":
        path = tmp_path / "events.csv"
        path.write_text("stream,a,b\n1,0.5,0.25\n")
    else:
        path = tmp_path / "model.pt"
        torch.save(torch.nn.LSTM(3, 4).state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "pt"])
def test_a_file_that_is_not_safetensors_is_refused_as_such(make_daemon, tmp_path, kind):
    path = _not_safetensors(tmp_path, kind)
    with pytest.raises(ConfigError, match=f"model.path: {path} is not a safetensors model file"):
        load_config(overrides=[f"model.path={path}"], environ={})
    daemon = make_daemon()
    control = daemon.endpoints["control"]
    with pytest.raises(DaemonError, match="the model file is not a safetensors model file"):
        Admin(control).import_model(path)
    result = CliRunner().invoke(app, ["model", "import", str(path), "--control", control])
    assert result.exit_code == 1 and f"{path} is not a safetensors model file" in result.stderr
    assert "header too large" not in result.stderr and "Traceback" not in result.stderr


def test_an_import_of_other_sizes_names_the_fields(make_daemon, tmp_path):
    daemon = make_daemon()  # input 8, hidden 24
    path = tmp_path / "other.safetensors"
    path.write_bytes(ServingModel.initial(ModelSpec(8, 16, 1, 1, "regression"), seed=0).to_bytes())
    with pytest.raises(DaemonError) as refused:
        Admin(daemon.endpoints["control"]).import_model(path)
    assert str(refused.value).endswith("cannot import model: it has hidden_size 16 where the daemon has 24")


def test_defaults_are_finite_and_within_range():
    for key in NUMERIC:
        assert math.isfinite(key.default), key.dotted
    assert load_config(environ={}) == Config()


def test_forecast_columns_of_a_model_file_compare_as_columns(tmp_path):
    path, _ = _model_file(tmp_path, task="forecast", output_size=3)  # all 3 columns: stored as []
    assert load_config(overrides=[f"model.path={path}"], environ={}).model.forecast_columns == []
    every = load_config(overrides=[f"model.path={path}", "model.forecast_columns=[0, 1, 2]"], environ={})
    assert every.model.forecast_columns == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"forecast_columns \[0, 1, 2\] where model.forecast_columns = \[0\]"):
        load_config(overrides=[f"model.path={path}", "model.forecast_columns=[0]", "model.output_size=3"], environ={})
