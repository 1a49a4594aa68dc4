"""Operator scale benchmark: a few hundred kwok GPU nodes, about a thousand FineTuneTasks.

Reports placement time (apply -> every task Placed or Pending with a reason), scheduling time (every
group pod bound by kube-scheduler), GPUs used vs the planner's lower bound, packing efficiency,
planner and reconcile durations, and API requests per task (the operator's own client, counted by
verb and resource, and the API server's apiserver_request_total delta over the whole run).

    python bench/operator_scale.py                      # private cluster, 300 nodes, 1000 tasks
    python bench/operator_scale.py --nodes 40 --tasks 150 --json out.json
    python bench/operator_scale.py --state-dir DIR      # reuse a running dev cluster
    python bench/operator_scale.py --plan-only          # the planner alone: GPUs vs floor vs bound
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

BASEMODELS = {
    # name: (parameters, layers, hidden, heads)
    "llama-7b": (6_738_000_000, 32, 4096, 32),
    "llama-13b": (13_016_000_000, 40, 5120, 40),
    "llama-70b": (68_977_000_000, 80, 8192, 64),
}
PRODUCTS = [("NVIDIA-H100-80GB-HBM3", 81920), ("NVIDIA-A100-SXM4-40GB", 40960)]


def _load_helpers():
    """The operator cluster tests' helpers (tests/helpers/cluster.py): the bench drives the operator as they do."""
    if str(REPO) not in sys.path:  # run as `python -m bench.operator_scale` or loaded by the scale test
        sys.path.insert(0, str(REPO))
    from tests.helpers import cluster

    return cluster


def make_nodes(n: int, gpus: int, prefix: str) -> list[dict]:
    from muxtune.devcluster.cluster import node_manifest

    out = []
    for i in range(n):
        product, mib = PRODUCTS[0] if i % 4 else PRODUCTS[1]  # 3/4 H100-80GB, 1/4 A100-40GB
        out.append(node_manifest(f"{prefix}-{i:04d}", gpus=gpus, gpu_product=product, gpu_memory_mib=mib,
                                 labels={"muxtune.io/bench": prefix}))
    return out


def make_tasks(n: int, namespaces: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        ns = namespaces[i % len(namespaces)]
        roll = rng.random()
        if roll < 0.45:
            base, batch, seq = "model:bench-llama-7b", rng.choice([1, 2, 4, 8]), rng.choice([512, 1024])
        elif roll < 0.75:
            base, batch, seq = "model:bench-llama-13b", rng.choice([1, 2, 4]), rng.choice([512, 1024])
        elif roll < 0.85:
            base, batch, seq = "model:bench-llama-70b", rng.choice([1, 2]), 512
        else:
            base, batch, seq = "builtin:tiny-llama", rng.choice([2, 4, 8]), 256
        docs.append({
            "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
            "metadata": {"name": f"task-{i:05d}", "namespace": ns},
            "spec": {
                "baseModel": base,
                "dataset": {"path": f"sets/{i}.jsonl", "maxSeqLen": seq},
                "peft": {"method": "lora", "r": rng.choice([8, 16, 64]), "targetModules": ["q_proj", "v_proj"]},
                "training": {"maxSteps": 1000, "batchSize": batch, "learningRate": 1e-4},
                "priority": rng.choice([0, 0, 0, 10]),
                "shareAcrossNamespaces": rng.random() < 0.3,
            },
        })
    return docs


def one_shot_gpus(nodes: int, gpus_per_node: int, tasks: int, namespaces: list[str]) -> int:
    """GPUs the planner gives the same workload planned at once, offline: what the operator, placing
    tasks as they arrive over several passes, is measured against (the memory lower bound is loose
    for pipelines, which keep only a window of micro-batches in flight)."""
    from muxtune.api.basemodel import Architecture
    from muxtune.api.finetunetask import FineTuneTask
    from muxtune.operator import planner

    reqs = [planner.TaskRequest.from_task(FineTuneTask.model_validate(d)) for d in make_tasks(tasks, namespaces)]
    infos = [planner.NodeInfo(d["metadata"]["name"], gpus_per_node, gpus_per_node,
                              int(d["metadata"]["labels"]["nvidia.com/gpu.memory"]),
                              d["metadata"]["labels"]["nvidia.com/gpu.product"])
             for d in make_nodes(nodes, gpus_per_node, "plan")]
    archs = {f"bench-{name}": Architecture(parameters=p, layers=L, hidden_size=h, num_attention_heads=a,
                                           vocab_size=32000, dtype="bfloat16")
             for name, (p, L, h, a) in BASEMODELS.items()}
    return planner.plan(reqs, [], infos, archs).gpus_allocated


# ------------------------------------------------------------------ the planner alone (no cluster)

LLAMA7B = dict(parameters=6_738_000_000, layers=32, hidden_size=4096, num_attention_heads=32, vocab_size=32000)
MIXED_BACKBONES = {  # name: (architecture, share of tasks): Llama-3-8B, Qwen2.5-14B, Qwen2.5-1.5B
    "llama3-8b": (dict(parameters=8_030_000_000, layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256), 0.45),
    "qwen2.5-14b": (dict(parameters=14_770_000_000, layers=48, hidden_size=5120, num_attention_heads=40,
                         num_key_value_heads=8, intermediate_size=13824, vocab_size=152064), 0.25),
    "qwen2.5-1.5b": (dict(parameters=1_540_000_000, layers=28, hidden_size=1536, num_attention_heads=12,
                          num_key_value_heads=2, intermediate_size=8960, vocab_size=151936), 0.30),
}


def test_workload():
    """tests/operator/test_planner.py's speed workload: 1000 LoRA tasks on a 7B over 10 namespaces,
    300 nodes of 8 x 80 GB. (requests, nodes, architectures)"""
    from muxtune.api.basemodel import Architecture
    from muxtune.operator import memory as M
    from muxtune.operator import planner as P

    reqs = [P.TaskRequest(namespace=f"ns{i % 10}", name=f"t{i}", base_model="model:llama7b",
                          created=f"2025-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z", uid=f"u{i}",
                          shape=M.TaskShape(batch_size=1 + i % 8, max_seq_len=512)) for i in range(1000)]
    nodes = [P.NodeInfo(f"n{i:03d}", 8, 8, 81920, "NVIDIA-H100-80GB-HBM3") for i in range(300)]
    return reqs, nodes, {"llama7b": Architecture(**LLAMA7B)}


def mixed_workload(tasks: int = 720, namespaces: int = 12, seed: int = 0):
    """720 tasks on 8B, 14B and 1.5B backbones over 12 namespaces, a third of which opt into
    sharing; LoRA of ranks 8-64 on attention (some on the MLP too), batches 1-16, sequences 256-4096;
    60 nodes of 8 x 80 GB and 20 of 8 x 40 GB. (requests, nodes, architectures)"""
    from muxtune.api.basemodel import Architecture
    from muxtune.operator import memory as M
    from muxtune.operator import planner as P

    rng = random.Random(seed)
    names, weights = list(MIXED_BACKBONES), [w for _, w in MIXED_BACKBONES.values()]
    sharing = {f"team-{k:02d}" for k in range(0, namespaces, 3)}
    reqs = []
    for i in range(tasks):
        ns = f"team-{i % namespaces:02d}"
        targets = rng.choice([("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                              ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")])
        reqs.append(P.TaskRequest(
            namespace=ns, name=f"task-{i:04d}", base_model=f"model:{rng.choices(names, weights)[0]}",
            priority=rng.choice([0, 0, 0, 10]), created=f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
            share=ns in sharing, uid=f"uid-{i}",
            shape=M.TaskShape(r=rng.choice([8, 16, 32, 64]), target_modules=targets,
                              batch_size=rng.choice([1, 2, 4, 8, 16]), max_seq_len=rng.choice([256, 512, 1024, 2048, 4096]))))
    nodes = ([P.NodeInfo(f"h{i:03d}", 8, 8, 81920, "NVIDIA-H100-80GB-HBM3") for i in range(60)]
             + [P.NodeInfo(f"a{i:03d}", 8, 8, 40960, "NVIDIA-A100-SXM4-40GB") for i in range(20)])
    return reqs, nodes, {n: Architecture(**a, dtype="bfloat16") for n, (a, _) in MIXED_BACKBONES.items()}


def plan_figures(reqs, nodes, archs) -> dict:
    """Plan a workload at once: GPUs, the floor (weights and adapter state only), the planner's own
    bounds, and the plan's process CPU time."""
    from muxtune.operator import planner as P

    t0 = time.process_time()
    p = P.plan(reqs, [], nodes, archs)
    cpu = time.process_time() - t0
    return {"tasks": len(reqs), "placed": len(p.placements), "unplaceable": len(p.unplaceable),
            "groups": len(p.groups), "gpus": p.gpus_allocated, "floorGpus": p.floor_gpus,
            "gpusOverFloor": round(p.gpus_allocated / max(1, p.floor_gpus), 3),
            "lowerBoundGpus": p.lower_bound_gpus, "lowerBoundGpusByTenancy": p.lower_bound_gpus_by_tenancy,
            "recomputingGroups": sum(g.recompute for g in p.groups), "sharedGpuGroups": p.gpu_slices,
            "tokenBudgets": sorted({g.token_budget for g in p.groups}), "planCpuSeconds": round(cpu, 3)}


def shared_gpu_nodes(nodes, count: int = 10, replicas: int = 2):
    """The first ``count`` 8 x 80 GB nodes time-sliced (nvidia.com/gpu.shared, ``replicas`` a GPU):
    small groups may take one replica, half a GPU's memory (MuxServe-style sharing)."""
    from muxtune.operator import planner as P

    whole = [n for n in nodes if n.gpu_memory_mib == 81920]
    sliced = {n.name for n in whole[:count]}
    return [n for n in nodes if n.name not in sliced] + [
        P.NodeInfo(n.name, 0, 0, n.gpu_memory_mib, f"{n.gpu_product}-SHARED", gpu_slices=replicas,
                   slices_free=n.gpus_allocatable * replicas) for n in whole[:count]]


def plan_only() -> dict:
    """Both workloads; the mixed one also with 10 of its 80 GB nodes time-sliced (there the floor,
    a whole GPU per group, is no longer a bound: two groups may share one)."""
    reqs, nodes, archs = mixed_workload()
    return {"testWorkload": plan_figures(*test_workload()), "mixedWorkload": plan_figures(reqs, nodes, archs),
            "mixedWorkloadSharedGpus": plan_figures(reqs, shared_gpu_nodes(nodes), archs)}


def apiserver_requests(info) -> dict[str, float]:
    """apiserver_request_total summed by resource (and 'ALL')."""
    text = info.kubectl("get", "--raw", "/metrics").stdout
    out: dict[str, float] = {"ALL": 0.0}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        m = re.search(r'resource="([^"]*)"', line)
        v = float(line.rsplit(" ", 1)[1])
        out["ALL"] += v
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + v
    return out


def prom_values(text: str, name: str) -> dict[str, float]:
    vals = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, v = line.rsplit(" ", 1)
            vals[key] = float(v)
    return vals


def create_many(info, docs: list[dict], chunk: int = 250) -> None:
    for i in range(0, len(docs), chunk):
        body = {"apiVersion": "v1", "kind": "List", "items": docs[i:i + chunk]}
        p = info.kubectl("create", "-f", "-", input=json.dumps(body), check=False, timeout=600)
        if p.returncode != 0 and "AlreadyExists" not in p.stderr:
            raise RuntimeError(p.stderr[-2000:])


@dataclass
class _Scene:
    """The names one run creates, so that it can clean exactly them up."""

    prefix: str  # node name prefix and the muxtune.io/bench label value
    system: str  # the operator's namespace
    tenant_ns: list[str]
    basemodels: list[str]

    @property
    def namespaces(self) -> set[str]:
        return {self.system, *self.tenant_ns}


def run(info, *, nodes: int, gpus_per_node: int, tasks: int, namespaces: int, timeout: float = 900,
        cleanup: bool = True, log=print, arrival_chunk: int = 250, arrival_gap: float = 0.0) -> dict:
    """The workload, created ``arrival_chunk`` tasks at a time ``arrival_gap`` seconds apart (tasks
    that arrive over several reconcile passes), placed by the operator; its figures."""
    kh = _load_helpers()
    scene = _set_up(info, kh, nodes, gpus_per_node, namespaces, log)
    op = _start_operator(info, kh, scene)
    before_api = apiserver_requests(info)
    before_op = sum(prom_values(op.metrics(), "muxtune_operator_api_requests_total").values())

    docs = make_tasks(tasks, scene.tenant_ns)
    t0 = time.monotonic()
    for i in range(0, len(docs), arrival_chunk):
        if i:
            time.sleep(arrival_gap)
        create_many(info, docs[i:i + arrival_chunk])
    t_created = time.monotonic() - t0
    log(f"{tasks} FineTuneTasks created in {t_created:.1f}s")
    items = kh.wait_for(lambda: _all_decided(info, kh, scene, tasks), timeout, interval=1.0,
                        what="every task placed or pending with a reason")
    t_placed = time.monotonic() - t0
    log(f"all tasks decided after {t_placed:.1f}s")
    pods = kh.wait_for(lambda: _all_bound(info, kh, scene), timeout, interval=1.0, what="every group pod bound")
    t_bound = time.monotonic() - t0
    # let the status passes that follow pods becoming Running finish
    kh.wait_for(lambda: _settled(info, kh, scene), timeout, interval=1.0, what="statuses settled")
    t_settled = time.monotonic() - t0
    time.sleep(2)

    after_api = apiserver_requests(info)
    m = op.metrics()
    groups = [g for ns in scene.namespaces for g in kh.kjson(info, "get", "backbonegroups", "-n", ns)["items"]]
    result = {
        "nodes": nodes, "gpusPerNode": gpus_per_node, "tasks": tasks, "namespaces": namespaces,
        "createSeconds": round(t_created, 2),
        "placementSeconds": round(t_placed, 2),
        "placementAfterLastCreateSeconds": round(t_placed - t_created, 2),
        "podsBoundSeconds": round(t_bound, 2),
        "statusSettledSeconds": round(t_settled, 2),
        **_placement_figures(items, groups, pods),
        "gpusOneShotPlan": one_shot_gpus(nodes, gpus_per_node, tasks, scene.tenant_ns),
        **_operator_figures(m, tasks, before_op),
        **_apiserver_figures(before_api, after_api, tasks),
        "reconcileErrors": prom_values(m, "muxtune_operator_reconcile_errors_total"),
    }
    op.stop()
    if cleanup:
        _tear_down(info, scene)
    return result


def _set_up(info, kh, nodes: int, gpus_per_node: int, namespaces: int, log) -> _Scene:
    """Namespaces, CRDs, the bench BaseModels and the kwok GPU nodes (waited Ready)."""
    tag = uuid.uuid4().hex[:5]
    scene = _Scene(prefix=f"scale-{tag}", system=f"mtscale-{tag}",
                   tenant_ns=[f"scale-{tag}-{i}" for i in range(namespaces)],
                   basemodels=[f"bench-{name}" for name in BASEMODELS])
    for ns in [scene.system, *scene.tenant_ns]:
        info.kubectl("create", "namespace", ns)
    from muxtune.devcluster import cluster

    for ns in [scene.system, *scene.tenant_ns]:
        cluster.wait_for_default_service_account(info, ns)
    kh.ensure_crds(info)
    bms = [{"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"bench-{name}"},
            "spec": {"source": {"hostPath": {"path": f"/models/{name}"}}, "allowedNamespaces": ["*"],
                     "architecture": {"parameters": p, "layers": L, "hiddenSize": h, "numAttentionHeads": a,
                                      "vocabSize": 32000, "dtype": "bfloat16"}}}
           for name, (p, L, h, a) in BASEMODELS.items()]
    info.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(bms))

    t = time.monotonic()
    create_many(info, make_nodes(nodes, gpus_per_node, scene.prefix), chunk=100)
    info.kubectl("wait", "--for=condition=Ready", "--timeout=300s", "node", "-l", f"muxtune.io/bench={scene.prefix}",
                 timeout=320)
    log(f"{nodes} kwok GPU nodes ready in {time.monotonic() - t:.1f}s")
    return scene


def _start_operator(info, kh, scene: _Scene):
    """The operator as its own process with the chart's RBAC, watching the tenant namespaces."""
    sa_kubeconfig = kh.install_rbac(info, scene.system)
    logdir = Path(tempfile.mkdtemp(prefix="muxtune-scale-"))
    op = kh.OperatorProcess(sa_kubeconfig, scene.tenant_ns, scene.system, logdir / "operator.log",
                            extra=["--sharing-policy", "opt-in", "--poll-interval", "30"])
    op.start()
    kh.wait_for(lambda: "indices populated" in op.log_text(), 60, what="operator ready")
    time.sleep(1)
    return op


def _my_tasks(info, kh, scene: _Scene) -> list[dict]:
    return [x for x in kh.kjson(info, "get", "finetunetasks", "-A")["items"] if x["metadata"]["namespace"] in scene.tenant_ns]


def _all_decided(info, kh, scene: _Scene, tasks: int) -> list[dict] | None:
    """Every task Placed/Running, or Pending with a Placed condition whose reason is not Queued."""
    mine = _my_tasks(info, kh, scene)
    decided = [x for x in mine if (x.get("status") or {}).get("phase") in ("Placed", "Running")
               or ((x.get("status") or {}).get("phase") == "Pending"
                   and any(c.get("reason") not in (None, "Queued") for c in (x["status"].get("conditions") or [])
                           if c.get("type") == "Placed"))]
    return mine if len(mine) == tasks and len(decided) == tasks else None


def _all_bound(info, kh, scene: _Scene) -> list[dict] | None:
    """Every group's pods, once each group has all of its pods bound and none terminating (a group
    whose budget the planner lowered before its first step restarts its pods)."""
    pods = [p for ns in scene.namespaces
            for p in kh.kjson(info, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/managed-by=muxtune-operator")["items"]]
    groups = [g for ns in scene.namespaces for g in kh.kjson(info, "get", "backbonegroups", "-n", ns)["items"]]
    want = sum(g["spec"]["parallelism"]["dp"] for g in groups)
    ok = pods and len(pods) == want and all(p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
                                            for p in pods)
    return pods if ok else None


def _settled(info, kh, scene: _Scene) -> bool:
    return all(any(c.get("reason") in ("EngineStarting", "TooLarge", "WaitingForGpus", "ModelUnknown", "NoGpuNodes")
                   for c in (x.get("status") or {}).get("conditions") or []) for x in _my_tasks(info, kh, scene))


def _placement_figures(items: list[dict], groups: list[dict], pods: list[dict]) -> dict:
    """Tasks by phase, Pending tasks by reason, and what the groups hold."""
    phases: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for x in items:
        st = x.get("status") or {}
        phases[st.get("phase", "?")] = phases.get(st.get("phase", "?"), 0) + 1
        if st.get("phase") == "Pending":
            r = next((c["reason"] for c in st.get("conditions") or [] if c["type"] == "Placed"), "?")
            reasons[r] = reasons.get(r, 0) + 1
    return {
        "tasksPlaced": sum(len(g["spec"]["tasks"]) for g in groups), "phases": phases, "pendingReasons": reasons,
        "groups": len(groups), "pods": len(pods),
        "gpusUsed": sum(g["spec"]["gpusPerPod"] * g["spec"]["parallelism"]["dp"] for g in groups),
    }


def _mean(hist: dict[str, float], name: str, digits: int) -> float:
    return round(hist.get(f"{name}_sum", 0) / max(1, hist.get(f"{name}_count", 1)), digits)


def _operator_figures(metrics_text: str, tasks: int, before_requests: float) -> dict:
    """The operator's own view from its /metrics: GPU bounds, packing, planner/reconcile time, requests."""
    m = metrics_text
    requests = prom_values(m, "muxtune_operator_api_requests_total")
    after = sum(requests.values())
    pl = prom_values(m, "muxtune_operator_planner_duration_seconds")
    rc = prom_values(m, "muxtune_operator_reconcile_duration_seconds")
    return {
        "gpusLowerBound": next(iter(prom_values(m, "muxtune_operator_gpus_lower_bound ").values()), None),
        "gpusLowerBoundByTenancy": next(iter(prom_values(m, "muxtune_operator_gpus_lower_bound_by_tenancy").values()), None),
        "packingEfficiency": round(next(iter(prom_values(m, "muxtune_operator_packing_efficiency_ratio").values()), 0.0), 3),
        "plannerRuns": pl.get("muxtune_operator_planner_duration_seconds_count"),
        "plannerMeanSeconds": _mean(pl, "muxtune_operator_planner_duration_seconds", 4),
        "reconcilePasses": rc.get("muxtune_operator_reconcile_duration_seconds_count"),
        "reconcileMeanSeconds": _mean(rc, "muxtune_operator_reconcile_duration_seconds", 3),
        "operatorRequests": after - before_requests,
        "operatorRequestsPerTask": round((after - before_requests) / tasks, 2),
        "operatorRequestsByKind": {k.split("{", 1)[1].rstrip("}"): v for k, v in requests.items()},
    }


def _apiserver_figures(before: dict[str, float], after: dict[str, float], tasks: int) -> dict:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {
        "apiserverRequests": delta.get("ALL"),
        "apiserverRequestsPerTask": round(delta.get("ALL", 0) / tasks, 2),
        "apiserverRequestsByResource": {k: v for k, v in sorted(delta.items()) if v and k != "ALL"},
    }


def _tear_down(info, scene: _Scene) -> None:
    for ns in [*scene.tenant_ns, scene.system]:
        info.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    info.kubectl("delete", "node", "-l", f"muxtune.io/bench={scene.prefix}", "--wait=false", check=False, timeout=300)
    info.kubectl("delete", "basemodel", *scene.basemodels, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--state-dir", default=None, help="reuse (or start and keep) the dev cluster in this dir")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--plan-only", action="store_true",
                    help="no cluster: plan the test and the mixed workload; GPUs, floor, bounds, CPU time")
    a = ap.parse_args(argv)
    if a.plan_only:
        print(json.dumps(plan_only(), indent=2))
        return 0
    from muxtune.devcluster import cluster

    private = a.state_dir is None
    state = Path(a.state_dir) if a.state_dir else Path(tempfile.mkdtemp(prefix="muxtune-scale-cluster-"))
    if private:
        cluster.spawn_reaper(state)
    info = cluster.up(state, 0)
    try:
        res = run(info, nodes=a.nodes, gpus_per_node=a.gpus_per_node, tasks=a.tasks, namespaces=a.namespaces,
                  timeout=a.timeout, cleanup=not private)
    finally:
        if private:
            cluster.down(state)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
