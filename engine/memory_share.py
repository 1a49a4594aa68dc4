"""An engine's share of a GPU that another group's engine uses too (MuxServe-style placement of
small backbones; `--gpu-memory-fraction`, which the operator passes to pods of a shared GPU).

On CUDA the caching allocator is capped at the share (torch.cuda.set_per_process_memory_fraction):
past it, allocation fails in this process instead of starving the neighbour. On every device the
engine also accounts what it holds against the share, so the guard is testable on CPU:

* resident: the backbone's weights on this rank, and per task its adapter's parameters, their
  gradients and AdamW's two moments (4 x the trainable bytes, as the operator's memory model);
* activations: the peak bytes autograd saved for backward in a round (saved-tensor hooks; a
  storage counts once while a saved reference to it lives; parameters excluded).

A task whose resident state would not fit the share is refused (it fails with the reason, the
others go on). A round whose peak passed the share halves the token budget, never below the
longest sequence of a running task, so the next rounds fit; the rounds so far stay exact.
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("muxtune.engine")
MiB = 1 << 20


class SavedTensorMeter:
    """Live and peak bytes of tensors saved for backward (pack/unpack hooks)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def pack(self, t):
        return _Saved(self, t)

    @staticmethod
    def unpack(saved):
        return saved.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, t):
        self.meter, self.tensor, self.key = meter, t, None
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if t.device.type == "meta" or key in meter.exclude or storage.nbytes() == 0:
            return
        self.key = key
        entry = meter.live.get(key)
        if entry is None:
            meter.live[key] = [1, storage.nbytes()]
            meter.current += storage.nbytes()
            meter.peak = max(meter.peak, meter.current)
        else:
            entry[0] += 1

    def __del__(self):
        if self.key is None:
            return
        entry = self.meter.live[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.current -= entry[1]
            del self.meter.live[self.key]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def device_bytes(device: torch.device, device_memory_mib: int | None) -> int:
    """The memory the share is a fraction of: the flag's, else the CUDA device's, else the host's."""
    if device_memory_mib:
        return device_memory_mib * MiB
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MemoryShare:
    def __init__(self, fraction: float, device: torch.device, device_memory_mib: int | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"--gpu-memory-fraction must be in (0, 1], not {fraction}")
        self.fraction = fraction
        self.limit = int(fraction * device_bytes(device, device_memory_mib))
        self.last_peak = 0
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(fraction, device)

    def resident(self, backbone, tasks) -> int:
        """Weights on this rank, plus 4 x each running task's adapter bytes (params, grads, AdamW)."""
        adapters = {id(p): p for rt in tasks if rt.adapter is not None for p in rt.adapter.parameters()}
        weights = {p.untyped_storage().data_ptr(): _nbytes(p) for p in backbone.model.parameters()
                   if p.device.type != "meta" and id(p) not in adapters}
        return sum(weights.values()) + 4 * sum(_nbytes(p) for p in adapters.values())

    def refusal(self, backbone, tasks) -> str | None:
        """Why the tasks' resident state does not fit the share (None: it does)."""
        need = self.resident(backbone, tasks)
        if need <= self.limit:
            return None
        return (f"the group's share of the GPU ({self.fraction:g} = {self.limit / MiB:.0f} MiB) cannot hold its "
                f"weights and adapter state ({need / MiB:.0f} MiB) with this task")

    @contextlib.contextmanager
    def metered(self, backbone):
        """Measure one round's saved-tensor peak (parameters excluded)."""
        meter = SavedTensorMeter({p.untyped_storage().data_ptr() for p in backbone.model.parameters()
                                  if p.device.type != "meta"})
        with meter.hooks():
            yield meter
        self.last_peak = meter.peak

    def budget_after(self, round_peak: int, token_budget: int, least: int) -> int:
        """The token budget for the next rounds: halved (not below ``least``) while a round's
        resident + saved peak passed the share."""
        if round_peak <= self.limit or token_budget <= least:
            return token_budget
        lowered = max(least, token_budget // 2)
        log.warning("round peak %.0f MiB passed the GPU share %.0f MiB: token budget %d -> %d",
                    round_peak / MiB, self.limit / MiB, token_budget, lowered)
        return lowered
