"""Quality bounds a plan is measured against: a lower bound on GPUs, and the floor of weight copies
and adapter state alone (operator/planner.py reports both on every Plan)."""
from __future__ import annotations

import math
from typing import Iterable, Mapping

from muxtune.api.basemodel import Architecture
from muxtune.operator.memory import MemoryConfig, MiB, Parallelism, TaskMemory, rank_memory, weight_bytes


def _pow2_upto(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def lower_bound_gpus(
    tasks_by_model: Mapping[str, list[TaskMemory]],
    archs: Mapping[str, Architecture],
    gpu_classes: Iterable[tuple[str, int]],
    config: MemoryConfig = MemoryConfig(),
    max_stages: int = 8,
    max_tasks_per_group: int = 32,
) -> int:
    """Per backbone max(groups, ceil(least bytes its tasks need / largest usable GPU)), summed.

    Its tasks need at least ceil(n / max_tasks_per_group) groups, each with a copy of the weights.
    The least bytes: those copies, plus all tasks as if in one group whose pipeline is as deep as a
    node allows, memory taken as fungible across GPUs (every adapter, and the activations of the
    least round a token budget allows: the longest sequence alone, recomputed). Valid because another layout never lowers it: more groups
    repeat weights and in-flight micro-batches, tp replicates norms, dp splits batches, and tasks
    of different backbones never share a GPU.
    """
    usable = max((mib * MiB - config.reserve(mib * MiB) for _, mib in gpu_classes), default=0)
    if usable <= 0:
        return 0
    total = 0
    for model, mems in sorted(tasks_by_model.items()):
        if not mems:
            continue
        arch = archs[model]
        groups = math.ceil(len(mems) / max(1, max_tasks_per_group))
        need = min(sum(r.resident for r in rank_memory(arch, mems, Parallelism(pp=pp), usable, config, 1, True))
                   for pp in _pow2_upto(min(arch.layers, max(1, max_stages))))
        total += max(groups, math.ceil((need + (groups - 1) * weight_bytes(arch)) / usable))
    return total


def floor_gpus(tasks_by_class: Mapping[tuple[str, str], list[TaskMemory]], archs: Mapping[str, Architecture],
               gpu_classes: Iterable[tuple[str, int]], config: MemoryConfig = MemoryConfig(),
               max_tasks_per_group: int = 32) -> int:
    """GPUs that weight copies and adapter + optimizer state alone need, activations left out (one
    token budget bounds them): per (backbone, tenancy) class, ceil(n / max_tasks_per_group) groups
    of at least one GPU each, each a copy of the weights, plus every task's state, on the largest
    usable GPU. What a planner that sizes budgets (not whole fused steps) is measured against."""
    usable = max((mib * MiB - config.reserve(mib * MiB) for _, mib in gpu_classes), default=0)
    if usable <= 0:
        return 0
    total = 0
    for (model, _tenancy), mems in sorted(tasks_by_class.items()):
        if mems:
            groups = math.ceil(len(mems) / max(1, max_tasks_per_group))
            need = groups * weight_bytes(archs[model]) + sum(m.adapter_state_bytes for m in mems)
            total += max(groups, math.ceil(need / usable))
    return total
