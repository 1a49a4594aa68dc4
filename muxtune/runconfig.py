"""What `muxtune run` and `muxtune serve` take: typed, torch-free, built once from the command line.

These models ARE the CLI's flags (muxtune/cli.py subclasses them), so flags, help and validation
live in one place, and the engine receives the same typed object instead of guessing attributes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import CliPositionalArg

from muxtune.facts.data_limits import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_BYTES
from muxtune.facts.quantization import QUANTIZE_HELP, Quantization

from muxtune.facts.budget import DEFAULT_TOKEN_BUDGET  # noqa: F401  (the trainer's and the SLO controller's cap)

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
LogLevel = Literal["debug", "info", "warning", "error"]


TRUST_REMOTE_CODE = ("Allow a model directory whose config maps classes to its own Python files (auto_map) "
                     "to run them; refused by default")


class ServeFlags(BaseModel):
    """What serving adapters over the OpenAI API takes (shared by `run --serve-port` and `serve`)."""

    slo_tpot_ms: float = Field(100.0, gt=0, description="Serving SLO: mean time per output token after the first (ms)")
    slo_ttft_ms: float = Field(1000.0, gt=0, description="Serving SLO: time to the first token (ms)")
    max_num_seqs: int = Field(16, gt=0, le=4096, description="Requests generating at once (KV cache rows)")
    max_model_len: int = Field(2048, gt=1, description="Prompt + generated tokens of one request (KV cache row length)")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a free row; more get 429")
    max_tokens: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for")
    max_prefill_tokens: int = Field(512, gt=0, description="Prompt tokens per iteration at most (longer prompts are chunked)")
    max_connections: int = Field(256, gt=0, le=65536, description="Open connections at most (the longest-idle one is closed for a new one; 503 when all are busy)")
    idle_timeout_s: float = Field(15.0, gt=0, description="Seconds a connection may take to send a request's headers, or sit idle between requests")
    chat_template: Path | None = Field(None, description="Jinja chat template (default: the tokenizer's, else muxtune's plain one)")
    train_floor: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the time training keeps however many requests come (0: none; requests beyond what is left are refused with 429)")
    max_queue_wait_s: float = Field(10.0, gt=0, description="Refuse a request (429 with Retry-After) when the requests ahead of it would keep it waiting longer than this")
    serve_tokens: Path | None = Field(None, description="JSON file of sha256(bearer token) -> namespace (pods; the operator writes it): "
                                                        "requests then need a token and reach only their namespace's adapters")


class ParallelFlags(BaseModel):
    """The group's layout (shared by `run` and `serve`; engine/parallel)."""

    dp: int = Field(1, ge=1, description="Data-parallel replicas: each task's step batch is split over them "
                                         "(serving: replica 0 answers, the others train)")
    tp: int = Field(1, ge=1, description="Tensor-parallel ranks the base Linears are sharded over")
    pp: int = Field(1, ge=1, description="Pipeline stages the decoder layers are split over (balanced by compute)")

    @property
    def world(self) -> int:
        """Ranks the layout asks for (dp x tp x pp)."""
        return self.dp * self.tp * self.pp


class RunConfig(ParallelFlags, ServeFlags):
    """Train FineTuneTasks together over one shared backbone (no cluster needed).

    With --dp/--tp/--pp above 1 it starts that many ranks on this machine (torch elastic), or
    joins the group it was started in by torchrun (RANK, WORLD_SIZE, ...), or, under the PET_*
    variables torchrun reads, starts this node's share of a multi-node group.
    """

    tasks: CliPositionalArg[list[Path]] = Field(description="FineTuneTask YAML files (several documents per file are fine)")
    output: Path = Field(Path("runs/default"), description="Run directory: each task writes to OUTPUT/NAMESPACE/NAME")
    data_root: Path = Field(Path("."), description="Directory that the tasks' dataset.path values are relative to")
    device: Device = Field("auto", description="Where the backbone runs")
    dtype: Dtype = Field("auto", description="Backbone compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    quantize: Quantization = Field("none", description=QUANTIZE_HELP)
    token_budget: int = Field(DEFAULT_TOKEN_BUDGET, gt=0, description="Real tokens fused into one forward/backward; tasks beyond it take turns")
    recompute: bool = Field(False, description="Activation checkpointing per decoder layer: keep each layer's input only and "
                                                "recompute the rest in backward (less memory, same results, ~1/3 more compute)")
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1, description="This engine's share of a GPU another group's "
                                              "engine also uses: the CUDA allocator is capped at it, a task whose state would not "
                                              "fit is refused, a round past it lowers the token budget (the operator sets it)")
    device_memory_mib: int | None = Field(None, gt=0, description="Memory the --gpu-memory-fraction is of (default: the CUDA "
                                          "device's; on CPU the host's)")
    chunk_size: int | None = Field(None, gt=0, description="Packed chunk length (default: the longest maxSeqLen)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve /metrics and /v1/status on this port (0: any free port)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics/status server binds (pods pass 0.0.0.0)")
    status_token_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                                            description="SHA-256 (hex) of the bearer token /metrics and /v1/status then require "
                                                        "(pods: the operator passes it); without it they answer anyone who reaches the port")
    watch: bool = Field(False, description="Keep running and follow changes to the task files (used in pods)")
    max_dataset_bytes: int = Field(DEFAULT_MAX_FILE_BYTES, gt=0, description="Refuse a dataset file larger than this many bytes")
    max_line_bytes: int = Field(DEFAULT_MAX_LINE_BYTES, gt=0, description="Refuse a dataset line longer than this many bytes")
    resume: bool = Field(True, description="Resume tasks from checkpoints found in the output directory")
    remote: bool = Field(True, description="Fetch s3:// datasets and upload to output.uri from this process (pods: "
                                           "--no-remote; the task's staging and export Jobs do it with its credentials)")
    allow_data_change: bool = Field(False, description="Resume a task even when its dataset changed since its checkpoint (refused by default)")
    progress: bool = Field(True, description="Show a progress bar")
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE)
    log_level: LogLevel = Field("warning", description="Structured log verbosity")
    serve_port: int | None = Field(None, ge=0, le=65535, description="Also serve the tasks' adapters (OpenAI API) on this port while they train (0: any free port)")
    serve_host: str = Field("127.0.0.1", description="Address the serving port binds")
    serve_tasks: Literal["all", "enabled"] = Field(
        "all", description="Which tasks' adapters are served: all, or only those with spec.serving.enabled (pods)")
    serve_policy: Literal["coserve", "temporal"] = Field(
        "coserve", description="coserve: token-level mixing under the SLOs; temporal: train only while no request is in flight (a baseline)")
    micro_batches: int | None = Field(None, ge=1, description="Pipeline micro-batches per task and round (default: --pp)")
    interleave: bool = Field(True, description="Interleave different tasks' micro-batches in one pipeline flush "
                                               "(--no-interleave: one flush per task, for comparison)")
    print_schedule: bool = Field(False, description="Print each round's pipeline schedule (stage x tick: F/B, micro-batch, task)")

    @property
    def serving(self) -> bool:
        return self.serve_port is not None


class ServeConfig(ParallelFlags, ServeFlags):
    """Serve finished adapters over one shared backbone with an OpenAI-compatible API."""

    adapters: CliPositionalArg[list[Path]] = Field(default_factory=list, description="Adapter directories (adapter_config.json + adapter_model.safetensors); each is served under its directory name")
    port: int = Field(8000, ge=0, le=65535, description="Port of the OpenAI API (0: any free port)")
    host: str = Field("127.0.0.1", description="Address the API binds")
    base_model: str | None = Field(None, description="Backbone (builtin:NAME or a model directory; default: the adapters' base_model_name_or_path)")
    enable_lora_loading: bool = Field(False, description="Accept POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA updating) for adapter directories under a --lora-root")
    lora_root: list[Path] = Field(default_factory=list, description="A directory adapters may be loaded from at runtime (repeatable; symlinks and .. are resolved first)")
    device: Device = Field("auto", description="Where the backbone runs")
    dtype: Dtype = Field("auto", description="Backbone compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    quantize: Quantization = Field("none", description=QUANTIZE_HELP)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE)
    log_level: LogLevel = Field("warning", description="Structured log verbosity")
