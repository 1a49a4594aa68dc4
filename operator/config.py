"""Operator settings: filled by `muxtune operator` flags (or env when run under `kopf run`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from muxtune.operator.memory import MemoryConfig
from muxtune.operator.planner import PlannerConfig

MANAGED_BY = "muxtune-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_GROUP = "muxtune.io/group"
ENGINE_APP = "muxtune-engine"  # the chart's PodMonitor selects app.kubernetes.io/name=muxtune-engine
# On an engine pod: where the operator polls /v1/status instead of http://<podIP>:<port>. Needed
# where pod IPs are not reachable (kwok's fake IPs; an operator run on a laptop):
#   kubectl port-forward pod/<group>-0 9400:9400 &
#   kubectl annotate pod <group>-0 muxtune.io/engine-endpoint=http://127.0.0.1:9400
ANN_ENDPOINT = "muxtune.io/engine-endpoint"
ANN_GPU_MEMORY = "muxtune.io/gpu-memory-mib"
ANN_TENANCY = "muxtune.io/tenancy"
ANN_POD_TEMPLATE = "muxtune.io/pod-template-hash"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

TASKS_MOUNT = "/etc/muxtune/tasks"
TASKS_FILE = "tasks.yaml"
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
    engine_image: str = "ghcr.io/muxtune/engine:0.1.0"
    engine_image_pull_policy: str = "IfNotPresent"
    engine_metrics_port: int = 9400
    engine_cpu_request: str = "2"
    engine_memory_request: str = "16Gi"
    data_pvc: str | None = None
    data_host_path: str | None = None
    output_pvc: str | None = None
    output_host_path: str | None = None
    poll_interval: float = 10.0
    poll_timeout: float = 3.0
    # Poll engines at their pod IP. Pods on kwok nodes (fake IPs) are never polled at the IP;
    # only a muxtune.io/engine-endpoint annotation is used there.
    poll_pod_ip: bool = True
    debounce: float = 0.3
    api_concurrency: int = 16  # API writes in flight at once
    resync_interval: float = 30.0
    max_tasks_per_group: int = 32
    # 1 until the engine averages gradients across pods; the engine refuses WORLD_SIZE > 1
    max_dp: int = 1
    activation_factor: float = 17.0
    log_level: str = "info"
    kubeconfig: str | None = None

    def planner_config(self) -> PlannerConfig:
        return PlannerConfig(
            sharing_policy=self.sharing_policy,
            shared_namespace=self.shared_namespace,
            max_tasks_per_group=self.max_tasks_per_group,
            max_dp=self.max_dp,
            memory=MemoryConfig(activation_factor=self.activation_factor),
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
        for name in ("data_pvc", "data_host_path", "output_pvc", "output_host_path", "kubeconfig"):
            v = _env(name.upper())
            if v:
                setattr(c, name, v)
        for name, conv in (("metrics_port", int), ("engine_metrics_port", int), ("poll_interval", float),
                           ("max_tasks_per_group", int), ("debounce", float)):
            v = _env(name.upper())
            if v:
                setattr(c, name, conv(v))
        if _env("POLL_POD_IP") in ("0", "false", "no"):
            c.poll_pod_ip = False
        return c
