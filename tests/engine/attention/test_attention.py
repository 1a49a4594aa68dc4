"""Per-sequence attention equals the dense block-diagonal mask it replaces: logits and every task's
adapter gradients, for Llama and Qwen2, multi-row chunks whose rows end in padding, one-row
batches, LoRA and IA3 together. The dense path (HF's sdpa with PackedBatch.attention_mask) is the
reference; training never builds it."""
from __future__ import annotations

import random

import pytest
import torch

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.model import attention
from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.data.dataset import IGNORE, encode
from muxtune.engine.model.loading import load_backbone
from muxtune.engine.packing import PackedBatch, PackedSequence, pack
from tests.helpers.models import save_tiny_checkpoint


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backbone(kind: str, path, device="cpu", dtype=torch.float32) -> MultiplexedBackbone:
    bb = MultiplexedBackbone(load_backbone(save_tiny_checkpoint(kind, path), torch.device(device), dtype))
    specs = [
        PeftSpec(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        PeftSpec(method="ia3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        PeftSpec(r=8, alpha=4, target_modules=["o_proj", "up_proj"]),
    ]
    for slot, spec in enumerate(specs):
        adapter = bb.attach(slot, spec, seed=slot)
        with torch.no_grad():  # non-trivial deltas (LoRA B starts at zero, IA3 at one)
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p) * 0.2)
    return bb


@pytest.fixture(params=["llama", "qwen2"])
def backbone(request, tmp_path):
    return _backbone(request.param, tmp_path / request.param)


def _sequences(tokenizer, n=13, seed=0, longest=60):
    rng = random.Random(seed)
    return [PackedSequence(i % 3, encode(tokenizer, "".join(rng.choice("abcdefgh xyz") for _ in range(rng.randint(1, longest))),
                                         "!", 128, True)) for i in range(n)]


def dense_logits(bb: MultiplexedBackbone, batch: PackedBatch) -> torch.Tensor:
    """The reference: HF's own sdpa attention under the dense [rows, 1, chunk, chunk] mask."""
    bb.ctx.layout = batch.layout
    bb.model.set_attn_implementation("sdpa")
    try:
        out = bb.decoder(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         attention_mask=batch.attention_mask(bb.dtype), use_cache=False)
    finally:
        bb.model.set_attn_implementation(attention.NAME)
        bb.ctx.layout = None
    return bb.lm_head(out.last_hidden_state)


def _logits_and_grads(bb, batch, forward):
    """Logits of real tokens and every adapter parameter's gradient of the mean token loss."""
    for adapter in bb.adapters.values():
        for p in adapter.parameters():
            p.grad = None
    logits = forward(bb, batch)
    real = batch.seq_ids >= 0
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets, ignore_index=IGNORE).backward()
    grads = {(slot, i): p.grad.detach().clone() for slot, a in bb.adapters.items() for i, p in enumerate(a.parameters())}
    return logits[real].detach(), grads


@pytest.mark.parametrize("chunk", [64, None], ids=["rows-ending-in-padding", "one-row"])
def test_packed_attention_equals_dense_mask(backbone, chunk):
    batch = pack(_sequences(backbone.tokenizer), chunk, torch.device("cpu"), attn_ratio=backbone.attn_ratio)
    sizes = [e - s for s, e in zip(batch.cu_seq_lens, batch.cu_seq_lens[1:])]
    if chunk:
        assert batch.input_ids.shape[0] > 1 and len(sizes) > len(batch.sequences)  # padding tails are segments
        last = batch.seq_ids[:, -1]
        assert (last < 0).any() and (last >= 0).any()  # rows ending in padding, and full rows
    got, got_grads = _logits_and_grads(backbone, batch, lambda bb, b: bb.logits(b))
    ref, ref_grads = _logits_and_grads(backbone, batch, dense_logits)
    assert (got - ref).abs().max().item() < 1e-5
    assert got_grads.keys() == ref_grads.keys() and len({slot for slot, _ in got_grads}) == 3
    for key, g in got_grads.items():
        assert g.abs().max() > 0, key  # LoRA and IA3 of every task received a gradient
        assert (g - ref_grads[key]).abs().max().item() < 1e-5, key


def test_training_never_builds_a_dense_mask(backbone, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dense mask was built")

    monkeypatch.setattr(PackedBatch, "attention_mask", refuse)
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "sdpa_mask", refuse)
    batch = pack(_sequences(backbone.tokenizer), 64, torch.device("cpu"))
    result = backbone.forward_loss(batch)
    result.task_loss_sum.sum().backward()
    assert torch.isfinite(result.task_loss_sum).all()


def test_cuda_varlen_call_arguments(backbone, monkeypatch):
    """The CUDA path cannot run here (no GPU): mock at the kernel boundary, torch's varlen_attn,
    with a reference that honours its documented contract, and check what the engine passes:
    [T, H, d] tokens, one int32 cu tensor for queries and keys (cuDNN's causal path requires the
    same object), the longest segment, causal window (-1, 0), GQA without repeated K/V."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(dict(q=q.shape, k=k.shape, cu_same=cu_q is cu_k, dtype=cu_q.dtype, max_q=max_q, max_k=max_k,
                          window=tuple(window_size), gqa=enable_gqa, bounds=cu_q.tolist()))
        assert window_size == (-1, 0) and q.dim() == 3
        return attention.segment_attention(q, k, v, cu_q.tolist(), scale)

    monkeypatch.setattr(attention, "_torch_varlen", fake_varlen)
    monkeypatch.setattr(attention, "choose_kernel", lambda *a, **k: "torch_varlen")
    batch = pack(_sequences(backbone.tokenizer), 64, torch.device("cpu"))
    got, got_grads = _logits_and_grads(backbone, batch, lambda bb, b: bb.logits(b))
    ref, ref_grads = _logits_and_grads(backbone, batch, dense_logits)
    assert (got - ref).abs().max().item() < 1e-5
    assert all((g - ref_grads[k]).abs().max().item() < 1e-5 for k, g in got_grads.items())
    cfg = backbone.model.config
    tokens, longest = batch.input_ids.numel(), max(e - s for s, e in zip(batch.cu_seq_lens, batch.cu_seq_lens[1:]))
    assert len(calls) == cfg.num_hidden_layers
    for c in calls:
        assert c["q"] == (tokens, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
        assert c["k"][:2] == (tokens, cfg.num_key_value_heads)
        assert c["cu_same"] and c["dtype"] == torch.int32 and c["bounds"] == batch.cu_seq_lens
        assert c["max_q"] == c["max_k"] == longest and c["gqa"] == (cfg.num_key_value_heads != cfg.num_attention_heads)


@pytest.mark.parametrize("device", DEVICES)
def test_ordinary_callers_of_the_shared_model(tmp_path, device):
    """The installed implementation still serves plain HF calls: a padded batch with a 2D mask,
    and DataCollatorWithFlattening batches with or without flash kwargs, equal sdpa's results."""
    from transformers import DataCollatorWithFlattening

    bb = MultiplexedBackbone(load_backbone(save_tiny_checkpoint("llama", tmp_path / "m"), torch.device(device), torch.float32))
    model = bb.model
    rng = random.Random(2)
    seqs = [[rng.randrange(3, 250) for _ in range(n)] for n in (9, 17, 4, 12)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    with torch.no_grad():
        mine = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(attention.NAME)
        real = mask.bool()
        assert (mine[real] - ref[real]).abs().max().item() < 1e-5
        for flash_kwargs in (True, False):
            flat = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s} for s in seqs])
            flat = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in flat.items() if k != "labels"}
            packed = model(**flat).logits[0]
            assert (packed - ref[real]).abs().max().item() < 1e-5, flash_kwargs


def test_inconsistent_boundaries_are_an_error(backbone):
    batch = pack(_sequences(backbone.tokenizer), 64, torch.device("cpu"))
    kwargs = dict(attention.attention_inputs(batch))
    kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens must run from 0"):
        backbone.decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by scripts/gpu-check.sh)")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_varlen_flash_equals_dense_mask(tmp_path, kind):
    """On a GPU in bf16 the packed path is one varlen flash call per layer; it must match the
    dense-mask sdpa reference to bf16 precision (fp32 on CUDA takes the per-segment path)."""
    bb = _backbone(kind, tmp_path / kind, "cuda", torch.bfloat16)
    assert attention.choose_kernel("cuda", torch.bfloat16, None, None) != "segments"
    batch = pack(_sequences(bb.tokenizer), 64, torch.device("cuda"))
    got, got_grads = _logits_and_grads(bb, batch, lambda b, x: b.logits(x))
    ref, ref_grads = _logits_and_grads(bb, batch, dense_logits)
    scale = ref.float().abs().max().item()
    assert (got.float() - ref.float()).abs().max().item() < 3e-2 * scale
    for key, g in got_grads.items():
        r = ref_grads[key].float()
        assert (g.float() - r).abs().max().item() < 5e-2 * max(r.abs().max().item(), 1e-6), key
