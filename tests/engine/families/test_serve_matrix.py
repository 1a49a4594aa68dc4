"""Serving through every family of the matrix: greedy tokens from the serving engine (its own KV
cache rows, prefill in chunks, decode batched with the base model) equal what PeftModel.generate
gives for the same adapter, token for token (fp32, CPU). Prompts and outputs run past the
families' sliding windows (WINDOW tokens), so the windows, softcaps and positions matter."""
from __future__ import annotations

import pytest
import torch

from muxtune.engine.model.families import FAMILIES
from tests.helpers.parallel_serving import peft_generate, random_lora
from tests.helpers.serving import make_stack, submit

from .checkpoints import WINDOW

PROMPT = 11  # > WINDOW: the prompt alone crosses the window, and is prefilled in 3 chunks
NEW = 14


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_served_greedy_equals_peft_generate(model_type, family_checkpoint, tmp_path):
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import load_backbone

    base = family_checkpoint(model_type)
    adapter = tmp_path / "adapter"
    random_lora(base, adapter, FAMILIES[model_type].attention_targets)
    backbone = MultiplexedBackbone(load_backbone(base, torch.device("cpu"), torch.float32))
    stack = make_stack(backbone, adapters={"lora": adapter}, max_num_seqs=4, max_prefill_tokens=4, max_model_len=64)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 259, (PROMPT,), generator=gen).tolist() for _ in range(2)]
    cases = [("lora", prompts[0]), ("base", prompts[1]), ("lora", prompts[1])]
    reqs = [submit(stack.engine, model, ids, max_tokens=NEW, ignore_eos=True)[0] for model, ids in cases]
    while stack.engine.has_work():
        stack.engine.step()
    assert PROMPT + NEW > 2 * WINDOW
    served = [r.output_ids for r in reqs]
    expected = [peft_generate(base, adapter if model == "lora" else None, ids, NEW) for model, ids in cases]
    assert served == expected, (model_type, served, expected)
    assert expected[1] != expected[2], "the adapter changes the greedy tokens"
