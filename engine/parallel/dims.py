"""How the ranks of one engine group are laid out: data x pipeline x tensor parallel.

Modelled on torchtitan's ParallelDims: the product of the degrees must equal the world size, and
one DeviceMesh with named dims ("pp", "dp", "tp") hands out the process group of each. Ranks are
row-major over (pp, dp, tp), so the tensor-parallel peers of a rank are neighbours (one node) and
the pipeline peers are dp*tp ranks apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class LayoutError(ValueError):
    """The requested parallel layout cannot run in this world; the message says why."""


@dataclass
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int = 1
    _mesh: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        for name in ("dp", "tp", "pp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.dp * self.tp * self.pp != self.world_size:
            raise LayoutError(
                f"--dp {self.dp} x --tp {self.tp} x --pp {self.pp} = {self.dp * self.tp * self.pp} "
                f"does not match the {self.world_size} rank(s) of this group (WORLD_SIZE); "
                "choose degrees whose product is the number of processes"
            )

    @property
    def product(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ----- coordinates of a global rank (row-major over pp, dp, tp) --------------------------
    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) index of a global rank."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    # ----- the mesh -----------------------------------------------------------------------------
    def build_mesh(self, device_type: str):
        """The DeviceMesh over the initialised default process group (gloo on CPU, NCCL on CUDA)."""
        from torch.distributed.device_mesh import init_device_mesh

        if self._mesh is None:
            self._mesh = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        return self._mesh

    @property
    def mesh(self):
        if self._mesh is None:
            raise RuntimeError("build_mesh() first")
        return self._mesh

    def group(self, dim: str):
        """The process group of this rank along dim ("dp", "pp" or "tp"); None when not distributed."""
        return self._mesh.get_group(dim) if self._mesh is not None else None


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """The device a rank computes on: its LOCAL_RANK's GPU under CUDA, the CPU otherwise."""
    if device.type == "cuda":
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device
