"""Metrics: names, pre-created series, readiness and the HTTP endpoints, each test with a fresh registry."""

from __future__ import annotations

import math
import urllib.error
import urllib.request

import pytest
from lstmd.daemon.metrics import (
    DEVICE_MEMORY_KINDS,
    EVENT_STATUSES,
    EVICTION_CAUSES,
    TRAIN_OUTCOMES,
    Metrics,
    parse_address,
)
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def served(metrics: Metrics):
    server = metrics.serve_http("127.0.0.1:0")
    yield metrics, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


def test_labelled_counters_exist_at_zero_before_any_event(metrics: Metrics) -> None:
    value = metrics.registry.get_sample_value
    for status in EVENT_STATUSES:
        assert value("lstmd_events_total", {"status": status}) == 0
    for cause in EVICTION_CAUSES:
        assert value("lstmd_evictions_total", {"cause": cause}) == 0
    for outcome in TRAIN_OUTCOMES:
        assert value("lstmd_train_rounds_total", {"outcome": outcome}) == 0
    for kind in DEVICE_MEMORY_KINDS:
        assert value("lstmd_device_memory_bytes", {"kind": kind}) == 0
    assert math.isnan(value("lstmd_train_loss"))
    assert math.isnan(value("lstmd_holdout_loss", {"model": "serving"}))
    assert value("lstmd_ready") == 0


def test_daemon_facing_attributes_record_under_their_names(metrics: Metrics) -> None:
    m, value = metrics, metrics.registry.get_sample_value
    m.events.labels("ok").inc(3)
    m.rejections.labels("bad_shape").inc()
    m.sequence_gaps.inc(2)
    m.batch_size.observe(5)
    m.event_latency.observe(3e-4)
    m.step_duration.observe(1e-4)
    m.queue_depth.set(7)
    m.control_commands.labels("status", "ok").inc()
    m.active_streams.set(10)
    m.capacity.set(100)
    m.evictions.labels("ttl").inc()
    m.train_rounds.labels("published").inc()
    m.train_loss.set(0.5)
    m.holdout_loss.labels("candidate").set(0.25)
    m.train_round_duration.observe(0.2)
    m.model_version.set(4)
    m.last_publish.set(1_700_000_000)
    m.train_enabled.set(1)
    m.wal_bytes.inc(4096)
    m.wal_fsync_duration.observe(2e-3)
    m.snapshot_duration.observe(1.5)
    m.last_snapshot.set(1_700_000_001)
    m.set_build_info("0.1.0", "triton", "cuda:0")

    assert value("lstmd_events_total", {"status": "ok"}) == 3
    assert value("lstmd_rejections_total", {"reason": "bad_shape"}) == 1
    assert value("lstmd_sequence_gaps_total") == 2
    assert value("lstmd_batch_size_events_bucket", {"le": "8.0"}) == 1
    assert value("lstmd_batch_size_events_bucket", {"le": "4.0"}) == 0
    # 300 µs lands in the 500 µs bucket and not in the 250 µs one: the buckets resolve 100 µs .. 1 s.
    assert value("lstmd_event_latency_seconds_bucket", {"le": "0.0005"}) == 1
    assert value("lstmd_event_latency_seconds_bucket", {"le": "0.00025"}) == 0
    assert value("lstmd_event_latency_seconds_bucket", {"le": "0.0001"}) == 0
    assert value("lstmd_event_latency_seconds_bucket", {"le": "1.0"}) == 1
    assert value("lstmd_step_duration_seconds_count") == 1
    assert value("lstmd_input_queue_depth_messages") == 7
    assert value("lstmd_control_commands_total", {"command": "status", "outcome": "ok"}) == 1
    assert value("lstmd_active_streams") == 10
    assert value("lstmd_state_capacity_streams") == 100
    assert value("lstmd_evictions_total", {"cause": "ttl"}) == 1
    assert value("lstmd_train_rounds_total", {"outcome": "published"}) == 1
    assert value("lstmd_train_loss") == 0.5
    assert value("lstmd_holdout_loss", {"model": "candidate"}) == 0.25
    assert value("lstmd_train_round_duration_seconds_sum") == pytest.approx(0.2)
    assert value("lstmd_model_version") == 4
    assert value("lstmd_last_publish_timestamp_seconds") == 1_700_000_000
    assert value("lstmd_train_enabled") == 1
    assert value("lstmd_wal_bytes_total") == 4096
    assert value("lstmd_wal_fsync_duration_seconds_count") == 1
    assert value("lstmd_snapshot_duration_seconds_sum") == 1.5
    assert value("lstmd_last_snapshot_timestamp_seconds") == 1_700_000_001
    info = {"version": "0.1.0", "backend": "triton", "device": "cuda:0"}
    assert value("lstmd_build_info", info) == 1


def test_every_metric_is_namespaced_and_counters_end_in_total(metrics: Metrics) -> None:
    metrics.set_build_info("0.1.0", "torch", "cpu")
    names = {family.name: family.type for family in metrics.registry.collect()}
    ours = {name: kind for name, kind in names.items() if not name.startswith(("process_", "python_"))}
    assert ours, names
    assert all(name.startswith("lstmd_") for name in ours)
    # prometheus_client appends _total to counters; the family names here are without it.
    assert {"lstmd_events", "lstmd_event_latency_seconds", "lstmd_wal_bytes"} <= set(ours)
    assert names["process_start_time_seconds"] == "gauge"


def test_two_metrics_objects_do_not_share_state() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.events.labels("ok").inc()
    assert second.registry.get_sample_value("lstmd_events_total", {"status": "ok"}) == 0


def test_device_memory_on_cpu_reports_zero(metrics: Metrics) -> None:
    metrics.device_memory.labels("allocated").set(5)
    metrics.watch_device_memory("cpu")
    assert metrics.registry.get_sample_value("lstmd_device_memory_bytes", {"kind": "allocated"}) == 0


@pytest.mark.cuda
def test_device_memory_on_cuda_follows_the_allocator(metrics: Metrics) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    metrics.watch_device_memory(torch.device("cuda", 0))
    before = metrics.registry.get_sample_value("lstmd_device_memory_bytes", {"kind": "allocated"})
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    after = metrics.registry.get_sample_value("lstmd_device_memory_bytes", {"kind": "allocated"})
    assert after >= before + block.numel()
    reserved = metrics.registry.get_sample_value("lstmd_device_memory_bytes", {"kind": "reserved"})
    assert reserved >= after


def test_http_metrics_endpoint_serves_the_registry(served) -> None:
    metrics, base = served
    metrics.events.labels("ok").inc(2)
    status, content_type, body = get(base + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["lstmd_events"].samples}
    assert samples[("lstmd_events_total", (("status", "ok"),))] == 2


def test_healthz_answers_while_readyz_follows_set_ready(served) -> None:
    metrics, base = served
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/readyz")[0] == 503
    metrics.set_ready(True)
    assert get(base + "/readyz")[0] == 200
    assert metrics.registry.get_sample_value("lstmd_ready") == 1
    metrics.set_ready(False)
    assert get(base + "/readyz")[0] == 503
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/nope")[0] == 404


def test_serve_http_shutdown_frees_the_port(metrics: Metrics) -> None:
    server = metrics.serve_http("127.0.0.1:0")
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    again = metrics.serve_http(f"127.0.0.1:{port}")
    again.shutdown()
    again.server_close()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:9108", ("0.0.0.0", 9108)),
        (":9108", ("127.0.0.1", 9108)),
        ("[::1]:9108", ("::1", 9108)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9108", "localhost", "host:port"])
def test_parse_address_rejects_what_is_not_host_port(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_address(address)


def test_healthz_fails_once_an_armed_serving_loop_stops_beating() -> None:
    now = [1000.0]
    metrics = Metrics(CollectorRegistry(), stall_timeout_s=30, clock=lambda: now[0])
    server = metrics.serve_http("127.0.0.1:0")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        now[0] += 3600  # never armed: a daemon that does not call beat() is judged by the process alone
        assert get(base + "/healthz")[0] == 200
        metrics.beat()
        now[0] += 29
        assert get(base + "/healthz")[0] == 200
        now[0] += 2
        status, _, body = get(base + "/healthz")
        assert status == 503 and "stalled 31s" in body
        metrics.beat()
        assert get(base + "/healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
