"""Prompt-tuning adapters are served with their virtual tokens: each request of such an adapter gets
its prompt rows prepended in the cache at positions 0..n-1, as PEFT's forward places them, so greedy
decoding equals PeftModel.generate and logprobs equal PEFT's (fp32, within 1e-4), also when LoRA,
prompt-tuning and base-model requests share one batch and the virtual tokens split across chunks."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
VIRTUAL = 5


@pytest.fixture
def pt_adapters(tmp_path, make_task, data_dir, trainer_factory):
    """A prompt-tuning adapter and a LoRA one, trained a few steps and exported as PEFT directories."""
    from muxtune.api.finetunetask import FineTuneTask

    doc = make_task("pt", data_dir / "upper.jsonl", steps=3, lr=0.3, seed=4).model_dump(by_alias=True,
                                                                                         exclude_none=True)
    doc["spec"]["peft"] = {"method": "prompt_tuning", "numVirtualTokens": VIRTUAL}
    tasks = [FineTuneTask.model_validate(doc), make_task("lora-a", data_dir / "reverse.jsonl", seed=1, steps=3, lr=3e-2)]
    trainer = trainer_factory(tmp_path / "trained")
    for t in tasks:
        trainer.add_task(t)
    trainer.run()
    return {t.metadata.name: trainer.tasks[t.key].out_dir for t in tasks}


def peft_logits(adapter_dir, ids: list[int]) -> torch.Tensor:
    """PEFT's fp32 log_softmax over the real tokens (its prompt tuning returns the virtual rows too)."""
    from tests.serve.test_logprobs_penalties import peft_model

    with torch.no_grad():
        logits = peft_model(adapter_dir)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[logits.shape[0] - len(ids):], -1)


def run_all(engine):
    while engine.has_work():
        engine.step()


def test_prompt_tuning_greedy_equals_peft_in_a_mixed_batch(tiny_backbone, pt_adapters, stack_factory, submitter,
                                                          peft_reference):
    s = stack_factory(tiny_backbone, adapters=pt_adapters, max_num_seqs=8, max_prefill_tokens=7, max_model_len=128)
    assert s.registry.lookup("pt").current.virtual_tokens == VIRTUAL
    cases = [("pt", "upper: hello there\n", 20), ("lora-a", "reverse: abcdef\n", 20), ("base", "plain words", 12),
             ("pt", "upper: ab\n", 16)]
    reqs = [(c, *submitter(s.engine, c[0], c[1], max_tokens=c[2], ignore_eos=True)) for c in cases]
    slots_seen = []
    forward = s.engine.forward

    def spy(items):
        slots_seen.append({it.slot for it in items})
        return forward.__class__.__call__(forward, items)

    s.engine.forward = spy
    run_all(s.engine)
    assert max(len(x) for x in slots_seen) == 3, "prompt tuning, LoRA and the base model in one forward"
    for (model, _, max_tokens), req, events in reqs:
        assert req.output_ids == peft_reference(pt_adapters.get(model), req.prompt_ids, max_tokens, True), model
        assert events[-1].prompt_tokens == len(req.prompt_ids)  # usage counts the client's tokens only
    base_out = peft_reference(None, reqs[0][1].prompt_ids, 20, True)
    assert reqs[0][1].output_ids != base_out, "the virtual tokens change the answer"
    assert s.engine.pool.used == 0


def test_prompt_tuning_logprobs_equal_peft(tiny_backbone, pt_adapters, stack_factory, submitter):
    s = stack_factory(tiny_backbone, adapters=pt_adapters, max_prefill_tokens=4, max_model_len=128)
    req, events = submitter(s.engine, "pt", "upper: abcdefg\n", max_tokens=6, ignore_eos=True, logprobs=3,
                            prompt_logprobs=3)
    echo, echo_events = submitter(s.engine, "pt", "upper: xy\n", max_tokens=0, prompt_logprobs=2)
    run_all(s.engine)
    worst = 0.0
    for r, evs in ((req, events), (echo, echo_events)):
        ids = r.prompt_ids + r.output_ids
        ref = peft_logits(pt_adapters["pt"], ids)
        done = evs[-1]
        assert done.prompt_logprobs[0].logprob is None and len(done.prompt_logprobs) == len(r.prompt_ids)
        entries = done.prompt_logprobs[1:] + [e for ev in evs for e in ev.logprobs]
        assert [e.token for e in entries] == ids[1:]
        for pos, e in enumerate(entries):
            worst = max(worst, abs(e.logprob - ref[pos, e.token].item()))
            top = ref[pos].topk(len(e.top))
            assert [t for t, _ in e.top] == top.indices.tolist()
    assert worst < 1e-4, worst
    print("prompt tuning logprobs max |diff| vs PEFT:", worst)
