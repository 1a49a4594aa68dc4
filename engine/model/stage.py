"""A contiguous range of the backbone's decoder layers, run through the model's OWN forward.

Nothing of a family's forward is re-derived here: every stage calls the CausalLM's forward (so
embedding scales, residual and logit multipliers, final softcapping, rotary variants and per-layer
window patterns are the family's own code) on the packed batch laid out as one row, with
per-sequence `position_ids`, the packed boundaries as transformers' flash kwargs (the engine's
registered attention, engine/model/attention.py) and `logits_to_keep` = the flattened positions
that have a target, so the LM head runs only there.

A pipeline stage holding layers [start, end) runs the same forward over a slice (no per-family
code, only the layer list's location from engine/model/families.py):
- layers before `start` are swapped, for the call, for a pass-through (on a later stage they are
  meta tensors); the stage's input is zeros of the embedding's shape (the embedding may be meta),
  and a pre-hook on layer `start` replaces its hidden states with the ones received;
- a forward hook on layer `end - 1` of a stage that is not last stops the forward there (an
  exception carrying the layer's output), so norm and head never run on it.
The fidelity probe (engine/model/probe.py) checks at load that a split equals the whole.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from muxtune.engine.data.dataset import IGNORE
from muxtune.engine.model import attention
from muxtune.engine.packing import PackedBatch
from muxtune.engine.peft import prompt_tuning
from muxtune.engine.peft.mux_linear import MultiplexedLinear


@dataclass
class ForwardResult:
    task_loss_sum: torch.Tensor  # [max_slot+1] summed token losses per slot (graph attached)
    task_tokens: torch.Tensor  # [max_slot+1] label tokens per slot


class _Skipped(nn.Module):
    """A decoder layer another stage runs: its hidden states pass through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _StageDone(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__("stage done")
        self.hidden = hidden


class Stage:
    def __init__(self, backbone, start: int, end: int, first: bool, last: bool):
        self.backbone = backbone
        self.start, self.end, self.first, self.last = start, end, first, last
        self.layers = backbone.layers  # the model's own ModuleList
        self._skip = _Skipped()

    # ----- the model's forward over this stage's slice ---------------------------------------
    def _model_forward(self, batch: PackedBatch, hidden: torch.Tensor | None, keep) -> torch.Tensor:
        """Logits at `keep` (last stage) or this stage's output hidden states [1, T, H]."""
        bb = self.backbone
        n = batch.input_ids.numel()
        inputs = {"position_ids": batch.position_ids.reshape(1, n), "attention_mask": None, "use_cache": False,
                  **attention.attention_inputs(batch)}
        if self.first:
            ids = batch.input_ids.reshape(1, n)
            if bb.prompts:  # prompt tuning: virtual-token placeholders take their own task's prompt rows
                inputs["inputs_embeds"] = prompt_tuning.embed(bb.embedding, ids, batch.layout.token_slot, bb.prompts)
            else:
                inputs["input_ids"] = ids
        else:  # the embedding is another stage's: zeros in its shape, replaced at layer `start`
            inputs["inputs_embeds"] = torch.zeros(1, n, bb.embedding.embedding_dim, dtype=bb.dtype, device=bb.device)
        bb.ctx.layout = batch.layout
        try:
            return self.run_sliced(lambda: bb.model(**inputs, logits_to_keep=keep).logits,
                                   None if self.first else hidden.reshape(1, n, -1))
        finally:
            bb.ctx.layout = None

    def run_sliced(self, call, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """call() (a call of the model's own forward) over this stage's slice: its result on the last
        stage, else the hidden states the slice ends with; `hidden` enters at layer `start` (not
        the first stage). The training forward above and the serving forward (engine/serve/forward.py)."""
        try:
            with self._sliced(hidden):
                return call()
        except _StageDone as done:
            return done.hidden

    @contextmanager
    def _sliced(self, hidden: torch.Tensor | None):
        layers, hooks, swapped = self.layers, [], {}
        try:
            if self.backbone.recompute and torch.is_grad_enabled():  # --recompute: this stage's layers
                for i in range(self.start, self.end):
                    swapped[i], layers[i] = layers[i], _Recomputed(layers[i], self.backbone)
            if hidden is not None:
                for i in range(self.start):
                    swapped[i], layers[i] = layers[i], self._skip
                hooks.append(layers[self.start].register_forward_pre_hook(_inject(hidden), with_kwargs=True))
            if not self.last:
                hooks.append(layers[self.end - 1].register_forward_hook(_stop))
            yield
        finally:
            for h in hooks:
                h.remove()
            for i, layer in swapped.items():
                layers[i] = layer

    # ----- what callers use ------------------------------------------------------------------
    def logits(self, batch: PackedBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Every position's logits, [rows, chunk, vocab] (the last stage; tests, the probe)."""
        out = self._model_forward(batch, hidden, 0)
        return out.reshape(*batch.input_ids.shape, out.shape[-1])

    def loss(self, batch: PackedBatch, hidden: torch.Tensor | None = None) -> ForwardResult:
        """Token losses summed per task; the LM head runs only where there is a target."""
        targets = batch.targets
        sel = (targets != IGNORE).nonzero().squeeze(1)
        logits = self._model_forward(batch, hidden, sel)[0].float()
        tok_loss = F.cross_entropy(logits, targets.to(logits.device).index_select(0, sel.to(logits.device)),
                                   reduction="none")
        slots = batch.layout.on(logits.device).token_slot.index_select(0, sel.to(logits.device))
        n = batch.layout.max_slot + 1
        loss_sum = torch.zeros(n, device=logits.device).index_add(0, slots, tok_loss)
        tokens = torch.zeros(n, device=logits.device).index_add(0, slots, torch.ones_like(tok_loss))
        return ForwardResult(loss_sum, tokens)

    def forward(self, batch: PackedBatch, hidden: torch.Tensor | None = None):
        """Hidden states for the next stage ([rows, chunk, H]), or, on the last stage, the per-task losses."""
        if self.last:
            return self.loss(batch, hidden)
        out = self._model_forward(batch, hidden, 0)
        return out.reshape(*batch.input_ids.shape, out.shape[-1])


def _inject(hidden: torch.Tensor):
    def hook(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook


def _stop(_module, _args, output):
    raise _StageDone(output[0] if isinstance(output, tuple) else output)


class _Recomputed(nn.Module):
    """A decoder layer under activation checkpointing (--recompute): the model's own layer, run through
    torch's checkpoint as its gradient checkpointing does, made exact for the multiplexed deltas."""

    def __init__(self, layer: nn.Module, backbone):
        super().__init__()
        self.layer, self.backbone = layer, backbone

    def __getattr__(self, name):  # what the model's forward reads off its layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args, **kwargs):
        return checkpoint(_Rerun(self.backbone, self.layer), *args, use_reentrant=False, **kwargs)


class _Rerun:
    """One call of a checkpointed layer. The deltas read the batch's layout from the backbone's
    context (cleared after the forward) and draw dropout from their tasks' own generators (which
    torch's checkpoint does not rewind): the rerun in backward sets the layout again and draws the
    forward's masks, then leaves each generator where it was."""

    def __init__(self, bb, layer):
        self.bb, self.layer, self.layout, self.calls = bb, layer, bb.ctx.layout, 0
        deltas = [d for m in layer.modules() if isinstance(m, MultiplexedLinear) for d in m.deltas.values()]
        self.rng = [(d, s) for d in deltas if (s := d.rng_state()) is not None]

    def __call__(self, *args, **kwargs):
        self.calls += 1
        rerun = self.calls > 1
        now = [(d, d.rng_state()) for d, _ in self.rng] if rerun else []
        for d, s in self.rng if rerun else ():
            d.set_rng_state(s)
        before, self.bb.ctx.layout = self.bb.ctx.layout, self.layout
        try:
            return self.layer(*args, **kwargs)
        finally:
            self.bb.ctx.layout = before
            for d, s in now:
                d.set_rng_state(s)
