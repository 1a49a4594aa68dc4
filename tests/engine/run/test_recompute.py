"""--recompute (activation checkpointing per decoder layer) changes memory, not results: tasks trained
with it end where they end without it, with a token budget small enough that steps span rounds."""
from __future__ import annotations

import json

import pytest


def _train(new_trainer, tasks, output, recompute: bool, token_budget: int):
    trainer = new_trainer(output, token_budget=token_budget)
    trainer.backbone.recompute = recompute
    for t in tasks:
        trainer.add_task(t)
    trainer.run()
    return trainer


def _losses(trainer, key):
    return [json.loads(ln)["loss"] for ln in (trainer.tasks[key].out_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(ln)]


@pytest.mark.parametrize("token_budget", [4096, 150], ids=["fused", "budgeted"])
def test_recompute_gives_the_same_training(make_task, data_dir, tmp_path, trainer_factory, token_budget):
    from safetensors.torch import load_file

    lora = make_task("lora", data_dir / "reverse.jsonl", r=8, seed=5, steps=4)
    lora.spec.peft.dropout = 0.1  # the recomputation must draw the same dropout masks
    tasks = [lora,
             make_task("ia3", data_dir / "upper.jsonl", method="ia3", seed=6, steps=3, lr=3e-2,
                       targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",))]
    plain = _train(trainer_factory, tasks, tmp_path / "plain", False, token_budget)
    again = _train(trainer_factory, tasks, tmp_path / "recompute", True, token_budget)
    for t in tasks:
        assert again.tasks[t.key].phase == "Succeeded"
        assert _losses(again, t.key) == pytest.approx(_losses(plain, t.key), abs=1e-6)
        a = load_file(plain.tasks[t.key].out_dir / "adapter_model.safetensors")
        b = load_file(again.tasks[t.key].out_dir / "adapter_model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_recompute_keeps_only_layer_inputs(make_task, data_dir, tmp_path, trainer_factory):
    """What autograd keeps across the forward (outside the checkpointed layers) shrinks to the layers'
    inputs: the saved-tensor meter of the memory-model test sees far less with --recompute."""
    from tests.helpers.engine_memory import SavedTensorMeter

    peaks = []
    for recompute in (False, True):
        trainer = trainer_factory(tmp_path / f"m{recompute}")
        trainer.backbone.recompute = recompute
        trainer.add_task(make_task("lora", data_dir / "reverse.jsonl", r=8, seed=5, steps=1))
        params = {p.untyped_storage().data_ptr() for p in trainer.backbone.model.parameters()}
        meter = SavedTensorMeter(params)
        with meter.hooks():
            trainer.run_round()
        peaks.append(meter.peak)
    assert 0 < peaks[1] < peaks[0] / 2, peaks
