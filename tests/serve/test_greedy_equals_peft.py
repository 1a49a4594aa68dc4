"""Greedy output through the multiplexed decode equals PEFT's own generate, token for token, for
LoRA (two ranks and target sets) and IA3 adapters and the base model decoded together in one batch,
with prompts long enough to be prefilled in chunks."""
from __future__ import annotations


def test_batched_multi_adapter_greedy_equals_peft_generate(tiny_backbone, trained_adapters, stack_factory, submitter,
                                                           peft_reference):
    s = stack_factory(tiny_backbone, adapters=trained_adapters, max_num_seqs=8, max_prefill_tokens=12,
                      max_model_len=256)
    cases = [  # (model, prompt, max_tokens, ignore_eos)
        ("lora-a", "reverse: abcdefghij\n", 24, True),
        ("lora-b", "upper: hello there\n", 24, True),
        ("ia3", "reverse: cab\n", 24, True),
        ("base", "the base model, no adapter", 16, True),
        ("lora-a", "reverse: jih\n", 30, False),  # stops at EOS if the adapter emits one
        ("lora-b", "x", 8, True),
    ]
    reqs = [(c, *submitter(s.engine, c[0], c[1], max_tokens=c[2], ignore_eos=c[3])) for c in cases]
    # every request decodes in the same batches: record which adapters shared a forward
    shared = []
    forward = s.engine.forward

    def spy(items):
        shared.append(({it.slot for it in items}, [len(it.tokens) for it in items]))
        return forward.__class__.__call__(forward, items)

    s.engine.forward = spy
    while s.engine.has_work():
        s.engine.step()
    assert max(len(slots) for slots, _ in shared) == 4, "LoRA, LoRA, IA3 and the base model in one forward"
    assert any(1 in sizes and max(sizes) > 1 for _, sizes in shared), "decode tokens and a prefill chunk together"
    assert len([1 for _, sizes in shared if sizes and max(sizes) > 1]) >= 2, "a long prompt took several chunks"
    for (model, prompt, max_tokens, ignore_eos), req, events in reqs:
        ref = peft_reference(trained_adapters.get(model), req.prompt_ids, max_tokens, ignore_eos)
        assert req.output_ids == ref, (model, prompt)
        assert events[-1].completion_tokens == len(ref)
    # the adapters matter: their greedy outputs differ from the base model's on the same prompt
    base_ref = peft_reference(None, reqs[0][1].prompt_ids, 24, True)
    assert reqs[0][1].output_ids != base_ref
    # every request finished and gave its row and version back
    assert s.engine.pool.used == 0 and not s.engine.running
    assert s.registry.live_versions == len(trained_adapters)  # the newest version of each, nothing more


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(tiny_backbone, trained_adapters, stack_factory,
                                                                   submitter):
    s = stack_factory(tiny_backbone, adapters=trained_adapters)
    alone, _ = submitter(s.engine, "lora-a", "reverse: abc\n", max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
                         ignore_eos=True)
    while s.engine.has_work():
        s.engine.step()
    crowd = [submitter(s.engine, m, "reverse: abc\n", max_tokens=12, temperature=1.0, seed=s_, ignore_eos=True)[0]
             for m, s_ in (("ia3", 1), ("base", 2))]
    again, _ = submitter(s.engine, "lora-a", "reverse: abc\n", max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
                         ignore_eos=True)
    other, _ = submitter(s.engine, "lora-a", "reverse: abc\n", max_tokens=12, temperature=1.0, top_p=0.9, seed=8,
                         ignore_eos=True)
    while s.engine.has_work():
        s.engine.step()
    assert again.output_ids == alone.output_ids
    assert other.output_ids != alone.output_ids
    assert all(len(r.output_ids) == 12 for r in crowd)
