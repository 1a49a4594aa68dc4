"""A model directory whose config maps its classes to its own Python files (auto_map) is refused in
one line, its code never run, unless the user allows it with --trust-remote-code. The directory's
code here writes a file when imported: the file's absence proves nothing ran."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers.models import save_tiny_checkpoint
from tests.helpers.data import task_doc, write_jsonl

CONFIG_CODE = '''import os, pathlib
pathlib.Path(os.environ["MUXTUNE_TEST_MARKER"]).write_text("the model directory's code ran")
from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "remote_llama"
'''
MODEL_CODE = '''from transformers import LlamaForCausalLM
from .configuration_remote import RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


@pytest.fixture
def workdir(tmp_path):
    model = save_tiny_checkpoint("llama", tmp_path / "remote-model")
    (model / "configuration_remote.py").write_text(CONFIG_CODE)
    (model / "modeling_remote.py").write_text(MODEL_CODE)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="remote_llama", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    write_jsonl(tmp_path / "d.jsonl", 8)
    doc = task_doc("t", tmp_path / "d.jsonl", base="./remote-model", steps=1)
    doc["spec"]["dataset"]["path"] = "d.jsonl"
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path


def _run(workdir, *flags):
    marker = workdir / "code-ran.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUXTUNE_TEST_MARKER": str(marker), "HF_HOME": str(workdir / "hf")}
    proc = subprocess.run([sys.executable, "-m", "muxtune.cli", "run", "tasks.yaml", "--output", "out", "--no-progress",
                           "--device", "cpu", *flags], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    status = json.loads((workdir / "out" / "default" / "t" / "status.json").read_text())
    return proc, status, marker


def test_remote_code_is_refused_in_one_line_and_never_runs(workdir):
    proc, status, marker = _run(workdir)
    assert proc.returncode == 1 and status["phase"] == "Failed"
    assert "config.json asks to run Python code from the model directory (auto_map); refused" in status["message"]
    assert "--trust-remote-code" in status["message"] and "\n" not in status["message"]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_trust_remote_code_lets_it_load(workdir):
    proc, status, marker = _run(workdir, "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert status["phase"] == "Succeeded" and marker.exists()
    shutil.rmtree(workdir / "hf", ignore_errors=True)
