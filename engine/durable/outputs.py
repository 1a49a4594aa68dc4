"""Where each task writes, and the guarantee that no two tasks write to the same place.

Layout: `<output>/<namespace>/<name>`, or `<output>/<namespace>/<output.path>` when set. Every
task directory is resolved (symlinks followed) and must stay inside `--output`; two tasks whose
directories are the same, or one inside the other, are refused before either trains (they would
interleave metrics and overwrite each other's adapter).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from muxtune.api.finetunetask import FineTuneTask
from muxtune.engine.data.paths import PathEscapeError, confined


class OutputLayoutError(ValueError):
    """A task's output directory escapes the run output or overlaps another task's."""


def task_dir(output: Path, task: FineTuneTask) -> Path:
    """The task's directory, resolved and confined to the run output."""
    rel = Path(task.metadata.namespace or "default") / (task.spec.output.path or task.metadata.name)
    try:
        return confined(output, rel, f"task {task.key}: output directory", "run output (--output)")
    except PathEscapeError as exc:
        raise OutputLayoutError(str(exc)) from None


def overlaps(key: str, path: Path, others: Mapping[str, Path], output: Path) -> list[str]:
    """Why `path` may not be used next to `others` (key -> directory); empty when it may."""
    root = Path(output).resolve()
    problems = []
    for other, p in others.items():
        if other == key or p is None:
            continue
        if p == path:
            problems.append(f"tasks {other} and {key} both write to {_show(path, root)}")
        elif path.is_relative_to(p) or p.is_relative_to(path):
            inner, outer = (key, other) if path.is_relative_to(p) else (other, key)
            problems.append(f"task {inner} would write inside task {outer}'s directory "
                            f"{_show(p if inner == key else path, root)}")
    return problems


def plan(output: Path, tasks: Iterable[FineTuneTask]) -> dict[str, Path]:
    """Every task's directory; OutputLayoutError listing every escape and every collision."""
    dirs: dict[str, Path] = {}
    problems: list[str] = []
    for t in tasks:
        try:
            dirs[t.key] = task_dir(output, t)
        except OutputLayoutError as exc:
            problems.append(str(exc))
    seen: dict[str, Path] = {}
    for key, path in dirs.items():
        problems += overlaps(key, path, seen, output)
        seen[key] = path
    if problems:
        raise OutputLayoutError("\n".join(problems))
    return dirs


def _show(path: Path, root: Path) -> str:
    """The directory relative to the run output (never an absolute path in a message)."""
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return path.name
