"""Who reaches a group's engine (operator/isolation.py) and where its adapters go (no emptyDir output)."""
from __future__ import annotations

import json

import pytest

from muxtune.facts.trust import token_digest
from muxtune.operator import isolation, resources
from muxtune.operator.config import OperatorConfig
from muxtune.operator.keys import GroupKeys


def _group(shared: bool) -> dict:
    ann = {"muxtune.io/namespaces": "team-a,team-b"} if shared else {}
    ns = "muxtune-system" if shared else "team-a"
    return {"apiVersion": "muxtune.io/v1alpha1", "kind": "BackboneGroup",
            "metadata": {"name": "mt-g", "namespace": ns, "uid": "u-1", "annotations": ann},
            "spec": {"baseModel": "builtin:tiny-llama", "tasks": [], "gpusPerPod": 1,
                     "serving": {"port": 8000, "sloTtftMs": 1000, "sloTpotMs": 100}}}


def _peers(rule) -> list:
    return [e["values"] for p in rule["from"] for e in (p.get("namespaceSelector") or {}).get("matchExpressions", [])]


@pytest.mark.parametrize("shared,members", [(False, ["team-a"]), (True, ["team-a", "team-b"])])
def test_every_group_admits_serving_from_members_and_metrics_from_operator_and_monitoring(shared, members):
    cfg = OperatorConfig(operator_namespace="mt-op", monitoring_namespace="monitoring")
    pol = isolation.network_policy_manifest(_group(shared), cfg, members)
    own, serving, metrics = pol["spec"]["ingress"]
    assert own["from"][0]["podSelector"]["matchLabels"]["muxtune.io/group"] == "mt-g" and "ports" not in own
    assert serving["ports"] == [{"port": 8000, "protocol": "TCP"}] and _peers(serving) == [members]
    assert metrics["ports"] == [{"port": 9400, "protocol": "TCP"}] and _peers(metrics) == [["mt-op"], ["monitoring"]]
    assert metrics["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "operator"}}
    assert pol["metadata"]["namespace"] == _group(shared)["metadata"]["namespace"]


def test_serving_tokens_are_per_namespace_and_the_engine_gets_only_digests():
    keys = GroupKeys(b"m" * 32)
    a, b = keys.serving_token("team-a"), keys.serving_token("team-b")
    assert a != b and a == GroupKeys(b"m" * 32).serving_token("team-a") != GroupKeys(b"n" * 32).serving_token("team-a")
    tenant = isolation.tenant_token_secret_manifest("team-a", a)
    assert tenant["metadata"]["namespace"] == "team-a" and tenant["stringData"]["token"] == a
    assert "ownerReferences" not in tenant["metadata"]  # outlives the group
    engine = isolation.serving_tokens_secret_manifest(_group(True), {"team-a": a, "team-b": b})
    text = engine["stringData"]["tokens.json"]
    assert json.loads(text) == {token_digest(a): "team-a", token_digest(b): "team-b"}
    assert a not in text and b not in text
    assert engine["metadata"]["name"] == "mt-g-serving-tokens" and engine["metadata"]["namespace"] == "muxtune-system"


def test_output_is_never_an_emptydir_unless_asked_for():
    g = _group(False)
    with pytest.raises(ValueError, match="no persistent output storage"):
        resources.pod_manifest(g, 0, OperatorConfig())
    assert OperatorConfig().output_problem() and not OperatorConfig(output_pvc_per_namespace="out").output_problem()
    for cfg, kind in ((OperatorConfig(output_pvc="out"), "persistentVolumeClaim"),
                      (OperatorConfig(output_host_path="/srv/out"), "hostPath"),
                      (OperatorConfig(ephemeral_output=True), "emptyDir")):
        vols = {v["name"]: v for v in resources.pod_manifest(g, 0, cfg)["spec"]["volumes"]}
        assert kind in vols["output"]


def test_the_operator_refuses_to_start_without_output_storage():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "muxtune.operator.cli", "operator", "--kubeconfig", "/nonexistent"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no persistent output storage" in r.stderr
