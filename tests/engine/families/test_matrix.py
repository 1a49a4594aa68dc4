"""The architecture matrix: every family of engine/model/families.py, a tiny random checkpoint
built from transformers' own config class, one LoRA task on its attention projections trained by
the engine (fp32, CPU) with sequences longer than the sliding windows; the engine's final
validation loss must equal what PeftModel computes on the saved adapter (<= 1e-4)."""
from __future__ import annotations

import json
import math

import pytest

from muxtune.api.finetunetask import FineTuneTask
from muxtune.engine.model.families import FAMILIES
from tests.helpers.data import data_path, task_doc, write_jsonl
from tests.helpers.models import new_trainer

from .checkpoints import CONFIGS, WINDOW
from .conftest import peft_loss


def family_task(model_type: str, base, data, val, name: str = "t", **kw) -> FineTuneTask:
    """A LoRA task on the family's attention projections (r 4), with a validation set."""
    family = FAMILIES[model_type]
    doc = task_doc(name, data, base=str(base), targets=family.attention_targets, steps=3, batch=4, lr=3e-2, **kw)
    doc["spec"]["dataset"]["validationPath"] = data_path(val)
    return FineTuneTask.model_validate(doc)


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("family-data")
    write_jsonl(d / "train.jsonl", 24, seed=1, kind="reverse")
    write_jsonl(d / "val.jsonl", 5, seed=9, kind="reverse")
    return d / "train.jsonl", d / "val.jsonl"


def test_the_matrix_covers_every_family():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_trained_validation_loss_equals_peftmodel(model_type, family_checkpoint, family_data, tmp_path):
    base = family_checkpoint(model_type)
    train, val = family_data
    trainer = new_trainer(tmp_path / "out", backbone_dir=base)
    assert trainer.backbone.fidelity <= 1e-5  # the probe ran at load, fp32
    task = family_task(model_type, base, train, val)
    trainer.add_task(task)
    trainer.run()
    rt = trainer.tasks[task.key]
    assert rt.phase == "Succeeded", rt.message
    assert max(len(ex.input_ids) for ex in rt.validation) > WINDOW  # the windows cut
    engine = rt.eval_loss
    user = peft_loss(rt.out_dir, rt.validation)
    assert math.isfinite(engine) and abs(engine - user) <= 1e-4, (model_type, engine, user)
    first = json.loads((rt.out_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert rt.last_loss != first  # it trained
    config = json.loads((rt.out_dir / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is FAMILIES[model_type].conv1d  # as PEFT records Conv1D targets
    print(f"{model_type}: engine {engine:.6f} peft {user:.6f} |diff| {abs(engine - user):.2e}")


def test_moe_expert_targets_are_refused_with_the_reason(family_checkpoint, family_data, tmp_path):
    base = family_checkpoint("qwen3_moe")
    train, val = family_data
    trainer = new_trainer(tmp_path / "out", backbone_dir=base)
    task = family_task("qwen3_moe", base, train, val)
    task.spec.peft.target_modules = ["q_proj", "experts"]
    trainer.add_task(task)
    rt = trainer.tasks[task.key]
    assert rt.phase == "Failed" and "experts are fused 3D parameters" in rt.message, rt.message
