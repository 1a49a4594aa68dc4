"""TaskRuntime.state_dict() / load_state_dict(): full tensors by stable names, through the
checkpoint files and back, bitwise, half-trained step included; and the contract a pipeline
layout relies on (each stage's dict holds its own modules; their union is the whole task)."""
from __future__ import annotations

import copy

import pytest
import torch

from muxtune.engine.durable import checkpoint as ckpt
from muxtune.engine.model.backbone import TaskAdapter


def _equal(a: ckpt.TaskState, b: ckpt.TaskState) -> None:
    assert a.adapter.keys() == b.adapter.keys() and all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
    assert a.optimizer.keys() == b.optimizer.keys()
    for n in a.optimizer:
        assert a.optimizer[n].keys() == b.optimizer[n].keys()
        assert all(torch.equal(a.optimizer[n][k], b.optimizer[n][k]) for k in a.optimizer[n])
    assert a.grads.keys() == b.grads.keys() and all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)
    assert {k: v for k, v in a.meta.items() if k != "cut"} == {k: v for k, v in b.meta.items() if k != "cut"}


@pytest.fixture
def half_trained(make_task, data_dir, tmp_path, trainer_factory):
    """A task three steps in, with a fourth step half run (budget below its batch)."""
    task = make_task("st", data_dir / "reverse.jsonl", r=4, batch=8, steps=20, lr=1e-2,
                     targets=("q_proj", "v_proj", "down_proj"))
    trainer = trainer_factory(tmp_path / "out", token_budget=100)
    rt = trainer.add_task(task)
    while not (rt.step == 3 and rt.pending and len(rt.pending) < 8):
        assert trainer.run_round()
    return trainer, rt


def test_state_round_trips_through_checkpoint_files_bitwise(half_trained, tmp_path, trainer_factory):
    trainer, rt = half_trained
    state = rt.state_dict()
    assert state.meta["in_progress"]["consumed"] > 0 and state.grads, "a half-trained step is part of the state"
    assert all(n.startswith("model.layers.") and n.endswith((".lora_A.weight", ".lora_B.weight")) for n in state.adapter)
    path = ckpt.save(rt.out_dir, copy.deepcopy(state), rt.task.spec.peft, trainer.backbone.path, "step-00000003")
    loaded = ckpt.load(path)
    _equal(state, loaded)

    other = trainer_factory(tmp_path / "other", token_budget=100)
    fresh = other.add_task(rt.task)
    fresh.load_state_dict(loaded)
    _equal(state, fresh.state_dict())
    assert [e.input_ids for e in fresh.pending] == [e.input_ids for e in rt.pending]


def test_stage_dicts_union_is_the_whole_task_and_strict_false_keeps_the_local_part(half_trained):
    trainer, rt = half_trained
    full = rt.state_dict()
    modules = sorted(rt.adapter.deltas)
    halves = [modules[: len(modules) // 2], modules[len(modules) // 2:]]
    stages = []
    for part in halves:  # a stage holds some modules' deltas, and an optimizer over them only
        stage = copy.copy(rt)
        stage.adapter = TaskAdapter(rt.slot, rt.adapter.spec, {m: rt.adapter.deltas[m] for m in part})
        stage.optimizer = torch.optim.AdamW(stage.adapter.parameters())
        stage.optimizer.state.update({p: rt.optimizer.state[p] for p in stage.adapter.parameters()})
        stage.optimizer.param_groups[0].update({k: v for k, v in rt.optimizer.param_groups[0].items() if k != "params"})
        stages.append(stage)
    dicts = [s.state_dict() for s in stages]
    union = ckpt.TaskState(
        adapter={k: v for d in dicts for k, v in d.adapter.items()},
        optimizer={k: v for d in dicts for k, v in d.optimizer.items()},
        grads={k: v for d in dicts for k, v in d.grads.items()}, meta=dicts[0].meta)
    _equal(full, union)

    with pytest.raises(ValueError, match="unknown"):
        stages[0].load_state_dict(full)
    stages[0].load_state_dict(full, strict=False)


def test_tensor_parallel_delta_keeps_its_block_of_whole_state(half_trained, tmp_path, trainer_factory):
    """Whole tensors (any layout's checkpoint) into a task whose deltas are split as tp rank 1 of 2
    would hold them (engine/parallel/tensor.py sets backbone.shards; no process group is needed to load)."""
    from muxtune.engine.peft.base import ShardSpec

    trainer, rt = half_trained
    full = rt.state_dict()
    other = trainer_factory(tmp_path / "tp", token_budget=100)
    for name, lin in other.backbone.linears.items():
        if name.endswith(("q_proj", "v_proj")):  # column-parallel: LoRA B's rows split
            other.backbone.shards[name] = ShardSpec("out", 1, 2, lin.in_features, lin.out_features)
        elif name.endswith("down_proj"):  # row-parallel: LoRA A's columns split
            other.backbone.shards[name] = ShardSpec("in", 1, 2, lin.in_features, lin.out_features)
    part = other.add_task(rt.task)
    part.load_state_dict(full)
    got = part.state_dict()
    for n, whole in full.adapter.items():
        module, split = n.rsplit(".", 2)[0], None
        if n.endswith("lora_B.weight") and not module.endswith("down_proj"):
            split = 0
        elif n.endswith("lora_A.weight") and module.endswith("down_proj"):
            split = 1
        want = whole if split is None else whole.narrow(split, whole.shape[split] // 2, whole.shape[split] // 2)
        assert torch.equal(got.adapter[n], want), n
        assert torch.equal(got.optimizer[n]["exp_avg"], full.optimizer[n]["exp_avg"] if split is None else
                           full.optimizer[n]["exp_avg"].narrow(split, whole.shape[split] // 2, whole.shape[split] // 2)), n
        assert torch.equal(got.grads[n], full.grads[n] if split is None else
                           full.grads[n].narrow(split, whole.shape[split] // 2, whole.shape[split] // 2)), n
