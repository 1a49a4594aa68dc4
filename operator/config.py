"""Operator settings: filled by `muxtune operator` flags (or env when run under `kopf run`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from muxtune.facts.data_limits import DEFAULT_MAX_FILE_BYTES
from muxtune.operator.memory import MemoryConfig
from muxtune.operator.planner import PlannerConfig

MANAGED_BY = "muxtune-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_GROUP = "muxtune.io/group"
ENGINE_APP = "muxtune-engine"  # the chart's PodMonitor selects app.kubernetes.io/name=muxtune-engine
# On an engine pod: where the operator polls /v1/status instead of http://<podIP>:<port>, honoured
# ONLY when the operator runs with --dev-endpoint-annotation (tests, kwok, a laptop): anyone who
# may annotate pods could otherwise point the operator at any URL. Needed where pod IPs are not
# reachable (kwok's fake IPs; an operator run on a laptop):
#   kubectl port-forward pod/<group>-0 9400:9400 &
#   kubectl annotate pod <group>-0 muxtune.io/engine-endpoint=http://127.0.0.1:9400
ANN_ENDPOINT = "muxtune.io/engine-endpoint"
# On a shared BackboneGroup: the member namespaces whose data and output areas its pods mount
ANN_NAMESPACES = "muxtune.io/namespaces"
ANN_PRIORITY = "muxtune.io/priority"
ANN_GPU_MEMORY = "muxtune.io/gpu-memory-mib"
ANN_TENANCY = "muxtune.io/tenancy"
ANN_POD_TEMPLATE = "muxtune.io/pod-template-hash"
# On a pod: the token budget (and "+recompute") its engine was started with; a group whose budget the
# planner lowered before its first step restarts the pods that run with another
ANN_ENGINE_BUDGET = "muxtune.io/engine-budget"
SERVING_PORT = 8000  # the engine's OpenAI-compatible API in a pod of a group that serves
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue's plain-pod group integration (devcluster/kueue_objects.py documents what each does)
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"
KUEUE_API = "kueue.x-k8s.io/v1beta2"  # Workloads; a pod group's Workload is named after the group
# On a BackboneGroup: the LocalQueue its pods name (fixed when it is created; a task joins only a
# group of its own queue), and its whole-group restarts after a lost pod
ANN_QUEUE = "muxtune.io/queue-name"
ANN_RESTARTS = "muxtune.io/restarts"
ANN_RESTARTED_AT = "muxtune.io/restarted-at"
ANN_RESTART_REASON = "muxtune.io/restart-reason"
RENDEZVOUS_PORT = 29500  # torch.distributed's store on pod 0 (PET_MASTER_PORT)
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
# Time-sliced GPUs (NVIDIA device plugin sharing.timeSlicing with renameByDefault: docs/OPERATOR.md):
# a node advertises replicas of its GPUs under this name and labels how many replicas a GPU has
GPU_SHARED_RESOURCE = "nvidia.com/gpu.shared"
GPU_REPLICAS_LABEL = "nvidia.com/gpu.replicas"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

TASKS_MOUNT = "/etc/muxtune/tasks"
TASKS_FILE = "tasks.yaml"
KEY_MOUNT = "/etc/muxtune/key"
KEY_FILE = "key"
SERVING_TOKENS_MOUNT = "/etc/muxtune/serving"  # sha256(token) -> namespace of a serving group (operator/isolation.py)
SERVING_TOKENS_FILE = "tokens.json"
OUTPUT_MOUNT = "/output"
DATA_MOUNT = "/data"
MODELS_MOUNT = "/models"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MUXTUNE_OPERATOR_{name}", default)


@dataclass
class OperatorConfig:
    namespaces: list[str] = field(default_factory=list)  # empty: cluster-wide
    sharing_policy: Literal["never", "opt-in", "always"] = "opt-in"
    shared_namespace: str = "muxtune-system"  # where groups shared by several namespaces live
    metrics_port: int = 8080
    operator_namespace: str = "muxtune-system"  # where the operator's pods run (they poll engines' metrics port)
    monitoring_namespace: str | None = None  # Prometheus's namespace: it alone (and the operator) reaches metrics ports
    engine_image: str = "ghcr.io/muxtune/engine:0.1.0"
    engine_image_pull_policy: str = "IfNotPresent"
    engine_metrics_port: int = 9400
    engine_cpu_request: str = "2"
    engine_memory_request: str = "16Gi"
    engine_limits: dict[str, str] = field(default_factory=dict)  # e.g. {"memory": "32Gi"}
    engine_service_account: str = "muxtune-engine"  # created (no bindings, no token) where missing
    engine_image_pull_secrets: list[str] = field(default_factory=list)
    engine_tolerations: list[dict] = field(default_factory=list)
    engine_node_selector: dict[str, str] = field(default_factory=dict)
    engine_affinity: dict = field(default_factory=dict)
    # [{"minPriority": 500, "className": "muxtune-high"}, ...]: a group's pods get the class of the
    # highest band its members' spec.priority reaches when the pods are created
    engine_priority_classes: list[dict] = field(default_factory=list)
    engine_pdb: bool = True  # a PodDisruptionBudget per group (voluntary evictions wait)
    # When GPUs are short, namespaces get GPUs in proportion to these weights (default 1):
    # operator/fairshare.py; a higher-priority task preempts a lower-priority group
    namespace_weights: dict[str, float] = field(default_factory=dict)
    # the least spec.serving.sloTtftMs / sloTpotMs a task may ask for (operator/slofloor.py)
    min_slo_ttft_ms: float | None = None
    min_slo_tpot_ms: float | None = None
    # Storage: one shared volume with a subPath per namespace (data_pvc / data_host_path), or a claim
    # per namespace (data_pvc_per_namespace: the claim of that name in the group's namespace; for a
    # shared group, "<name>-<namespace>" in the shared namespace). Pods mount only the areas of
    # their members' namespaces.
    data_pvc: str | None = None
    data_host_path: str | None = None
    data_pvc_per_namespace: str | None = None
    output_pvc: str | None = None
    output_host_path: str | None = None
    output_pvc_per_namespace: str | None = None
    # Staging, export and model-cache Jobs (operator/transfers.py): torch-free, so the operator's image
    transfer_image: str = "ghcr.io/muxtune/operator:0.1.0"
    # the volume hf:// and s3:// BaseModels are staged into once (read-write for their Jobs only;
    # groups mount the model's directory in it read-only)
    model_cache_pvc: str | None = None
    # the largest s3:// object a staging Job copies (a task's dataset.maxBytes may ask less, not more);
    # engine pods are told it too, so they read what was staged
    max_dataset_bytes: int = DEFAULT_MAX_FILE_BYTES
    # engines of tasks with training.reportTo mlflow report here (MLFLOW_TRACKING_URI)
    mlflow_tracking_uri: str | None = None
    # Without output storage the operator refuses to start (adapters would die with their pod),
    # unless this says the cluster is a throwaway one (an emptyDir per pod).
    ephemeral_output: bool = False
    poll_interval: float = 10.0
    poll_timeout: float = 3.0
    # Poll engines at their pod IP. Pods on kwok nodes (fake IPs) are never polled at the IP.
    poll_pod_ip: bool = True
    # Development only: poll at a pod's muxtune.io/engine-endpoint annotation (see ANN_ENDPOINT).
    dev_endpoint_annotation: bool = False
    unreachable_after: int = 3  # failed polls in a row before EngineReachable=False
    # master key of the per-group HMAC keys (muxtune/facts/trust.py); None: a random key per process
    signing_key_file: str | None = None
    # bearer token of the engines' /metrics and /v1/status (operator/keys.py), read from the file
    # when the operator starts; None: engines' status ports take no token (unit tests; a running
    # operator always has one, random per process without the file)
    status_token_file: str | None = None
    status_token: str | None = None
    pod_backoff_base: float = 2.0  # seconds; doubled per refused pod creation, per group
    pod_backoff_cap: float = 300.0
    leader_elect: bool = True
    lease_name: str = "muxtune-operator"
    lease_duration: float = 15.0
    lease_renew_interval: float = 2.0
    debounce: float = 0.3
    api_concurrency: int = 16  # API writes in flight at once
    resync_interval: float = 30.0
    max_tasks_per_group: int = 32
    # Data-parallel pods the planner may give a group, used only when no single-pod layout fits a
    # task (a step too big for one node's GPUs): up to 8 pods. Replicas all-reduce only the adapters'
    # gradients (MBs), so they scale; beyond 8 a step's batch (typically 8-64 sequences) leaves each
    # replica too few sequences, and a gang of more pods is harder to place at once.
    max_dp: int = 8
    max_group_restarts: int = 6  # whole-group restarts (lost or failed pod) before the tasks fail
    # Repack passes (operator/repacker.py): after tasks finish, whole groups are drained into others
    # of their class through checkpoints; at most this many moves a pass, passes this many seconds
    # apart, and a moved task is not moved again for repack_task_cooldown seconds. 0 moves: off.
    repack_max_moves: int = 8
    repack_interval: float = 60.0
    repack_task_cooldown: float = 600.0
    activation_scale: float = 1.0  # multiplies the memory model's activations (operator/memory.py)
    log_level: str = "info"
    kubeconfig: str | None = None

    def planner_config(self) -> PlannerConfig:
        return PlannerConfig(
            sharing_policy=self.sharing_policy,
            shared_namespace=self.shared_namespace,
            max_tasks_per_group=self.max_tasks_per_group,
            max_dp=self.max_dp,
            memory=MemoryConfig(activation_scale=self.activation_scale),
        )

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """For `kopf run -m muxtune.operator.handlers`: MUXTUNE_OPERATOR_* variables."""
        c = cls()
        ns = _env("NAMESPACES")
        if ns:
            c.namespaces = [n for n in ns.split(",") if n]
        c.sharing_policy = _env("SHARING_POLICY", c.sharing_policy)  # type: ignore[assignment]
        c.shared_namespace = _env("SHARED_NAMESPACE") or os.environ.get("POD_NAMESPACE") or c.shared_namespace
        c.engine_image = _env("ENGINE_IMAGE", c.engine_image) or c.engine_image
        for name in ("data_pvc", "data_host_path", "output_pvc", "output_host_path", "kubeconfig",
                     "data_pvc_per_namespace", "output_pvc_per_namespace", "signing_key_file",
                     "transfer_image", "model_cache_pvc", "mlflow_tracking_uri", "status_token_file"):
            v = _env(name.upper())
            if v:
                setattr(c, name, v)
        from muxtune.operator.keys import load_status_token

        c.status_token = load_status_token(c.status_token_file)
        for name, conv in (("metrics_port", int), ("engine_metrics_port", int), ("poll_interval", float),
                           ("max_dataset_bytes", int),
                           ("max_tasks_per_group", int), ("debounce", float)):
            v = _env(name.upper())
            if v:
                setattr(c, name, conv(v))
        if _env("POLL_POD_IP") in ("0", "false", "no"):
            c.poll_pod_ip = False
        if _env("DEV_ENDPOINT_ANNOTATION") in ("1", "true", "yes"):
            c.dev_endpoint_annotation = True
        if _env("LEADER_ELECT") in ("0", "false", "no"):
            c.leader_elect = False
        return c

    def output_problem(self) -> str | None:
        """Why this configuration would lose adapters, or None (persistent output, or ephemeral by choice)."""
        if self.output_pvc or self.output_host_path or self.output_pvc_per_namespace or self.ephemeral_output:
            return None
        return ("no persistent output storage: set --output-pvc, --output-pvc-per-namespace or --output-host-path "
                "(the chart's engine.output), or --ephemeral-output for a throwaway cluster whose adapters may be lost")

    @property
    def watched(self) -> set[str] | None:
        """Namespaces the operator may act in (None: every namespace)."""
        return (set(self.namespaces) | {self.shared_namespace}) if self.namespaces else None
