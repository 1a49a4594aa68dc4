"""Turn raw Kubernetes objects (plain dicts) into planner inputs. Pure."""
from __future__ import annotations

from typing import Iterable, Mapping

from pydantic import ValidationError

from muxtune.api.basemodel import Architecture
from muxtune.operator.model_figures import basemodel_figures
from muxtune.api.finetunetask import FineTuneTask
from muxtune.api.loader import format_validation_error
from muxtune.operator.config import (
    ANN_GPU_MEMORY,
    ANN_NAMESPACES,
    ANN_QUEUE,
    ANN_TENANCY,
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_REPLICAS_LABEL,
    GPU_RESOURCE,
    GPU_SHARED_RESOURCE,
    KUEUE_ADMISSION_GATE,
    KWOK_NODE_ANNOTATION,
)
from muxtune.facts.budget import DEFAULT_TOKEN_BUDGET as ENGINE_DEFAULT_BUDGET
from muxtune.facts.quantization import NO_QUANTIZATION
from muxtune.operator.memory import Parallelism
from muxtune.operator.planner import SHARED, GroupState, NodeInfo, TaskRequest

TERMINAL_POD_PHASES = ("Succeeded", "Failed")


def parse_quantity_int(q) -> int:
    """nvidia.com/gpu quantities are integers; tolerate '8', 8 and '8.0'."""
    if q is None:
        return 0
    try:
        return int(float(str(q)))
    except ValueError:
        return 0


def pod_gpus(pod: Mapping, resource: str = GPU_RESOURCE) -> int:
    """GPUs (or shared GPU slices) a pod holds: the max of its init containers' and the sum of its
    containers' requests."""
    spec = pod.get("spec") or {}

    def req(c):
        r = c.get("resources") or {}
        return parse_quantity_int((r.get("requests") or {}).get(resource) or (r.get("limits") or {}).get(resource))

    main = sum(req(c) for c in spec.get("containers") or [])
    init = max((req(c) for c in spec.get("initContainers") or []), default=0)
    return max(main, init)


def compact_node(node: Mapping) -> dict:
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    st = node.get("status") or {}
    alloc = st.get("allocatable") or st.get("capacity") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []) \
        if st.get("conditions") else True
    return {
        "name": meta.get("name"),
        "gpus": parse_quantity_int(alloc.get(GPU_RESOURCE)),
        "slices": parse_quantity_int(alloc.get(GPU_SHARED_RESOURCE)),
        "replicas": parse_quantity_int(labels.get(GPU_REPLICAS_LABEL)),
        "gpuMemoryMiB": parse_quantity_int(labels.get(GPU_MEMORY_LABEL)),
        "gpuProduct": labels.get(GPU_PRODUCT_LABEL, ""),
        "schedulable": not (node.get("spec") or {}).get("unschedulable", False) and ready,
        "fake": (meta.get("annotations") or {}).get(KWOK_NODE_ANNOTATION) == "fake",
    }


def compact_pod(pod: Mapping) -> dict:
    meta = pod.get("metadata") or {}
    st = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
    sched = next((c for c in st.get("conditions") or [] if c.get("type") == "PodScheduled"), {})
    waiting = next(((cs.get("state") or {}).get("waiting") for cs in st.get("containerStatuses") or []
                    if (cs.get("state") or {}).get("waiting", {}).get("reason") not in (None, "ContainerCreating")), None)
    return {
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                     "resourceVersion": meta.get("resourceVersion")},
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "labels": dict(meta.get("labels") or {}),
        "annotations": dict(meta.get("annotations") or {}),
        "deleting": bool(meta.get("deletionTimestamp")),
        "nodeName": (pod.get("spec") or {}).get("nodeName"),
        "gpus": pod_gpus(pod),
        "slices": pod_gpus(pod, GPU_SHARED_RESOURCE),
        "phase": st.get("phase", "Pending"),
        "ready": ready,
        "podIP": st.get("podIP"),
        "message": st.get("message") or st.get("reason") or "",
        # why it is not running: the scheduler's verdict, a container's waiting reason
        "unschedulable": (sched.get("message") or sched.get("reason") or "unschedulable")
        if sched.get("status") == "False" else "",
        "waiting": f"{waiting.get('reason')}: {waiting.get('message') or ''}".rstrip(": ") if waiting else "",
        # Kueue holds it back until its pod group's Workload is admitted
        "gated": any(g.get("name") == KUEUE_ADMISSION_GATE for g in (pod.get("spec") or {}).get("schedulingGates") or []),
        # a transfer Job's container says why it failed, or where it staged a model
        "terminationMessage": next((t.get("message") for cs in st.get("containerStatuses") or []
                                    for t in [(cs.get("state") or {}).get("terminated") or {}] if t.get("message")), ""),
    }


def node_inventory(nodes: Iterable[Mapping], pods: Iterable[Mapping]) -> list[NodeInfo]:
    """Compact nodes + compact pods -> free GPUs per schedulable GPU node."""
    used: dict[str, int] = {}
    sliced: dict[str, int] = {}
    for p in pods:
        if p.get("nodeName") and p.get("phase") not in TERMINAL_POD_PHASES:
            used[p["nodeName"]] = used.get(p["nodeName"], 0) + int(p.get("gpus") or 0)
            sliced[p["nodeName"]] = sliced.get(p["nodeName"], 0) + int(p.get("slices") or 0)
    out = []
    for n in nodes:
        slices = n.get("slices", 0) if n.get("replicas", 0) > 1 else 0
        if (n["gpus"] <= 0 and slices <= 0) or n["gpuMemoryMiB"] <= 0 or not n.get("schedulable", True):
            continue
        out.append(NodeInfo(n["name"], n["gpus"], n["gpus"] - used.get(n["name"], 0), n["gpuMemoryMiB"], n["gpuProduct"],
                            gpu_slices=n.get("replicas", 0) if slices else 0,
                            slices_free=slices - sliced.get(n["name"], 0) if slices else 0))
    return sorted(out, key=lambda x: x.name)


def basemodel_architecture(bm: Mapping) -> Architecture | None:
    """The figures in use: typed in spec.architecture, the rest read from config.json
    (operator/model_figures.py), with the weights' storage (spec.quantization); None when the
    required ones are missing."""
    arch = basemodel_figures(bm)[0]
    quantization = (bm.get("spec") or {}).get("quantization") or NO_QUANTIZATION
    if arch is None or arch.quantization == quantization:
        return arch
    return arch.model_copy(update={"quantization": quantization})


def parse_task(obj: Mapping) -> FineTuneTask | str:
    """The task as the pydantic model, or a message naming the bad field."""
    doc = {k: obj[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in obj}
    try:
        return FineTuneTask.model_validate(doc)
    except ValidationError as e:
        name = (obj.get("metadata") or {}).get("name", "?")
        return format_validation_error(f"FineTuneTask {name}", e)


def group_started(name: str, members: Iterable[Mapping], reports: Mapping[str, Mapping]) -> bool:
    """Whether a member has run a step in group ``name``: its engine's latest report says so, or
    (before the first poll after an operator restart) its status does. Until then the planner
    may still change the group's token budget (GroupState.started)."""
    for m in members:
        meta = m.get("metadata") or {}
        rep = reports.get(f"{meta.get('namespace')}/{meta.get('name')}") or {}
        st = m.get("status") or {}
        if (rep.get("_group") == name and int(rep.get("step") or 0) > 0) or \
                (st.get("group") == name and int(st.get("step") or 0) > 0):
            return True
    return False


def group_state(group: Mapping, members: list[TaskRequest], unbound_pods: int, accepting: bool,
                started: bool = True) -> GroupState:
    meta, spec = group["metadata"], group.get("spec") or {}
    ann = meta.get("annotations") or {}
    ten = ann.get(ANN_TENANCY)
    par = spec.get("parallelism") or {}
    return GroupState(
        name=meta["name"],
        namespace=meta["namespace"],
        base_model=spec.get("baseModel", ""),
        tenancy=SHARED if ten == "*" else (ten or meta["namespace"]),
        parallelism=Parallelism(dp=int(par.get("dp", 1)), tp=int(par.get("tp", 1)), pp=int(par.get("pp", 1))),
        gpu_memory_mib=parse_quantity_int(ann.get(ANN_GPU_MEMORY)),
        gpu_product=spec.get("gpuProduct") or "",
        members=tuple(members),
        unbound_pods=unbound_pods,
        accepting=accepting,
        namespaces=frozenset(n for n in ann.get(ANN_NAMESPACES, "").split(",") if n) if ten == "*" else None,
        queue=ann.get(ANN_QUEUE, ""),
        started=started,
        gpu_fraction=float(spec.get("gpuMemoryFraction") or 1.0),
        **_engine_budget(spec),
    )


def _engine_budget(spec: Mapping) -> dict:
    """The budget a group's pods run with. A group written before the planner passed budgets to
    pods (no spec.recompute) runs with the engine's default, whatever its spec.tokenBudget says;
    the larger of the two bounds what a round holds (a round never exceeds its members' steps)."""
    budget = int(spec.get("tokenBudget") or ENGINE_DEFAULT_BUDGET)
    if "recompute" not in spec:
        return {"token_budget": max(budget, ENGINE_DEFAULT_BUDGET), "recompute": False}
    return {"token_budget": budget, "recompute": bool(spec["recompute"])}


def task_request(task: FineTuneTask, namespace_labels: Mapping[str, str] | None = None) -> TaskRequest:
    return TaskRequest.from_task(task, namespace_labels)
