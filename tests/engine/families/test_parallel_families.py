"""Pipeline (pp=2) and data-parallel (dp=2) runs of several families equal one process: GPT-2
(Conv1D, learned positions), Mistral (a sliding window shorter than the sequences), Gemma 2
(softcaps, alternating windows) and OPT (projections in/out); adapters within 1e-4 (fp32) and the
same validation loss. Real processes (`muxtune run --pp 2`, gloo), so these are slow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from muxtune.engine.model.families import FAMILIES
from tests.helpers.data import task_doc, write_jsonl

pytestmark = pytest.mark.slow


def _workdir(root, model_type: str, base) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", 24, seed=1, kind="reverse")
    write_jsonl(root / "val.jsonl", 5, seed=9, kind="reverse")
    docs = []
    for i, name in enumerate(("a", "b")):
        doc = task_doc(name, root / "train.jsonl", base=str(base), targets=FAMILIES[model_type].attention_targets,
                       steps=3, batch=4, lr=3e-2, seed=i)
        doc["spec"]["dataset"].update(path="train.jsonl", validationPath="val.jsonl")
        docs.append(doc)
    (root / "tasks.yaml").write_text(yaml.safe_dump_all(docs))


def _run(root, out: str, *flags) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "muxtune.cli", "run", "tasks.yaml", "--output", out, "--no-progress",
                           "--device", "cpu", *flags], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _result(root, out: str, name: str):
    d = root / out / "default" / name
    return load_file(d / "adapter_model.safetensors"), json.loads((d / "status.json").read_text())["evalLoss"]


@pytest.mark.parametrize("model_type,flags", [
    ("gpt2", ("--pp", "2")),
    ("mistral", ("--pp", "2")),
    ("gemma2", ("--pp", "2")),
    ("opt", ("--dp", "2")),
])
def test_parallel_layout_equals_one_process(model_type, flags, family_checkpoint, tmp_path):
    root = tmp_path / "w"
    _workdir(root, model_type, family_checkpoint(model_type))
    _run(root, "single")
    _run(root, "parallel", *flags)
    for name in ("a", "b"):
        (want, want_eval), (got, got_eval) = _result(root, "single", name), _result(root, "parallel", name)
        assert want.keys() == got.keys()
        diff = max((want[k] - got[k]).abs().max().item() for k in want)
        assert diff < 1e-4, (model_type, name, diff)
        assert abs(want_eval - got_eval) < 1e-5, (model_type, name, want_eval, got_eval)
