"""The planner's inputs and outputs: what it is asked (pending tasks, groups, GPU nodes, settings)
and what it answers (a Plan). Plain frozen dataclasses; operator/planner.py decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from muxtune.facts.budget import DEFAULT_TOKEN_BUDGET
from muxtune.operator.memory import MiB, MemoryConfig, Parallelism, TaskShape

SHARED = None  # tenancy of a group open to several namespaces
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class TaskRequest:
    namespace: str
    name: str
    base_model: str
    shape: TaskShape = TaskShape()
    priority: int = 0
    created: str = ""  # RFC 3339 creationTimestamp; sorts lexicographically
    share: bool = False
    uid: str = ""
    queue: str = ""  # Kueue LocalQueue (task label, else its namespace's): groups of one queue only

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_task(cls, task, namespace_labels: Mapping[str, str] | None = None) -> TaskRequest:
        """From a muxtune.api FineTuneTask (and its namespace's labels, for a namespace-wide queue)."""
        spec, meta = task.spec, task.metadata
        extra = meta.model_extra or {}
        created = extra.get("creationTimestamp") or ""
        queue = (meta.labels or {}).get(QUEUE_LABEL) or (namespace_labels or {}).get(QUEUE_LABEL) or ""
        return cls(
            queue=queue,
            namespace=meta.namespace or "default",
            name=meta.name,
            uid=meta.uid or "",
            base_model=spec.base_model,
            priority=spec.priority,
            created=str(created),
            share=spec.share_across_namespaces,
            shape=TaskShape(
                method=spec.peft.method,
                r=spec.peft.r,
                target_modules=tuple(spec.peft.target_modules),
                feedforward_modules=tuple(spec.peft.feedforward_modules),
                num_virtual_tokens=spec.peft.virtual_tokens,
                batch_size=spec.training.batch_size,
                max_seq_len=spec.dataset.max_seq_len,
            ),
        )


@dataclass(frozen=True)
class NodeInfo:
    name: str
    gpus_allocatable: int
    gpus_free: int
    gpu_memory_mib: int
    gpu_product: str = ""
    # GPU sharing (MuxServe-style, docs/OPERATOR.md): the device plugin's time-slicing replicas per
    # GPU, advertised as nvidia.com/gpu.shared; a group on one gets 1/gpu_slices of a GPU's memory
    gpu_slices: int = 0
    slices_free: int = 0

    @property
    def gpu_class(self) -> tuple[str, int]:
        return (self.gpu_product, self.gpu_memory_mib)

    @property
    def slice_class(self) -> tuple[str, str, int, int]:
        return ("slice", self.gpu_product, self.gpu_memory_mib, self.gpu_slices)


@dataclass(frozen=True)
class GroupState:
    name: str
    namespace: str
    base_model: str
    tenancy: str | None  # a namespace, or None (SHARED)
    parallelism: Parallelism
    gpu_memory_mib: int
    gpu_product: str = ""
    members: tuple[TaskRequest, ...] = ()
    unbound_pods: int = 0  # pods created but not yet bound to a node (their GPUs are not in gpus_free)
    accepting: bool = True  # False: failed or being torn down; never a hot-add target
    # a shared group's pods mount only these namespaces' data and output areas (fixed at creation):
    # a task of another namespace never joins it. None: no restriction (a namespace's own group).
    namespaces: frozenset[str] | None = None
    queue: str = ""  # the Kueue LocalQueue its pods name, fixed at creation
    # the engine's --token-budget and --recompute its pods run with (fixed at creation; a group
    # written before the planner chose budgets runs with the engine's default)
    token_budget: int = DEFAULT_TOKEN_BUDGET
    recompute: bool = False
    gpu_fraction: float = 1.0  # < 1: the group runs on a shared GPU slice (gpu_memory_mib is its share)
    # a member has run a step in this group (its engine said so): its budget is fixed. Before the
    # first step the planner may lower the budget to take in a task (its pods restart with the new
    # one; nothing is lost), so tasks that arrive over several passes pack as if planned at once.
    started: bool = True


@dataclass(frozen=True)
class PlannerConfig:
    # never: groups never mix namespaces; opt-in: tasks that both set spec.shareAcrossNamespaces
    # may share; always: any tasks with the same backbone may share.
    sharing_policy: Literal["never", "opt-in", "always"] = "opt-in"
    shared_namespace: str = "muxtune-system"
    max_tasks_per_group: int = 32
    # Data-parallel pods the planner may give a group, used only when no single-pod layout fits a
    # task (a step too big for one node's GPUs): up to 8 pods. Replicas all-reduce only the adapters'
    # gradients (MBs), so they scale; beyond 8 a step's batch (typically 8-64 sequences) leaves each
    # replica too few sequences, and a gang of more pods is harder to place at once.
    max_dp: int = 8
    memory: MemoryConfig = MemoryConfig()
    # Token budgets (the engine's --token-budget) a group may get: the largest that fits its GPUs
    # once its tasks' weights, adapter and optimizer state are counted; below target_token_budget
    # the group recomputes activations (--recompute) when that buys a larger budget. A group's
    # budget is never below its longest sequence.
    token_budgets: tuple[int, ...] = (32768, 16384, 8192, 4096, 2048, 1024, 512, 256)
    target_token_budget: int = DEFAULT_TOKEN_BUDGET
    # The speed band: a task with priority >= fast_priority never takes turns with itself: its
    # group's budget holds the whole step of each such member at once (it may cost more GPUs).
    fast_priority: int = 100


@dataclass(frozen=True)
class Placement:
    task: str
    group: str
    new_group: bool


@dataclass(frozen=True)
class Unplaceable:
    task: str
    reason: str  # CamelCase, used as condition reason
    message: str


@dataclass(frozen=True)
class GroupPlan:
    name: str
    namespace: str
    base_model: str
    tenancy: str | None
    parallelism: Parallelism
    gpu_product: str
    gpu_memory_mib: int
    members: tuple[str, ...]
    memory_per_gpu_bytes: int
    new: bool
    changed: bool  # members added in this plan
    queue: str = ""
    token_budget: int = DEFAULT_TOKEN_BUDGET  # the engine's --token-budget: tokens one round fuses per replica
    recompute: bool = False  # the engine's --recompute: activation checkpointing per decoder layer
    # < 1: one time-sliced GPU replica (nvidia.com/gpu.shared), shared with other groups; its engine
    # gets --gpu-memory-fraction and gpu_memory_mib is that share of the GPU's memory
    gpu_fraction: float = 1.0

    @property
    def shared_gpu(self) -> bool:
        return self.gpu_fraction < 1

    @property
    def gpus(self) -> int:
        return self.parallelism.gpus

    @property
    def gpus_per_pod(self) -> int:
        return self.parallelism.gpus_per_pod

    @property
    def pods(self) -> int:
        return self.parallelism.dp


@dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...]
    groups: tuple[GroupPlan, ...]
    unplaceable: tuple[Unplaceable, ...]
    gpus_allocated: int
    gpus_new: int
    lower_bound_gpus: int
    memory_used_bytes: int
    memory_allocated_bytes: int
    # the same bound with each (backbone, tenancy) class paying its own weights: what the sharing
    # policy allows at best (exact under "never"/"always"; under "opt-in" a sharing task could
    # also join its own namespace's groups, so there it is an estimate, not a bound)
    lower_bound_gpus_by_tenancy: int = 0
    # GPUs that only the weight copies (one per max_tasks_per_group tasks of a (backbone, tenancy)
    # class) and the adapter + optimizer state need: activations left out, as one token budget
    # bounds them (planner.floor_gpus)
    floor_gpus: int = 0
    gpu_slices: int = 0  # groups on shared GPU slices (their GPUs count once per whole GPU's worth)

    @property
    def new_groups(self) -> tuple[GroupPlan, ...]:
        return tuple(g for g in self.groups if g.new)

    @property
    def packing_efficiency(self) -> float:
        return self.memory_used_bytes / self.memory_allocated_bytes if self.memory_allocated_bytes else 0.0

    def placement_of(self, key: str) -> Placement | None:
        for p in self.placements:
            if p.task == key:
                return p
        return None

    def to_dict(self) -> dict:
        return {
            "placements": [p.__dict__ for p in self.placements],
            "groups": [
                {
                    "name": g.name,
                    "namespace": g.namespace,
                    "baseModel": g.base_model,
                    "shared": g.tenancy is None,
                    "new": g.new,
                    "gpus": g.gpus,
                    "gpusPerPod": g.gpus_per_pod,
                    "parallelism": {"dp": g.parallelism.dp, "tp": g.parallelism.tp, "pp": g.parallelism.pp},
                    "gpuProduct": g.gpu_product,
                    "gpuMemoryMiB": g.gpu_memory_mib,
                    "memoryPerGpuMiB": round(g.memory_per_gpu_bytes / MiB, 1),
                    "tokenBudget": g.token_budget,
                    "recompute": g.recompute,
                    "gpuMemoryFraction": g.gpu_fraction,
                    "members": list(g.members),
                }
                for g in self.groups
            ],
            "unplaceable": [u.__dict__ for u in self.unplaceable],
            "gpusAllocated": self.gpus_allocated,
            "gpusNew": self.gpus_new,
            "lowerBoundGpus": self.lower_bound_gpus,
            "lowerBoundGpusByTenancy": self.lower_bound_gpus_by_tenancy,
            "floorGpus": self.floor_gpus,
            "gpuSlices": self.gpu_slices,
            "packingEfficiency": round(self.packing_efficiency, 4),
        }
