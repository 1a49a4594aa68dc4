"""Multi-process runs of `muxtune run` (gloo on CPU): their working directories, environment, and
the adapters they write, for the parallel tests to compare with one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers.data import task_doc, write_jsonl

MUXTUNE = [sys.executable, "-m", "muxtune.cli", "run"]


def three_task_docs(steps_scale: int = 1, checkpoint_interval: int = 0) -> list[dict]:
    """Different ranks and methods (as tests/engine/peft/test_transparency.py), dataset paths relative."""
    extra = {"checkpointInterval": checkpoint_interval}
    return [
        task_doc("lora-r4", Path("data/reverse.jsonl"), r=4, seed=11, steps=8 * steps_scale, **extra),
        task_doc("lora-r16", Path("data/upper.jsonl"), r=16, seed=12, steps=6 * steps_scale, batch=6,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), schedule="cosine", warmupSteps=2,
                 **extra),
        task_doc("ia3", Path("data/reverse.jsonl"), method="ia3", seed=13, steps=10 * steps_scale, lr=3e-2,
                 targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",), **extra),
    ]


def make_workdir(root: Path, docs: list[dict]) -> Path:
    """root/data/*.jsonl and root/tasks.yaml naming them relative to root (the run's cwd)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "data" / "reverse.jsonl", 64, seed=1, kind="reverse")
    write_jsonl(root / "data" / "upper.jsonl", 64, seed=2, kind="upper")
    (root / "tasks.yaml").write_text(yaml.safe_dump_all(docs))
    return root


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e["OMP_NUM_THREADS"] = "1"
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # `muxtune` for --no-python
    e.update(extra)
    return e


def run(cmd: list[str], cwd: Path, timeout: int = 900, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def adapter(out: Path, name: str) -> dict:
    """The task's final adapter, wherever the output layout puts the task's directory."""
    from safetensors.torch import load_file

    found = sorted(out.rglob(f"{name}/adapter_model.safetensors"))
    found = [p for p in found if "checkpoints" not in p.parts]
    assert len(found) == 1, f"{name}: adapters found {found}"
    return load_file(found[0])


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
