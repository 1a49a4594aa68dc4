"""Placement planner: pure and deterministic (no API calls, no clock, no randomness).

Input: pending tasks, existing groups (with their active members), GPU nodes with free GPUs,
backbone architectures. Output: a :class:`Plan`.

Algorithm
1. Reserve GPUs for the pods of existing groups that no node has bound yet (best fit).
2. Order pending tasks: priority first (higher first), then first-fit *decreasing* by the task's
   memory (adapter state + activations), then creation time, namespace and name.
3. For each task, the candidate groups are those with the same backbone and a compatible
   tenancy (a namespace's own groups; shared groups only for tasks that set
   ``shareAcrossNamespaces`` under the operator's ``opt-in`` policy, or any task under ``always``)
   and the same Kueue queue (a queued task never leaves its namespace). First fit over existing
   groups (by name; hot add), then over groups opened earlier in this plan. Fitting is the memory
   model's busiest rank (operator/memory.py), members added one by one.
4. Otherwise open a group: for every GPU class (product, memory) enumerate parallelisms
   (powers of two, tp x pp within one node; dp pods, at most ``max_dp`` and at most the task's
   batch size, only when no dp = 1 layout fits) that fit the task, and score each by GPUs per
   task after a look-ahead first-fit of the compatible pending tasks that follow (a pipeline keeps
   only a window of micro-batches in flight, so a pp group may hold many more tasks). Lowest score wins (alone, that is the smallest GPU count), then
   fewer GPUs, the larger GPU, product name. Its GPUs are reserved on nodes best-fit.
5. Tasks that fit no class even at the largest parallelism, or that wait for free GPUs, or whose
   backbone has no size figures, are returned as unplaceable with a reason.

Quality: a lower bound on GPUs (:func:`lower_bound_gpus`); ``Plan.gpus_allocated`` is measured
against it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from muxtune.api.basemodel import Architecture
from muxtune.operator.memory import (
    GroupMemory,
    MemoryConfig,
    MiB,
    Parallelism,
    TaskMemory,
    group_memory_per_gpu,
    rank_memory,
    resolve_architecture,
    task_memory,
    weight_bytes,
)
from muxtune.operator.placement import (  # noqa: F401  (re-exported: the planner's vocabulary)
    QUEUE_LABEL,
    SHARED,
    GroupPlan,
    GroupState,
    NodeInfo,
    Placement,
    Plan,
    PlannerConfig,
    TaskRequest,
    Unplaceable,
)


def group_name(base_model: str, tenancy: str | None, first_task_uid_or_key: str) -> str:
    """Deterministic: a hash of the backbone (and tenancy) plus a hash of the task that opened it.

    The same opening task always yields the same name, so a plan repeated after an operator
    restart (or before the watch has shown our own write) creates nothing new: the create
    answers 409 and the existing group is adopted.
    """
    b = hashlib.sha256(f"{base_model}|{tenancy or '*'}".encode()).hexdigest()[:8]
    t = hashlib.sha256(first_task_uid_or_key.encode()).hexdigest()[:6]
    return f"mt-{b}-{t}"


def may_share(task: TaskRequest, config: PlannerConfig) -> bool:
    """A queued task stays in its namespace: a LocalQueue is namespaced, the shared group is not there."""
    if task.queue:
        return False
    return config.sharing_policy == "always" or (config.sharing_policy == "opt-in" and task.share)


def tenancy_for(task: TaskRequest, config: PlannerConfig) -> str | None:
    """The tenancy of a group this task opens: SHARED (several namespaces) or its namespace."""
    return SHARED if may_share(task, config) else task.namespace


def compatible(task: TaskRequest, tenancy: str | None, config: PlannerConfig, queue: str | None = None) -> bool:
    if queue is not None and task.queue != queue:
        return False
    if tenancy is SHARED:
        return may_share(task, config)
    return tenancy == task.namespace


def _pow2_upto(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def candidate_parallelisms(arch: Architecture, gpus_per_node: int, max_dp: int) -> list[Parallelism]:
    """Every dp x tp x pp (powers of two; tp*pp within a node), fewest GPUs first, then dp, pp.
    tp must divide the attention heads, the key/value heads and the MLP width where the
    architecture gives them: the engine shards whole heads and whole columns, and refuses otherwise."""
    out = []
    for tp in _pow2_upto(gpus_per_node):
        if any(n and n % tp for n in (arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size)):
            continue
        for pp in _pow2_upto(gpus_per_node // tp):
            if pp > arch.layers:
                continue
            for dp in _pow2_upto(max_dp):
                out.append(Parallelism(dp=dp, tp=tp, pp=pp))
    out.sort(key=lambda p: (p.gpus, p.dp, p.pp, p.tp))
    return out


class _Capacity:
    """Free GPUs per node, reserved best-fit (the fullest node that still fits)."""

    def __init__(self, nodes: Sequence[NodeInfo]):
        self.nodes = {n.name: n for n in nodes}
        self.free = {n.name: max(0, n.gpus_free) for n in nodes}

    def classes(self) -> list[tuple[str, int]]:
        return sorted({n.gpu_class for n in self.nodes.values() if n.gpus_allocatable > 0 and n.gpu_memory_mib > 0})

    def max_per_node(self, cls: tuple[str, int]) -> int:
        return max((n.gpus_allocatable for n in self.nodes.values() if n.gpu_class == cls), default=0)

    def find(self, cls: tuple[str, int], pods: int, gpus_per_pod: int) -> list[str] | None:
        cands = sorted(
            (self.free[n.name], n.name)
            for n in self.nodes.values()
            if n.gpu_class == cls and self.free[n.name] >= gpus_per_pod
        )
        if len(cands) < pods:
            return None
        return [name for _, name in cands[:pods]]

    def reserve(self, names: Iterable[str], gpus_per_pod: int) -> None:
        for n in names:
            self.free[n] -= gpus_per_pod

    def class_of_product(self, product: str, memory_mib: int) -> tuple[str, int] | None:
        cls = (product, memory_mib)
        if any(n.gpu_class == cls for n in self.nodes.values()):
            return cls
        same = sorted(n.gpu_class for n in self.nodes.values() if n.gpu_product == product)
        return same[0] if same else None


@dataclass
class _OpenGroup:
    name: str
    namespace: str
    base_model: str
    tenancy: str | None
    par: Parallelism
    product: str
    memory_mib: int
    arch: Architecture
    members: list[str] = field(default_factory=list)
    mems: list[TaskMemory] = field(default_factory=list)
    new: bool = False
    changed: bool = False
    accepting: bool = True
    namespaces: frozenset[str] | None = None
    queue: str = ""
    acc: GroupMemory | None = None

    def memory_with(self, extra: TaskMemory | None, config: MemoryConfig) -> int:
        if self.acc is None or len(self.acc.members) != len(self.mems):
            self.acc = GroupMemory(self.arch, self.par, self.memory_mib * MiB, config)
            for m in self.mems:
                self.acc.add(m)
        return self.acc.busiest(extra)

    def accepts(self, t: TaskRequest, mem: TaskMemory, config: PlannerConfig) -> bool:
        return (
            self.accepting
            and self.base_model == t.base_model
            and compatible(t, self.tenancy, config, self.queue)
            and (self.new or self.namespaces is None or t.namespace in self.namespaces)
            and len(self.members) < config.max_tasks_per_group
            and self.memory_with(mem, config.memory) <= self.memory_mib * MiB
        )


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
    node allows, memory taken as fungible across GPUs (every adapter, and only the micro-batches a
    1F1B pipeline keeps in flight). Valid because another layout never lowers it: more groups
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
        need = min(sum(r.resident for r in rank_memory(arch, mems, Parallelism(pp=pp), usable, config))
                   for pp in _pow2_upto(min(arch.layers, max(1, max_stages))))
        total += max(groups, math.ceil((need + (groups - 1) * weight_bytes(arch)) / usable))
    return total


def plan(
    pending: Sequence[TaskRequest],
    groups: Sequence[GroupState],
    nodes: Sequence[NodeInfo],
    basemodels: Mapping[str, Architecture | None],
    config: PlannerConfig = PlannerConfig(),
    reserved_names: Iterable[str] = (),
) -> Plan:
    """Place pending tasks. Same inputs, same plan.

    ``reserved_names``: names a new group must not take (e.g. groups still terminating).
    """
    mcfg = config.memory
    cap = _Capacity(sorted(nodes, key=lambda n: n.name))
    archs: dict[str, Architecture] = {}
    arch_errors: dict[str, str] = {}

    def arch_of(base_model: str) -> Architecture | None:
        if base_model not in archs and base_model not in arch_errors:
            a, why = resolve_architecture(base_model, basemodels)
            if a is None:
                arch_errors[base_model] = why
            else:
                archs[base_model] = a
        return archs.get(base_model)

    # Existing groups, by name.
    open_groups: list[_OpenGroup] = []
    for g in sorted(groups, key=lambda g: g.name):
        arch = arch_of(g.base_model)
        og = _OpenGroup(
            name=g.name,
            namespace=g.namespace,
            base_model=g.base_model,
            tenancy=g.tenancy,
            par=g.parallelism,
            product=g.gpu_product,
            memory_mib=g.gpu_memory_mib,
            arch=arch or Architecture(parameters=1, layers=1, hidden_size=1),
            members=[m.key for m in sorted(g.members, key=lambda m: m.key)],
            mems=[task_memory(m.shape, arch, mcfg) for m in g.members] if arch else [],
            accepting=g.accepting and arch is not None,
            namespaces=g.namespaces,
            queue=g.queue,
        )
        open_groups.append(og)
        if g.unbound_pods > 0:
            cls = cap.class_of_product(g.gpu_product, g.gpu_memory_mib)
            if cls is not None:
                for _ in range(g.unbound_pods):
                    where = cap.find(cls, 1, g.parallelism.gpus_per_pod)
                    if where:
                        cap.reserve(where, g.parallelism.gpus_per_pod)

    placements: list[Placement] = []
    unplaceable: list[Unplaceable] = []
    names_taken = {g.name for g in groups} | set(reserved_names)

    # Order: priority, then FFD by memory, then creation, namespace, name.
    mems: dict[str, TaskMemory] = {}
    for t in pending:
        a = arch_of(t.base_model)
        if a is not None and t.key not in mems:
            mems[t.key] = task_memory(t.shape, a, mcfg)

    def sort_key(t: TaskRequest):
        m = mems.get(t.key)
        return (-t.priority, -(m.total_bytes if m else 0), t.created, t.namespace, t.name)

    ordered = sorted(pending, key=sort_key)
    seen: set[str] = set()
    for i, t in enumerate(ordered):
        if t.key in seen:
            continue
        seen.add(t.key)
        arch = arch_of(t.base_model)
        if arch is None:
            unplaceable.append(Unplaceable(t.key, "ModelUnknown", arch_errors[t.base_model]))
            continue
        mem = mems[t.key]

        target = next((g for g in open_groups if not g.new and g.accepts(t, mem, config)), None)
        if target is None:
            target = next((g for g in open_groups if g.new and g.accepts(t, mem, config)), None)
        if target is not None:
            target.members.append(t.key)
            target.mems.append(mem)
            target.changed = True
            placements.append(Placement(t.key, target.name, target.new))
            continue

        # Open a new group. Candidates: every GPU class x parallelism that fits the task (dp > 1 only
        # when no dp = 1 layout fits). Look ahead: fill each candidate with the compatible pending
        # tasks that follow (first fit, in order) and prefer the fewest GPUs per task it would hold;
        # with nothing else pending that is simply the smallest GPU count. Ties: fewer GPUs, the
        # larger GPU (more headroom for later hot adds), product name, layout order.
        tenancy = tenancy_for(t, config)
        ahead = []
        for u in ordered[i + 1:]:
            if len(ahead) >= 4 * config.max_tasks_per_group:
                break
            if u.base_model == t.base_model and u.key not in seen and compatible(u, tenancy, config, t.queue):
                ahead.append(mems[u.key])
        cands = []
        fits_somewhere = False
        for cls in cap.classes():
            product, mib = cls
            cap_bytes = mib * MiB
            layouts = [par for par in candidate_parallelisms(arch, cap.max_per_node(cls), config.max_dp)
                       if par.dp == 1 or par.dp <= t.shape.batch_size]  # every replica gets a sequence
            accs = {par: GroupMemory(arch, par, cap_bytes, mcfg).add(mem) for par in layouts}
            fitting = [par for par in layouts if accs[par].busiest() <= cap_bytes]
            if not fitting:
                continue
            fits_somewhere = True
            single = [par for par in fitting if par.dp == 1] or fitting[:1]
            for order, par in enumerate(single):
                acc = accs[par]
                for m in ahead:
                    if len(acc.members) >= config.max_tasks_per_group:
                        break
                    if acc.busiest(m) <= cap_bytes:
                        acc.add(m)
                cands.append((par.gpus / len(acc.members), par.gpus, -mib, product, order, par, cls))
        best = None  # (gpus, memory_mib, product, par, cls, nodes)
        for score, gpus, negmib, product, order, par, cls in sorted(cands, key=lambda c: c[:5]):
            where = cap.find(cls, par.dp, par.gpus_per_pod)
            if where is not None:
                best = (gpus, -negmib, product, par, cls, where)
                break
        if best is None:
            if not cap.classes():
                unplaceable.append(Unplaceable(t.key, "NoGpuNodes", "no node advertises nvidia.com/gpu with a gpu.memory label"))
            elif fits_somewhere:
                unplaceable.append(
                    Unplaceable(t.key, "WaitingForGpus", "fits a GPU class, but not enough free GPUs right now")
                )
            else:
                need = task_memory(t.shape, arch, mcfg).total_bytes + weight_bytes(arch)
                unplaceable.append(
                    Unplaceable(
                        t.key,
                        "TooLarge",
                        f"needs about {need / MiB:.0f} MiB; fits no GPU class even at the largest "
                        f"parallelism within one node (x{config.max_dp} data-parallel)",
                    )
                )
            continue
        _, mib, product, par, cls, where = best
        cap.reserve(where, par.gpus_per_pod)
        name = group_name(t.base_model, tenancy, t.uid or t.key)
        n = 1
        while name in names_taken:  # a hash collision, or a stale group of the same task
            name = group_name(t.base_model, tenancy, f"{t.uid or t.key}#{n}")
            n += 1
        names_taken.add(name)
        og = _OpenGroup(
            name=name,
            namespace=tenancy if tenancy is not SHARED else config.shared_namespace,
            base_model=t.base_model,
            tenancy=tenancy,
            par=par,
            product=product,
            memory_mib=mib,
            arch=arch,
            members=[t.key],
            mems=[mem],
            new=True,
            changed=True,
            queue=t.queue,
        )
        open_groups.append(og)
        placements.append(Placement(t.key, name, True))

    # Summaries.
    out_groups: list[GroupPlan] = []
    used = alloc = gpus = gpus_new = 0
    by_model: dict[str, list[TaskMemory]] = {}
    by_class: dict[tuple[str, str], list[TaskMemory]] = {}
    for g in open_groups:
        if g.base_model in archs:
            per_gpu = group_memory_per_gpu(g.arch, g.mems, g.par, g.memory_mib * MiB, mcfg)
            by_model.setdefault(g.base_model, []).extend(g.mems)
            by_class.setdefault((g.base_model, g.tenancy or "*"), []).extend(g.mems)
        else:
            per_gpu = 0
        out_groups.append(
            GroupPlan(
                name=g.name,
                namespace=g.namespace,
                base_model=g.base_model,
                tenancy=g.tenancy,
                parallelism=g.par,
                gpu_product=g.product,
                gpu_memory_mib=g.memory_mib,
                members=tuple(g.members),
                memory_per_gpu_bytes=per_gpu,
                new=g.new,
                changed=g.changed,
                queue=g.queue,
            )
        )
        gpus += g.par.gpus
        gpus_new += g.par.gpus if g.new else 0
        used += min(per_gpu, g.memory_mib * MiB) * g.par.gpus
        alloc += g.memory_mib * MiB * g.par.gpus
    classes = cap.classes() or [(g.product, g.memory_mib) for g in open_groups]
    stages = max((cap.max_per_node(c) for c in cap.classes()), default=8)
    k = config.max_tasks_per_group
    lb = lower_bound_gpus(by_model, archs, classes, mcfg, stages, k)
    lb_t = sum(lower_bound_gpus({m: mems_}, archs, classes, mcfg, stages, k) for (m, _), mems_ in sorted(by_class.items()))
    return Plan(
        placements=tuple(placements),
        groups=tuple(out_groups),
        unplaceable=tuple(unplaceable),
        gpus_allocated=gpus,
        gpus_new=gpus_new,
        lower_bound_gpus=lb,
        memory_used_bytes=used,
        memory_allocated_bytes=alloc,
        lower_bound_gpus_by_tenancy=lb_t,
    )
