"""Generate deploy/grafana/dashboards/lstmd.json, the lstmd Grafana dashboard, with Grafana's own
grafana-foundation-sdk (pip install grafana-foundation-sdk).

    python deploy/grafana/generate_dashboard.py          # rewrite the JSON next to this file
    python deploy/grafana/generate_dashboard.py --check  # exit 1 if the JSON is not what this code makes

Edit the panels here, never the JSON: tests/test_deploy_grafana.py checks that regenerating gives the
committed file, and tests/test_prometheus_live.py runs every query below against a real Prometheus
scraping a real daemon. Queries filter on the `$instance` variable and use `$__rate_interval`, which
Grafana sizes to at least four scrape intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
)

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "lstmd.json"
UID = "lstmd"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'instance=~"$instance"'  # every query's selector
RATE = "$__rate_interval"


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return target.legend_format(legend) if legend else target


def quantiles(
    metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.99), first_ref: str = "A"
) -> list[prometheus.Dataquery]:
    """histogram_quantile targets over a histogram's buckets, one per quantile (legend p50, p99, ...)."""
    group = f"le, {by}" if by else "le"
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [
        query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"p{q * 100:g}{legend_by}",
            chr(ord(first_ref) + i),
        )
        for i, q in enumerate(qs)
    ]


def graph(
    title: str, unit: str, targets: list[prometheus.Dataquery], description: str, span: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(8)
        .fill_opacity(10)
        .line_width(1)
        .legend(
            common.VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single(
    title: str,
    unit: str,
    expr: str,
    description: str,
    red_above: float | None = None,
    red_below: float | None = None,
) -> stat.Panel:
    steps = [Threshold(value=None, color="green")]
    if red_below is not None:
        steps = [Threshold(value=None, color="red"), Threshold(value=red_below, color="green")]
    if red_above is not None:
        steps.append(Threshold(value=red_above, color="red"))
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(4)
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.VALUE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
        .with_target(query(expr))
    )


def build() -> dict:
    """The dashboard as a JSON-ready dict."""
    dashboard = (
        Dashboard("lstmd")
        .uid(UID)
        .description("Serving, state, training and durability of lstmd daemons (generated: see deploy/grafana)")
        .tags(["lstmd"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query("label_values(lstmd_build_info, instance)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        # --- at a glance ----------------------------------------------------------------------------------
        .with_row(Row("Overview"))
        .with_panel(
            single(
                "Events / s",
                "ops",
                f"sum(rate(lstmd_events_total{{{SEL}}}[{RATE}]))",
                "Events answered per second, all statuses.",
            )
        )
        .with_panel(
            single(
                "p99 latency",
                "s",
                f"histogram_quantile(0.99, sum by (le) (rate(lstmd_event_latency_seconds_bucket{{{SEL}}}[{RATE}])))",
                "99th percentile, receipt of an event to its reply; LstmdLatencyP99High fires over 100 ms.",
                red_above=0.1,
            )
        )
        .with_panel(
            single(
                "Ready instances",
                "none",
                f"sum(lstmd_ready{{{SEL}}})",
                "Daemons answering /readyz with 200: sockets bound and state restored.",
                red_below=1,
            )
        )
        .with_panel(
            single(
                "Model version",
                "none",
                f"max(lstmd_model_version{{{SEL}}})",
                "Version of the serving weights; each published training round adds one.",
            )
        )
        # --- serving --------------------------------------------------------------------------------------
        .with_row(Row("Serving"))
        .with_panel(
            graph(
                "Throughput by status",
                "ops",
                [query(f"sum by (status) (rate(lstmd_events_total{{{SEL}}}[{RATE}]))", "{{status}}")],
                "Events answered per second: ok, duplicate (sequence number already applied), "
                "state_reset (the stream had been evicted), rejected.",
            )
        )
        .with_panel(
            graph(
                "Event latency",
                "s",
                quantiles("lstmd_event_latency_seconds", qs=(0.5, 0.9, 0.99)),
                "Receipt of the message to its reply, across all events.",
            )
        )
        .with_panel(
            graph(
                "Batch size",
                "none",
                [
                    query(
                        f"sum(rate(lstmd_batch_size_events_sum{{{SEL}}}[{RATE}]))"
                        f" / sum(rate(lstmd_batch_size_events_count{{{SEL}}}[{RATE}]))",
                        "mean",
                    ),
                    *quantiles("lstmd_batch_size_events", qs=(0.99,), first_ref="B"),
                ],
                "Events per kernel launch. Small batches under high load mean the loop is latency-bound.",
            )
        )
        .with_panel(
            graph(
                "Input queue depth",
                "none",
                [query(f"sum by (instance) (lstmd_input_queue_depth_messages{{{SEL}}})", "{{instance}}")],
                "Messages waiting for the serving loop. A depth that keeps growing means more load than "
                "the device can serve.",
            )
        )
        .with_panel(
            graph(
                "Step duration",
                "s",
                quantiles("lstmd_step_duration_seconds"),
                "One kernel step (gather, all layers, scatter) plus the output head.",
            )
        )
        .with_panel(
            graph(
                "Rejections by reason",
                "ops",
                [query(f"sum by (reason) (rate(lstmd_rejections_total{{{SEL}}}[{RATE}]))", "{{reason}}")],
                "Rejected events (and undecodable messages) per second. The producer got an error naming the problem.",
            )
        )
        # --- state ----------------------------------------------------------------------------------------
        .with_row(Row("Streams"))
        .with_panel(
            graph(
                "Active streams",
                "none",
                [
                    query(f"sum(lstmd_active_streams{{{SEL}}})", "active", "A"),
                    query(f"sum(lstmd_state_capacity_streams{{{SEL}}})", "capacity", "B"),
                ],
                "Streams holding a state slot, against the configured capacity (state.capacity).",
            )
        )
        .with_panel(
            graph(
                "Evictions and sequence gaps",
                "ops",
                [
                    query(f"sum by (cause) (rate(lstmd_evictions_total{{{SEL}}}[{RATE}]))", "evicted: {{cause}}"),
                    query(f"sum(rate(lstmd_sequence_gaps_total{{{SEL}}}[{RATE}]))", "sequence gaps", "B"),
                ],
                "Streams evicted per second by cause (capacity: least recently used; ttl: idle; drop: by an "
                "operator), and missing per-stream sequence numbers.",
            )
        )
        # --- training -------------------------------------------------------------------------------------
        .with_row(Row("Training"))
        .with_panel(
            graph(
                "Loss",
                "none",
                [
                    query(f"avg(lstmd_train_loss{{{SEL}}})", "train", "A"),
                    query(f"avg by (model) (lstmd_holdout_loss{{{SEL}}})", "holdout: {{model}}", "B"),
                ],
                "Training loss of the last round, and the held-out loss of the serving model and the last "
                "candidate. A candidate is published only when it beats the serving model.",
            )
        )
        .with_panel(
            graph(
                "Training rounds by outcome",
                "ops",
                [query(f"sum by (outcome) (rate(lstmd_train_rounds_total{{{SEL}}}[{RATE}]))", "{{outcome}}")],
                "Rounds per second: published, rejected (lost on the held-out slice), diverged (NaN/Inf: "
                "discarded), skipped (not enough data).",
            )
        )
        .with_panel(
            graph(
                "Model version and training switch",
                "none",
                [
                    query(f"max(lstmd_model_version{{{SEL}}})", "version", "A"),
                    query(f"max(lstmd_train_enabled{{{SEL}}})", "training enabled", "B"),
                ],
                "Serving weights' version; training enabled is 1 while the trainer runs and is not paused.",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Training round duration",
                "s",
                quantiles("lstmd_train_round_duration_seconds"),
                "Time of one truncated-BPTT round including the held-out evaluation.",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Time since the model last changed",
                "s",
                [
                    query(
                        f"time() - max by (instance) (lstmd_last_publish_timestamp_seconds{{{SEL}}} > 0)",
                        "{{instance}}",
                    )
                ],
                "Seconds since the serving weights last changed (publish, import or rollback).",
                span=8,
            )
        )
        # --- durability -----------------------------------------------------------------------------------
        .with_row(Row("Durability"))
        .with_panel(
            graph(
                "WAL bytes / s",
                "Bps",
                [query(f"sum by (instance) (rate(lstmd_wal_bytes_total{{{SEL}}}[{RATE}]))", "{{instance}}")],
                "Write-ahead log append rate (0 with durability.wal off).",
                span=6,
            )
        )
        .with_panel(
            graph(
                "WAL fsync",
                "s",
                quantiles("lstmd_wal_fsync_duration_seconds"),
                "Duration of WAL group-commit fsyncs; with fsync=always its p99 bounds acknowledged latency.",
                span=6,
            )
        )
        .with_panel(
            graph(
                "Snapshot age",
                "s",
                [
                    query(
                        f"time() - max by (instance) (lstmd_last_snapshot_timestamp_seconds{{{SEL}}} > 0)",
                        "{{instance}}",
                    )
                ],
                "Seconds since the last completed snapshot (empty until the first one). LstmdSnapshotTooOld "
                "fires over an hour.",
                span=6,
            )
        )
        .with_panel(
            graph(
                "Snapshot duration",
                "s",
                quantiles("lstmd_snapshot_duration_seconds", qs=(0.5, 1.0)),
                "Time to write a snapshot (model, optimizer, all stream states) atomically.",
                span=6,
            )
        )
        # --- cluster mode (zero on a single daemon; the Gateway panels read `lstmd gateway`s) ----------------
        .with_row(Row("Cluster"))
        .with_panel(
            graph(
                "Key groups per replica",
                "none",
                [
                    query(f"sum by (instance) (lstmd_cluster_key_groups{{{SEL}}})", "{{instance}}", "A"),
                    query(f"max(lstmd_cluster_key_groups_configured{{{SEL}}})", "G (all key groups)", "B"),
                    query(f"max(lstmd_cluster_members{{{SEL}}})", "live members", "C"),
                ],
                "Key groups each replica owns, against G; their sum below G for long means unowned key groups "
                "(LstmdClusterKeyGroupsUnowned).",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Consumer lag",
                "none",
                [query(f"max by (instance) (lstmd_cluster_log_pending_records{{{SEL}}})", "{{instance}}")],
                "Records in the cluster's log after the last one each replica read. A lag that keeps growing "
                "means the replica cannot keep up (LstmdClusterConsumerLagHigh).",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Key group moves",
                "none",
                [
                    query(
                        f"sum by (kind) (increase(lstmd_cluster_key_group_moves_total{{{SEL}}}[{RATE}]))",
                        "{{kind}}",
                        "A",
                    ),
                    query(f"sum(increase(lstmd_cluster_rebalances_total{{{SEL}}}[{RATE}]))", "rebalances", "B"),
                    query(f"sum(increase(lstmd_cluster_failovers_total{{{SEL}}}[{RATE}]))", "failovers", "C"),
                    query(f"sum(increase(lstmd_cluster_dropped_answers_total{{{SEL}}}[{RATE}]))", "dropped answers",
                          "D"),
                ],
                "Key groups claimed, released (handed over) and fenced (a stale owner's write refused); "
                "rebalances, failovers (claims from a member whose lease expired) and answers dropped by a "
                "replica that lost the key group meanwhile.",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Gateway requests by outcome",
                "ops",
                [
                    query(f"sum by (outcome) (rate(lstmd_gateway_requests_total{{{SEL}}}[{RATE}]))", "{{outcome}}",
                          "A"),
                    query(f"sum by (kind) (rate(lstmd_gateway_events_total{{{SEL}}}[{RATE}]))", "{{kind}} forwarded",
                          "B"),
                    query(f"sum(rate(lstmd_gateway_log_duplicates_total{{{SEL}}}[{RATE}]))", "log duplicates", "C"),
                    query(f"sum by (reason) (rate(lstmd_gateway_rejections_total{{{SEL}}}[{RATE}]))",
                          "refused: {{reason}}", "D"),
                ],
                "Producer messages the gateways finished: answered, rejected at the gateway, unavailable (the log "
                "did not take them), forgotten (no answer in time); events and targets forwarded; resends the "
                "log already held; messages its socket refused (undecodable, overloaded).",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Gateway request duration",
                "s",
                quantiles("lstmd_gateway_request_duration_seconds", qs=(0.5, 0.99)),
                "A producer message from the gateway's publish to its last key group's answer.",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Gateway in flight",
                "bytes",
                [
                    query(f"sum by (instance) (lstmd_gateway_inflight_bytes{{{SEL}}})", "{{instance}}", "A"),
                    query(f"max(lstmd_gateway_inflight_limit_bytes{{{SEL}}})", "limit", "B"),
                ],
                "Bytes of producer messages forwarded and not yet answered; at the limit, requests wait and the "
                "excess is answered overloaded (LstmdGatewayInflightNearLimit).",
                span=8,
            )
        )
        # --- process --------------------------------------------------------------------------------------
        .with_row(Row("Process"))
        .with_panel(
            graph(
                "Memory",
                "bytes",
                [
                    query(f"sum by (kind) (lstmd_device_memory_bytes{{{SEL}}})", "device {{kind}}", "A"),
                    query(f'sum(process_resident_memory_bytes{{job="lstmd", {SEL}}})', "host RSS", "B"),
                ],
                "Accelerator memory held by the daemon (torch's allocator; 0 on CPU) and host RSS.",
                span=8,
            )
        )
        .with_panel(
            graph(
                "CPU",
                "percentunit",
                [query(f'sum by (instance) (rate(process_cpu_seconds_total{{job="lstmd", {SEL}}}[{RATE}]))')],
                "CPU time per second of wall time (1 = one core busy).",
                span=8,
            )
        )
        .with_panel(
            graph(
                "Control commands",
                "ops",
                [
                    query(
                        f"sum by (command, outcome) (rate(lstmd_control_commands_total{{{SEL}}}[{RATE}]))",
                        "{{command}} {{outcome}}",
                    )
                ],
                "Commands from `lstmd` and Admin clients (status, snapshot, model import, ...).",
                span=8,
            )
        )
    )
    return json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))


def number_panels(dashboard: dict) -> dict:
    """Give every panel a distinct id (the SDK leaves 0): Grafana links and alert annotations use them."""
    for panel_id, panel in enumerate(dashboard["panels"], start=1):
        panel["id"] = panel_id
    return dashboard


def render() -> str:
    return json.dumps(number_panels(build()), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
