"""A backbone Linear shared by many tasks: the base op runs once on all tokens, each task's
delta runs on that task's tokens only (spatial multiplexing).

The base may be a quantized bitsandbytes Linear (QLoRA, engine/model/quantize.py): then the base
op is that module's own forward (it dequantizes in its compute dtype), and the deltas stay in the
activations' dtype on top, as PEFT's bitsandbytes LoRA layers compute them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muxtune.engine.model.quantize import is_quantized
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
        self.quantized = is_quantized(base)  # packed 4/8-bit storage: only the module itself reads it

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
        y = self._base_op(xf if in_scale is None else xf * in_scale)
        out_scale = self._token_scale(layout, present, "output_scale", y)
        if out_scale is not None:
            y = y * out_scale
        add = self._additive(xf, layout, present)
        if add is not None:
            y = y + add
        return y.reshape(*shape[:-1], y.shape[-1])

    def _base_op(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return self.base(x)
        return F.linear(x, self.base.weight, self.base.bias)

    @staticmethod
    def _token_scale(layout: TokenLayout, present, kind: str, like: torch.Tensor) -> torch.Tensor | None:
        """Per-token multipliers gathered from a small table: one row per scaling task, a row of ones."""
        slots, rows = [], []
        for slot, _s, _e, delta in present:
            v = getattr(delta, kind)()
            if v is not None:
                slots.append(slot)
                rows.append(v.to(like.dtype))
        if not rows:
            return None
        table = torch.stack([torch.ones_like(rows[0])] + rows)
        # index_select, not table[idx]: advanced indexing's backward on CPU accumulates with parallel
        # atomic float adds (a different sum order each run); index_select's index_add is serial
        return table.index_select(0, layout.scale_rows(tuple(slots)))

    def _additive(self, xf: torch.Tensor, layout: TokenLayout, present) -> torch.Tensor | None:
        work = [(s, e, d) for _slot, s, e, d in present if type(d).additive is not TaskDelta.additive]
        if not work:
            return None
        # this rank's outputs (all of them unless tensor parallel; a packed weight's shape is its storage's)
        width = self.base.out_features if self.quantized else self.base.weight.shape[0]
        if self.ctx.additive_kernel is not None:
            return self.ctx.additive_kernel(xf, layout, work, width)
        return segmented_additive(xf, layout, work, width)


def segmented_additive(xf: torch.Tensor, layout: TokenLayout, work, out_features: int) -> torch.Tensor:
    """Reference path: gather each task's tokens, apply its delta, scatter back (a loop over tasks).
    Tokens are split, not sliced: one backward concatenates the pieces' gradients, where a slice
    per task would each build a gradient as large as the whole batch."""
    xp = xf if layout.identity else xf.index_select(0, layout.perm)
    sizes, run, cursor = [], [], 0
    for s, e, delta in work:
        if s > cursor:
            sizes.append(s - cursor)
            run.append(None)
        sizes.append(e - s)
        run.append(delta)
        cursor = e
    if cursor < xf.shape[0]:
        sizes.append(xf.shape[0] - cursor)
        run.append(None)
    parts = [xs.new_zeros(xs.shape[0], out_features) if d is None else d.additive(xs)
             for xs, d in zip(xp.split(sizes), run)]
    dp = parts[0] if len(parts) == 1 else torch.cat(parts)
    return dp if layout.identity else dp.index_select(0, layout.inv_perm)
