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

Token budgets. Every group runs with a token budget (the engine's --token-budget) chosen with its
layout: the candidate layouts above are sized at the least budget a task allows (its longest
sequence, recomputed; the speed band: its whole step), so GPUs buy weights and adapter state; the
group opened then gets the largest budget its GPUs hold once the look-ahead's members are counted,
with --recompute when the budget would otherwise stay below ``target_token_budget``
(:func:`choose_budget`). Hot adds are sized at the group's fixed budget.

Inputs and outputs (stable; the tenant-fairness module decides which tasks are passed in):
``plan(pending, groups, nodes, basemodels, config, reserved_names) -> Plan``. New fields are
optional with defaults: GroupState.token_budget/recompute, GroupPlan.token_budget/recompute,
Plan.floor_gpus.

Quality: a lower bound on GPUs (:func:`lower_bound_gpus`) and the floor of weight copies and
adapter state (:func:`floor_gpus`); ``Plan.gpus_allocated`` is measured against both.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from muxtune.api.basemodel import Architecture
from muxtune.facts.budget import DEFAULT_TOKEN_BUDGET
from muxtune.facts.quantization import splittable
from muxtune.operator.bounds import _pow2_upto, floor_gpus, lower_bound_gpus  # noqa: F401  (re-exported)
from muxtune.operator.budget import choose_budget, fast_tokens, min_budget
from muxtune.operator.capacity import _Capacity
from muxtune.operator.memory import (
    GroupMemory,
    MemoryConfig,
    MiB,
    Parallelism,
    TaskMemory,
    group_memory_per_gpu,
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


def candidate_parallelisms(arch: Architecture, gpus_per_node: int, max_dp: int) -> list[Parallelism]:
    """Every dp x tp x pp (powers of two; tp*pp within a node), fewest GPUs first, then dp, pp.
    tp must divide the attention heads, the key/value heads and the MLP width where the
    architecture gives them: the engine shards whole heads and whole columns, and refuses otherwise.
    A quantized (QLoRA) base is never split: dp only."""
    out = []
    for tp in _pow2_upto(gpus_per_node):
        if any(n and n % tp for n in (arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size)):
            continue
        for pp in _pow2_upto(gpus_per_node // tp):
            if pp > arch.layers or (tp * pp > 1 and not splittable(arch.quantization)):
                continue
            for dp in _pow2_upto(max_dp):
                out.append(Parallelism(dp=dp, tp=tp, pp=pp))
    out.sort(key=lambda p: (p.gpus, p.dp, p.pp, p.tp))
    return out


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
    token_budget: int = DEFAULT_TOKEN_BUDGET
    recompute: bool = False
    fast_tokens: int = 0  # the speed band's members' step tokens per replica (all in one round)
    started: bool = False  # a member ran a step here: the budget is fixed (GroupState.started)
    gpu_fraction: float = 1.0  # < 1: a shared GPU slice; memory_mib is the share
    acc: GroupMemory | None = None
    least_acc: GroupMemory | None = None  # its members at the least budget they allow, recomputed

    def memory_with(self, extra: TaskMemory | None, config: MemoryConfig) -> int:
        if self.acc is None or len(self.acc.members) != len(self.mems):
            self.acc = GroupMemory(self.arch, self.par, self.memory_mib * MiB, config, self.token_budget,
                                   self.recompute)
            for m in self.mems:
                self.acc.add(m)
        return self.acc.busiest(extra)

    def may_join(self, t: TaskRequest, config: PlannerConfig) -> bool:
        """Backbone, tenancy, queue, namespaces and size allow ``t`` here (memory aside)."""
        return (
            self.accepting
            and self.base_model == t.base_model
            and compatible(t, self.tenancy, config, self.queue)
            and (self.new or self.namespaces is None or t.namespace in self.namespaces)
            and len(self.members) < config.max_tasks_per_group
        )

    def accepts(self, t: TaskRequest, mem: TaskMemory, config: PlannerConfig) -> bool:
        """``t`` fits at the group's own budget (a hot add: its pods keep running)."""
        return (
            self.may_join(t, config)
            and self.fast_tokens + fast_tokens(t, self.par, config) <= self.token_budget
            and self.memory_with(mem, config.memory) <= self.memory_mib * MiB
        )

    def lowered_budget(self, t: TaskRequest, mem: TaskMemory, config: PlannerConfig) -> tuple[int, bool] | None:
        """(budget, recompute) at which a group that has not run a step yet also holds ``t``; None
        when it has, or when not even the least budget its members allow, recomputed, holds them.
        A budget chosen for the members known when the group opened took the memory later ones need."""
        if self.started or not self.may_join(t, config):
            return None
        least = max(self.fast_tokens + fast_tokens(t, self.par, config), mem.shape.seq_len,
                    *(m.shape.seq_len for m in self.mems))
        cap = self.memory_mib * MiB
        acc = self.least_acc
        if acc is None or acc.token_budget != least or len(acc.members) != len(self.mems):
            acc = self.least_acc = GroupMemory(self.arch, self.par, cap, config.memory, least, True)
            for m in self.mems:
                acc.add(m)
        if acc.busiest(mem) > cap:
            return None
        return choose_budget(GroupMemory(self.arch, self.par, cap, config.memory), [*self.mems, mem], least, cap,
                             config)

    def set_budget(self, budget: tuple[int, bool]) -> None:
        self.token_budget, self.recompute = budget
        self.acc = None
        self.changed = True

    def add(self, t: TaskRequest, mem: TaskMemory, config: PlannerConfig) -> None:
        self.members.append(t.key)
        self.mems.append(mem)
        self.fast_tokens += fast_tokens(t, self.par, config)
        self.changed = True


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
    run = _Run(config, _Capacity(sorted(nodes, key=lambda n: n.name)), _Architectures(basemodels),
               names_taken={g.name for g in groups} | set(reserved_names))
    run.groups = _existing_groups(groups, run)
    mems = _task_memories(pending, run)
    ordered = _order(pending, mems)
    seen: set[str] = set()
    for i, t in enumerate(ordered):
        if t.key in seen:
            continue
        seen.add(t.key)
        _place(t, ordered[i + 1:], seen, mems, run)
    return _result(run)


class _Architectures:
    """Each backbone's figures, resolved once per plan; why not, for the tasks of one without."""

    def __init__(self, basemodels: Mapping[str, Architecture | None]):
        self.basemodels = basemodels
        self.known: dict[str, Architecture] = {}
        self.errors: dict[str, str] = {}

    def of(self, base_model: str) -> Architecture | None:
        if base_model not in self.known and base_model not in self.errors:
            a, why = resolve_architecture(base_model, self.basemodels)
            if a is None:
                self.errors[base_model] = why
            else:
                self.known[base_model] = a
        return self.known.get(base_model)


@dataclass
class _Run:
    """What placing one task after another changes: free GPUs, the groups, the answers so far."""

    config: PlannerConfig
    cap: _Capacity
    archs: _Architectures
    names_taken: set[str]
    groups: list[_OpenGroup] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)
    unplaceable: list[Unplaceable] = field(default_factory=list)


def _existing_groups(groups: Sequence[GroupState], run: _Run) -> list[_OpenGroup]:
    """Existing groups by name, the hot-add targets; the GPUs of their unbound pods are reserved
    first (best fit), since no node's free count shows them yet."""
    out = []
    for g in sorted(groups, key=lambda g: g.name):
        arch = run.archs.of(g.base_model)
        out.append(_OpenGroup(
            name=g.name,
            namespace=g.namespace,
            base_model=g.base_model,
            tenancy=g.tenancy,
            par=g.parallelism,
            product=g.gpu_product,
            memory_mib=g.gpu_memory_mib,
            arch=arch or Architecture(parameters=1, layers=1, hidden_size=1),
            members=[m.key for m in sorted(g.members, key=lambda m: m.key)],
            mems=[task_memory(m.shape, arch, run.config.memory) for m in g.members] if arch else [],
            accepting=g.accepting and arch is not None,
            namespaces=g.namespaces,
            queue=g.queue,
            token_budget=g.token_budget,
            recompute=g.recompute,
            fast_tokens=sum(fast_tokens(m, g.parallelism, run.config) for m in g.members),
            started=g.started,
            gpu_fraction=g.gpu_fraction,
        ))
        if g.unbound_pods > 0:
            _reserve_unbound(g, run.cap)
    return out


def _reserve_unbound(g: GroupState, cap: _Capacity) -> None:
    if g.gpu_fraction < 1:
        where = cap.find_slice(None, g.gpu_product)
        if where:
            cap.reserve(where, 1, shared=True)
        return
    cls = cap.class_of_product(g.gpu_product, g.gpu_memory_mib)
    if cls is None:
        return
    for _ in range(g.unbound_pods):
        where = cap.find(cls, 1, g.parallelism.gpus_per_pod)
        if where:
            cap.reserve(where, g.parallelism.gpus_per_pod)


def _task_memories(pending: Sequence[TaskRequest], run: _Run) -> dict[str, TaskMemory]:
    """Each pending task's own memory (the first request of a key wins); none without figures."""
    mems: dict[str, TaskMemory] = {}
    for t in pending:
        a = run.archs.of(t.base_model)
        if a is not None and t.key not in mems:
            mems[t.key] = task_memory(t.shape, a, run.config.memory)
    return mems


def _order(pending: Sequence[TaskRequest], mems: Mapping[str, TaskMemory]) -> list[TaskRequest]:
    """Priority, then first-fit decreasing by memory, then creation, namespace, name."""
    def sort_key(t: TaskRequest):
        m = mems.get(t.key)
        return (-t.priority, -(m.total_bytes if m else 0), t.created, t.namespace, t.name)

    return sorted(pending, key=sort_key)


def _place(t: TaskRequest, rest: Sequence[TaskRequest], seen: set[str], mems: Mapping[str, TaskMemory],
           run: _Run) -> None:
    """One task: into an open group (hot add), else into a new group, else unplaceable."""
    arch = run.archs.of(t.base_model)
    if arch is None:
        run.unplaceable.append(Unplaceable(t.key, "ModelUnknown", run.archs.errors[t.base_model]))
        return
    mem = mems[t.key]
    target = _first_fit(run.groups, t, mem, run.config)
    if target is not None:
        target.add(t, mem, run.config)
        run.placements.append(Placement(t.key, target.name, target.new))
        return
    tenancy = tenancy_for(t, run.config)
    ahead = _look_ahead(t, tenancy, rest, seen, mems, run.config)
    cands, fits_somewhere = _layout_candidates(t, arch, mem, ahead, run)
    best = _choose_layout(cands, run.cap)
    if best is None:
        run.unplaceable.append(_why_unplaceable(t, arch, fits_somewhere, run))
        return
    _open_group(t, arch, mem, tenancy, best, run)


def _first_fit(groups: Sequence[_OpenGroup], t: TaskRequest, mem: TaskMemory,
               config: PlannerConfig) -> _OpenGroup | None:
    """Existing groups first (they already hold GPUs), then those opened earlier in this plan."""
    target = next((g for g in groups if not g.new and g.accepts(t, mem, config)), None)
    if target is None:
        target = next((g for g in groups if g.new and g.accepts(t, mem, config)), None)
    for g in ([] if target is not None else sorted(groups, key=lambda g: g.new)):
        budget = g.lowered_budget(t, mem, config)
        if budget is not None:
            g.set_budget(budget)
            return g
    return target


def _look_ahead(t: TaskRequest, tenancy: str | None, rest: Sequence[TaskRequest], seen: set[str],
                mems: Mapping[str, TaskMemory], config: PlannerConfig) -> list[TaskMemory]:
    """The compatible pending tasks that follow, which a new group would take in (bounded)."""
    ahead: list[TaskMemory] = []
    for u in rest:
        if len(ahead) >= 4 * config.max_tasks_per_group:
            break
        if u.base_model == t.base_model and u.key not in seen and compatible(u, tenancy, config, t.queue):
            ahead.append(mems[u.key])
    return ahead


def _layout_candidates(t: TaskRequest, arch: Architecture, mem: TaskMemory, ahead: Sequence[TaskMemory],
                       run: _Run) -> tuple[list[tuple], bool]:
    """Every GPU class x parallelism that fits the task (dp > 1 only when no dp = 1 layout fits),
    each scored by GPUs per task once filled first-fit with ``ahead``; and whether any fits at all.

    With nothing else pending the score is simply the GPU count. Ties: fewer GPUs, the larger GPU
    (more headroom for later hot adds), product name, layout order.
    """
    config, cap = run.config, run.cap
    cands = []
    fits_somewhere = False
    for cls in cap.classes():
        product, mib = cls
        cap_bytes = mib * MiB
        layouts = [par for par in candidate_parallelisms(arch, cap.max_per_node(cls), config.max_dp)
                   if par.dp == 1 or par.dp <= t.shape.batch_size]  # every replica gets a sequence
        # sized at the least budget, recomputing: the budget then takes what memory is left
        accs = {par: GroupMemory(arch, par, cap_bytes, config.memory, min_budget(t, par, config), True).add(mem)
                for par in layouts}
        fitting = [par for par in layouts if accs[par].busiest() <= cap_bytes]
        if not fitting:
            continue
        fits_somewhere = True
        single = [par for par in fitting if par.dp == 1] or fitting[:1]
        for order, par in enumerate(single):
            acc = _fill(accs[par], ahead, cap_bytes, config.max_tasks_per_group)
            cands.append((par.gpus / len(acc.members), par.gpus, -mib, product, order, par, cls, acc.members))
    for scls in cap.slice_classes():  # one time-sliced GPU replica: 1/replicas of the GPU's memory
        _, product, mib, replicas = scls
        share = mib * MiB // replicas
        acc = GroupMemory(arch, Parallelism(), share, config.memory, min_budget(t, Parallelism(), config), True).add(mem)
        if acc.busiest() <= share:
            fits_somewhere = True
            acc = _fill(acc, ahead, share, config.max_tasks_per_group)
            cands.append((1 / replicas / len(acc.members), 1 / replicas, -mib, product, 0, Parallelism(), scls,
                          acc.members))
    return cands, fits_somewhere


def _fill(acc: GroupMemory, ahead: Sequence[TaskMemory], cap_bytes: int, max_tasks: int) -> GroupMemory:
    for m in ahead:
        if len(acc.members) >= max_tasks:
            break
        if acc.busiest(m) <= cap_bytes:
            acc.add(m)
    return acc


def _choose_layout(cands: list[tuple], cap: _Capacity) -> tuple | None:
    """The best-scored candidate that free GPUs on nodes can take now:
    (gpus, memory_mib, product, par, cls, nodes), or None."""
    for score, gpus, negmib, product, order, par, cls, filled in sorted(cands, key=lambda c: c[:5]):
        where = cap.find_slice(cls) if cls[0] == "slice" else cap.find(cls, par.dp, par.gpus_per_pod)
        if where is not None:
            return (gpus, -negmib, product, par, cls, where, filled)
    return None


def _why_unplaceable(t: TaskRequest, arch: Architecture, fits_somewhere: bool, run: _Run) -> Unplaceable:
    if not run.cap.classes() and not run.cap.slice_classes():
        return Unplaceable(t.key, "NoGpuNodes", "no node advertises nvidia.com/gpu with a gpu.memory label")
    if fits_somewhere:
        return Unplaceable(t.key, "WaitingForGpus", "fits a GPU class, but not enough free GPUs right now")
    need = task_memory(t.shape, arch, run.config.memory).total_bytes + weight_bytes(arch)
    return Unplaceable(
        t.key,
        "TooLarge",
        f"needs about {need / MiB:.0f} MiB; fits no GPU class even at the largest "
        f"parallelism within one node (x{run.config.max_dp} data-parallel)",
    )


def _open_group(t: TaskRequest, arch: Architecture, mem: TaskMemory, tenancy: str | None, best: tuple,
                run: _Run) -> None:
    """Reserve the chosen layout's GPUs on its nodes and open the group under a free name."""
    _, mib, product, par, cls, where, filled = best
    fraction = 1 / cls[3] if cls[0] == "slice" else 1.0
    mib = mib // cls[3] if cls[0] == "slice" else mib  # a slice's group sees its share of the GPU's memory
    run.cap.reserve(where, par.gpus_per_pod, shared=fraction < 1)
    name = _free_name(t, tenancy, run.names_taken)
    budget, recompute = choose_budget(GroupMemory(arch, par, mib * MiB, run.config.memory), filled,
                                      min_budget(t, par, run.config), mib * MiB, run.config)
    run.groups.append(_OpenGroup(
        name=name,
        namespace=tenancy if tenancy is not SHARED else run.config.shared_namespace,
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
        token_budget=budget,
        recompute=recompute,
        fast_tokens=fast_tokens(t, par, run.config),
        gpu_fraction=fraction,
    ))
    run.placements.append(Placement(t.key, name, True))


def _free_name(t: TaskRequest, tenancy: str | None, names_taken: set[str]) -> str:
    """The deterministic name, suffixed past a hash collision or a stale group of the same task."""
    name = group_name(t.base_model, tenancy, t.uid or t.key)
    n = 1
    while name in names_taken:
        name = group_name(t.base_model, tenancy, f"{t.uid or t.key}#{n}")
        n += 1
    names_taken.add(name)
    return name


def _result(run: _Run) -> Plan:
    """The plan, with its totals and lower bounds measured on every group it ends with."""
    mcfg = run.config.memory
    per_gpu = [group_memory_per_gpu(g.arch, g.mems, g.par, g.memory_mib * MiB, mcfg, g.token_budget, g.recompute)
               if g.base_model in run.archs.known else 0 for g in run.groups]
    lb, lb_t, floor = _lower_bounds(run)
    return Plan(
        placements=tuple(run.placements),
        groups=tuple(_group_plan(g, m) for g, m in zip(run.groups, per_gpu)),
        unplaceable=tuple(run.unplaceable),
        gpus_allocated=_gpus(run.groups),
        gpus_new=_gpus([g for g in run.groups if g.new]),
        lower_bound_gpus=lb,
        memory_used_bytes=sum(min(m, g.memory_mib * MiB) * g.par.gpus for g, m in zip(run.groups, per_gpu)),
        memory_allocated_bytes=sum(g.memory_mib * MiB * g.par.gpus for g in run.groups),
        lower_bound_gpus_by_tenancy=lb_t,
        floor_gpus=floor,
        gpu_slices=sum(g.gpu_fraction < 1 for g in run.groups),
    )


def _gpus(groups: Sequence[_OpenGroup]) -> int:
    """Whole GPUs, plus the shared slices' GPUs: a whole GPU per 1/fraction slices of a product."""
    slices: dict[str, float] = {}
    for g in groups:
        if g.gpu_fraction < 1:
            slices[g.product] = slices.get(g.product, 0.0) + g.gpu_fraction
    return sum(g.par.gpus for g in groups if g.gpu_fraction >= 1) + sum(math.ceil(v - 1e-9) for v in slices.values())


def _group_plan(g: _OpenGroup, memory_per_gpu: int) -> GroupPlan:
    return GroupPlan(
        name=g.name,
        namespace=g.namespace,
        base_model=g.base_model,
        tenancy=g.tenancy,
        parallelism=g.par,
        gpu_product=g.product,
        gpu_memory_mib=g.memory_mib,
        members=tuple(g.members),
        memory_per_gpu_bytes=memory_per_gpu,
        new=g.new,
        changed=g.changed,
        queue=g.queue,
        token_budget=g.token_budget,
        recompute=g.recompute,
        gpu_fraction=g.gpu_fraction,
    )


def _lower_bounds(run: _Run) -> tuple[int, int, int]:
    """(the plan's lower bound on GPUs, the same with each (backbone, tenancy) class apart, the floor)."""
    by_model: dict[str, list[TaskMemory]] = {}
    by_class: dict[tuple[str, str], list[TaskMemory]] = {}
    for g in run.groups:
        if g.base_model in run.archs.known:
            by_model.setdefault(g.base_model, []).extend(g.mems)
            by_class.setdefault((g.base_model, g.tenancy or "*"), []).extend(g.mems)
    cap, archs, mcfg, k = run.cap, run.archs.known, run.config.memory, run.config.max_tasks_per_group
    classes = cap.classes() or [(g.product, g.memory_mib) for g in run.groups]
    stages = max((cap.max_per_node(c) for c in cap.classes()), default=8)
    lb = lower_bound_gpus(by_model, archs, classes, mcfg, stages, k)
    lb_t = sum(lower_bound_gpus({m: mems_}, archs, classes, mcfg, stages, k)
               for (m, _), mems_ in sorted(by_class.items()))
    return lb, lb_t, floor_gpus(by_class, archs, classes, mcfg, k)
