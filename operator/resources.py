"""Manifests for a BackboneGroup and its children: pure functions of (group, members, config).

Children (all in the group's namespace, all with an ownerReference to the group):
* ConfigMap ``<group>-tasks``: ``tasks.yaml``, the member FineTuneTasks as multi-document YAML,
  exactly the schema the engine reads, and ``tasks.yaml.sig``, the operator's signature of it
  (muxtune/facts/trust.py). Dataset paths become ``<ns>/<path>`` under ``--data-root /data`` (where
  the pod mounts each namespace's area at ``/data/<ns>``); the engine writes a task's output to
  ``/output/<ns>/<name>`` (or ``/output/<ns>/<output.path>``); ``model:NAME`` backbones resolve
  to ``/models/NAME`` (``builtin:X`` for a BaseModel whose source is builtin).
* Secret ``<group>-key-<uid>``: the group's HMAC key, mounted into its pods.
* Service ``<group>``: headless, port ``metrics`` (engine /metrics and /v1/status) and port
  ``serving`` (8000, the engine's OpenAI API when the group serves); also the DNS domain of the
  pods (rank 0 is the rendezvous for dp > 1).
* PodDisruptionBudget ``<group>``: no voluntary eviction of a training pod.
* NetworkPolicy ``<group>`` (every group) and, when it serves, Secret ``<group>-serving-tokens``:
  operator/isolation.py.
* Pods ``<group>-<rank>``: operator/podspec.py.
"""
from __future__ import annotations

import posixpath

import yaml

from muxtune.api import sources
from muxtune.api.finetunetask import FineTuneTask
from muxtune.api.meta import API_VERSION
from muxtune.facts import trust
from muxtune.operator import podspec
from muxtune.operator.config import (
    ANN_GPU_MEMORY,
    ANN_NAMESPACES,
    ANN_QUEUE,
    ANN_TENANCY,
    ENGINE_APP,
    KEY_FILE,
    LABEL_COMPONENT,
    LABEL_GROUP,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGED_BY,
    MODELS_MOUNT,
    SERVING_PORT,
    TASKS_FILE,
    OperatorConfig,
)
from muxtune.operator.planner import GroupPlan
from muxtune.operator.podspec import configmap_name, key_secret_name, pod_name  # noqa: F401  (re-exported)
from muxtune.storage.datasets import staged_relpath

SIG_FILE = TASKS_FILE + trust.SIG_SUFFIX


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

def group_spec(plan: GroupPlan, members: list[dict]) -> dict:
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
    spec["tokenBudget"] = plan.token_budget  # what its pods run with (--token-budget), fixed at creation
    spec["recompute"] = plan.recompute
    spec["gpuMemoryFraction"] = round(plan.gpu_fraction, 6) if plan.shared_gpu else None
    spec["serving"] = group_serving(plan, members)
    return {k: v for k, v in spec.items() if v is not None}


def group_serving(plan: GroupPlan, members: list[dict]) -> dict | None:
    """The group's serving settings when a member asks for serving: the strictest SLOs of those that do.
    A group laid out over several ranks serves too: global rank 0 (pod 0) fronts the API and every
    rank runs its shard or stage of each inference step (engine/serve/distributed.py)."""
    wanted = [((t.get("spec") or {}).get("serving") or {}) for t in members]
    wanted = [w for w in wanted if w.get("enabled")]
    if not wanted:
        return None
    return {"port": SERVING_PORT, "sloTtftMs": min(float(w.get("sloTtftMs", 1000.0)) for w in wanted),
            "sloTpotMs": min(float(w.get("sloTpotMs", 100.0)) for w in wanted)}


def group_manifest(plan: GroupPlan, members: list[dict]) -> dict:
    annotations = {
        ANN_GPU_MEMORY: str(plan.gpu_memory_mib),
        ANN_TENANCY: plan.tenancy if plan.tenancy is not None else "*",
    }
    if plan.tenancy is None:  # shared: the namespaces its pods will mount, fixed from now on
        annotations[ANN_NAMESPACES] = ",".join(sorted({t["metadata"]["namespace"] for t in members}))
    if plan.queue:  # its pods form one Kueue pod group in this LocalQueue, fixed from now on
        annotations[ANN_QUEUE] = plan.queue
    return {
        "apiVersion": API_VERSION,
        "kind": "BackboneGroup",
        "metadata": {
            "name": plan.name,
            "namespace": plan.namespace,
            "labels": group_labels(plan.name),
            "annotations": annotations,
        },
        "spec": group_spec(plan, members),
    }


# --------------------------------------------------------------------------- ConfigMap

def resolve_base_model(base_model: str, basemodel: dict | None = None) -> str:
    """The path (or builtin name) the engine sees inside the pod."""
    if base_model.startswith("model:"):
        builtin = (((basemodel or {}).get("spec") or {}).get("source") or {}).get("builtin")
        if builtin:
            return f"builtin:{builtin}"  # the engine generates it; no volume
        return f"{MODELS_MOUNT}/{base_model.split(':', 1)[1]}"
    return base_model


def _in_area(ns: str, path: str) -> str:
    """A dataset field as the engine reads it: inside its namespace's area; an s3:// object is the
    copy its staging Job left there (operator/transfers.py)."""
    return posixpath.join(ns, staged_relpath(path) if sources.is_remote(path) else path)


def engine_task_document(task: FineTuneTask, basemodel: dict | None = None) -> dict:
    """One member as the engine reads it: the same FineTuneTask schema, its dataset path inside its
    own namespace's area (relative to --data-root); the engine puts the output under <output>/<ns>/."""
    ns = task.metadata.namespace or "default"
    spec = task.spec.model_copy(deep=True)
    spec.base_model = resolve_base_model(spec.base_model, basemodel)
    spec.dataset.path = _in_area(ns, spec.dataset.path)
    if spec.dataset.validation_path is not None:
        spec.dataset.validation_path = _in_area(ns, spec.dataset.validation_path)
    meta = {"name": task.metadata.name, "namespace": ns}
    if task.metadata.uid:
        meta["uid"] = task.metadata.uid
    return {"apiVersion": API_VERSION, "kind": "FineTuneTask", "metadata": meta,
            "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True)}


def tasks_yaml(tasks: list[FineTuneTask], basemodel: dict | None = None) -> str:
    docs = [engine_task_document(t, basemodel)
            for t in sorted(tasks, key=lambda t: (t.metadata.namespace or "", t.metadata.name))]
    return yaml.safe_dump_all(docs, sort_keys=True) if docs else ""


def configmap_current(group: dict, cm: dict | None, text: str, key: bytes) -> bool:
    """The ConfigMap already holds ``text`` with a signature that verifies for this group."""
    data = (cm or {}).get("data") or {}
    if data.get(TASKS_FILE) != text:
        return False
    try:
        trust.verify_tasks(key, group["metadata"]["name"], text.encode(), data.get(SIG_FILE))
    except trust.TrustError:
        return False
    return True


def configmap_tampered(group: dict, cm: dict | None, key: bytes) -> str | None:
    """Why an existing ConfigMap is not what the operator wrote (its own signature fails), or None.

    An outdated but intact one (membership changed) verifies; an edit by someone else does not."""
    if cm is None:
        return None
    data = cm.get("data") or {}
    try:
        trust.verify_tasks(key, group["metadata"]["name"], (data.get(TASKS_FILE) or "").encode(), data.get(SIG_FILE))
    except trust.TrustError as e:
        return str(e)
    return None


def configmap_manifest(group: dict, tasks: list[FineTuneTask], key: bytes, revision: int,
                       basemodel: dict | None = None) -> dict:
    name = group["metadata"]["name"]
    text = tasks_yaml(tasks, basemodel)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(name),
            "namespace": group["metadata"]["namespace"],
            "labels": group_labels(name),
            "ownerReferences": [owner_reference(group)],
        },
        "data": {TASKS_FILE: text, SIG_FILE: trust.sign_tasks(key, name, revision, text)},
    }


def next_revision(cm: dict | None, now_ms: int) -> int:
    """Above the ConfigMap's last revision, and above any earlier one as long as clocks move on
    (a deleted ConfigMap or a new leader must not go back: the engine refuses older revisions)."""
    env = trust.read_signature(((cm or {}).get("data") or {}).get(SIG_FILE)) or {}
    old = env.get("revision") if isinstance(env.get("revision"), int) else 0
    return max(old + 1, now_ms)


# --------------------------------------------------------------------------- Secret, ServiceAccount, PDB

def key_secret_manifest(group: dict, key: bytes) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": key_secret_name(group),
            "namespace": group["metadata"]["namespace"],
            "labels": group_labels(group["metadata"]["name"]),
            "ownerReferences": [owner_reference(group)],
        },
        "type": "Opaque",
        "stringData": {KEY_FILE: key.decode()},
    }


def engine_service_account_manifest(namespace: str, name: str) -> dict:
    """No RoleBinding names it and its token is never mounted: engine pods have no API rights."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "automountServiceAccountToken": False,
    }


def pdb_manifest(group: dict) -> dict:
    name = group["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": name,
            "namespace": group["metadata"]["namespace"],
            "labels": group_labels(name),
            "ownerReferences": [owner_reference(group)],
        },
        # minAvailable as a pod count, not maxUnavailable 0: with maxUnavailable (or a percentage)
        # the disruption controller asks the pods' controller, a BackboneGroup, for its scale, which
        # it has none of (CalculateExpectedPodCountFailed); an integer needs only the pods
        "spec": {"minAvailable": pods_of(group),
                 "selector": {"matchLabels": {LABEL_GROUP: name, LABEL_COMPONENT: "engine"}}},
    }


def pods_of(group: dict) -> int:
    """A group runs dp pods (each tp x pp GPUs)."""
    return int(((group.get("spec") or {}).get("parallelism") or {}).get("dp", 1))


def pod_manifest(group: dict, rank: int, config: OperatorConfig, basemodel: dict | None = None,
                 priority: int | None = None) -> dict:
    name = group["metadata"]["name"]
    return podspec.pod_manifest(group, rank, config, basemodel, labels=engine_labels(name),
                                owner=owner_reference(group), priority=priority)


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
            "ports": [{"name": "metrics", "port": config.engine_metrics_port, "targetPort": "metrics", "protocol": "TCP"},
                      # the engine's OpenAI API, where the group serves (spec.serving): <group>.<ns>.svc:8000
                      {"name": "serving", "port": SERVING_PORT, "targetPort": SERVING_PORT, "protocol": "TCP"}],
        },
    }


