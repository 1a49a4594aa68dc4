"""Tensor parallelism for the multiplexed backbone: Megatron's layout, each task's delta split with its base.

How the engine calls it (`tp`: the 1-D tensor-parallel DeviceMesh, e.g. `ParallelDims.mesh["tp"]`, or
its ProcessGroup; every tp rank runs the same batches, in the same order):

    backbone = MultiplexedBackbone(load_backbone(path, device, dtype))
    apply_tensor_parallel(backbone, tp)      # once, before any attach; a no-op when tp has one rank
    adapter = backbone.attach(slot, spec, seed)            # deltas come out sharded like their base
    result = backbone.forward_loss(batch); loss.backward()  # unchanged
    # when a task's step is complete (after its last backward, before clipping):
    sync_replicated_grads(adapter, tp)
    norm = clip_grad_norm_(adapter, max_norm, tp)          # instead of torch.nn.utils.clip_grad_norm_
    optimizer.step()
    # checkpoints hold whole tensors under PEFT's names (collectives: every tp rank calls them):
    full = gather_full_state(adapter, tp)                   # {name: whole tensor} on every tp rank
    moments = gather_optimizer_state(adapter, optimizer, tp)  # {name: {"exp_avg": whole, "step": ...}}
    load_full_state(adapter, full); load_optimizer_state(adapter, optimizer, moments)  # each keeps its block

Layout (as transformers' `base_model_tp_plan` for Llama and Qwen2): in each decoder layer q/k/v/gate/up
are column-parallel (a contiguous block of output rows: whole heads, so HF's `view(..., -1, head_dim)`
sees the local heads) and o/down row-parallel (the matching block of input columns; bias on tp rank 0
only). The attention and MLP modules are the parallel regions: their input enters replicated and its
gradient is summed over tp on the way back; their output is each rank's partial sum, all-reduced once.
Embeddings, norms and the LM head stay replicated. A sharded Linear keeps reporting the layer's whole
`in_features`/`out_features` (as a DTensor reports its global shape); its `weight` is this rank's block.

Deltas are made whole from the task's seeded generator and then keep the block matching their base
(`TaskDelta.shard_`): on a column layer LoRA B's rows and IA3's output scale are split, LoRA A and an
input scale replicated; on a row layer LoRA A's columns and an input scale are split, LoRA B and an
output scale replicated. Their partial terms are added before the region's all-reduce, so nothing is
gathered whole during a step. Replicated parameters of a split layer see only part of the layer, so
their gradient is a partial sum: `sync_replicated_grads` all-reduces those (bucketed).

Why not DTensor parameters with `parallelize_module(ColwiseParallel/RowwiseParallel)`: the multiplexed
layer calls `F.linear` on the base weight with plain activations (DTensor refuses mixed operands), its
deltas run per task through a token permutation and a per-token lookup table (DTensor propagates
index_select but mis-shards the table gather), and the fused LoRA kernel takes raw local tensors. So the
weights and deltas are plain local blocks, and only the region boundaries use DTensor, exactly the
conversions ColwiseParallel/RowwiseParallel insert: `from_local(Replicate).to_local(grad_placements=
Partial)` (identity forward, all-reduced gradient) and `from_local(Partial).redistribute(Replicate)`
(all-reduced forward, identity gradient). torch.distributed.nn's all_reduce does not fit: its backward
all-reduces the gradient again, right only if each rank's loss were a separate term.
"""
from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist
from torch import nn

from muxtune.engine.peft.base import ShardSpec, TaskDelta
from muxtune.facts import shards

BUCKET_BYTES = 25 << 20  # gradient all-reduce bucket (DDP's default)


__all__ = [
    "apply_tensor_parallel", "sync_replicated_grads", "grad_norm", "clip_grad_norm_",
    "gather_full_state", "shard_full_state", "load_full_state", "gather_optimizer_state",
    "load_optimizer_state", "named_parameters", "process_group", "classified",
]


# ----- groups ------------------------------------------------------------------------------------
def process_group(tp):
    """The ProcessGroup of a 1-D DeviceMesh or a ProcessGroup; None for no tensor parallelism."""
    if tp is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return tp.get_group() if isinstance(tp, DeviceMesh) else tp


def _size(tp) -> int:
    group = process_group(tp)
    return 1 if group is None else dist.get_world_size(group)


def _mesh(tp, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(tp, DeviceMesh):
        if tp.ndim != 1:
            raise ValueError(f"tensor parallelism takes its 1-D mesh (e.g. mesh['tp']), got {tp.ndim} dims")
        return tp
    return DeviceMesh.from_group(tp, device_type)


# ----- region boundaries (DTensor's own conversions, as ColwiseParallel/RowwiseParallel insert) ---
def _enter(x: torch.Tensor, mesh) -> torch.Tensor:
    """Replicated input of a parallel region: identity forward, gradient summed over tp."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _leave(y: torch.Tensor, mesh) -> torch.Tensor:
    """Partial output of a parallel region: all-reduced forward, gradient passed through."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _region_hooks(module: nn.Module, mesh) -> None:
    def enter(_mod, args, kwargs):
        if args:
            return (_enter(args[0], mesh), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _enter(kwargs["hidden_states"], mesh)}

    def leave(_mod, _args, output):
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (_leave(output[0], mesh), *output[1:])
        return _leave(output, mesh)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave)


# ----- sharding the backbone ----------------------------------------------------------------------
def _plan(backbone) -> tuple[dict[str, str], list[str]]:
    """{linear name: "out" | "in"} and the region module names, from the family's shard table
    (its entry in muxtune/facts/families.py, via shards.split_plan); refuses layers it cannot split."""
    table = shards.split_plan(backbone.family.model_type)
    if table is None:
        raise ValueError(f"tensor parallel: {backbone.family.name} ({backbone.family.model_type}) has no split plan")
    members = table.region_members()
    pattern = re.compile(rf"^(?P<region>.*\.(?:{'|'.join(members)}))\.(?P<proj>[a-z_0-9]+)$")
    dims, regions = {}, {}
    for name in backbone.linears:
        m = pattern.match(name)
        if m and m["proj"] in table.column + table.row:
            dims[name] = "out" if m["proj"] in table.column else "in"
            regions.setdefault(m["region"], set()).add(m["proj"])
    for region, found in sorted(regions.items()):
        needed = members[region.rsplit(".", 1)[-1]]
        if found != set(needed):
            raise ValueError(f"tensor parallel: {region} has {sorted(found)}, needs {list(needed)}")
        inner = [n for n in backbone.linears if n.startswith(region + ".") and n not in dims]
        if inner:
            raise ValueError(f"tensor parallel: {region} holds Linears outside the plan: {inner}")
    if not dims:
        raise ValueError(f"tensor parallel: no {'/'.join(members)} projections in this backbone")
    return dims, sorted(regions)


def _shard_linear(linear: nn.Linear, spec: ShardSpec) -> None:
    """Keep this rank's block of weight (and bias): rows when column-parallel, columns when row-parallel,
    whose bias is added once, by tp rank 0. in_features/out_features stay the whole layer's."""
    start, length = spec.part()
    axis = 0 if spec.dim == "out" else 1
    with torch.no_grad():
        weight = linear.weight.narrow(axis, start, length).clone()
        bias = linear.bias
        if bias is not None:
            bias = bias.narrow(0, start, length).clone() if spec.dim == "out" else (bias.clone() if spec.rank == 0 else None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


def apply_tensor_parallel(backbone, tp):
    """Shard the backbone's decoder Linears over tp in place; later attaches make sharded deltas.
    Returns the 1-D mesh used (None when tp has a single rank: then nothing changes)."""
    world = _size(tp)
    if world == 1:
        return None
    if backbone.shards:
        raise ValueError("tensor parallel: this backbone is already sharded")
    if backbone.adapters or any(len(m.deltas) for m in backbone.wrapped.values()):
        raise ValueError("tensor parallel: apply it before any task is attached")
    cfg = backbone.model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % world or kv % world:
        raise ValueError(
            f"tensor parallel size {world} must divide the attention heads ({heads}) and the key/value "
            f"heads ({kv}) of {backbone.path.name}: each rank computes whole heads"
        )
    dims, regions = _plan(backbone)
    for name, dim in dims.items():
        linear = backbone.linears[name]
        n = linear.out_features if dim == "out" else linear.in_features
        if n % world or linear.weight.shape != (linear.out_features, linear.in_features):
            raise ValueError(f"tensor parallel: {name} cannot be split {world} ways ({n} {dim}puts)")
    mesh = _mesh(tp, backbone.device.type)
    rank = mesh.get_local_rank()
    for name, dim in dims.items():
        linear = backbone.linears[name]
        spec = ShardSpec(dim, rank, world, linear.in_features, linear.out_features)
        _shard_linear(linear, spec)
        backbone.shards[name] = spec
    for region in regions:
        _region_hooks(backbone.model.get_submodule(region), mesh)
    return mesh


# ----- gradients ------------------------------------------------------------------------------------
def classified(adapter) -> list[tuple[nn.Parameter, bool, bool]]:
    """(parameter, sharded, partial gradient) in a fixed order (the same on every rank): a
    replicated parameter of a split layer has a partial gradient (each rank saw part of the layer)."""
    out = []
    for module in sorted(adapter.deltas):
        delta: TaskDelta = adapter.deltas[module]
        axes = delta.feature_axes() if delta.shard is not None else {}
        for attr, p in delta.named_parameters(recurse=False):
            sharded = delta.shard is not None and delta.shard.dim in axes.get(attr, {})
            out.append((p, sharded, delta.shard is not None and not sharded))
    return out


def _buckets(params: list[nn.Parameter], bucket_bytes: int):
    bucket, size = [], 0
    for p in params:
        if bucket and (size + p.numel() * p.element_size() > bucket_bytes
                       or (p.dtype, p.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel() * p.element_size()
    if bucket:
        yield bucket


def sync_replicated_grads(adapter, tp, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum over tp the gradients of the replicated parameters of split layers (each rank saw part of
    the layer). Call once per optimizer step, after the task's last backward; every tp rank calls it."""
    group = process_group(tp)
    if _size(tp) == 1:
        return
    partial = [p for p, _sharded, is_partial in classified(adapter) if is_partial]
    for bucket in _buckets(partial, bucket_bytes):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in bucket:
            if p.grad is not None:  # absent on every rank alike (same graph); AdamW skips it
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def grad_norm(adapter, tp) -> torch.Tensor:
    """The task's global gradient 2-norm: split parameters' squares summed over tp, replicated ones
    (already synced, equal on every rank) counted once. Every tp rank calls it."""
    params = classified(adapter)
    device = params[0][0].device if params else torch.device("cpu")
    sq = torch.zeros(2, device=device, dtype=torch.float32)  # [sharded, replicated]
    for p, sharded, _partial in params:
        if p.grad is not None:
            sq[0 if sharded else 1] += p.grad.detach().float().pow(2).sum()
    if _size(tp) > 1:
        shard_sq = sq[:1].clone()
        dist.all_reduce(shard_sq, group=process_group(tp))
        sq = torch.cat([shard_sq, sq[1:]])
    return sq.sum().sqrt()


def clip_grad_norm_(adapter, max_norm: float | None, tp) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the task's whole (sharded) adapter; returns the norm.
    With one rank it is torch's own call, so the single-process path is unchanged."""
    limit = max_norm if max_norm else float("inf")
    if _size(tp) == 1:
        return torch.nn.utils.clip_grad_norm_(adapter.parameters(), limit)
    total = grad_norm(adapter, tp)
    if math.isfinite(limit):
        coef = torch.clamp(limit / (total + 1e-6), max=1.0)  # torch's rule
        for p in adapter.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


# ----- whole state for checkpoints ------------------------------------------------------------------
def _layout(adapter) -> dict[str, tuple[TaskDelta, str, int | None]]:
    """PEFT name -> (delta, parameter attribute, split axis or None)."""
    out = {}
    for module, delta in adapter.deltas.items():
        attr = {id(p): n for n, p in delta.named_parameters(recurse=False)}
        axes = delta.feature_axes() if delta.shard is not None else {}
        for name, tensor in delta.peft_state().items():
            a = attr.get(id(tensor), name)
            axis = axes.get(a, {}).get(delta.shard.dim) if delta.shard is not None else None
            out[f"base_model.model.{module}.{name}"] = (delta, a, axis)
    return out


def named_parameters(adapter) -> dict[str, nn.Parameter]:
    """The adapter's parameters under PEFT's names (the keys of peft_state_dict and of checkpoints)."""
    return {name: getattr(delta, attr) for name, (delta, attr, _axis) in _layout(adapter).items()}


def gather_full_state(adapter, tp, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors by PEFT name, on every tp rank (a collective: every tp rank calls it). `tensors`
    defaults to the adapter's parameters; any tensors shaped like them (AdamW moments, gradients) work."""
    local = {k: v.detach() for k, v in (tensors if tensors is not None else adapter.peft_state_dict()).items()}
    world = _size(tp)
    layout = _layout(adapter)
    split = sorted(k for k in local if world > 1 and layout[k][2] is not None)
    out = {k: v.clone() for k, v in local.items() if k not in split}
    for dtype in sorted({local[k].dtype for k in split}, key=str):  # one collective per dtype
        names = [k for k in split if local[k].dtype == dtype]
        flat = torch.cat([local[k].reshape(-1) for k in names])
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat, group=process_group(tp))
        offset = 0
        for k in names:
            n = local[k].numel()
            out[k] = torch.cat([part[offset:offset + n].view_as(local[k]) for part in parts], dim=layout[k][2])
            offset += n
    return out


def shard_full_state(adapter, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's block of each whole tensor (no communication)."""
    layout = _layout(adapter)
    missing = sorted(set(layout) - set(full))
    if missing:
        raise KeyError(f"whole state lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return {k: layout[k][0].local_block(layout[k][1], v) for k, v in full.items() if k in layout}


def load_full_state(adapter, full: dict[str, torch.Tensor], tp=None) -> None:
    """Load whole tensors (a checkpoint of any layout); each rank keeps its block. No communication."""
    world = _size(tp)
    for delta in adapter.deltas.values():
        if delta.shard is not None and delta.shard.world != world and tp is not None:
            raise ValueError(f"adapter is split {delta.shard.world} ways, the group has {world} ranks")
    params = named_parameters(adapter)
    with torch.no_grad():
        for k, block in shard_full_state(adapter, full).items():
            params[k].copy_(block.to(params[k].dtype))


def gather_optimizer_state(adapter, optimizer: torch.optim.Optimizer, tp) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter optimizer state by PEFT name, whole: tensors shaped like the parameter (AdamW's
    exp_avg, exp_avg_sq) are gathered, others (its step) copied. A collective over tp."""
    params = named_parameters(adapter)
    keys = sorted({k for p in params.values() for k, v in optimizer.state.get(p, {}).items()
                   if torch.is_tensor(v) and v.shape == p.shape})
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in params if optimizer.state.get(params[n])}
    for key in keys:
        local = {n: optimizer.state[p][key] for n, p in params.items() if key in optimizer.state.get(p, {})}
        for n, t in gather_full_state(adapter, tp, local).items():
            out[n][key] = t
    for n, p in params.items():
        for key, v in optimizer.state.get(p, {}).items():
            if key not in keys:
                out[n][key] = v.clone() if torch.is_tensor(v) else v
    return out


def load_optimizer_state(adapter, optimizer: torch.optim.Optimizer, full: dict[str, dict[str, torch.Tensor]]) -> None:
    """Install whole per-parameter optimizer state (from gather_optimizer_state, any layout): each rank
    keeps its block of the tensors shaped like the whole parameter."""
    layout = _layout(adapter)
    for name, state in full.items():
        delta, attr, _axis = layout[name]
        p = getattr(delta, attr)
        whole_shape = _whole_shape(delta, attr, p)
        state_p = {}
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == whole_shape:
                state_p[k] = delta.local_block(attr, v).to(p.device).clone()
            else:
                state_p[k] = v.clone() if torch.is_tensor(v) else v
        optimizer.state[p] = state_p


def _whole_shape(delta: TaskDelta, attr: str, p: torch.Tensor) -> torch.Size:
    axis = delta.feature_axes().get(attr, {}).get(delta.shard.dim) if delta.shard is not None else None
    if axis is None:
        return p.shape
    shape = list(p.shape)
    shape[axis] *= delta.shard.world
    return torch.Size(shape)
