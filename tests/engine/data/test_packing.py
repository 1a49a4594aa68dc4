"""Packing is exact: a packed multi-task forward gives each sequence the logits it gets alone."""
from __future__ import annotations

import random

import pytest
import torch

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.data.dataset import IGNORE, Example, encode
from muxtune.engine.model.loading import load_backbone
from muxtune.engine.packing import PackedSequence, TokenLayout, best_fit_decreasing, choose_chunk, pack, triangle
from tests.helpers.models import save_tiny_checkpoint


@pytest.fixture(params=["llama", "qwen2"])
def backbone(request, tmp_path):
    path = save_tiny_checkpoint(request.param, tmp_path / request.param)
    bb = MultiplexedBackbone(load_backbone(path, torch.device("cpu"), torch.float32))
    specs = [
        PeftSpec(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        PeftSpec(method="ia3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        PeftSpec(r=8, alpha=4, target_modules=["o_proj", "up_proj"]),
    ]
    for slot, spec in enumerate(specs):
        adapter = bb.attach(slot, spec, seed=slot)
        with torch.no_grad():  # non-trivial deltas (LoRA B starts at zero, IA3 at one)
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return bb


def _sequences(tokenizer, n=11, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = "".join(rng.choice("abcdefgh xyz") for _ in range(rng.randint(1, 40)))
        out.append(PackedSequence(i % 3, encode(tokenizer, text, "!", 64, True)))
    return out


def test_packed_forward_equals_separate_forwards(backbone):
    seqs = _sequences(backbone.tokenizer)
    batch = pack(seqs, 64, torch.device("cpu"))
    assert batch.input_ids.shape[0] < len(seqs), "sequences should share chunks"
    with torch.no_grad():
        packed = backbone.logits(batch)
        worst = 0.0
        for i, s in enumerate(seqs):
            alone = pack([s], len(s.example.input_ids), torch.device("cpu"))
            ref = backbone.logits(alone)[0]
            row, start, n = batch.spans[i]
            worst = max(worst, (packed[row, start:start + n] - ref).abs().max().item())
    assert worst < 1e-5


def test_delta_touches_only_its_own_tokens(backbone):
    """Changing task 1's adapter leaves the other tasks' logits in the same chunks untouched."""
    seqs = _sequences(backbone.tokenizer, seed=1)
    batch = pack(seqs, 64, torch.device("cpu"))
    with torch.no_grad():
        before = backbone.logits(batch)
        for p in backbone.adapters[1].parameters():
            p.mul_(3.0)
        after = backbone.logits(batch)
    for i, s in enumerate(seqs):
        row, start, n = batch.spans[i]
        diff = (after[row, start:start + n] - before[row, start:start + n]).abs().max().item()
        assert (diff > 1e-4) if s.slot == 1 else (diff == 0.0), (s.slot, diff)


def test_best_fit_decreasing_places_everything_within_capacity():
    rng = random.Random(0)
    for _ in range(200):
        cap = rng.randint(8, 128)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 60))]
        bins = best_fit_decreasing(lengths, cap)
        placed = sorted(i for b in bins for i in b)
        assert placed == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        # never more than twice the lower bound (any-fit guarantee), usually near it
        assert len(bins) <= 2 * -(-sum(lengths) // cap)


def _modelled_cost(lengths, bins, chunk, ratio):
    """rows x chunk tokens + ratio x the attention pairs computed: per sequence and per padding tail."""
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    fills = [sum(lengths[i] for i in b) for b in bins]
    return len(bins) * chunk + ratio * (sum(tri(n) for n in lengths) + sum(tri(chunk - f) for f in fills))


def _brute_force(lengths, ratio, top):
    """Every aligned length packed, trimmed to its fullest row, costed: the least cost."""
    longest = -(-max(lengths) // 8) * 8
    costs = []
    for c in range(longest, top + 1, 8):
        b = best_fit_decreasing(lengths, c)
        used = -(-max(sum(lengths[i] for i in x) for x in b) // 8) * 8
        costs.append(_modelled_cost(lengths, b, used, ratio))
    return min(costs)


def _check_bins(lengths, chunk, bins):
    assert chunk % 8 == 0 and chunk >= max(lengths)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) > chunk - 8  # trimmed: no all-padding tail


def test_choose_chunk_finds_the_cheapest_aligned_length():
    """Against brute force over every aligned length, attention counted per sequence as computed."""
    rng = random.Random(1)
    for _ in range(40):
        lengths = [max(2, min(256, round(rng.lognormvariate(4.0, 0.9)))) for _ in range(rng.randint(1, 40))]
        ratio = rng.choice([0.0, 3.5e-4, 1.3e-3, 1e-2])
        # unbounded: one row, within ratio * align^2 / 2 of the best packing of any length
        chunk, bins = choose_chunk(lengths, ratio)
        _check_bins(lengths, chunk, bins)
        assert len(bins) == 1 and chunk - sum(lengths) < 8
        whole = -(-sum(lengths) // 8) * 8
        assert _modelled_cost(lengths, bins, chunk, ratio) <= _brute_force(lengths, ratio, whole) + ratio * 8 * 8 / 2
        # bounded (micro-batches): exactly the cheapest aligned length up to the bound
        bound = 2 * max(lengths)
        chunk, bins = choose_chunk(lengths, ratio, max_chunk=bound)
        _check_bins(lengths, chunk, bins)
        longest = -(-max(lengths) // 8) * 8
        assert chunk <= max(longest, bound)
        assert _modelled_cost(lengths, bins, chunk, ratio) == pytest.approx(
            _brute_force(lengths, ratio, max(longest, min(bound // 8 * 8, whole))))


def test_chunk_choice_follows_attention_as_computed():
    """Per-sequence attention costs the same in any chunk, so the choice minimises padding alone:
    the dense model (rows x chunk^2) chose short chunks and left padding at every row's end."""
    rng = random.Random(4)
    lengths = [max(8, min(256, round(rng.lognormvariate(4.2, 0.9)))) for _ in range(64)]
    seqs = [PackedSequence(i % 4, Example(tuple(range(1, n + 1)), tuple([IGNORE] * n))) for i, n in enumerate(lengths)]
    batch = pack(seqs, None, torch.device("cpu"), attn_ratio=1.3e-3)
    assert batch.input_ids.shape[0] == 1 and batch.computed_tokens - batch.real_tokens < 8
    assert batch.layout.identity  # task after task, padding last: no gather in the adapted layers
    assert batch.attention_work_ratio > 0.999
    bounded = pack(seqs, None, torch.device("cpu"), attn_ratio=1.3e-3, max_chunk=512)
    assert bounded.input_ids.shape[1] <= 512 and bounded.input_ids.shape[0] > 1


def test_oversized_sequence_is_an_error():
    with pytest.raises(ValueError, match="exceeds chunk size"):
        best_fit_decreasing([10, 70], 64)


def test_effective_token_ratio_and_targets():
    ex = [Example(tuple(range(1, n + 1)), tuple(list(range(2, n + 1)) + [IGNORE])) for n in (30, 20, 12, 40)]
    batch = pack([PackedSequence(i % 2, e) for i, e in enumerate(ex)], 64, torch.device("cpu"))
    assert batch.real_tokens == 102
    assert batch.computed_tokens == batch.input_ids.shape[0] * 64 == 128
    assert batch.effective_token_ratio == pytest.approx(102 / 128)
    # attention segments: every sequence, and each row's padding tail on its own, covering all tokens
    sizes = [e - s for s, e in zip(batch.cu_seq_lens, batch.cu_seq_lens[1:])]
    # best fit: row 0 = 40 + 20 (task 1, in order), 4 padding; row 1 = 30 + 12 (task 0), 22 padding
    assert batch.cu_seq_lens[0] == 0 and sizes == [20, 40, 4, 30, 12, 22]
    assert batch.attention_pairs_needed == sum(triangle(n) for n in (30, 20, 12, 40))
    assert batch.attention_pairs_computed == sum(triangle(n) for n in sizes)
    # a target never crosses a sequence boundary inside a chunk
    for i, e in enumerate(ex):
        row, start, n = batch.spans[i]
        flat = row * 64 + start
        assert batch.targets[flat:flat + n].tolist() == list(e.targets)


def test_token_layout_groups_tokens_by_task():
    slots = torch.tensor([1, 1, -1, 0, 2, 0, -1, 1])
    layout = TokenLayout.from_slots(slots)
    assert [seg[0] for seg in layout.segments] == [0, 1, 2]
    for slot, s, e in layout.segments:
        assert set(slots[layout.perm[s:e]].tolist()) == {slot}
    assert torch.equal(layout.perm[layout.inv_perm], torch.arange(len(slots)))
    assert layout.max_slot == 2 and not layout.identity


def test_scale_rows_map_tokens_to_their_tasks_table_row():
    layout = TokenLayout.from_slots(torch.tensor([1, 1, -1, 0, 2, 0, -1, 1]))
    rows = layout.scale_rows((2, 1))  # table: ones, task 2's scale, task 1's scale
    assert rows.tolist() == [2, 2, 0, 0, 1, 0, 0, 2]
    assert layout.scale_rows((2, 1)) is rows  # once per batch, not once per layer
    assert layout.on(torch.device("cpu")).scale_rows((0,)).tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
