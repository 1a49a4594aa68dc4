"""Serving under tensor and pipeline parallelism (engine/serve/distributed.py): rank 0 fronts the
API and samples, every rank runs its shard or stage of each forward. Greedy tokens equal
PeftModel.generate token for token, and the logprobs equal PEFT's own (fp32, within 1e-4), for a
LoRA adapter decoded in one batch with the base model, over 2 ranks on CPU (gloo); and with 2
data-parallel replicas, of which replica 0 serves."""
from __future__ import annotations

import pytest
import torch

from muxtune.engine.model.families import FAMILIES
from tests.engine.families.checkpoints import save_family_checkpoint
from tests.helpers import parallel_ranks
from tests.helpers.parallel_serving import peft_generate, peft_logprobs, random_lora, random_prompt_tuning

pytestmark = pytest.mark.slow
NEW = 10
TOL = 1e-4


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory):
    return lambda model_type: save_family_checkpoint(model_type, tmp_path_factory.mktemp(model_type))


def _prompts(n: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 259, (length,), generator=gen).tolist() for _ in range(n)]


@pytest.mark.parametrize("model_type,dp,tp,pp", [("llama", 1, 2, 1), ("llama", 1, 1, 2), ("gpt2", 1, 1, 2),
                                                  ("llama", 2, 1, 1)])  # dp: replica 0 serves, replica 1 follows
def test_served_over_ranks_equals_peft(model_type, dp, tp, pp, family_checkpoint, tmp_path):
    base = family_checkpoint(model_type)
    adapter = tmp_path / "adapter"
    random_lora(base, adapter, FAMILIES[model_type].attention_targets)
    prompts = _prompts(2, 11)  # longer than the prefill chunk (4): prefilled in 3 chunks, decode batched with it
    cases = [("lora", prompts[0]), ("base", prompts[1]), ("lora", prompts[1])]
    out = parallel_ranks.start(dp * tp * pp, parallel_ranks.serve_greedy, str(base), str(adapter), tp, pp, cases, NEW,
                               dp)[0]
    expected = [peft_generate(base, adapter if m == "lora" else None, ids, NEW) for m, ids in cases]
    assert out["tokens"] == expected, (model_type, tp, pp)
    assert expected[1] != expected[2], "the adapter changes the greedy tokens"
    for (m, ids), toks, lps in zip(cases, out["tokens"], out["logprobs"]):
        ref = peft_logprobs(base, adapter if m == "lora" else None, ids, toks)
        assert max(abs(a - b) for a, b in zip(lps, ref)) < TOL
    prompt_ref = peft_logprobs(base, adapter, prompts[0][:1], prompts[0][1:])  # echo: every prompt token's
    assert out["prompt_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(out["prompt_logprobs"][1:], prompt_ref)) < TOL


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_prompt_tuning_served_over_ranks_equals_peft(tp, pp, family_checkpoint, tmp_path):
    """Virtual tokens enter on the first stage (every tp shard's, or pp's stage 0): greedy tokens equal
    PeftModel.generate with the prompt-tuning adapter, mixed with a base-model request."""
    base = family_checkpoint("llama")
    adapter = tmp_path / "prompt"
    random_prompt_tuning(base, adapter)
    prompts = _prompts(2, 11)
    cases = [("lora", prompts[0]), ("base", prompts[1])]  # "lora": the served adapter, whatever its method
    out = parallel_ranks.start(tp * pp, parallel_ranks.serve_greedy, str(base), str(adapter), tp, pp, cases, NEW, 1)[0]
    expected = [peft_generate(base, adapter if m == "lora" else None, ids, NEW) for m, ids in cases]
    assert out["tokens"] == expected, (tp, pp)
    assert expected[0] != peft_generate(base, None, prompts[0], NEW), "the virtual tokens change the greedy tokens"
