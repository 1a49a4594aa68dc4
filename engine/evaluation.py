"""Validation loss: a task's held-out examples through the shared backbone, without gradients.

The task's sequences are packed alone (its own rounds of at most the token budget), with its
deltas in eval mode so dropout neither applies nor draws from the task's generator: evaluating
changes nothing about how the task, or any neighbour, trains on. The loss is the mean over the
validation label tokens, like the training loss.
"""
from __future__ import annotations

import torch

from muxtune.engine.packing import PackedSequence, pack


def due(rt) -> bool:
    """After this step: every training.evalInterval steps, and always after the last one."""
    if not rt.validation or rt.eval_step == rt.step:
        return False
    interval = rt.task.spec.training.eval_interval
    return rt.step >= rt.max_steps or bool(interval and rt.step % interval == 0)


def evaluate(backbone, rt, token_budget: int) -> float:
    deltas = list(rt.adapter.deltas.values())
    modes = [d.training for d in deltas]
    for d in deltas:
        d.eval()
    loss_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for group in _groups(rt.validation, token_budget):
                batch = pack([PackedSequence(rt.slot, ex) for ex in group], None, backbone.device,
                             backbone.tokenizer.pad_token_id or 0, attn_ratio=backbone.attn_ratio)
                result = backbone.forward_loss(batch)
                loss_sum += float(result.task_loss_sum[rt.slot])
                tokens += int(result.task_tokens[rt.slot])
    finally:
        for d, m in zip(deltas, modes):
            d.train(m)
    return loss_sum / max(1, tokens)


def _groups(examples, budget: int):
    group, size = [], 0
    for ex in examples:
        if group and size + len(ex.input_ids) > budget:
            yield group
            group, size = [], 0
        group.append(ex)
        size += len(ex.input_ids)
    if group:
        yield group
