"""The chart's alert rules: promtool accepts them, and its unit tests exercise every alert."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.helpers.paths import REPO

ALERTS = REPO / "charts" / "muxtune" / "files" / "alerts.yaml"
ALERTS_TEST = Path(__file__).with_name("alerts_test.yaml")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules(promtool):
    p = _run(promtool, "check", "rules", str(ALERTS))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout + p.stderr


def test_promtool_test_rules(promtool):
    p = _run(promtool, "test", "rules", str(ALERTS_TEST))
    assert p.returncode == 0, p.stdout + p.stderr


def _alert_names() -> set[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_fires_in_a_unit_test():
    """promtool passes a file that never mentions an alert: each one must be expected to fire somewhere."""
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    fired = {c["alertname"] for t in doc["tests"] for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    quiet = {c["alertname"] for t in doc["tests"] for c in t.get("alert_rule_test", []) if not c.get("exp_alerts")}
    assert _alert_names() == fired, f"alerts never expected to fire: {_alert_names() - fired}"
    assert _alert_names() == quiet, f"alerts never checked to stay quiet: {_alert_names() - quiet}"


def test_required_alerts_exist():
    names = _alert_names()
    for wanted in ("MuxtuneTaskStalled", "MuxtuneTaskLossNaN", "MuxtuneGPUIdle", "MuxtuneOperatorReconcileErrors"):
        assert wanted in names
    doc = yaml.safe_load(ALERTS.read_text())
    for g in doc["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
