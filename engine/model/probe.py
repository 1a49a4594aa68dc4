"""The fidelity probe: before any task trains on a backbone, its packed forward must equal the
model's own forward on each sequence alone.

A few short sequences of different lengths (one longer than the smallest sliding window the model
declares, so windows are exercised) are packed as training packs them and run through the engine's
path (engine/model/stage.py: the model's forward with per-sequence positions, the packed
attention, one row); each is also run alone through the model's stock forward with transformers'
eager attention (the reference implementation of every family: its own masks, windows and
softcaps). With two or more decoder layers the engine's pipeline slicing is checked as well: the
layers split in two stages (hidden states handed from one to the other) must give the same logits.

Tolerance, on logits, relative to the reference's largest magnitude (at least 1):
fp32 1e-5, bf16 5e-2, fp16 2e-2 (half precision: different kernels round differently; a missing
multiplier, a wrong window or position is off by orders of magnitude more). A mismatch raises
ModelLoadError naming the architecture and the measured difference: that backbone's tasks fail,
nothing trains on it.
"""
from __future__ import annotations

import torch

from muxtune.engine.data.dataset import Example
from muxtune.engine.model.loading import ModelLoadError
from muxtune.engine.packing import PackedSequence, pack
from muxtune.facts.quantization import probe_slack

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 2e-2}
SEED = 1234


def probe_lengths(config) -> list[int]:
    """Short sequences, one of them past the smallest sliding window (when the model has one)."""
    windows = [w for w in (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
               if isinstance(w, int) and w > 0]
    longest = max(13, min(windows) + 3) if windows else 13
    limit = getattr(config, "max_position_embeddings", None) or longest
    return [min(n, limit) for n in (3, 8, longest)]


def check_fidelity(backbone) -> float:
    """Max |packed - alone| over the probe's logits (and the split's); raises ModelLoadError above
    the dtype's tolerance. Runs without gradients and before any delta is attached."""
    model, cfg = backbone.model, backbone.model.config
    vocab = backbone.embedding.num_embeddings
    gen = torch.Generator().manual_seed(SEED)
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in probe_lengths(cfg)]
    batch = pack([PackedSequence(0, Example(tuple(s), tuple(s))) for s in seqs], None, backbone.device)
    with torch.no_grad():
        packed = backbone.stage.logits(batch).reshape(-1, vocab).float()
        alone = _stock_logits(model, seqs, backbone.device)
        diff = max(_span_diff(packed, batch, i, ref) for i, ref in enumerate(alone))
        if len(backbone.layers) >= 2:
            diff = max(diff, _split_diff(backbone, batch, packed))
    scale = max(1.0, max(float(r.abs().max()) for r in alone))
    allowed = TOLERANCE.get(backbone.dtype, 2e-2) * scale * probe_slack(backbone.quantization)
    if not diff <= allowed:  # NaN fails too
        arch = ", ".join(getattr(cfg, "architectures", None) or [type(model).__name__])
        raise ModelLoadError(
            f"{cfg.model_type} ({arch}): the engine's packed forward differs from the model's own forward "
            f"by {diff:.3g} (max abs logit difference on the fidelity probe; allowed {allowed:.3g} in "
            f"{str(backbone.dtype).removeprefix('torch.')}); refusing to train on it")
    return diff


def _stock_logits(model, seqs: list[list[int]], device) -> list[torch.Tensor]:
    """Each sequence alone through the model's stock forward, eager attention."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return [model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0].float() for s in seqs]
    finally:
        model.set_attn_implementation(impl)


def _span_diff(packed: torch.Tensor, batch, i: int, ref: torch.Tensor) -> float:
    row, start, n = batch.spans[i]
    at = row * batch.input_ids.shape[1] + start
    return float((packed[at:at + n] - ref.to(packed.device)).abs().max())


def _split_diff(backbone, batch, whole: torch.Tensor) -> float:
    """The layers as two pipeline stages in this process (the same hooks a real split uses)."""
    from muxtune.engine.model.stage import Stage

    cut = len(backbone.layers) // 2
    hidden = Stage(backbone, 0, cut, first=True, last=False).forward(batch)
    split = Stage(backbone, cut, len(backbone.layers), first=False, last=True).logits(batch, hidden)
    return float((split.reshape(whole.shape).float() - whole).abs().max())
