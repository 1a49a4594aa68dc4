"""Chunk-based data alignment: whole sequences of many tasks packed into fixed-size chunks.

Each token attends only to earlier tokens of its own sequence (engine/model/attention.py computes
exactly those pairs, per sequence, from the boundaries kept here) and positions restart per
sequence, so a packed forward equals separate forwards while the padding left is only what does
not fit at chunk ends. What a sequence costs (its length) is counted here and nowhere else.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from muxtune.engine.data.dataset import IGNORE, Example


@dataclass
class PackedSequence:
    slot: int  # which task
    example: Example

    @property
    def length(self) -> int:
        """Tokens this sequence occupies in a chunk."""
        return len(self.example.input_ids)


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

    def scale_rows(self, slots: tuple[int, ...]) -> torch.Tensor:
        """[T] per token, the row of a table whose row 0 is ones and row i + 1 is slots[i]'s
        (tokens of other tasks and padding get row 0). Built once per batch and set of slots,
        not once per layer."""
        cache = self.__dict__.setdefault("_scale_rows", {})
        if slots not in cache:
            lut = torch.zeros(max(self.max_slot, *slots) + 2, dtype=torch.long, device=self.token_slot.device)
            lut[torch.tensor(slots, device=lut.device) + 1] = torch.arange(1, len(slots) + 1, device=lut.device)
            cache[slots] = lut[self.token_slot + 1]
        return cache[slots]

    @classmethod
    def from_slots(cls, token_slot: torch.Tensor) -> TokenLayout:
        # stable sort keeps order within a task; padding (-1) sorts last and belongs to no segment,
        # so a batch laid out task after task, padding at the end, has the identity permutation
        key = torch.where(token_slot < 0, torch.iinfo(token_slot.dtype).max, token_slot)
        sorted_key, perm = torch.sort(key, stable=True)
        values, counts = torch.unique_consecutive(sorted_key, return_counts=True)
        segments, start = [], 0
        for slot, n in zip(values.tolist(), counts.tolist()):
            if slot != torch.iinfo(token_slot.dtype).max:
                segments.append((slot, start, start + n))
            start += n
        arange = torch.arange(len(perm), device=perm.device)
        identity = bool(torch.equal(perm, arange))
        inv = perm if identity else torch.empty_like(perm).index_copy_(0, perm, arange)
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
    # attention segments over the flattened rows*chunk tokens, cumulative: each sequence, and each
    # row's padding tail as a segment of its own (what engine/model/attention.py computes)
    cu_seq_lens: list[int]

    @property
    def effective_token_ratio(self) -> float:
        return self.real_tokens / max(1, self.computed_tokens)

    @property
    def attention_pairs_needed(self) -> int:
        """(query, key) pairs causal attention within each sequence needs."""
        return sum(triangle(n) for _row, _start, n in self.spans)

    @property
    def attention_pairs_computed(self) -> int:
        """Pairs the per-segment attention computes: the sequences' and the padding tails'."""
        return sum(triangle(e - s) for s, e in zip(self.cu_seq_lens, self.cu_seq_lens[1:]))

    @property
    def attention_work_ratio(self) -> float:
        """Attention work needed / computed (1.0: none wasted; a dense chunk mask gave ~0.27)."""
        return self.attention_pairs_needed / max(1, self.attention_pairs_computed)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, chunk, chunk] additive mask: causal within a sequence, nothing across.
        The dense reference the tests hold engine/model/attention.py to; training never builds it."""
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


def triangle(n: int) -> int:
    """(query, key) pairs of causal attention over n tokens."""
    return n * (n + 1) // 2


def choose_chunk(lengths: list[int], attn_ratio: float, align: int = 8, max_chunk: int | None = None) -> tuple[int, list[list[int]]]:
    """The chunk length with the least modelled cost, and its bins.

    Attention runs per sequence (engine/model/attention.py), so it costs the per-sequence triangles plus
    a triangle per row's padding tail, whatever the chunk:
        cost = rows * C + attn_ratio * (sum of triangle(n) over sequences + over padding tails)
    attn_ratio being attention FLOPs per (query, key) pair over linear FLOPs per token (see
    MultiplexedBackbone.attn_ratio). rows * C is a multiple of align and at least the real
    tokens, so one row holding everything, round_up(total, align) long, has the least linear
    cost of all, and its padding tail (< align tokens) is within attn_ratio * align**2 / 2 of any
    other: with no max_chunk that row is the choice. With max_chunk (micro-batches of bounded
    length), every aligned length from the longest sequence to max_chunk is packed, each trimmed
    to its fullest bin, and the cheapest wins.
    """
    total = sum(lengths)
    longest = round_up(max(lengths), align)
    whole = round_up(total, align)
    top = whole if max_chunk is None else max(longest, min(max_chunk // align * align, whole))
    if top == whole:
        return whole, [list(range(len(lengths)))]
    best = None
    for c in range(longest, top + 1, align):
        bins = best_fit_decreasing(lengths, c)
        fills = [sum(lengths[i] for i in b) for b in bins]
        used = round_up(max(fills), align)  # no row fills the rest
        cost = len(bins) * used + attn_ratio * sum(triangle(used - f) for f in fills)  # + sequences' (constant)
        if best is None or cost < best[0]:
            best = (cost, used, bins)
    return best[1], best[2]


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def pack(sequences: list[PackedSequence], chunk_size: int | None, device: torch.device, pad_id: int = 0,
         attn_ratio: float = 0.0, max_chunk: int | None = None) -> PackedBatch:
    """Pack into chunks of chunk_size, or of the cheapest length by choose_chunk when None
    (one row unless max_chunk bounds it)."""
    lengths = [s.length for s in sequences]
    if chunk_size is None:
        chunk_size, bins = choose_chunk(lengths, attn_ratio, max_chunk=max_chunk)
    else:
        bins = best_fit_decreasing(lengths, chunk_size)
    # within a chunk, order by task so a task's tokens form long runs (one row: the identity layout)
    bins = [sorted(b, key=lambda i: (sequences[i].slot, i)) for b in bins]
    ids: list[int] = []
    pos: list[int] = []
    targets: list[int] = []
    slots: list[int] = []
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(sequences)
    cu = [0]
    for r, b in enumerate(bins):
        for i in b:
            ex, n = sequences[i].example, lengths[i]
            spans[i] = (r, len(ids) - r * chunk_size, n)
            ids += ex.input_ids
            targets += ex.targets
            pos += range(n)
            slots += [sequences[i].slot] * n
            cu.append(len(ids))
        pad = (r + 1) * chunk_size - len(ids)
        if pad:
            ids += [pad_id] * pad
            targets += [IGNORE] * pad
            pos += [0] * pad
            slots += [-1] * pad
            cu.append(len(ids))
    rows = len(bins)
    seq_ids = torch.full((rows * chunk_size,), -1, dtype=torch.long)
    for i, (r, start, n) in enumerate(spans):
        seq_ids[r * chunk_size + start: r * chunk_size + start + n] = i
    layout = TokenLayout.from_slots(torch.tensor(slots).to(device))
    return PackedBatch(
        input_ids=torch.tensor(ids).view(rows, chunk_size).to(device),
        position_ids=torch.tensor(pos).view(rows, chunk_size).to(device),
        seq_ids=seq_ids.view(rows, chunk_size).to(device),
        targets=torch.tensor(targets).to(device), layout=layout, sequences=sequences, spans=spans,
        real_tokens=sum(lengths), computed_tokens=rows * chunk_size, cu_seq_lens=cu,
    )
