"""Checkpoints taken as one cut across a group: a restarted group rolls back to the newest cut all
its tasks hold and replays bitwise (dropout's generator included); one task's checkpoint,
half-trained step included, also resumes on its own in another group."""
from __future__ import annotations

import json
import logging

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # each test trains a group twice and replays it bitwise
BUDGET = 96  # below every batch: steps span several forwards, tasks wait with half-trained steps


class Crash(Exception):
    pass


def _with_dropout(task, p):
    return task.model_copy(update={"spec": task.spec.model_copy(update={"peft": task.spec.peft.model_copy(update={"dropout": p})})})


@pytest.fixture
def group(make_task, data_dir):
    return [
        make_task("a", data_dir / "reverse.jsonl", r=4, batch=4, steps=8, lr=1e-2, seed=1, checkpointInterval=2),
        _with_dropout(make_task("b", data_dir / "upper.jsonl", r=8, batch=6, steps=8, lr=1e-2, seed=2,
                                checkpointInterval=3, targets=("q_proj", "k_proj", "v_proj", "o_proj")), 0.1),
        make_task("c", data_dir / "reverse.jsonl", method="ia3", batch=8, steps=8, lr=3e-2, seed=3,
                  targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",)),
    ]


def _run(trainer_factory, out, tasks, hooks=(), stop=None):
    trainer = trainer_factory(out, token_budget=BUDGET)
    trainer.step_hooks += list(hooks)
    for t in tasks:
        trainer.add_task(t)
    if stop is None:
        trainer.run()
    else:
        trainer.run(stop)
    return trainer


def _metrics(rt):
    return [json.loads(ln) for ln in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]


def _same_steps(a, b):
    return [(m["step"], m["batch"], m["loss"]) for m in a] == [(m["step"], m["batch"], m["loss"]) for m in b]


def test_restart_rolls_back_to_newest_common_cut_and_replays_bitwise(group, tmp_path, trainer_factory, caplog):
    straight = _run(trainer_factory, tmp_path / "straight", group)

    def crash(trainer, rt):
        if rt.key == group[0].key and rt.step == 7:
            raise Crash("killed mid-round")

    with pytest.raises(Crash):
        _run(trainer_factory, tmp_path / "out", group, hooks=[crash])
    a_dir = tmp_path / "out" / "default" / "a" / "checkpoints"
    newest = sorted(a_dir.glob("step-*"))[-1]
    (newest / "state.safetensors").write_bytes(b"\0" * 64)  # a's newest save of the last cut is bad

    resumed = trainer_factory(tmp_path / "out", token_budget=BUDGET)
    for t in group:
        resumed.add_task(t)
    with caplog.at_level(logging.INFO, logger="muxtune.engine"):
        resumed.run()
    assert any(r.getMessage() == "replaying from a common checkpoint cut" for r in caplog.records)
    for t in group:
        ref, got = straight.tasks[t.key], resumed.tasks[t.key]
        assert got.phase == "Succeeded" and _same_steps(_metrics(ref), _metrics(got)), t.key
        a, b = load_file(ref.out_dir / "adapter_model.safetensors"), load_file(got.out_dir / "adapter_model.safetensors")
        assert all((a[k] == b[k]).all() for k in a), t.key


def test_one_tasks_checkpoint_with_half_trained_step_resumes_alone(group, tmp_path, trainer_factory):
    """Stopped (as by SIGTERM) while `a` is mid-step; `a` then resumes in a group of its own."""
    a = group[0]
    straight = _run(trainer_factory, tmp_path / "straight", group)
    rounds = iter(range(1000))

    def stop():
        return next(rounds) >= 9 and any(rt.pending and len(rt.pending) < 4 for rt in first.active() if rt.key == a.key)

    first = trainer_factory(tmp_path / "out", token_budget=BUDGET)
    for t in group:
        first.add_task(t)
    first.run(stop)
    first.save_cut()
    rt = first.tasks[a.key]
    saved = json.loads((sorted((rt.out_dir / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    assert saved["in_progress"] and saved["in_progress"]["consumed"] > 0 and saved["cut"]["members"] == [t.key for t in group]

    alone = trainer_factory(tmp_path / "out", token_budget=BUDGET)
    got = alone.add_task(a)
    assert got.step == saved["step"] and len(got.pending) == 4 - saved["in_progress"]["consumed"]
    alone.run()
    ref = straight.tasks[a.key]
    assert [(m["step"], m["batch"]) for m in _metrics(got)] == [(m["step"], m["batch"]) for m in _metrics(ref)]
    x, y = load_file(ref.out_dir / "adapter_model.safetensors"), load_file(got.out_dir / "adapter_model.safetensors")
    assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-5


def test_crash_between_a_cut_and_a_task_finishing_still_replays_bitwise(group, tmp_path, trainer_factory, monkeypatch):
    """The round where a task reaches maxSteps saves its neighbours' cut first, then finishes it:
    killed in between, the finished task is not finished on disk, and all replay together."""
    group = [group[0].model_copy(update={"spec": group[0].spec.model_copy(
        update={"training": group[0].spec.training.model_copy(update={"max_steps": 5})})})] + group[1:]
    straight = _run(trainer_factory, tmp_path / "straight", group)

    from muxtune.engine.trainer import MuxTrainer

    real = MuxTrainer._finish

    def killed(self, rt):
        if rt.key == group[0].key:
            raise Crash("killed after the cut, before the task finished")
        return real(self, rt)

    monkeypatch.setattr(MuxTrainer, "_finish", killed)
    with pytest.raises(Crash):
        _run(trainer_factory, tmp_path / "out", group)
    monkeypatch.setattr(MuxTrainer, "_finish", real)
    resumed = _run(trainer_factory, tmp_path / "out", group)
    for t in group:
        ref, got = straight.tasks[t.key], resumed.tasks[t.key]
        assert got.phase == "Succeeded" and _same_steps(_metrics(ref), _metrics(got)), t.key
        a, b = load_file(ref.out_dir / "adapter_model.safetensors"), load_file(got.out_dir / "adapter_model.safetensors")
        assert all((a[k] == b[k]).all() for k in a), t.key
