"""The adapters muxtune writes are standard PEFT: PeftModel loads them and reproduces the engine."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from muxtune.engine.data.dataset import encode
from muxtune.engine.packing import PackedSequence, pack


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peftmodel_loads_adapter_and_matches_engine_logits(method, make_task, data_dir, tmp_path, trainer_factory):
    kw = dict(method="ia3", targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",), lr=5e-2) if method == "ia3" \
        else dict(r=8, targets=("q_proj", "v_proj", "gate_proj"), lr=2e-2)
    task = make_task("rt", data_dir / "reverse.jsonl", steps=5, **kw)
    other = make_task("neighbour", data_dir / "upper.jsonl", steps=5, seed=4)
    trainer = trainer_factory(tmp_path / "out")
    trainer.add_task(task)
    trainer.add_task(other)
    trainer.run()
    out = trainer.tasks[task.key].out_dir
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    assert config["base_model_name_or_path"] == str(trainer.backbone.path)

    # the engine's view: re-attach the trained weights and run a packed forward
    from muxtune.engine.peft.export import load_adapter_weights

    adapter = trainer.backbone.attach(99, task.spec.peft, 0)
    load_adapter_weights(adapter, out)
    texts = ["reverse: abcdef\n", "reverse: hello\n", "x"]
    seqs = [PackedSequence(99, encode(trainer.backbone.tokenizer, t, "fedcba", 48, True)) for t in texts]
    batch = pack(seqs, 64, torch.device("cpu"))
    with torch.no_grad():
        engine_logits = trainer.backbone.logits(batch)

    # the user's view: the real loading path, base model from the adapter's own config
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    for i, s in enumerate(seqs):
        row, start, n = batch.spans[i]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([s.example.input_ids])).logits[0]
        assert (ref - engine_logits[row, start:start + n]).abs().max().item() < 1e-5
    # and the trained adapter is not the identity, so the comparison means something
    row, start, n = batch.spans[0]
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=torch.tensor([seqs[0].example.input_ids])).logits[0]
    assert (plain - engine_logits[row, start:start + n]).abs().max().item() > 1e-3


def test_checkpoints_are_peft_adapters_too(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("ck", data_dir / "reverse.jsonl", steps=4, checkpointInterval=2)
    trainer = trainer_factory(tmp_path / "out")
    trainer.add_task(task)
    trainer.run()
    ckpts = sorted((trainer.tasks[task.key].out_dir / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]
    base = AutoModelForCausalLM.from_pretrained(trainer.backbone.path, dtype=torch.float32)
    PeftModel.from_pretrained(base, ckpts[0])  # loads without error
