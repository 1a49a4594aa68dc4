"""Which tasks share the next forward (spatial) and which wait their turn (temporal).

Weighted fair queueing on real tokens: the task with the least tokens served per unit of
weight goes first; weight doubles every +100 priority. Tasks are added until the token budget
is full; the last one may contribute part of its step (its gradients accumulate until the step
completes), so a task's step larger than the budget still trains, over several forwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from muxtune.engine.data.dataset import Example


def weight(priority: int) -> float:
    return math.pow(2.0, priority / 100.0)


@dataclass
class Pick:
    task: object
    examples: list[Example]


def select(tasks: list, token_budget: int) -> tuple[list[Pick], list]:
    """tasks: runtimes with .pending (examples left in their current step), .served_tokens,
    .priority, .slot. Returns the picks and the tasks that must wait."""
    order = sorted(tasks, key=lambda t: (t.served_tokens / weight(t.priority), -t.priority, t.slot))
    picks, waiting, used = [], [], 0
    for t in order:
        chosen = []
        for ex in t.pending:
            n = len(ex.input_ids)
            if used + n > token_budget and (used > 0 or chosen):
                break
            chosen.append(ex)
            used += n
        if chosen:
            picks.append(Pick(t, chosen))
        else:
            waiting.append(t)
    return picks, waiting
