"""What one round computes on one data-parallel replica: its share of the sequences, as micro-batches.

Every rank computes the plan of its replica from the same picks, so the ranks of a pipeline agree
on every micro-batch's shape without sending it, and the replicas' shares never overlap.

- data parallel: the round's sequences go to the replica with the fewest tokens so far, longest
  first (ties to the lower replica), so replicas carry about equal work;
- one stage (pp=1): the replica's sequences of all tasks are packed together into one fused
  micro-batch (spatial multiplexing, as in a single process);
- pipeline (pp>1): each task's sequences form up to `micro_batches` micro-batches of that task
  alone, each packed into chunks; interleaved, the round is one flush alternating between tasks,
  otherwise one flush per task.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from muxtune.engine.packing import PackedBatch, PackedSequence, pack, round_up


@dataclass
class MicroBatch:
    index: int
    tasks: list[str]  # task keys in it (one under pp>1)
    sequences: list[PackedSequence]
    batch: PackedBatch


@dataclass
class RoundPlan:
    microbatches: list[MicroBatch] = field(default_factory=list)
    flushes: list[list[int]] = field(default_factory=list)  # micro-batch indices per pipeline flush
    real_tokens: int = 0  # of this replica
    computed_tokens: int = 0

    def labels(self) -> dict[int, str]:
        return {mb.index: ",".join(k.rsplit("/", 1)[-1] for k in mb.tasks) for mb in self.microbatches}


def balance(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices into lengths, split into `parts` groups of about equal total, deterministically."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        g = min(range(parts), key=lambda k: (load[k], k))
        groups[g].append(i)
        load[g] += lengths[i]
    return [sorted(g) for g in groups]


def replica_share(picks, dp: int, dp_rank: int) -> list[tuple[object, list]]:
    """This replica's (task, examples) from the round's picks (every example goes to one replica)."""
    flat = [(k, ex) for k, p in enumerate(picks) for ex in p.examples]
    if dp == 1:
        return [(p.task, list(p.examples)) for p in picks]
    mine = balance([len(ex.input_ids) for _, ex in flat], dp)[dp_rank]
    out: dict[int, list] = {}
    for i in mine:
        k, ex = flat[i]
        out.setdefault(k, []).append(ex)
    return [(picks[k].task, exs) for k, exs in sorted(out.items())]


def plan_round(picks, *, dp: int, dp_rank: int, pp: int, micro_batches: int, interleave: bool,
               chunk_size: int | None, device: torch.device, pad_id: int, attn_ratio: float) -> RoundPlan:
    share = replica_share(picks, dp, dp_rank)
    plan = RoundPlan()

    def add(tasks: list, seqs: list[PackedSequence]) -> int:
        chunk = None
        if chunk_size:  # a fixed length, grown when a sequence would not fit
            chunk = max(chunk_size, round_up(max(len(s.example.input_ids) for s in seqs), 8))
        batch = pack(seqs, chunk, device, pad_id, attn_ratio=attn_ratio)
        mb = MicroBatch(len(plan.microbatches), [t.key for t in tasks], seqs, batch)
        plan.microbatches.append(mb)
        plan.real_tokens += batch.real_tokens
        plan.computed_tokens += batch.computed_tokens
        return mb.index

    if not share:
        return plan
    if pp == 1:
        seqs = [PackedSequence(task.slot, ex) for task, exs in share for ex in exs]
        plan.flushes = [[add([task for task, _ in share], seqs)]]
        return plan
    per_task: list[list[int]] = []
    for task, exs in share:
        groups = balance([len(ex.input_ids) for ex in exs], min(len(exs), max(1, micro_batches)))
        per_task.append([add([task], [PackedSequence(task.slot, exs[i]) for i in g]) for g in groups if g])
    if interleave:
        order = [mbs[i] for i in range(max(len(m) for m in per_task)) for mbs in per_task if i < len(mbs)]
        plan.flushes = [order]
    else:
        plan.flushes = per_task
    return plan
