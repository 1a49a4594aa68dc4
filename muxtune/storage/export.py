"""output.uri: a finished task's adapter directory, uploaded to PREFIX/<namespace>/<name>/.

The same function runs in `muxtune run` (after the task's last save) and in a cluster's export
Job (after the task Succeeded, with the task's own credentials), so both upload the same files:
the adapter, metrics.jsonl, the chat template, TensorBoard events, and checkpoints/ only with
output.uploadCheckpoints. status.json and hidden files stay behind; adapter_config.json goes
last, so whoever finds it finds the weights whole.
"""
from __future__ import annotations

from pathlib import Path, PurePath

from muxtune.api.finetunetask import FineTuneTask
from muxtune.storage import s3

LAST = ("adapter_config.json",)


def destination(task: FineTuneTask) -> str:
    uri = task.spec.output.uri.rstrip("/")
    return f"{uri}/{task.metadata.namespace or 'default'}/{task.metadata.name}/"


def wanted(checkpoints: bool):
    def include(rel: PurePath) -> bool:
        if any(p.startswith(".") for p in rel.parts) or rel.as_posix() == "status.json":
            return False
        return checkpoints or rel.parts[0] != "checkpoints"

    return include


def export_dir(task_dir: Path, to: str, checkpoints: bool) -> list[str]:
    """Upload a task directory's results to `to`; StorageError (naming the URI, never a secret) when refused."""
    return s3.upload_tree(Path(task_dir), to, wanted(checkpoints), LAST)


def export_task(task: FineTuneTask, task_dir: Path) -> list[str]:
    return export_dir(task_dir, destination(task), task.spec.output.upload_checkpoints)
