"""Whole-sequence outputs (many-to-one, `model.output = "end"`): the end flags on the wire, the replies (the end
event's output equals torch.nn.LSTM + head over the whole sequence, other events carry none), the state reset after
an end, resends, the WAL replay, delayed labels, the recorder's whole sequences and training on a real labelled
sequence task (made from the GOOG daily prices that ship with matplotlib)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from lstmd.clients import Admin, Producer, RejectedError, protocol
from lstmd.clients.cli._format import training_view
from lstmd.daemon import wal, wal_records
from lstmd.daemon.config import ConfigError, load_config
from lstmd.daemon.io import EventsLimits, decode_events_request
from lstmd.daemon.model import ServingModel
from lstmd.daemon.recorder import Recorder
from rich.console import Console

END = {"model.output": "end"}
CLASSES = {**END, "model.task": "classification", "model.output_size": 3, "model.input_size": 5}
WAL_ON = {"durability.wal": True, "durability.snapshot_on_shutdown": False, "durability.snapshot_interval_s": 0}


def _model(daemon) -> ServingModel:
    return daemon.engine.model


def _sequence_outputs(model: ServingModel, sequences: list[np.ndarray]) -> np.ndarray:
    """torch.nn.LSTM + nn.Linear over each whole sequence from zero state: the last step's output (softmax for
    classification), one row per sequence."""
    lstm, head = model.to_modules()
    rows = []
    with torch.no_grad():
        for xs in sequences:
            y, _ = lstm(torch.from_numpy(np.asarray(xs, np.float32))[None])
            out = head(y[0, -1])
            rows.append((out.softmax(-1) if model.spec.task == "classification" else out).numpy())
    return np.stack(rows)


def _interleaved(rng, streams: list, lengths: dict, dim: int):
    """Events of whole sequences of `lengths[stream]` steps (a list per stream, in order), interleaved across streams
    into messages of random size, some streams twice in one message. Yields (streams, x, ends) per message."""
    # Per stream, one flag per event: True at the last event of each of its sequences.
    ends_of = {sid: [j == n - 1 for n in lengths[sid] for j in range(n)] for sid in streams}
    cursor = dict.fromkeys(streams, 0)
    while any(cursor[s] < len(ends_of[s]) for s in streams):
        ids, ends = [], []
        for _ in range(int(rng.integers(1, 12))):
            open_ = [s for s in streams if cursor[s] < len(ends_of[s])]
            if not open_:
                break
            sid = open_[int(rng.integers(0, len(open_)))]
            ids.append(sid)
            ends.append(ends_of[sid][cursor[sid]])
            cursor[sid] += 1
        yield ids, rng.standard_normal((len(ids), dim)).astype(np.float32), ends


# ---- the wire -------------------------------------------------------------------------------------------------


def test_end_flags_round_trip_and_are_validated():
    x = np.zeros((3, 8), np.float32)
    limits = EventsLimits(input_size=8, max_events=64, ends=True)
    header, _, _ = decode_events_request(protocol.encode_events(1, ["a", "b", 7], x, ends=[False, True, True]), limits)
    assert header.ends == [False, True, True]
    # Without ends the field is not sent at all (nor any other default), so daemons older than it understand it.
    plain = protocol.encode_events(2, ["a"], x[:1])
    assert set(msgspec.msgpack.decode(plain[0])) == {"v", "req", "streams", "dim"}
    with pytest.raises(ValueError, match="one flag per event"):
        protocol.encode_events(3, ["a", "b"], x[:2], ends=[True])
    bad = {"v": 1, "req": 4, "streams": ["a", "b"], "dim": 8, "ends": [True]}
    with pytest.raises(protocol.ProtocolError, match="ends has 1 flags for 2 events") as err:
        decode_events_request([msgspec.msgpack.encode(bad), bytes(2 * 8 * 4)], limits)
    assert err.value.reason == "bad_shape"
    targets = {"v": 1, "req": 5, "streams": ["a"], "dim": 0, "seqs": [1], "targets": "int64", "target_dim": 1,
               "kind": "targets", "ends": [True]}
    with pytest.raises(protocol.ProtocolError, match="carries no end flags"):
        decode_events_request([msgspec.msgpack.encode(targets), bytes(8)], limits)


def test_config_refuses_forecast_end_and_a_max_sequence_beyond_the_record():
    with pytest.raises(ConfigError, match='output = "end".*regression and classification'):
        load_config(overrides=['model.output="end"', 'model.task="forecast"', "model.output_size=8"], environ={})
    with pytest.raises(ConfigError, match=r"train.max_sequence \(512\) must be between train.k2 \(32\) and "
                       r"train.record_steps \(256\)"):
        load_config(overrides=['model.output="end"', "train.max_sequence=512"], environ={})
    with pytest.raises(ConfigError, match=r"train.max_sequence \(8\) must be between"):
        load_config(overrides=['model.output="end"', "train.max_sequence=8"], environ={})
    # served in cluster mode too: the gateway carries the end flags in its log records (tests/test_cluster_gw.py)
    cluster = load_config(overrides=['model.output="end"', 'cluster.nats="nats://127.0.0.1:4222"'], environ={})
    assert cluster.model.output == "end"
    assert load_config(overrides=["train.max_sequence=512"], environ={}).model.output == "every"  # unused there


# ---- serving --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [CLASSES, {**END, "model.num_layers": 2, "model.output_size": 2,
                                                 "model.input_size": 5}], ids=["classification", "regression"])
def test_end_outputs_equal_torch_over_each_whole_sequence(make_daemon, overrides):
    daemon = make_daemon(**overrides)
    rng = np.random.default_rng(3)
    streams = [f"s{i}" for i in range(8)] + [100, 101, 102]
    lengths = {sid: [int(n) for n in rng.integers(1, 9, size=3)] for sid in streams}
    events = {sid: [] for sid in streams}  # every event sent, in order
    answered = {sid: [] for sid in streams}  # (prediction row, flags, was an end) per event
    with Producer(daemon.endpoints["events"]) as producer:
        for ids, x, ends in _interleaved(rng, streams, lengths, 5):
            result = producer.send_detailed(ids, x, ends=ends)
            assert result.status_names == ["ok"] * len(ids)  # an end's reset is no `state_reset`
            for sid, xi, row, flag, end in zip(ids, x, result.predictions, result.flags, ends, strict=True):
                events[sid].append(xi)
                answered[sid].append((row, int(flag), end))
    model = _model(daemon)
    for sid in streams:
        pos = 0
        for n in lengths[sid]:
            sequence = answered[sid][pos : pos + n]
            # Events other than the end carry no prediction: NaN rows, flagged; the first one starts a sequence.
            for j, (row, flag, end) in enumerate(sequence):
                assert end == (j == n - 1)
                assert bool(flag & protocol.FLAG_SEQUENCE_START) == (j == 0), (sid, j)
                assert bool(flag & protocol.FLAG_NO_OUTPUT) == (not end)
                assert np.isnan(row).all() != end
            want = _sequence_outputs(model, [events[sid][pos : pos + n]])[0]
            np.testing.assert_allclose(sequence[-1][0], want, rtol=1e-4, atol=1e-5, err_msg=f"{sid} seq of {n}")
            pos += n
    # After an end the stream's state is zero until its next event.
    state = Admin(daemon.endpoints["control"]).stream(streams[0])
    assert not np.any(state["h"]) and not np.any(state["c"])


def test_every_refuses_end_flags_and_end_keeps_the_original_answer_for_resends(make_daemon):
    every = make_daemon()
    x = np.ones((2, 8), np.float32)
    with Producer(every.endpoints["events"]) as producer:
        with pytest.raises(RejectedError, match=r'ends_not_served.*model.output = "end"'):
            producer.send(["a", "a"], x, ends=[False, True])
        result = producer.send_detailed(["a", "a"], x, ends=[False, False])  # no end marked: served as ever
        assert np.isfinite(result.predictions).all() and not result.flags.any()
    end = make_daemon(**END)
    with Producer(end.endpoints["events"]) as producer:
        first = producer.send_detailed(["a", "a", "b"], x[[0, 1, 0]], seqs=[0, 1, 0], ends=[False, True, False])
        again = producer.send_detailed(["a", "a", "b"], x[[0, 1, 0]], seqs=[0, 1, 0], ends=[False, True, False])
        assert again.status_names == ["duplicate"] * 3
        np.testing.assert_array_equal(again.predictions[1], first.predictions[1])
        assert list(again.no_output) == [0, 2] and again.unavailable.size == 0
        # send() hands back the NaN rows of non-end events without raising: they are answers without a prediction.
        preds = producer.send(["a", "a"], x, seqs=[1, 2], ends=[True, True])
        np.testing.assert_array_equal(preds[0], first.predictions[1])
        assert np.isfinite(preds[1]).all()


# ---- durability -----------------------------------------------------------------------------------------------


def test_wal_replay_restores_the_same_resets_and_open_sequences(make_daemon, tmp_path):
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **{**CLASSES, **WAL_ON})
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 5)).astype(np.float32)
    ids = ["a", "b", "a", "c", "a", "b", "c", "c", "c"]
    ends = [False, False, True, False, False, True, False, False, False]  # a ended then reopened, b ended, c open
    with Producer(first.endpoints["events"]) as producer:
        producer.send(ids, x, seqs=[0, 0, 1, 0, 2, 1, 1, 2, 3], ends=ends)
    admin = Admin(first.endpoints["control"])
    before = {sid: admin.stream(sid) for sid in "abc"}
    first.stop_and_join()  # no snapshot on shutdown: the restart replays the log
    payloads = [p for path in sorted((state / "wal").glob("wal-*.log")) for p in wal.read_segment(path).records]
    assert any(msgspec.msgpack.decode(p)[0] == wal_records.SEQUENCE_EVENTS for p in payloads)
    second = make_daemon(state_dir=state, **{**CLASSES, **WAL_ON})
    admin = Admin(second.endpoints["control"])
    for sid in "abc":
        got = admin.stream(sid)
        assert (got["last_seq"], got["events"]) == (before[sid]["last_seq"], before[sid]["events"])
        np.testing.assert_allclose(got["h"], before[sid]["h"], rtol=0, atol=1e-6)
    assert not np.any(admin.stream("b")["h"])  # b ended: zero state, after the restart too
    more = rng.standard_normal((3, 5)).astype(np.float32)
    with Producer(second.endpoints["events"]) as producer:
        result = producer.send_detailed(["a", "b", "c"], more, seqs=[3, 2, 4], ends=[True, True, True])
    # b starts a new sequence; a's and c's sequences span the restart and equal torch over their whole events.
    assert list(result.sequence_starts) == [1]
    whole = [np.vstack([x[4], more[0]]), more[1:2], np.vstack([x[[3, 6, 7, 8]], more[2]])]
    want = _sequence_outputs(_model(second), whole)
    np.testing.assert_allclose(result.predictions, want, rtol=1e-4, atol=1e-5)


def _crash_harness():
    """benchmarks/crash_stress.py (its daemon subprocess: start, wait until ready, SIGKILL), as tests/test_crash.py
    loads it."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_stress.py"
    spec = importlib.util.spec_from_file_location("crash_stress", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_sigkill_restarts_reset_exactly_the_streams_whose_sequence_ended(tmp_path):
    """A real `lstmd serve` killed with SIGKILL twice mid-traffic (fsync = always: every acknowledged event is on
    disk): after each restart the streams continue their open sequences and the ended ones start from zero, so
    every end output still equals torch.nn.LSTM + head over its whole sequence."""
    from lstmd.clients.bench import free_tcp_port

    events, control = (f"tcp://127.0.0.1:{free_tcp_port()}" for _ in range(2))
    config = tmp_path / "lstmd.toml"
    config.write_text(
        "[model]\ninput_size = 5\nhidden_size = 16\noutput_size = 3\ntask = 'classification'\noutput = 'end'\n"
        f"[serve]\nevents = '{events}'\ncontrol = '{control}'\npublish = ''\nmetrics = ''\ndevice = 'cpu'\n"
        f"[state]\ndir = '{tmp_path / 'state'}'\ncapacity = 64\n"
        "[durability]\nwal = true\nfsync = 'always'\nsnapshot_interval_s = 0\n"
    )
    daemon = _crash_harness()._Daemon(config, tmp_path / "daemon.log", control)
    rng = np.random.default_rng(9)
    streams = [f"s{i}" for i in range(6)]
    lengths = {sid: [int(n) for n in rng.integers(1, 7, size=4)] for sid in streams}
    messages = list(_interleaved(rng, streams, lengths, 5))
    events_of = {sid: [] for sid in streams}
    answers = {sid: [] for sid in streams}
    seq = dict.fromkeys(streams, 0)
    daemon.start()
    try:
        daemon.wait_ready()
        for m, (ids, x, ends) in enumerate(messages):
            if m in (len(messages) // 3, 2 * len(messages) // 3):
                daemon.kill()
                daemon.start()
                daemon.wait_ready()
            numbers = []
            for sid in ids:
                numbers.append(seq[sid])
                seq[sid] += 1
            with Producer(events) as producer:
                result = producer.send_detailed(ids, x, seqs=numbers, ends=ends)
            assert result.status_names == ["ok"] * len(ids)
            for sid, xi, row, flag in zip(ids, x, result.predictions, result.flags, strict=True):
                events_of[sid].append(xi)
                answers[sid].append((row, int(flag)))
        Admin(control).export_model(tmp_path / "model.safetensors")
    finally:
        daemon.stop()
    model = ServingModel.from_bytes((tmp_path / "model.safetensors").read_bytes())
    for sid in streams:
        pos = 0
        for n in lengths[sid]:
            assert answers[sid][pos][1] & protocol.FLAG_SEQUENCE_START, (sid, pos)
            want = _sequence_outputs(model, [events_of[sid][pos : pos + n]])[0]
            np.testing.assert_allclose(answers[sid][pos + n - 1][0], want, rtol=1e-4, atol=1e-5, err_msg=sid)
            pos += n


@pytest.mark.parametrize("durability", ["snapshot", "wal"])
def test_finished_sequences_and_their_labels_survive_a_restart(make_daemon, tmp_path, durability):
    """The recorder's whole sequences come back from a snapshot (clean shutdown) and from the log replay alone
    (no snapshot), delayed labels included."""
    overrides = {**CLASSES, "train.enabled": True, "train.interval": 0.0, "train.k2": 4, "train.record_steps": 16,
                 "train.max_sequence": 8, "train.record_streams": 8, **(WAL_ON if durability == "wal" else {})}
    state = tmp_path / "state"
    first = make_daemon(state_dir=state, **overrides)
    rng = np.random.default_rng(4)
    lengths = {sid: [int(n) for n in rng.integers(1, 11, size=3)] for sid in ("a", "b", 7)}
    seq = {sid: 0 for sid in lengths}
    unlabelled_end = None
    with Producer(first.endpoints["events"]) as producer:
        for ids, x, ends in _interleaved(rng, list(lengths), lengths, 5):
            numbers = []
            for sid in ids:
                numbers.append(seq[sid])
                seq[sid] += 1
            labels = [int(rng.integers(0, 3)) if end else -1 for end in ends]
            if unlabelled_end is None and any(ends):  # this one's label comes later
                j = ends.index(True)
                unlabelled_end, labels[j] = (ids[j], numbers[j]), -1
            producer.send(ids, x, targets=np.array(labels), seqs=numbers, ends=ends)
        assert producer.send_targets([unlabelled_end[0]], [unlabelled_end[1]], np.array([2])).tolist() == [True]
    want = first.trainer.status()["recorder"]
    pool = first.recorder.sequences
    assert want["sequences_total"] == 9 and (want["training_windows"], want["holdout_windows"]) == (7, 2)
    first.stop_and_join()
    second = make_daemon(state_dir=state, **overrides)
    got = second.trainer.status()["recorder"]
    keys = ("sequences_total", "sequences_kept", "training_windows", "holdout_windows")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    again = second.recorder.sequences
    console = Console(width=200, record=True)
    console.print(training_view(second.trainer.status()))
    assert "9 kept of 9 finished (up to 8 steps each), 0 dropped" in console.export_text()
    for name in ("x", "h0", "y", "labelled", "length", "seq", "number"):
        np.testing.assert_array_equal(getattr(again, name), getattr(pool, name), err_msg=name)


def test_wal_records_with_ends_round_trip_and_plain_batches_keep_kind_e():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    args = ([["a", "b", "a"]], x, [2, 0, 1], [5, 0, 4], [False, True, False], [])
    plain = wal_records.events_record(*args, ends=[False, False, False])
    assert plain.ends is None and msgspec.msgpack.decode(wal_records.encode(plain))[0] == wal_records.EVENTS
    record = wal_records.events_record(*args, ends=[True, False, False])
    back = wal_records.decode(wal_records.encode(record))
    assert back.ends.tolist() == [True, False, False]
    np.testing.assert_array_equal(back.features, x[[2, 0, 1]])


# ---- training: the recorder's whole sequences, labels, and learning -------------------------------------------


def _recorder(**kw) -> Recorder:
    base = dict(num_layers=1, hidden_size=2, input_size=1, target_size=1, task="classification", capacity=4,
                record_streams=2, record_steps=16, k2=4, holdout_windows=1, max_sequence=10)
    return Recorder(**{**base, **kw})


def test_recorder_truncates_long_sequences_with_the_state_carried_and_joins_labels():
    rec = _recorder()
    h = torch.zeros(1, 4, 2)
    slot = np.array([1])
    for k in range(13):  # one sequence of 13 events; the state after event k is k + 1
        h[:, 1] = k + 1
        rec.record(slot, np.array([[k]], np.float32), np.array([k]), np.array([[np.nan]], np.float32),
                   np.array([k == 0]), h, h, np.array([k == 12]))
    pool = rec.sequences
    assert pool.total == 1 and pool.x.shape[1] == 10
    # 13 steps > max_sequence 10: from the first window boundary (k2 = 4) leaving at most 10, i.e. event 4 on,
    # starting from the state the stream had there (after event 3).
    assert pool.length[0] == 9 and pool.x[0, :9, 0].tolist() == list(range(4, 13))
    assert pool.h0[0, 0].tolist() == [4.0, 4.0] and not pool.labelled[0]
    assert rec.join_targets(np.array([1, 1]), np.array([12, 11]), np.array([[2.0], [1.0]], np.float32)).tolist() == [
        True, False]  # by the end event's seq only
    assert pool.labelled[0] and pool.y[0, 0] == 2.0
    snap = rec.snapshot_tensors()
    other = _recorder()
    other.restore_tensors(snap)
    assert other.sequences.total == 1 and other.sequences.length[0] == 9
    assert other.join_targets(np.array([1]), np.array([12]), np.array([[1.0]], np.float32)).tolist() == [True]


def test_recorder_windows_put_the_label_on_the_end_step_only():
    rec = _recorder(max_sequence=8)
    h = torch.zeros(1, 4, 2)
    for n, slot in ((3, 0), (5, 1), (2, 0), (4, 1), (1, 0), (2, 1), (3, 0), (2, 1)):
        for k in range(n):
            rec.record(np.array([slot]), np.full((1, 1), k, np.float32), np.array([100 * n + k]),
                       np.array([[n % 3 if k == n - 1 else -1]], np.float32), np.array([k == 0]), h, h,
                       np.array([k == n - 1]))
    pool = rec.sequences
    # Bounded: as many steps as the rows hold (2 x 16) in entries of 8, so the newest 4 of the 8 sequences.
    assert pool.total == 8 and pool.number.tolist() == [4, 5, 6, 7]
    train, held = pool.split()
    assert (train.size, held.size) == (3, 1) and pool.number[held].tolist() == [7]  # every 4th held out
    w = pool.windows(np.array([0, 1]))  # sequences 4 (1 step, label 1) and 5 (2 steps, label 2)
    assert w.x.shape == (2, 2, 1) and w.mask.tolist() == [[True, False], [False, True]]
    assert w.y[0, 0, 0] == 1 and w.y[1, 1, 0] == 2 and w.x[1, :, 0].tolist() == [0, 1]


def test_delayed_labels_name_end_events_of_the_stream_itself(make_daemon):
    daemon = make_daemon(**{**CLASSES, "train.enabled": True, "train.interval": 0.0, "train.k2": 4,
                            "train.record_steps": 16, "train.max_sequence": 8})
    x = np.ones((2, 5), np.float32)
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a", "a"], x, seqs=[0, 1], ends=[False, True])
        slot = admin.stream("a")["slot"]
        admin.drop("a")
        producer.send(["z", "z"], x, seqs=[0, 1], ends=[False, False])  # z takes a's slot; no end yet
        assert admin.stream("z")["slot"] == slot
        # (z, 1) is no end, and a's sequence that ended at seq 1 in this slot is no longer z's to label.
        assert producer.send_targets(["z", "a"], [1, 1], np.array([2, 2])).tolist() == [False, False]
        producer.send(["z"], x[:1], seqs=[2], ends=[True])
        # 3 classes: a label 7 is refused (it would fail every training round while recorded).
        assert producer.send_targets(["z"], [2], np.array([7])).tolist() == [False]
        assert not daemon.recorder.sequences.labelled[1]
        assert producer.send_targets(["z", "z"], [2, 0], np.array([1, 1])).tolist() == [True, False]
    pool = daemon.recorder.sequences
    assert pool.labelled[:2].tolist() == [False, True] and pool.y[1, 0] == 1


def test_delayed_class_labels_outside_the_classes_are_refused_with_every_output_too(make_daemon):
    daemon = make_daemon(**{"model.task": "classification", "model.output_size": 3, "train.enabled": True,
                            "train.interval": 0.0})
    with Producer(daemon.endpoints["events"]) as producer:
        producer.send(["a", "a"], np.ones((2, 8), np.float32), seqs=[0, 1])
        assert producer.send_targets(["a", "a", "a"], [0, 1, 1], np.array([7, -1, 2])).tolist() == [False, False, True]
    assert daemon.recorder.targets_joined == 1


def _goog_task():
    """A real labelled sequence task: segments of 5-20 trading days of GOOG's daily prices (matplotlib's sample
    data, 2004-2008), each day's features (log return, log high/low range, log volume change; scaled), labelled
    1 when the close rose over the segment. Training segments from the first 70% of the days, held-out ones
    from the rest."""
    from matplotlib import cbook

    data = cbook.get_sample_data("goog.npz")["price_data"]
    close, high, low, volume = (data[k].astype(np.float64) for k in ("adj_close", "high", "low", "volume"))
    ret = np.diff(np.log(close))
    features = np.stack([ret * 40, np.log(high / low)[1:] * 20 - 0.5, np.diff(np.log(volume))], axis=1)
    rng = np.random.default_rng(11)
    split = int(0.7 * len(ret))

    def segments(lo, hi, count):
        out = []
        for _ in range(count):
            n = int(rng.integers(5, 21))
            s = int(rng.integers(lo, hi - n))
            out.append((features[s : s + n].astype(np.float32), int(ret[s : s + n].sum() > 0)))
        return out

    return segments(0, split, 480), segments(split, len(ret), 160)


def _send_sequences(producer, segments, prefix: str, with_labels: bool, streams: int = 16) -> np.ndarray:
    """Each stream sends its share of the segments one after another (one event per stream per message);
    returns the class probabilities answered to each segment's end event."""
    out = np.full((len(segments), 2), np.nan, np.float32)
    queues = {k: list(range(k, len(segments), streams)) for k in range(streams)}
    pos = dict.fromkeys(queues, 0)
    while any(queues.values()):
        ids, xs, ends, labels, which = [], [], [], [], []
        for k, queue in queues.items():
            if not queue:
                continue
            x, label = segments[queue[0]]
            j = pos[k]
            ids.append(f"{prefix}{k}")
            xs.append(x[j])
            ends.append(j == len(x) - 1)
            labels.append(label if ends[-1] else -1)
            which.append(queue[0])
            pos[k] += 1
            if ends[-1]:
                queue.pop(0)
                pos[k] = 0
        preds = producer.send(ids, np.stack(xs), targets=np.array(labels) if with_labels else None, ends=ends)
        for i, end in enumerate(ends):
            if end:
                out[which[i]] = preds[i]
    return out


def _accuracy(probs: np.ndarray, segments) -> float:
    return float((probs.argmax(axis=1) == np.array([label for _, label in segments])).mean())


def test_training_on_whole_sequences_raises_held_out_accuracy(make_daemon, capsys):
    train, held = _goog_task()
    daemon = make_daemon(**{
        **END, "model.task": "classification", "model.input_size": 3, "model.output_size": 2,
        "model.hidden_size": 16, "train.enabled": True, "train.interval": 0.0, "train.k2": 8,
        "train.record_steps": 32, "train.max_sequence": 24, "train.record_streams": 512, "train.steps": 10,
        "train.batch": 64, "train.lr": 0.02, "train.tolerance": 0.02,
    })
    admin = Admin(daemon.endpoints["control"])
    with Producer(daemon.endpoints["events"]) as producer:
        frozen = _accuracy(_send_sequences(producer, held, "frozen-", with_labels=False), held)
        _send_sequences(producer, train, "train-", with_labels=True)
        status = admin.train_status()
        assert status["recorder"]["training_windows"] >= 300 and status["recorder"]["holdout_windows"] >= 100
        for _ in range(12):  # through the control socket, as `lstmd train now`; each waits for its round to settle
            admin.train_now(wait=120)
        assert daemon.trainer.outcomes["published"] >= 1
        trained = _accuracy(_send_sequences(producer, held, "trained-", with_labels=False), held)
    with capsys.disabled():
        print(f"\nGOOG segments, held-out accuracy: frozen {frozen:.3f}, trained {trained:.3f} "
              f"({daemon.trainer.outcomes['published']} of 12 rounds published)")
    # Measured: 0.45 frozen, 0.93 after the 12 rounds (2-core CPU); the bounds leave room for other machines.
    assert trained >= 0.75 and trained >= frozen + 0.15, (frozen, trained)
