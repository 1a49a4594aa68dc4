"""IA3-style per-token scales must backpropagate in the same order every run: a task trained twice
ends bitwise where it ended before (exact resume and replay depend on it). Advanced indexing's
backward on CPU adds with parallel atomics once a batch is large, so its sums change run to run."""
from __future__ import annotations

import torch
from torch import nn

from muxtune.engine.packing import TokenLayout
from muxtune.engine.peft.mux_linear import MultiplexedLinear


class _Scale(nn.Module):
    def __init__(self, width: int, seed: int):
        super().__init__()
        self.v = nn.Parameter(1 + 0.1 * torch.randn(width, generator=torch.Generator().manual_seed(seed)))

    def output_scale(self):
        return self.v


def _grads(tokens: int, width: int) -> list[torch.Tensor]:
    slots = torch.arange(tokens) % 3  # three tasks interleaved, as packing leaves them
    layout = TokenLayout.from_slots(slots)
    deltas = {s: _Scale(width, s) for s in range(3)}
    present = [(slot, s, e, deltas[slot]) for slot, s, e in layout.segments]
    y = torch.randn(tokens, width, generator=torch.Generator().manual_seed(7))
    scale = MultiplexedLinear._token_scale(layout, present, "output_scale", y)
    (y * scale).square().sum().backward()
    return [deltas[s].v.grad.clone() for s in range(3)]


def test_per_token_scale_gradients_are_bitwise_repeatable():
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        first = _grads(4096, 64)  # 262k gathered elements: far above the parallel threshold
        for _ in range(20):
            again = _grads(4096, 64)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)
