"""Per-sequence (variable-length) causal attention for packed batches, without a dense mask.

A packed batch is a stream of whole sequences laid end to end ([rows, chunk] flattened); each
token attends to the earlier tokens of its own sequence only. A dense [rows, 1, chunk, chunk]
mask says so too, but then attention computes every pair of the chunk square and masks most of
them away, and the mask keeps flash kernels off. Instead the boundaries travel as transformers'
flash-attention kwargs (what `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` makes):

    cu_seq_lens_q = cu_seq_lens_k   int32 [segments + 1], cumulative segment lengths over the
                                    flattened rows*chunk tokens (a row's padding tail is a segment
                                    of its own, so every token is covered and stays finite)
    max_length_q = max_length_k     the longest segment (Python int)

and the function registered here under NAME (transformers' AttentionInterface) computes what the
model's attention module asks for (`sliding_window`: a query sees its last W keys, itself
included; `softcap`: scores = softcap * tanh(scores / softcap)), kernel by `choose_kernel`:
- CUDA, fp16/bf16: one call of torch's variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`: flash or cuDNN, causal, GQA without repeating K/V)
  when no window or softcap applies, else flash-attn's `flash_attn_varlen_func` (window_size,
  softcap), when installed;
- otherwise (CPU, fp32, or CUDA without flash-attn for a window/softcap): per segment on
  [1, heads, n, d] views (split, not sliced, so the backward concatenates gradients once instead
  of a full-size zero tensor per segment): causal SDPA, SDPA with a banded causal mask for a
  window, explicit scores for a softcap; measured fastest on CPU (see README's bench section).
Called without those kwargs (a plain causal forward, KV caches, a 2D padding mask) it behaves as
`sdpa` does, so the shared model still serves ordinary callers. Packed `position_ids` without
boundaries are turned into boundaries, as transformers' flash path does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "muxtune_varlen"

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
except ImportError:  # pragma: no cover - older torch
    _torch_varlen = None
try:
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen
except ImportError:
    _flash_attn_varlen = None


def attention_inputs(batch) -> dict:
    """The attention kwargs of a PackedBatch, for the HF decoder (or each decoder layer): computed
    once per batch and cached on it, on the batch's device."""
    cached = batch.__dict__.get("_attention_inputs")
    if cached is None:
        cu = torch.tensor(batch.cu_seq_lens, dtype=torch.int32).to(batch.input_ids.device)
        longest = max(b - a for a, b in zip(batch.cu_seq_lens, batch.cu_seq_lens[1:]))
        cached = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        batch.__dict__["_attention_inputs"] = cached
    return cached


def install(model) -> None:
    """Register the packed attention with transformers and make it the model's implementation."""
    register()
    model.set_attn_implementation(NAME)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)


def _mask(*args, attention_mask=None, **kwargs):
    """No mask for packed batches (boundaries come as kwargs); an explicit padding mask becomes
    sdpa's mask, for ordinary callers of the shared model."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                     position_ids=None, sliding_window=None, softcap=None, **kwargs):
    """transformers attention-function contract: query [b, Hq, S, d], key/value [b, Hkv, S, d]
    in, ([b, S, Hq, d], None) out."""
    b, _, s, _ = query.shape
    if cu_seq_lens_q is None and attention_mask is None and position_ids is not None and key.shape[2] == s:
        cu_seq_lens_q, max_length_q = _bounds_from_positions(position_ids.expand(b, -1))
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    if cu_seq_lens_q is None or key.shape[2] != s or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, sliding_window=sliding_window, softcap=softcap, **kwargs)
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("packed attention: cu_seq_lens_k must equal cu_seq_lens_q (causal self-attention)")
    cu = cu_seq_lens_q
    max_len = int(max_length_q) if max_length_q is not None else int(cu.diff().max())
    window = sliding_window if sliding_window is not None and max_len > sliding_window else None  # else: no effect
    softcap = softcap or None
    # [b, H, S, d] -> [b*S, H, d]: a view when b == 1 (the projections lay tokens out first)
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[3]) for t in (query, key, value))
    kernel = choose_kernel(q.device.type, q.dtype, window, softcap, dropout)
    if kernel == "segments":
        bounds = cu.tolist()
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != b * s:
            raise ValueError(f"packed attention: cu_seq_lens must run from 0 to the batch's {b * s} tokens, got {bounds[0]}..{bounds[-1]}")
        out = segment_attention(q, k, v, bounds, scaling, dropout, window, softcap)
    else:
        out = varlen_call(q, k, v, cu.to(q.device), max_len, scaling, window, softcap, kernel)
    return out.view(b, s, out.shape[1], out.shape[2]), None


def choose_kernel(device_type: str, dtype: torch.dtype, window: int | None, softcap: float | None,
                  dropout: float = 0.0, torch_varlen: bool | None = None, flash_attn: bool | None = None) -> str:
    """Which implementation computes a packed batch: "torch_varlen" (torch's varlen flash/cuDNN:
    causal only), "flash_attn" (flash-attn's varlen kernel: also sliding windows and softcaps) or
    "segments" (per sequence; CPU, fp32, and what neither kernel covers). Pure: the CUDA choice is
    tested on CPU by naming what is installed."""
    torch_varlen = _torch_varlen is not None if torch_varlen is None else torch_varlen
    flash_attn = _flash_attn_varlen is not None if flash_attn is None else flash_attn
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or dropout != 0.0:
        return "segments"
    if torch_varlen and window is None and softcap is None:
        return "torch_varlen"
    if flash_attn:
        return "flash_attn"
    return "segments"


def varlen_call(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None, window: int | None = None,
                softcap: float | None = None, kernel: str = "torch_varlen") -> torch.Tensor:
    """One variable-length causal flash-attention call over [T, H, d] tokens. The same cu tensor
    object goes in for queries and keys: cuDNN's varlen causal path requires exactly that. A
    window of W keys (the query's own included, as transformers' masks count it) is flash-attn's
    window_size (W - 1, 0)."""
    cu = cu.to(torch.int32)
    if kernel == "torch_varlen":
        return _torch_varlen(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0),
                             enable_gqa=q.shape[1] != k.shape[1])
    return _flash_attn_varlen(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True,
                              window_size=(-1, -1) if window is None else (window - 1, 0), softcap=softcap or 0.0)


def segment_attention(q, k, v, bounds: list[int], scale: float | None, dropout: float = 0.0,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention per segment ([T, H, d] in and out); bounds are cumulative segment lengths.
    Plain causal: SDPA. A sliding window: SDPA with a banded causal mask (a query sees its last
    `window` keys, itself included). A softcap needs the scores: explicit, as the models' eager
    attention computes them (scores * scale, softcap * tanh(scores / softcap), fp32 softmax)."""
    sizes = [e - s for s, e in zip(bounds, bounds[1:])]
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes)):
        qh, kh, vh = qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None]
        n = qs.shape[0]
        if softcap is not None:
            out = softcapped_attention(qh, kh, vh, _band(n, window, qs.device), scale, softcap, dropout)
        elif window is not None and n > window:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=_band(n, window, qs.device), dropout_p=dropout,
                                                 scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout, is_causal=True, scale=scale,
                                                 enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _band(n: int, window: int | None, device) -> torch.Tensor:
    """[n, n] bool: key j visible to query i when j <= i (and i - j < window)."""
    i = torch.arange(n, device=device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    return allowed


def softcapped_attention(q, k, v, allowed, scale, softcap: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention with capped scores (Gemma 2), as the models' eager attention computes it; `allowed`
    is a boolean mask broadcast over [b, H, q, k] (the serving KV cache uses it too)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v)


def _bounds_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segment boundaries where positions restart (every row starts one), as transformers'
    flash path derives them for DataCollatorWithFlattening batches without flash kwargs."""
    flat = position_ids.reshape(-1)
    starts = (flat == flat.min()).nonzero().view(-1)
    rows = torch.arange(0, flat.numel(), position_ids.shape[1], device=flat.device)
    starts = torch.unique(torch.cat([starts, rows]))
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int(cu.diff().max())
