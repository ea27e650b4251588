
# ---- kernels (tests/test_kernels*.py) ----------------------------------------------------------------------
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when lstmd.kernels.triton_lstm is first
# imported, so it is set here, before any test module imports anything. Without CUDA the Triton kernels can
# only run through the interpreter; with CUDA they run compiled and the interpreter cases skip (their checks
# run as the triton-cuda cases instead). Daemon tests on the CPU use the torch backend: untouched by this.
import os as _os  # noqa: E402

import torch as _torch  # noqa: E402

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- daemon (tests/test_daemon*.py, test_cli*.py, ...) -----------------------------------------------------
# A real daemon on loopback with ephemeral ports and a temporary state directory, in this process (its loop on
# a thread), with a fresh Prometheus registry. `make_daemon(**overrides)` takes dotted config keys.
import pytest as _pytest  # noqa: E402

_LOOPBACK = {
    "serve.events": "tcp://127.0.0.1:*",
    "serve.control": "tcp://127.0.0.1:*",
    "serve.publish": "tcp://127.0.0.1:*",
    "serve.metrics": "127.0.0.1:0",
    "serve.device": "cpu",
    "serve.max_wait_ms": 1.0,
    "state.capacity": 4096,
    "model.hidden_size": 24,
}


def daemon_overrides(state_dir, **overrides) -> list[str]:
    """--set style strings: loopback ephemeral endpoints, a temp state dir, small model, then overrides."""
    values = {**_LOOPBACK, "state.dir": str(state_dir), **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in values.items()]


@_pytest.fixture
def make_daemon(tmp_path):
    from lstmd.daemon.config import load_config
    from lstmd.daemon.server import Daemon
    from prometheus_client import CollectorRegistry

    started = []

    def make(state_dir=None, **overrides):
        config = load_config(overrides=daemon_overrides(state_dir or tmp_path / f"state{len(started)}", **overrides),
                             environ={})
        daemon = Daemon(config, registry=CollectorRegistry())
        daemon.start_in_thread()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop_and_join()


# ---- cluster (tests/test_cluster*.py, helpers in tests/cluster_helpers.py) -----------------------------------
@_pytest.fixture
def nats_url(tmp_path):
    """A nats-server with JetStream on loopback, started for the test: its URL."""
    from tests.cluster_helpers import start_nats  # imports nats-py: only for the tests that ask for a server

    proc, port = start_nats(tmp_path)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
