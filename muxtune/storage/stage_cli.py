"""`muxtune stage`: what a staging, export or model-cache Job runs, with the credentials of its Secret.

Each prints one line saying what it did and exits 0, or prints the reason (never a secret) and
exits 1. Its result is also the container's termination message: `ok: <detail>` or `error:
<reason>` (RESULT_OK / RESULT_ERROR). The operator reads the Job's outcome from that result, not
from the Job's condition alone: a kubelet always delivers both, but a kwok node (the dev cluster)
completes Job pods without running them, and its stand-in kubelet reports the result afterwards.
The model command's detail on success is the model's directory relative to the cache volume,
which engine pods then mount read-only, and on a second line the size figures read from its
config.json (JSON), which the operator sizes it by.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from muxtune.facts.config_figures import read_figures
from muxtune.storage import datasets, export, models
from muxtune.storage.cache import cache_home, cached_dir
from muxtune.storage.errors import StorageError, redact

TERMINATION_LOG = os.environ.get("MUXTUNE_TERMINATION_LOG", "/dev/termination-log")
RESULT_OK, RESULT_ERROR = "ok: ", "error: "


def _report(text: str) -> None:
    try:
        with open(TERMINATION_LOG, "w") as f:
            f.write(text[:4000])
    except OSError:
        pass  # not in a pod


def _run(fn) -> int:
    try:
        line, message = fn()
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _report(RESULT_ERROR + str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - anything else is reported the same way, redacted
        text = redact(f"{type(exc).__name__}: {exc}")
        print(f"error: {text}", file=sys.stderr)
        _report(RESULT_ERROR + text)
        return 1
    print(line)
    _report(RESULT_OK + message)
    return 0


def stage_data(uris: list[str], data_area: Path, max_bytes: int) -> int:
    def go():
        paths = [datasets.stage(u, data_area, max_bytes) for u in uris]
        return f"staged {len(paths)} object(s) into the data area", "staged"
    return _run(go)


def export_results(task_dir: Path, to: str, checkpoints: bool) -> int:
    def go():
        if not (task_dir / "adapter_config.json").is_file():
            raise StorageError(f"{task_dir.name}: no adapter_config.json to export")
        keys = export.export_dir(task_dir, to, checkpoints)
        return f"uploaded {len(keys)} file(s) to {to}", f"uploaded {len(keys)} file(s)"
    return _run(go)


def stage_model(source: str) -> int:
    """Fetch into the cache (MUXTUNE_HOME, HF_HUB_CACHE on the volume); an hf snapshot is copied
    out of the Hub cache's symlinks into a plain directory, which a subPath mount can show."""
    def go():
        path = models.fetch_model(source)
        if source.startswith("hf://"):
            snap = path
            path = cached_dir("models", "hf", {"source": source, "commit": snap.name},
                              lambda d: shutil.copytree(snap, d, symlinks=False, dirs_exist_ok=True), "config.json")
        rel = path.resolve().relative_to(cache_home().resolve()).as_posix()
        # the operator cannot mount the cache: it reads the path, then config.json's figures
        return f"model ready at {rel}", f"{rel}\n{json.dumps(read_figures(path))}"
    return _run(go)
