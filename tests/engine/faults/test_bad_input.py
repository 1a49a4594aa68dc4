"""Bad input gets a clear error and loses nothing: invalid specs are refused before training,
a broken task fails alone with its reason, and its neighbours finish."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import yaml

from muxtune.api.loader import SpecError, load_task_files

BAD_SPECS = [
    ("negative rank", lambda d: d["spec"]["peft"].update(r=-1), "spec.peft.r"),
    ("zero rank", lambda d: d["spec"]["peft"].update(r=0), "spec.peft.r"),
    ("unknown method", lambda d: d["spec"]["peft"].update(method="bitfit"), "spec.peft.method"),
    ("missing dataset", lambda d: d["spec"].pop("dataset"), "spec.dataset"),
    ("zero maxSteps", lambda d: d["spec"]["training"].update(maxSteps=0), "spec.training.maxSteps"),
    ("negative lr", lambda d: d["spec"]["training"].update(learningRate=-1e-3), "spec.training.learningRate"),
    ("zero lr", lambda d: d["spec"]["training"].update(learningRate=0), "spec.training.learningRate"),
    ("bad baseModel", lambda d: d["spec"].update(baseModel="hub::llama"), "spec.baseModel"),
    ("dropout 1", lambda d: d["spec"]["peft"].update(dropout=1.0), "spec.peft.dropout"),
    ("unknown field", lambda d: d["spec"]["training"].update(learning_rate_typo=1), "spec.training.learning_rate_typo"),
    ("warmup > steps", lambda d: d["spec"]["training"].update(warmupSteps=99), "spec.training"),
    ("bad name", lambda d: d["metadata"].update(name="Not_A_Label"), "metadata.name"),
]


@pytest.mark.parametrize("case,mutate,field", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_invalid_spec_is_refused_naming_the_field(case, mutate, field, data_dir, tmp_path):
    doc = _good(data_dir)
    mutate(doc)
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as err:
        load_task_files([path])
    assert f"{path}: {field}" in str(err.value)


def test_cli_refuses_before_training_and_writes_nothing(data_dir, tmp_path):
    good, bad = _good(data_dir), _good(data_dir)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["peft"]["r"] = -1
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "muxtune.cli", "run", str(tmp_path / "good.yaml"), str(tmp_path / "bad.yaml"),
         "--output", str(out), "--data-root", str(data_dir), "--no-progress"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "bad.yaml: spec.peft.r: Input should be greater than 0" in proc.stderr
    assert not out.exists(), "nothing may be trained when any spec is invalid"


def _good(data_dir):
    return {
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": "ok"},
        "spec": {"baseModel": "builtin:tiny-llama", "dataset": {"path": "reverse.jsonl"},
                 "peft": {"method": "lora", "r": 4}, "training": {"maxSteps": 2, "learningRate": 1e-3}},
    }


@pytest.mark.parametrize("problem,reason", [
    ("missing", "file not found"),
    ("not-json", ":2: not valid JSON"),
    ("no-field", ":1: missing string field(s) completion"),
    ("bad-target", "peft.targetModules"),
])
def test_broken_task_fails_alone_and_neighbours_finish(problem, reason, make_task, data_dir, tmp_path, trainer_factory):
    data = data_dir / "broken.jsonl"
    if problem == "not-json":
        data.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    elif problem == "no-field":
        data.write_text('{"prompt": "a"}\n')
    elif problem == "bad-target":
        data = data_dir / "reverse.jsonl"
    broken = make_task("broken", data, targets=("c_attn",) if problem == "bad-target" else ("q_proj",))
    good = make_task("good", data_dir / "upper.jsonl", steps=3)
    trainer = trainer_factory(tmp_path / "out")
    trainer.add_task(broken)
    trainer.add_task(good)
    trainer.run()
    b, g = trainer.tasks[broken.key], trainer.tasks[good.key]
    assert b.phase == "Failed" and reason in b.message, b.message
    assert g.phase == "Succeeded" and (g.out_dir / "adapter_model.safetensors").exists()
    status = yaml.safe_load((b.out_dir / "status.json").read_text())
    assert status["phase"] == "Failed" and reason in status["message"]


def test_nan_fails_only_that_task_and_neighbours_train_as_if_alone(make_task, data_dir, tmp_path, trainer_factory):
    """Inject a fault (inf in one adapter after its 2nd step). It shares chunks with its
    neighbour, where 0 * inf in attention would poison both; the engine isolates it."""
    sick = make_task("sick", data_dir / "reverse.jsonl", steps=6, seed=1)
    well = make_task("well", data_dir / "upper.jsonl", steps=6, seed=2)

    def inject(trainer, rt):
        if rt.key == sick.key and rt.step == 2:
            with torch.no_grad():
                next(iter(rt.adapter.parameters())).fill_(float("inf"))

    trainer = trainer_factory(tmp_path / "together")
    trainer.step_hooks.append(inject)
    trainer.add_task(sick)
    trainer.add_task(well)
    trainer.run()
    assert trainer.tasks[sick.key].phase == "Failed"
    assert "non-finite" in trainer.tasks[sick.key].message
    assert trainer.tasks[well.key].phase == "Succeeded"

    alone = trainer_factory(tmp_path / "alone")
    alone.add_task(copy.deepcopy(well))
    alone.run()
    from safetensors.torch import load_file

    a = load_file(trainer.tasks[well.key].out_dir / "adapter_model.safetensors")
    b = load_file(alone.tasks[well.key].out_dir / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
