#!/usr/bin/env python3
"""Write deploy/k8s/prometheusrule.yaml from deploy/prometheus/rules/stream-classifier.rules.yml.

The PrometheusRule carries the same groups as the plain rules file (which promtool checks
and unit-tests); tests/test_deploy.py fails when the two differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "rules" / "stream-classifier.rules.yml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = """\
# The alert and scaling rules of deploy/prometheus/rules/stream-classifier.rules.yml for the
# Prometheus Operator. Keep the two identical (tests/test_deploy.py compares them); to
# regenerate after editing the rules file:
#   python3 deploy/k8s/sync_prometheusrule.py
# Your Prometheus' ruleSelector may need a label of its own here (e.g. release: prometheus).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> Any:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "stream-classifier",
            "labels": {"app.kubernetes.io/name": "stream-classifier", "role": "alert-rules"},
        },
        "spec": rules,
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


if __name__ == "__main__":
    TARGET.write_text(render(), encoding="utf-8")
    print(TARGET)
