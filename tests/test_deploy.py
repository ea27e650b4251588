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
from lstmd.daemon.auth import insecure_endpoints
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


@pytest.mark.parametrize("path", ["docker/lstmd.toml", "systemd/lstmd.toml"])
def test_shipped_configs_bind_beyond_loopback_only_with_security(path: str) -> None:
    config = load_config(DEPLOY / path, environ={})
    serve, security = config.serve, config.security
    exposed = insecure_endpoints({"events": serve.events, "control": serve.control, "publish": serve.publish})
    assert exposed, "nothing to check: the config binds loopback only"
    assert security.server_secret_key and security.producer_keys_dir and security.admin_keys_dir
    assert not security.allow_insecure


def test_compose_mounts_the_keys_where_the_image_config_reads_them() -> None:
    security = load_config(DEPLOY / "docker" / "lstmd.toml", environ={}).security
    volumes = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["lstmd"]["volumes"]
    (mount,) = [v for v in volumes if v.startswith("./keys:")]
    source, target, mode = mount.split(":")
    assert mode == "ro"
    for path in (security.server_secret_key, security.producer_keys_dir, security.admin_keys_dir):
        assert path.startswith(target + "/"), path
    # The keys folder exists for the mount, and git never takes a key from it.
    ignore = (DEPLOY / "keys" / ".gitignore").read_text().split()
    assert "*" in ignore and not any(line.startswith("!") and "key" in line for line in ignore)


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


def test_no_service_exposes_the_control_port() -> None:
    objects = k8s_objects()
    sts = objects[("StatefulSet", "lstmd")]["spec"]
    control = {p["containerPort"] for p in sts["template"]["spec"]["containers"][0]["ports"] if p["name"] == "control"}
    for (kind, name), obj in objects.items():
        if kind == "Service":
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] != "control" and port["port"] not in control, (name, port)


def test_networkpolicy_admits_only_labelled_clients_and_the_control_port_only_to_admins() -> None:
    objects = k8s_objects()
    pod = objects[("StatefulSet", "lstmd")]["spec"]["template"]
    port_names = {port["name"] for port in pod["spec"]["containers"][0]["ports"]}
    policy = objects[("NetworkPolicy", "lstmd")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    admitted: dict[str, list] = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        for port in rule["ports"]:
            assert port["port"] in port_names, port
            admitted.setdefault(port["port"], []).extend(rule["from"])
    assert set(admitted) == port_names  # every port named, none left open by omission
    (control_from,) = admitted["control"]
    assert "namespaceSelector" not in control_from and control_from["podSelector"]["matchLabels"]


def test_statefulset_mounts_the_key_secrets_where_the_image_config_reads_them() -> None:
    security = load_config(DEPLOY / "docker" / "lstmd.toml", environ={}).security
    pod = k8s_objects()[("StatefulSet", "lstmd")]["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"] if m["name"] in secrets}
    for path in (str(Path(security.server_secret_key).parent), security.producer_keys_dir, security.admin_keys_dir):
        mount = mounts[path]
        assert mount["readOnly"] and "subPath" not in mount  # subPath mounts never see a Secret's update
        secret = secrets[mount["name"]]
        assert secret["defaultMode"] & 0o007 == 0, "keys must not be readable by others"
        assert not secret.get("optional"), "without keys the pod must not start"
    # The operator creates the Secrets: none ships in the manifests, so applying them never replaces a key.
    assert not [kind for kind, _ in k8s_objects() if kind == "Secret"]


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
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # systemctl reload: re-read the client keys
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
