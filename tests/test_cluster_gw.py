"""What a Producer does through a cluster gateway beyond events: multi-step forecasts (routed through the log to
the owners of the streams' key groups, daemon/cluster/gateway.py) and whole-sequence outputs (model.output =
"end": the end flags carried in the log records, so owners and replays reset the same streams), across a
graceful handover and a kill -9. Against a real nats-server on loopback, compared with a single-process daemon on
the same trace.

Tolerance 1e-5 throughout: the replicas batch the same events differently (BLAS blocking), nothing else
differs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cluster_helpers import (
    control_endpoint,
    gateway,
    lease_held,
    needs_server,
    start_replica,
    stop_replicas,
    wait,
    wait_for_owners,
    wait_for_snapshots,
)

pytestmark = needs_server

G = 8
FORECAST = {"model.task": "forecast", "model.input_size": 3, "model.output_size": 3, "model.hidden_size": 8,
            "model.seed": 3}
CLUSTER = {"cluster.key_groups": G, "cluster.snapshot_interval_s": 0.5}
STREAMS = [f"s{i}" if i % 2 else i for i in range(12)]  # str and int ids both


def _forecast_trace(steps: int = 30, seed: int = 1):
    rng = np.random.default_rng(seed)
    for step in range(steps):
        x = rng.standard_normal((len(STREAMS), 3)).astype(np.float32)
        yield x, ([step + 1] * len(STREAMS) if step % 2 else None)


def _forecasts(endpoint: str, on_step=None) -> list:
    """The trace, with forecasts of every stream (and a stream never seen, and known future features) at a few
    steps: the predictions of each step, and (step, forecasts [N, 3, O], with exog [N, 2, O], the refusal of an
    unknown stream) after steps 9, 19 and 29; last the refusal of a request wrong whole."""
    from lstmd.clients import Producer, RejectedError

    exog = np.random.default_rng(9).standard_normal((len(STREAMS), 2, 3)).astype(np.float32)
    out = []
    with Producer(endpoint, timeout=30) as producer:
        for step, (x, seqs) in enumerate(_forecast_trace()):
            if on_step is not None:
                on_step(step)
            out.append(producer.send(STREAMS, x, seqs=seqs))
            if step % 10 == 9:
                with pytest.raises(RejectedError) as unknown:
                    producer.forecast([STREAMS[0], "nobody", STREAMS[1]], horizon=2)
                out.append((step, producer.forecast(STREAMS, horizon=3), producer.forecast(STREAMS, 2, exog=exog),
                            str(unknown.value)))
        with pytest.raises(RejectedError) as bad:  # refused whole: the same check, the same words
            producer.forecast(STREAMS[:2], 2, exog=np.full((2, 2, 3), np.nan, np.float32))
        out.append(("bad exog", str(bad.value)))
    return out


def _owned(daemon) -> float:
    return daemon.metrics.registry.get_sample_value("lstmd_cluster_key_groups") or 0


def test_forecasts_through_a_gateway_equal_a_single_daemon(nats_url, make_daemon, tmp_path):
    """Forecasts through a gateway to 2 replicas (each owning some of the streams, so a forecast of all of them
    is answered by both and joined), interleaved with the events they must see, equal a single daemon's; a
    stream nobody has is refused as a single daemon refuses it, and a request wrong whole with its words. A
    third replica joins mid-trace: the forecasts of the key groups it took (restored, replayed) still equal."""
    from lstmd.daemon.cluster.log import key_group
    from lstmd.daemon.cluster.membership import assignment

    single = make_daemon(**FORECAST)
    expected = _forecasts(single.endpoints["events"])

    cluster = {**FORECAST, **CLUSTER, "cluster.nats": nats_url}
    replicas = {m: make_daemon(**cluster, **{"cluster.member": m}) for m in ("r1", "r2")}
    wait("both replicas own key groups",
         lambda: all(_owned(r) for r in replicas.values()) and sum(map(_owned, replicas.values())) == G)
    owners = assignment({"r1", "r2"}, G)
    assert all({key_group(s, G) for s in STREAMS} & set(owners[m]) for m in owners)  # both answer

    def join(step: int) -> None:
        if step == 15:
            replicas["r3"] = make_daemon(**cluster, **{"cluster.member": "r3"})
            share = len(assignment({"r1", "r2", "r3"}, G)["r3"])
            wait("r3 took its key groups over", lambda: _owned(replicas["r3"]) == share)

    gw = gateway(nats_url, tmp_path, FORECAST, **{"cluster.key_groups": G})
    try:
        got = _forecasts(gw.endpoint, join)
    finally:
        gw.stop_and_join()
    assert {key_group(s, G) for s in STREAMS} & set(assignment({"r1", "r2", "r3"}, G)["r3"])  # some moved
    assert len(got) == len(expected) == 30 + 4
    predictions = [p for p in got if isinstance(p, np.ndarray)]
    np.testing.assert_allclose(predictions, [p for p in expected if isinstance(p, np.ndarray)], atol=1e-5, rtol=0)
    asked = [f for f in got if isinstance(f, tuple)]
    for (step, plain, with_exog, unknown), (step_, plain_, with_exog_, unknown_) in zip(
            asked[:3], [f for f in expected if isinstance(f, tuple)][:3], strict=True):
        assert step == step_
        assert plain.shape == (len(STREAMS), 3, 3)
        np.testing.assert_allclose(plain, plain_, atol=1e-5, rtol=0, err_msg=f"forecasts after step {step}")
        np.testing.assert_allclose(with_exog, with_exog_, atol=1e-5, rtol=0, err_msg=f"with exog, step {step}")
        assert unknown == unknown_ and "stream #1 (stream 'nobody')" in unknown
    assert got[-1] == expected[-1]
    assert "exog holds NaN or Inf" in got[-1][1]


def test_forecasts_across_a_kill_9_and_with_every_owner_dead(nats_url, tmp_path):
    """Two replicas; one is killed -9 right before a forecast: the forecast waits for its key groups to move (lease
    expiry, the last snapshot restored, the log replayed) and is answered by the survivor, equal to the forecast
    before the kill. Then the survivor is killed too: a forecast gets no answer, and the gateway answers it
    `unavailable` after cluster.forecast_timeout_s, naming the key groups and their dead owner."""
    from lstmd.clients import Producer, RejectedError
    from lstmd.daemon.cluster.log import key_group
    from lstmd.daemon.cluster.membership import assignment

    cluster = {"cluster.key_groups": G, "cluster.snapshot_interval_s": 0.5}
    procs = {m: start_replica(nats_url, tmp_path, m, FORECAST, **cluster) for m in ("r1", "r2")}
    gateways = []
    try:
        wait("both replicas serving", lambda: all(control_endpoint(state) for _, state in procs.values()))
        wait_for_owners(nats_url, G, {"r1", "r2"})
        held_by_r1 = {key_group(s, G) for s in STREAMS} & set(assignment({"r1", "r2"}, G)["r1"])
        assert held_by_r1
        patient = gateway(nats_url, tmp_path / "patient", FORECAST, **{"cluster.key_groups": G,
                                                                     "cluster.forecast_timeout_s": 30.0})
        gateways.append(patient)
        with Producer(patient.endpoint, timeout=60) as producer:
            for step, (x, seqs) in enumerate(_forecast_trace(steps=12)):
                if step == 8:  # r1 snapshots its key groups: its successor restores them, then replays 4 steps
                    wait_for_snapshots(nats_url, held_by_r1, "r1")
                producer.send(STREAMS, x, seqs=seqs)
            before = producer.forecast(STREAMS, horizon=3)
            procs["r1"][0].kill()
            after = producer.forecast(STREAMS, horizon=3)  # answered in part by r1's successor
        assert procs["r1"][0].wait(10) == -9
        np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
        assert "restored" in (tmp_path / "r2.log").read_text()  # r1's key groups: its snapshots, then the log

        procs["r2"][0].kill()
        procs["r2"][0].wait(30)
        wait("r2's lease expired", lambda: not lease_held(nats_url, "r2"))
        hasty = gateway(nats_url, tmp_path / "hasty", FORECAST, **{"cluster.key_groups": G,
                                                                 "cluster.forecast_timeout_s": 1.0})
        gateways.append(hasty)
        with Producer(hasty.endpoint, timeout=30) as producer, pytest.raises(RejectedError) as err:
            producer.forecast(["a", "b"], horizon=2)
        message = str(err.value)
        assert "forecast refused (unavailable): no answer within cluster.forecast_timeout_s = 1 s for 2 of 2 " \
               "streams ('a', 'b')" in message
        group = min(key_group("a", G), key_group("b", G))
        assert f"key group {group}: owner r2, not alive: its lease expired" in message
        assert "ask again" in message
        assert hasty.metrics.registry.get_sample_value("lstmd_gateway_requests_total", {"outcome": "timed_out"}) == 1
    finally:
        for gw in gateways:
            gw.stop_and_join()
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def test_a_forecast_to_a_cluster_without_replicas(nats_url, tmp_path):
    """A gateway alone: the forecast is in the log, nobody answers; after cluster.forecast_timeout_s it is
    answered unavailable, saying that no replica has joined (and nothing waits in the gateway after it)."""
    from lstmd.clients import Producer, RejectedError

    gw = gateway(nats_url, tmp_path, FORECAST, **{"cluster.key_groups": G, "cluster.forecast_timeout_s": 0.5})
    try:
        with Producer(gw.endpoint, timeout=30) as producer, pytest.raises(RejectedError) as err:
            producer.forecast(["a"], horizon=1)
        assert "forecast refused (unavailable): no answer within cluster.forecast_timeout_s = 0.5 s for 1 of 1 " \
               "streams ('a'): no replica has joined this cluster yet" in str(err.value)
        assert gw.metrics.registry.get_sample_value("lstmd_gateway_inflight_requests") == 0
    finally:
        gw.stop_and_join()


END = {"model.input_size": 4, "model.hidden_size": 16, "model.output_size": 2, "model.seed": 3, "model.output": "end"}
END_STREAMS, END_STEPS = 20, 60


def _ends_trace(seed: int = 4):
    """Numbered messages of one event per stream; each event ends its stream's sequence with probability 0.2."""
    rng = np.random.default_rng(seed)
    streams = [f"e{i}" if i % 2 else i for i in range(END_STREAMS)]
    for step in range(END_STEPS):
        x = rng.standard_normal((END_STREAMS, 4)).astype(np.float32)
        yield streams, x, [step + 1] * END_STREAMS, (rng.random(END_STREAMS) < 0.2).tolist()


def test_sequence_ends_through_a_gateway_and_a_kill_9(nats_url, make_daemon, tmp_path):
    """model.output = "end" through a gateway to 2 replicas, one killed -9 at 40% of the trace: its key groups
    move to the other, which restores their last snapshot and replays the log, ending the same sequences (the
    end flags are in the records). Every end event's prediction, every no_output / sequence-start flag and every
    stream's final (h, c) equal the single-process run's."""
    from lstmd.clients import Admin, Producer
    from lstmd.daemon.cluster.log import key_group
    from lstmd.daemon.cluster.membership import assignment

    single = make_daemon(**END)
    with Producer(single.endpoints["events"], timeout=30) as producer:
        expected = [producer.send_detailed(s, x, seqs=q, ends=e) for s, x, q, e in _ends_trace()]
    assert 0 < sum(len(r.no_output) for r in expected) < END_STREAMS * END_STEPS  # ends and no-outputs both

    cluster = {"cluster.key_groups": G, "cluster.snapshot_interval_s": 0.5}
    procs = {m: start_replica(nats_url, tmp_path, m, END, **cluster) for m in ("r1", "r2")}
    gw = None
    try:
        wait("both replicas serving", lambda: all(control_endpoint(state) for _, state in procs.values()))
        wait_for_owners(nats_url, G, {"r1", "r2"})  # both answer, records split between them, before the kill
        streams = next(_ends_trace())[0]
        held_by_r1 = {key_group(s, G) for s in streams} & set(assignment({"r1", "r2"}, G)["r1"])
        assert held_by_r1
        gw = gateway(nats_url, tmp_path, END, **{"cluster.key_groups": G})
        got = []
        with Producer(gw.endpoint, timeout=60) as producer:
            for step, (s, x, q, e) in enumerate(_ends_trace()):
                if step == END_STEPS * 2 // 5 - 5:  # r1 snapshots its key groups: the kill replays 5 steps
                    wait_for_snapshots(nats_url, held_by_r1, "r1")
                if step == END_STEPS * 2 // 5:
                    procs["r1"][0].kill()
                got.append(producer.send_detailed(s, x, seqs=q, ends=e))
        assert procs["r1"][0].wait(10) == -9
        assert "restored" in (tmp_path / "r2.log").read_text()  # r1's key groups: its snapshots, then the log
        for step, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert b.status_names == a.status_names == ["ok"] * END_STREAMS, f"step {step}"
            np.testing.assert_array_equal(a.flags, b.flags, err_msg=f"flags at step {step}")
            np.testing.assert_allclose(a.predictions, b.predictions, atol=1e-5, rtol=0, err_msg=f"step {step}")
        admin, reference = Admin(control_endpoint(procs["r2"][1])), Admin(single.endpoints["control"])
        for stream in streams:
            b = wait(f"stream {stream} replayed",
                     lambda s=stream: (st := admin.stream(s)) and st["last_seq"] == END_STEPS and st)
            a = reference.stream(stream)
            assert b["events"] == a["events"] == END_STEPS
            np.testing.assert_allclose(b["h"], a["h"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(b["c"], a["c"], atol=1e-5, rtol=0)
    finally:
        if gw is not None:
            gw.stop_and_join()
        stop_replicas(procs)
