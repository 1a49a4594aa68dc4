"""A backbone Linear shared by many tasks: the base op runs once on all tokens, each task's
delta runs on that task's tokens only (spatial multiplexing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muxtune.engine.packing import TokenLayout
from muxtune.engine.peft.base import TaskDelta


class MuxContext:
    """The token layout of the batch in flight, shared by every multiplexed layer of one backbone."""

    def __init__(self) -> None:
        self.layout: TokenLayout | None = None
        self.additive_kernel = None  # optional fused implementation (GPU), same contract as _additive


class MultiplexedLinear(nn.Module):
    def __init__(self, base: nn.Linear, ctx: MuxContext):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.deltas = nn.ModuleDict()  # str(slot) -> TaskDelta

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.ctx.layout
        if layout is None or not self.deltas:
            return self.base(x)
        layout = layout.on(x.device)
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        present = [(slot, s, e, self.deltas[str(slot)]) for slot, s, e in layout.segments if str(slot) in self.deltas]
        in_scale = self._token_scale(layout, present, "input_scale", xf)
        y = F.linear(xf if in_scale is None else xf * in_scale, self.base.weight, self.base.bias)
        out_scale = self._token_scale(layout, present, "output_scale", y)
        if out_scale is not None:
            y = y * out_scale
        add = self._additive(xf, layout, present)
        if add is not None:
            y = y + add
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def _token_scale(layout: TokenLayout, present, kind: str, like: torch.Tensor) -> torch.Tensor | None:
        """Per-token multipliers gathered from a small table: one row per scaling task, a row of ones."""
        rows, slot_row = [], {}
        for slot, _s, _e, delta in present:
            v = getattr(delta, kind)()
            if v is not None:
                slot_row[slot] = len(rows) + 1
                rows.append(v.to(like.dtype))
        if not rows:
            return None
        table = torch.stack([torch.ones_like(rows[0])] + rows)
        lut = torch.zeros(layout.max_slot + 2, dtype=torch.long, device=like.device)
        for slot, row in slot_row.items():
            lut[slot + 1] = row
        # index_select, not table[idx]: advanced indexing's backward on CPU accumulates with parallel
        # atomic float adds (a different sum order each run); index_select's index_add is serial
        return table.index_select(0, lut[layout.token_slot + 1])

    def _additive(self, xf: torch.Tensor, layout: TokenLayout, present) -> torch.Tensor | None:
        work = [(s, e, d) for _slot, s, e, d in present if type(d).additive is not TaskDelta.additive]
        if not work:
            return None
        width = self.base.weight.shape[0]  # this rank's outputs (all of them unless tensor parallel)
        if self.ctx.additive_kernel is not None:
            return self.ctx.additive_kernel(xf, layout, work, width)
        return segmented_additive(xf, layout, work, width)


def segmented_additive(xf: torch.Tensor, layout: TokenLayout, work, out_features: int) -> torch.Tensor:
    """Reference path: gather each task's tokens, apply its delta, scatter back (a loop over tasks)."""
    xp = xf if layout.identity else xf.index_select(0, layout.perm)
    parts, cursor, total = [], 0, xf.shape[0]
    for s, e, delta in work:
        if s > cursor:
            parts.append(xf.new_zeros(s - cursor, out_features))
        parts.append(delta.additive(xp[s:e]))
        cursor = e
    if cursor < total:
        parts.append(xf.new_zeros(total - cursor, out_features))
    dp = torch.cat(parts)
    return dp if layout.identity else dp.index_select(0, layout.inv_perm)
