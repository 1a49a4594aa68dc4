"""Multiplexing is transparent: a task trained with others ends where it would have ended alone."""
from __future__ import annotations

import pytest


def _train(new_trainer, tasks, output, token_budget=4096):
    trainer = new_trainer(output, token_budget=token_budget)
    for t in tasks:
        trainer.add_task(t)
    trainer.run()
    return trainer


def _weights(trainer, key):
    from safetensors.torch import load_file

    return load_file(trainer.tasks[key].out_dir / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def three_tasks(make_task, data_dir):
    return [
        make_task("lora-r4", data_dir / "reverse.jsonl", r=4, seed=11, steps=8),
        make_task("lora-r16", data_dir / "upper.jsonl", r=16, seed=12, steps=6, batch=6,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), schedule="cosine", warmupSteps=2),
        make_task("ia3", data_dir / "reverse.jsonl", method="ia3", seed=13, steps=10, lr=3e-2,
                  targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",)),
    ]


@pytest.mark.parametrize("token_budget", [4096, 150], ids=["spatial", "spatial+temporal"])
def test_task_trained_with_others_matches_alone(three_tasks, tmp_path, token_budget, trainer_factory):
    together = _train(trainer_factory, three_tasks, tmp_path / "together", token_budget=token_budget)
    assert all(t.phase == "Succeeded" for t in together.tasks.values())
    import json

    fused = [json.loads(ln)["fused_with"] for t in together.tasks.values()
             for ln in (t.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(fused), "the tasks must actually have shared forwards"
    for task in three_tasks:
        alone = _train(trainer_factory, [task], tmp_path / f"alone-{task.metadata.name}")
        diff = _max_diff(_weights(together, task.key), _weights(alone, task.key))
        assert diff < 1e-4, (task.key, diff)
        # and training moved the adapter, so the comparison is not vacuous
        init = trainer_factory(tmp_path / "x").backbone.attach(0, task.spec.peft, task.spec.training.seed)
        moved = max((p.detach() - q).abs().max().item() for p, q in zip(
            init.peft_state_dict().values(), _weights(alone, task.key).values()))
        assert moved > 1e-3


def test_small_budget_forces_turns_and_split_steps(three_tasks, tmp_path, trainer_factory):
    """With a budget below one task's batch, steps span several forwards and tasks wait."""
    rounds = []

    class Spy:
        def round_done(self, r):
            rounds.append(r)

        def __getattr__(self, _):
            return lambda *a, **k: None

    trainer = trainer_factory(tmp_path / "o", token_budget=150)
    trainer.telemetry = Spy()
    for t in three_tasks:
        trainer.add_task(t)
    trainer.run()
    assert any(r.waiting for r in rounds), "some task must have waited its turn"
    assert all(r.real_tokens <= 150 or len(r.fused) == 1 for r in rounds)
    steps = sum(t.max_steps for t in trainer.tasks.values())
    assert len(rounds) > steps / 3, "steps larger than the budget take several forwards"


def test_fair_share_follows_priority(make_task, data_dir, tmp_path, trainer_factory):
    """Under a tight budget the +100-priority task is served about twice the tokens."""
    hi = make_task("hi", data_dir / "reverse.jsonl", steps=200, seed=1)
    hi.spec.priority = 100
    lo = make_task("lo", data_dir / "reverse.jsonl", steps=200, seed=2)
    trainer = trainer_factory(tmp_path / "o", token_budget=100)
    trainer.add_task(hi)
    trainer.add_task(lo)
    for _ in range(60):
        trainer.run_round()
    share = trainer.tasks[hi.key].served_tokens / trainer.tasks[lo.key].served_tokens
    assert 1.6 < share < 2.5, share
