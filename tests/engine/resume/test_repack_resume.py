"""Repacking (operator/repack.py) moves a task through its checkpoint into another group: stopped mid-step
in one group, it resumes in a group of other neighbours, another token budget and --recompute, and its
step sequence (step, batch) and final adapter are those of the uninterrupted run: no step lost."""
from __future__ import annotations

import json

from safetensors.torch import load_file


def _metrics(rt):
    return [json.loads(ln) for ln in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]


def test_moved_task_keeps_its_step_sequence(make_task, data_dir, tmp_path, trainer_factory):
    a = make_task("a", data_dir / "reverse.jsonl", r=8, batch=6, steps=6, lr=1e-2, seed=2, checkpointInterval=2,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    a.spec.peft.dropout = 0.1  # its own dropout generator travels in the checkpoint
    first_neighbour = make_task("n1", data_dir / "upper.jsonl", r=4, batch=4, steps=20, seed=1)
    second_neighbour = make_task("n2", data_dir / "upper.jsonl", method="ia3", batch=8, steps=20, lr=3e-2, seed=3,
                                 targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",))

    straight = trainer_factory(tmp_path / "straight", token_budget=96)
    straight.add_task(a)
    straight.run()

    source = trainer_factory(tmp_path / "out", token_budget=96)  # the drained group
    for t in (a, first_neighbour):
        source.add_task(t)
    rounds = iter(range(1000))
    source.run(lambda: next(rounds) >= 7 and any(rt.key == a.key and rt.pending for rt in source.active()))
    source.save_cut()  # what the engine does when a member leaves
    moved_at = source.tasks[a.key].step
    assert 0 < moved_at < 6

    target = trainer_factory(tmp_path / "out", token_budget=300)  # the receiving group: other budget, recompute
    target.backbone.recompute = True
    target.add_task(second_neighbour)
    got = target.add_task(a)
    assert got.step <= moved_at
    while got.phase == "Running" and target.run_round():
        pass
    ref = straight.tasks[a.key]
    assert got.phase == "Succeeded"
    assert [(m["step"], m["batch"]) for m in _metrics(got)] == [(m["step"], m["batch"]) for m in _metrics(ref)]
    x, y = load_file(ref.out_dir / "adapter_model.safetensors"), load_file(got.out_dir / "adapter_model.safetensors")
    # the same batches in the same order; other neighbours and budget only reorder fp32 sums
    assert max((x[k] - y[k]).abs().max().item() for k in x) < 5e-4
