"""Resends that keep their answers: an already applied (stream, seq) is answered `duplicate` with its original
prediction while it is among the stream's last `serve.resend_window` sequence numbers; beyond that the reply
says the prediction is unavailable and `Producer.send` raises `PredictionUnavailableError` (never NaN silently).
The window is rebuilt after a restart (snapshot + log replay). The scenario that found it: a producer whose
batch is in flight while the daemon is stopped (SIGSTOP) past the producer's timeout."""

from __future__ import annotations

import signal
import subprocess
import threading

import numpy as np
import pytest
import torch
from lstmd.clients import Admin, PredictionUnavailableError, Producer
from lstmd.clients.bench import LSTMD_COMMAND, free_tcp_port
from lstmd.daemon.state_store import StateStore

SMALL = {"model.hidden_size": 16, "serve.resend_window": 4}


def test_a_resent_batch_gets_its_original_predictions(make_daemon):
    daemon = make_daemon(**SMALL)
    rng = np.random.default_rng(0)
    streams = ["a", "b", "c", 7]
    with Producer(daemon.endpoints["events"]) as producer:
        first = producer.send(streams, rng.standard_normal((4, 8)), seqs=[0, 0, 0, 0])
        x = rng.standard_normal((4, 8))
        original = producer.send(streams, x, seqs=[1, 1, 1, 1])
        again = producer.send_detailed(streams, x, seqs=[1, 1, 1, 1])
        assert again.status_names == ["duplicate"] * 4 and not again.reasons
        np.testing.assert_array_equal(again.predictions, original)
        mixed = producer.send(streams, x, seqs=[0, 1, 0, 1])  # the features of a duplicate do not matter
        np.testing.assert_array_equal(mixed, np.stack([first[0], original[1], first[2], original[3]]))
    admin = Admin(daemon.endpoints["control"])  # answered by the loop, after it counted the last batch
    assert admin.status()["events"]["duplicate"] == 8  # every resent event counted duplicate, none applied again
    assert admin.stream("a")["events"] == 2


def test_beyond_the_window_the_producer_raises(make_daemon):
    daemon = make_daemon(**SMALL)
    x = np.ones((1, 8), np.float32)
    kept = {}
    with Producer(daemon.endpoints["events"]) as producer:
        for seq in (0, 1, 2, 3, 4, 5, 6, 10):  # a gap: 7-9 never arrive
            kept[seq] = producer.send(["a"], x * seq, seqs=[seq])
        # One column per seq % 4 holds the newest number applied with that residue: 4, 5, 10 and 3 here. So every
        # applied number within 4 of the last (7..10) always is kept, and 6 (column of 10) and 2 are not.
        for seq in (10, 5, 4, 3):
            np.testing.assert_array_equal(producer.send(["a"], x * seq, seqs=[seq]), kept[seq])
        for seq in (6, 2):
            with pytest.raises(PredictionUnavailableError, match=rf"number {seq} was already applied.*window = 4"):
                producer.send(["a", "b"], np.ones((2, 8), np.float32), seqs=[seq, seq])
        detailed = producer.send_detailed(["b", "a"], np.ones((2, 8), np.float32), seqs=[6, 6])
    # "b" 6 was applied by the first raising call (a new event of another stream): its prediction is kept.
    assert detailed.status_names == ["duplicate", "duplicate"] and detailed.unavailable.tolist() == [1]
    assert np.isfinite(detailed.predictions[0]).all() and np.isnan(detailed.predictions[1]).all()
    Admin(daemon.endpoints["control"]).status()  # the loop has finished the last batch
    # a 6, a 2 and b 2 (b had applied 6: 2 is a duplicate whose column holds 6), then a 6 again.
    assert daemon.metrics.registry.get_sample_value("lstmd_duplicates_unavailable_total") == 4


def test_unavailable_is_reported_in_send_detailed_and_never_counted_as_rejected(make_daemon):
    daemon = make_daemon(**{**SMALL, "serve.resend_window": 0})  # nothing kept
    x = np.ones((2, 8), np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a", "b"], x, seqs=[0, 0])
        result = producer.send_detailed(["a", "b"], x, seqs=[0, 1])
        with pytest.raises(PredictionUnavailableError) as raised:
            producer.send(["a", "b"], x, seqs=[0, 2])
    assert result.status_names == ["duplicate", "ok"] and result.unavailable.tolist() == [0]
    assert np.isnan(result.predictions[0]).all() and np.isfinite(result.predictions[1]).all()
    assert "no longer kept" in result.reasons[0]
    assert raised.value.result.unavailable.tolist() == [0]
    assert np.isfinite(raised.value.result.predictions[1]).all()  # the other events' predictions are kept
    assert Admin(daemon.endpoints["control"]).status()["rejections"] == {}


@pytest.mark.parametrize("clean", [True, False], ids=["clean-restart", "crash"])
def test_the_window_survives_a_restart(make_daemon, tmp_path, clean):
    options = {**SMALL, "durability.wal": True, "durability.fsync": "always"}
    options["durability.snapshot_on_shutdown"] = clean  # without: only the log replay can rebuild it
    state = tmp_path / "state"
    daemon = make_daemon(state_dir=state, **options)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 8))
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a", "b", "c"], rng.standard_normal((3, 8)), seqs=[0, 0, 0])
        original = producer.send(["a", "b", "c"], x, seqs=[1, 1, 1])
    daemon.stop_and_join()
    again = make_daemon(state_dir=state, **options)
    assert again.durability.restored["events"] == (0 if clean else 6)
    with Producer(again.endpoints["events"]) as producer:
        np.testing.assert_array_equal(producer.send(["a", "b", "c"], x, seqs=[1, 1, 1]), original)


def test_a_reused_slot_resends_nothing_of_its_previous_stream():
    store = StateStore(1, 4, 2, torch.device("cpu"), resend_window=4, output_size=1)
    slot = store.admit(["a"], 10).slots
    store.keep_outputs(slot, np.array([0]), np.array([[1.5]], np.float32))
    assert store.kept_outputs(slot, np.array([0]))[1].tolist() == [True]
    store.drop("a")
    assert store.admit(["b"], 10).slots.tolist() == slot.tolist()
    assert store.kept_outputs(slot, np.array([0]))[1].tolist() == [False]


def test_a_batch_in_flight_across_sigstop_comes_back_with_its_predictions(make_daemon, tmp_path):
    """The reported scenario, with a real `lstmd serve`: the producer's batch reaches the stopped daemon, the
    producer times out and resends on a fresh socket, SIGCONT: the daemon applies the first copy (its reply goes
    to the closed socket) and answers the resend `duplicate` with the predictions of the first."""
    events, control = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    settings = {**SMALL, "serve.events": events, "serve.control": control, "serve.publish": "", "serve.metrics": ""}
    settings |= {"state.dir": str(tmp_path / "state"), "serve.device": "cpu"}
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen([*LSTMD_COMMAND, "serve", *args], stdout=log, stderr=subprocess.STDOUT)
    rng = np.random.default_rng(11)
    streams = [f"s{i}" for i in range(20)]
    x0, x1 = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
    try:
        admin = Admin(control, timeout=0.5)
        for _ in range(600):  # start-up imports torch: slow on a loaded machine
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            try:
                admin.status()
                break
            except TimeoutError:
                continue
        with Producer(events, timeout=1.0, retries=50) as producer:
            producer.send(streams, x0, seqs=[0] * 20)  # connected: the next send reaches the daemon's socket
            retried = threading.Event()
            reconnect = producer._connect

            def reconnect_and_tell() -> None:
                retried.set()
                reconnect()

            producer._connect = reconnect_and_tell
            outcome: dict = {}

            def send() -> None:
                try:
                    outcome["predictions"] = producer.send(streams, x1, seqs=[1] * 20)
                except Exception as exc:  # reported by the assertion below
                    outcome["error"] = exc

            proc.send_signal(signal.SIGSTOP)
            try:
                sender = threading.Thread(target=send)
                sender.start()
                assert retried.wait(120), "the producer never timed out"  # its first copy sits in the daemon
            finally:
                proc.send_signal(signal.SIGCONT)
            sender.join(120)
        assert "error" not in outcome, outcome.get("error")
        status = admin.status()
        assert status["events"]["duplicate"] == 20, status["events"]  # the resend found the first copy applied
        assert status["events"]["ok"] == 40
        predictions = outcome["predictions"]
        assert np.isfinite(predictions).all()
        twin = make_daemon(**SMALL)  # the same model and events, in this process, without the stop
        with Producer(twin.endpoints["events"]) as producer:
            producer.send(streams, x0, seqs=[0] * 20)
            np.testing.assert_allclose(predictions, producer.send(streams, x1, seqs=[1] * 20), rtol=1e-5, atol=1e-6)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(60)
        log.close()
