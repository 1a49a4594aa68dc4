"""FineTuneTask: one PEFT fine-tuning job, the object users `kubectl apply` and `muxtune run`.

The same model validates a local YAML file, the engine's task config and (through the
generated CRD) what the API server admits.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator

from muxtune.api.meta import API_VERSION, ApiModel, Condition, ObjectMeta, Timestamp

# builtin:NAME, model:NAME (a BaseModel resource), or a local directory (local runs only: the
# operator places builtin: and model: backbones; weights on a PVC are a BaseModel with source.pvc).
BASE_MODEL_PATTERN = (
    r"^(builtin:[a-z0-9][a-z0-9-]*"
    r"|model:[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
    r"|/.+|\./.+|\.\./.+)$"
)

PeftMethod = Literal["lora", "ia3"]
Phase = Literal["Pending", "Placed", "Running", "Succeeded", "Failed", "Suspended"]
# A module name (suffix-matched against the backbone's module paths). Bounded so the API server's
# CEL cost estimate for the feedforwardModules rule stays within budget.
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=253)]
MAX_MODULES = 64


# Where a task reads and writes is always inside an area the engine is given (the run's data root
# and output directory; in a cluster, the namespace's own areas): never absolute, never `..`.
MAX_PATH = 1024
RELATIVE_PATH_MESSAGE = "must be a relative path without '..' segments (it is resolved inside the {area})"


def relative_path_rules(area: str) -> dict:
    """CEL rules equal to check_relative_path, so the API server refuses what pydantic refuses."""
    msg = RELATIVE_PATH_MESSAGE.format(area=area)
    return {"x-kubernetes-validations": [
        {"rule": "!self.startsWith('/')", "message": msg, "reason": "FieldValueInvalid"},
        {"rule": "!self.matches('(^|/)[.][.](/|$)')", "message": msg, "reason": "FieldValueInvalid"},
    ]}


def check_relative_path(value: str | None, area: str) -> str | None:
    if value is not None and (value.startswith("/") or ".." in value.split("/")):
        raise ValueError(RELATIVE_PATH_MESSAGE.format(area=area))
    return value


def immutable(field: str) -> dict:
    """A CEL transition rule: the API server refuses an update that changes the field.

    A task's backbone, data, method and schedule define what its checkpoints mean; changing them
    under a running task would silently train something else (the way a Job's template is fixed).
    """
    return {"x-kubernetes-validations": [{
        "rule": "self == oldSelf",
        "message": f"{field} is immutable; delete the task and create it again to change it",
        "reason": "FieldValueInvalid",
    }]}


class DatasetSpec(ApiModel):
    """Where the training examples are and how to read them."""

    path: str = Field(
        min_length=1,
        max_length=MAX_PATH,
        json_schema_extra=relative_path_rules("data root"),
        description=(
            "JSON-lines file of examples, relative to the data root: `muxtune run --data-root` "
            "(default: the current directory), or the namespace's data area in a cluster."
        ),
    )
    format: Literal["jsonl"] = Field(default="jsonl", description="File format; jsonl is one JSON object per line.")
    prompt_field: str = Field(default="prompt", min_length=1, description="Key of the input text.")
    completion_field: str = Field(default="completion", min_length=1, description="Key of the target text.")
    max_seq_len: int = Field(
        default=512, gt=0, le=131072, description="Longer examples are truncated to this many tokens."
    )
    train_on_prompt: bool = Field(
        default=False, description="Also compute the loss on prompt tokens (default: completion only)."
    )
    shuffle: bool = Field(default=True, description="Reshuffle examples every epoch (seeded by training.seed).")

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        return check_relative_path(v, "data root")


class PeftSpec(ApiModel):
    """The parameter-efficient method and its hyperparameters."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.feedforwardModules) || self.feedforwardModules.all(m, "
                    "has(self.targetModules) && m in self.targetModules)",
                    "message": "feedforwardModules must also be in targetModules",
                    "fieldPath": ".feedforwardModules",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )

    method: PeftMethod = Field(default="lora", description="lora or ia3.")
    r: int = Field(default=8, gt=0, le=4096, description="LoRA rank.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=MAX_MODULES,
        description="Names of the backbone's linear layers the method adapts (suffix match).",
    )
    feedforward_modules: list[ModuleName] = Field(
        default_factory=list,
        max_length=MAX_MODULES,
        description="IA3 only: target modules whose input (not output) is rescaled.",
    )

    @model_validator(mode="after")
    def _ff_within_targets(self) -> PeftSpec:
        extra = set(self.feedforward_modules) - set(self.target_modules)
        if extra:
            raise ValueError(f"feedforwardModules {sorted(extra)} must also be in targetModules")
        return self


class TrainingSpec(ApiModel):
    """Optimisation settings; each task keeps its own optimizer and schedule."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.warmupSteps) || !has(self.maxSteps) || self.warmupSteps <= self.maxSteps",
                    "message": "warmupSteps must not exceed maxSteps",
                    "fieldPath": ".warmupSteps",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )

    max_steps: int = Field(gt=0, le=10_000_000, description="Optimizer steps to train for.")
    batch_size: int = Field(default=8, gt=0, le=65536, description="Sequences per optimizer step.")
    learning_rate: float = Field(gt=0, le=10, description="Peak learning rate (AdamW).")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="Decay after warmup: constant, linear or cosine to zero."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup from zero over this many steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float | None = Field(
        default=1.0,
        ge=0,
        description=(
            "Clip the task's gradient norm to this (0 or null: no clipping; write 0 with kubectl apply, "
            "which drops nulls)."
        ),
    )
    seed: int = Field(default=0, ge=0, description="Seeds adapter init, dropout and data order.")
    checkpoint_interval: int = Field(
        default=50, ge=0,
        description=(
            "Save a resumable checkpoint at least every N steps (0: only at the end); when one task is due, "
            "every task of its backbone is saved at the same round, so a restart replays the run exactly."
        ),
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSpec:
        if self.warmup_steps > self.max_steps:
            raise ValueError("warmupSteps must not exceed maxSteps")
        return self


class OutputSpec(ApiModel):
    """Where the adapter, checkpoints and metrics go."""

    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PATH,
        json_schema_extra=relative_path_rules("namespace's output area"),
        description=(
            "Directory for this task's output, relative to the namespace's output area "
            "<run output>/<namespace>/ (default: the task's name)."
        ),
    )

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        return check_relative_path(v, "namespace's output area")


class FineTuneTaskSpec(ApiModel):
    """What to train: backbone, data, PEFT method and optimisation settings."""

    base_model: str = Field(
        pattern=BASE_MODEL_PATTERN,
        json_schema_extra=immutable("baseModel"),
        description=(
            "The frozen backbone: builtin:NAME, model:NAME (a BaseModel resource; weights on a "
            "PVC or host path), or a local Hugging Face model directory (muxtune run only: the "
            "operator refuses it)."
        ),
    )
    dataset: DatasetSpec = Field(description="Training data.", json_schema_extra=immutable("dataset"))
    peft: PeftSpec = Field(
        default_factory=PeftSpec, description="PEFT method and hyperparameters.", json_schema_extra=immutable("peft")
    )
    training: TrainingSpec = Field(description="Optimisation settings.", json_schema_extra=immutable("training"))
    output: OutputSpec = Field(
        default_factory=OutputSpec, description="Where results are written.", json_schema_extra=immutable("output")
    )
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Higher runs first when GPUs are short."
    )
    suspend: bool = Field(default=False, description="Hold the task (or pause it) without deleting it.")
    share_across_namespaces: bool = Field(
        default=False,
        json_schema_extra=immutable("shareAcrossNamespaces"),
        description="Allow packing with tasks of other namespaces that also allow it.",
    )


class FineTuneTaskStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Phase = Field(default="Pending", description="Pending, Placed, Running, Succeeded, Failed or Suspended.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations.")
    group: str | None = Field(default=None, description="The BackboneGroup the task is packed into.")
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps to do.")
    progress: str | None = Field(default=None, description="step/total as text, for kubectl get.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    tokens_per_second: float | None = Field(default=None, description="Trained tokens per second.")
    checkpoint: str | None = Field(default=None, description="Latest checkpoint path.")
    message: str | None = Field(default=None, description="Why the task is in its phase.")
    start_time: Timestamp | None = Field(default=None, description="When the task started training.")
    completion_time: Timestamp | None = Field(default=None, description="When the task succeeded or failed.")
    observed_generation: int | None = Field(default=None, description="Generation the status reflects.")


class FineTuneTask(ApiModel):
    """One PEFT fine-tuning job over a shared, frozen backbone."""

    api_version: Literal["muxtune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["FineTuneTask"] = "FineTuneTask"
    metadata: ObjectMeta
    spec: FineTuneTaskSpec
    status: FineTuneTaskStatus | None = None

    @property
    def key(self) -> str:
        """Unique within a run or cluster: namespace/name."""
        return f"{self.metadata.namespace or 'default'}/{self.metadata.name}"
