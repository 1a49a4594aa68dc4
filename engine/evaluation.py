"""Validation loss: a task's held-out examples through the shared backbone, without gradients.

The task's sequences are packed alone (its own rounds of at most the token budget), with its
deltas in eval mode so dropout neither applies nor draws from the task's generator: evaluating
changes nothing about how the task, or any neighbour, trains on. The loss is the mean over the
validation label tokens, like the training loss. Under pipeline parallelism every stage runs its
part of each batch (hidden states passed on point to point, as in training) and the last stage's
sums are shared with the others (every rank runs this at the same step, so all agree).
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


EVAL_TAG = 1 << 20  # point-to-point tags above the training schedule's (2 * micro-batch (+1))


def evaluate(backbone, rt, token_budget: int, group=None) -> float:
    deltas = list(rt.adapter.deltas.values())
    modes = [d.training for d in deltas]
    for d in deltas:
        d.eval()
    loss_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for chunk in _groups(rt.validation, token_budget):
                batch = pack([PackedSequence(rt.slot, ex) for ex in chunk], None, backbone.device,
                             backbone.tokenizer.pad_token_id or 0, attn_ratio=backbone.attn_ratio)
                if group is None or group.dims.pp == 1:
                    result = backbone.forward_loss(batch)
                    loss_sum += float(result.task_loss_sum[rt.slot])
                    tokens += int(result.task_tokens[rt.slot])
                else:
                    s, n = _staged(backbone, group, batch, rt.slot)
                    loss_sum, tokens = loss_sum + s, tokens + n
    finally:
        for d, m in zip(deltas, modes):
            d.train(m)
    if group is not None and group.dims.pp > 1:  # the last stage's sums (counted once per replica: the ratio stands)
        loss_sum, tokens = group.sum_stages(torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)).tolist()
    return loss_sum / max(1, tokens)


def _staged(backbone, group, batch, slot: int) -> tuple[float, int]:
    """This stage's part of one batch: receive, run, send on; the last stage returns the sums."""
    x = None
    if not group.first_stage:
        x = torch.empty((*batch.input_ids.shape, backbone.model.config.hidden_size), dtype=backbone.dtype,
                        device=group.device)
        group.dist.recv(x, src=group.prev_rank, tag=EVAL_TAG)
        x = x.to(backbone.device)
    out = backbone.stage.forward(batch, x)
    if not group.last_stage:
        group.dist.send(out.to(group.device).contiguous(), dst=group.next_rank, tag=EVAL_TAG)
        return 0.0, 0
    return float(out.task_loss_sum[slot]), int(out.task_tokens[slot])


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
