"""Free GPUs (and shared GPU slices) per node, as one plan reserves them: best fit, the fullest
node that still fits. The planner's bookkeeping (operator/planner.py)."""
from __future__ import annotations

from typing import Iterable, Sequence

from muxtune.operator.placement import NodeInfo


class _Capacity:
    """Free GPUs per node, reserved best-fit (the fullest node that still fits)."""

    def __init__(self, nodes: Sequence[NodeInfo]):
        self.nodes = {n.name: n for n in nodes}
        self.free = {n.name: max(0, n.gpus_free) for n in nodes}
        self.slices_free = {n.name: max(0, n.slices_free) for n in nodes if n.gpu_slices > 1}

    def slice_classes(self) -> list[tuple[str, str, int, int]]:
        """("slice", product, GPU memory, replicas per GPU) of the time-sliced nodes."""
        return sorted({self.nodes[n].slice_class for n in self.slices_free if self.nodes[n].gpu_memory_mib > 0})

    def find_slice(self, scls: tuple, product: str | None = None) -> list[str] | None:
        """The node, best fit, with a free slice of the class (or of the product)."""
        cands = sorted((free, n) for n, free in self.slices_free.items() if free > 0 and (
            self.nodes[n].slice_class == scls if product is None else self.nodes[n].gpu_product == product))
        return [cands[0][1]] if cands else None

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

    def reserve(self, names: Iterable[str], gpus_per_pod: int, shared: bool = False) -> None:
        for n in names:
            if shared:
                self.slices_free[n] -= 1
            else:
                self.free[n] -= gpus_per_pod

    def class_of_product(self, product: str, memory_mib: int) -> tuple[str, int] | None:
        cls = (product, memory_mib)
        if any(n.gpu_class == cls for n in self.nodes.values()):
            return cls
        same = sorted(n.gpu_class for n in self.nodes.values() if n.gpu_product == product)
        return same[0] if same else None
