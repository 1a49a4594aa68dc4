"""Evaluation (validation loss in metrics.jsonl, status, Prometheus), epochs, and a chat task
trained end to end with its template saved beside the adapter."""
from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from muxtune.engine.data.dataset import IGNORE
from muxtune.engine.observe.engine_metrics import EngineMetrics


def _lines(rt):
    return [json.loads(x) for x in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]


def _peft_loss(out_dir, examples) -> float:
    """Mean validation token loss computed the user's way: PeftModel over each example alone."""
    config = json.loads((out_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out_dir).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            t = torch.tensor(ex.targets)
            keep = t != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], t[keep], reduction="sum"))
            n += int(keep.sum())
    return total / n


def test_eval_loss_reported_everywhere_and_changes_no_training(make_task, data_dir, tmp_path, trainer_factory):
    (data_dir / "val.jsonl").write_text("".join((data_dir / "upper.jsonl").read_text().splitlines(True)[:6]))
    from tests.helpers.data import data_path, task_doc
    from muxtune.api.finetunetask import FineTuneTask

    kw = dict(steps=4, lr=2e-2)
    doc = task_doc("ev", data_dir / "reverse.jsonl", evalInterval=3, **kw)
    doc["spec"]["dataset"]["validationPath"] = data_path(data_dir / "val.jsonl")
    doc["spec"]["peft"]["dropout"] = 0.1  # evaluation must not draw from the task's dropout stream
    evald = FineTuneTask.model_validate(doc)
    plain_doc = json.loads(json.dumps(doc))
    del plain_doc["spec"]["dataset"]["validationPath"]
    plain = FineTuneTask.model_validate(plain_doc)
    neighbour = make_task("nb", data_dir / "upper.jsonl", seed=5, **kw)

    trainer = trainer_factory(tmp_path / "a")
    metrics = EngineMetrics()
    metrics.attach(trainer)
    trainer.telemetry = metrics
    for t in (evald, neighbour):
        trainer.add_task(t)
    trainer.run()
    rt = trainer.tasks[evald.key]
    lines = _lines(rt)
    assert [ln["step"] for ln in lines if "eval_loss" in ln] == [3, 4]  # every 3 steps and after the last
    last = lines[-1]["eval_loss"]
    assert math.isfinite(last) and last != lines[2]["eval_loss"]
    assert rt.status()["evalLoss"] == last == json.loads((rt.out_dir / "status.json").read_text())["evalLoss"]
    assert metrics.registry.get_sample_value("muxtune_task_eval_loss", {"namespace": "default", "task": "ev"}) == last
    assert metrics.registry.get_sample_value("muxtune_task_eval_loss", {"namespace": "default", "task": "nb"}) is None
    assert "eval_loss" not in _lines(trainer.tasks[neighbour.key])[-1]
    # the engine's number is the adapter's real validation loss
    assert last == pytest.approx(_peft_loss(rt.out_dir, rt.validation), abs=1e-5)

    # the same task without validation, with the same neighbour, trains identically (dropout on:
    # evaluation drew nothing from the task's stream)
    solo = trainer_factory(tmp_path / "b")
    solo.add_task(plain)
    solo.add_task(neighbour)
    solo.run()
    assert [ln["loss"] for ln in _lines(solo.tasks[plain.key])] == [ln["loss"] for ln in lines]


def test_epochs_set_the_steps(make_task, data_dir, tmp_path, trainer_factory):
    (data_dir / "ten.jsonl").write_text("".join((data_dir / "reverse.jsonl").read_text().splitlines(True)[:10]))
    from tests.helpers.data import task_doc
    from muxtune.api.finetunetask import FineTuneTask

    doc = task_doc("ep", data_dir / "ten.jsonl", batch=4, schedule="linear")
    del doc["spec"]["training"]["maxSteps"]
    doc["spec"]["training"]["epochs"] = 2
    task = FineTuneTask.model_validate(doc)
    trainer = trainer_factory(tmp_path / "out")
    rt = trainer.add_task(task)
    assert rt.max_steps == 5  # ceil(2 * 10 / 4)
    assert rt.status()["totalSteps"] == 5
    trainer.run()
    assert rt.phase == "Succeeded" and rt.step == 5 and len(_lines(rt)) == 5
    # the linear schedule decays to zero at the derived last step
    assert rt.scheduler.lr_lambdas[0](5) == 0.0 and rt.scheduler.lr_lambdas[0](4) > 0


def test_chat_task_trains_and_saves_its_template(tmp_path, trainer_factory, data_dir):
    from tests.helpers.data import data_path, task_doc
    from tests.helpers.data import CHATML, CONVO
    from muxtune.api.finetunetask import FineTuneTask

    f = data_dir / "chat.jsonl"
    f.write_text((json.dumps(CONVO) + "\n") * 8)
    doc = task_doc("chat", f, steps=3)
    doc["spec"]["dataset"].update(format="chat", chatTemplate=CHATML, maxSeqLen=256)
    task = FineTuneTask.model_validate(doc)
    trainer = trainer_factory(tmp_path / "out")
    rt = trainer.add_task(task)
    trainer.run()
    assert rt.phase == "Succeeded", rt.message
    assert (rt.out_dir / "chat_template.jinja").read_text() == CHATML
    # the label tokens per step are the assistant tokens only
    ex = rt.stream.examples[0]
    assert _lines(rt)[0]["label_tokens"] == 4 * ex.label_tokens < 4 * len(ex.input_ids) / 3


def test_chat_without_template_fails_the_task_alone(tmp_path, trainer_factory, data_dir, make_task):
    from tests.helpers.data import task_doc
    from tests.helpers.data import CONVO
    from muxtune.api.finetunetask import FineTuneTask

    f = data_dir / "chat.jsonl"
    f.write_text(json.dumps(CONVO) + "\n")
    doc = task_doc("chat", f, steps=2)
    doc["spec"]["dataset"]["format"] = "chat"
    trainer = trainer_factory(tmp_path / "out")
    bad = trainer.add_task(FineTuneTask.model_validate(doc))
    good = trainer.add_task(make_task("ok", data_dir / "upper.jsonl", steps=2))
    trainer.run()
    assert bad.phase == "Failed" and "no chat template; set dataset.chatTemplate" in bad.message
    assert good.phase == "Succeeded"
