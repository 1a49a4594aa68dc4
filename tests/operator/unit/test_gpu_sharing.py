"""MuxServe-style placement: small backbones share a GPU. On time-sliced nodes (the NVIDIA device
plugin's sharing.timeSlicing, renameByDefault: nvidia.com/gpu.shared, nvidia.com/gpu.replicas=R;
docs/OPERATOR.md) a group whose memory fits 1/R of a GPU takes one replica; the R groups on a GPU
split its memory, and each engine is told its share (--gpu-memory-fraction), which it enforces
(tests/engine/run/test_memory_share.py)."""
from __future__ import annotations

from bench import operator_scale as bench
from muxtune.api.basemodel import Architecture
from muxtune.operator import memory as M
from muxtune.operator import planner as P
from muxtune.operator import resources, world
from muxtune.operator.config import OperatorConfig

ARCHS = {n: Architecture(**a, dtype="bfloat16") for n, (a, _) in bench.MIXED_BACKBONES.items()}
H100 = 81920


def _small(ns, name, base="qwen2.5-1.5b"):
    return P.TaskRequest(ns, name, f"model:{base}", shape=M.TaskShape(r=16, batch_size=4, max_seq_len=1024), uid=name)


def _sliced(name="s0", replicas=2, gpus=8):
    return P.NodeInfo(name, 0, 0, H100, "NVIDIA-H100-80GB-HBM3-SHARED", gpu_slices=replicas, slices_free=gpus * replicas)


def test_small_groups_of_two_tenants_share_one_gpu():
    reqs = [_small("team-a", "a1"), _small("team-a", "a2"), _small("team-b", "b1")]
    p = P.plan(reqs, [], [_sliced(), P.NodeInfo("w0", 8, 8, H100, "NVIDIA-H100-80GB-HBM3")], ARCHS)
    assert not p.unplaceable and len(p.groups) == 2  # one group per tenant
    for g in p.groups:
        assert g.shared_gpu and g.gpu_fraction == 0.5 and g.gpu_memory_mib == H100 // 2
        assert g.memory_per_gpu_bytes <= g.gpu_memory_mib * M.MiB  # each fits its share at its budget
    assert p.gpus_allocated == 1 and p.gpu_slices == 2  # two groups, one GPU (a whole one each before)
    whole = P.plan(reqs, [], [P.NodeInfo("w0", 8, 8, H100, "NVIDIA-H100-80GB-HBM3")], ARCHS)
    assert whole.gpus_allocated == 2


def test_a_backbone_too_large_for_a_slice_takes_whole_gpus():
    big = P.TaskRequest("team-a", "q", "model:qwen2.5-14b", shape=M.TaskShape(r=16, batch_size=4, max_seq_len=1024))
    p = P.plan([big, _small("team-b", "b1")], [],
               [_sliced(replicas=4), P.NodeInfo("w0", 8, 8, H100, "NVIDIA-H100-80GB-HBM3")], ARCHS)
    by_model = {g.base_model: g for g in p.groups}
    assert not by_model["model:qwen2.5-14b"].shared_gpu  # ~30 GB of weights: not in a 20 GB share
    assert by_model["model:qwen2.5-1.5b"].gpu_fraction == 0.25
    assert p.gpus_allocated == by_model["model:qwen2.5-14b"].gpus + 1


def test_slices_are_counted_and_a_full_node_waits():
    reqs = [_small(f"t{i}", "x") for i in range(3)]
    p = P.plan(reqs, [], [_sliced(replicas=2, gpus=1)], ARCHS)  # one GPU, two replicas
    assert len(p.groups) == 2 and [u.reason for u in p.unplaceable] == ["WaitingForGpus"]


def test_the_share_reaches_the_pod_and_comes_back():
    (gp,) = P.plan([_small("ns", "a")], [], [_sliced()], ARCHS).groups
    group = resources.group_manifest(gp, [{"metadata": {"name": "a", "namespace": "ns", "uid": "a"}}])
    group["metadata"]["uid"] = "g"
    assert group["spec"]["gpuMemoryFraction"] == 0.5
    c = resources.pod_manifest(group, 0, OperatorConfig(output_host_path="/srv/out"))["spec"]["containers"][0]
    assert c["args"][c["args"].index("--gpu-memory-fraction") + 1] == "0.5"
    assert c["resources"]["limits"]["nvidia.com/gpu.shared"] == "1" and "nvidia.com/gpu" not in c["resources"]["limits"]
    state = world.group_state(group, [_small("ns", "a")], 0, True)
    assert state.gpu_fraction == 0.5 and state.gpu_memory_mib == H100 // 2


def test_the_inventory_reads_time_sliced_nodes():
    node = {"metadata": {"name": "s0", "labels": {"nvidia.com/gpu.memory": str(H100), "nvidia.com/gpu.replicas": "4",
                                                  "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED"}},
            "status": {"allocatable": {"nvidia.com/gpu.shared": "32"}}}
    pod = {"metadata": {"name": "p"}, "spec": {"nodeName": "s0", "containers": [
        {"resources": {"requests": {"nvidia.com/gpu.shared": "1"}}}]}, "status": {"phase": "Running"}}
    (info,) = world.node_inventory([world.compact_node(node)], [world.compact_pod(pod)])
    assert (info.gpus_allocatable, info.gpu_slices, info.slices_free) == (0, 4, 31)


def test_the_mixed_workload_on_partly_time_sliced_nodes_needs_fewer_gpus():
    reqs, nodes, archs = bench.mixed_workload()
    whole = P.plan(reqs, [], nodes, archs)
    shared = P.plan(reqs, [], bench.shared_gpu_nodes(nodes), archs)
    assert not shared.unplaceable and shared.gpu_slices > 0
    assert shared.gpus_allocated < whole.gpus_allocated
    for g in shared.groups:  # each group, a slice's included, fits its memory at its budget
        assert g.memory_per_gpu_bytes <= g.gpu_memory_mib * M.MiB
