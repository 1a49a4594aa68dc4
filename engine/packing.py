"""Chunk-based data alignment: whole sequences of many tasks packed into fixed-size chunks.

Each chunk row attends block-diagonally (a token sees only earlier tokens of its own sequence)
and positions restart per sequence, so a packed forward equals separate forwards while the
padding left is only what does not fit at chunk ends.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from muxtune.engine.data import IGNORE, Example


@dataclass
class PackedSequence:
    slot: int  # which task
    example: Example


@dataclass
class TokenLayout:
    """Where each task's tokens are in the flattened [rows*chunk] batch.

    perm lists token indices grouped by task; segments[(slot, start, end)] index into perm.
    Adapted layers gather a task's tokens with it, so a task's delta touches only its own tokens.
    """

    token_slot: torch.Tensor  # [T] slot per flattened token, -1 for padding
    perm: torch.Tensor  # [T]
    inv_perm: torch.Tensor  # [T]
    segments: list[tuple[int, int, int]]
    identity: bool
    max_slot: int

    def on(self, device: torch.device) -> TokenLayout:
        """This layout on another device (layers split over several GPUs), copied once per batch."""
        if self.perm.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copies[device] = TokenLayout(self.token_slot.to(device), self.perm.to(device),
                                         self.inv_perm.to(device), self.segments, self.identity, self.max_slot)
        return copies[device]

    @classmethod
    def from_slots(cls, token_slot: torch.Tensor) -> TokenLayout:
        # stable sort keeps order within a task; padding (-1) sorts first and belongs to no segment
        perm = torch.sort(token_slot, stable=True).indices
        sorted_slots = token_slot[perm].tolist()
        segments, start = [], 0
        for i in range(1, len(sorted_slots) + 1):
            if i == len(sorted_slots) or sorted_slots[i] != sorted_slots[start]:
                if sorted_slots[start] >= 0:
                    segments.append((sorted_slots[start], start, i))
                start = i
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm), device=perm.device)
        identity = bool(torch.equal(perm, torch.arange(len(perm), device=perm.device)))
        max_slot = max((seg[0] for seg in segments), default=-1)
        return cls(token_slot, perm, inv, segments, identity, max_slot)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [rows, chunk]
    position_ids: torch.Tensor  # [rows, chunk]
    seq_ids: torch.Tensor  # [rows, chunk] sequence index within the batch, -1 for padding
    targets: torch.Tensor  # [rows*chunk] next-token targets, IGNORE for no loss
    layout: TokenLayout
    sequences: list[PackedSequence]
    spans: list[tuple[int, int, int]]  # per sequence: (row, start, length)
    real_tokens: int
    computed_tokens: int

    @property
    def effective_token_ratio(self) -> float:
        return self.real_tokens / max(1, self.computed_tokens)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, chunk, chunk] additive mask: causal within a sequence, nothing across."""
        seq = self.seq_ids.clone()
        pad = seq < 0
        # padding tokens see only themselves (a row with no visible key would give NaN)
        seq[pad] = -1 - torch.arange(int(pad.sum()), device=seq.device)
        chunk = seq.shape[1]
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=seq.device).tril()
        allowed = (seq[:, :, None] == seq[:, None, :]) & causal
        zero = torch.zeros((), dtype=dtype, device=seq.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices; longest first into the fullest bin that still fits (O(n log n))."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence of {n} tokens exceeds chunk size {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return bins


def choose_chunk(lengths: list[int], attn_ratio: float, align: int = 8, max_chunk: int | None = None) -> tuple[int, list[list[int]]]:
    """The chunk length with the least modelled cost, and its bins.

    Longer chunks pack with less padding but every token attends over more positions:
    cost = rows * C * (1 + attn_ratio * C), attn_ratio being attention FLOPs per token per
    context position over linear FLOPs per token (see MultiplexedBackbone.attn_ratio).
    Every aligned length from the longest sequence to 4x it is a candidate (a coarse grid left
    2-3% padding on long-tailed batches), each trimmed to its fullest bin; a candidate whose
    perfect packing already costs more than the best found is skipped, so few are packed.
    """
    longest = round_up(max(lengths), align)
    top = max(longest, min(max_chunk or 4 * longest, 4 * longest))
    total = sum(lengths)
    best = None
    for c in range(longest, top + 1, align):
        if best is not None and c * (1 + attn_ratio * c) * -(-total // c) >= best[0]:
            continue  # even a perfect packing at this length costs more than the best so far
        bins = best_fit_decreasing(lengths, c)
        used = round_up(max(sum(lengths[i] for i in b) for b in bins), align)  # no row fills the rest
        cost = len(bins) * used * (1 + attn_ratio * used)
        if best is None or cost < best[0]:
            best = (cost, used, bins)
    return best[1], best[2]


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def pack(sequences: list[PackedSequence], chunk_size: int | None, device: torch.device, pad_id: int = 0,
         attn_ratio: float = 0.0) -> PackedBatch:
    """Pack into chunks of chunk_size, or of the cheapest length by choose_chunk when None."""
    lengths = [len(s.example.input_ids) for s in sequences]
    if chunk_size is None:
        chunk_size, bins = choose_chunk(lengths, attn_ratio)
    else:
        bins = best_fit_decreasing(lengths, chunk_size)
    # within a chunk, order by task so a task's tokens form long runs
    bins = [sorted(b, key=lambda i: (sequences[i].slot, i)) for b in bins]
    rows = len(bins)
    ids = torch.full((rows, chunk_size), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, chunk_size), dtype=torch.long)
    seq_ids = torch.full((rows, chunk_size), -1, dtype=torch.long)
    targets = torch.full((rows, chunk_size), IGNORE, dtype=torch.long)
    slots = torch.full((rows, chunk_size), -1, dtype=torch.long)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(sequences)
    for r, b in enumerate(bins):
        o = 0
        for i in b:
            ex, n = sequences[i].example, lengths[i]
            ids[r, o:o + n] = torch.tensor(ex.input_ids)
            targets[r, o:o + n] = torch.tensor(ex.targets)
            pos[r, o:o + n] = torch.arange(n)
            seq_ids[r, o:o + n] = i
            slots[r, o:o + n] = sequences[i].slot
            spans[i] = (r, o, n)
            o += n
    layout = TokenLayout.from_slots(slots.view(-1).to(device))
    return PackedBatch(
        input_ids=ids.to(device), position_ids=pos.to(device), seq_ids=seq_ids.to(device),
        targets=targets.view(-1).to(device), layout=layout, sequences=sequences, spans=spans,
        real_tokens=sum(lengths), computed_tokens=rows * chunk_size,
    )
