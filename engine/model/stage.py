"""The backbone run as explicit stages: embed -> decoder layers[a:b] -> norm + LM head + loss.

One implementation for every layout: a single process is one stage holding everything; a
pipeline stage holds a contiguous range of layers and passes hidden states on. Positions are
rotary embeddings from the model's own rotary module, computed on each stage from the batch's
per-sequence positions; the attention inputs come from one function of the batch
(MultiplexedBackbone.attention_kwargs), so any stage rebuilds them without receiving them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from muxtune.engine.data.dataset import IGNORE
from muxtune.engine.packing import PackedBatch
from muxtune.engine.peft import prompt_tuning
from muxtune.engine.peft.mux_linear import MultiplexedLinear


@dataclass
class ForwardResult:
    task_loss_sum: torch.Tensor  # [max_slot+1] summed token losses per slot (graph attached)
    task_tokens: torch.Tensor  # [max_slot+1] label tokens per slot


class Stage:
    def __init__(self, backbone, start: int, end: int, first: bool, last: bool):
        decoder = backbone.decoder
        self.backbone = backbone
        self.start, self.end, self.first, self.last = start, end, first, last
        self.embed = decoder.embed_tokens if first else None
        self.layers = list(decoder.layers[start:end])
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm if last else None
        self.lm_head = backbone.lm_head if last else None

    def hidden(self, batch: PackedBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's layers on the batch (the first stage embeds input_ids; later ones take hidden)."""
        bb = self.backbone
        bb.ctx.layout = batch.layout
        try:
            h = self._embed(batch) if self.first else hidden
            positions = batch.position_ids.to(h.device)
            rotary = self.rotary(h, positions)
            attention = bb.attention_kwargs(batch)
            recompute = bb.recompute and torch.is_grad_enabled()
            for layer in self.layers:
                if recompute:  # keep the layer's input only; backward reruns it (same RNG, same layout)
                    rerun = _Rerun(bb, batch.layout, layer)
                    h = checkpoint(rerun, h, rotary, positions, attention, use_reentrant=False)
                else:
                    h = layer(h, position_embeddings=rotary, position_ids=positions, use_cache=False, **attention)
        finally:
            bb.ctx.layout = None
        return self.norm(h) if self.last else h

    def _embed(self, batch: PackedBatch) -> torch.Tensor:
        prompts = self.backbone.prompts
        if not prompts:
            return self.embed(batch.input_ids)
        # prompt tuning: virtual-token placeholders take their own task's prompt rows
        return prompt_tuning.embed(self.embed, batch.input_ids, batch.layout.token_slot, prompts)

    def loss(self, batch: PackedBatch, h: torch.Tensor) -> ForwardResult:
        """Token losses summed per task; the LM head runs only where there is a target."""
        h = h.reshape(-1, h.shape[-1])
        targets = batch.targets.to(h.device)  # the last layers may sit on another GPU
        sel = (targets != IGNORE).nonzero().squeeze(1)
        logits = self.lm_head(h.index_select(0, sel)).float()
        tok_loss = F.cross_entropy(logits, targets.index_select(0, sel), reduction="none")
        slots = batch.layout.on(h.device).token_slot.index_select(0, sel)
        n = batch.layout.max_slot + 1
        loss_sum = torch.zeros(n, device=h.device).index_add(0, slots, tok_loss)
        tokens = torch.zeros(n, device=h.device).index_add(0, slots, torch.ones_like(tok_loss))
        return ForwardResult(loss_sum, tokens)

    def forward(self, batch: PackedBatch, hidden: torch.Tensor | None = None):
        """Hidden states for the next stage, or, on the last stage, the per-task losses."""
        h = self.hidden(batch, hidden)
        return self.loss(batch, h) if self.last else h



class _Rerun:
    """One decoder layer under activation checkpointing (--recompute), per decoder layer as the
    model's own gradient checkpointing does, made exact for the multiplexed deltas: they read the
    batch's layout from the backbone's context (cleared after the forward) and draw dropout from
    their tasks' own generators (which torch's checkpoint does not rewind). The rerun in backward
    sets the layout again and draws the forward's masks, then leaves each generator where it was."""

    def __init__(self, bb, layout, layer):
        self.bb, self.layout, self.layer, self.calls = bb, layout, layer, 0
        self.deltas = [d for m in layer.modules() for d in getattr(m, "deltas", {}).values()
                       if isinstance(m, MultiplexedLinear)]
        self.rng = [(d, s) for d in self.deltas if (s := d.rng_state()) is not None]

    def __call__(self, h, rotary, positions, attention):
        self.calls += 1
        now = [(d, d.rng_state()) for d, _ in self.rng] if self.calls > 1 else []
        for d, s in self.rng if self.calls > 1 else ():
            d.set_rng_state(s)
        before, self.bb.ctx.layout = self.bb.ctx.layout, self.layout
        try:
            return self.layer(h, position_embeddings=rotary, position_ids=positions, use_cache=False, **attention)
        finally:
            self.bb.ctx.layout = before
            for d, s in now:
                d.set_rng_state(s)
