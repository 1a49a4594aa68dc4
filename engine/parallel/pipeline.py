"""Running one round's micro-batches through this rank's pipeline stage (pp>1).

The stage follows its 1F1B action list (schedule.py), receiving hidden states from the previous
stage and gradients from the next over torch.distributed point-to-point (irecv / isend; sends
are never waited on before the round ends, so no two stages wait on each other). Each side
computes the micro-batch's shape from the plan it built itself, so nothing but the tensors
crosses. Micro-batches hold one task each, so a non-finite loss stays inside its task: the
backward runs regardless and the trainer fails that task alone.

Afterwards the group's sums are taken as for one stage (engine/executor.py reduce_round). The
single-stage executor (pp=1) is engine/executor.py.
"""
from __future__ import annotations

import time

import torch

from muxtune.engine.executor import RoundOutcome, reduce_round
from muxtune.engine.parallel.plan import RoundPlan
from muxtune.engine.parallel.schedule import F, stage_actions


def run_pipeline(backbone, group, plan: RoundPlan, norm: torch.Tensor, n_slots: int) -> RoundOutcome:
    """pp>1: this stage's forwards and backwards of the round, then the group's sums."""
    g, stage, bb = group, backbone.stage, backbone
    dist = g.dist
    actions = stage_actions(plan.flushes, g.dims.pp)[g.pp_rank]
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
    outcome = reduce_round(g, n_slots, slot_loss, plan, busy, wall)
    outcome.backward_done = True
    return outcome
