"""A group's token budget (the engine's --token-budget) and recompute, chosen with its layout:
MuxTune's spatial-temporal trade-off. GPUs are bought for weights and adapter state; the budget
takes the memory left (operator/planner.py calls these; pure arithmetic on the memory model)."""
from __future__ import annotations

import math
from typing import Sequence

from muxtune.operator.memory import GroupMemory, Parallelism, TaskMemory
from muxtune.operator.placement import PlannerConfig, TaskRequest


def step_tokens(t: TaskRequest, par: Parallelism) -> int:
    """A task's step on one replica, in tokens."""
    return math.ceil(t.shape.batch_size / par.dp) * t.shape.seq_len


def fast_tokens(t: TaskRequest, par: Parallelism, config: PlannerConfig) -> int:
    """What a task of the speed band needs of its group's budget: its whole step; others nothing."""
    return step_tokens(t, par) if t.priority >= config.fast_priority else 0


def min_budget(t: TaskRequest, par: Parallelism, config: PlannerConfig) -> int:
    """The least budget a group opened for ``t`` may run with: a whole sequence, or the speed band's step."""
    return max(t.shape.seq_len, fast_tokens(t, par, config))


def choose_budget(g: GroupMemory, members: Sequence[TaskMemory], least: int, cap_bytes: int,
                  config: PlannerConfig) -> tuple[int, bool]:
    """(token budget, recompute) for a group of ``members``: the largest budget that fits without
    recompute when it reaches the target (or the members' whole fused step); else recompute when
    that fits a larger one. The spatial-temporal trade-off: GPUs are fixed by weights and state,
    the budget takes what memory is left."""
    fused = sum(math.ceil(m.shape.batch_size / g.par.dp) * m.shape.seq_len for m in members)
    budgets = sorted({b for b in config.token_budgets if b >= least} | {least}, reverse=True)

    def largest(recompute: bool) -> int:
        for b in budgets:
            acc = GroupMemory(g.arch, g.par, cap_bytes, g.config, b, recompute)
            for m in members:
                acc.add(m)
            if acc.busiest() <= cap_bytes:
                return b
        return 0

    plain = largest(False)
    if plain >= min(config.target_token_budget, fused) and plain:
        return plain, False
    checkpointed = largest(True)
    if checkpointed > plain:
        return checkpointed, True
    return (plain, False) if plain else (least, True)  # the fill was sized at (least, recompute)
