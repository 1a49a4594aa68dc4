"""DoRA and prompt tuning: exported adapters load with PeftModel and reproduce the engine's
logits, training moves them, a checkpoint resumes them, and they stay transparent in a mix with
LoRA and IA3 (a task trained with others ends where it would alone)."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from muxtune.api.finetunetask import FineTuneTask
from muxtune.engine.data.dataset import encode
from muxtune.engine.packing import PackedSequence, pack
from muxtune.engine.peft.export import load_adapter_weights
from muxtune.engine.peft.prompt_tuning import prepend_virtual
from tests.helpers.data import task_doc

VIRTUAL = 5


def _dora(name, data, **kw):
    doc = task_doc(name, data, r=4, targets=("q_proj", "v_proj", "down_proj"), lr=2e-2, **kw)
    doc["spec"]["peft"]["useDora"] = True
    return FineTuneTask.model_validate(doc)


def _prompt(name, data, init=None, **kw):
    doc = task_doc(name, data, lr=5e-2, **kw)
    doc["spec"]["peft"] = {"method": "prompt_tuning", "numVirtualTokens": VIRTUAL}
    if init:
        doc["spec"]["peft"].update(init)
    return FineTuneTask.model_validate(doc)


def _train(factory, tasks, out, **kw):
    trainer = factory(out, **kw)
    for t in tasks:
        trainer.add_task(t)
    trainer.run()
    assert all(t.phase == "Succeeded" for t in trainer.tasks.values()), [t.message for t in trainer.tasks.values()]
    return trainer


@pytest.mark.parametrize("kind", ["dora", "prompt_tuning"])
def test_exported_adapter_reproduces_engine_logits(kind, data_dir, tmp_path, trainer_factory, make_task):
    task = _dora("m", data_dir / "reverse.jsonl", steps=4) if kind == "dora" else \
        _prompt("m", data_dir / "reverse.jsonl", {"promptTuningInit": "TEXT", "promptTuningInitText": "rev"}, steps=4)
    trainer = _train(trainer_factory, [task, make_task("nb", data_dir / "upper.jsonl", steps=4, seed=3)], tmp_path / "o")
    out = trainer.tasks[task.key].out_dir
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if kind == "dora" else "PROMPT_TUNING")
    assert config.get("use_dora", False) == (kind == "dora")

    adapter = trainer.backbone.attach(99, task.spec.peft, 0)
    load_adapter_weights(adapter, out)
    n = VIRTUAL if kind == "prompt_tuning" else 0
    tok = trainer.backbone.tokenizer
    examples = [encode(tok, t, "fedcba", 48, True) for t in ("reverse: abcdef\n", "reverse: hello\n", "x")]
    seqs = [PackedSequence(99, ex) for ex in prepend_virtual(examples, n)]
    batch = pack(seqs, 64, torch.device("cpu"))
    with torch.no_grad():
        engine_logits = trainer.backbone.logits(batch)

    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    for i, ex in enumerate(examples):
        row, start, length = batch.spans[i]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
        assert ref.shape[0] == len(ex.input_ids) + n  # PEFT prepends the virtual tokens too
        assert (ref - engine_logits[row, start:start + length]).abs().max().item() < 1e-5
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=torch.tensor([examples[0].input_ids])).logits[0]
    row, start, length = batch.spans[0]
    assert (plain - engine_logits[row, start + n:start + length]).abs().max().item() > 1e-3


def test_transparency_with_dora_and_prompt_tuning_in_the_mix(data_dir, tmp_path, trainer_factory, make_task):
    tasks = [
        _dora("dora", data_dir / "reverse.jsonl", steps=5, seed=21),
        _prompt("prompt", data_dir / "upper.jsonl", steps=6, seed=22),
        make_task("lora", data_dir / "upper.jsonl", r=8, steps=5, seed=23),
        make_task("ia3", data_dir / "reverse.jsonl", method="ia3", seed=24, steps=5, lr=3e-2,
                  targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",)),
    ]
    together = _train(trainer_factory, tasks, tmp_path / "together", token_budget=300)
    fused = [json.loads(ln)["fused_with"] for t in together.tasks.values()
             for ln in (t.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(fused)
    for task in tasks[:2]:
        alone = _train(trainer_factory, [task], tmp_path / f"alone-{task.metadata.name}")
        a = load_file(together.tasks[task.key].out_dir / "adapter_model.safetensors")
        b = load_file(alone.tasks[task.key].out_dir / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, task.key
        init = trainer_factory(tmp_path / "x").backbone.attach(0, task.spec.peft, task.spec.training.seed)
        moved = max((init.peft_state_dict()[k] - b[k]).abs().max().item() for k in b)
        assert moved > 1e-3, task.key


def test_prompt_tokens_are_counted_and_resume(data_dir, tmp_path, trainer_factory):
    task = _prompt("p", data_dir / "reverse.jsonl", steps=4, checkpointInterval=2)
    trainer = trainer_factory(tmp_path / "o")
    rt = trainer.add_task(task)
    ex = rt.stream.examples[0]
    assert ex.input_ids[:VIRTUAL] == tuple(range(-1, -VIRTUAL - 1, -1)) and rt.stream.examples[0].label_tokens
    trainer.run()
    lines = [json.loads(x) for x in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]
    # the step's tokens include the virtual positions (the packing and the budget count them)
    from muxtune.engine.data.dataset import DataStream

    first = DataStream(rt.stream.examples, task.spec.training.seed, True).next_batch(task.spec.training.batch_size)
    assert all(e.input_ids[:VIRTUAL] == ex.input_ids[:VIRTUAL] for e in first)
    assert lines[0]["tokens"] == sum(len(e.input_ids) for e in first)
    # a run stopped at the step-2 checkpoint resumes to the same end
    t2 = trainer_factory(tmp_path / "o2")
    r2 = t2.add_task(task)
    t2.run(should_stop=lambda: r2.step >= 2)
    t2.remove_task(task.key)
    t3 = trainer_factory(tmp_path / "o2")
    r3 = t3.add_task(task)
    assert r3.step == 2
    t3.run()
    a = load_file(rt.out_dir / "adapter_model.safetensors")
    b = load_file(r3.out_dir / "adapter_model.safetensors")
    assert list(a) == ["prompt_embeddings"] and (a["prompt_embeddings"] - b["prompt_embeddings"]).abs().max() < 1e-6


@pytest.mark.parametrize("peft", [
    {"method": "lora", "r": 4, "targetModules": ["q_proj", "k_proj", "down_proj", "lm_head"]},
    {"method": "lora", "r": 4, "useDora": True, "targetModules": ["q_proj", "v_proj", "down_proj"]},
    {"method": "ia3", "targetModules": ["k_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]},
    {"method": "prompt_tuning", "numVirtualTokens": VIRTUAL},
], ids=["lora", "dora", "ia3", "prompt_tuning"])
def test_declared_trainable_shapes_are_the_engines(peft):
    """Each method's torch-free shape (muxtune.facts.methods, which the operator's memory model
    sizes from) counts exactly the parameters the engine's deltas train, Linear by Linear."""
    from muxtune.api.finetunetask import PeftSpec
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import builtin_path, load_backbone
    from muxtune.facts.methods import Linear, get_peft_method

    backbone = MultiplexedBackbone(load_backbone(builtin_path("tiny-llama"), torch.device("cpu"), torch.float32))
    spec = PeftSpec.model_validate(peft)
    adapter, decl = backbone.attach(1, spec, seed=0), get_peft_method(spec.method)
    assert adapter.deltas
    for module, delta in adapter.deltas.items():
        trained = sum(p.numel() for p in delta.parameters() if p.requires_grad)
        if decl.attaches == "input":
            assert trained == decl.input_params(spec, backbone.model.config.hidden_size)
            continue
        base = backbone.linears[module]
        m = Linear(module.rsplit(".", 1)[-1], base.in_features, base.out_features, True, False)
        assert trained == decl.linear_params(spec, m), module
