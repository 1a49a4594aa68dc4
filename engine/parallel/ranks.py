"""Starting and joining the ranks of a group, the torchrun way.

Three ways a `muxtune run` process meets the world:
- a worker (RANK and WORLD_SIZE set, by torchrun, by our own launch, or by a pod): it joins the
  group through env:// (MASTER_ADDR, MASTER_PORT) and trains as its rank;
- a launcher: not a worker, and either dp*tp*pp > 1 or the torchrun variables PET_NNODES /
  PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT are set (a pod of a
  multi-pod group): it runs torch's elastic agent as a library (the very code torchrun runs,
  configured by torchrun's own argument parser, which reads the PET_* defaults) and the agent
  starts this node's ranks;
- a single process otherwise.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

from muxtune.engine.parallel.dims import LayoutError, ParallelDims, local_device
from muxtune.engine.parallel.group import DistGroup, LocalGroup

log = logging.getLogger("muxtune.engine")
PET_VARS = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
            "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND")


def is_worker() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def must_launch(dp: int, tp: int, pp: int) -> bool:
    """Whether this process should start ranks rather than train itself."""
    if is_worker():
        return False
    return dp * tp * pp > 1 or any(v in os.environ for v in ("PET_NNODES", "PET_NPROC_PER_NODE"))


def launch_config(world: int):
    """torchrun's LaunchConfig for this node, from torchrun's parser (so PET_* mean what they mean
    to torchrun); one node with all ranks and a free port when no PET_* names a rendezvous."""
    import torch.distributed.run as torchrun

    argv = []
    multi_node = any(v in os.environ for v in ("PET_NNODES", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT"))
    if "PET_NPROC_PER_NODE" not in os.environ:
        nnodes = int(os.environ.get("PET_NNODES", "1"))
        if world % nnodes:
            raise LayoutError(f"{world} ranks cannot be spread evenly over PET_NNODES={nnodes} nodes")
        argv += ["--nproc-per-node", str(world // nnodes)]
    if not multi_node:
        argv.append("--standalone")
    args = torchrun.parse_args([*argv, "--no-python", "muxtune"])
    if args.standalone:  # as torchrun.run() does: a private c10d store on a free local port
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", os.urandom(8).hex()
    if args.master_port is None:
        args.master_port = 29500
    nnodes_min, nnodes_max = torchrun.parse_min_max_nnodes(args.nnodes)
    if nnodes_min != nnodes_max:
        raise LayoutError(f"PET_NNODES={args.nnodes}: an engine group has a fixed size (no elastic range)")
    nproc = torchrun.determine_local_world_size(args.nproc_per_node)
    if nnodes_max * nproc != world:
        raise LayoutError(
            f"--dp x --tp x --pp = {world} but the launch asks for {nnodes_max} node(s) x {nproc} "
            f"process(es) = {nnodes_max * nproc} ranks; make them equal"
        )
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1; share this node's cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config, _cmd, _args = torchrun.config_from_args(args)
    return config


def launch(world: int, entrypoint, *args) -> int:
    """Run entrypoint(*args) on every local rank of a world of that many ranks, through torch's
    elastic agent; the ranks' exit code. entrypoint is a module-level function (spawn pickles it
    by name), so this module never imports the command it launches."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        config = launch_config(world)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        print(f"error: a rank of the group failed:\n{exc.format_msg()}", file=sys.stderr)
        return 1
    except SignalException as exc:  # the agent stopped the ranks (they checkpoint on SIGTERM first)
        return 128 + int(exc.sigval)
    codes = [int(c or 0) for c in results.values()]
    return max(codes) if codes else 0


def exit_if_signalled(group, code: int, signalled: bool) -> int:
    """code, returned; but a rank of a group that a signal stopped exits with it here (after its
    work, checkpoints included, is done): its launcher, stopping on that signal, waits for the
    ranks to exit, and a rank that returned would wait in torch's worker wrapper for a reading of
    its result that never comes, until SIGKILL."""
    if group.world > 1 and signalled:
        group.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def join(dp: int, tp: int, pp: int, device: torch.device):
    """This process's group: DistGroup for a worker of a multi-rank world, LocalGroup otherwise.

    Raises LayoutError when dp*tp*pp does not match WORLD_SIZE.
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if is_worker() else 1
    dims = ParallelDims(dp, tp, pp, world)
    if world == 1:
        return LocalGroup(), device
    device = init_distributed(device)
    return DistGroup(dims, device), device


def init_distributed(device: torch.device) -> torch.device:
    """Join the default process group from the torchrun environment; this rank's device.

    NCCL when each local rank has a GPU of its own (LOCAL_RANK picks it); gloo on CPU, and when
    ranks share a GPU (NCCL refuses that; tensors then cross through host memory).
    """
    import torch.distributed as dist

    device = local_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    nccl = device.type == "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= torch.cuda.device_count()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if nccl else "gloo", init_method="env://", device_id=device if nccl else None)
    return device

