"""BaseModel: a cluster-scoped backbone the planner can size and pods can mount."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from muxtune.api.meta import API_VERSION, ApiModel, ObjectMeta


class PvcSource(ApiModel):
    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim holding the weights.")
    path: str = Field(default="", description="Directory inside the claim.")
    namespace: str | None = Field(default=None, description="Namespace of the claim (default: the task's).")


class HostPathSource(ApiModel):
    path: str = Field(pattern=r"^/.*", description="Absolute directory on every GPU node.")


class ModelSource(ApiModel):
    """Exactly one of builtin, pvc, hostPath."""

    builtin: str | None = Field(default=None, description="A built-in test model, e.g. tiny-llama.")
    pvc: PvcSource | None = None
    host_path: HostPathSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if sum(x is not None for x in (self.builtin, self.pvc, self.host_path)) != 1:
            raise ValueError("set exactly one of builtin, pvc, hostPath")
        return self


class Architecture(ApiModel):
    """Figures the planner's memory model needs; read from config.json when absent."""

    parameters: int = Field(gt=0, description="Backbone parameter count.")
    layers: int = Field(gt=0, description="Transformer blocks.")
    hidden_size: int = Field(gt=0, description="Model width.")
    num_attention_heads: int | None = Field(default=None, gt=0)
    vocab_size: int | None = Field(default=None, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="bfloat16", description="Weight dtype at runtime.")


class BaseModelSpec(ApiModel):
    source: ModelSource = Field(description="Where the weights live.")
    architecture: Architecture | None = Field(
        default=None, description="Size figures; filled from config.json by the operator when absent."
    )


class BaseModelStatus(ApiModel):
    ready: bool = False
    architecture: Architecture | None = None
    message: str | None = None


class BaseModelResource(ApiModel):
    api_version: Literal["muxtune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["BaseModel"] = "BaseModel"
    metadata: ObjectMeta
    spec: BaseModelSpec
    status: BaseModelStatus | None = None
