"""Prompt tuning (Lester et al., 2021): trained virtual-token embeddings prepended to each of a
task's sequences, as PEFT's PromptTuningConfig.

How it joins the multiplexed engine:
- its delta attaches at the input embeddings, not at a Linear (PeftMethod.attaches = "input");
- every sequence of the task gets n placeholder positions in front (`prepend_virtual`), with ids
  -1..-n and no targets, so scheduling and packing count them like any token and positions
  restart at the virtual tokens, as PEFT's forward places them;
- at the embedding, each placeholder takes row k of its own task's prompt (`embed`), found by the
  token's slot in the batch layout: a task never sees another task's prompt.
"""
from __future__ import annotations

import torch
from torch import nn

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.data.examples import IGNORE, Example
from muxtune.engine.peft.base import PeftMethod, TaskDelta, implements
from muxtune.facts.methods.prompt_tuning import PromptTuningDecl


class PromptDelta(TaskDelta):
    method = PromptTuningDecl.name

    def __init__(self, embedding: nn.Embedding, spec: PeftSpec, generator: torch.Generator, tokenizer=None):
        super().__init__()
        n, (vocab, dim) = spec.num_virtual_tokens, embedding.weight.shape
        init = spec.prompt_tuning_init or "RANDOM"
        if init == "RANDOM":  # nn.Embedding's own initialisation, from the task's generator
            w = torch.randn(n, dim, generator=generator)
        else:
            if init == "TEXT":
                ids = tokenizer(spec.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError("peft.promptTuningInitText has no tokens")
                ids = (ids * (n // len(ids) + 1))[:n]  # repeated to numVirtualTokens, as PEFT does
            else:  # SAMPLE_VOCAB
                ids = torch.randint(vocab, (n,), generator=generator).tolist()
            w = embedding.weight.detach()[torch.tensor(ids, device=embedding.weight.device)].float().cpu()
        self.prompt_embeddings = nn.Parameter(w.to(embedding.weight.device))

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings}


@implements(PromptTuningDecl)
class PromptTuning(PeftMethod):
    @staticmethod
    def make_delta(base, module_name, spec, generator, tokenizer=None):
        return PromptDelta(base, spec, generator, tokenizer)

    @staticmethod
    def stable_name(module: str, name: str) -> str:
        return name  # one prompt per task: "prompt_embeddings", whatever the embedding module is called

    @staticmethod
    def peft_key(stable: str) -> str:
        return stable  # PEFT saves the prompt top-level, as "prompt_embeddings"


def prepend_virtual(examples: list[Example] | None, n: int) -> list[Example] | None:
    """Each sequence with n virtual positions in front (ids -1..-n, no targets)."""
    if not n or examples is None:
        return examples
    head = tuple(-(k + 1) for k in range(n))
    return [Example(head + ex.input_ids, (IGNORE,) * n + ex.targets) for ex in examples]


def embed(embedding: nn.Embedding, input_ids: torch.Tensor, token_slot: torch.Tensor,
          prompts: dict[int, PromptDelta]) -> torch.Tensor:
    """Input embeddings with each virtual position replaced by its own task's prompt row."""
    virtual = input_ids < 0
    out = embedding(input_ids.clamp(min=0))
    if not bool(virtual.any()):
        return out
    flat, ids, slots = out.reshape(-1, out.shape[-1]).clone(), input_ids.reshape(-1), token_slot.to(input_ids.device)
    for slot, delta in prompts.items():
        mask = virtual.reshape(-1) & (slots == slot)
        if bool(mask.any()):
            rows = (-ids[mask] - 1).to(delta.prompt_embeddings.device)
            flat[mask] = delta.prompt_embeddings.index_select(0, rows).to(flat.device, flat.dtype)
    return flat.reshape(out.shape)
