"""One inference forward over the shared backbone: decode tokens and prefill chunks of many
requests, for many adapters, flattened into one row.

Each request's tokens go through its own adapter version's delta in every multiplexed layer
(the version is a frozen slot of the MultiplexedLinears, routed by the same TokenLayout the trainer
uses), read and extend the request's KV cache row (`kv_cache.serve_attention`), and only the last
token of each request that samples this iteration reaches the LM head. It runs under
torch.inference_mode, so nothing it computes can join the training graph.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from muxtune.engine.packing import TokenLayout
from muxtune.engine.peft import prompt_tuning
from muxtune.engine.serve.kv_cache import ATTENTION_NAME, AttentionPlan, KVPool, register

BASE_SLOT = -1  # a request for the base model: no delta (the layout's "no task" value)


@dataclass
class WorkItem:
    """One request's share of an inference forward."""

    tokens: list[int]  # new tokens: a prefill chunk, or the last sampled token
    row: int  # KV cache row
    offset: int  # position of tokens[0] in the request
    slot: int  # adapter version slot in the multiplexed layers, BASE_SLOT for the base model
    sample: bool  # whether the logits of the last token are wanted
    all_logits: bool = False  # the logits of every token instead (prompt logprobs)


@contextmanager
def _attention(config, name: str):
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


@dataclass
class ForwardBatch:
    """One forward's inputs, laid out from its items: what every stage and shard computes alike."""

    ids: torch.Tensor  # [T] token ids, flattened over the items (grouped by slot)
    pos: torch.Tensor  # [T] their positions
    slots: torch.Tensor  # [T] their adapter version slots
    plan: AttentionPlan
    wanted: torch.Tensor  # flattened indices whose logits come out, in the items' order

    @property
    def tokens(self) -> int:
        return self.ids.numel()


class InferenceForward:
    """The serving forward of this process's part of the backbone: all of it in one process; one
    pipeline stage's layers (`backbone.stage`) and one tensor-parallel shard in a group, where
    engine/serve/distributed.py moves the hidden states between stages and the logits to rank 0."""

    def __init__(self, backbone, pool: KVPool):
        register()
        self.backbone = backbone
        self.pool = pool

    def __call__(self, items: list[WorkItem]) -> torch.Tensor:
        """Logits [n, vocab] (float32), in the order given: every token's of an item with all_logits,
        else the last token's of an item with sample=True."""
        return self.run(self.prepare(items))

    def prepare(self, items: list[WorkItem]) -> ForwardBatch:
        """The items flattened into one row (one run per adapter: an identity layout); ValueError
        for a position past the KV cache rows, before anything runs."""
        order = sorted(range(len(items)), key=lambda i: items[i].slot)
        ids, rows, pos, slots, sample_at, prefill, dec_idx, dec_rows, dec_len = [], [], [], [], {}, [], [], [], []
        for i in order:
            it = items[i]
            start, n = len(ids), len(it.tokens)
            ids += it.tokens
            rows += [it.row] * n
            pos += range(it.offset, it.offset + n)
            slots += [it.slot] * n
            if n == 1:
                dec_idx.append(start)
                dec_rows.append(it.row)
                dec_len.append(it.offset + 1)
            else:
                prefill.append((start, start + n, it.row, it.offset))
            if it.all_logits:
                sample_at[i] = list(range(start, start + n))
            elif it.sample:
                sample_at[i] = [start + n - 1]
        if max(pos) >= self.pool.max_len:
            raise ValueError(f"position {max(pos)} is past the KV cache rows ({self.pool.max_len} tokens)")

        def t(values):
            return torch.tensor(values, dtype=torch.long, device=self.backbone.device)

        plan = AttentionPlan(
            self.pool, t(rows), t(pos),
            t(dec_idx) if dec_idx else None, t(dec_rows) if dec_rows else None, t(dec_len) if dec_len else None,
            max(dec_len, default=0), prefill,
        )
        wanted = [p for i in range(len(items)) for p in sample_at.get(i, ())]
        return ForwardBatch(t(ids), t(pos), t(slots), plan, t(wanted))

    def run(self, batch: ForwardBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The logits at batch.wanted ([n, vocab], float32) on the last stage; before it, the hidden
        states this stage's layers end with ([T, hidden]). `hidden`: the previous stage's."""
        bb, stage = self.backbone, self.backbone.stage
        inputs = {"position_ids": batch.pos[None], "use_cache": False, "serve_plan": batch.plan,
                  "logits_to_keep": batch.wanted}
        if stage.first:
            inputs["input_ids"] = batch.ids[None]
        else:  # the embedding is another stage's: zeros in its shape, replaced at the stage's first layer
            inputs["inputs_embeds"] = torch.zeros(1, batch.tokens, bb.embedding.embedding_dim, dtype=bb.dtype,
                                                  device=bb.device)
            hidden = hidden.reshape(1, batch.tokens, -1)
        with torch.inference_mode(), _attention(bb.model.config, ATTENTION_NAME):
            bb.ctx.layout = layout = TokenLayout.from_slots(batch.slots)
            if stage.first and bool((batch.ids < 0).any()):  # prompt tuning: virtual tokens take their version's prompt
                inputs["inputs_embeds"] = prompt_tuning.embed(bb.embedding, inputs.pop("input_ids"), layout.token_slot,
                                                              bb.prompts)
            try:  # the CausalLM's own forward: its positions, multipliers, logit scaling and softcap
                out = stage.run_sliced(lambda: bb.model(**inputs).logits, hidden)
            finally:
                bb.ctx.layout = None
            return out[0].float() if stage.last else out[0]
