"""deploy/: what can be checked without Docker, a cluster or systemd running.

The Dockerfile's promises (CUDA runtime base, non-root, healthcheck, state volume), compose's references to
files that exist, the Kubernetes manifests' cross references (selectors, named ports, probes, the volume
claim), the PrometheusRule matching alerts.yml, the shipped configs loading, and the systemd unit (through
`systemd-analyze verify` where it exists).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from lstmd.daemon.config import load_config

yaml = pytest.importorskip("yaml", reason="needs PyYAML (pip install -e .[test])")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


# --- Docker -------------------------------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_on_a_cuda_runtime_with_healthcheck_and_state_volume() -> None:
    steps = dockerfile_instructions()
    args = {value.split("=", 1)[0]: value.split("=", 1)[1] for kind, value in steps if kind == "ARG"}
    (base,) = [value for kind, value in steps if kind == "FROM"]
    base = args.get(base.strip("${}"), base)
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base, base
    users = [value for kind, value in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (healthcheck,) = [value for kind, value in steps if kind == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and ":9108" in healthcheck
    (volume,) = [value for kind, value in steps if kind == "VOLUME"]
    config = load_config(DEPLOY / "docker" / "lstmd.toml", environ={})
    assert config.state.dir in volume
    exposed = {int(port) for kind, value in steps if kind == "EXPOSE" for port in value.split()}
    for endpoint in (config.serve.events, config.serve.control, config.serve.publish, config.serve.metrics):
        assert int(endpoint.rsplit(":", 1)[1]) in exposed, endpoint


def test_dockerfile_copies_only_what_exists_and_the_ignore_file_lets_it_through() -> None:
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    for kind, value in dockerfile_instructions():
        if kind != "COPY" or "--from" in value:
            continue
        *sources, _dest = value.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert f"!{source}" in ignore or f"!{source.rstrip('/')}/**" in ignore, source


def test_container_config_listens_beyond_loopback() -> None:
    config = load_config(DEPLOY / "docker" / "lstmd.toml", environ={})
    assert config.serve.metrics.startswith("0.0.0.0:")
    assert "0.0.0.0" in config.serve.events
    assert config.durability.wal


# --- compose ------------------------------------------------------------------------------------------------


def test_compose_brings_up_lstmd_prometheus_and_grafana_from_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"lstmd", "prometheus", "grafana"} <= set(services)
    build = services["lstmd"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    named_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
    # Prometheus reads the scrape config and rules from the mounted folder and finds lstmd by service name.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "lstmd"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "lstmd"
    assert any(mapping.endswith(f":{port}") for mapping in services["lstmd"]["ports"])
    assert any("/etc/grafana/provisioning" in volume for volume in services["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lstmd.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert any(volume.split(":")[1] == dashboards_path for volume in services["grafana"]["volumes"])


def test_compose_control_and_metrics_are_published_on_loopback_only() -> None:
    ports = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["lstmd"]["ports"]
    for port in ("5556", "9108"):
        (mapping,) = [m for m in ports if m.endswith(f":{port}")]
        assert mapping.startswith("127.0.0.1:"), mapping


def test_compose_gpu_override_reserves_an_nvidia_gpu() -> None:
    override = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    (device,) = override["services"]["lstmd"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# --- Kubernetes ---------------------------------------------------------------------------------------------


def test_k8s_manifests_have_the_required_fields() -> None:
    objects = k8s_objects()
    assert {kind for kind, _ in objects} >= {"StatefulSet", "Service", "PodMonitor", "PrometheusRule"}
    for (kind, name), obj in objects.items():
        assert obj["apiVersion"] and obj["metadata"]["name"] == name and obj["spec"], (kind, name)


def test_statefulset_requests_a_gpu_keeps_state_on_a_claim_and_probes_health_and_readiness() -> None:
    objects = k8s_objects()
    sts = objects[("StatefulSet", "lstmd")]["spec"]
    pod_labels = sts["template"]["metadata"]["labels"]
    assert sts["selector"]["matchLabels"].items() <= pod_labels.items()
    headless = objects[("Service", sts["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    (container,) = sts["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    port_names = {port["name"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names, probe
    claims = {claim["metadata"]["name"] for claim in sts["volumeClaimTemplates"]}
    state_dir = next(e["value"] for e in container["env"] if e["name"] == "LSTMD_STATE__DIR")
    (state_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    assert state_mount["name"] in claims
    security = sts["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    # The image's Dockerfile creates that uid.
    assert f"--uid {security['runAsUser']}" in (DEPLOY / "docker" / "Dockerfile").read_text()


def test_services_and_podmonitor_select_the_pod_and_name_its_ports() -> None:
    objects = k8s_objects()
    sts = objects[("StatefulSet", "lstmd")]["spec"]
    pod_labels = sts["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in sts["template"]["spec"]["containers"][0]["ports"]}
    for (kind, name), obj in objects.items():
        if kind == "Service":
            assert obj["spec"]["selector"].items() <= pod_labels.items(), name
            assert {port["targetPort"] for port in obj["spec"]["ports"]} <= port_names, name
    monitor = objects[("PodMonitor", "lstmd")]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert {endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]} <= port_names
    # The rules and the dashboard select job="lstmd": the job label comes from this pod label.
    assert pod_labels[monitor["jobLabel"]] == "lstmd"


def test_prometheusrule_carries_exactly_the_alert_rules() -> None:
    rule = k8s_objects()[("PrometheusRule", "lstmd")]
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts, "run: python deploy/k8s/render_prometheusrule.py"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_the_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(kinds) == sorted(kind for kind, _ in k8s_objects())


# --- systemd ------------------------------------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_runs_serve_as_a_dedicated_user_with_its_state_directory() -> None:
    unit = unit_sections((DEPLOY / "systemd" / "lstmd.service").read_text())
    service = unit["Service"]
    (exec_start,) = service["ExecStart"]
    assert exec_start.startswith("/") and " serve --config /etc/lstmd/lstmd.toml" in exec_start
    assert service["User"] == ["lstmd"]
    assert service["StateDirectory"] == ["lstmd"]
    config = load_config(DEPLOY / "systemd" / "lstmd.toml", environ={})
    assert config.state.dir.startswith("/var/lib/lstmd/")
    assert config.serve.control.startswith("tcp://127.0.0.1:")
    assert "PrivateDevices" not in service  # would hide the GPU
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    lstmd = shutil.which("lstmd") or "/bin/true"  # verify checks that ExecStart's binary exists
    text = (DEPLOY / "systemd" / "lstmd.service").read_text().replace("/opt/lstmd/bin/lstmd", lstmd)
    (tmp_path / "lstmd.service").write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "lstmd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lstmd.service" not in result.stderr, result.stderr  # no warnings about our unit either
