"""What the engine really holds per rank, measured on CPU: the accounting the operator's memory model
(operator/memory.py) is checked against, term by term.

Runs on every rank of a test group started by torch's elastic launch (spawn pickles the function
by module name, so it lives in an importable module, not in a test file). Each rank builds the
real engine (MultiplexedBackbone, the pipeline split, MuxTrainer over a DistGroup on gloo), trains
one round in which every task completes a step, and reports, with no CUDA allocator to ask:

* weights: bytes of the frozen backbone parameters that live on this rank (other stages' layers
  are meta tensors after the engine's partition; a tensor-parallel Linear keeps its local block);
* adapter_state: the tasks' delta parameters, their gradients (taken when the optimizer steps)
  and AdamW's state tensors;
* activations: the peak over the round of the bytes autograd holds saved for backward, tracked by
  saved-tensor hooks (a storage counts once, while any saved reference to it is alive; parameters
  are excluded: they are counted above). Under a pipeline this includes the in-flight micro-batches
  of the 1F1B schedule, since a micro-batch's saved tensors live from its forward to its backward.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from muxtune.engine.memory_share import SavedTensorMeter  # noqa: F401  (the engine's own meter)


@contextlib.contextmanager
def metering_recomputation(meter: SavedTensorMeter):
    """Under --recompute a layer's saved tensors are rebuilt in backward and held by
    torch.utils.checkpoint (keyed by a handle the layer's backward drops), not through the
    saved-tensor hooks: count each for as long as its handle lives, so the peak includes the
    layer being recomputed. (A layer's input, saved for the recomputation, goes through the hooks.)"""
    import torch.utils.checkpoint as cp

    original = cp._recomputation_hook.__init__

    def init(self, frame_ref, gid):
        original(self, frame_ref, gid)
        inner = self.pack_hook

        def pack(x):
            out = inner(x)
            frame = frame_ref()
            for handle, kept in list(frame.recomputed[gid].items()) if frame is not None else ():
                if kept is out and not hasattr(handle, "meter"):
                    handle.meter = meter.pack(out)  # released with the handle
            return out

        pack._checkpoint_internal = True
        self.pack_hook = pack

    cp._recomputation_hook.__init__ = init
    try:
        yield
    finally:
        cp._recomputation_hook.__init__ = original


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def measure(out: str, data_root: str, docs: list[dict], model: str, dtype: str, dp: int, pp: int,
            muxtune_home: str, tp: int = 1, token_budget: int = 1 << 30, recompute: bool = False) -> dict:
    """Training rounds on this rank until every task has stepped (one round without a budget);
    what it held at the peak (see the module docstring)."""
    import torch

    from muxtune.api.finetunetask import FineTuneTask
    from muxtune.engine import parallel
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import builtin_path, load_backbone
    from muxtune.engine.parallel.dims import ParallelDims
    from muxtune.engine.parallel.group import DistGroup, LocalGroup
    from muxtune.engine.parallel.ranks import init_distributed
    from muxtune.engine.trainer import MuxTrainer

    os.environ["MUXTUNE_HOME"] = muxtune_home
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    path = builtin_path(model)  # before torch.distributed starts: transformers saves on rank 0 only
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        device = init_distributed(cpu)
        group = DistGroup(ParallelDims(dp, tp, pp, world), device)
    else:
        device, group = cpu, LocalGroup()
    backbone = MultiplexedBackbone(load_backbone(path, cpu, getattr(torch, dtype)))
    parallel.setup_backbone(backbone, group, device, announce=lambda _m: None)
    backbone.recompute = recompute  # the engine's --recompute
    trainer = MuxTrainer(backbone, Path(out), token_budget=token_budget, resume=False, base_dir=Path(data_root),
                         group=group)
    for doc in docs:
        trainer.add_task(FineTuneTask.model_validate(doc))
    tasks = list(trainer.tasks.values())
    assert all(rt.phase == "Running" for rt in tasks), [(rt.key, rt.phase, rt.message) for rt in tasks]

    grads: dict[str, int] = {}
    for rt in tasks:  # gradients as the optimizer finds them when it steps
        rt.optimizer.register_step_pre_hook(lambda _opt, _a, _k, _rt=rt: grads.__setitem__(
            _rt.key, sum(_nbytes(p.grad) for p in _rt.adapter.parameters() if p.grad is not None)))
    params = [p for p in backbone.model.parameters() if p.device.type != "meta"]
    meter = SavedTensorMeter({p.untyped_storage().data_ptr() for p in params})
    with meter.hooks(), (metering_recomputation(meter) if recompute else contextlib.nullcontext()):
        while any(rt.step == 0 for rt in tasks) and trainer.run_round():
            pass
    assert set(grads) == {rt.key for rt in tasks}, f"not every task stepped in the round: {sorted(grads)}"
    adapter_ids = {id(p) for rt in tasks for p in rt.adapter.parameters()}
    optimizer = sum(_nbytes(v) for rt in tasks for s in rt.optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    return {
        "rank": group.rank,
        "stage": group.pp_rank,
        "dp_rank": group.dp_rank,
        "weights": sum(_nbytes(p) for p in params if id(p) not in adapter_ids),
        "adapter_params": sum(_nbytes(p) for rt in tasks for p in rt.adapter.parameters()),
        "grads": sum(grads.values()),
        "optimizer": optimizer,
        "activations": meter.peak,
        "steps": {rt.key: rt.step for rt in tasks},
    }


def measure_all(world: int, *args) -> list[dict]:
    """measure(*args) on `world` local ranks (gloo), or in this process for one rank; by rank."""
    if world == 1:
        return [measure(*args)]
    from torch.distributed.launcher.api import elastic_launch

    from muxtune.engine.parallel.ranks import launch_config

    os.environ["OMP_NUM_THREADS"] = "1"
    results = elastic_launch(launch_config(world), measure)(*args)
    return [results[r] for r in sorted(results)]
