"""Write deploy/k8s/prometheusrule.yaml: the rules of deploy/prometheus/alerts.yml as a Prometheus Operator
PrometheusRule, so Kubernetes and plain Prometheus page on the same rules.

    python deploy/k8s/render_prometheusrule.py            # after editing alerts.yml (needs PyYAML)

tests/test_deploy.py fails when the two disagree.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/alerts.yml by render_prometheusrule.py: edit those, not this.\n"


def render() -> str:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "lstmd", "labels": {"app.kubernetes.io/name": "lstmd"}},
        "spec": yaml.safe_load(ALERTS.read_text()),
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=110, allow_unicode=True)


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
