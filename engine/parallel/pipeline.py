"""Running one round's micro-batches through this rank's stage, and what the group learns from it.

One stage (pp=1): the replica's fused micro-batch runs forward, the group agrees on every task's
loss, and only if all are finite does it run backward (a non-finite loss can spill into
neighbours sharing a chunk, so the trainer then isolates it first).

Pipeline (pp>1): the stage follows its 1F1B action list (schedule.py), receiving hidden states
from the previous stage and gradients from the next over torch.distributed point-to-point
(irecv / isend; sends are never waited on before the round ends, so no two stages wait on each
other). Each side computes the micro-batch's shape from the plan it built itself, so nothing
but the tensors crosses. Micro-batches hold one task each, so a non-finite loss stays inside its
task: the backward runs regardless and the trainer fails that task alone.

Afterwards one all-reduce tells every rank each task's loss and the round's tokens, and each
stage's busy and wall seconds (busy: inside forward/backward compute; the rest is bubble).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from muxtune.engine.parallel.plan import RoundPlan
from muxtune.engine.parallel.schedule import F, stage_actions


@dataclass
class RoundOutcome:
    slot_loss: torch.Tensor  # [n_slots] float64, summed over the group
    real_tokens: int
    computed_tokens: int
    stage_busy: list[float]  # seconds per stage (mean over replicas)
    stage_wall: list[float]
    backward_done: bool

    def non_finite(self, slots) -> list[int]:
        return [s for s in slots if not torch.isfinite(self.slot_loss[s])]


class RoundExecutor:
    def __init__(self, backbone, group):
        self.backbone = backbone
        self.group = group
        self.stages = group.dims.pp

    # ----- the group's sums ------------------------------------------------------------------
    def _reduce(self, n_slots: int, slot_loss: torch.Tensor | None, plan: RoundPlan,
                busy: float, wall: float) -> RoundOutcome:
        g, p = self.group, self.stages
        vec = torch.zeros(n_slots + 2 + 2 * p, dtype=torch.float64)
        if g.reports and g.last_stage and slot_loss is not None:
            vec[:slot_loss.numel()] = slot_loss.detach().to("cpu", torch.float64)
        if g.reports and g.first_stage:
            vec[n_slots], vec[n_slots + 1] = plan.real_tokens, plan.computed_tokens
        if g.reports:
            vec[n_slots + 2 + g.pp_rank] = busy
            vec[n_slots + 2 + p + g.pp_rank] = wall
        vec = g.sum(vec)
        dp = g.dims.dp
        times = (vec[n_slots + 2:] / dp).tolist()
        return RoundOutcome(vec[:n_slots], int(vec[n_slots]), int(vec[n_slots + 1]), times[:p], times[p:], False)

    # ----- one stage -----------------------------------------------------------------------------
    def run_fused(self, plan: RoundPlan, norm: torch.Tensor, n_slots: int, finite_before_backward) -> RoundOutcome:
        """pp=1: forward, agree on the losses, backward only when finite_before_backward(outcome)."""
        t0 = time.perf_counter()
        result = self.backbone.stage.forward(plan.microbatches[0].batch) if plan.microbatches else None
        local = torch.zeros(n_slots, dtype=torch.float64)
        if result is not None:
            local[:result.task_loss_sum.numel()] = result.task_loss_sum.detach().to("cpu", torch.float64)
        outcome = self._reduce(n_slots, local, plan, 0.0, 0.0)
        if finite_before_backward(outcome):
            if result is not None:
                k = result.task_loss_sum.numel()
                (result.task_loss_sum * norm[:k].to(result.task_loss_sum.device)).sum().backward()
            outcome.backward_done = True
        seconds = time.perf_counter() - t0
        outcome.stage_busy, outcome.stage_wall = [seconds], [seconds]
        return outcome

    def isolate(self, share_batches: list) -> torch.Tensor:
        """Each task's loss alone (no grad), summed over the group: share_batches[i] is this
        replica's batch of pick i's sequences, or None when it holds none of them."""
        local = torch.zeros(len(share_batches), dtype=torch.float64)
        with torch.no_grad():
            for i, (slot, batch) in enumerate(share_batches):
                if batch is not None:
                    local[i] = float(self.backbone.stage.forward(batch).task_loss_sum[slot])
        return self.group.sum(local)

    # ----- a pipeline stage ------------------------------------------------------------------
    def run_pipeline(self, plan: RoundPlan, norm: torch.Tensor, n_slots: int) -> RoundOutcome:
        g, stage, bb = self.group, self.backbone.stage, self.backbone
        dist = g.dist
        actions = stage_actions(plan.flushes, self.stages)[g.pp_rank]
        mbs = {mb.index: mb for mb in plan.microbatches}
        hidden = bb.model.config.hidden_size
        saved: dict[int, tuple] = {}
        sends = []
        slot_loss = torch.zeros(n_slots, dtype=torch.float64)
        busy = 0.0
        sync = torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None)
        t_start = time.perf_counter()
        for a in actions:
            mb = mbs[a.mb]
            shape = (*mb.batch.input_ids.shape, hidden)
            if a.kind == F:
                x = None
                if not g.first_stage:
                    x = torch.empty(shape, dtype=bb.dtype, device=g.device)
                    dist.irecv(x, src=g.prev_rank, tag=2 * a.mb).wait()
                    x = x.to(bb.device).requires_grad_(True)
                t0 = time.perf_counter()
                out = stage.forward(mb.batch, x)
                if g.last_stage:
                    k = out.task_loss_sum.numel()
                    slot_loss[:k] += out.task_loss_sum.detach().to("cpu", torch.float64)
                    out = (out.task_loss_sum * norm[:k].to(out.task_loss_sum.device)).sum()
                else:
                    sends.append(dist.isend(out.detach().to(g.device).contiguous(), dst=g.next_rank, tag=2 * a.mb))
                sync()
                busy += time.perf_counter() - t0
                saved[a.mb] = (x, out)
            else:
                x, out = saved.pop(a.mb)
                grad = None
                if not g.last_stage:
                    grad = torch.empty(shape, dtype=bb.dtype, device=g.device)
                    dist.irecv(grad, src=g.next_rank, tag=2 * a.mb + 1).wait()
                    grad = grad.to(bb.device)
                t0 = time.perf_counter()
                if out.requires_grad:
                    torch.autograd.backward(out, grad)
                if not g.first_stage:
                    gx = x.grad if x.grad is not None else torch.zeros_like(x)
                    sends.append(dist.isend(gx.to(g.device).contiguous(), dst=g.prev_rank, tag=2 * a.mb + 1))
                sync()
                busy += time.perf_counter() - t0
        for s in sends:
            s.wait()
        wall = time.perf_counter() - t_start
        outcome = self._reduce(n_slots, slot_loss, plan, busy, wall)
        outcome.backward_done = True
        return outcome
