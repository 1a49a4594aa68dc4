"""The optimizer steps of the tasks whose step batch completed in a round.

Their gradients are first summed over the data-parallel replicas (one bucketed all-reduce for
all of them, in a fixed order; before it, over the tensor-parallel ranks for replicated deltas of
split layers), so each rank holds the single-process gradient of its part. The clipping norm is
the task's global norm: tensor-parallel shards and pipeline stages each hold part of the adapter,
so their squared norms are summed. Then each task steps its own AdamW and LR schedule, and
the group agrees on whether any stage's weights went non-finite, so a task fails on every rank at
the same step. What became of each task is returned; the trainer applies it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from muxtune.engine.parallel import tensor


def grad_norms(tasks, group) -> list[torch.Tensor]:
    """Each task's global gradient L2 norm (before clipping), as one process would compute it:
    over the tensor-parallel shards (engine/parallel/tensor.py), then over the pipeline stages."""
    if group.dims.pp == 1 and group.dims.tp == 1:
        return [torch.nn.utils.get_total_norm([p.grad for p in rt.adapter.parameters() if p.grad is not None])
                for rt in tasks]
    squares = torch.zeros(len(tasks), dtype=torch.float64)
    for i, rt in enumerate(tasks):
        if group.tp_mesh is not None:
            squares[i] = float(tensor.grad_norm(rt.adapter, group.tp_mesh)) ** 2
        else:
            grads = [p.grad for p in rt.adapter.parameters() if p.grad is not None]
            squares[i] = float(torch.nn.utils.get_total_norm(grads)) ** 2 if grads else 0.0
    return list(group.sum_stages(squares).sqrt().to(torch.float32))


def clip(rt, norm: torch.Tensor) -> None:
    """torch.nn.utils.clip_grad_norm_'s rule with a norm computed over the whole group."""
    max_norm = rt.task.spec.training.max_grad_norm
    if not max_norm:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in rt.adapter.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))


@dataclass
class StepOutcome:
    """What one task's step came to: failed (the reason), or stepped with this lr and gradient norm."""

    task: object  # the TaskRuntime
    failed: str | None = None
    lr: float = 0.0
    grad_norm: float = 0.0


def step_all(group, tasks) -> list[StepOutcome]:
    """Step every task in tasks (their pending lists are empty), in the given order. Returns what
    became of each, the failures of non-finite gradients first, for the trainer to apply."""
    if not tasks:
        return []
    if group.tp_mesh is not None:  # replicated deltas of split layers saw part of the layer: sum over tp
        for rt in tasks:
            tensor.sync_replicated_grads(rt.adapter, group.tp_mesh)
    group.allreduce_grads([p for rt in tasks for p in rt.adapter.parameters()])
    norms = grad_norms(tasks, group)
    failed, stepped = [], []
    for rt, norm in zip(tasks, norms):
        if not torch.isfinite(norm):
            failed.append(StepOutcome(rt, failed=f"gradient became non-finite at step {rt.step + 1}"))
            continue
        clip(rt, norm)
        lr = rt.optimizer.param_groups[0]["lr"]
        rt.optimizer.step()
        rt.scheduler.step()
        rt.optimizer.zero_grad(set_to_none=True)
        stepped.append(StepOutcome(rt, lr=lr, grad_norm=float(norm)))
    if not stepped:
        return failed
    bad = group.sum(torch.tensor([0.0 if _finite(o.task.adapter.parameters()) else 1.0 for o in stepped],
                                 dtype=torch.float64))
    for o, b in zip(stepped, bad.tolist()):
        if b:
            o.failed = f"adapter weights became non-finite at step {o.task.step + 1}"
    return failed + stepped


def _finite(params) -> bool:
    return not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one device sync
