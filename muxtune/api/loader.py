"""Read FineTuneTask YAML files with errors that name the file and the field."""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from muxtune.api import strictyaml
from muxtune.api.finetunetask import FineTuneTask


class SpecError(ValueError):
    """A task file that cannot be trained; the message names file and field."""


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{source}: {field}: {e['msg']}")
    return "\n".join(lines)


def parse_task(doc: dict, source: str = "<task>") -> FineTuneTask:
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: expected a FineTuneTask mapping, got {type(doc).__name__}")
    # the models default these for Python callers; a file must say what it is, as kubectl requires
    missing = [f"{source}: {k}: Field required" for k in ("apiVersion", "kind") if k not in doc]
    if missing:
        raise SpecError("\n".join(missing))
    try:
        return FineTuneTask.model_validate(doc)
    except ValidationError as err:
        raise SpecError(format_validation_error(source, err)) from None


def load_task_files(paths: list[Path]) -> list[FineTuneTask]:
    """Every document of every file; duplicate namespace/name pairs (or YAML keys) are an error."""
    tasks: list[FineTuneTask] = []
    errors: list[str] = []
    for path in paths:
        try:
            docs = strictyaml.load_file(Path(path))
        except strictyaml.StrictYamlError as exc:
            errors.append(str(exc))
            continue
        for i, doc in enumerate(d for d in docs if d is not None):
            src = f"{path}" if len(docs) == 1 else f"{path}[{i}]"
            try:
                tasks.append(parse_task(doc, src))
            except SpecError as exc:
                errors.append(str(exc))
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t.key] = seen.get(t.key, 0) + 1
    errors += [f"task {k} is defined {n} times" for k, n in seen.items() if n > 1]
    if errors:
        raise SpecError("\n".join(errors))
    if not tasks:
        raise SpecError("no FineTuneTask found in " + ", ".join(map(str, paths)))
    return tasks
