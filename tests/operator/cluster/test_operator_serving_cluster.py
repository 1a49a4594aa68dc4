"""Co-serving through the real API server: the CRD admits spec.serving (and refuses a bad SLO),
the operator gives a serving task's group spec.serving with its SLOs, the group's pod starts the
engine with the API open for enabled tasks only, and the group's Service names the port."""
from __future__ import annotations

import subprocess

import pytest

from tests.helpers.cluster import apply, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_serving_task_opens_its_groups_api(operator_env):
    info, ns = operator_env["info"], operator_env["a"]
    serving = task_manifest("srv", ns, data="sets/srv.jsonl")
    serving["spec"]["serving"] = {"enabled": True, "sloTtftMs": 700, "sloTpotMs": 80}
    bad = task_manifest("bad-slo", ns, data="sets/b.jsonl")
    bad["spec"]["serving"] = {"enabled": True, "sloTpotMs": -1}
    with pytest.raises(subprocess.CalledProcessError) as refused:
        apply(info, bad)
    assert "serving.sloTpotMs" in (refused.value.stderr or "") + (refused.value.stdout or "")
    apply(info, serving, task_manifest("quiet", ns, data="sets/quiet.jsonl"))

    def grouped():
        gs = kjson(info, "get", "backbonegroups", "-n", ns)["items"]
        return gs if gs and all((g.get("spec") or {}).get("serving") for g in gs) else None

    (g,) = wait_for(grouped, 90, what="a serving BackboneGroup")
    assert g["spec"]["serving"] == {"port": 8000, "sloTtftMs": 700.0, "sloTpotMs": 80.0}
    assert sorted(t["name"] for t in g["spec"]["tasks"]) == ["quiet", "srv"]
    name = g["metadata"]["name"]

    def pod():
        pods = kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={name}")["items"]
        return pods[0] if pods else None

    c = wait_for(pod, 60, what="the group's pod")["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--serve-port") + 1] == "8000" and args[args.index("--serve-tasks") + 1] == "enabled"
    assert args[args.index("--slo-tpot-ms") + 1] == "80" and args[args.index("--slo-ttft-ms") + 1] == "700"
    assert {"name": "serving", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    svc = kjson(info, "get", "service", name, "-n", ns)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"metrics": 9400, "serving": 8000}
