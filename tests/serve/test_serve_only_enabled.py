"""In a pod (`--serve-tasks enabled`) only tasks whose spec.serving.enabled is true are served:
the others' adapters are not listed and requests for them get 404; switching serving off in place
stops new requests; /v1/status tells the operator which tasks answer (servedModel)."""
from __future__ import annotations


def test_only_enabled_tasks_are_served_and_reported(make_task, data_dir, tmp_path, trainer_factory):
    from muxtune.engine.observe.engine_metrics import EngineMetrics
    from muxtune.engine.run import reconcile
    from muxtune.engine.serve.adapters import AdapterRegistry

    on = make_task("on", data_dir / "reverse.jsonl", steps=3)
    on.metadata.namespace = "team-a"
    on.spec.serving.enabled = True
    off = make_task("off", data_dir / "upper.jsonl", steps=3)
    off.metadata.namespace = "team-a"
    trainer = trainer_factory(tmp_path / "out")
    for t in (on, off):
        trainer.add_task(t)
    reg = AdapterRegistry(trainer.backbone, "base", trainer, only_enabled=True)
    reg.sync_tasks()
    assert [m.name for m in reg.models()] == ["team-a/on"]
    assert reg.lookup("team-a/off") is None and reg.lookup("team-a/on").task_key == "team-a/on"
    metrics = EngineMetrics()
    metrics.attach(trainer)
    metrics.status_extras.append(reg.served_tasks)
    tasks = metrics.status()["tasks"]
    assert tasks["team-a/on"]["servedModel"] == "team-a/on" and "servedModel" not in tasks["team-a/off"]

    # serving switched off in the task file: applied in place (training goes on), no longer served
    off_now = on.model_copy(deep=True)
    off_now.spec.serving.enabled = False
    rt = trainer.tasks["team-a/on"]
    reconcile(trainer, [off_now, off])
    assert trainer.tasks["team-a/on"] is rt and rt.phase == "Running"
    reg.sync_tasks()
    assert reg.models() == [] and reg.lookup("team-a/on") is None
    # without the flag (muxtune run --serve-port locally) every task is served
    everyone = AdapterRegistry(trainer.backbone, "base", trainer)
    everyone.sync_tasks()
    assert sorted(m.name for m in everyone.models()) == ["team-a/off", "team-a/on"]


def test_a_prompt_tuning_task_is_served_with_its_virtual_tokens(make_task, data_dir, tmp_path, trainer_factory):
    """Prompt tuning's delta sits at the input embeddings: its task is listed and answers, each request
    with the task's virtual tokens in front (a frozen copy of the prompt, in a slot of its own)."""
    from muxtune.api.finetunetask import FineTuneTask
    from muxtune.engine.serve.adapters import AdapterRegistry

    lora = make_task("lora", data_dir / "reverse.jsonl", steps=3)
    doc = make_task("prompt", data_dir / "upper.jsonl", steps=3).model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["peft"] = {"method": "prompt_tuning", "numVirtualTokens": 4}
    prompt = FineTuneTask.model_validate(doc)
    trainer = trainer_factory(tmp_path / "out")
    for t in (lora, prompt):
        trainer.add_task(t)
    trainer.run_round()  # both Running
    reg = AdapterRegistry(trainer.backbone, "base", trainer)
    reg.sync_tasks()
    assert sorted(m.name for m in reg.models()) == ["lora", "prompt"]
    version = reg.acquire(reg.lookup("prompt"))
    live = trainer.tasks[prompt.key].adapter
    assert version.virtual_tokens == 4 and version.slot != live.slot
    assert trainer.backbone.prompts[version.slot].prompt_embeddings.equal(
        trainer.backbone.prompts[live.slot].prompt_embeddings)


def test_a_task_removed_from_the_run_leaves_the_model_list(make_task, data_dir, tmp_path, trainer_factory):
    """A deleted FineTuneTask leaves the group's task file, so the trainer drops it: its adapter must
    then leave /v1/models and stop answering (it used to stay listed)."""
    from muxtune.engine.run import reconcile
    from muxtune.engine.serve.adapters import AdapterRegistry

    keep, gone = (make_task(n, data_dir / "reverse.jsonl", steps=3) for n in ("keep", "gone"))
    for t in (keep, gone):
        t.metadata.namespace = "team-a"
        t.spec.serving.enabled = True
    trainer = trainer_factory(tmp_path / "out")
    for t in (keep, gone):
        trainer.add_task(t)
    reg = AdapterRegistry(trainer.backbone, "base", trainer, only_enabled=True)
    reg.sync_tasks()
    assert sorted(m.name for m in reg.models()) == ["team-a/gone", "team-a/keep"]
    reconcile(trainer, [keep])
    reg.sync_tasks()
    assert [m.name for m in reg.models()] == ["team-a/keep"]
    assert reg.lookup("team-a/gone") is None
