"""The daemon end to end over real ZeroMQ sockets on loopback: predictions, ordering, state, bad input."""

from __future__ import annotations

import threading

import msgspec
import numpy as np
import pytest
import torch
import zmq
from lstmd.clients import Admin, DaemonError, Producer, RejectedError, protocol


def reference_predictions(model_path, sequences: dict, hidden_state=None) -> dict:
    """Run torch.nn.LSTM + nn.Linear (loaded from the exported file) over each stream's whole sequence."""
    from lstmd.daemon.model import ServingModel

    model = ServingModel.from_bytes(model_path.read_bytes())
    lstm, head = model.to_modules()
    out = {}
    with torch.no_grad():
        for sid, xs in sequences.items():
            y, _ = lstm(torch.from_numpy(np.stack(xs))[None])
            out[sid] = head(y[0]).numpy()
    return out


def test_predictions_equal_torch_lstm_over_each_stream(make_daemon, tmp_path):
    daemon = make_daemon(**{"model.num_layers": 2, "model.output_size": 3, "model.input_size": 5})
    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(60)] + list(range(60))  # 120 streams, str and int ids
    sequences = {sid: [] for sid in ids}
    served = {sid: [] for sid in ids}
    with Producer(daemon.endpoints["events"]) as producer:
        for _ in range(6):
            # Interleave: a random subset of streams per message, some streams twice in one message.
            chosen = list(rng.choice(len(ids), size=90, replace=True))
            streams = [ids[i] for i in chosen]
            x = rng.standard_normal((len(streams), 5)).astype(np.float32)
            preds = producer.send(streams, x)
            assert preds.shape == (len(streams), 3)
            for sid, xi, pi in zip(streams, x, preds, strict=True):
                sequences[sid].append(xi)
                served[sid].append(pi)
    path = tmp_path / "model.safetensors"
    Admin(daemon.endpoints["control"]).export_model(path)
    expected = reference_predictions(path, {k: v for k, v in sequences.items() if v})
    assert len(expected) >= 100
    for sid, want in expected.items():
        np.testing.assert_allclose(
            np.stack(served[sid]), want, rtol=1e-4, atol=1e-5, err_msg=f"stream {sid!r}"
        )


def test_many_producers_at_once_keep_per_stream_order(make_daemon, tmp_path):
    daemon = make_daemon()
    results, errors = {}, []

    def produce(worker: int) -> None:
        rng = np.random.default_rng(worker)
        try:
            with Producer(daemon.endpoints["events"]) as producer:
                xs, preds = [], []
                for _ in range(25):
                    x = rng.standard_normal((1, 8)).astype(np.float32)
                    xs.append(x[0])
                    preds.append(producer.send([f"w{worker}"], x)[0])
                results[f"w{worker}"] = (xs, preds)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    path = tmp_path / "m.safetensors"
    Admin(daemon.endpoints["control"]).export_model(path)
    expected = reference_predictions(path, {k: v[0] for k, v in results.items()})
    for sid, (_, preds) in results.items():
        np.testing.assert_allclose(np.stack(preds), expected[sid], rtol=1e-4, atol=1e-5)
    assert daemon.stats.batches < 8 * 25  # messages of different producers shared launches


def test_same_stream_many_times_in_one_message_is_applied_in_order(make_daemon, tmp_path):
    daemon = make_daemon()
    x = np.random.default_rng(0).standard_normal((7, 8)).astype(np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        preds = producer.send(["a"] * 7, x)
    path = tmp_path / "m.safetensors"
    Admin(daemon.endpoints["control"]).export_model(path)
    np.testing.assert_allclose(preds, reference_predictions(path, {"a": list(x)})["a"], rtol=1e-4, atol=1e-5)
    assert Admin(daemon.endpoints["control"]).stream("a")["events"] == 7


def test_sequence_numbers_duplicates_and_gaps(make_daemon):
    daemon = make_daemon()
    x = np.ones((3, 8), np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        first = producer.send_detailed(["a", "a", "b"], x, seqs=[1, 2, 1])
        assert first.status_names == ["ok", "ok", "ok"]
        again = producer.send_detailed(["a", "a", "b"], x, seqs=[2, 5, 1])
    assert again.status_names == ["duplicate", "ok", "duplicate"]
    # Duplicates carry their original predictions (the resend window; tests/test_resend.py).
    np.testing.assert_array_equal(again.predictions[[0, 2]], first.predictions[[1, 2]])
    assert np.isfinite(again.predictions[1]).all() and not again.unavailable.size
    status = Admin(daemon.endpoints["control"]).status()
    assert status["sequence_gaps"] == 2  # 3 and 4 never arrived
    assert status["events"]["duplicate"] == 2
    assert Admin(daemon.endpoints["control"]).stream("a")["last_seq"] == 5


def test_capacity_eviction_is_flagged_on_the_next_event(make_daemon):
    daemon = make_daemon(**{"state.capacity": 4})
    x = np.ones((1, 8), np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        for sid in ["a", "b", "c", "d", "e"]:  # "a" is least recently used when "e" arrives
            producer.send([sid], x)
        result = producer.send_detailed(["a"], x)  # evicts "b", comes back fresh
    assert result.status_names == ["state_reset"]
    assert daemon.stats.evictions == {"capacity": 2}
    assert daemon.metrics.registry.get_sample_value("lstmd_evictions_total", {"cause": "capacity"}) == 2


def test_capacity_reject_policy_refuses_new_streams(make_daemon):
    daemon = make_daemon(**{"state.capacity": 2, "state.on_full": "reject"})
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a", "b"], np.ones((2, 8), np.float32))
        with pytest.raises(RejectedError, match="capacity of 2 streams is exhausted"):
            producer.send(["c", "a"], np.ones((2, 8), np.float32))


def test_idle_ttl_evicts(make_daemon):
    daemon = make_daemon(**{"state.idle_ttl_s": 0.2})
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a"], np.ones((1, 8), np.float32))
        import time

        time.sleep(1.5)  # housekeeping runs once a second
        assert producer.send_detailed(["a"], np.ones((1, 8), np.float32)).status_names == ["state_reset"]
    assert daemon.stats.evictions.get("ttl") == 1


def test_reset_and_drop_commands(make_daemon):
    daemon = make_daemon()
    admin = Admin(daemon.endpoints["control"])
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        fresh = producer.send(["a"], x)
        producer.send(["a"], x)
        admin.reset("a")
        assert np.abs(np.array(admin.stream("a")["h"])).max() == 0
        after_reset = producer.send_detailed(["a"], x)
        assert after_reset.status_names == ["state_reset"]
        np.testing.assert_allclose(after_reset.predictions, fresh, rtol=1e-6)
        admin.drop("a")
        with pytest.raises(DaemonError, match="no stream 'a'"):
            admin.stream("a")
        assert producer.send_detailed(["a"], x).status_names == ["state_reset"]


def test_untouched_streams_keep_their_state_when_a_message_is_bad(make_daemon):
    daemon = make_daemon()
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["keep"], np.ones((1, 8), np.float32))
        before = admin.stream("keep")["h"]
        bad = np.ones((2, 8), np.float32)
        bad[0, 3] = np.nan
        with pytest.raises(RejectedError, match="NaN or Inf"):
            producer.send(["x", "keep2"], bad)
    assert admin.stream("keep")["h"] == before
    assert daemon.metrics.registry.get_sample_value("lstmd_rejections_total", {"reason": "non_finite"}) == 1


def _raw_request(endpoint: str, frames: list) -> protocol.EventsReply:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "no reply"
        return protocol.decode_reply(sock.recv_multipart())[0]
    finally:
        sock.close()


def _header(**fields) -> bytes:
    base = {"v": 1, "req": 7, "streams": ["a", "b"], "dim": 8}
    return msgspec.msgpack.encode(base | fields)


@pytest.mark.parametrize(
    ("frames", "reason", "message"),
    [
        ([b"\xc1garbage", b""], "malformed", "bad header"),
        ([_header()], "malformed", "expected 2 or 3 frames"),
        (
            [_header(v=99), np.ones((2, 8), np.float32).tobytes()],
            "protocol_version",
            "unknown protocol version 99",
        ),
        ([_header(), np.ones((2, 7), np.float32).tobytes()], "bad_shape", "expected 2 events x 8"),
        ([_header(dim=0), b""], "bad_shape", "dim must be positive"),
        ([_header(seqs=[1]), np.ones((2, 8), np.float32).tobytes()], "bad_shape", "seqs has 1 numbers"),
        ([_header(extra=1), np.ones((2, 8), np.float32).tobytes()], "malformed", "unknown field"),
        ([_header(streams=[1.5, "a"]), np.ones((2, 8), np.float32).tobytes()], "malformed", "bad header"),
        (
            [_header(targets="float32", target_dim=1), np.ones((2, 8), np.float32).tobytes()],
            "malformed",
            "targets frame is missing",
        ),
    ],
)
def test_malformed_messages_get_an_error_reply_naming_the_problem(make_daemon, frames, reason, message):
    daemon = make_daemon()
    reply = _raw_request(daemon.endpoints["events"], frames)
    assert reply.error_reason == reason
    assert message in reply.error
    assert daemon.metrics.registry.get_sample_value("lstmd_rejections_total", {"reason": reason}) >= 1
    # The daemon keeps serving.
    with Producer(daemon.endpoints["events"]) as producer:
        assert producer.send(["ok"], np.ones((1, 8), np.float32)).shape == (1, 1)


def test_wrong_feature_width_is_rejected(make_daemon):
    daemon = make_daemon()
    with (
        Producer(daemon.endpoints["events"]) as producer,
        pytest.raises(RejectedError, match="input_size is 8"),
    ):
        producer.send(["a"], np.ones((1, 5), np.float32))


def test_oversized_message_is_rejected(make_daemon):
    daemon = make_daemon(**{"serve.max_message_events": 10})
    with Producer(daemon.endpoints["events"]) as producer, pytest.raises(RejectedError, match="limit is 10"):
        producer.send(list(range(11)), np.ones((11, 8), np.float32))


def test_too_many_new_streams_and_long_ids_are_rejected_per_event(make_daemon):
    daemon = make_daemon(**{"serve.max_new_streams_per_message": 3, "serve.max_stream_id_length": 5})
    with Producer(daemon.endpoints["events"]) as producer:
        result = producer.send_detailed(["a", "b", "c", "d", "toolongid", "a"], np.ones((6, 8), np.float32))
    assert result.status_names == ["ok", "ok", "ok", "rejected", "rejected", "ok"]
    assert "too many new streams" in result.reasons[3]
    assert "exceeds the limit of 5" in result.reasons[4]
    # Read through the control socket: it runs after the batch is fully accounted.
    rejections = Admin(daemon.endpoints["control"]).status()["rejections"]
    assert rejections == {"too_many_new_streams": 1, "stream_id_too_long": 1}


def test_predictions_are_published_one_message_per_batch(make_daemon):
    daemon = make_daemon()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(daemon.endpoints["publish"])
    sub.setsockopt(zmq.SUBSCRIBE, protocol.PREDICTIONS_TOPIC)
    try:
        with Producer(daemon.endpoints["events"]) as producer:
            for _ in range(50):  # until the subscription has reached the daemon
                preds = producer.send(["watched", "other"], np.ones((2, 8), np.float32))
                if sub.poll(100):
                    break
            frames = sub.recv_multipart()
    finally:
        sub.close()
    published, rows = protocol.decode_published(frames)
    assert published.streams == ["watched", "other"] and published.version == 0
    assert published.seqs[0] == published.seqs[1] >= 0 and published.batch >= 1
    assert rows.shape == preds.shape


def test_import_model_serves_weights_trained_elsewhere(make_daemon, tmp_path):
    from safetensors.torch import save_file

    daemon = make_daemon()
    torch.manual_seed(3)
    lstm, head = torch.nn.LSTM(8, 24, 1, batch_first=True), torch.nn.Linear(24, 1)
    tensors = dict(lstm.state_dict()) | {f"head.{k}": v for k, v in head.state_dict().items()}
    meta = {
        "input_size": "8",
        "hidden_size": "24",
        "num_layers": "1",
        "output_size": "1",
        "task": "regression",
    }
    path = tmp_path / "elsewhere.safetensors"
    save_file(tensors, str(path), metadata=meta)
    admin = Admin(daemon.endpoints["control"])
    assert admin.import_model(path)["version"] == 1
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with Producer(daemon.endpoints["events"]) as producer:
        preds = np.concatenate([producer.send(["n"], x[i : i + 1]) for i in range(4)])
    with torch.no_grad():
        want = head(lstm(torch.from_numpy(x)[None])[0][0]).numpy()
    np.testing.assert_allclose(preds, want, rtol=1e-4, atol=1e-5)
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "head.bias"}, str(wrong), metadata=meta)
    with pytest.raises(DaemonError, match="lacks tensor 'head.bias'"):
        admin.import_model(wrong)


def test_unknown_control_command_is_an_error_not_a_crash(make_daemon):
    daemon = make_daemon()
    admin = Admin(daemon.endpoints["control"])
    with pytest.raises(DaemonError, match="unknown command 'nope'"):
        admin.call("nope")
    assert admin.status()["streams"] == 0


def test_control_is_answered_while_a_backlog_of_events_waits(make_daemon):
    """The loop reads the events socket itself; a control request must not wait behind the whole backlog (it
    is taken between two batches), and every queued event message is still answered afterwards."""
    daemon = make_daemon(**{"model.hidden_size": 256})  # a step slow enough that a backlog builds
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoints["events"])
    messages, per_message = 200, 1000
    features = np.random.default_rng(0).standard_normal((per_message, 8), dtype=np.float32)
    try:
        for req in range(messages):
            streams = list(range((req % 4) * per_message, (req % 4 + 1) * per_message))
            sock.send_multipart(protocol.encode_events(req, streams, features))
        status = Admin(daemon.endpoints["control"], timeout=30).status()
        answered_before_status = 0
        while sock.poll(0):
            sock.recv_multipart()
            answered_before_status += 1
        assert status["events"]["ok"] < messages * per_message
        assert answered_before_status < messages  # the status reply did not wait for the whole backlog
        answered = answered_before_status
        while answered < messages and sock.poll(30_000):
            reply, preds = protocol.decode_reply(sock.recv_multipart())
            assert reply.error is None and preds.shape == (per_message, 1)
            answered += 1
        assert answered == messages
    finally:
        sock.close()
