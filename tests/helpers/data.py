"""Datasets and task documents the engine tests train on.

Dataset paths are relative to a data root (the API refuses absolute paths): tests keep their data
under pytest's base temporary directory, which the session fixture `data_root` (tests/conftest.py)
records here, and use it as the data root of every trainer they make."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import yaml

from tests.helpers.paths import REPO

_DATA_ROOT: Path | None = None
QUICKSTART = REPO / "examples" / "quickstart"

# A ChatML-style template (as Qwen's), written here: the built-in tokenizer has none.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVO = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ciao"},
]}


def set_data_root(path: Path) -> None:
    global _DATA_ROOT
    _DATA_ROOT = Path(path)


def data_root_dir() -> Path:
    """The session's data root (for helpers that have no fixture at hand)."""
    assert _DATA_ROOT is not None, "the session fixture data_root (tests/conftest.py) sets the data root"
    return _DATA_ROOT


def data_path(path: Path | str) -> str:
    """A dataset.path for a file under the tests' data root (absolute paths are made relative)."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    root = data_root_dir()
    rel = os.path.relpath(p, root)
    assert not rel.startswith(".."), f"test data {p} must live under the data root {root}"
    return rel


def write_jsonl(path: Path, n: int, seed: int = 0, kind: str = "reverse") -> Path:
    """Deterministic prompt/completion data with mixed lengths."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 14)))
            completion = w[::-1] if kind == "reverse" else w.upper()
            f.write(json.dumps({"prompt": f"{kind}: {w}\n", "completion": completion}) + "\n")
    return path


def task_doc(name: str, data: Path, *, method: str = "lora", r: int = 4, steps: int = 6, batch: int = 4,
             lr: float = 5e-3, seed: int = 0, targets=("q_proj", "v_proj"), ff=(), base: str = "builtin:tiny-llama",
             **training) -> dict:
    peft = {"method": method, "targetModules": list(targets)}
    if method == "lora":
        peft.update(r=r, alpha=2 * r, dropout=0.0)
    if ff:
        peft["feedforwardModules"] = list(ff)
    return {
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": name},
        "spec": {
            "baseModel": base,
            "dataset": {"path": data_path(data), "maxSeqLen": 48},
            "peft": peft,
            "training": {"maxSteps": steps, "batchSize": batch, "learningRate": lr, "seed": seed,
                         "checkpointInterval": 0, **training},
        },
    }


def quickstart_tasks(tmp_path, steps):
    """The quickstart's three tasks, shortened (their datasets relative to the run's directory)."""
    docs = []
    for f in sorted(QUICKSTART.glob("*.yaml")):
        d = yaml.safe_load(f.read_text())
        d["spec"]["training"]["maxSteps"] = steps
        d["spec"]["training"]["checkpointInterval"] = 0
        d["spec"]["training"].pop("warmupSteps", None)
        d["spec"]["dataset"]["path"] = str(Path(d["spec"]["dataset"]["path"]).name)
        (tmp_path / Path(d["spec"]["dataset"]["path"]).name).write_text((QUICKSTART / Path(d["spec"]["dataset"]["path"]).name).read_text())
        docs.append(d)
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump_all(docs))
    return tmp_path / "tasks.yaml"
