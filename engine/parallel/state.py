"""A task's whole (unsharded) state across the group, around engine/durable/recovery.py's API.

Under pipeline parallelism each stage holds the deltas (and their AdamW state) of its own layers;
under tensor parallelism each rank a block of them (engine/parallel/tensor.py makes them whole).
Saving: every rank takes `TaskRuntime.state_dict()`, the blocks are gathered whole over tp, the
gradients of a half-trained step summed over the data-parallel replicas (and over tp for the
replicated deltas of split layers), and rank 0 merges one part per stage into exactly the state a
single process holds, which it writes (recovery.save_task(state=...)); the other ranks only
advance their save counters (write=False). Restoring: rank 0 reads the files
(recovery.find_checkpoint / read_checkpoint), the state is broadcast, every rank applies it
(recovery.apply_checkpoint, strict=False: each keeps its layers and its block), and rank 0 settles
the output. The files do not depend on the layout, so a run resumes under another dp/tp/pp.

Every function here is a collective: all ranks call it at the same point, and any error is agreed,
so a task fails on every rank alike. With one process each is recovery's own call.
"""
from __future__ import annotations

from pathlib import Path

import torch

from muxtune.engine.durable import recovery

from muxtune.engine.durable import storage
from muxtune.engine.durable.checkpoint import TaskState
from muxtune.engine.parallel import tensor
from muxtune.engine.parallel.group import AgreedError
from muxtune.engine.peft.export import adapter_files
from muxtune.engine.task import named_tensors
from muxtune.facts.methods import get_peft_method

PREFIX = "base_model.model."  # tensor.py's PEFT names; TaskState's stable names lack it


def _whole(rt, tp, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stable-name tensors shaped like this rank's blocks -> whole tensors (collective over tp)."""
    if tp is None:
        return tensors
    out = tensor.gather_full_state(rt.adapter, tp, {PREFIX + k: v for k, v in tensors.items()})
    return {k[len(PREFIX):]: v for k, v in out.items()}


def _partial_names(rt) -> set[str]:
    """Replicated parameters of tensor-parallel split layers: each tp rank holds a partial gradient."""
    names = {id(p): n for n, p in named_tensors(rt.adapter).items()}
    return {names[id(p)] for p, _sharded, partial in tensor.classified(rt.adapter) if partial}


def _step_grads(rt, group, state: TaskState) -> dict[str, torch.Tensor]:
    """The half-trained step's gradient as one process would hold it (zeros where a rank saw none)."""
    named = named_tensors(rt.adapter)
    grads = {n: state.grads[n].clone() if n in state.grads else torch.zeros(p.shape, dtype=p.dtype)
             for n, p in named.items()}
    reduce = [(group.dp_group, list(grads))] if group.dims.dp > 1 else []
    if group.tp_mesh is not None:
        reduce.append((tensor.process_group(group.tp_mesh), sorted(_partial_names(rt))))
    for pg, names in reduce:
        for dtype in sorted({grads[n].dtype for n in names}, key=str):
            some = [n for n in names if grads[n].dtype == dtype]
            flat = torch.cat([grads[n].reshape(-1) for n in some]).to(group.device)
            group.dist.all_reduce(flat, group=pg)
            flat, offset = flat.cpu(), 0
            for n in some:
                grads[n] = flat[offset:offset + grads[n].numel()].view_as(grads[n]).clone()
                offset += grads[n].numel()
    return grads


def _local_part(rt, group) -> TaskState | None:
    """This stage's part of the task, whole across tp and dp (on one rank per stage, else None)."""
    state = rt.state_dict()
    tp = group.tp_mesh
    adapter = _whole(rt, tp, state.adapter)
    keys = sorted({k for m in state.optimizer.values() for k, v in m.items() if v.dim() > 0})
    optimizer = {n: {k: v for k, v in m.items() if v.dim() == 0} for n, m in state.optimizer.items()}
    for key in keys:  # AdamW's moments are shaped like their parameter: gathered like it
        for n, t in _whole(rt, tp, {n: m[key] for n, m in state.optimizer.items() if key in m}).items():
            optimizer[n][key] = t
    grads = _whole(rt, tp, _step_grads(rt, group, state)) if state.meta.get("in_progress") else {}
    if group.dp_rank != 0 or group.tp_rank != 0:
        return None
    return TaskState(adapter=adapter, optimizer=optimizer, grads=grads, rng=state.rng, meta=state.meta)


def full_state(rt, group) -> TaskState | None:
    """The task's whole state on rank 0 (None elsewhere): the union of the stages' parts."""
    if group.world == 1:
        return rt.state_dict()
    parts = [p for p in group.gather(_local_part(rt, group)) or [] if p is not None]
    if not group.is_writer:
        return None
    full = TaskState(adapter={}, optimizer={}, grads={}, rng={}, meta=parts[0].meta)
    for p in parts:
        full.adapter.update(p.adapter)
        full.optimizer.update(p.optimizer)
        full.grads.update(p.grads)
        full.rng.update(p.rng)
    return full


def _agree(group, fn):
    """Run fn on this rank; raise the same error everywhere if it failed on any rank."""
    error, result = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - carried to every rank
        error = str(exc) or type(exc).__name__
    error = group.first_error(error) if group.world > 1 else error
    if error is not None:
        raise RuntimeError(error)
    return result


def save_checkpoint(rt, group, base_model_path: Path, cut: dict | None = None) -> Path:
    """Checkpoint one task: rank 0 writes the whole state; every rank returns the same path."""
    if group.world == 1:
        return recovery.save_task(rt, base_model_path, cut)
    full = full_state(rt, group)
    return _agree(group, lambda: recovery.save_task(rt, base_model_path, cut, state=full, write=group.is_writer))


def save_final_adapter(rt, group, base_model_path: Path, chat_template: str | None = None) -> None:
    """The trained task's PEFT adapter (whole) in its output directory, written by rank 0, with the
    chat template its data was rendered with (chat_template.jinja), if any."""
    full = full_state(rt, group)

    def write():
        if group.is_writer:
            tensors = full.adapter if full is not None else rt.state_dict().adapter
            files = adapter_files(tensors, rt.task.spec.peft, base_model_path)
            if chat_template is not None:
                files["chat_template.jinja"] = chat_template.encode()
            for name, data in files.items():
                storage.write_atomic(Path(rt.out_dir) / name, data)

    _agree(group, write)


def on_writer(group, fn):
    """fn on rank 0 (file side), its result or error on every rank (AgreedError -> ValueError)."""
    try:
        return group.decide(fn)
    except AgreedError as exc:
        raise ValueError(str(exc)) from None


def apply(rt, group, path: Path, state: TaskState) -> None:
    """Every rank: load the whole state; a half-trained step's gradient counts once when the
    step's gradients are summed over dp (replica 0 keeps it) and over tp (rank 0 keeps the
    replicated parameters' part)."""
    if state.grads and (group.dp_rank != 0 or group.tp_rank != 0):
        partial = _partial_names(rt) if group.dp_rank == 0 else set(state.grads)
        state = TaskState(adapter=state.adapter, optimizer=state.optimizer, rng=state.rng, meta=state.meta,
                          grads={n: torch.zeros_like(g) if n in partial else g for n, g in state.grads.items()})
    _agree(group, lambda: recovery.apply_checkpoint(rt, path, state, strict=group.world == 1))


def resume_task(rt, group, allow_data_change: bool) -> Path | None:
    """recovery.resume_task for the group: rank 0 finds and reads, every rank applies."""
    if group.world == 1:
        return recovery.resume_task(rt, allow_data_change)

    def find():
        found = recovery.find_checkpoint(rt, allow_data_change)
        if found is None:
            recovery.heal_metrics(rt, 0)
        return found

    found = on_writer(group, find)
    if found is None:
        return None
    path, state, rt.resume_candidates = found
    apply(rt, group, path, state)
    on_writer(group, lambda: recovery.settle_output(rt, path))
    return path


def align(trainer) -> bool:
    """recovery.align for the group: every rank holds the same candidates, so all decide alike;
    each task moved to the common cut is read on rank 0 and applied everywhere."""
    group = trainer.group
    if group.world == 1:
        return recovery.align(trainer)

    def load(rt, path, meta, allow_data_change):
        state = on_writer(group, lambda: recovery.read_checkpoint(rt, path, meta, allow_data_change))
        try:
            apply(rt, group, path, state)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
        on_writer(group, lambda: recovery.settle_output(rt, path))

    return recovery.align(trainer, load)


def unsupported(task, dims) -> list[str]:
    """What a task asks for that this layout cannot run yet (the task fails alone, saying so):
    prompt embeddings need the whole model in one process under pp."""
    problems = []
    method = get_peft_method(task.spec.peft.method)
    if (dims.pp > 1 or dims.tp > 1) and method.attaches == "input":  # one delta for the whole model
        problems.append(f"{method.title} is not supported with --pp or --tp above 1 yet")
    return problems

