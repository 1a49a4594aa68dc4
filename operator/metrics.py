"""The operator's Prometheus metrics, in their own registry, served on --metrics-port (8080).

| metric | type | meaning |
| --- | --- | --- |
| muxtune_operator_tasks{namespace,phase} | gauge | FineTuneTasks by phase (namespaces the operator watches: bounded) |
| muxtune_operator_groups | gauge | BackboneGroups that exist |
| muxtune_operator_gpus_requested | gauge | nvidia.com/gpu requested by the groups' pods (bound or not) |
| muxtune_operator_gpus_allocated | gauge | nvidia.com/gpu of the groups' pods that a node has bound |
| muxtune_operator_gpus_lower_bound | gauge | the planner's lower bound on GPUs for the placed tasks |
| muxtune_operator_gpus_lower_bound_by_tenancy | gauge | the same with each (backbone, namespace or shared) class holding its own weights |
| muxtune_operator_packing_efficiency_ratio | gauge | planned GPU memory in use / GPU memory allocated to groups (0-1) |
| muxtune_operator_reconcile_duration_seconds | histogram | one reconcile pass (plan + apply + status) |
| muxtune_operator_reconcile_errors_total | counter | reconcile passes or API writes that failed |
| muxtune_operator_planner_duration_seconds | histogram | one planner run (pure computation) |
| muxtune_operator_time_to_running_seconds | histogram | task creation to its first Running status |
| muxtune_operator_api_requests_total{verb,resource} | counter | requests the operator's own client sent |
| muxtune_operator_leader | gauge | 1 while this replica is the leader (only the leader reconciles and writes) |
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

PHASES = ("Pending", "Placed", "Running", "Succeeded", "Failed", "Suspended")

TASKS = Gauge("muxtune_operator_tasks", "FineTuneTasks by phase.", ["namespace", "phase"], registry=REGISTRY)
GROUPS = Gauge("muxtune_operator_groups", "BackboneGroups that exist.", registry=REGISTRY)
GPUS_REQUESTED = Gauge("muxtune_operator_gpus_requested", "nvidia.com/gpu requested by BackboneGroup pods.", registry=REGISTRY)
GPUS_ALLOCATED = Gauge("muxtune_operator_gpus_allocated", "nvidia.com/gpu of BackboneGroup pods bound to a node.", registry=REGISTRY)
GPUS_LOWER_BOUND = Gauge("muxtune_operator_gpus_lower_bound", "Planner's lower bound on GPUs for the placed tasks.", registry=REGISTRY)
GPUS_LOWER_BOUND_TENANCY = Gauge("muxtune_operator_gpus_lower_bound_by_tenancy",
                                 "Lower bound on GPUs when each (backbone, tenancy) class holds its own weights.",
                                 registry=REGISTRY)
PACKING = Gauge("muxtune_operator_packing_efficiency_ratio", "Planned GPU memory in use / GPU memory allocated (0-1).", registry=REGISTRY)
RECONCILE = Histogram(
    "muxtune_operator_reconcile_duration_seconds", "Duration of one reconcile pass.", registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RECONCILE_ERRORS = Counter("muxtune_operator_reconcile_errors", "Failed reconcile passes or API writes.", registry=REGISTRY)
PLANNER = Histogram(
    "muxtune_operator_planner_duration_seconds", "Duration of one planner run.", registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
TIME_TO_RUNNING = Histogram(
    "muxtune_operator_time_to_running_seconds", "FineTuneTask creation to Running.", registry=REGISTRY,
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
LEADER = Gauge("muxtune_operator_leader", "1 while this replica holds the leader Lease (or runs without election).",
               registry=REGISTRY)
API_REQUESTS = Counter("muxtune_operator_api_requests", "Kubernetes API requests sent by the operator's client.",
                       ["verb", "resource"], registry=REGISTRY)

_seen_task_labels: set[tuple[str, str]] = set()


def set_task_counts(counts: dict[tuple[str, str], int]) -> None:
    """counts: (namespace, phase) -> n. Series that drop to zero are kept at 0, not removed."""
    for key in _seen_task_labels | set(counts):
        TASKS.labels(*key).set(counts.get(key, 0))
    _seen_task_labels.update(counts)


def serve(port: int, addr: str = "0.0.0.0"):
    """Start the /metrics HTTP server in a thread; returns (server, thread)."""
    return start_http_server(port, addr=addr, registry=REGISTRY)
