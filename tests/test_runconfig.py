"""The run/serve configuration is declared once (muxtune/runconfig.py): the CLI commands are those
models, the engine takes them typed, and the token-budget default has one home."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

from pydantic_settings import CliApp

ROOT = Path(__file__).resolve().parents[1]


def test_cli_commands_are_the_config_models_and_parse_to_them():
    from muxtune.cli import RunCommand, ServeCommand
    from muxtune.runconfig import RunConfig, ServeConfig

    assert set(RunCommand.model_fields) == set(RunConfig.model_fields)
    assert set(ServeCommand.model_fields) == set(ServeConfig.model_fields)
    cfg = CliApp.run(RunCommand, cli_args=["t.yaml", "--dp", "2", "--pp", "3", "--serve-port", "0"],
                     cli_cmd_method_name="model_copy")
    assert isinstance(cfg, RunConfig) and cfg.world == 6 and cfg.serving


def test_token_budget_default_is_declared_once():
    from muxtune.engine.serve.stack import Serving
    from muxtune.engine.trainer import MuxTrainer
    from muxtune.runconfig import DEFAULT_TOKEN_BUDGET, RunConfig

    assert RunConfig(tasks=[]).token_budget == DEFAULT_TOKEN_BUDGET
    for fn in (MuxTrainer.__init__, Serving.__init__):
        assert inspect.signature(fn).parameters["token_budget"].default == DEFAULT_TOKEN_BUDGET


def _engine_imports(path: Path) -> set[str]:
    """Every muxtune.engine module path imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("muxtune.engine"):
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("muxtune.engine")}
    return out


def test_launch_imports_go_one_way():
    """run -> parallel/ranks, serve, runtime; none of those imports run back (the ranks get it as
    their entrypoint), and runtime imports no entrypoint at all."""
    engine = ROOT / "engine"
    importers = [p.relative_to(ROOT) for p in engine.rglob("*.py") if "muxtune.engine.run" in _engine_imports(p)]
    assert importers == []
    runtime = _engine_imports(engine / "runtime.py")
    assert not {m for m in runtime if m.startswith(("muxtune.engine.run", "muxtune.engine.serve",
                                                     "muxtune.engine.parallel.ranks"))
                and m != "muxtune.engine.runtime"}
