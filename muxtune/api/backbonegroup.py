"""BackboneGroup: tasks multiplexed over one backbone in one set of pods. Written by the operator."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from muxtune.api.meta import API_VERSION, ApiModel, Condition, ObjectMeta


class Parallelism(ApiModel):
    """How the backbone is split across GPUs (dp x tp x pp GPUs in all)."""

    dp: int = Field(default=1, ge=1, description="Data-parallel replicas.")
    tp: int = Field(default=1, ge=1, description="Tensor-parallel degree.")
    pp: int = Field(default=1, ge=1, description="Pipeline stages.")

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


class MemberTask(ApiModel):
    """A FineTuneTask packed into the group."""

    name: str = Field(description="FineTuneTask name.")
    namespace: str = Field(description="FineTuneTask namespace.")
    uid: str | None = Field(default=None, description="FineTuneTask UID (guards against a re-created namesake).")


class GroupServing(ApiModel):
    """The group's engine serves its members' adapters (those with spec.serving.enabled)."""

    port: int = Field(default=8000, ge=1, le=65535, description="Port of the engine's OpenAI-compatible API.")
    slo_ttft_ms: float = Field(gt=0, description="Strictest time-to-first-token SLO of the serving members (ms).")
    slo_tpot_ms: float = Field(gt=0, description="Strictest time-per-output-token SLO of the serving members (ms).")


class BackboneGroupSpec(ApiModel):
    """Which tasks share the backbone and the GPUs they run on."""

    base_model: str = Field(description="Backbone shared by every member (FineTuneTask.spec.baseModel).")
    tasks: list[MemberTask] = Field(default_factory=list, description="Member tasks.")
    gpus_per_pod: int = Field(default=1, ge=0, description="nvidia.com/gpu requested per pod (0: CPU).")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Data, tensor and pipeline parallelism.")
    gpu_product: str | None = Field(default=None, description="Node GPU product the plan was sized for.")
    token_budget: int | None = Field(default=None, gt=0, description=(
        "The engine's --token-budget: real tokens one round fuses per replica; the tasks beyond it take turns. "
        "Chosen by the planner with the layout, from the memory left once weights and adapter state are counted."))
    recompute: bool | None = Field(default=None, description=(
        "The engine's --recompute: activation checkpointing per decoder layer, so a larger budget fits the same GPUs."))
    gpu_memory_fraction: float | None = Field(default=None, gt=0, lt=1, description=(
        "Set when the group runs on a shared GPU (one time-sliced replica, nvidia.com/gpu.shared, with other groups): "
        "its share of the GPU's memory, the engine's --gpu-memory-fraction."))
    serving: GroupServing | None = Field(
        default=None, description="Set when a member has spec.serving.enabled: the engine's pods start with the API open."
    )


class BackboneGroupStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Literal["Pending", "Running", "Degraded", "Succeeded", "Failed"] = Field(
        default="Pending", description="Pending, Running, Degraded, Succeeded or Failed."
    )
    pods: list[str] = Field(default_factory=list, description="Names of the group's pods.")
    ready_pods: int = Field(default=0, description="Pods that are ready.")
    pods_ready: str | None = Field(default=None, description="Pods ready / pods of the group, e.g. 1/2, for kubectl get.")
    layout: str | None = Field(default=None, description="Parallel layout, e.g. dp2 x tp1 x pp1: dp pods of tp x pp GPUs.")
    restarts: int | None = Field(
        default=None, ge=0, description="Whole-group restarts after a lost or failed pod (all pods recreated together)."
    )
    task_count: int | None = Field(default=None, ge=0, description="Member tasks (len(spec.tasks)), for kubectl get.")
    gpus: int | None = Field(default=None, ge=0, description="GPUs allocated to the group across all its pods, for kubectl get.")
    memory_planned_bytes: int | None = Field(default=None, description="GPU memory the planner budgeted for the group, in bytes.")
    token_budget: int | None = Field(default=None, description="The token budget the group's engine runs with (spec.tokenBudget).")
    recompute: bool | None = Field(default=None, description="Whether the group's engine recomputes activations (spec.recompute).")
    gpu_memory_fraction: float | None = Field(default=None, description=(
        "The group's share of a GPU it shares with other groups (spec.gpuMemoryFraction); absent on whole GPUs."))
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations.")
    observed_generation: int | None = Field(default=None, description="Generation the status reflects.")


class BackboneGroup(ApiModel):
    """Tasks multiplexed over one backbone in one set of pods; written by the operator."""

    api_version: Literal["muxtune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["BackboneGroup"] = "BackboneGroup"
    metadata: ObjectMeta
    spec: BackboneGroupSpec
    status: BackboneGroupStatus | None = None
