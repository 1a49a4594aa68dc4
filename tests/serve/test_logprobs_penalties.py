"""Logprobs are the adapter's own (PEFT's fp32 log_softmax, prompt and generated tokens, within 1e-4),
and the penalties and min_tokens choose tokens as transformers' logits processors do: greedy
decoding with repetition_penalty and min_tokens equals PeftModel.generate with the same settings."""
from __future__ import annotations

import pytest
import torch

from muxtune.engine.serve.sampling import SamplingParams, process


def peft_model(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from muxtune.engine.model.loading import builtin_path

    base = AutoModelForCausalLM.from_pretrained(builtin_path("tiny-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir is not None else base
    return model.eval()


def run_all(engine):
    while engine.has_work():
        engine.step()


@pytest.mark.slow
def test_prompt_and_generated_logprobs_equal_peft(tiny_backbone, trained_adapters, stack_factory, submitter):
    s = stack_factory(tiny_backbone, adapters=trained_adapters, max_prefill_tokens=7, max_model_len=128)
    cases = [(m, f"reverse: {w}\n") for m, w in (("lora-a", "abcdefghij"), ("ia3", "cab"), ("lora-b", "hello"),
                                                 ("base", "plain"))]
    reqs = [submitter(s.engine, m, p, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=3)
            for m, p in cases]
    run_all(s.engine)
    worst = 0.0
    for (model, _), (req, events) in zip(cases, reqs):
        done = events[-1]
        generated = [e for ev in events for e in ev.logprobs]
        ids = req.prompt_ids + req.output_ids
        with torch.no_grad():
            ref = torch.log_softmax(peft_model(trained_adapters.get(model))(torch.tensor([ids])).logits[0].float(), -1)
        assert done.prompt_logprobs[0].logprob is None and len(done.prompt_logprobs) == len(req.prompt_ids)
        entries = done.prompt_logprobs[1:] + generated
        assert [e.token for e in entries] == ids[1:]
        for pos, e in enumerate(entries):
            row = ref[pos]
            worst = max(worst, abs(e.logprob - row[e.token].item()))
            top = row.topk(3)
            assert [t for t, _ in e.top] == top.indices.tolist()
            worst = max(worst, max(abs(v - r) for (_, v), r in zip(e.top, top.values.tolist())))
    assert worst < 1e-4, worst
    print("logprobs max |diff| vs PEFT:", worst)


@pytest.mark.slow
def test_echo_with_max_tokens_zero_scores_the_prompt_only(tiny_backbone, trained_adapters, stack_factory, submitter):
    s = stack_factory(tiny_backbone, adapters=trained_adapters)
    req, events = submitter(s.engine, "lora-a", "reverse: abc\n", max_tokens=0, prompt_logprobs=1)
    run_all(s.engine)
    assert req.output_ids == [] and events[-1].finish_reason == "length"
    assert len(events[-1].prompt_logprobs) == len(req.prompt_ids) and s.engine.pool.used == 0


@pytest.mark.slow
@pytest.mark.parametrize("params", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.8, min_tokens=12)])
def test_greedy_with_penalties_equals_peft_generate(tiny_backbone, trained_adapters, stack_factory, submitter, params):
    s = stack_factory(tiny_backbone, adapters=trained_adapters)
    req, _ = submitter(s.engine, "lora-a", "reverse: abcabcabc\n", max_tokens=20, **params)
    run_all(s.engine)
    model = peft_model(trained_adapters["lora-a"])
    ref = model.generate(torch.tensor([req.prompt_ids]), do_sample=False, max_new_tokens=20, pad_token_id=0,
                         repetition_penalty=params["repetition_penalty"], min_new_tokens=params.get("min_tokens", 0))
    assert req.output_ids == ref[0, len(req.prompt_ids):].tolist()


def test_processors_equal_transformers_and_openai_formula():
    from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, generator=g)
    prompt, output = [3, 7, 7, 11], [11, 20, 20, 20, 4]
    p = SamplingParams(max_tokens=10, repetition_penalty=1.7, min_tokens=8, stop_token_ids=(9,))
    ids = torch.tensor([prompt + output])
    ref = RepetitionPenaltyLogitsProcessor(1.7)(ids, scores[None].clone())
    ref = MinNewTokensLengthLogitsProcessor(len(prompt), 8, [2, 9])(ids, ref)[0]
    assert torch.equal(process(scores, p, prompt, output, eos=2), ref)
    # presence/frequency: OpenAI's documented formula (logit - count * frequency - [count > 0] * presence)
    p = SamplingParams(max_tokens=10, presence_penalty=0.5, frequency_penalty=0.25)
    want = scores.clone()
    for t in set(output):
        want[t] -= output.count(t) * 0.25 + 0.5
    assert torch.allclose(process(scores, p, prompt, output, eos=2), want)
