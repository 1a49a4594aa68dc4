"""Manifests for a BackboneGroup and its children: pure functions of (group, members, config).

Children (all in the group's namespace, all with an ownerReference to the group):
* ConfigMap ``<group>-tasks``: ``tasks.yaml``, the member FineTuneTasks as multi-document YAML,
  exactly the schema the engine reads; ``model:NAME`` backbones resolve to ``/models/NAME``;
  dataset and output paths stay relative (the engine reads ``/data/<path>`` and writes
  ``/output/<ns>/<output.path or name>``).
* Service ``<group>``: headless, port ``metrics`` (engine /metrics and /v1/status); also the
  DNS domain of the pods (rank 0 is the rendezvous for dp > 1).
* Pods ``<group>-<rank>``, one per data-parallel replica, each requesting tp*pp GPUs, running
  ``muxtune run /etc/muxtune/tasks/tasks.yaml --output /output --data-root /data --watch --metrics-port 9400
  --no-progress`` under the restricted Pod Security Standard.
"""
from __future__ import annotations

import hashlib
import json
import posixpath

import yaml

from muxtune.api.finetunetask import FineTuneTask
from muxtune.api.meta import API_VERSION
from muxtune.operator.config import (
    ANN_ENDPOINT,  # noqa: F401  (documented alongside the pod)
    ANN_GPU_MEMORY,
    ANN_POD_TEMPLATE,
    ANN_TENANCY,
    DATA_MOUNT,
    ENGINE_APP,
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    LABEL_COMPONENT,
    LABEL_GROUP,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGED_BY,
    MODELS_MOUNT,
    OUTPUT_MOUNT,
    TASKS_FILE,
    TASKS_MOUNT,
    OperatorConfig,
)
from muxtune.operator.planner import GroupPlan

RUN_AS = 65532


def configmap_name(group: str) -> str:
    return f"{group}-tasks"


def pod_name(group: str, rank: int) -> str:
    return f"{group}-{rank}"


def group_labels(group: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_GROUP: group}


def engine_labels(group: str) -> dict[str, str]:
    return {**group_labels(group), LABEL_NAME: ENGINE_APP, LABEL_COMPONENT: "engine"}


def owner_reference(group: dict) -> dict:
    m = group["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "BackboneGroup",
        "name": m["name"],
        "uid": m["uid"],
        "controller": True,
    }


# --------------------------------------------------------------------------- BackboneGroup

def group_spec(plan: GroupPlan, members: list[dict], token_budget: int | None) -> dict:
    """spec of the BackboneGroup CR; ``members`` are the member tasks' raw objects."""
    spec = {
        "baseModel": plan.base_model,
        "tasks": [
            {k: v for k, v in (("name", t["metadata"]["name"]), ("namespace", t["metadata"]["namespace"]),
                               ("uid", t["metadata"].get("uid"))) if v}
            for t in members
        ],
        "gpusPerPod": plan.gpus_per_pod,
        "parallelism": {"dp": plan.parallelism.dp, "tp": plan.parallelism.tp, "pp": plan.parallelism.pp},
        "gpuProduct": plan.gpu_product or None,
    }
    if token_budget:
        spec["tokenBudget"] = token_budget
    return {k: v for k, v in spec.items() if v is not None}


def group_manifest(plan: GroupPlan, members: list[dict], token_budget: int | None) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "BackboneGroup",
        "metadata": {
            "name": plan.name,
            "namespace": plan.namespace,
            "labels": group_labels(plan.name),
            "annotations": {
                ANN_GPU_MEMORY: str(plan.gpu_memory_mib),
                ANN_TENANCY: plan.tenancy if plan.tenancy is not None else "*",
            },
        },
        "spec": group_spec(plan, members, token_budget),
    }


# --------------------------------------------------------------------------- ConfigMap

def resolve_base_model(base_model: str) -> str:
    """The path (or builtin name) the engine sees inside the pod."""
    if base_model.startswith("model:"):
        return f"{MODELS_MOUNT}/{base_model.split(':', 1)[1]}"
    if base_model.startswith("pvc://"):
        claim, _, path = base_model[len("pvc://"):].partition("/")
        return posixpath.join(f"{MODELS_MOUNT}/pvc-{claim}", path)
    return base_model


def engine_task_document(task: FineTuneTask) -> dict:
    """One member as the engine reads it: the same FineTuneTask schema, paths rewritten for the pod."""
    ns = task.metadata.namespace or "default"
    spec = task.spec.model_copy(deep=True)
    spec.base_model = resolve_base_model(spec.base_model)
    # dataset.path and output.path stay relative: the engine resolves them under --data-root and
    # --output/<namespace>/ (the API refuses absolute paths and "..")
    meta = {"name": task.metadata.name, "namespace": ns}
    if task.metadata.uid:
        meta["uid"] = task.metadata.uid
    return {"apiVersion": API_VERSION, "kind": "FineTuneTask", "metadata": meta,
            "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True)}


def tasks_yaml(tasks: list[FineTuneTask]) -> str:
    docs = [engine_task_document(t) for t in sorted(tasks, key=lambda t: (t.metadata.namespace or "", t.metadata.name))]
    return yaml.safe_dump_all(docs, sort_keys=True) if docs else ""


def configmap_manifest(group: dict, tasks: list[FineTuneTask]) -> dict:
    name = group["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(name),
            "namespace": group["metadata"]["namespace"],
            "labels": group_labels(name),
            "ownerReferences": [owner_reference(group)],
        },
        "data": {TASKS_FILE: tasks_yaml(tasks)},
    }


# --------------------------------------------------------------------------- Service

def service_manifest(group: dict, config: OperatorConfig) -> dict:
    name = group["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": group["metadata"]["namespace"],
            "labels": engine_labels(name),
            "ownerReferences": [owner_reference(group)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_GROUP: name, LABEL_COMPONENT: "engine"},
            "ports": [{"name": "metrics", "port": config.engine_metrics_port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


# --------------------------------------------------------------------------- Pods

def engine_args(config: OperatorConfig) -> list[str]:
    return [
        "run", f"{TASKS_MOUNT}/{TASKS_FILE}", "--output", OUTPUT_MOUNT, "--data-root", DATA_MOUNT, "--watch",
        "--metrics-port", str(config.engine_metrics_port), "--no-progress",
    ]


def _volume(name: str, pvc: str | None, host_path: str | None, read_only: bool) -> dict:
    if pvc:
        return {"name": name, "persistentVolumeClaim": {"claimName": pvc, "readOnly": read_only}}
    if host_path:
        return {"name": name, "hostPath": {"path": host_path, "type": "DirectoryOrCreate" if not read_only else "Directory"}}
    return {"name": name, "emptyDir": {}}  # CPU / dev fallback


def model_volume(base_model: str, basemodel: dict | None) -> tuple[dict, dict] | None:
    """(volume, mount) for the backbone's weights, or None (built-in models need none)."""
    if base_model.startswith("model:"):
        name = base_model.split(":", 1)[1]
        src = ((basemodel or {}).get("spec") or {}).get("source") or {}
        mount = {"name": "model", "mountPath": f"{MODELS_MOUNT}/{name}", "readOnly": True}
        if src.get("pvc"):
            if src["pvc"].get("path"):
                mount["subPath"] = src["pvc"]["path"].strip("/")
            return {"name": "model", "persistentVolumeClaim": {"claimName": src["pvc"]["claimName"], "readOnly": True}}, mount
        if src.get("hostPath"):
            return {"name": "model", "hostPath": {"path": src["hostPath"]["path"], "type": "Directory"}}, mount
        return None
    if base_model.startswith("pvc://"):
        claim = base_model[len("pvc://"):].split("/", 1)[0]
        return ({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
                {"name": "model", "mountPath": f"{MODELS_MOUNT}/pvc-{claim}", "readOnly": True})
    return None


def pod_manifest(group: dict, rank: int, config: OperatorConfig, basemodel: dict | None = None) -> dict:
    meta, spec = group["metadata"], group["spec"]
    name = meta["name"]
    ns = meta["namespace"]
    par = spec.get("parallelism") or {}
    dp = int(par.get("dp", 1))
    gpus = int(spec.get("gpusPerPod", 1))
    gpu_mem = (meta.get("annotations") or {}).get(ANN_GPU_MEMORY)
    product = spec.get("gpuProduct")

    volumes = [
        {"name": "tasks", "configMap": {"name": configmap_name(name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        _volume("data", config.data_pvc, config.data_host_path, read_only=True),
        _volume("output", config.output_pvc, config.output_host_path, read_only=False),
    ]
    mounts = [
        {"name": "tasks", "mountPath": TASKS_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "data", "mountPath": DATA_MOUNT, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_MOUNT},
    ]
    mv = model_volume(spec["baseModel"], basemodel)
    if mv:
        volumes.append(mv[0])
        mounts.append(mv[1])

    resources: dict = {"requests": {"cpu": config.engine_cpu_request, "memory": config.engine_memory_request}}
    if gpus > 0:
        resources["requests"][GPU_RESOURCE] = str(gpus)
        resources["limits"] = {GPU_RESOURCE: str(gpus)}

    node_terms = []
    if product:
        node_terms.append({"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [product]})
    if gpu_mem and gpus > 0:
        # at least the GPU memory the plan was sized for
        node_terms.append({"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(int(gpu_mem) - 1)]})

    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "MUXTUNE_HOME", "value": "/tmp/muxtune"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "MUXTUNE_GROUP", "value": name},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # torch.distributed rendezvous for dp > 1 (rank 0 through the headless Service)
        {"name": "WORLD_SIZE", "value": str(dp)},
        {"name": "RANK", "value": str(rank)},
        {"name": "MASTER_ADDR", "value": f"{pod_name(name, 0)}.{name}.{ns}.svc"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "MUXTUNE_TENSOR_PARALLEL", "value": str(par.get("tp", 1))},
        {"name": "MUXTUNE_PIPELINE_PARALLEL", "value": str(par.get("pp", 1))},
    ]

    container = {
        "name": "engine",
        "image": config.engine_image,
        "imagePullPolicy": config.engine_image_pull_policy,
        "command": ["muxtune"],
        "args": engine_args(config),
        "env": env,
        "ports": [{"name": "metrics", "containerPort": config.engine_metrics_port, "protocol": "TCP"}],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "readinessProbe": {
            "httpGet": {"path": "/v1/status", "port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }
    pod_spec: dict = {
        "restartPolicy": "OnFailure",  # a crashed engine resumes its tasks from their checkpoints
        "hostname": pod_name(name, rank),
        "subdomain": name,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if node_terms:
        pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": node_terms}]}}}
    if dp > 1:
        # spread replicas over nodes
        pod_spec.setdefault("affinity", {})["podAntiAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {LABEL_GROUP: name}}}}]}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, rank),
            "namespace": ns,
            "labels": {**engine_labels(name), "muxtune.io/rank": str(rank)},
            "annotations": {},
            "ownerReferences": [owner_reference(group)],
        },
        "spec": pod_spec,
    }
    pod["metadata"]["annotations"][ANN_POD_TEMPLATE] = template_hash(pod_spec)
    return pod


def template_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
