"""Running one round's fused micro-batch through the backbone in one stage, and what the group
learns from it.

One stage (pp=1): the replica's fused micro-batch runs forward, the group agrees on every task's
loss, and only if all are finite does it run backward (a non-finite loss can spill into
neighbours sharing a chunk, so the trainer then isolates it first; `isolate`). The pipeline
stage executor (pp>1) is engine/parallel/pipeline.py; both end with `reduce_round`: one
all-reduce tells every rank each task's loss and the round's tokens, and each stage's busy and
wall seconds (busy: inside forward/backward compute; the rest is bubble).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from muxtune.engine.parallel.plan import RoundPlan


@dataclass
class RoundOutcome:
    slot_loss: torch.Tensor  # [n_slots] float64, summed over the group
    real_tokens: int
    computed_tokens: int
    stage_busy: list[float]  # seconds per stage (mean over replicas)
    stage_wall: list[float]
    backward_done: bool
    attention_pairs_needed: int = 0  # over the whole group
    attention_pairs_computed: int = 0

    def non_finite(self, slots) -> list[int]:
        return [s for s in slots if not torch.isfinite(self.slot_loss[s])]


def reduce_round(group, n_slots: int, slot_loss: torch.Tensor | None, plan: RoundPlan,
                 busy: float, wall: float) -> RoundOutcome:
    """The group's sums of one round: losses (last stage), token and pair counts (first stage),
    busy and wall seconds per stage (every stage), one all-reduce."""
    g, p = group, group.dims.pp
    t = n_slots + 4  # losses, then 4 token/pair counts, then busy and wall seconds per stage
    vec = torch.zeros(t + 2 * p, dtype=torch.float64)
    if g.reports and g.last_stage and slot_loss is not None:
        vec[:slot_loss.numel()] = slot_loss.detach().to("cpu", torch.float64)
    if g.reports and g.first_stage:
        vec[n_slots], vec[n_slots + 1] = plan.real_tokens, plan.computed_tokens
        vec[n_slots + 2], vec[n_slots + 3] = plan.attention_pairs_needed, plan.attention_pairs_computed
    if g.reports:
        vec[t + g.pp_rank] = busy
        vec[t + p + g.pp_rank] = wall
    vec = g.sum(vec)
    times = (vec[t:] / g.dims.dp).tolist()
    return RoundOutcome(vec[:n_slots], int(vec[n_slots]), int(vec[n_slots + 1]), times[:p], times[p:], False,
                        int(vec[n_slots + 2]), int(vec[n_slots + 3]))


def run_fused(backbone, group, plan: RoundPlan, norm: torch.Tensor, n_slots: int,
              finite_before_backward) -> RoundOutcome:
    """pp=1: forward, agree on the losses, backward only when finite_before_backward(outcome)."""
    t0 = time.perf_counter()
    result = backbone.stage.forward(plan.microbatches[0].batch) if plan.microbatches else None
    local = torch.zeros(n_slots, dtype=torch.float64)
    if result is not None:
        local[:result.task_loss_sum.numel()] = result.task_loss_sum.detach().to("cpu", torch.float64)
    outcome = reduce_round(group, n_slots, local, plan, 0.0, 0.0)
    if finite_before_backward(outcome):
        if result is not None:
            k = result.task_loss_sum.numel()
            (result.task_loss_sum * norm[:k].to(result.task_loss_sum.device)).sum().backward()
        outcome.backward_done = True
    seconds = time.perf_counter() - t0
    outcome.stage_busy, outcome.stage_wall = [seconds], [seconds]
    return outcome


def isolate(backbone, group, share_batches: list) -> torch.Tensor:
    """Each task's loss alone (no grad), summed over the group: share_batches[i] is (slot, this
    replica's batch of pick i's sequences, or None when it holds none of them)."""
    local = torch.zeros(len(share_batches), dtype=torch.float64)
    with torch.no_grad():
        for i, (slot, batch) in enumerate(share_batches):
            if batch is not None:
                local[i] = float(backbone.stage.forward(batch).task_loss_sum[slot])
    return group.sum(local)
