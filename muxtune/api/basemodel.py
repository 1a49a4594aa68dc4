"""BaseModel: a cluster-scoped backbone the planner can size and pods can mount."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from muxtune.api import sources
from muxtune.api.meta import API_VERSION, ApiModel, ObjectMeta
from muxtune.facts.quantization import NO_QUANTIZATION, Quantization


NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class PvcSource(ApiModel):
    """Weights in a directory of a PersistentVolumeClaim."""

    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim holding the weights.")
    path: str = Field(default="", description="Directory inside the claim.")
    namespace: str | None = Field(
        default=None,
        max_length=63,
        pattern=NAMESPACE_PATTERN,
        description=(
            "Namespace of the claim. A pod mounts only claims of its own namespace, so when set only "
            "groups in that namespace can use the model (the shared namespace for tasks shared across "
            "namespaces); other tasks are refused with a condition. Default: a claim of this name in "
            "the namespace of each group."
        ),
    )


class HostPathSource(ApiModel):
    """Weights in a directory present on every GPU node."""

    path: str = Field(pattern=r"^/.*", description="Absolute directory on every GPU node.")


class HubSource(ApiModel):
    """Weights on the Hugging Face Hub, staged once into the model cache volume."""

    repo: str = Field(pattern=rf"^{sources.HF_REPO}$", max_length=200, description="ORG/NAME on the Hub.")
    revision: str | None = Field(default=None, pattern=r"^[-A-Za-z0-9_./]+$", max_length=200,
                                 description="Branch, tag or commit (default: main).")

    @property
    def uri(self) -> str:
        return f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else "")


class BucketSource(ApiModel):
    """Weights under an S3 prefix (AWS or S3-compatible), staged once into the model cache volume."""

    uri: str = Field(pattern=sources.S3_PREFIX_PATTERN, max_length=1024, json_schema_extra=sources.s3_prefix_rules(),
                     description="s3://BUCKET/PREFIX/ holding config.json, the weights and the tokenizer.")


SOURCE_KINDS = ("builtin", "pvc", "host_path", "hf", "s3")


class ModelSource(ApiModel):
    """Exactly one of builtin, pvc, hostPath, hf, s3."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.builtin) ? 1 : 0) + (has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0)"
                            " + (has(self.hf) ? 1 : 0) + (has(self.s3) ? 1 : 0) == 1",
                    "message": "set exactly one of builtin, pvc, hostPath, hf, s3",
                    "reason": "FieldValueInvalid",
                }
            ]
        }
    )

    builtin: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="A built-in test model the engine generates itself, e.g. tiny-llama (no volume).",
    )
    pvc: PvcSource | None = Field(default=None, description="Weights in a PersistentVolumeClaim.")
    host_path: HostPathSource | None = Field(default=None, description="Weights in a directory on every GPU node.")
    hf: HubSource | None = Field(default=None, description="Weights on the Hugging Face Hub (staged into the model cache).")
    s3: BucketSource | None = Field(default=None, description="Weights in a bucket (staged into the model cache).")
    credentials_secret: str | None = Field(
        default=None, max_length=253, pattern=sources.SECRET_NAME_PATTERN,
        description="hf and s3: a Secret in the operator's namespace whose keys (HF_TOKEN, AWS_*) become the "
                    "environment of the staging Job; engine pods never see it.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if sum(getattr(self, k) is not None for k in SOURCE_KINDS) != 1:
            raise ValueError("set exactly one of builtin, pvc, hostPath, hf, s3")
        return self

    @property
    def remote_uri(self) -> str | None:
        """hf:// or s3:// for a source staged into the model cache, else None."""
        return self.hf.uri if self.hf else self.s3.uri if self.s3 else None


class ArchitectureFigures(ApiModel):
    """Size figures as a BaseModel's author may type them: any subset. The operator reads the rest
    from the model's config.json where it can (figures typed here win over figures read)."""

    parameters: int | None = Field(default=None, gt=0, description="Backbone parameter count.")
    layers: int | None = Field(default=None, gt=0, description="Transformer blocks.")
    hidden_size: int | None = Field(default=None, gt=0, description="Model width.")
    num_attention_heads: int | None = Field(default=None, gt=0, description="Attention heads per block.")
    num_key_value_heads: int | None = Field(
        default=None, gt=0, description="Key/value heads per block (grouped-query attention); default: numAttentionHeads."
    )
    intermediate_size: int | None = Field(
        default=None, gt=0, description="Feed-forward width; default: derived from parameters."
    )
    vocab_size: int | None = Field(default=None, gt=0, description="Tokenizer vocabulary size.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="bfloat16", description="Weight dtype at runtime.")
    quantization: Quantization = Field(
        default=NO_QUANTIZATION, description="Storage of the decoder Linears' frozen weights (nf4: 4-bit, int8: 8-bit); "
                                             "the BaseModel's spec.quantization, which it must equal when both are set.")
    model_type: str | None = Field(default=None, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$",
                                   description="config.json's model_type: the family whose layout sizes the blocks.")
    head_dim: int | None = Field(default=None, gt=0, description="Width of one attention head; default: hiddenSize / numAttentionHeads.")
    num_experts: int | None = Field(default=None, gt=0, description="MoE: experts per sparse block.")
    num_experts_per_tok: int | None = Field(default=None, gt=0, description="MoE: experts each token is routed to.")
    moe_intermediate_size: int | None = Field(default=None, gt=0, description="MoE: one expert's feed-forward width.")
    sliding_window: int | None = Field(default=None, gt=0, description="Keys a query sees in windowed attention layers.")


REQUIRED_FIGURES = ("parameters", "layers", "hidden_size")


class Architecture(ArchitectureFigures):
    """Figures the planner's memory model needs: typed in spec.architecture or read from config.json."""

    parameters: int = Field(gt=0, description="Backbone parameter count.")
    layers: int = Field(gt=0, description="Transformer blocks.")
    hidden_size: int = Field(gt=0, description="Model width.")


class LabelSelectorRequirement(ApiModel):
    """One namespace label requirement, as in a Kubernetes LabelSelector."""

    key: str = Field(min_length=1, max_length=317, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[str] = Field(default_factory=list, max_length=64, description="Values for In and NotIn.")


class NamespaceSelector(ApiModel):
    """Namespaces by label (a Kubernetes LabelSelector); every given requirement must hold."""

    match_labels: dict[str, Annotated[str, Field(description="Label value.")]] = Field(
        default_factory=dict, description="Labels the namespace must carry."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=32, description="Label requirements the namespace must meet."
    )


class BaseModelSpec(ApiModel):
    """Where a backbone's weights are, how big it is, and which namespaces may train on it."""

    source: ModelSource = Field(description="Where the weights live: exactly one of builtin, pvc, hostPath, hf, s3.")
    allowed_namespaces: list[Annotated[str, StringConstraints(max_length=63, pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$")]] = Field(
        default_factory=list,
        max_length=1024,
        description=(
            "Namespaces whose FineTuneTasks may use this model; \"*\" admits every namespace. A task "
            "from a namespace matched neither here nor by namespaceSelector is refused (condition "
            "ModelNotAllowed). Empty with no namespaceSelector: no namespace may use the model, since "
            "the weights may be private."
        ),
    )
    namespace_selector: NamespaceSelector | None = Field(
        default=None, description="Namespaces (by label) whose FineTuneTasks may also use this model."
    )
    architecture: ArchitectureFigures | None = Field(
        default=None, description="Size figures, any of them; the operator reads those left out from the model's "
                                  "config.json where it can (a built-in, a hostPath it sees, hf and s3 once staged).")
    quantization: Quantization = Field(
        default=NO_QUANTIZATION,
        description=(
            "QLoRA: store the frozen backbone's decoder Linears in 4 bits (nf4, NormalFloat with double-quantized "
            "scales) or 8 bits (int8, LLM.int8) through bitsandbytes; adapters train in the compute dtype and "
            "load with PeftModel on the same quantized base. The planner sizes the weights accordingly."
        ),
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "Let the engine run the Python files the model directory maps its classes to (auto_map in "
            "config.json). Off: such a model is refused. BaseModel is cluster-scoped, so only those who "
            "may create it (cluster admins) can allow this."
        ),
    )


    @model_validator(mode="after")
    def _one_quantization(self) -> BaseModelSpec:
        """spec.architecture carries the storage the memory model sizes: spec.quantization's."""
        arch = self.architecture
        if arch is not None and arch.quantization != self.quantization:
            if arch.quantization != NO_QUANTIZATION:
                raise ValueError(f"architecture.quantization {arch.quantization!r} differs from quantization "
                                 f"{self.quantization!r}; set quantization only")
            self.architecture = arch.model_copy(update={"quantization": self.quantization})
        return self


class BaseModelStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Literal["Staging", "Ready", "Failed"] | None = Field(
        default=None, description="hf and s3 sources: Staging while the Job copies the weights into the model "
                                  "cache, Ready once there, Failed (message says why).")
    cache_path: str | None = Field(default=None, description="hf and s3 sources: the weights' directory in the model cache volume.")
    ready: bool = Field(default=False, description="The weights were found and the size figures are known.")
    architecture: Architecture | None = Field(
        default=None, description="Size figures in use (from the spec or read from config.json)."
    )
    config_architecture: ArchitectureFigures | None = Field(
        default=None, description="hf and s3 sources: the figures the staging Job read from the model's config.json.")
    message: str | None = Field(default=None, description="Why the model is not ready.")


class BaseModelResource(ApiModel):
    """A cluster-scoped backbone that FineTuneTasks name as model:NAME."""

    api_version: Literal["muxtune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["BaseModel"] = "BaseModel"
    metadata: ObjectMeta
    spec: BaseModelSpec
    status: BaseModelStatus | None = None
