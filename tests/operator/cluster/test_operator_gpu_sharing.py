"""MuxServe-style GPU sharing against the dev cluster: a kwok node time-sliced as the NVIDIA device
plugin does it (nvidia.com/gpu.shared, 2 replicas a GPU, docs/OPERATOR.md); the small groups of two
namespaces each take one replica of its one GPU, both pods bound there, each engine told its half."""
from __future__ import annotations

import json
import uuid

import pytest

from muxtune.devcluster.cluster import node_manifest

from tests.helpers.cluster import apply, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def sliced_node(name: str) -> dict:
    node = node_manifest(name, gpus=1, gpu_product="NVIDIA-H100-80GB-HBM3-SHARED", gpu_memory_mib=81920,
                         labels={"nvidia.com/gpu.replicas": "2", "nvidia.com/gpu.sharing-strategy": "time-slicing"})
    for part in ("capacity", "allocatable"):
        node["status"][part].pop("nvidia.com/gpu")
        node["status"][part]["nvidia.com/gpu.shared"] = "2"
    return node


def test_two_tenants_small_groups_share_one_gpu(operator_env):
    info, a, b = operator_env["info"], operator_env["a"], operator_env["b"]
    name = f"sliced-{uuid.uuid4().hex[:5]}"
    info.kubectl("create", "-f", "-", input=json.dumps(sliced_node(name)))
    try:
        info.kubectl("wait", "--for=condition=Ready", "--timeout=60s", f"node/{name}", timeout=80)
        apply(info, task_manifest("small", a, steps=100000), task_manifest("small", b, steps=100000))

        def bound():
            pods = [p for ns in (a, b) for p in kjson(info, "get", "pods", "-n", ns,
                                                      "-l", "app.kubernetes.io/managed-by=muxtune-operator")["items"]]
            return pods if len(pods) == 2 and all(p["spec"].get("nodeName") for p in pods) else None

        pods = wait_for(bound, 90, what="both groups' pods bound")
        assert {p["spec"]["nodeName"] for p in pods} == {name}  # two groups on one GPU
        for p in pods:
            c = p["spec"]["containers"][0]
            assert c["resources"]["limits"] == {**c["resources"]["limits"], "nvidia.com/gpu.shared": "1"}
            assert "nvidia.com/gpu" not in c["resources"]["limits"]
            assert c["args"][c["args"].index("--gpu-memory-fraction") + 1] == "0.5"
        groups = wait_for(lambda: (g := [x for ns in (a, b) for x in kjson(info, "get", "bbg", "-n", ns)["items"]
                                         if (x.get("status") or {}).get("gpuMemoryFraction")]) and len(g) == 2 and g,
                          60, what="both groups' status shows the share")
        assert all(g["spec"]["gpuMemoryFraction"] == 0.5 == g["status"]["gpuMemoryFraction"] for g in groups)
        wide = info.kubectl("get", "bbg", "-n", a, "-o", "wide").stdout
        assert "GPU SHARE" in wide and "0.5" in wide, wide
    finally:
        for ns in (a, b):
            info.kubectl("delete", "ftt", "--all", "-n", ns, "--wait=false", check=False)
        wait_for(lambda: bound_to(info, name) == 0, 60, what="the sliced node's pods gone")
        info.kubectl("delete", "node", name, "--wait=false", check=False)


def bound_to(info, node: str) -> int:
    return len(kjson(info, "get", "pods", "-A", "--field-selector", f"spec.nodeName={node}")["items"])
