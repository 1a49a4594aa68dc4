"""BackboneGroup: tasks multiplexed over one backbone in one set of pods. Written by the operator."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from muxtune.api.meta import API_VERSION, ApiModel, Condition, ObjectMeta


class Parallelism(ApiModel):
    dp: int = Field(default=1, ge=1, description="Data-parallel replicas.")
    tp: int = Field(default=1, ge=1, description="Tensor-parallel degree.")
    pp: int = Field(default=1, ge=1, description="Pipeline stages.")

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


class MemberTask(ApiModel):
    name: str
    namespace: str
    uid: str | None = None


class BackboneGroupSpec(ApiModel):
    base_model: str = Field(description="Backbone shared by every member (FineTuneTask.spec.baseModel).")
    tasks: list[MemberTask] = Field(default_factory=list, description="Member tasks.")
    gpus_per_pod: int = Field(default=1, ge=0, description="nvidia.com/gpu requested per pod (0: CPU).")
    parallelism: Parallelism = Field(default_factory=Parallelism)
    gpu_product: str | None = Field(default=None, description="Node GPU product the plan was sized for.")
    token_budget: int | None = Field(default=None, gt=0, description="Tokens fused per step before tasks take turns.")


class BackboneGroupStatus(ApiModel):
    phase: Literal["Pending", "Running", "Degraded", "Succeeded", "Failed"] = "Pending"
    pods: list[str] = Field(default_factory=list)
    ready_pods: int = 0
    memory_planned_bytes: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class BackboneGroup(ApiModel):
    api_version: Literal["muxtune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["BackboneGroup"] = "BackboneGroup"
    metadata: ObjectMeta
    spec: BackboneGroupSpec
    status: BackboneGroupStatus | None = None
