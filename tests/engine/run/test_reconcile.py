"""`muxtune run --watch` applies a changed task file to the running trainer (engine/run.py)."""
from __future__ import annotations

from muxtune.engine.run import reconcile


def test_priority_change_applies_in_place_other_changes_restart(trainer_factory, make_task, data_dir, tmp_path):
    a = make_task("a", data_dir / "reverse.jsonl", steps=50)
    b = make_task("b", data_dir / "upper.jsonl", steps=50)
    trainer = trainer_factory(tmp_path / "out")
    for t in (a, b):
        trainer.add_task(t)
    for _ in range(3):
        assert trainer.run_round()
    rt_a, rt_b = trainer.tasks[a.key], trainer.tasks[b.key]
    step_a = rt_a.step
    assert step_a > 0 and rt_a.phase == "Running"

    # priority only: same runtime, same step, optimizer and adapter; the scheduler sees the new weight
    a2 = a.model_copy(update={"spec": a.spec.model_copy(update={"priority": 300})})
    reconcile(trainer, [a2, b])
    assert trainer.tasks[a.key] is rt_a and rt_a.step == step_a and rt_a.phase == "Running"
    assert rt_a.priority == 300
    assert trainer.tasks[b.key] is rt_b

    # anything that defines the trajectory: the task is taken out (checkpointed) and added anew
    b2 = b.model_copy(update={"spec": b.spec.model_copy(
        update={"training": b.spec.training.model_copy(update={"learning_rate": 1e-4})})})
    reconcile(trainer, [a2, b2])
    assert trainer.tasks[b.key] is not rt_b and rt_b.phase == "Suspended"
    assert list((tmp_path / "out" / "default" / "b" / "checkpoints").glob("step-*"))
    # its checkpoints belong to the old spec: resuming them would train something else
    new_b = trainer.tasks[b.key]
    assert new_b.phase == "Failed" and "different spec" in new_b.message

    # gone from the file: removed, neighbours untouched
    reconcile(trainer, [b2])
    assert a.key not in trainer.tasks and rt_a.phase == "Suspended" and rt_a.step == step_a
