"""The engine pod runs a model directory's own code only when the cluster-scoped BaseModel (which
only cluster admins write) says spec.trustRemoteCode: true."""
from __future__ import annotations

from muxtune.operator import resources
from muxtune.operator import planner as P
from muxtune.operator.config import OperatorConfig
from muxtune.operator.memory import Parallelism


def _args(base: str, basemodel: dict | None) -> list[str]:
    gp = P.GroupPlan("mt-g", "ns", base, "ns", Parallelism(dp=1, tp=1, pp=1), "H100", 81920, ("ns/a",), 1, True, True)
    group = resources.group_manifest(gp, [{"metadata": {"name": "a", "namespace": "ns", "uid": "u"}}], 4096)
    group["metadata"]["uid"] = "group-uid"
    pod = resources.pod_manifest(group, 0, OperatorConfig(output_host_path="/srv/out"), basemodel)
    return pod["spec"]["containers"][0]["args"]


def test_trust_remote_code_comes_only_from_the_basemodel():
    source = {"hostPath": {"path": "/models/m"}}
    trusted = {"metadata": {"name": "m"}, "spec": {"source": source, "trustRemoteCode": True}}
    plain = {"metadata": {"name": "m"}, "spec": {"source": source}}
    assert "--trust-remote-code" in _args("model:m", trusted)
    assert "--trust-remote-code" not in _args("model:m", plain)
    assert "--trust-remote-code" not in _args("builtin:tiny-llama", None)
