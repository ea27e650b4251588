"""deploy/prometheus: promtool accepts the scrape config and the rules, and every rule's unit tests pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import yaml
except ImportError:  # PyYAML is in the test extra; without it only the promtool checks run
    yaml = None

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_yaml = pytest.mark.skipif(yaml is None, reason="needs PyYAML (pip install -e .[test])")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus); CI installs it"
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.mark.prometheus
@needs_promtool
def test_promtool_check_config() -> None:
    promtool("check", "config", "prometheus.yml")


@pytest.mark.prometheus
@needs_promtool
def test_promtool_check_rules() -> None:
    output = promtool("check", "rules", "alerts.yml").stdout
    assert "SUCCESS" in output


@pytest.mark.prometheus
@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    output = promtool("test", "rules", "alerts_test.yml").stdout
    assert "SUCCESS" in output


@needs_yaml
def test_the_issue_asks_for_these_alerts() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "LstmdDown",
        "LstmdLatencyP99High",
        "LstmdRejectionRateHigh",
        "LstmdTrainingRejectedRepeatedly",
        "LstmdTrainingStalled",
        "LstmdSnapshotTooOld",
        "LstmdStateCapacityNearlyFull",
    } <= names


@needs_yaml
def test_every_rule_has_severity_summary_description_and_runbook() -> None:
    docs = (PROMETHEUS_DIR.parents[1] / "docs" / "operations.md").read_text().lower()
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"page", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        anchor = annotations["runbook_url"].split("#", 1)[1]
        assert f"### {anchor}" in docs, f"docs/operations.md has no '### {rule['alert']}' section"


@needs_yaml
def test_every_rule_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"no test where {rule['alert']} fires"
        assert any(not case["exp_alerts"] for case in mine), f"no test where {rule['alert']} stays quiet"


@needs_yaml
def test_rules_name_only_metrics_the_daemon_exports() -> None:
    from test_deploy_grafana import exported_sample_names, referenced_metrics

    exported = exported_sample_names() | {"up"}
    for rule in alert_rules():
        names = referenced_metrics(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} not exported"
