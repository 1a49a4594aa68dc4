"""BaseModel: a cluster-scoped backbone the planner can size and pods can mount."""
from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from muxtune.api.meta import API_VERSION, ApiModel, ObjectMeta


class PvcSource(ApiModel):
    """Weights in a directory of a PersistentVolumeClaim."""

    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim holding the weights.")
    path: str = Field(default="", description="Directory inside the claim.")
    namespace: str | None = Field(default=None, description="Namespace of the claim (default: the task's).")


class HostPathSource(ApiModel):
    """Weights in a directory present on every GPU node."""

    path: str = Field(pattern=r"^/.*", description="Absolute directory on every GPU node.")


class ModelSource(ApiModel):
    """Exactly one of builtin, pvc, hostPath."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.builtin) ? 1 : 0) + (has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) == 1",
                    "message": "set exactly one of builtin, pvc, hostPath",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )

    builtin: str | None = Field(default=None, description="A built-in test model, e.g. tiny-llama.")
    pvc: PvcSource | None = Field(default=None, description="Weights in a PersistentVolumeClaim.")
    host_path: HostPathSource | None = Field(default=None, description="Weights in a directory on every GPU node.")

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
    num_attention_heads: int | None = Field(default=None, gt=0, description="Attention heads per block.")
    vocab_size: int | None = Field(default=None, gt=0, description="Tokenizer vocabulary size.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="bfloat16", description="Weight dtype at runtime.")


class BaseModelSpec(ApiModel):
    """Where a backbone's weights are and how big it is."""

    source: ModelSource = Field(description="Where the weights live: exactly one of builtin, pvc, hostPath.")
    architecture: Architecture | None = Field(
        default=None, description="Size figures; filled from config.json by the operator when absent."
    )


class BaseModelStatus(ApiModel):
    """Observed state, written by the operator."""

    ready: bool = Field(default=False, description="The weights were found and the size figures are known.")
    architecture: Architecture | None = Field(
        default=None, description="Size figures in use (from the spec or read from config.json)."
    )
    message: str | None = Field(default=None, description="Why the model is not ready.")


class BaseModelResource(ApiModel):
    """A cluster-scoped backbone that FineTuneTasks name as model:NAME."""

    api_version: Literal["muxtune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["BaseModel"] = "BaseModel"
    metadata: ObjectMeta
    spec: BaseModelSpec
    status: BaseModelStatus | None = None
