"""FineTuneTask: one PEFT fine-tuning job, the object users `kubectl apply` and `muxtune run`.

The same model validates a local YAML file, the engine's task config and (through the
generated CRD) what the API server admits.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator

from muxtune.api import sources
from muxtune.api import peftrules
from muxtune.api.meta import API_VERSION, ApiModel, Condition, ObjectMeta, Timestamp
from muxtune.facts.methods import DEFAULT_METHOD, get_peft_method, peft_method_names

# builtin:NAME, model:NAME (a BaseModel resource), hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX/,
# or a local directory (the last three for local runs: the operator places builtin: and model:
# backbones; weights on a PVC, the Hub or in a bucket are a BaseModel with that source).
BASE_MODEL_PATTERN = (
    r"^(builtin:[a-z0-9][a-z0-9-]*"
    r"|model:[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
    rf"|{sources.HF_PATTERN[1:-1]}"
    rf"|{sources.S3_PREFIX_PATTERN[1:-1]}"
    r"|/.+|\./.+|\.\./.+)$"
)
REPORTERS = Literal["tensorboard", "mlflow"]

# The registered methods (muxtune.facts.methods), in registration order.
PeftMethod = Literal[peft_method_names()]  # type: ignore[valid-type]
Phase = Literal["Pending", "Placed", "Running", "Succeeded", "Failed", "Suspended"]
# A module name (suffix-matched against the backbone's module paths). Bounded so the API server's
# CEL cost estimate for the feedforwardModules rule stays within budget.
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=253)]
MAX_MODULES = 64
MAX_VIRTUAL_TOKENS = 4096
MAX_INIT_TEXT = 65536


# Where a task reads and writes is always inside an area the engine is given (the run's data root
# and output directory; in a cluster, the namespace's own areas): never absolute, never `..`.
MAX_PATH = 1024
RELATIVE_PATH_MESSAGE = "must be a relative path without '..' segments (it is resolved inside the {area})"


def relative_path_rules(area: str, remote: bool = False) -> dict:
    """CEL rules equal to check_relative_path, so the API server refuses what pydantic refuses;
    with remote, the value may instead be an s3://BUCKET/KEY URI."""
    msg = RELATIVE_PATH_MESSAGE.format(area=area)
    return {"x-kubernetes-validations": [
        {"rule": "!self.startsWith('/')", "message": msg, "reason": "FieldValueInvalid"},
        {"rule": "!self.matches('(^|/)[.][.](/|$)')", "message": msg, "reason": "FieldValueInvalid"},
        {"rule": "!self.matches('[[:cntrl:]]')", "message": CONTROL_CHARACTERS_MESSAGE, "reason": "FieldValueInvalid"},
        *([sources.s3_object_rule()] if remote else []),
    ]}


# A newline or escape in a path would break `kubectl get`'s table and log lines; no file needs one.
CONTROL_CHARACTERS_MESSAGE = "must not contain control characters (newline, tab, escape, ...)"


def check_relative_path(value: str | None, area: str, remote: bool = False) -> str | None:
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(CONTROL_CHARACTERS_MESSAGE)
    if remote and sources.is_remote(value):
        return sources.check_s3_object(value)
    if value is not None and (value.startswith("/") or ".." in value.split("/")):
        raise ValueError(RELATIVE_PATH_MESSAGE.format(area=area))
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(CONTROL_CHARACTERS_MESSAGE)
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


DatasetFormat = Literal["jsonl", "chat", "text", "parquet", "hf_disk"]
RowFormat = Literal["prompt_completion", "chat", "text"]
TABLE_FORMATS = ("parquet", "hf_disk")
MAX_CHAT_TEMPLATE = 65536


class DatasetSpec(ApiModel):
    """Where the training examples are and how to read them."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.rows) || (has(self.format) && self.format in ['parquet', 'hf_disk'])",
                    "message": "rows is for the table formats (parquet, hf_disk); jsonl, chat and text say their rows themselves",
                    "fieldPath": ".rows",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.format) || self.format != 'hf_disk' || (!self.path.startsWith('s3://') "
                    "&& (!has(self.validationPath) || !self.validationPath.startsWith('s3://')))",
                    "message": "hf_disk reads a directory; an s3:// dataset is one object (use jsonl, chat, text or parquet)",
                    "fieldPath": ".format",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.validationPath) || !has(self.validationSplit)",
                    "message": "set validationPath or validationSplit, not both",
                    "fieldPath": ".validationSplit",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    path: str = Field(
        min_length=1,
        max_length=MAX_PATH,
        json_schema_extra=relative_path_rules("data root", remote=True),
        description=(
            "The examples, relative to the data root: `muxtune run --data-root` (default: the current "
            "directory), or the namespace's data area in a cluster. A file, or for hf_disk the directory "
            "`datasets`' save_to_disk wrote. Or an object s3://BUCKET/KEY (not hf_disk): fetched with the "
            "standard AWS credential chain (AWS_ENDPOINT_URL for S3-compatible stores) by `muxtune run`, "
            "or by a staging Job with spec.credentialsSecret in a cluster."
        ),
    )
    format: DatasetFormat = Field(
        default="jsonl",
        description=(
            "jsonl: JSON lines with promptField and completionField (loss on the completion); "
            "chat: JSON lines in the OpenAI fine-tuning format {\"messages\": [{\"role\": "
            "system|user|assistant, \"content\": ...}]}, rendered with the chat template, loss on "
            "assistant turns only; text: JSON lines with textField, loss on every token, documents "
            "longer than maxSeqLen split into consecutive maxSeqLen-token sequences; parquet: a "
            "Parquet file, hf_disk: a Hugging Face save_to_disk directory (both read with the "
            "`datasets` library, each row laid out as `rows` says)."
        ),
    )
    rows: RowFormat | None = Field(
        default=None,
        description=(
            "parquet and hf_disk only: what each row holds: prompt_completion (the default; promptField "
            "and completionField), chat (messagesField) or text (textField)."
        ),
    )
    prompt_field: str = Field(default="prompt", min_length=1, description="Key of the input text.")
    completion_field: str = Field(default="completion", min_length=1, description="Key of the target text.")
    messages_field: str = Field(default="messages", min_length=1, description="chat rows: key of the message list.")
    text_field: str = Field(default="text", min_length=1, description="text rows: key of the document.")
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CHAT_TEMPLATE,
        description=(
            "chat rows: a Jinja chat template used instead of the tokenizer's own (as transformers' "
            "apply_chat_template takes it); saved with the adapter as chat_template.jinja."
        ),
    )
    max_seq_len: int = Field(
        default=512, gt=0, le=131072, description="Longer examples are truncated to this many tokens."
    )
    train_on_prompt: bool = Field(
        default=False, description="Also compute the loss on prompt tokens (default: completion only)."
    )
    shuffle: bool = Field(default=True, description="Reshuffle examples every epoch (seeded by training.seed).")
    validation_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PATH,
        json_schema_extra=relative_path_rules("data root", remote=True),
        description=(
            "Held-out examples in the same format as path, relative to the data root (or s3://BUCKET/KEY): "
            "their mean token loss (no gradients) is reported every training.evalInterval steps and at the end."
        ),
    )
    validation_split: float | None = Field(
        default=None,
        gt=0,
        le=0.5,
        description=(
            "Instead of validationPath: this fraction of the records of path is held out for evaluation "
            "(chosen by training.seed, the same records on every run) and not trained on."
        ),
    )

    max_bytes: int | None = Field(
        default=None,
        gt=0,
        description=(
            "In a cluster: the largest s3:// object the task's staging Job copies (path and validationPath), "
            "at most the operator's cap (the chart's transfer.maxDatasetBytes, default 1 GiB); a task asking "
            "more fails with the reason. Default: that cap. `muxtune run` uses --max-dataset-bytes."
        ),
    )

    @field_validator("path", "validation_path")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        return check_relative_path(v, "data root", remote=True)

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if self.format == "hf_disk" and (sources.is_remote(self.path) or sources.is_remote(self.validation_path)):
            raise ValueError("hf_disk reads a directory; an s3:// dataset is one object (use jsonl, chat, text or parquet)")
        if self.rows is not None and self.format not in TABLE_FORMATS:
            raise ValueError("rows is for the table formats (parquet, hf_disk); jsonl, chat and text say their rows themselves")
        if self.validation_path is not None and self.validation_split is not None:
            raise ValueError("set validationPath or validationSplit, not both")
        return self

    @property
    def row_format(self) -> str:
        """How each record reads, whatever the container: prompt_completion, chat or text."""
        if self.format in TABLE_FORMATS:
            return self.rows or "prompt_completion"
        return {"jsonl": "prompt_completion"}.get(self.format, self.format)

    @property
    def has_validation(self) -> bool:
        return self.validation_path is not None or self.validation_split is not None


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
                },
                *peftrules.cel_rules(default=DEFAULT_METHOD),
                {
                    "rule": "(has(self.promptTuningInit) && self.promptTuningInit == 'TEXT') == has(self.promptTuningInitText)",
                    "message": "promptTuningInit TEXT needs promptTuningInitText, and promptTuningInitText needs promptTuningInit TEXT",
                    "fieldPath": ".promptTuningInitText",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    method: PeftMethod = Field(
        default=DEFAULT_METHOD,
        description="lora (with useDora: DoRA), ia3 or prompt_tuning (targetModules, r, alpha and dropout are then unused).",
    )
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
    use_dora: bool = Field(
        default=False,
        description=(
            "LoRA only: weight-decomposed LoRA (DoRA, as PEFT's use_dora): a trained magnitude per output "
            "feature times the LoRA-updated weight's direction. Not under tensor parallelism."
        ),
    )
    num_virtual_tokens: int | None = Field(
        default=None, gt=0, le=MAX_VIRTUAL_TOKENS,
        description="prompt_tuning (required): trained virtual tokens prepended to each of the task's sequences.",
    )
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] | None = Field(
        default=None,
        description=(
            "prompt_tuning: how the virtual tokens start, as PEFT's prompt_tuning_init: RANDOM (the default), "
            "TEXT (the embeddings of promptTuningInitText's tokens, repeated to numVirtualTokens) or "
            "SAMPLE_VOCAB (embeddings of tokens drawn from the vocabulary, seeded by training.seed)."
        ),
    )
    prompt_tuning_init_text: str | None = Field(
        default=None, min_length=1, max_length=MAX_INIT_TEXT,
        description="prompt_tuning with promptTuningInit TEXT: the text whose token embeddings start the prompt.",
    )

    @model_validator(mode="after")
    def _ff_within_targets(self) -> PeftSpec:
        extra = set(self.feedforward_modules) - set(self.target_modules)
        if extra:
            raise ValueError(f"feedforwardModules {sorted(extra)} must also be in targetModules")
        peftrules.check(self)
        if (self.prompt_tuning_init == "TEXT") != (self.prompt_tuning_init_text is not None):
            raise ValueError("promptTuningInit TEXT needs promptTuningInitText, and promptTuningInitText needs "
                             "promptTuningInit TEXT")
        return self

    @property
    def virtual_tokens(self) -> int:
        """Positions prepended to each of the task's sequences (prompt tuning), else 0."""
        return get_peft_method(self.method).virtual_tokens(self)


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
                },
                {
                    "rule": "has(self.maxSteps) != has(self.epochs)",
                    "message": "set exactly one of maxSteps and epochs",
                    "fieldPath": ".maxSteps",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    max_steps: int | None = Field(
        default=None, gt=0, le=10_000_000,
        description="Optimizer steps to train for (or epochs: exactly one of the two).",
    )
    epochs: int | None = Field(
        default=None, gt=0, le=100_000,
        description=(
            "Instead of maxSteps: passes over the training examples; the engine derives the steps when it "
            "loads the data, ceil(epochs * examples / batchSize), and reports them as totalSteps."
        ),
    )
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
    eval_interval: int = Field(
        default=0, ge=0, le=10_000_000,
        description=(
            "With dataset.validationPath or validationSplit: the validation loss is computed every N steps "
            "(0: only at the end; it is always computed after the last step)."
        ),
    )

    report_to: list[REPORTERS] = Field(
        default_factory=list,
        max_length=2,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description=(
            "Experiment trackers, as Hugging Face Trainer's report_to: tensorboard (event files in the "
            "task's output, tensorboard/) and mlflow (a run per task at MLFLOW_TRACKING_URI: parameters, "
            "per-step loss, learning rate, tokens/s, eval loss, the adapter as an artifact). A tracker "
            "that is down costs warnings, never the task."
        ),
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSpec:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of maxSteps and epochs")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError("warmupSteps must not exceed maxSteps")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError("reportTo names a tracker twice")
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

    uri: str | None = Field(
        default=None,
        max_length=MAX_PATH,
        pattern=sources.S3_PREFIX_PATTERN,
        json_schema_extra=sources.s3_prefix_rules(),
        description=(
            "s3://BUCKET[/PREFIX]: once the task succeeds, its adapter directory (adapter_config.json, "
            "adapter_model.safetensors, metrics.jsonl, chat template, TensorBoard events) is uploaded to "
            "PREFIX/<namespace>/<name>/ (by `muxtune run` with the standard AWS credential chain, or by "
            "an export Job with spec.credentialsSecret in a cluster)."
        ),
    )
    upload_checkpoints: bool = Field(
        default=False, description="With uri: also upload the checkpoints/ directory."
    )

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        return check_relative_path(v, "namespace's output area")

    @field_validator("uri")
    @classmethod
    def _no_dotdot(cls, v: str | None) -> str | None:
        if v is not None and re.search(sources.DOTDOT, v.removeprefix("s3://")):
            raise ValueError(sources.DOTDOT_MESSAGE)
        return v


class ServingSpec(ApiModel):
    """Serve the task's adapter through its group's OpenAI-compatible API, while it trains and after."""

    enabled: bool = Field(
        default=False,
        description="Answer inference requests with this task's adapter (model name: namespace/name) from the "
                    "engine that trains it; status.endpoint says where.",
    )
    slo_ttft_ms: float = Field(
        default=1000.0, gt=0, le=600000,
        description="Time-to-first-token SLO in ms; the group's engine keeps training within the strictest of its tasks'.",
    )
    slo_tpot_ms: float = Field(
        default=100.0, gt=0, le=60000,
        description="Time-per-output-token SLO in ms; the group's engine keeps training within the strictest of its tasks'.",
    )


class FineTuneTaskSpec(ApiModel):
    """What to train: backbone, data, PEFT method and optimisation settings."""

    base_model: str = Field(
        pattern=BASE_MODEL_PATTERN,
        json_schema_extra=immutable("baseModel"),
        description=(
            "The frozen backbone: builtin:NAME, model:NAME (a BaseModel resource; weights on a "
            "PVC, a host path, the Hub or in a bucket), or for muxtune run only (the operator refuses "
            "them: use a BaseModel) a local Hugging Face model directory, hf://ORG/NAME[@REVISION] "
            "(through huggingface_hub: its cache, HF_HUB_OFFLINE and HF_TOKEN) or s3://BUCKET/PREFIX/ "
            "(downloaded once into the muxtune cache, keyed by content)."
        ),
    )
    credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        pattern=sources.SECRET_NAME_PATTERN,
        description=(
            "A Secret in the task's namespace whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL, HF_TOKEN, ...) become the environment of the task's staging and export "
            "Jobs, which run in the task's namespace; it never reaches a shared engine pod."
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
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Inference on the task's adapter while it trains (co-serving)."
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
    eval_loss: float | None = Field(
        default=None, description="Latest validation loss (with dataset.validationPath or validationSplit)."
    )
    tokens_per_second: float | None = Field(default=None, description="Trained tokens per second.")
    checkpoint: str | None = Field(default=None, description="Latest checkpoint path.")
    message: str | None = Field(default=None, description="Why the task is in its phase.")
    start_time: Timestamp | None = Field(default=None, description="When the task started training.")
    completion_time: Timestamp | None = Field(default=None, description="When the task succeeded or failed.")
    observed_generation: int | None = Field(default=None, description="Generation the status reflects.")
    endpoint: str | None = Field(
        default=None,
        description="OpenAI-compatible API base URL serving this task's adapter (model: namespace/name), "
                    "set while spec.serving.enabled and its group's engine serves it.",
    )


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
