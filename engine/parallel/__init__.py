"""The engine's parallel tier on torch.distributed: layout (dims), launch, the group's agreements,
round plans, the pipeline schedule and its execution, and the layout-free task state.

`setup_backbone` is what `muxtune run` calls once per backbone: it splits the layers over the
pipeline stages and shards them over the tensor-parallel ranks.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("muxtune.engine")


def apply_tensor_parallel(backbone, group) -> None:
    """Shard the base Linears (and later the tasks' deltas) over the tp ranks; nothing at tp=1."""
    if group.tp_mesh is None:
        return
    from muxtune.engine.parallel import tensor

    tensor.apply_tensor_parallel(backbone, group.tp_mesh)


def setup_backbone(backbone, group, device: torch.device, announce=print) -> None:
    """Place this rank's pipeline stage on device (the others' layers become meta tensors), then
    shard over tp. The split is announced once, by rank 0."""
    from muxtune.engine.parallel.split import describe, layer_costs, split_layers

    from muxtune.engine.model.families import require

    pp = group.dims.pp
    for path, degree in (("dp", group.dims.dp), ("pp", pp), ("tp", group.dims.tp)):
        if degree > 1:  # a family not tested through a path is refused there, naming both
            require(backbone.family, path)
    if pp > 1:
        plans = split_layers(*layer_costs(backbone.model), pp)
        if group.is_writer:
            announce(describe(plans))
        mine = plans[group.pp_rank]
        backbone.partition(mine.start, mine.end, mine.index == 0, mine.index == pp - 1, device)
    apply_tensor_parallel(backbone, group)
