"""The `muxtune` command. Each subcommand is a pydantic model: flags, help and validation in one place."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from muxtune.api.crdgen import CrdsCommand
from muxtune.engine.data.datafile import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_BYTES
from muxtune.devcluster.cli import DevClusterCommand
from muxtune.operator.cli import OperatorCommand, PlanCommand


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


class RunCommand(ServeFlags):
    """Train FineTuneTasks together over one shared backbone (no cluster needed).

    With --dp/--tp/--pp above 1 it starts that many ranks on this machine (torch elastic), or
    joins the group it was started in by torchrun (RANK, WORLD_SIZE, ...), or, under the PET_*
    variables torchrun reads, starts this node's share of a multi-node group.
    """

    tasks: CliPositionalArg[list[Path]] = Field(description="FineTuneTask YAML files (several documents per file are fine)")
    output: Path = Field(Path("runs/default"), description="Run directory: each task writes to OUTPUT/NAMESPACE/NAME")
    data_root: Path = Field(Path("."), description="Directory that the tasks' dataset.path values are relative to")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the backbone runs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Backbone compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    token_budget: int = Field(4096, gt=0, description="Real tokens fused into one forward/backward; tasks beyond it take turns")
    chunk_size: int | None = Field(None, gt=0, description="Packed chunk length (default: the longest maxSeqLen)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve /metrics and /v1/status on this port (0: any free port)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics/status server binds (pods pass 0.0.0.0)")
    watch: bool = Field(False, description="Keep running and follow changes to the task files (used in pods)")
    max_dataset_bytes: int = Field(DEFAULT_MAX_FILE_BYTES, gt=0, description="Refuse a dataset file larger than this many bytes")
    max_line_bytes: int = Field(DEFAULT_MAX_LINE_BYTES, gt=0, description="Refuse a dataset line longer than this many bytes")
    resume: bool = Field(True, description="Resume tasks from checkpoints found in the output directory")
    allow_data_change: bool = Field(False, description="Resume a task even when its dataset changed since its checkpoint (refused by default)")
    progress: bool = Field(True, description="Show a progress bar")
    log_level: Literal["debug", "info", "warning", "error"] = Field("warning", description="Structured log verbosity")
    serve_port: int | None = Field(None, ge=0, le=65535, description="Also serve the tasks' adapters (OpenAI API) on this port while they train (0: any free port)")
    serve_host: str = Field("127.0.0.1", description="Address the serving port binds")
    serve_tasks: Literal["all", "enabled"] = Field(
        "all", description="Which tasks' adapters are served: all, or only those with spec.serving.enabled (pods)")
    serve_policy: Literal["coserve", "temporal"] = Field(
        "coserve", description="coserve: token-level mixing under the SLOs; temporal: train only while no request is in flight (a baseline)")
    dp: int = Field(1, ge=1, description="Data-parallel replicas: each task's step batch is split over them")
    tp: int = Field(1, ge=1, description="Tensor-parallel ranks the base Linears are sharded over")
    pp: int = Field(1, ge=1, description="Pipeline stages the decoder layers are split over (balanced by compute)")
    micro_batches: int | None = Field(None, ge=1, description="Pipeline micro-batches per task and round (default: --pp)")
    interleave: bool = Field(True, description="Interleave different tasks' micro-batches in one pipeline flush "
                                               "(--no-interleave: one flush per task, for comparison)")
    print_schedule: bool = Field(False, description="Print each round's pipeline schedule (stage x tick: F/B, micro-batch, task)")

    def cli_cmd(self) -> None:
        from muxtune.engine.run import run_from_cli

        sys.exit(run_from_cli(self))


class ServeCommand(ServeFlags):
    """Serve finished adapters over one shared backbone with an OpenAI-compatible API."""

    adapters: CliPositionalArg[list[Path]] = Field(description="Adapter directories (adapter_config.json + adapter_model.safetensors); each is served under its directory name")
    port: int = Field(8000, ge=0, le=65535, description="Port of the OpenAI API (0: any free port)")
    host: str = Field("127.0.0.1", description="Address the API binds")
    base_model: str | None = Field(None, description="Backbone (builtin:NAME or a model directory; default: the adapters' base_model_name_or_path)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the backbone runs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Backbone compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("warning", description="Structured log verbosity")

    def cli_cmd(self) -> None:
        from muxtune.engine.serve.stack import serve_from_cli

        sys.exit(serve_from_cli(self))


class ValidateCommand(BaseModel):
    """Check FineTuneTask files without training; errors name the file and field."""

    tasks: CliPositionalArg[list[Path]] = Field(description="FineTuneTask YAML files")

    def cli_cmd(self) -> None:
        from muxtune.api.loader import SpecError, load_task_files

        try:
            tasks = load_task_files(self.tasks)
        except SpecError as exc:
            print(exc, file=sys.stderr)
            sys.exit(2)
        for t in tasks:
            t_ = t.spec.training
            length = f"{t_.max_steps} steps" if t_.max_steps else f"{t_.epochs} epochs"
            print(f"ok {t.key} ({t.spec.peft.method}, {length})")


class Muxtune(BaseSettings):
    """muxtune: many PEFT fine-tuning tasks over one multiplexed backbone."""

    model_config = SettingsConfigDict(
        cli_prog_name="muxtune", cli_kebab_case=True, cli_implicit_flags=True, cli_parse_args=False
    )

    run: CliSubCommand[RunCommand] = Field(description="train tasks together on one backbone, locally or in a pod")
    serve: CliSubCommand[ServeCommand] = Field(description="serve finished adapters over one backbone (OpenAI API)")
    validate_: CliSubCommand[ValidateCommand] = Field(alias="validate", description="check task files without training")
    plan: CliSubCommand[PlanCommand] = Field(description="dry-run the operator's placement planner")
    operator: CliSubCommand[OperatorCommand] = Field(description="run the Kubernetes operator")
    crds: CliSubCommand[CrdsCommand] = Field(description="write the CRDs generated from the API models")
    dev_cluster: CliSubCommand[DevClusterCommand] = Field(description="local control plane: up, down, status, build")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> None:
    CliApp.run(Muxtune, cli_args=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
