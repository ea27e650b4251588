"""deploy/grafana: the committed dashboard is what the generator makes, its panels are well formed, and every
query names only metrics the daemon or a cluster gateway exports. (tests/test_prometheus_live.py runs the queries
for real.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from lstmd.daemon.metrics import GatewayMetrics, Metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

GRAFANA_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "lstmd.json"
METRIC_NAME = re.compile(r"\b((?:lstmd|process|python)_[a-z0-9_]+|up)\b(?!\s*\()")


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], target["expr"]) for target in inner.get("targets", []) if target.get("expr")]
    return found


def exported_sample_names() -> set[str]:
    """Every sample name the daemon or a cluster gateway exports (counters with _total, histograms with
    _bucket/_sum/_count)."""
    metrics = Metrics(CollectorRegistry())
    metrics.set_build_info("0", "torch", "cpu")
    # Label values not known up front appear with their first use.
    metrics.rejections.labels("bad_shape")
    metrics.control_commands.labels("status", "ok")
    gateway = GatewayMetrics(CollectorRegistry())
    gateway.set_build_info("0", "gateway", "none")
    text = generate_latest(metrics.registry).decode() + generate_latest(gateway.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def referenced_metrics(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_committed_dashboard_is_what_the_generator_makes() -> None:
    pytest.importorskip(
        "grafana_foundation_sdk", reason="the generator needs grafana-foundation-sdk (in the test extra)"
    )
    spec = importlib.util.spec_from_file_location("generate_dashboard", GRAFANA_DIR / "generate_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == DASHBOARD.read_text(), "run: python deploy/grafana/generate_dashboard.py"


def test_dashboard_covers_what_the_issue_asks_for(dashboard: dict) -> None:
    text = " ".join(expr for _, expr in dashboard_queries(dashboard))
    for metric in [
        "lstmd_events_total",  # throughput
        "lstmd_event_latency_seconds_bucket",  # latency p50/p99
        "lstmd_batch_size_events",
        "lstmd_input_queue_depth_messages",
        "lstmd_active_streams",
        "lstmd_evictions_total",
        "lstmd_rejections_total",
        "lstmd_train_loss",
        "lstmd_holdout_loss",
        "lstmd_model_version",
        "lstmd_wal_bytes_total",
        "lstmd_wal_fsync_duration_seconds_bucket",
        "lstmd_last_snapshot_timestamp_seconds",
        # cluster mode (issue 16): key groups, consumer lag, rebalances, failovers, fenced writes, gateway in-flight
        "lstmd_cluster_key_groups",
        "lstmd_cluster_log_pending_records",
        "lstmd_cluster_rebalances_total",
        "lstmd_cluster_failovers_total",
        "lstmd_cluster_key_group_moves_total",
        "lstmd_gateway_inflight_bytes",
        "lstmd_gateway_requests_total",
    ]:
        assert metric in text, metric


def test_panels_are_well_formed(dashboard: dict) -> None:
    assert dashboard["uid"] == "lstmd"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_query_filters_by_instance_and_names_exported_metrics(dashboard: dict) -> None:
    exported = exported_sample_names() | {"up"}
    for title, expr in dashboard_queries(dashboard):
        assert 'instance=~"$instance"' in expr, title
        names = referenced_metrics(expr)
        assert names, (title, expr)
        assert names <= exported, f"{title}: {sorted(names - exported)} not exported by lstmd.daemon.metrics"


def test_instance_variable_reads_an_exported_metric(dashboard: dict) -> None:
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "instance")
    assert referenced_metrics(variable["query"]) <= exported_sample_names()


def test_provisioning_points_grafana_at_the_dashboard_and_prometheus() -> None:
    yaml = pytest.importorskip("yaml", reason="needs PyYAML (pip install -e .[test])")
    provisioning = GRAFANA_DIR / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    providers = yaml.safe_load((provisioning / "dashboards" / "lstmd.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
