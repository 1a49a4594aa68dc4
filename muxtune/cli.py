"""The `muxtune` command. Each subcommand is a pydantic model: flags, help and validation in one place."""
from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from muxtune.api.crdgen import CrdsCommand
from muxtune.devcluster.cli import DevClusterCommand
from muxtune.operator.cli import OperatorCommand, PlanCommand
from muxtune.runconfig import RunConfig, ServeConfig


class RunCommand(RunConfig):
    __doc__ = RunConfig.__doc__  # the help text; flags are RunConfig's

    def cli_cmd(self) -> None:
        from muxtune.engine.run import run_from_cli

        sys.exit(run_from_cli(self))


class ServeCommand(ServeConfig):
    __doc__ = ServeConfig.__doc__  # the help text; flags are ServeConfig's

    def cli_cmd(self) -> None:
        from muxtune.engine.serve.serve_cli import serve_from_cli

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
