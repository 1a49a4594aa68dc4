"""The engine's view of its process group: who it is, and the few agreements ranks must reach.

Every rank runs the same trainer over the same task files and data streams, so most decisions are
already identical everywhere. What could differ (a signal, a file only rank 0 reads, a non-finite
value one stage sees) is agreed through torch.distributed collectives here: rank 0 decides and
broadcasts, or the ranks reduce a flag. A single process gets LocalGroup, whose agreements are the
identity, so the trainer has one code path.
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

from muxtune.engine.parallel.dims import ParallelDims

log = logging.getLogger("muxtune.engine")
T = TypeVar("T")
BUCKET_BYTES = 25 << 20  # gradient all-reduce bucket (DDP's default size)
ERROR_KEY = "muxtune/first_error"  # the rendezvous store key of the first error a rank recorded


class AgreedError(RuntimeError):
    """An error rank 0 met while deciding for the group; every rank raises it with rank 0's message."""


class LocalGroup:
    """One process: every agreement is the identity."""

    dims = ParallelDims()
    rank = 0
    world = 1
    pp_rank = dp_rank = tp_rank = 0
    is_writer = True
    device = torch.device("cpu")
    tp_mesh = None  # the 1-D tensor-parallel DeviceMesh (engine/parallel/tensor.py), None at tp=1

    @property
    def num_stages(self) -> int:
        return self.dims.pp

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def reports(self) -> bool:
        """Whether this rank's per-round numbers count in group sums (one rank per dp replica of a stage)."""
        return self.tp_rank == 0

    def decide(self, fn: Callable[[], T]) -> T:
        return fn()

    def first_error(self, error: str | None) -> str | None:
        return error

    def record_error(self, error: str) -> str:
        """Record this rank's error without a collective; the group's first recorded error out."""
        return error

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def sum_stages(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def allreduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        return None

    def gather(self, obj) -> list:
        return [obj]

    def close(self) -> None:
        return None


class DistGroup(LocalGroup):
    """A rank of a torch.distributed group laid out by ParallelDims (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, dims: ParallelDims, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.dims = dims
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        # where collective and point-to-point tensors live: the GPU under NCCL, host memory under gloo
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        dims.build_mesh(self.device.type)
        self.pp_rank, self.dp_rank, self.tp_rank = dims.coords(self.rank)
        self.is_writer = self.rank == 0
        self.dp_group, self.pp_group, self.tp_group = dims.group("dp"), dims.group("pp"), dims.group("tp")
        self.tp_mesh = dims.mesh["tp"] if dims.tp > 1 else None
        step = dims.dp * dims.tp
        self.prev_rank = self.rank - step if self.pp_rank > 0 else None
        self.next_rank = self.rank + step if self.pp_rank < dims.pp - 1 else None

    def decide(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs fn; every rank returns its result (or raises AgreedError with its message)."""
        box = [None]
        if self.is_writer:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - carried to every rank
                box[0] = ("error", str(exc))
        self.dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise AgreedError(value)
        return value

    def first_error(self, error: str | None) -> str | None:
        """Every rank's local error (or None) in; the lowest rank's error out, the same everywhere."""
        errors = [None] * self.world
        self.dist.all_gather_object(errors, error)
        return next((e for e in errors if e is not None), None)

    def record_error(self, error: str) -> str:
        """An exception one rank meets cannot be agreed through a collective (the other ranks may be
        inside another one, or already gone), so it is recorded in the group's rendezvous store, which
        outlives the ranks: the first rank to record wins. A rank that fails because a peer died (its
        collective errors out) records too and gets the peer's error back, so rank 0 writes the real
        reason into status.json ("rank 1: ..."), not "connection closed"."""
        mine = f"rank {self.rank}: {error}"
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            return _get_default_store().compare_set(ERROR_KEY, "", mine).decode()
        except Exception:  # noqa: BLE001 - no store reachable: this rank's own error is all there is
            return mine

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        out = values.to(self.device)
        self.dist.all_reduce(out)
        return out.to(values.device)

    def sum_stages(self, values: torch.Tensor) -> torch.Tensor:
        if self.dims.pp == 1:
            return values
        out = values.to(self.device)
        self.dist.all_reduce(out, group=self.pp_group)
        return out.to(values.device)

    def allreduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over the data-parallel replicas, in buckets, in the order given.

        Every replica passes the same parameters in the same order (the same tasks completed on
        every rank); a parameter that saw no tokens here contributes zeros.
        """
        if self.dims.dp == 1 or not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in params:
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= BUCKET_BYTES:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, params: list[torch.nn.Parameter]) -> None:
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group]).to(self.device)
            self.dist.all_reduce(flat, group=self.dp_group)
            offset = 0
            for p in group:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.is_writer else None
        self.dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
